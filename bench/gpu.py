"""GPU benchmarks: qlora_fast beside its peers (bitsandbytes, torchao, PEFT, torch) in one run.

Each area is `bench/gpu_<area>.py` with `run(bench)`; `bench` (a `Bench`) carries the device, the
timer, the copy-bandwidth floor, the result records and the correctness checks. Every figure is
recorded beside its peer's from the same run, and every area checks its results against a
reference in the same run: a failed check, like an exception, fails the area (exit status 1).

    python bench/gpu.py --areas quant matmul --out-dir OUT   # on a GPU (bench/gpu_check.sh runs it)
    python bench/gpu.py --tiny                             # CPU rehearsal: tiny shapes, Triton interpreter

Timing on CUDA: kernel time from a CUDA graph of one call per input set (the sets rotated beyond L2)
replayed and timed with events, else events around each call; the median is reported. Host time per
call (what decoding pays) is the median wall time of issuing one call, measured separately. In
`--tiny` mode everything runs on the CPU and the figures mean nothing: it proves the code paths.
With --out-dir, each record is appended to OUT/results.jsonl (and flushed) as it is made, so a
stage killed by its timeout keeps what it had measured.

    python bench/gpu.py --smoke      # seconds: can Triton compile and launch one trivial kernel here?

`--smoke` builds and launches one trivial Triton kernel (on the GPU; on the CPU under
TRITON_INTERPRET=1 or --tiny) and names what is missing when it cannot (Triton's launcher build
needs a C compiler, Python.h and libcuda), so an environment failure shows in seconds instead of
as every stage timing out. Exit status 0 when it works, 1 when not.
"""
import argparse
import contextlib
import importlib
import json
import math
import os
import statistics
import sys
import time
import traceback

AREAS = ["quant", "matmul", "lora", "optim", "train"]  # the figures issue 12 asks for
EXTRA_AREAS = ["grpo", "reasoning"]  # longer end-to-end runs, on request


class Bench:
    """What an area needs: device, sizes, timer, records and checks."""

    def __init__(self, area, tiny, log=print, sink=None):
        import torch

        self.torch = torch
        self.area = area
        self.tiny = tiny
        self.device = torch.device("cpu" if tiny else "cuda")
        self.log = log
        self.records = []
        self._sink = sink  # called with each record as it is made (bench/gpu.py streams them to a file)
        self.failures = []
        self._copy_gbps = None
        self.timer = "wall clock (CPU rehearsal)" if tiny else None  # how the last `time` measured

    # ---------------------------------------------------------------- sizes

    def size(self, gpu, tiny):
        """The GPU size, or the tiny one in the CPU rehearsal."""
        return tiny if self.tiny else gpu

    def rotated(self, make, nbytes_each):
        """Input sets for `time`: enough fresh copies from `make()` that one pass over them exceeds
        twice the L2 cache (so no call finds its inputs cached), at most 64 and 8 GiB."""
        if self.tiny:
            return [make()]
        l2 = getattr(self.torch.cuda.get_device_properties(self.device), "L2_cache_size", 64 << 20) or (64 << 20)
        count = max(2, min(64, math.ceil(2 * l2 / max(1, nbytes_each)), (8 << 30) // max(1, nbytes_each)))
        return [make() for _ in range(count)]

    # ---------------------------------------------------------------- timing

    def time(self, fn, sets=((),), graph=True, reps=None):
        """(median ms per call, median host µs per call) of `fn(*args)` over the input sets."""
        torch = self.torch
        sets = list(sets)
        if self.tiny:
            fn(*sets[0])  # warm-up (interpreter set-up)
            walls = []
            for i in range(reps or 1):
                start = time.perf_counter()
                fn(*sets[i % len(sets)])
                walls.append(time.perf_counter() - start)
            ms = statistics.median(walls) * 1e3
            return ms, ms * 1e3
        for args in sets:  # warm-up: compilation, autotuning, workspaces
            fn(*args)
        torch.cuda.synchronize()
        host = []
        for i in range(20):
            start = time.perf_counter()
            fn(*sets[i % len(sets)])
            host.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        host_us = statistics.median(host) * 1e6
        ms = None
        if graph:
            try:
                ms = self._graph_ms(fn, sets, reps or 20)
                self.timer = "cuda graph"
            except Exception as exc:  # noqa: BLE001 - not capturable (host syncs, legacy stream): events below
                self.timer = f"events (graph capture failed: {type(exc).__name__})"
                self._flush_cuda_error()
        if ms is None:
            ms = self._events_ms(fn, sets, reps or max(20, 2 * len(sets)))
            self.timer = self.timer if graph else "events"
        return ms, host_us

    def _flush_cuda_error(self):
        """A failed capture can leave an error for the next launch check to report: consume it here."""
        for _ in range(2):
            with contextlib.suppress(Exception):
                self.torch.cuda.synchronize()
                self.torch.ones(1, device=self.device).add_(1)
                self.torch.cuda.synchronize()

    def _graph_ms(self, fn, sets, reps):
        torch = self.torch
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for args in sets:
                fn(*args)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        before = torch.cuda.current_stream()
        try:
            with torch.cuda.graph(graph):
                for args in sets:
                    fn(*args)
        except BaseException:
            # torch.cuda.graph.__exit__ restores the stream only after capture_end returns: when it
            # raises (an invalidated capture), the capture stream would stay current for every later
            # launch of this run. Put the caller's stream back.
            torch.cuda.set_stream(before)
            raise
        graph.replay()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / len(sets))
        del graph
        return statistics.median(times)

    def _events_ms(self, fn, sets, reps):
        torch = self.torch
        times = []
        for i in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*sets[i % len(sets)])
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def wall(self, fn, steps):
        """Median seconds of `fn()` over `steps` synchronized calls after one warm-up (long steps)."""
        fn()
        times = []
        for _ in range(steps):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def copy_gbps(self):
        """Device-to-device copy bandwidth (GB/s, read + write) measured once in this run: the floor."""
        if self._copy_gbps is None:
            torch = self.torch
            n = self.size(1 << 30, 1 << 20)
            src = torch.empty(n, dtype=torch.uint8, device=self.device).random_()
            sets = [(src, torch.empty_like(src))]
            ms, _ = self.time(lambda s, d: d.copy_(s), sets, graph=False)
            self._copy_gbps = 2 * n / ms / 1e6
            self.record("copy bandwidth", "torch copy_", ms=ms, gbps=self._copy_gbps, bytes=2 * n)
            del src, sets
        return self._copy_gbps

    def peak_mib(self, fn):
        """Peak memory (MiB above what was allocated before) of `fn()`; None on the CPU."""
        if self.device.type != "cuda":
            fn()
            return None
        torch = self.torch
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    # ---------------------------------------------------------------- results

    def record(self, case, provider, **figures):
        """One figure line: `case` (what was run), `provider` (whose code), figures (ms, gbps, ...)."""
        row = {"area": self.area, "case": case, "provider": provider, **figures}
        if "ms" in figures and "timer" not in figures:  # several timings in one row name theirs (quant_timer..)
            row["timer"] = self.timer
        self._add(row)
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
        self.log(f"  {case} | {provider} | {shown}")
        return row

    def _add(self, row):
        self.records.append(row)
        if self._sink is not None:
            self._sink(row)

    def check(self, what, ok, detail=""):
        """A correctness check against the reference: a failure fails the area, and is said so."""
        status = "ok" if ok else "FAILED"
        self._add({"area": self.area, "check": what, "ok": bool(ok), "detail": str(detail)})
        self.log(f"  check {what}: {status} {detail}")
        if not ok:
            self.failures.append(what)
        return ok

    def close(self, got, want, rel, what):
        """Check ||got - want|| / ||want|| <= rel (float64), NaN never passing."""
        g, w = got.detach().double().cpu(), want.detach().double().cpu()
        err = ((g - w).norm() / w.norm().clamp_min(1e-30)).item()
        return self.check(what, math.isfinite(err) and err <= rel, f"rel err {err:.2e} (<= {rel:g})")

    @staticmethod
    @contextlib.contextmanager
    def backend(name):
        """Dispatch qlora_fast's ops to `name` ("reference": plain PyTorch) inside the block."""
        old = os.environ.get("QLORA_FAST_BACKEND")
        os.environ["QLORA_FAST_BACKEND"] = name
        try:
            yield
        finally:
            if old is None:
                del os.environ["QLORA_FAST_BACKEND"]
            else:
                os.environ["QLORA_FAST_BACKEND"] = old

    @contextlib.contextmanager
    def guard(self, what):
        """Run one peer or case: its exception is logged and fails the area, the rest still run."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - one failure must not hide the other figures
            self.failures.append(f"{what}: {exc!r}")
            self._add({"area": self.area, "error": what, "detail": repr(exc)})
            self.log(f"  {what}: FAILED with {exc!r}\n" + traceback.format_exc())
        finally:
            if self.device.type == "cuda":
                self.torch.cuda.empty_cache()


def smoke(tiny=False, log=print):
    """Launch one trivial Triton kernel (x + 1 on 1024 floats) and check its result: True when
    Triton can compile and launch here. On failure, says what failed and what Triton's launcher
    build needs (a C compiler, Python.h, libcuda) and whether this machine has each. On the GPU
    unless `tiny` or TRITON_INTERPRET is on (then on the CPU, through the interpreter; set
    TRITON_INTERPRET before the first triton import)."""
    start = time.perf_counter()
    interpret = tiny or os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import torch
        import triton
        import triton.language as tl

        @triton.jit
        def _smoke_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
            i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(out_ptr + i, tl.load(x_ptr + i, mask=i < n) + 1.0, mask=i < n)

        if not interpret and not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device (the CPU check needs TRITON_INTERPRET=1 or --tiny)")
        device = "cpu" if interpret else "cuda"
        x = torch.arange(1000, dtype=torch.float32, device=device)
        out = torch.zeros_like(x)
        _smoke_kernel[(triton.cdiv(x.numel(), 256),)](x, out, x.numel(), BLOCK=256)
        if device == "cuda":
            torch.cuda.synchronize()
        if not torch.equal(out.cpu(), x.cpu() + 1):
            raise RuntimeError(f"the kernel ran but computed wrong values: {out[:8].tolist()}")
    except Exception as exc:  # noqa: BLE001 - the point is to name any failure
        log(f"# triton smoke FAILED ({time.perf_counter() - start:.1f} s): Triton cannot compile or launch a "
            f"trivial kernel on this machine: {type(exc).__name__}: {exc}")
        for line in _triton_environment():
            log(f"#   {line}")
        log(traceback.format_exc())
        return False
    where = "CPU (Triton interpreter)" if interpret else torch.cuda.get_device_name()
    log(f"# triton smoke ok: triton {triton.__version__}, torch {torch.__version__} on {where} "
        f"({time.perf_counter() - start:.1f} s)")
    return True


def _triton_environment():
    """What Triton's CUDA launcher build needs, and whether this machine has it (lines to print)."""
    import shutil
    import sysconfig

    lines = []
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    lines.append(f"C compiler (CC, gcc, cc, clang): {cc or 'MISSING'}")
    include = sysconfig.get_paths().get("include") or "?"
    found = os.path.exists(os.path.join(include, "Python.h"))
    lines.append(f"Python.h in {include}: {'found' if found else 'MISSING (install the python3-dev headers)'}")
    try:
        from triton.backends.nvidia.driver import libcuda_dirs

        dirs = libcuda_dirs()
        lines.append(f"libcuda.so.1: {', '.join(dirs) if dirs else 'MISSING'}")
    except Exception as exc:  # noqa: BLE001 - the lookup itself raises when libcuda is absent
        lines.append(f"libcuda.so.1: not found ({type(exc).__name__}: {exc})")
    lines.append(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}, "
                 f"TRITON_CACHE_DIR={os.environ.get('TRITON_CACHE_DIR', '~/.triton/cache')!r}")
    return lines


def run_area(area, tiny, log, results, sink=None):
    bench = Bench(area, tiny, log, sink)
    log(f"\n## {area}")
    start = time.perf_counter()
    with bench.guard(f"area {area}"):
        importlib.import_module(f"gpu_{area}").run(bench)
    log(f"## {area}: {'FAIL ' + '; '.join(bench.failures) if bench.failures else 'PASS'} "
        f"({time.perf_counter() - start:.1f} s)")
    results.extend(bench.records)
    return not bench.failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--areas", nargs="*", default=AREAS, help=f"areas to run (default {AREAS}; also {EXTRA_AREAS})")
    parser.add_argument("--tiny", action="store_true", help="CPU rehearsal: tiny shapes, Triton interpreter")
    parser.add_argument(
        "--smoke", action="store_true",
        help="only launch one trivial Triton kernel and exit (0: Triton compiles and launches here; 1: it "
             "cannot, with what is missing named); on the GPU, or on the CPU under TRITON_INTERPRET=1 or --tiny",
    )
    parser.add_argument(
        "--out-dir", default=None,
        help="append the log to OUT/bench.log and each record, as it is made, to OUT/results.jsonl"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        return 0 if smoke(args.tiny) else 1
    unknown = sorted(set(args.areas) - set(AREAS + EXTRA_AREAS))
    if unknown:
        parser.error(f"unknown areas {unknown}; known: {AREAS + EXTRA_AREAS}")
    if args.tiny:
        # must precede the first triton import; the kernels run on CPU tensors only when asked
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ.setdefault("QLORA_FAST_BACKEND", "triton")
    import torch

    if args.tiny:  # bitsandbytes' CPU fallbacks wrap themselves in torch.compile: eager is enough here
        torch._dynamo.config.disable = True
    if not args.tiny and not torch.cuda.is_available():
        print("bench/gpu.py: torch sees no CUDA device (use --tiny for the CPU rehearsal)", file=sys.stderr)
        return 2
    sink = None
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        sink = open(os.path.join(args.out_dir, "bench.log"), "a")

    def log(*parts):
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        if sink:
            sink.write(line + "\n")
            sink.flush()

    where = "CPU rehearsal (tiny shapes; figures mean nothing)" if args.tiny else torch.cuda.get_device_name()
    log(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {where}, torch {torch.__version__}")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    write = None
    if args.out_dir:
        # each record goes to results.jsonl as it is made (flushed): a stage timeout (SIGTERM) keeps
        # what was measured before it. The date is the run's start.
        meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": where,
                "torch": torch.__version__, "tiny": args.tiny}
        jsonl = open(os.path.join(args.out_dir, "results.jsonl"), "a")

        def write(row):
            jsonl.write(json.dumps({**meta, **row}) + "\n")
            jsonl.flush()

    results, failed = [], []
    for area in args.areas:
        if not run_area(area, args.tiny, log, results, write):
            failed.append(area)
    if args.out_dir:
        jsonl.close()
    log(f"# areas failed: {failed}" if failed else "# all areas passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
