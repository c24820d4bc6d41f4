"""4-bit matmul: kernels (Triton interpreter) and `matmul_4bit` against float64 references.

The weight is quantized by qlora_fast and dequantized by bitsandbytes' CPU backend (the oracle)
from the same tensors; outputs are judged against float64 math on that weight, allowing at
most twice PyTorch's own error in the same dtype plus one output ulp (the interpreter truncates
fp32 -> bf16 instead of rounding).
"""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from conftest import TEST_DEVICE, assert_close, sized
from helpers import DTYPES, abs_sum, assert_matches_float64, oracle_dequantize, quantize, weight4bit

from qlora_fast.functional import dequantize_4bit, lora_linear, matmul_4bit
from qlora_fast.kernels import nf4_matmul as knf4
from qlora_fast.reference.lora import dequantize_weight_4bit_ref

pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes (test extra) is the oracle")

# conftest's one device switch: tensors made with torch.randn(...) land on QLORA_FAST_TEST_DEVICE
pytestmark = pytest.mark.usefixtures("on_test_device")


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("QLORA_FAST_BACKEND", "triton")


# ------------------------------------------------------------------ dequantization

@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape,blocksize", [((37, 83), 64), ((5, 129), 128), ((300, 7), 32)])
def test_dequantize_matches_bitsandbytes(seed, quant_type, nested, shape, blocksize):
    weight = torch.randn(shape) * 3
    packed, state = quantize(weight, quant_type, nested, blocksize)
    expected = oracle_dequantize(packed, state)
    w = weight4bit(packed, state)
    kernel = knf4.dequantize_4bit_into(*w, dtype=torch.float32)
    assert_close(kernel, expected, msg="kernel")
    reference = dequantize_weight_4bit_ref(*w, dtype=torch.float32)
    assert_close(reference, expected, msg="reference")
    half = knf4.dequantize_4bit_into(*w, dtype=torch.float16)
    assert_close(half, expected.half(), msg="fp16 output")


def strided(t):
    """t as a non-contiguous view with the same shape and values (every other element of a copy)."""
    return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]


def test_strided_state_decodes_like_a_contiguous_one(seed, triton_backend):
    # FSDP's unit layout hands the kernels strided views (nested_absmax has stride 2113 there):
    # the launchers must read them by their strides. 518 blocks of 32: three nested absmax.
    packed, state = quantize(torch.randn(37, 448), blocksize=32)
    expected = oracle_dequantize(packed, state)
    views = dict(absmax=strided(state.absmax), code=strided(state.code), nested_absmax=strided(state.nested_absmax),
                 nested_code=strided(state.nested_code))
    for name, view in views.items():
        assert not view.is_contiguous()
        odd = dataclasses.replace(state, **{name: view})
        assert_close(dequantize_4bit(packed, odd, torch.float32), expected, msg=f"dequantize_4bit, strided {name}")
        w = weight4bit(strided(packed), odd)
        assert_close(knf4.dequantize_4bit_into(*w, dtype=torch.float32), expected, msg=f"launcher, strided {name}")
        w_t = expected.double().t()
        for rows in (2, 19):  # the fused kernel and the workspace + GEMM path
            x = torch.randn(rows, 448)
            out = knf4.nf4_matmul(x, *w)
            assert_matches_float64(out, x.double() @ w_t, x @ w_t.float(), abs_sum(x, w_t),
                                   msg=f"nf4_matmul rows={rows}, strided {name}")


def test_workspace_is_reused(seed):
    weight = torch.randn(24, 40)
    packed, state = quantize(weight)
    first = knf4.dequantize_to_workspace(*weight4bit(packed, state), dtype=torch.float32)
    assert_close(first, oracle_dequantize(packed, state))
    ptr = first.data_ptr()
    small = knf4.dequantize_to_workspace(*weight4bit(*quantize(torch.randn(8, 16))), dtype=torch.float32)
    assert small.data_ptr() == ptr, "a smaller weight must reuse the same buffer"


# ------------------------------------------------------------------ kernels

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,method", [(1, "fused"), (5, "fused"), (16, "auto"), (19, "fused"), (19, "auto")])
@pytest.mark.parametrize("transpose", [False, True])
def test_nf4_matmul_kernel(seed, dtype, rows, method, transpose):
    out_features, in_features = 45, 131
    packed, state = quantize(torch.randn(out_features, in_features), nested=rows != 5)
    w64 = oracle_dequantize(packed, state).double()
    k_dim, n_dim = (out_features, in_features) if transpose else (in_features, out_features)
    x = torch.randn(rows, k_dim).to(dtype)
    bias = torch.randn(n_dim).to(dtype) if rows != 1 else None
    out = knf4.nf4_matmul(x, *weight4bit(packed, state), bias=bias, transpose=transpose, method=method)
    w_op = w64 if transpose else w64.t()
    ref64 = x.double() @ w_op + (0 if bias is None else bias.double())
    out_torch = x @ w_op.to(dtype) + (0 if bias is None else bias)
    assert_matches_float64(out, ref64, out_torch, abs_sum(x, w_op), msg=f"{dtype} rows={rows} {method}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type,nested,blocksize", [("nf4", True, 64), ("fp4", False, 32), ("nf4", True, 128)])
def test_row_pair_decode(seed, dtype, quant_type, nested, blocksize):
    # even in_features, not a multiple of the blocksize or the K tile: the fused forward reads
    # whole bytes along each row and interleaves the nibbles; rows start mid-block
    out_features, in_features = 37, 134
    packed, state = quantize(torch.randn(out_features, in_features), quant_type, nested, blocksize)
    assert knf4.row_pairs(in_features, blocksize, False) == in_features
    w_t = oracle_dequantize(packed, state).double().t()
    x = torch.randn(3, in_features).to(dtype)
    out = knf4.nf4_matmul(x, *weight4bit(packed, state), method="fused")
    assert_matches_float64(out, x.double() @ w_t, x @ w_t.to(dtype), abs_sum(x, w_t), msg=f"{dtype}")


def test_nf4_matmul_batched_input_and_fp4(seed):
    packed, state = quantize(torch.randn(33, 70), quant_type="fp4", nested=False)
    x = torch.randn(2, 3, 70)
    out = knf4.nf4_matmul(x, *weight4bit(packed, state))
    ref64 = x.double() @ oracle_dequantize(packed, state).double().t()
    assert out.shape == (2, 3, 33)
    w = oracle_dequantize(packed, state).t()
    assert_matches_float64(out, ref64, x @ w, abs_sum(x, w))


def test_nf4_matmul_bad_input():
    packed, state = quantize(torch.randn(16, 32))
    w = weight4bit(packed, state)
    with pytest.raises(ValueError, match="last dimension"):
        knf4.nf4_matmul(torch.randn(2, 31), *w)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        knf4.nf4_matmul(torch.randn(2, 32, dtype=torch.float64), *w)
    with pytest.raises(ValueError, match="packed must hold"):
        knf4.nf4_matmul(torch.randn(2, 32), packed[:-1], *w[1:])
    with pytest.raises(ValueError, match="blocksize"):
        knf4.nf4_matmul(torch.randn(2, 32), *w[:4], 48, *w[5:])
    with pytest.raises(ValueError, match="method"):
        knf4.nf4_matmul(torch.randn(2, 32), *w, method="fast")
    with pytest.raises(ValueError, match="bias"):
        knf4.nf4_matmul(torch.randn(2, 32), *w, bias=torch.randn(15))


# ------------------------------------------------------------------ functional matmul_4bit

@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_4bit_forward_and_grads(seed, monkeypatch, backend, dtype):
    monkeypatch.setenv("QLORA_FAST_BACKEND", backend)
    packed, state = quantize(torch.randn(29, 67))
    w64 = oracle_dequantize(packed, state).double()
    x = torch.randn(3, 67).to(dtype).requires_grad_()
    bias = torch.randn(29).to(dtype).requires_grad_()
    grad = torch.randn(3, 29).to(dtype)
    out = matmul_4bit(x, packed, state, bias)
    out.backward(grad)
    ref64 = x.double() @ w64.t() + bias.double()
    assert_matches_float64(out, ref64.detach(), (x @ w64.t().to(dtype) + bias).detach(), abs_sum(x, w64.t()),
                           msg="forward")
    assert_matches_float64(x.grad, grad.double() @ w64, grad @ w64.to(dtype), abs_sum(grad, w64), msg="grad x")
    assert_matches_float64(bias.grad, grad.double().sum(0), grad.sum(0), msg="grad bias")


def test_strided_bias_on_the_fused_kernel(seed, triton_backend):
    # a bias view with stride 2 (e.g. a slice of a wider tensor): the fused kernel (M <= 16 rows)
    # reads the bias at offset p, so the launcher must hand it a contiguous one
    packed, state = quantize(torch.randn(45, 130))
    w_t = oracle_dequantize(packed, state).double().t()
    bias = torch.randn(45, 2)[:, 0]
    x = torch.randn(2, 3, 130)
    ref64 = x.double() @ w_t + bias.double()
    out = matmul_4bit(x, packed, state, bias)
    assert_matches_float64(out, ref64, x @ w_t.float() + bias, abs_sum(x, w_t), msg="matmul_4bit")
    lora_A, lora_B = torch.randn(4, 130) * 0.1, torch.randn(45, 4) * 0.1
    out = lora_linear(x, packed, lora_A, lora_B, 2.0, bias=bias, quant_state=state)
    low_rank = 2.0 * (x @ lora_A.t()) @ lora_B.t()
    low_rank64 = 2.0 * (x.double() @ lora_A.double().t()) @ lora_B.double().t()
    assert_matches_float64(out, ref64 + low_rank64, x @ w_t.float() + bias + low_rank, abs_sum(x, w_t),
                           msg="lora_linear")


def test_matmul_4bit_gradcheck_reference(seed, monkeypatch):
    monkeypatch.setenv("QLORA_FAST_BACKEND", "reference")
    packed, state = quantize(torch.randn(9, 21))
    x = torch.randn(4, 21, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: matmul_4bit(x, packed, state, b), (x, bias))


def test_matmul_4bit_compiles(seed, monkeypatch):
    monkeypatch.setenv("QLORA_FAST_BACKEND", "reference")
    packed, state = quantize(torch.randn(12, 20))
    x = torch.randn(3, 20, requires_grad=True)
    compiled = torch.compile(lambda x: matmul_4bit(x, packed, state), backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    w = oracle_dequantize(packed, state)
    assert_close(out, x @ w.t(), atol=1e-5)
    assert_close(x.grad, w.sum(0).expand(3, -1), atol=1e-5)


def test_interpreter_is_on():
    # Guards the whole file: on the CPU the "triton" cases run a kernel only under the interpreter
    # (and on CUDA they must run the compiled one).
    assert (os.environ.get("TRITON_INTERPRET") == "1") == (TEST_DEVICE == "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("rows", sized(cpu=[1, 16, 19], gpu=[1, 16, 4096]))
def test_large_weight_forward_backward(seed, monkeypatch, rows):
    # a Llama-3-8B MLP weight (14336x4096, nested NF4) with bf16 activations: forward (fused or
    # dequant + cuBLAS by M, split-K on skinny inputs) and the transposed backward through
    # matmul_4bit, against dequantize + torch.matmul in float64 (rehearsed tiny on the CPU)
    monkeypatch.setenv("QLORA_FAST_BACKEND", "triton")
    out_features, in_features = sized(cpu=(37, 192), gpu=(14336, 4096))
    packed, state = quantize((torch.randn(out_features, in_features) * 0.02).to(torch.bfloat16))
    w = dequantize_4bit(packed, state, torch.float32)
    w64, w16 = w.double(), w.to(torch.bfloat16)
    x = torch.randn(rows, in_features, dtype=torch.bfloat16)
    grad = torch.randn(rows, out_features, dtype=torch.bfloat16)
    xg = x.clone().requires_grad_()
    out = matmul_4bit(xg, packed, state)
    out.backward(grad)
    assert out.device.type == TEST_DEVICE
    assert_matches_float64(out.detach(), x.double() @ w64.t(), x @ w16.t(), abs_sum(x, w64.t()), msg="forward")
    assert_matches_float64(xg.grad, grad.double() @ w64, grad @ w16, abs_sum(grad, w64), msg="grad x")


# ------------------------------------------------------------------ workspaces and diagnostic switches

def test_release_workspaces_drops_the_buffers(seed):
    w = weight4bit(*quantize(torch.randn(24, 40)))
    first = knf4.dequantize_to_workspace(*w, dtype=torch.float32)
    assert any(key[1] == torch.float32 and key[2] == "weight" for key in knf4._workspaces)
    expected = first.clone()
    assert knf4.release_workspaces("meta") == 0  # another device's: nothing dropped
    dropped = knf4.release_workspaces(first.device)
    assert dropped >= first.numel() * 4
    assert not [key for key in knf4._workspaces if key[0] == first.device]
    assert torch.equal(first, expected), "a view a caller holds stays valid"
    again = knf4.dequantize_to_workspace(*w, dtype=torch.float32)  # allocated afresh, same values
    assert again.data_ptr() != first.data_ptr() and torch.equal(again, expected)
    x = torch.randn(2, 40)  # the fused path keeps working across a release (its plan keeps its buffers)
    out = knf4.nf4_matmul(x, *w, method="fused", split_k=2)
    knf4.release_workspaces()
    assert torch.equal(knf4.nf4_matmul(x, *w, method="fused", split_k=2), out)


SWITCH_SCRIPT = r"""
import os, sys
import torch
sys.path.insert(0, sys.argv[1])  # tests/
from conftest import assert_close
from helpers import abs_sum, assert_matches_float64, oracle_dequantize, quantize, weight4bit
from qlora_fast.kernels import nf4 as k4, nf4_matmul as knf4

assert knf4.INTERPRET
no_shfl = os.environ.get("QLORA_FAST_NO_SHFL") == "1"
split_k = int(os.environ.get("QLORA_FAST_SPLIT_K") or 0) or None
assert k4.NO_SHFL == no_shfl and k4._SHFL.value is False and k4._PTX.value is False
assert knf4.FORCE_SPLIT_K == split_k
torch.manual_seed(0)
packed, state = quantize(torch.randn(96, 640))
w64 = oracle_dequantize(packed, state).double()
w = weight4bit(packed, state)
assert_close(knf4.dequantize_4bit_into(*w, dtype=torch.float32), w64.float(), msg="dequantize")
for dtype in (torch.float32, torch.bfloat16):
    for transpose in (False, True):
        n, k = (96, 640)
        k_dim, p = (n, k) if transpose else (k, n)
        # fp32: 32x64 tiles, so 10 reduction steps forward (K 640) and 3 transposed (N 96)
        plan = knf4.skinny_config(3, p, n, k, transpose, dtype)
        steps = -(-(n if transpose else k) // (plan[0] if transpose else plan[1]))
        assert plan[2] == min(split_k or 1, steps), (plan, split_k)
        x = torch.randn(3, k_dim).to(dtype)
        w_op = w64 if transpose else w64.t()
        out = knf4.nf4_matmul(x, *w, transpose=transpose, method="fused")
        assert_matches_float64(out, x.double() @ w_op, x @ w_op.to(dtype), abs_sum(x, w_op),
                               msg=f"{dtype} transpose={transpose} split={plan[2]}")
print("SWITCH OK", no_shfl, split_k)
"""


def _run_with_env(script, *args, interpret, **env):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full = {k: v for k, v in os.environ.items() if not k.startswith(("QLORA_FAST_", "TRITON_INTERPRET"))}
    full.update(env, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    if interpret:
        full["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=root, env=full, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


# A fresh process per value: the switches are read once, at import. On CUDA these are skipped: they
# run on the CPU, and the GPU window's kernel-test stage has no time to spare for them.
@pytest.mark.skipif(TEST_DEVICE == "cuda", reason="CPU subprocess tests (the switches are set for a whole GPU run)")
@pytest.mark.parametrize("env", [{"QLORA_FAST_NO_SHFL": "1"}, {"QLORA_FAST_SPLIT_K": "1"},
                                 {"QLORA_FAST_SPLIT_K": "3"}])
def test_diagnostic_switches_keep_the_kernels_exact(env):
    # Under the interpreter: the switch is read, the planner obeys QLORA_FAST_SPLIT_K (3 really
    # splits; the interpreter never splits on its own, so 1 is its default path) and dequantize and
    # the fused matmul still match the references. The interpreter always takes the non-shuffle
    # lookup, so QLORA_FAST_NO_SHFL changes nothing it runs: what the switch changes in the GPU code
    # is checked by compiling it (test_diagnostic_switches_change_the_gpu_code).
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    assert "SWITCH OK" in _run_with_env(SWITCH_SCRIPT, tests_dir, interpret=True, **env)


GPU_CODE_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])  # bench/
import aot_compile as A  # the AOT gate's launch recorder: the GPU launch paths on meta tensors
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

nf4, nf4_matmul, lora = A.load_kernels()
rec = A.Recorder()
rec.scenario = "switches"
with rec.patched():
    w = A._quantized(4096 * 4096, 64, True)
    x = torch.empty(1, 4096, device="meta", dtype=torch.bfloat16)
    nf4_matmul.nf4_matmul(x, *w[:3], (4096, 4096), 64, *w[3:], method="fused")  # 64 tiles: splits by default
    nf4.dequantize_4bit(*w[:3], 4096 * 4096, 64, torch.bfloat16, *w[3:])
for fn, sig, constexprs, attrs, options in rec.specs.values():
    names = {(i,): name for i, name in enumerate(fn.arg_names)}
    values = {names.get(k, k): v for k, v in constexprs.items()}
    if fn.__name__ == "_skinny_matmul_kernel":
        print("SPLIT", values["SPLIT"])
    if fn.__name__ == "_dequantize_4bit_kernel":
        opts = {k: v for k, v in options.items() if k != "debug"}
        ptx = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                             options=opts).asm["ptx"]
        print("SHFL", "shfl.sync" in ptx, "MULRN", "mul.rn.f32" in ptx)
"""


@pytest.mark.skipif(TEST_DEVICE == "cuda", reason="CPU subprocess tests (the switches are set for a whole GPU run)")
@pytest.mark.parametrize("env,split,shfl", [({}, True, True), ({"QLORA_FAST_NO_SHFL": "1"}, True, False),
                                            ({"QLORA_FAST_SPLIT_K": "1"}, False, True)])
def test_diagnostic_switches_change_the_gpu_code(env, split, shfl):
    # The GPU launch path (no interpreter) recorded on meta tensors and the dequantize kernel compiled
    # for sm_90 on the CPU, as bench/aot_compile.py does: QLORA_FAST_NO_SHFL removes the warp shuffle
    # (and keeps mul.rn), QLORA_FAST_SPLIT_K=1 takes split-K off a launch that splits by default.
    pytest.importorskip("triton.backends.nvidia", reason="compiling for a GPU target needs Triton's CUDA backend")
    bench_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    out = _run_with_env(GPU_CODE_SCRIPT, bench_dir, interpret=False, **env)
    assert f"SPLIT {split}" in out and f"SHFL {shfl} MULRN True" in out, out
