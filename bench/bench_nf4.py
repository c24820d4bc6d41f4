"""NF4 quantize / dequantize on the CPU: qlora_fast's PyTorch reference (the CPU path) against
bitsandbytes' CPU backend, on the same inputs in one run, plus our Triton kernels under the
interpreter at one small shape (a correctness path: its time says nothing about GPU speed).

Shapes: 1024x1024 fp32 and 4096x1024 bf16 (even rows: bitsandbytes takes its compiled CPU
dequantize kernel), blocksize 64, double quantization on (as QLoRA).
`pytest bench/bench_nf4.py --benchmark-only` for pytest-benchmark tables;
`python bench/bench_nf4.py` for a summary with ratios (used for bench/RESULTS.md).
"""
import os

# the kernels run on the CPU only in Triton's interpreter; must be set before triton is imported
os.environ.setdefault("TRITON_INTERPRET", "1")

import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from timing import median, run_times  # noqa: E402

from qlora_fast.functional import dequantize_4bit, quantize_4bit  # noqa: E402

SHAPES = [((1024, 1024), torch.float32), ((4096, 1024), torch.bfloat16)]
INTERPRETER_SHAPE = ((256, 256), torch.float32)
BLOCKSIZE = 64


def make_input(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype)


def _with_backend(name, fn):
    def run():
        old = os.environ.get("QLORA_FAST_BACKEND")
        os.environ["QLORA_FAST_BACKEND"] = name
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop("QLORA_FAST_BACKEND", None)
            else:
                os.environ["QLORA_FAST_BACKEND"] = old

    return run


REFERENCE, TRITON, BNB = "qlora_fast reference", "qlora_fast triton (interpreter)", "bitsandbytes CPU"


def providers(x, names):
    """name -> (quantize thunk, dequantize thunk) on the same input, for the installed `names`."""
    out = {}
    for name, backend in ((REFERENCE, "reference"), (TRITON, "triton")):
        if name in names:
            packed, state = _with_backend(backend, lambda: quantize_4bit(x, BLOCKSIZE, "nf4"))()
            out[name] = (
                _with_backend(backend, lambda: quantize_4bit(x, BLOCKSIZE, "nf4")),
                _with_backend(backend, lambda p=packed, s=state: dequantize_4bit(p, s)),
            )
    if BNB in names:
        try:
            import bitsandbytes.functional as bnbF
        except ImportError:
            return out
        packed, state = bnbF.quantize_4bit(x, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
        out[BNB] = (
            lambda: bnbF.quantize_4bit(x, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True),
            lambda: bnbF.dequantize_4bit(packed, state),
        )
    return out


def _cases():
    """(shape, dtype, provider names): the interpreter only at the small shape."""
    for shape, dtype in SHAPES:
        yield shape, dtype, (REFERENCE, BNB)
    yield (*INTERPRETER_SHAPE, (REFERENCE, TRITON, BNB))


def _label(shape, dtype):
    return f"{'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')}"


@pytest.mark.parametrize("op", ["quantize", "dequantize"])
@pytest.mark.parametrize(
    "shape,dtype,provider",
    [pytest.param(s, d, n, id=f"{_label(s, d).replace(' ', '-')}-{n.split()[0]}{'-interp' if n == TRITON else ''}")
     for s, d, names in _cases() for n in names],
)
def test_nf4(benchmark, op, shape, dtype, provider):
    thunks = providers(make_input(shape, dtype), (provider,))
    if provider not in thunks:
        pytest.skip(f"{provider} not installed")
    benchmark.group = f"nf4 {op} {_label(shape, dtype)}"
    benchmark(thunks[provider][0 if op == "quantize" else 1])


def _median_ms(fn, repeat):
    return median(run_times(fn, repeat)) * 1e3


def main():
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, CPU threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}; NF4 blocksize {BLOCKSIZE}, double quantization on; median ms")
    for shape, dtype, names in _cases():
        thunks = providers(make_input(shape, dtype), names)
        results = {name: (_median_ms(q, 5), _median_ms(d, 5)) for name, (q, d) in thunks.items()}
        peer = results.get(BNB)
        for name, (q_ms, d_ms) in results.items():
            ratio = (
                f"  (x{q_ms / peer[0]:.2f} / x{d_ms / peer[1]:.2f} the time of bitsandbytes)"
                if peer and name != BNB
                else ""
            )
            print(f"{_label(shape, dtype):<18} {name:<34} quantize {q_ms:9.2f}  dequantize {d_ms:9.2f}{ratio}")


if __name__ == "__main__":
    main()
