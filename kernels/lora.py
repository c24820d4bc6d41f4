"""Fused LoRA: y = x W^T + s (drop(x) A^T) B^T + bias, and its backward, for a dense or 4-bit W.

Algorithm. The low-rank work is tiny (r << in, out) next to the base GEMM, so it is folded into
the base GEMM's epilogue: kernels/nf4_matmul.py's `_skinny_matmul_kernel` (HAS_LORA) computes
one output tile as
    acc = a_tile @ Wop_tile (reduction loop, W dense or decoded from NF4/FP4 in registers;
                             split over programs and summed in-kernel when the tiles are few)
    acc += s * (lo_tile @ hi_tile) * mask_tile      (epilogue: one rank-r tl.dot)
    acc += bias
Forward: a = x, Wop = W^T, lo = xa = drop(x) A^T (M, r), hi = B^T.
Backward: dX = dY W + s ((dY B) A) * mask: a = dY, Wop = W, lo = dY B (M, r), hi = A.
The rank-r products xa = drop(x) A^T, dY B, dA = s (dY B)^T drop(x) and dB = s dY^T xa are
skinny GEMMs done by the vendor GEMM.

Memory traffic. Forward reads x twice (xa, then the base GEMM) and writes y once; without the
epilogue (PEFT) y is written, read and written again by the adapter's addition. Backward reads
dY three times (dY B, dX, dB) and x once (dA); the weight is read once per pass (in 4 bits
for an NF4 base). The saved activations are drop(x) (x itself without dropout), the dropout
mask and xa (M x r); the weight is never saved (an NF4 base is decoded again in backward).

Paths (`method`): "fused" is the epilogue kernel above; "vendor" is the base GEMM by the vendor
(dense W, or the NF4 weight dequantized into the shared workspace, see nf4_matmul.py) followed
by an in-place addmm of the rank-r term. "auto" takes "fused" for M <= 16 rows (decoding: the
NF4 weight is never written and the addmm's extra pass over y is avoided) and "vendor" above,
because a hand-written Triton GEMM is not reliably as fast as cuBLAS at thousands of rows and
the addmm costs only one extra pass over y. That split is reasoned, NOT measured (no GPU was
available when it was written); bench/gpu_lora.py times both paths to settle it.
This module imports torch and triton only.
"""
from typing import Union

import torch

from .nf4_matmul import SKINNY_MAX_M, Weight4bit, dot_dtype, skinny_launch, weight_to_workspace

Weight = Union[torch.Tensor, Weight4bit]


def _weight_shape(weight: Weight) -> tuple:
    if isinstance(weight, Weight4bit):
        weight.check()  # user input: checked on every call of the public launchers
        return int(weight.shape[0]), int(weight.shape[1])
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("weight must be a 2-D (out_features, in_features) tensor or a Weight4bit")
    return int(weight.shape[0]), int(weight.shape[1])


def _shape(weight: Weight) -> tuple:
    """(out, in) of a weight the caller has checked (a Weight4bit: validated once, then cached)."""
    return weight.launch_args().shape if isinstance(weight, Weight4bit) else weight.shape


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """t as (M, n): itself when already 2-D (a reshape costs microseconds of host time)."""
    return t if t.dim() == 2 else t.reshape(-1, n)


def _dense_weight(weight: Weight, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight in `dtype`: a 4-bit one is decoded into the shared workspace."""
    if isinstance(weight, Weight4bit):
        return weight_to_workspace(weight, dtype)
    return weight


def lora_matmul(a, weight: Weight, lo, hi, scale: float, bias=None, mask=None, transpose=False, split_k=None):
    """The fused kernel: a @ W^T (or a @ W when `transpose`) + scale * (lo @ hi) * mask + bias.

    a (M, Q), lo (M, R), hi (R, P) (any strides), mask (M, P) or None, bias (P,) or None;
    W (out, in) dense in a's dtype or a Weight4bit. Returns (M, P) in a's dtype. `split_k`:
    force the number of splits of the reduction (None: automatic).
    """
    out_features, in_features = _weight_shape(weight)
    Q, P = (out_features, in_features) if transpose else (in_features, out_features)
    M, R = a.shape[0], lo.shape[1]
    if a.shape[1] != Q or lo.shape[0] != M or hi.shape != (R, P):
        raise ValueError(f"shapes do not chain: a {tuple(a.shape)}, lo {tuple(lo.shape)}, hi {tuple(hi.shape)}, "
                         f"weight {(out_features, in_features)}, transpose={transpose}")
    return _lora_matmul(a, weight, (out_features, in_features), lo, hi, scale, bias, mask, transpose, split_k)


def _lora_matmul(a, weight: Weight, shape, lo, hi, scale, bias, mask, transpose, split_k=None):
    """`lora_matmul` with every argument checked by the caller (its (out, in) `shape` given). A
    4-bit W with an odd in_features (rows not starting on a byte) is decoded into the workspace first."""
    if isinstance(weight, Weight4bit) and not weight.launch_args().fused:
        weight = _dense_weight(weight, a.dtype)
    return skinny_launch(a, weight, shape[0], shape[1], transpose, lo, hi, mask, bias, scale, split_k)


def _check(x, weight, lora_A, lora_B, bias, same_shape, method):
    out_features, in_features = _weight_shape(weight)
    if method not in ("auto", "fused", "vendor"):
        raise ValueError(f"method must be 'auto', 'fused' or 'vendor', got {method!r}")
    dot_dtype(x.dtype)  # raises TypeError for unsupported activation dtypes
    r = lora_A.shape[0]
    if lora_A.shape != (r, in_features) or lora_B.shape != (out_features, r):
        raise ValueError(f"lora_A must be (r, {in_features}) and lora_B ({out_features}, r), "
                         f"got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    tensors = {"lora_A": lora_A, "lora_B": lora_B, "bias": bias, "x_adapter/dropout_mask": same_shape}
    if isinstance(weight, torch.Tensor):
        tensors["weight"] = weight
    for name, t in tensors.items():
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias must be ({out_features},), got {tuple(bias.shape)}")
    if same_shape is not None and same_shape.shape != x.shape:
        raise ValueError(f"x_adapter/dropout_mask must have x's shape {tuple(x.shape)}, got {tuple(same_shape.shape)}")
    return out_features, in_features


def lora_forward(x, weight: Weight, lora_A, lora_B, scale: float, bias=None, x_adapter=None,
                 method="auto"):
    """y = x W^T + scale * (x_adapter A^T) B^T + bias; returns (y, xa = x_adapter A^T).

    x (..., in) in float16/bfloat16/float32; x_adapter: the adapter's input (x with dropout
    applied, x's shape) or None for x itself; W (out, in) dense in x's dtype or a Weight4bit;
    lora_A (r, in), lora_B (out, r), bias (out,) in x's dtype. y is (..., out) and xa (M, r)
    with M = x.numel() // in.
    """
    out_features, in_features = _check(x, weight, lora_A, lora_B, bias, x_adapter, method)
    if x.shape[-1] != in_features:
        raise ValueError(f"x must have last dimension {in_features}, got shape {tuple(x.shape)}")
    return lora_forward_validated(x, weight, lora_A, lora_B, scale, bias, x_adapter, method)


def lora_forward_validated(x, weight: Weight, lora_A, lora_B, scale: float, bias=None, x_adapter=None,
                           method="auto"):
    """`lora_forward` trusting the caller's checks of every argument (the public `lora_forward`
    and qlora_fast.functional make them); a Weight4bit is validated once, by its `launch_args`."""
    out_features, in_features = _shape(weight)
    x2 = _rows(x, in_features)
    xa = torch.nn.functional.linear(x2 if x_adapter is None else _rows(x_adapter, in_features), lora_A)
    if method == "fused" or (method == "auto" and x2.shape[0] <= SKINNY_MAX_M):
        y = _lora_matmul(x2, weight, (out_features, in_features), xa, lora_B.t(), scale, bias, None, False)
    else:
        y = torch.nn.functional.linear(x2, _dense_weight(weight, x.dtype), bias)
        y.addmm_(xa, lora_B.t(), alpha=scale)
    return (y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_features)), xa


def lora_backward(grad_out, x_adapter, xa, weight: Weight, lora_A, lora_B, scale: float,
                  dropout_mask=None, need_grad_input=True, method="auto"):
    """Gradients of lora_forward: (grad_x or None, grad_A, grad_B).

    grad_out (..., out); x_adapter the adapter's input x * dropout_mask (..., in) (x itself
    without dropout); xa (M, r) from the forward. grad_x = grad_out W + scale ((grad_out B) A) * mask.
    """
    _check(x_adapter, weight, lora_A, lora_B, None, dropout_mask, method)
    return lora_backward_validated(grad_out, x_adapter, xa, weight, lora_A, lora_B, scale, dropout_mask,
                                   need_grad_input, method)


def lora_backward_validated(grad_out, x_adapter, xa, weight: Weight, lora_A, lora_B, scale: float,
                            dropout_mask=None, need_grad_input=True, method="auto"):
    """`lora_backward` trusting the caller's checks of every argument (see `lora_forward_validated`)."""
    out_features, in_features = _shape(weight)
    dy = _rows(grad_out, out_features)
    xd = _rows(x_adapter, in_features)
    dyb = dy @ lora_B  # (M, r)
    grad_B = dy.t() @ (xa * scale)
    grad_A = (dyb * scale).t() @ xd
    grad_x = None
    if need_grad_input:
        mask = None if dropout_mask is None else _rows(dropout_mask, in_features)
        if method == "fused" or (method == "auto" and dy.shape[0] <= SKINNY_MAX_M):
            grad_x = _lora_matmul(dy, weight, (out_features, in_features), dyb, lora_A, scale, None, mask, True)
        else:
            grad_x = dy @ _dense_weight(weight, dy.dtype)
            low_rank = dyb @ lora_A
            if mask is not None:
                low_rank.mul_(mask)
            grad_x.add_(low_rank, alpha=scale)
        if grad_out.dim() != 2:
            grad_x = grad_x.reshape(*grad_out.shape[:-1], in_features)
    return grad_x, grad_A, grad_B
