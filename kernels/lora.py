"""Fused LoRA: y = x W^T + s (drop(x) A^T) B^T + bias, and its backward, for a dense or 4-bit W.

Algorithm. The low-rank work is tiny (r << in, out) next to the base GEMM, so it is folded into
the base GEMM's epilogue: `_lora_matmul_kernel` computes one output tile as
    acc = a_tile @ Wop_tile (K-loop, W dense or decoded from NF4/FP4 in registers)
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
import triton
import triton.language as tl

from .nf4_matmul import (
    SKINNY_MAX_M, Weight4bit, _dequantize_4bit_operand, dequantize_to_workspace, dot_dtype, reduce_splits, row_pairs,
    split_k_launch,
)


@triton.jit
def _lora_matmul_kernel(
    a_ptr, w_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
    lo_ptr, hi_ptr, mask_ptr, bias_ptr, out_ptr,
    M, P, Q, R, K_PER_SPLIT, scale,
    stride_am, stride_aq, stride_wq, stride_wp, stride_lm, stride_lr, stride_hr, stride_hp,
    stride_mm, stride_mp, stride_os, stride_om, stride_op,
    WEIGHT_4BIT: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROW_PAIRS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[s] = a @ Wop (this split's part of Q) + [split 0 only] s * (lo @ hi) * mask + bias.

    a (M, Q); Wop (Q, P) at w_ptr + q*stride_wq + p*stride_wp (dense) or at that flat index of
    the 4-bit tensor; lo (M, R); hi (R, P); mask (M, P). ROW_PAIRS: see `_nf4_matmul_kernel`.
    """
    pid_p = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    m_mask = offs_m < M
    p_mask = offs_p < P
    q_start = pid_s * K_PER_SPLIT
    q_end = tl.minimum(q_start + K_PER_SPLIT, Q)
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for q0 in range(q_start, q_end, BLOCK_Q):
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        q_mask = offs_q < q_end
        # Upcast right after each load: bf16 arithmetic is broken in Triton's interpreter.
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + offs_q[None, :] * stride_aq,
            mask=m_mask[:, None] & q_mask[None, :], other=0.0,
        ).to(tl.float32)
        if WEIGHT_4BIT:
            w = _dequantize_4bit_operand(
                w_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                offs_q, q_mask, offs_p, p_mask, q0, q_end, stride_wq, stride_wp, ROW_PAIRS,
                BLOCKSIZE, NESTED, NESTED_BLOCKSIZE, BLOCK_Q,
            )
        else:
            w = tl.load(
                w_ptr + offs_q[:, None] * stride_wq + offs_p[None, :] * stride_wp,
                mask=q_mask[:, None] & p_mask[None, :], other=0.0,
            ).to(tl.float32)
        acc += tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=INPUT_PRECISION)
    if pid_s == 0:
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        lo = tl.load(
            lo_ptr + offs_m[:, None] * stride_lm + offs_r[None, :] * stride_lr,
            mask=m_mask[:, None] & r_mask[None, :], other=0.0,
        ).to(tl.float32)
        hi = tl.load(
            hi_ptr + offs_r[:, None] * stride_hr + offs_p[None, :] * stride_hp,
            mask=r_mask[:, None] & p_mask[None, :], other=0.0,
        ).to(tl.float32)
        low_rank = tl.dot(lo.to(DOT_DTYPE), hi.to(DOT_DTYPE), input_precision=INPUT_PRECISION) * scale
        if HAS_MASK:
            keep = tl.load(
                mask_ptr + offs_m[:, None] * stride_mm + offs_p[None, :] * stride_mp,
                mask=m_mask[:, None] & p_mask[None, :], other=0.0,
            ).to(tl.float32)
            low_rank = low_rank * keep
        acc += low_rank
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_p, mask=p_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_p[None, :] * stride_op
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & p_mask[None, :])


Weight = Union[torch.Tensor, Weight4bit]


def _weight_shape(weight: Weight) -> tuple:
    if isinstance(weight, Weight4bit):
        weight.check()
        return int(weight.shape[0]), int(weight.shape[1])
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("weight must be a 2-D (out_features, in_features) tensor or a Weight4bit")
    return int(weight.shape[0]), int(weight.shape[1])


def _dense_weight(weight: Weight, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight in `dtype`: a 4-bit one is decoded into the shared workspace."""
    if isinstance(weight, Weight4bit):
        return dequantize_to_workspace(*weight, dtype=dtype)
    return weight


def lora_matmul(a, weight: Weight, lo, hi, scale: float, bias=None, mask=None, transpose=False):
    """The fused kernel: a @ W^T (or a @ W when `transpose`) + scale * (lo @ hi) * mask + bias.

    a (M, Q), lo (M, R), hi (R, P) (any strides), mask (M, P) or None, bias (P,) or None;
    W (out, in) dense in a's dtype or a Weight4bit. Returns (M, P) in a's dtype.
    """
    return _lora_matmul(a, weight, _weight_shape(weight), lo, hi, scale, bias, mask, transpose)


def _lora_matmul(a, weight: Weight, shape, lo, hi, scale, bias, mask, transpose):
    """`lora_matmul` with the weight already validated (its (out, in) `shape` given): the forward
    and backward check it once per call, not twice, on the latency-bound decode path."""
    out_features, in_features = shape
    Q, P = (out_features, in_features) if transpose else (in_features, out_features)
    M, R = a.shape[0], lo.shape[1]
    if a.shape[1] != Q or lo.shape[0] != M or hi.shape != (R, P):
        raise ValueError(f"shapes do not chain: a {tuple(a.shape)}, lo {tuple(lo.shape)}, hi {tuple(hi.shape)}, "
                         f"weight {(out_features, in_features)}, transpose={transpose}")
    dot_dt, precision = dot_dtype(a.dtype)
    block_m, block_p, block_q, k_per_split, out = split_k_launch(M, P, Q, a.device, a.dtype)
    block_r = max(16, triton.next_power_of_2(R))

    if isinstance(weight, Weight4bit):
        nested = weight.nested_absmax is not None
        w_args = weight.pointer_args()
        stride_wq, stride_wp = (in_features, 1) if transpose else (1, in_features)
        quant = dict(BLOCKSIZE=weight.blocksize, NESTED=nested, NESTED_BLOCKSIZE=weight.nested_blocksize,
                     ROW_PAIRS=row_pairs(in_features, weight.blocksize, transpose))
    else:
        w_args = (weight,) * 6
        stride_wq, stride_wp = (weight.stride(0), weight.stride(1)) if transpose else (weight.stride(1), weight.stride(0))
        quant = dict(BLOCKSIZE=64, NESTED=False, NESTED_BLOCKSIZE=256, ROW_PAIRS=0)
    grid = (triton.cdiv(P, block_p), triton.cdiv(M, block_m), out.shape[0])
    _lora_matmul_kernel[grid](
        a, *w_args, lo, hi, mask if mask is not None else a, bias if bias is not None else a, out,
        M, P, Q, R, k_per_split, float(scale),
        a.stride(0), a.stride(1), stride_wq, stride_wp, lo.stride(0), lo.stride(1), hi.stride(0), hi.stride(1),
        mask.stride(0) if mask is not None else 0, mask.stride(1) if mask is not None else 0,
        out.stride(0), out.stride(1), out.stride(2),
        WEIGHT_4BIT=isinstance(weight, Weight4bit), HAS_MASK=mask is not None, HAS_BIAS=bias is not None,
        DOT_DTYPE=dot_dt, INPUT_PRECISION=precision,
        BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_Q=block_q, BLOCK_R=block_r, **quant,
    )
    return reduce_splits(out, a.dtype)


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
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    xa = (x2 if x_adapter is None else x_adapter.reshape(-1, in_features)) @ lora_A.t()
    if method == "fused" or (method == "auto" and x2.shape[0] <= SKINNY_MAX_M):
        y = _lora_matmul(x2, weight, (out_features, in_features), xa, lora_B.t(), scale, bias, None, False)
    else:
        y = torch.nn.functional.linear(x2, _dense_weight(weight, x.dtype), bias)
        y.addmm_(xa, lora_B.t(), alpha=scale)
    return y.reshape(*lead, out_features), xa


def lora_backward(grad_out, x_adapter, xa, weight: Weight, lora_A, lora_B, scale: float,
                  dropout_mask=None, need_grad_input=True, method="auto"):
    """Gradients of lora_forward: (grad_x or None, grad_A, grad_B).

    grad_out (..., out); x_adapter the adapter's input x * dropout_mask (..., in) (x itself
    without dropout); xa (M, r) from the forward. grad_x = grad_out W + scale ((grad_out B) A) * mask.
    """
    out_features, in_features = _check(x_adapter, weight, lora_A, lora_B, None, dropout_mask, method)
    lead = grad_out.shape[:-1]
    dy = grad_out.reshape(-1, out_features)
    xd = x_adapter.reshape(-1, in_features)
    dyb = dy @ lora_B  # (M, r)
    grad_B = dy.t() @ (xa * scale)
    grad_A = (dyb * scale).t() @ xd
    grad_x = None
    if need_grad_input:
        mask = None if dropout_mask is None else dropout_mask.reshape(-1, in_features)
        if method == "fused" or (method == "auto" and dy.shape[0] <= SKINNY_MAX_M):
            grad_x = _lora_matmul(dy, weight, (out_features, in_features), dyb, lora_A, scale, None, mask, True)
        else:
            grad_x = dy @ _dense_weight(weight, dy.dtype)
            low_rank = dyb @ lora_A
            if mask is not None:
                low_rank.mul_(mask)
            grad_x.add_(low_rank, alpha=scale)
        grad_x = grad_x.reshape(*lead, in_features)
    return grad_x, grad_A, grad_B
