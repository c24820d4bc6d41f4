"""Ahead-of-time compile gate: every Triton kernel specialization the launchers produce, compiled
for sm_80 and sm_90 on the CPU (no GPU needed), failing on compile errors, register spills and
shared memory over the target's per-block limit.

How it works. The launchers in kernels/ (installed as `qlora_fast.kernels`) are called on 'meta'
tensors over a representative set of shapes (weights 4096x4096, 14336x4096, 4096x14336 and odd ones; 1, 16 and
4096 rows; fp32/fp16/bf16; nested on/off; NF4/FP4; blocksizes 32..4096; LoRA ranks 8..64 with
and without dropout and bias; forward, backward/transposed; fused and vendor paths).
`JITFunction.run` is patched so that each `kernel[grid](...)` is recorded instead of executed,
specialized by Triton's own binder for the CUDA backend (pointers 16-byte aligned as the CUDA
allocator gives them, offset by the view's storage offset; ints divisible by 16 get the
divisibility attribute; ints equal to 1 become constants). Launches are deduplicated on (kernel,
signature, constexprs, attributes, launch options); each remaining specialization is compiled
with `triton.compile(ASTSource(...), target=GPUTarget("cuda", 80|90, 32))` in a process pool.

Dtype, double quantization, transpose and row count are crossed in full; shape, blocksize,
bias, rank and dropout rotate over those cases (see `scenarios`). A `*_kernel` that no scenario
launches is an error (UNCOVERED): a new kernel gets a scenario or the gate fails.

One line per specialization and target: registers, spill stores (ptxas -v; the stack frame is
shown apart, as a call's frame such as div.rn's slow path is no spill), shared memory, tl.dot lowering
(wgmma / mma / none: FMA), global load widths in the PTX
(`ld`: bytes x count, `cp.async`: bytes x count) and SASS instructions per weight element of the
hot loop (the innermost loop's instructions over the elements one iteration handles; the whole
kernel for loop-free kernels; thread instructions, an issue-slot estimate). Exit status 1 on
any failure, with the failing kernels named. ptxas runs every time (TRITON_ALWAYS_COMPILE).

Run (any environment with torch and triton; TRITON_INTERPRET is ignored):
    python bench/aot_compile.py                        # everything (CI: `make aot`), ~150 specializations x 2
    python bench/aot_compile.py --quick                # a smaller shape set
    python bench/aot_compile.py -k nf4_matmul --arch 90 --list
    make aot36                                         # --quick for sm_90 under triton 3.6 (the GPU image's)
Options: -k SUBSTR (only kernels whose module.name contains it), --arch 80/90, --list (enumerate
only), --limit N (the first N specializations), --jobs N, --kernels-dir DIR (another copy of kernels/,
e.g. an older commit's: `git show REV:kernels/F`).
Each line: `sm_XX ok|FAIL... module.kernel [constexprs] ptrs=... | figures | seconds <- first scenario`;
then a markdown table per kernel and target (`--summarize LOG` prints it again from a saved output).
"""
import argparse
import collections
import contextlib
import importlib.util
import io
import itertools
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # the launchers must take their GPU paths
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # ptxas must run (its -v log gives the spills), no cache hits
os.environ["TRITON_DUMP_PTXAS_LOG"] = (
    "1"  # printed by triton's make_cubin: captured per compile  # triton 3.9's default, stated (silences its warning)
)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

# Per-block shared memory a launch may use (bytes): A100 163 KB, H100 227 KB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DEV = "meta"
_ALIGN_BASE = 1 << 20  # a CUDA allocation's address: aligned far beyond 16 bytes


KERNELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")


def load_kernels(kernels_dir=None):
    """The kernels package (it imports torch and triton only) from `kernels_dir`, by default this
    checkout's kernels/ (what `qlora_fast.kernels` installs)."""
    kernels_dir = os.path.abspath(kernels_dir or KERNELS_DIR)
    name = "aot_kernels"
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(kernels_dir, "__init__.py"), submodule_search_locations=[kernels_dir])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[name] = pkg
    spec.loader.exec_module(pkg)
    return tuple(importlib.import_module(f"{name}.{m}") for m in ("nf4", "nf4_matmul", "lora"))


# ---------------------------------------------------------------- recording launches

class _Ptr:
    """A tensor as the binder sees it: dtype and a device address with the view's alignment."""

    def __init__(self, t):
        self.dtype = t.dtype
        self._ptr = _ALIGN_BASE + t.storage_offset() * t.element_size()

    def data_ptr(self):
        return self._ptr


class Recorder:
    """Patches JITFunction.run: each launch is specialized as the JIT would for a CUDA target and
    stored (deduplicated) instead of run."""

    def __init__(self):
        self.backend = make_backend(GPUTarget("cuda", 90, 32))
        self.binders = {}
        self.specs = {}  # key -> (fn, signature, constexprs, attrs, options)
        self.launches = 0
        self.origin = {}  # key -> the first scenario that produced it

    def run(self, fn, args, kwargs, scenario):
        binder = self.binders.get(fn)
        if binder is None:
            binder = self.binders[fn] = create_function_from_signature(fn.signature, fn.params, self.backend)
        args = [_Ptr(a) if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {k: _Ptr(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        bound, specialization, options = binder(*args, **kwargs)
        _, signature, constexprs, attrs = fn._pack_args(self.backend, dict(options), bound, specialization, options)
        key = (fn.__module__.rsplit(".", 1)[-1], fn.__name__, tuple(sorted(signature.items())),
               tuple(sorted((k, repr(v)) for k, v in constexprs.items())),
               tuple(sorted((k, repr(v)) for k, v in attrs.items())), tuple(sorted(options.items())))
        self.launches += 1
        if key not in self.specs:
            self.specs[key] = (fn, signature, constexprs, attrs, dict(options))
            self.origin[key] = scenario

    @contextlib.contextmanager
    def patched(self):
        original = JITFunction.run
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            recorder.run(fn, args, kwargs, recorder.scenario)

        JITFunction.run = run
        try:
            yield
        finally:
            JITFunction.run = original


def _quantized(numel, blocksize, nested):
    """A 4-bit weight's tensors (bitsandbytes layout) on the meta device."""
    n_blocks = -(-numel // blocksize)
    packed = torch.empty(((numel + 1) // 2, 1), dtype=torch.uint8, device=DEV)
    code = torch.empty(16, device=DEV)
    if not nested:
        return packed, torch.empty(n_blocks, device=DEV), code, None, None, None
    return (packed, torch.empty(n_blocks, dtype=torch.uint8, device=DEV), code,
            torch.empty(-(-n_blocks // 256), device=DEV), torch.empty(256, device=DEV), torch.empty((), device=DEV))


def scenarios(mods, quick):
    """(name, thunk) for every launcher call of the representative shape set.

    The compiled code depends on the constexprs, dtypes and specialization attributes, not on
    the shapes: the axes that select code paths (dtype, double quantization, transpose, rows 1 /
    16 / 4096) are crossed in full; weight shape, blocksize, bias, LoRA rank and dropout rotate
    over those cases so each value meets several combinations while the compile count stays
    within CI's budget.
    """
    nf4, nf4_matmul, lora = mods
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    weights = [(4096, 4096), (14336, 4096), (4096, 14336), (333, 517), (1000, 64), (96, 130)]
    rows = [1, 16, 4096]
    blocksizes = [32, 64, 128, 256, 512, 1024, 2048, 4096]
    ranks = [8, 16, 32, 64]
    if quick:
        dtypes, rows, blocksizes = [torch.float32, torch.bfloat16], [1, 4096], [64, 4096]
    pick = lambda values, i: values[i % len(values)]
    out = []
    code, code8 = torch.empty(16, device=DEV), torch.empty(256, device=DEV)

    # quantize (NF4 and FP4 differ only in the code table's values) + double quantization:
    # every blocksize with every input dtype, sizes rotating through the weights and odd counts
    sizes = [o * i for o, i in weights] + [1, 999, 64 * 700 - 5]
    cases = [(bs, pick(dtypes, i)) for i, bs in enumerate(blocksizes)]
    cases += [(bs, dt) for bs in (blocksizes[0], blocksizes[-1]) for dt in dtypes if (bs, dt) not in cases]
    for i, (bs, dt) in enumerate(cases):
        def quant(n=pick(sizes, i), bs=bs, dt=dt):
            _, absmax = nf4.quantize_4bit(torch.empty(n, device=DEV, dtype=dt), bs, code)
            nf4.quantize_absmax(absmax, code8)
        out.append((f"quantize n={pick(sizes, i)} bs{bs} {dt}", quant))

    # dequantize (public and the matmul's workspace one): every blocksize, nested or not, the
    # output dtype rotating, and every dtype at the smallest and largest blocksize
    cases = [
        (bs, nested, pick(dtypes, i)) for i, (bs, nested) in enumerate(itertools.product(blocksizes, (False, True)))
    ]
    cases += [(bs, nested, dt) for bs in (blocksizes[0], blocksizes[-1]) for nested in (False, True) for dt in dtypes
              if (bs, nested, dt) not in cases]
    for i, (bs, nested, dt) in enumerate(cases):
        n_out, n_in = pick(weights, i)
        def deq(n_out=n_out, n_in=n_in, bs=bs, nested=nested, dt=dt):
            packed, absmax, code, na, nc, off = _quantized(n_out * n_in, bs, nested)
            nf4.dequantize_4bit(packed, absmax, code, n_out * n_in, bs, dt, na, nc, off)
            nf4_matmul.dequantize_4bit_into(packed, absmax, code, (n_out, n_in), bs, na, nc, off, dtype=dt)
        out.append((f"dequantize {n_out}x{n_in} bs{bs} nested={nested} {dt}", deq))

    # 4-bit matmul, forward and transposed (backward), fused and dequant paths
    for i, (dt, nested, transpose, m) in enumerate(itertools.product(dtypes, (False, True), (False, True), rows)):
        (n_out, n_in), bs, bias = pick(weights, i), pick(blocksizes, i // 2), i // 3 % 2 == 1
        def mm(n_out=n_out, n_in=n_in, bs=bs, nested=nested, dt=dt, m=m, transpose=transpose, bias=bias):
            w = _quantized(n_out * n_in, bs, nested)
            k, n = (n_out, n_in) if transpose else (n_in, n_out)
            x = torch.empty(m, k, device=DEV, dtype=dt)
            b = torch.empty(n, device=DEV, dtype=dt) if bias else None
            for method in ("fused", "dequant"):
                nf4_matmul.nf4_matmul(x, *w[:3], (n_out, n_in), bs, *w[3:], bias=b, transpose=transpose, method=method)
        out.append((f"nf4_matmul {n_out}x{n_in} bs{bs} nested={nested} {dt} M={m} T={transpose} bias={bias}", mm))

    # fused LoRA forward and backward, dense or 4-bit base, fused and vendor paths
    for i, (base, dt, m) in enumerate(itertools.product((None, False, True), dtypes, rows)):
        (n_out, n_in), bs, r = pick(weights, i + 1), pick(blocksizes, i), pick(ranks, i)
        dropout, bias = i % 2 == 0, i // 2 % 2 == 0
        def lo(n_out=n_out, n_in=n_in, base=base, bs=bs, dt=dt, m=m, r=r, dropout=dropout, bias=bias):
            if base is None:
                w = torch.empty(n_out, n_in, device=DEV, dtype=dt)
            else:
                q = _quantized(n_out * n_in, bs, base)
                w = nf4_matmul.Weight4bit(*q[:3], (n_out, n_in), bs, *q[3:])
            x = torch.empty(m, n_in, device=DEV, dtype=dt)
            a = torch.empty(r, n_in, device=DEV, dtype=dt)
            b_ = torch.empty(n_out, r, device=DEV, dtype=dt)
            bias_t = torch.empty(n_out, device=DEV, dtype=dt) if bias else None
            xd = torch.empty_like(x) if dropout else None
            for method in ("fused", "vendor"):
                _, xa = lora.lora_forward(x, w, a, b_, 2.0, bias_t, xd, method=method)
                lora.lora_backward(torch.empty(m, n_out, device=DEV, dtype=dt), x if xd is None else xd, xa, w,
                                   a, b_, 2.0, xd, method=method)
        base_name = "dense" if base is None else f"nf4 bs{bs} nested={base}"
        out.append((f"lora {n_out}x{n_in} {base_name} {dt} M={m} r={r} dropout={dropout} bias={bias}", lo))
    return out


def enumerate_specs(mods, quick, only=None):
    rec = Recorder()
    errors = []
    with rec.patched():
        for name, thunk in scenarios(mods, quick):
            rec.scenario = name
            try:
                thunk()
            except Exception as e:  # a launcher that cannot even be called is a failure too
                errors.append(f"{name}: {type(e).__name__}: {e}")
    # every kernel the package defines must be reached by some scenario, or it goes unchecked
    launched = {fn for fn, *_ in rec.specs.values()}
    for mod in mods:
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel") and obj.__module__ == mod.__name__ \
                    and obj not in launched:
                errors.append(f"{mod.__name__.rsplit('.', 1)[-1]}.{name}: UNCOVERED, no scenario launches it "
                              "(add a call of its launcher to scenarios())")
    specs = {k: v for k, v in rec.specs.items() if not only or only in f"{k[0]}.{k[1]}"}
    return rec, specs, errors


# ---------------------------------------------------------------- compiling

_JOBS = []  # (key, spec) shared with forked workers


def _tool(name):
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


# Weight elements one program handles per hot-loop iteration (loop-free kernels: per program),
# from the tile constexprs: the first set of names a kernel has wins. A kernel with none of them
# gets a plain instruction count.
_ELEMENTS = [
    (("CHUNKS", "CB"), lambda c: c["CHUNKS"] * c["CB"] * 2),  # packed bytes -> 2 elements each
    (("BLOCK_R", "BLOCK_C"), lambda c: c["BLOCK_R"] * c["BLOCK_C"]),
    (("BLOCK_P", "BLOCK_Q"), lambda c: c["BLOCK_P"] * c["BLOCK_Q"]),
    (("BLOCK_N", "BLOCK_K"), lambda c: c["BLOCK_N"] * c["BLOCK_K"]),
    (("GROUP", "BLOCKSIZE"), lambda c: c["GROUP"] * c["BLOCKSIZE"]),
    (("GROUP", "NESTED"), lambda c: c["GROUP"] * c["NESTED"]),
    (("BLOCK",), lambda c: c["BLOCK"]),
]


def _elements(fn, constexprs):
    named = {fn.arg_names[k[0]]: v for k, v in constexprs.items() if len(k) == 1}
    for names, f in _ELEMENTS:
        if all(isinstance(named.get(n), int) and not isinstance(named.get(n), bool) for n in names):
            return int(f(named))
    return None


def _hot_loop_sass(sass):
    """Instructions of the innermost loop (a backward branch's range) or of the whole kernel."""
    instr = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    instr = [(a, t) for a, t in instr if not t.strip().startswith("NOP")]
    loops = []
    for addr, text in instr:
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:  # a backward branch (not the trap loop after EXIT)
            loops.append((int(m.group(1), 16), addr))
    inner = [(s, e) for s, e in loops if not any(s <= s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in loops)]
    if not inner:
        return len(instr), False
    s, e = max(inner, key=lambda r: r[1] - r[0])
    return sum(1 for a, _ in instr if s <= a <= e), True


def _load_widths(ptx):
    """'ld 16Bx4 1Bx32 | cp.async 4Bx96' from the PTX's global loads and async copies."""
    ld = collections.Counter()
    for m in re.finditer(r"ld\.global((?:\.[\w:]+)*)", ptx):
        quals = m.group(1)
        vec = re.search(r"\.v(\d)", quals)
        bits = re.search(r"\.[bufs](\d+)\b", quals)
        ld[(int(vec.group(1)) if vec else 1) * (int(bits.group(1)) // 8 if bits else 4)] += 1
    cp = collections.Counter(
        int(m.group(1), 0)
        for m in re.finditer(r"cp\.async\.c[ag]\.shared\.global[^;]*?,\s*(0x[0-9a-f]+|\d+)\s*[;,]", ptx)
    )
    fmt = lambda c: " ".join(f"{w}Bx{n}" for w, n in sorted(c.items(), reverse=True)) or "-"
    return f"ld {fmt(ld)}" + (f" | cp.async {fmt(cp)}" if cp else "")


def compile_one(job):
    index, arch = job
    key, (fn, signature, constexprs, attrs, options) = _JOBS[index]
    start = time.time()
    result = {"index": index, "arch": arch}
    try:
        opts = {k: v for k, v in options.items() if k not in ("debug",)}
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                    options=opts)
        log = log.getvalue()
        ptx = kernel.asm["ptx"]
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
            sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
        # the kernel's own line (device functions it calls, if any, are listed separately)
        line = re.search(rf"Function {re.escape(kernel.metadata.name)}:\s*\n\s*(.*)", res)
        usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", line.group(1) if line else res))
        n_sass, looped = _hot_loop_sass(sass)
        elements = _elements(fn, constexprs)
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log)]
        result.update(
            regs=int(usage.get("REG", -1)), stack=int(usage.get("STACK", 0)),
            # spill stores from ptxas -v (a stack frame alone can be a call's, e.g. div.rn's slow path)
            spills=sum(spills) if spills else int(usage.get("LOCAL", 0)) + int(usage.get("STACK", 0)),
            shared=int(kernel.metadata.shared) + int(usage.get("SHARED", 0)),
            dot="wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else ("FMA" if "tl.dot" in fn.src else "-"),
            loads=_load_widths(ptx),
            # thread instructions per element: the issue-slot cost (x 1/32 per warp)
            sass=(f"{n_sass * 32 * kernel.metadata.num_warps / elements:.1f}/elem{'' if looped else ' (no loop)'}"
                  if elements else f"{n_sass} instr"),
        )
    except Exception as e:
        msg = str(e).strip().splitlines()
        result["error"] = f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]
    result["seconds"] = time.time() - start
    return result


def describe(key):
    module, name, signature, constexprs, attrs, options = key
    fn_args = dict(signature)
    consts = ",".join(f"{v}" for _, v in constexprs)
    dts = ",".join(sorted({t for t in fn_args.values() if t.startswith("*")}))
    n_div = sum(1 for _, v in attrs if v != "[]")
    return f"{module}.{name} [{consts}] ptrs={dts} div16={n_div}" + (f" {dict(options)}" if options else "")


def summarize(lines):
    """A markdown table per (kernel, target) from the gate's per-specialization lines."""
    rows = collections.defaultdict(lambda: collections.defaultdict(list))
    for line in lines:
        m = re.match(r"sm_(\d+) (ok|FAIL\S*)\s.*?(\w+\.\w+) \[", line)
        if not m:
            continue
        row = rows[(m.group(3), int(m.group(1)))]
        row["n"].append(1)
        row["spill"].append("spills" in line.split("|")[0])
        row["smem_fail"].append("smem" in line.split("|")[0])
        row["compile"].append(m.group(2) == "FAIL-COMPILE")
        for field, pattern in (("regs", r"regs=(\d+)"), ("spills", r"spills=(\d+)B"), ("smem", r"smem=([\d.]+)KB"),
                               ("sass", r"sass=([\d.]+)/elem"), ("dot", r"dot=(\S+)")):
            v = re.search(pattern, line)
            if v:
                row[field].append(v.group(1) if field == "dot" else float(v.group(1)))
    out = ["| kernel | target | specializations | failed: spill / smem / compile | max regs | max spill B | "
           "max smem KB | tl.dot | SASS instr/elem (min-max) |", "|---|---|---|---|---|---|---|---|---|"]
    for (name, arch), r in sorted(rows.items()):
        mx = lambda f, fmt="{:.0f}": fmt.format(max(r[f])) if r[f] else "-"
        sass = f"{min(r['sass']):.1f}-{max(r['sass']):.1f}" if r["sass"] else "-"
        out.append(f"| {name} | sm_{arch} | {len(r['n'])} | {sum(r['spill'])} / {sum(r['smem_fail'])} / "
                   f"{sum(r['compile'])} | {mx('regs')} | {mx('spills')} | {mx('smem', '{:.1f}')} | "
                   f"{'/'.join(sorted(set(r['dot']))) or '-'} | {sass} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smaller shape set (development)")
    p.add_argument("-k", dest="only", help="only kernels whose module.name contains this")
    p.add_argument("--arch", type=int, action="append", choices=(80, 90), help="target(s); default both")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--list", action="store_true", help="enumerate the specializations, compile nothing")
    p.add_argument("--limit", type=int, help="compile only the first N specializations (tests)")
    p.add_argument("--kernels-dir", help="compile this copy of kernels/ instead of qlora_fast.kernels")
    p.add_argument("--summarize", metavar="LOG", help="print the summary table of an earlier run's output")
    args = p.parse_args(argv)
    if args.summarize:
        print(summarize(open(args.summarize).read().splitlines()))
        return 0
    archs = args.arch or [80, 90]

    t0 = time.time()
    mods = load_kernels(args.kernels_dir)
    rec, specs, errors = enumerate_specs(mods, args.quick, args.only)
    print(f"aot_compile: triton {triton.__version__}, {rec.launches} launches recorded -> {len(specs)} "
          f"specializations x {len(archs)} targets ({time.time() - t0:.1f} s)", flush=True)
    for e in errors:
        print(f"LAUNCHER-ERROR {e}")
    _JOBS[:] = list(specs.items())[:args.limit]
    specs = dict(_JOBS)
    if args.list:
        for key, _ in _JOBS:
            print(describe(key), "<-", rec.origin[key])
        return 1 if errors else 0

    jobs = [(i, a) for i in range(len(_JOBS)) for a in archs]
    failures = collections.Counter()
    lines = []
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(args.jobs) as pool:
        for r in pool.imap_unordered(compile_one, jobs):
            key = _JOBS[r["index"]][0]
            name = f"{key[0]}.{key[1]}"
            arch = r["arch"]
            if "error" in r:
                status, line = "FAIL-COMPILE", r["error"]
            else:
                problems = []
                if r["spills"]:
                    problems.append(f"spills {r['spills']} B")
                if r["shared"] > SMEM_LIMIT[arch]:
                    problems.append(f"smem {r['shared'] // 1024} KB > {SMEM_LIMIT[arch] // 1024} KB")
                status = "FAIL " + "; ".join(problems) if problems else "ok"
                line = (
                    f"regs={r['regs']} spills={r['spills']}B stack={r['stack']}B smem={r['shared'] / 1024:.1f}KB "
                    f"dot={r['dot']} "
                    f"sass={r['sass']} {r['loads']}"
                )
            if status != "ok":
                failures[(name, arch)] += 1
            lines.append(f"sm_{arch} {status:4} {describe(key)} | {line} | {r['seconds']:.1f}s <- {rec.origin[key]}")
            print(lines[-1], flush=True)

    print(summarize(lines))
    n_fail = sum(failures.values())
    print(f"aot_compile {'FAILED' if n_fail or errors else 'PASSED'}: {len(jobs)} compiles "
          f"({len(specs)} specializations x {len(archs)} targets), {n_fail} failed, {len(errors)} launcher errors, "
          f"triton {triton.__version__}, {time.time() - t0:.0f} s")
    return 1 if n_fail or errors else 0


if __name__ == "__main__":
    sys.exit(main())
