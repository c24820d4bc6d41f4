"""Optimizer step speed on the CPU: qlora_fast's C++ ops against torch.optim.AdamW (single-tensor
and foreach) and bitsandbytes' CPU AdamW8bit, on the same parameters and gradients in one run.

Problem: 8 fp32 tensors of 512x1031 (4.2M parameters, 67 MB of fp32 state), random gradients
(never zeros). Run `pytest bench/bench_optim.py --benchmark-only` for pytest-benchmark tables, or
`python bench/bench_optim.py` for a short summary with the ratios (used for RESULTS.md).
"""

import os
import time

import pytest
import torch
from timing import median, run_times

from qlora_fast.optim import AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit

SHAPES = [(512, 1031)] * 8


def make_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    return params


def state_bytes_fp32():
    return sum(torch.Size(s).numel() for s in SHAPES) * 8


PROVIDERS = {
    "torch AdamW (single-tensor)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False),
    "torch AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    "qlora_fast AdamW": lambda ps: AdamW(ps, lr=1e-3),
    "qlora_fast AdamW8bit": lambda ps: AdamW8bit(ps, lr=1e-3),
    # Budget half of the states: half the pages are streamed through the staging slots each step.
    "qlora_fast PagedAdamW (half resident)": lambda ps: PagedAdamW(
        ps, lr=1e-3, budget=state_bytes_fp32() // 2, page_bytes=1 << 20
    ),
    "qlora_fast PagedAdamW8bit (half resident)": lambda ps: PagedAdamW8bit(
        ps, lr=1e-3, budget=state_bytes_fp32() // 8, page_bytes=1 << 20
    ),
}


def _bnb_adamw8bit():
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    return lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3)


if _bnb_adamw8bit() is not None:
    PROVIDERS["bitsandbytes AdamW8bit (CPU)"] = _bnb_adamw8bit()


@pytest.mark.parametrize("name", list(PROVIDERS))
def test_optimizer_step(benchmark, name):
    params = make_problem()
    opt = PROVIDERS[name](params)
    opt.step()  # create the states outside the timing
    benchmark.group = "AdamW step, 4.2M fp32 params (CPU)"
    benchmark(opt.step)


def summary(repeats=10):
    """Median step time per provider and its ratio to torch's single-tensor AdamW."""
    times = {}
    for name, make in PROVIDERS.items():
        params = make_problem()
        opt = make(params)
        times[name] = median(run_times(opt.step, repeats))
    base = times["torch AdamW (single-tensor)"]
    print(f"threads={torch.get_num_threads()}  params={sum(torch.Size(s).numel() for s in SHAPES)}")
    for name, t in times.items():
        print(f"{name:45s} {t * 1e3:8.2f} ms   x{base / t:5.2f} vs torch single-tensor")


# Host overhead: 448 tiny tensors (the count of a 7B model's LoRA A/B matrices at 7 targets x 32
# layers), so the step time is the per-parameter bookkeeping, not the arithmetic.
HOST_TENSORS, HOST_SHAPE = 448, (4, 16)
HOST_PROVIDERS = {
    "torch AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    "qlora_fast AdamW": lambda ps: AdamW(ps, lr=1e-3),
    "qlora_fast AdamW8bit": lambda ps: AdamW8bit(ps, lr=1e-3, min_8bit_size=0),
    "qlora_fast PagedAdamW (all resident)": lambda ps: PagedAdamW(ps, lr=1e-3),
    "qlora_fast PagedAdamW8bit (all resident)": lambda ps: PagedAdamW8bit(ps, lr=1e-3, min_8bit_size=0),
}


def cpu_times(fn, rounds: int) -> list:
    """CPU seconds of this process per call (one thread): unlike wall time, not inflated by
    other processes on a shared, oversubscribed machine."""
    return run_times(fn, rounds, clock=time.process_time)


def host_summary(repeats=50, rounds=1):
    """CPU time of a step over 448 tiny tensors (host overhead per step and per parameter): the
    median of `repeats` steps, the lowest over `rounds` interleaved rounds (on a shared machine
    the minimum is the figure least inflated by other processes)."""
    gen = torch.Generator().manual_seed(0)
    steppers = {}
    for name, make in HOST_PROVIDERS.items():
        params = [torch.nn.Parameter(torch.randn(HOST_SHAPE, generator=gen)) for _ in range(HOST_TENSORS)]
        for p in params:
            p.grad = torch.randn(HOST_SHAPE, generator=gen)
        opt = make(params)
        opt.step()
        steppers[name] = opt.step
    best = {name: float("inf") for name in steppers}
    for _ in range(rounds):
        for name, fn in steppers.items():
            best[name] = min(best[name], median(cpu_times(fn, repeats)))
    print(f"load average {os.getloadavg()[0]:.1f}; median of {repeats} steps, min over {rounds} rounds")
    for name, t in best.items():
        each = t * 1e6 / HOST_TENSORS
        print(f"{name:45s} {t * 1e3:8.3f} ms CPU per step over {HOST_TENSORS} tensors ({each:5.2f} us each)")
    # The floor: the fused ops alone on the same tensors (their arithmetic plus the op dispatch).
    from qlora_fast.reference.optim import dynamic_map

    ps = [torch.randn(HOST_SHAPE, generator=gen) for _ in range(HOST_TENSORS)]
    gs = [torch.randn(HOST_SHAPE, generator=gen) for _ in range(HOST_TENSORS)]
    n = ps[0].numel()
    zeros = lambda dtype, k=n: [torch.zeros(k, dtype=dtype) for _ in ps]  # noqa: E731
    hyper = (1e-3, 0.9, 0.999, 1e-8, 0.01, True)
    ops = torch.ops.qlora_fast
    m, v, mq, vq, ma, va = zeros(torch.float32), zeros(torch.float32), zeros(torch.uint8), zeros(torch.uint8), \
        zeros(torch.float32, 1), zeros(torch.float32, 1)
    maps = (dynamic_map(True), dynamic_map(False))  # built once (building them costs ~0.3 ms)
    floors = {
        "op only: adam_step_": lambda: ops.adam_step_(ps, gs, m, v, [1] * len(ps), *hyper),
        "op only: adam8bit_step_": lambda: ops.adam8bit_step_(ps, gs, mq, vq, ma, va, *maps, [1] * len(ps), *hyper),
    }
    # The multi-tensor op the optimizers call (one call per step), fp32 states, from Python.
    steps = [torch.tensor(0.0) for _ in ps]
    entries = torch.tensor([(i, 0, 0, 0, n, 2 * i) for i in range(len(ps))], dtype=torch.int64)
    states = [t for pair in zip(m, v) for t in pair]
    floors["op only: adam_multi_step_ (fp32 states)"] = lambda: ops.adam_multi_step_(
        ps, gs, steps, states, entries, list(hyper[:5]), True, *maps, None)
    for name, fn in floors.items():
        t = min(median(cpu_times(fn, repeats)) for _ in range(rounds))
        each = t * 1e6 / HOST_TENSORS
        print(f"{name:45s} {t * 1e3:8.3f} ms CPU per call over {HOST_TENSORS} tensors ({each:5.2f} us each)")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="CPU optimizer step summary")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per provider (median reported)")
    parser.add_argument("--host", action="store_true", help="only the host-overhead step over 448 tiny tensors")
    parser.add_argument("--rounds", type=int, default=1, help="host: rounds per provider (the lowest median is kept)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.host:
        summary(args.repeats)
    host_summary(rounds=args.rounds)
