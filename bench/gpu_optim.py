"""AdamW 32-bit and 8-bit, plain and paged, vs torch fused/foreach and bitsandbytes,
`run(bench)` for bench/gpu.py.

UNVERIFIED on a GPU: written without one; only the CPU rehearsal (`--tiny`) has run.

Two parameter sets, each provider timed on the same parameters and gradients (median step time):
- the anchor: 64 tensors of 2048x2048 fp32 (268M parameters);
- 448 LoRA-sized tensors (32 layers x 7 projections x A and B of rank 16 on Llama-3-8B shapes),
  where per-tensor launch overhead, not bandwidth, decides.
Providers: torch AdamW fused and foreach; bitsandbytes AdamW, PagedAdamW, AdamW8bit,
PagedAdamW8bit; qlora_fast AdamW, AdamW8bit, and PagedAdamW / PagedAdamW8bit with every state
resident and with a budget of half the states (the rest streamed from pinned host memory, whose
copy bandwidth is measured in the same run: the floor of a half-paged step).
Checks: one step of qlora_fast AdamW against torch's fused AdamW, and of AdamW8bit against it
within the 8-bit states' error; the extension is loaded with its CUDA kernels (not a JIT build).
"""
import gc

import torch

from qlora_fast.reference.blockwise import BLOCKSIZE_8BIT

LR = 1e-3


def _providers(state32, state8, page_bytes):
    from qlora_fast.optim import AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit

    out = {
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=LR, fused=True),
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=LR, foreach=True),
    }
    try:
        import bitsandbytes as bnb

        out.update({
            "bnb AdamW": lambda ps: bnb.optim.AdamW(ps, lr=LR),
            "bnb PagedAdamW": lambda ps: bnb.optim.PagedAdamW(ps, lr=LR),
            "bnb AdamW8bit": lambda ps: bnb.optim.AdamW8bit(ps, lr=LR),
            "bnb PagedAdamW8bit": lambda ps: bnb.optim.PagedAdamW8bit(ps, lr=LR),
        })
    except ImportError as exc:
        out["bnb (import failed)"] = exc
    out.update({
        "qlora_fast AdamW": lambda ps: AdamW(ps, lr=LR),
        "qlora_fast AdamW8bit": lambda ps: AdamW8bit(ps, lr=LR),
        "qlora_fast PagedAdamW (resident)": lambda ps: PagedAdamW(ps, lr=LR, budget=None),
        "qlora_fast PagedAdamW8bit (resident)": lambda ps: PagedAdamW8bit(ps, lr=LR, budget=None),
        "qlora_fast PagedAdamW (half on host)": lambda ps: PagedAdamW(ps, lr=LR, budget=state32 // 2,
                                                                                 page_bytes=page_bytes),
        "qlora_fast PagedAdamW8bit (half on host)": lambda ps: PagedAdamW8bit(ps, lr=LR, budget=state8 // 2,
                                                                                         page_bytes=page_bytes),
    })
    return out


def _host_copy_gbps(bench):
    """Pinned host<->device copy bandwidth (GB/s each way): the floor of a paged step."""
    if bench.device.type != "cuda":
        return None, None
    n = 256 << 20
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device=bench.device)
    h2d, _ = bench.time(lambda: dev.copy_(host, non_blocking=True), graph=False)
    d2h, _ = bench.time(lambda: host.copy_(dev, non_blocking=True), graph=False)
    bench.record("pinned copy bandwidth", "torch copy_", h2d_gbps=n / h2d / 1e6, d2h_gbps=n / d2h / 1e6)
    return n / h2d / 1e6, n / d2h / 1e6


def _check_one_step(bench):
    from qlora_fast.optim import AdamW, AdamW8bit

    shapes = [(1000, 1003), (4099,), (3, 7)]
    base = [torch.randn(s, device=bench.device) for s in shapes]
    grads = [torch.randn(s, device=bench.device) for s in shapes]
    results = {}
    for name, make in (("torch fused", lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True)),
                       ("qlora_fast AdamW", lambda ps: AdamW(ps, lr=1e-2)),
                       ("qlora_fast AdamW8bit", lambda ps: AdamW8bit(ps, lr=1e-2, min_8bit_size=0))):
        ps = [torch.nn.Parameter(t.clone()) for t in base]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        make(ps).step()
        results[name] = torch.cat([(p.detach() - t).reshape(-1) for p, t in zip(ps, base)])  # the update
    bench.close(results["qlora_fast AdamW"], results["torch fused"], 1e-5, "one AdamW step vs torch fused")
    # first step: the update is ~lr * sign(g); 8-bit moments move it by their quantization error
    bench.close(results["qlora_fast AdamW8bit"], results["torch fused"], 5e-2, "one AdamW8bit step vs torch fused")


def _check_extension(bench):
    from pathlib import Path

    import qlora_fast

    module = qlora_fast.load_extension()
    if bench.device.type == "cuda":
        has = torch._C._dispatch_has_kernel_for_dispatch_key("qlora_fast::adam_step_", "CUDA")
        bench.check("extension has CUDA kernels", has)
    where = Path(getattr(module, "__file__", "") or "?")
    # a JIT build lives in the cache folder, the package's own build beside qlora_fast/__init__.py
    bench.check("extension is the package's build, not a JIT build", where.parent == Path(qlora_fast.__file__).parent,
                str(where))


def run(bench):
    """Every provider's timing first, each in its own guard, then our checks: a failure (or a CUDA
    fault, which poisons the process) in our code cannot cost the peers' figures."""
    h2d = d2h = None
    with bench.guard("pinned copy bandwidth"):
        h2d, d2h = _host_copy_gbps(bench)
    gen = torch.Generator(device=bench.device).manual_seed(0)
    sets = {
        "anchor 64 x 2048x2048 fp32": bench.size(gpu=[(2048, 2048)] * 64, tiny=[(33, 65)] * 4),
        "448 LoRA tensors (r=16, Llama-3-8B)": bench.size(
            gpu=[(16, 4096), (4096, 16)] * 32 * 5 + [(16, 4096), (14336, 16), (16, 14336), (4096, 16)] * 32,
            tiny=[(64, 80), (80, 64)] * 3),
    }
    for label, shapes in sets.items():
        with bench.guard(label):
            params = [torch.nn.Parameter(torch.randn(s, device=bench.device, generator=gen)) for s in shapes]
            for p in params:
                p.grad = torch.randn(p.shape, device=bench.device, generator=gen) * 1e-2
            n = sum(p.numel() for p in params)
            state32, state8 = n * 8, n * 2 + (n // BLOCKSIZE_8BIT) * 8
            bench.log(f"  {label}: {len(params)} tensors, {n / 1e6:.1f}M params")
            base_ms = None
            for name, make in _providers(state32, state8, bench.size(gpu=8 << 20, tiny=2048)).items():
                if isinstance(make, Exception):
                    bench.check(f"{label} {name}", False, repr(make))
                    continue
                with bench.guard(f"{label} {name}"):
                    opt = make(params)
                    opt.step()  # states created outside the timing
                    ms, host = bench.time(opt.step, graph=False, reps=bench.size(gpu=20, tiny=1))
                    figures = dict(ms=ms, host_us=host)
                    if name == "torch AdamW fused":
                        base_ms = ms
                    elif base_ms:
                        figures["x_torch_fused"] = ms / base_ms
                    if "half on host" in name and hasattr(opt, "paging_stats"):
                        stats = next(iter(opt.paging_stats().values()))
                        last = stats["last_step"]
                        figures.update(resident_bytes=stats["resident_bytes"], host_bytes=stats["host_bytes"],
                                       h2d_bytes=last["h2d_bytes"], d2h_bytes=last["d2h_bytes"])
                        if h2d:
                            floor = (last["h2d_bytes"] / h2d + last["d2h_bytes"] / d2h) / 1e6
                            figures.update(copy_floor_ms=floor, x_copy_floor=ms / floor if floor else None)
                    bench.record(label, name, **figures)
                    del opt
                    gc.collect()
            del params
    with bench.guard("extension"):
        _check_extension(bench)
    with bench.guard("one-step checks"):
        _check_one_step(bench)
