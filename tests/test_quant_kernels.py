"""Triton NF4/FP4 kernels (CPU interpreter here, the GPU in bench/gpu_check) against the
PyTorch reference and the bitsandbytes oracle, bit for bit.

bf16 output: the kernel rounds to nearest-even by hand under the interpreter (whose own cast
truncates), so bf16 is compared exactly too.
"""

import pytest
import torch
from conftest import TEST_DEVICE, no_dynamo, sized

from qlora_fast.functional import dequantize_4bit, quantize_4bit
from qlora_fast.kernels import nf4 as kernels
from qlora_fast.reference import quant as ref

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes (the oracle) is a test extra")
import bitsandbytes.functional as bnbF  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# conftest's one switch: the interpreter on CPU tensors here, the compiled kernels on CUDA in
# bench/gpu_check.sh (QLORA_FAST_TEST_DEVICE=cuda TRITON_INTERPRET=0)
DEVICE = TEST_DEVICE


def random_input(n, dtype, device=None):
    return (torch.randn(n) * torch.empty(1).uniform_(0.1, 10)).to(dtype).to(device or DEVICE)


def test_kernels_share_the_codecs_block_size():
    # kernels/ may not import qlora_fast, so it repeats the 8-bit codec's block size: they must agree
    from qlora_fast.reference.blockwise import BLOCKSIZE_8BIT

    assert kernels.NESTED_BLOCKSIZE == BLOCKSIZE_8BIT == ref.NESTED_BLOCKSIZE


# every blocksize with an odd element count that is not a multiple of it; input dtypes rotate so
# each blocksize sees one and each dtype several (interpreter time is the budget)
CASES = [
    (32, 999, torch.float32),
    (64, 3 * 64 + 17, torch.float16),
    (128, 1, torch.bfloat16),
    (256, 2 * 256 + 1, torch.float32),
    (512, 1537, torch.bfloat16),
    (1024, 1023, torch.float16),
    (2048, 2049, torch.float32),
    (4096, 4097, torch.bfloat16),
]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize,n,dtype", CASES)
def test_kernels_match_reference_and_oracle(seed, quant_type, blocksize, n, dtype):
    check_against_reference_and_oracle(quant_type, blocksize, n, dtype, DEVICE)


@pytest.mark.gpu
def test_compiled_kernels_on_gpu(seed):
    # every case again (compiled Triton on the GPU), plus a large odd one; rehearsed tiny on the CPU
    large = (64, sized(cpu=3 * 64 + 5, gpu=4096 * 4096 + 3), torch.bfloat16)
    for quant_type in ("nf4", "fp4"):
        for blocksize, n, dtype in sized(cpu=CASES[:2], gpu=CASES) + [large]:
            check_against_reference_and_oracle(quant_type, blocksize, n, dtype, DEVICE)


def check_against_reference_and_oracle(quant_type, blocksize, n, dtype, device):
    x = random_input(n, dtype, device)
    code = ref.code_for(quant_type).to(device)
    packed, absmax = kernels.quantize_4bit(x, blocksize, code)
    ref_packed, ref_absmax = ref.quantize_4bit_ref(x, blocksize, quant_type)
    assert torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax)
    with no_dynamo():
        bnb_packed, bnb_state = bnbF.quantize_4bit(x.cpu(), blocksize=blocksize, quant_type=quant_type)
    assert torch.equal(packed.cpu(), bnb_packed) and torch.equal(absmax.cpu(), bnb_state.absmax)

    dyn = ref.dynamic_map_signed().to(device)
    q, nested, offset = kernels.quantize_absmax(absmax, dyn)
    ref_q, ref_nested, ref_offset = ref.quantize_absmax_ref(absmax)
    assert torch.equal(q, ref_q) and torch.equal(nested, ref_nested) and torch.equal(offset, ref_offset)

    for out_dtype in DTYPES:
        plain = kernels.dequantize_4bit(packed, absmax, code, n, blocksize, out_dtype)
        expected = ref.dequantize_4bit_ref(ref_packed, ref_absmax, (n,), blocksize, quant_type, out_dtype)
        assert plain.dtype == out_dtype and torch.equal(plain, expected), out_dtype
        bnb_state.dtype = out_dtype
        with no_dynamo():
            oracle = bnbF.dequantize_4bit(bnb_packed, bnb_state).reshape(-1)
        assert torch.equal(plain.cpu(), oracle), out_dtype

        fused = kernels.dequantize_4bit(packed, q, code, n, blocksize, out_dtype, nested, dyn, offset)
        decoded_absmax = ref.dequantize_absmax_ref(ref_q, ref_nested, ref_offset)
        expected = ref.dequantize_4bit_ref(ref_packed, decoded_absmax, (n,), blocksize, quant_type, out_dtype)
        assert torch.equal(fused, expected), out_dtype


def test_double_quant_many_nested_blocks_against_oracle(seed):
    # 700 absmax values: nested blocks of 256, the last one partial
    n = 700 * 64 - 5
    x = random_input(n, torch.bfloat16)
    code, dyn = ref.NF4_CODE.to(DEVICE), ref.dynamic_map_signed().to(DEVICE)
    packed, absmax = kernels.quantize_4bit(x, 64, code)
    q, nested, offset = kernels.quantize_absmax(absmax, dyn)
    with no_dynamo():
        bnb_packed, bnb_state = bnbF.quantize_4bit(x.cpu(), blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed.cpu(), bnb_packed)
    assert torch.equal(offset.cpu(), bnb_state.offset) and torch.equal(nested.cpu(), bnb_state.state2.absmax)
    assert torch.equal(q, ref.quantize_absmax_ref(absmax)[0])
    # the oracle's compiled CPU kernel is not always nearest (see test_quant.py): decode the
    # oracle's own codes with our fused kernel and compare with the oracle's decode instead
    their_q = bnb_state.absmax.to(DEVICE)
    out = kernels.dequantize_4bit(bnb_packed.to(DEVICE), their_q, code, n, 64, torch.bfloat16, nested, dyn, offset)
    bnb_state.dtype = torch.bfloat16
    with no_dynamo():
        oracle = bnbF.dequantize_4bit(bnb_packed, bnb_state).reshape(-1)
    assert torch.equal(out.cpu(), oracle)


def test_public_ops_dispatch_to_kernels(monkeypatch, seed):
    x = random_input(3 * 333, torch.float16).view(3, 333)
    monkeypatch.setenv("QLORA_FAST_BACKEND", "triton")
    packed, state = quantize_4bit(x, 128, "fp4")
    out = dequantize_4bit(packed, state, torch.bfloat16)
    monkeypatch.setenv("QLORA_FAST_BACKEND", "reference")
    ref_packed, ref_state = quantize_4bit(x.cpu(), 128, "fp4")
    assert torch.equal(packed.cpu(), ref_packed)
    assert torch.equal(state.absmax.cpu(), ref_state.absmax)
    assert torch.equal(state.nested_absmax.cpu(), ref_state.nested_absmax)
    assert torch.equal(out.cpu(), dequantize_4bit(ref_packed, ref_state, torch.bfloat16))


def test_zero_and_constant_blocks(seed):
    # a block of zeros (absmax 0) and a partial block of zeros keep bitsandbytes' conventions
    x = torch.cat([torch.zeros(64), torch.randn(64), torch.full((64,), -3.0), torch.zeros(7)]).to(DEVICE)
    code = ref.NF4_CODE.to(DEVICE)
    packed, absmax = kernels.quantize_4bit(x, 64, code)
    ref_packed, ref_absmax = ref.quantize_4bit_ref(x, 64, "nf4")
    assert torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax)
    out = kernels.dequantize_4bit(packed, absmax, code, x.numel(), 64, torch.float32)
    assert torch.equal(out[:64], torch.zeros(64, device=DEVICE)) and torch.equal(out[128:192], x[128:192])


def test_launcher_errors():
    x = torch.randn(100, device=DEVICE)
    with pytest.raises(TypeError, match="x must be float"):
        kernels.quantize_4bit(x.int(), 64, ref.NF4_CODE.to(DEVICE))
    with pytest.raises(ValueError, match="code must have 16"):
        kernels.quantize_4bit(x, 64, torch.zeros(8, device=DEVICE))
    with pytest.raises(ValueError, match="code is on meta"):
        kernels.quantize_4bit(x, 64, ref.NF4_CODE.to("meta"))
    packed, absmax = kernels.quantize_4bit(x, 64, ref.NF4_CODE.to(DEVICE))
    with pytest.raises(TypeError, match="absmax must be uint8 with nested"):
        kernels.dequantize_4bit(packed, absmax.to(torch.uint8), ref.NF4_CODE.to(DEVICE), 100, 64, torch.float32)
    with pytest.raises(ValueError, match="nested_absmax, nested_code and offset together"):
        kernels.dequantize_4bit(packed, absmax, ref.NF4_CODE.to(DEVICE), 100, 64, torch.float32, nested_absmax=absmax)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_kernel_exact_ties_go_to_the_lower_code(quant_type):
    # absmax 1.0 scales exactly: values on each fp32 midpoint go down, one step above go up
    ordered = torch.sort(ref.code_for(quant_type)).values
    midpoints = (ordered[:-1] + ordered[1:]) / 2
    above = torch.nextafter(midpoints, torch.tensor(2.0))
    x = torch.cat([torch.tensor([1.0]), midpoints, above]).to(DEVICE)
    code = ref.code_for(quant_type).to(DEVICE)
    packed, absmax = kernels.quantize_4bit(x, 32, code)
    assert torch.equal(packed, ref.quantize_4bit_ref(x, 32, quant_type)[0])
    decoded = kernels.dequantize_4bit(packed, absmax, code, x.numel(), 32, torch.float32).cpu()
    k = midpoints.numel()
    assert torch.equal(decoded[1 : 1 + k], ordered[:-1]) and torch.equal(decoded[1 + k :], ordered[1:])


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_large_weight_nested_against_reference(seed, monkeypatch, quant_type):
    # a Llama-3-8B MLP weight (14336x4096, bf16, double-quantized) through the public API: the kernels'
    # packed codes and statistics equal the PyTorch reference's bit for bit, and so does the decode
    shape = sized(cpu=(45, 130), gpu=(14336, 4096))
    x = (torch.randn(shape, device=DEVICE) * 0.02).to(torch.bfloat16)
    x[0, 0] = 3.0  # an outlier in the first block
    monkeypatch.setenv("QLORA_FAST_BACKEND", "triton")
    packed, state = quantize_4bit(x, 64, quant_type, compress_statistics=True)
    out = dequantize_4bit(packed, state, torch.bfloat16)
    monkeypatch.setenv("QLORA_FAST_BACKEND", "reference")
    ref_packed, ref_state = quantize_4bit(x, 64, quant_type, compress_statistics=True)
    assert packed.device.type == DEVICE and torch.equal(packed, ref_packed)
    assert torch.equal(state.absmax, ref_state.absmax) and torch.equal(state.nested_absmax, ref_state.nested_absmax)
    assert torch.equal(out, dequantize_4bit(ref_packed, ref_state, torch.bfloat16))


# ---- the launch device ---------------------------------------------------------------------
def test_launchers_make_their_tensors_device_current(seed, monkeypatch):
    """Triton launches on the current CUDA device; every launcher enters `on_device_of` with the
    tensor whose device the launch must use (interpreter here; two GPUs below)."""
    import contextlib

    from qlora_fast.kernels import nf4_matmul

    seen = []

    def record(t):
        seen.append(t)
        return contextlib.nullcontext()

    monkeypatch.setattr(kernels, "on_device_of", record)
    monkeypatch.setattr(nf4_matmul, "on_device_of", record)
    w = random_input(40 * 64, torch.float32, DEVICE).view(40, 64)
    code = ref.code_for("nf4").to(DEVICE)
    packed, absmax = kernels.quantize_4bit(w, 64, code)
    assert seen[-1] is not None and seen[-1].data_ptr() == w.data_ptr()
    q, nested, offset = kernels.quantize_absmax(absmax, ref.dynamic_map_signed().to(DEVICE))
    assert seen[-1] is absmax
    kernels.dequantize_4bit(packed, absmax, code, w.numel(), 64, torch.float32)
    assert seen[-1] is packed
    x = torch.randn(3, 64, device=DEVICE)
    out = nf4_matmul.nf4_matmul(x, packed, absmax, code, (40, 64), 64, method="fused")
    assert seen[-1].shape == (3, 64) and len(seen) == 4
    assert torch.allclose(out, x @ kernels.dequantize_4bit(packed, absmax, code, w.numel(), 64,
                                                           torch.float32).view(40, 64).T, atol=1e-4)


def test_on_device_of_switches_only_to_another_gpu(monkeypatch):
    from qlora_fast.kernels.utils import on_device_of

    class Tensor:  # a stand-in with a tensor's two attributes (no GPU here)
        def __init__(self, device):
            self.device, self.is_cuda = torch.device(device), torch.device(device).type == "cuda"

    from qlora_fast.kernels import utils

    entered = []
    utils._several_gpus.cache_clear()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d) or "switch")
    assert on_device_of(Tensor("cuda:1")) == "switch" and entered == [torch.device("cuda:1")]
    assert on_device_of(Tensor("cuda:0")) != "switch" and on_device_of(Tensor("cpu")) != "switch"
    assert len(entered) == 1
    utils._several_gpus.cache_clear()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU: never a device query
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1 / 0)
    assert on_device_of(Tensor("cuda:1")) != "switch"
    utils._several_gpus.cache_clear()


# not gpu-marked (nothing to rehearse on the CPU): runs in the GPU check's kernel tests where two GPUs exist
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_on_the_second_gpu_while_the_first_is_current(seed):
    torch.cuda.set_device(0)
    check_against_reference_and_oracle("nf4", 64, 64 * 37 + 5, torch.bfloat16, "cuda:1")
