"""Fused LoRA kernels and `lora_linear` against float64 references (Triton interpreter on CPU).

Forward and every gradient (x, A, B, bias) are compared with float64 autograd of PEFT-style
LoRA on the same (bitsandbytes-decoded, for NF4) weight, within twice PyTorch's own error in the
activation dtype plus rounding terms (see test_nf4_matmul.assert_matches_float64).
"""
import pytest
import torch
from conftest import TEST_DEVICE, assert_close, sized
from helpers import DTYPES, abs_sum, assert_matches_float64, oracle_dequantize, quantize, weight4bit

from qlora_fast.functional import lora_linear
from qlora_fast.kernels import lora as klora
from qlora_fast.reference.lora import lora_backward_ref, lora_forward_ref, lora_linear_ref

# conftest's one device switch: tensors made with torch.randn(...) land on QLORA_FAST_TEST_DEVICE
pytestmark = pytest.mark.usefixtures("on_test_device")


def make_case(rows, out_features, in_features, r, dtype, base, dropout, bias, lead=()):
    """Inputs in `dtype`, their float64 copies, and the float64 weight."""
    if base == "dense":
        w64 = (torch.randn(out_features, in_features) / in_features**0.5).double()
        weight = w64.to(dtype)
        w64 = weight.double()
    else:
        packed, state = quantize(torch.randn(out_features, in_features) / in_features**0.5, quant_type=base)
        weight = (packed, state)
        w64 = oracle_dequantize(packed, state).double()
    x = torch.randn(*lead, rows, in_features).to(dtype)
    A = (torch.randn(r, in_features) / in_features**0.5).to(dtype)
    B = torch.randn(out_features, r).to(dtype)
    b = torch.randn(out_features).to(dtype) if bias else None
    mask = None
    if dropout:
        mask = (torch.rand(x.shape) > 0.25).to(dtype) / 0.75
    return weight, w64, x, A, B, b, mask


def float64_grads(x, w64, A, B, scale, bias, mask, grad, dtype=torch.float64):
    """(y, dx, dA, dB, dbias) of PEFT-style LoRA by autograd in `dtype`."""
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (x, A, B, bias)]
    xl, Al, Bl, bl = leaves
    y = lora_linear_ref(xl, w64.to(dtype), Al, Bl, scale, bl, None if mask is None else mask.to(dtype))
    y.backward(grad.to(dtype))
    return (y.detach(), xl.grad, Al.grad, Bl.grad, None if bl is None else bl.grad)


def low_rank_sums(grad, x_adapter, A, B, scale):
    """abs_sum terms for dA = s (dY B)^T x_adapter and dB = s dY^T (x_adapter A^T)."""
    g = grad.double().reshape(-1, grad.shape[-1])
    xd = x_adapter.double().reshape(-1, x_adapter.shape[-1])
    return abs_sum((g @ B.double()).t() * scale, xd), abs_sum(g.t(), (xd @ A.double().t()) * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base", ["dense", "nf4"])
@pytest.mark.parametrize("rows,method,dropout,bias,in_features", [
    # even in_features: the NF4 forward reads whole bytes along rows; odd: one gathered byte per element
    (1, "fused", False, True, 98), (7, "fused", True, False, 97), (19, "fused", True, True, 98),
    (19, "vendor", True, True, 97),
])
def test_lora_kernels_forward_backward(seed, dtype, base, rows, method, dropout, bias, in_features):
    out_features, r, scale = 53, 5, 0.7
    weight, w64, x, A, B, b, mask = make_case(rows, out_features, in_features, r, dtype, base, dropout, bias)
    w = weight if base == "dense" else weight4bit(*weight)
    x_adapter = x if mask is None else x * mask
    y, xa = klora.lora_forward(x, w, A, B, scale, b, None if mask is None else x_adapter, method=method)
    grad = torch.randn(rows, out_features).to(dtype)
    dx, dA, dB = klora.lora_backward(grad, x_adapter, xa, w, A, B, scale, mask, method=method)

    y64, dx64, dA64, dB64, _ = float64_grads(x, w64, A, B, scale, b, mask, grad)
    pt = float64_grads(x, w64, A, B, scale, b, mask, grad, dtype=dtype)  # PyTorch in the same dtype
    assert_matches_float64(y, y64, pt[0], abs_sum(x, w64.t()), msg="y")
    assert_matches_float64(dx, dx64, pt[1], abs_sum(grad, w64), msg="dx")
    sums_A, sums_B = low_rank_sums(grad, x_adapter, A, B, scale)
    assert_matches_float64(dA, dA64, pt[2], sums_A, msg="dA")
    assert_matches_float64(dB, dB64, pt[3], sums_B, msg="dB")
    assert_close(xa, x_adapter.double() @ A.double().t(), atol=2 * (pt[0] - y64).abs().max().item() + 1e-6)


@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_fused_and_vendor_paths_agree(seed, base):
    weight, w64, x, A, B, b, mask = make_case(20, 40, 67, 3, torch.float32, base, True, True, lead=(2,))
    w = weight if base == "dense" else weight4bit(*weight)
    x_adapter = x * mask
    grad = torch.randn(2, 20, 40)
    results = []
    for method in ("fused", "vendor"):
        y, xa = klora.lora_forward(x, w, A, B, 1.5, b, x_adapter, method=method)
        results.append((y, *klora.lora_backward(grad, x_adapter, xa, w, A, B, 1.5, mask, method=method)))
    for fused, vendor, name in zip(*results, ("y", "dx", "dA", "dB")):
        assert fused.shape == vendor.shape, name
        assert_close(fused, vendor, atol=2e-5, rtol=1e-5, msg=name)


def test_backward_without_input_grad(seed):
    weight, w64, x, A, B, b, mask = make_case(4, 24, 33, 2, torch.float32, "nf4", False, False)
    w = weight4bit(*weight)
    y, xa = klora.lora_forward(x, w, A, B, 2.0)
    grad = torch.randn_like(y)
    dx, dA, dB = klora.lora_backward(grad, x, xa, w, A, B, 2.0, need_grad_input=False)
    assert dx is None
    _, dx64, dA64, dB64, _ = float64_grads(x, w64, A, B, 2.0, None, None, grad)
    assert_close(dA, dA64, atol=1e-5, rtol=1e-5)
    assert_close(dB, dB64, atol=1e-5, rtol=1e-5)


def test_reference_backward_matches_autograd(seed):
    weight, w64, x, A, B, b, mask = make_case(6, 11, 13, 3, torch.float64, "dense", True, False, lead=(2,))
    x_adapter = x * mask
    y, xa = lora_forward_ref(x, w64, A, B, 0.3, None, x_adapter)
    grad = torch.randn_like(y)
    dx, dA, dB = lora_backward_ref(grad, x_adapter, xa, w64, A, B, 0.3, mask)
    y64, dx64, dA64, dB64, _ = float64_grads(x, w64, A, B, 0.3, None, mask, grad)
    for got, want in ((y, y64), (dx, dx64), (dA, dA64), (dB, dB64)):
        assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("base", ["dense", "nf4", "fp4"])
def test_lora_linear_gradcheck_reference(seed, monkeypatch, base):
    monkeypatch.setenv("QLORA_FAST_BACKEND", "reference")
    weight, w64, x, A, B, b, mask = make_case(3, 7, 9, 2, torch.float64, base, False, True, lead=(2,))
    kwargs = {} if base == "dense" else {"quant_state": weight[1]}
    base_weight = w64 if base == "dense" else weight[0]
    inputs = [t.clone().requires_grad_() for t in (x, A, B, b)]
    assert torch.autograd.gradcheck(
        lambda x, A, B, b: lora_linear(x, base_weight, A, B, 0.9, b, **kwargs), inputs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base", ["dense", "nf4"])
@pytest.mark.parametrize("rows", [1, 21])
def test_lora_linear_triton_matches_reference_and_float64(seed, monkeypatch, dtype, base, rows):
    weight, w64, x, A, B, b, _ = make_case(rows, 37, 71, 4, dtype, base, False, True)
    kwargs = {} if base == "dense" else {"quant_state": weight[1]}
    base_weight = weight if base == "dense" else weight[0]
    grad = torch.randn(rows, 37).to(dtype)
    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("QLORA_FAST_BACKEND", backend)
        leaves = [t.clone().requires_grad_() for t in (x, A, B, b)]
        torch.manual_seed(1234)  # same dropout mask in both runs
        y = lora_linear(leaves[0], base_weight, *leaves[1:3], 0.5, leaves[3], dropout_p=0.2, training=True, **kwargs)
        y.backward(grad)
        results[backend] = (y.detach(), *(t.grad for t in leaves))
    torch.manual_seed(1234)
    mask = torch.nn.functional.dropout(torch.ones_like(x), 0.2, training=True)
    want = float64_grads(x, w64, A, B, 0.5, b, mask, grad)
    pt = float64_grads(x, w64, A, B, 0.5, b, mask, grad, dtype=dtype)
    sums = (abs_sum(x, w64.t()), abs_sum(grad, w64), *low_rank_sums(grad, x * mask, A, B, 0.5), None)
    for i, name in enumerate(("y", "dx", "dA", "dB", "dbias")):
        for backend, got in results.items():
            assert_matches_float64(got[i], want[i], pt[i], sums[i], msg=f"{backend} {name}")


def test_lora_linear_input_without_grad(seed, monkeypatch):
    monkeypatch.setenv("QLORA_FAST_BACKEND", "triton")
    weight, w64, x, A, B, b, _ = make_case(2, 16, 24, 2, torch.float32, "nf4", False, False)
    A.requires_grad_()
    B.requires_grad_()
    y = lora_linear(x, weight[0], A, B, 1.0, quant_state=weight[1])
    grad = torch.randn_like(y)
    y.backward(grad)
    _, _, dA64, dB64, _ = float64_grads(x, w64, A, B, 1.0, None, None, grad)
    assert x.grad is None
    assert_close(A.grad, dA64, atol=1e-5, rtol=1e-5)
    assert_close(B.grad, dB64, atol=1e-5, rtol=1e-5)


def test_lora_linear_bad_input():
    w = torch.randn(8, 12)
    x = torch.randn(3, 12)
    A, B = torch.randn(2, 12), torch.randn(8, 2)
    with pytest.raises(ValueError, match="rank"):
        lora_linear(x, w, torch.randn(0, 12), torch.randn(8, 0), 1.0)
    with pytest.raises(ValueError, match="rank"):
        lora_linear(x, w, torch.randn(9, 12), torch.randn(8, 9), 1.0)
    with pytest.raises(ValueError, match="last dimension"):
        lora_linear(torch.randn(3, 11), w, A, B, 1.0)
    with pytest.raises(ValueError, match="lora_A must be"):
        lora_linear(x, w, torch.randn(2, 11), B, 1.0)
    with pytest.raises(TypeError, match="lora_B must have x's dtype"):
        lora_linear(x, w, A, B.double(), 1.0)
    with pytest.raises(TypeError, match="floating-point"):
        lora_linear(x.long(), w, A, B, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(x, w, A, B, 1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="bias"):
        lora_linear(x, w, A, B, 1.0, bias=torch.randn(7))
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(x, w.requires_grad_(), A, B, 1.0)
    packed, state = quantize(torch.randn(8, 12))
    with pytest.raises(TypeError, match="packed uint8"):
        lora_linear(x, packed.float(), A, B, 1.0, quant_state=state)


# The compiled Triton kernels on the GPU (bench/gpu_check.sh: QLORA_FAST_TEST_DEVICE=cuda
# TRITON_INTERPRET=0), half-precision operands on the tensor cores, at sizes above the tiles, split-K on
# skinny inputs, plus the Llama-3-8B MLP weight (14336x4096 nested NF4, bf16) at M = 1, 16 and 4096.
# The CPU rehearsal runs the same code at interpreter scale.
_MID = sized(cpu=(21, 45), gpu=(1000, 2333))
_LARGE = sized(cpu=(37, 192), gpu=(14336, 4096))
GPU_CASES = [(base, dtype, rows, method, _MID) for base in ("dense", "nf4") for dtype in (torch.bfloat16, torch.float16)
             for rows, method in sized(cpu=((1, "fused"), (5, "vendor")),
                                       gpu=((1, "fused"), (16, "fused"), (300, "fused"), (300, "vendor")))]
GPU_CASES += [("nf4", torch.bfloat16, rows, "auto", _LARGE) for rows in sized(cpu=(1, 16), gpu=(1, 16, 4096))]


@pytest.mark.gpu
@pytest.mark.parametrize("base,dtype,rows,method,shape", GPU_CASES)
def test_compiled_lora_kernels_on_gpu(seed, base, dtype, rows, method, shape):
    out_features, in_features = shape
    weight, w64, x, A, B, b, mask = make_case(rows, out_features, in_features, 16, dtype, base, True, True)
    w = weight if base == "dense" else weight4bit(*weight)
    x_adapter = x * mask
    y, xa = klora.lora_forward(x, w, A, B, 0.5, b, x_adapter, method=method)
    grad = torch.randn(rows, out_features).to(dtype)
    dx, dA, dB = klora.lora_backward(grad, x_adapter, xa, w, A, B, 0.5, mask, method=method)
    assert y.device.type == TEST_DEVICE
    want = float64_grads(x, w64, A, B, 0.5, b, mask, grad)
    pt = float64_grads(x, w64, A, B, 0.5, b, mask, grad, dtype=torch.float32)  # fp32 ...
    pt = [t.to(dtype) for t in pt]  # ... rounded to the dtype: the error torch's own half result carries
    sums_A, sums_B = low_rank_sums(grad, x_adapter, A, B, 0.5)
    sums = (abs_sum(x, w64.t()), abs_sum(grad, w64), sums_A, sums_B)
    for got, w_, p_, s_, name in zip((y, dx, dA, dB), want, pt, sums, ("y", "dx", "dA", "dB")):
        # half-precision tensor-core products of rounded operands: allow the operand rounding too
        operand = 2 * torch.finfo(dtype).eps * s_[0]
        err_budget = (p_.double() - w_).abs().max().item() * 2 + operand
        assert_close(got, w_, atol=err_budget + torch.finfo(dtype).eps * w_.abs().max().item(),
                     msg=f"{dtype} rows={rows} {method} {name}")
