"""The one 4-bit decoder (kernels/nf4.py `_decode_pairs` / `_block_scale`) in each kernel that uses it.

- the dequantize kernel's two mask shapes (whole 16-byte-output chunks / per element) and a
  `nested_blocksize` other than 256, exact against the reference decode;
- the skinny matmul reads W in whole-byte chunks along rows, forward and transposed: with one-hot
  activations its output IS the decoded weight, so it must equal bitsandbytes' dequantize bit for bit
  (one decoder, one rounding); chunk-scale (K % 32 == 0) and per-byte-scale (other even K) paths,
  blocksizes 32..4096, nested on/off, NF4/FP4;
- the in-kernel split-K reduction (forced splits, including an uneven last split and two M tiles),
  alone and with the LoRA epilogue, run twice so the arrival counters are shown to reset.
"""
import pytest
import torch
from helpers import DTYPES, abs_sum, assert_matches_float64, oracle_dequantize, quantize, weight4bit

from qlora_fast.kernels import lora as klora
from qlora_fast.kernels import nf4 as knf4_flat
from qlora_fast.kernels import nf4_matmul as knf4
from qlora_fast.reference import quant as ref

pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes (test extra) is the oracle")

pytestmark = pytest.mark.usefixtures("on_test_device")


@pytest.mark.parametrize("n,blocksize", [(64 * 37, 64), (16 * 41, 32), (8 * 129, 4096), (999, 128)])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequantize_chunk_masks_and_nested_blocksize(seed, n, blocksize, out_dtype):
    # n a multiple of 16 / 8 takes the per-chunk mask for 2- / 4-byte outputs; 999 the per-element one.
    # Double quantization with nested blocks of 4 absmax values (bitsandbytes always uses 256; the
    # launcher must honour what it is given): expected = the reference decode of the absmax
    # code8 * nested + offset rounded twice in fp32, then code * absmax.
    x = torch.randn(n) * torch.empty(1).uniform_(0.1, 10)
    code = ref.NF4_CODE.to(x.device)
    packed, absmax = knf4_flat.quantize_4bit(x, blocksize, code)
    plain = knf4_flat.dequantize_4bit(packed, absmax, code, n, blocksize, out_dtype)
    assert torch.equal(plain, ref.dequantize_4bit_ref(packed, absmax, (n,), blocksize, "nf4", out_dtype))

    dyn = ref.dynamic_map_signed().to(x.device)
    q = torch.randint(0, 256, absmax.shape, dtype=torch.uint8)
    nested = torch.rand(-(-absmax.numel() // 4)) + 0.5
    offset = torch.rand(()) + 0.1
    decoded = (dyn[q.long()] * nested.repeat_interleave(4)[: q.numel()]) + offset
    out = knf4_flat.dequantize_4bit(packed, q, code, n, blocksize, out_dtype, nested, dyn, offset, nested_blocksize=4)
    assert torch.equal(out, ref.dequantize_4bit_ref(packed, decoded, (n,), blocksize, "nf4", out_dtype))


def test_dequantize_into_given_buffer(seed):
    x = torch.randn(333)
    code = ref.FP4_CODE.to(x.device)
    packed, absmax = knf4_flat.quantize_4bit(x, 64, code)
    out = torch.empty(333, dtype=torch.float16)
    got = knf4_flat.dequantize_4bit(packed, absmax, code, 333, 64, torch.float16, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(out, ref.dequantize_4bit_ref(packed, absmax, (333,), 64, "fp4", torch.float16))
    with pytest.raises(ValueError, match="out must be"):
        knf4_flat.dequantize_4bit(packed, absmax, code, 333, 64, torch.float16,
                                  out=torch.empty(332, dtype=torch.float16))


@pytest.mark.parametrize("shape,blocksize,quant_type,nested", [
    ((37, 96), 64, "nf4", True),     # K % 32 == 0: one scale and one 16-byte load per chunk
    ((21, 64), 4096, "fp4", True),   # a block spans several rows
    ((19, 160), 32, "nf4", False),
    ((23, 70), 128, "fp4", False),   # even K, not a multiple of 32: per-byte scale, rows start mid-block
])
def test_fused_decode_is_bitsandbytes_exact(seed, shape, blocksize, quant_type, nested):
    # x = identity rows: x @ W^T is W^T and dY @ W is W, exactly (one nonzero product per sum, fp32).
    packed, state = quantize(torch.randn(shape) * 3, quant_type, nested, blocksize)
    w = weight4bit(packed, state)
    expected = oracle_dequantize(packed, state)
    out_features, in_features = shape
    eye_k = torch.eye(in_features)[:16]
    forward = knf4.nf4_matmul(eye_k, *w, method="fused")
    assert torch.equal(forward, expected.t()[:16]), "forward decode"
    eye_n = torch.eye(out_features)[:16]
    transposed = knf4.nf4_matmul(eye_n, *w, transpose=True, method="fused")
    assert torch.equal(transposed, expected[:16]), "transposed decode"


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dtype,rows,split_k", [(torch.float32, 1, 2), (torch.float16, 17, 3), (torch.bfloat16, 5, 4)])
def test_split_k_reduction(seed, transpose, dtype, rows, split_k):
    # 3 splits of 4 (forward) or 3 (transposed) reduction steps: the last split is shorter
    out_features, in_features = 150, 320
    packed, state = quantize(torch.randn(out_features, in_features), nested=True)
    w64 = oracle_dequantize(packed, state).double()
    k_dim, n_dim = (out_features, in_features) if transpose else (in_features, out_features)
    w_op = w64 if transpose else w64.t()
    bias = torch.randn(n_dim).to(dtype)
    for _ in range(2):  # the second launch finds the arrival counters reset
        x = torch.randn(rows, k_dim).to(dtype)
        out = knf4.nf4_matmul(x, *weight4bit(packed, state), bias=bias, transpose=transpose, method="fused",
                              split_k=split_k)
        ref64 = x.double() @ w_op + bias.double()
        assert_matches_float64(out, ref64, x @ w_op.to(dtype) + bias, abs_sum(x, w_op), msg=f"split {split_k}")


@pytest.mark.parametrize("transpose", [False, True])
def test_split_k_with_lora_epilogue(seed, transpose):
    dtype, rows, r, scale = torch.float16, 3, 8, 0.5
    out_features, in_features = 70, 256
    packed, state = quantize(torch.randn(out_features, in_features), "fp4", True, 128)
    w64 = oracle_dequantize(packed, state).double()
    q_dim, p_dim = (out_features, in_features) if transpose else (in_features, out_features)
    w_op = w64 if transpose else w64.t()
    a = torch.randn(rows, q_dim).to(dtype)
    lo = torch.randn(rows, r).to(dtype)
    hi = torch.randn(r, p_dim).to(dtype)
    mask = (torch.rand(rows, p_dim) > 0.3).to(dtype)
    bias = None if transpose else torch.randn(p_dim).to(dtype)
    low_rank = scale * (lo.double() @ hi.double()) * mask.double()
    ref64 = a.double() @ w_op + low_rank + (0 if bias is None else bias.double())
    out_torch = (a @ w_op.to(dtype)) + (scale * (lo @ hi) * mask) + (0 if bias is None else bias)
    for split_k in (1, 2, 3):
        out = klora.lora_matmul(a, weight4bit(packed, state), lo, hi, scale, bias, mask, transpose, split_k=split_k)
        assert_matches_float64(out, ref64, out_torch, abs_sum(a, w_op), msg=f"split {split_k}")
