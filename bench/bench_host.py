"""Host (Python + dispatch) time per call of the 4-bit ops, with every Triton launch stubbed.

What a GPU host pays before and after a kernel, measured on the CPU: the Triton kernels are
replaced by no-op launches, so each figure is the dispatch, checks, autograd and the small torch
ops around the launch. The ops run on CPU tensors under TRITON_INTERPRET=1 with
QLORA_FAST_BACKEND=triton, i.e. through the same kernel-path code a CUDA tensor takes.
Times are the thread's CPU time (`time.thread_time`), not wall time: the shared CI machine is
often oversubscribed, and descheduled time is not host work. A second table also replaces the
launchers themselves (kernels/*.py) by functions that return at once: what is left is the
qlora_fast.functional / nn layer alone.

    PYTHONPATH=$PWD python bench/bench_host.py [--rounds 2000]
"""
import argparse
import os
import time
import warnings

os.environ["TRITON_INTERPRET"] = "1"
os.environ["QLORA_FAST_BACKEND"] = "triton"

import torch  # noqa: E402


class _NoLaunch:
    """Stands in for a @triton.jit function: `kernel[grid](*args, **meta)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_kernels():
    """Replace every Triton kernel the launchers call by a no-op launch."""
    from qlora_fast.kernels import lora, nf4, nf4_matmul

    for module in (nf4, nf4_matmul, lora):
        for name in dir(module):
            if name.startswith("_") and name.endswith("_kernel") and hasattr(getattr(module, name), "run"):
                setattr(module, name, _NoLaunch())


def per_call_us(fn, rounds):
    """CPU microseconds per call: the fastest of 5 batches of `rounds` calls (after a warm-up)."""
    fn()
    best = float("inf")
    for _ in range(5):
        start = time.thread_time()
        for _ in range(rounds):
            fn()
        best = min(best, time.thread_time() - start)
    return best / rounds * 1e6


def stub_launchers():
    """Replace the launchers the dispatch layer calls by functions returning a ready output."""
    from qlora_fast.kernels import lora, nf4_matmul

    def matmul(x, weight, bias=None, transpose=False):
        return x.new_empty(*x.shape[:-1], weight.shape[1] if transpose else weight.shape[0])

    def forward(x, weight, lora_A, lora_B, *args, **kwargs):
        return x.new_empty(*x.shape[:-1], lora_B.shape[0]), x.new_empty(x.shape[:-1].numel(), lora_A.shape[0])

    def backward(grad_out, x_adapter, xa, weight, lora_A, lora_B, *args, **kwargs):
        return x_adapter.new_empty(x_adapter.shape), lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)

    nf4_matmul.matmul_validated, lora.lora_forward_validated, lora.lora_backward_validated = matmul, forward, backward


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from qlora_fast.functional import lora_linear, matmul_4bit, quantize_4bit
    from qlora_fast.nn import Linear4bit

    torch.manual_seed(0)
    out_f, in_f, r = 4096, 4096, 16
    weight = torch.randn(out_f, in_f, dtype=torch.bfloat16) * 0.02
    os.environ["QLORA_FAST_BACKEND"] = "reference"  # a real weight, quantized quickly; then the stubs
    packed, state = quantize_4bit(weight)
    # a 256x256 base: the same host path, but the rank-r products (x A^T, dY B, dA, dB), real CPU
    # arithmetic here and GPU kernels on a GPU, cost ~1 us instead of ~250 us in bf16 at 4096
    packed_s, state_s = quantize_4bit(weight[:256, :256].contiguous())
    os.environ["QLORA_FAST_BACKEND"] = "triton"
    stub_kernels()
    layer = Linear4bit.from_quantized(packed, state, compute_dtype=torch.bfloat16)
    x = torch.randn(1, in_f, dtype=torch.bfloat16)
    a = (torch.randn(r, in_f, dtype=torch.bfloat16) * 0.01).requires_grad_()
    b = (torch.randn(out_f, r, dtype=torch.bfloat16) * 0.01).requires_grad_()
    x_grad = x.clone().requires_grad_()
    x_s, a_s, b_s = (t[..., :256].detach().clone().requires_grad_() for t in (x, a, b[:256]))
    small = torch.randn(128, 128, dtype=torch.bfloat16)  # small: CPU-side tensor math stays negligible

    def lora_step():
        # autograd.grad, not .backward(): accumulating into .grad is CPU arithmetic here, not host work
        torch.autograd.grad(lora_linear(x_grad, packed, a, b, 2.0, quant_state=state).sum(), (x_grad, a, b))

    def lora_step_small():
        torch.autograd.grad(lora_linear(x_s, packed_s, a_s, b_s, 2.0, quant_state=state_s).sum(), (x_s, a_s, b_s))

    def quantize():
        # with the kernels stubbed the statistics are uninitialised memory, so the value checks
        # (paid in full: one sync) usually end in their ValueError; that raise is timed too
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nor the outlier warning they may trigger
            try:
                quantize_4bit(small)
            except ValueError:
                pass

    def decode_no_grad():
        with torch.no_grad():
            matmul_4bit(x, packed, state)

    cases = {
        "matmul_4bit M=1 (4096x4096 NF4+DQ)": lambda: matmul_4bit(x, packed, state),
        "matmul_4bit M=1 under no_grad": decode_no_grad,
        "Linear4bit forward M=1": lambda: layer(x),
        "lora_linear NF4 M=1 fwd+bwd (r=16, incl. .sum() and autograd.grad)": lora_step,
        "... the same, 256x256 base (rank-r CPU arithmetic ~negligible)": lora_step_small,
        "quantize_4bit 128x128 NF4+DQ": quantize,
    }
    def table(title):
        print(title)
        for name, fn in cases.items():
            rounds = args.rounds if "quantize" not in name and "backward" not in name else max(1, args.rounds // 10)
            print(f"  {name:<62} {per_call_us(fn, rounds):9.1f} us")

    table(f"host CPU time per call, Triton kernels stubbed, torch {torch.__version__}, {args.threads} thread(s)")
    stub_launchers()
    del cases["quantize_4bit 128x128 NF4+DQ"]
    table("the same with the launchers (kernels/nf4_matmul.py, kernels/lora.py) stubbed too: the functional layer")


if __name__ == "__main__":
    main()
