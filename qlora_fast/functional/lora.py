"""4-bit matmul and LoRA ops: dispatch (kernel or reference), custom ops, autograd.

`lora_linear` computes y = x W^T + bias + scaling * (dropout(x) A^T) B^T with a frozen base W
that is dense (float16/bfloat16/float32) or 4-bit (packed uint8 + QuantState), and trains
A, B (and the bias when it requires grad). `matmul_4bit` is x W^T + bias for a 4-bit W.

Each op is a `torch.library.custom_op` (forward and backward ops, with fake implementations so
`torch.compile` traces through without graph breaks) wrapped by a `torch.autograd.Function`.
Inside an op, `use_kernels` picks the Triton kernels (CUDA tensors, or QLORA_FAST_BACKEND=triton
under TRITON_INTERPRET) or the plain-PyTorch reference (qlora_fast.reference.lora).
"""
from typing import Optional

import torch
from torch import Tensor

from qlora_fast.reference import lora as _ref

from ._dispatch import use_kernels

__all__ = ["lora_linear", "matmul_4bit", "LoRALinearFunction", "MatMul4bitFunction"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _quant_fields(quant_state, weight: Tensor):
    """(absmax, code, nested_absmax, nested_code, offset, out, in, blocksize, nested_blocksize)."""
    if weight.dtype != torch.uint8:
        raise TypeError(f"a 4-bit weight must be packed uint8, got {weight.dtype}")
    shape = tuple(quant_state.shape)
    if len(shape) != 2:
        raise ValueError(f"quant_state.shape must be (out_features, in_features), got {shape}")
    nested = getattr(quant_state, "nested_absmax", None) is not None
    return (
        quant_state.absmax, quant_state.code,
        quant_state.nested_absmax if nested else None,
        quant_state.nested_code if nested else None,
        quant_state.offset if nested else None,
        int(shape[0]), int(shape[1]), int(quant_state.blocksize),
        int(getattr(quant_state, "nested_blocksize", 256) or 256),
    )


def _weight4bit(weight, absmax, code, nested_absmax, nested_code, offset, out_features, in_features,
                blocksize, nested_blocksize):
    from qlora_fast.kernels.nf4_matmul import Weight4bit

    return Weight4bit(weight, absmax, code, (out_features, in_features), blocksize, nested_absmax,
                      nested_code, offset, nested_blocksize)


def _dense_ref(weight, absmax, code, nested_absmax, nested_code, offset, out_features, in_features,
               blocksize, nested_blocksize, dtype):
    if absmax is None:
        return weight
    return _ref.dequantize_weight_4bit_ref(weight, absmax, code, (out_features, in_features), blocksize,
                                           nested_absmax, nested_code, offset, nested_blocksize, dtype)


def _kernel_weight(weight, absmax, *quant):
    if absmax is None:
        return weight
    return _weight4bit(weight, absmax, *quant)


def _use_kernels(x: Tensor, weight: Tensor) -> bool:
    return x.dtype in _KERNEL_DTYPES and use_kernels(x, weight)


# ---------------------------------------------------------------- LoRA ops

@torch.library.custom_op("qlora_fast::lora_forward", mutates_args=())
def _lora_forward_op(
    x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float,
    bias: Optional[Tensor], x_adapter: Optional[Tensor],
    absmax: Optional[Tensor], code: Optional[Tensor], nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor], offset: Optional[Tensor],
    out_features: int, in_features: int, blocksize: int, nested_blocksize: int,
) -> tuple[Tensor, Tensor]:
    quant = (absmax, code, nested_absmax, nested_code, offset, out_features, in_features, blocksize, nested_blocksize)
    if _use_kernels(x, weight):
        from qlora_fast.kernels.lora import lora_forward

        return lora_forward(x, _kernel_weight(weight, *quant), lora_A, lora_B, scale, bias, x_adapter)
    dense = _dense_ref(weight, *quant, dtype=x.dtype)
    return _ref.lora_forward_ref(x, dense, lora_A, lora_B, scale, bias, x_adapter)


@_lora_forward_op.register_fake
def _(x, weight, lora_A, lora_B, scale, bias, x_adapter, absmax, code, nested_absmax, nested_code, offset,
      out_features, in_features, blocksize, nested_blocksize):
    rows = x.shape[:-1].numel()
    return x.new_empty((*x.shape[:-1], out_features)), x.new_empty((rows, lora_A.shape[0]))


@torch.library.custom_op("qlora_fast::lora_backward", mutates_args=())
def _lora_backward_op(
    grad_out: Tensor, x_adapter: Tensor, xa: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
    scale: float, dropout_mask: Optional[Tensor],
    absmax: Optional[Tensor], code: Optional[Tensor], nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor], offset: Optional[Tensor],
    out_features: int, in_features: int, blocksize: int, nested_blocksize: int, need_grad_input: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_A, grad_B); grad_x is an empty tensor when not `need_grad_input`."""
    quant = (absmax, code, nested_absmax, nested_code, offset, out_features, in_features, blocksize, nested_blocksize)
    if _use_kernels(grad_out, weight):
        from qlora_fast.kernels.lora import lora_backward

        grad_x, grad_A, grad_B = lora_backward(grad_out, x_adapter, xa, _kernel_weight(weight, *quant),
                                               lora_A, lora_B, scale, dropout_mask, need_grad_input)
    else:
        dense = _dense_ref(weight, *quant, dtype=grad_out.dtype)
        grad_x, grad_A, grad_B = _ref.lora_backward_ref(grad_out, x_adapter, xa, dense, lora_A, lora_B, scale,
                                                        dropout_mask, need_grad_input)
    if grad_x is None:
        grad_x = grad_out.new_empty(0)
    return grad_x, grad_A, grad_B


@_lora_backward_op.register_fake
def _(grad_out, x_adapter, xa, weight, lora_A, lora_B, scale, dropout_mask, absmax, code, nested_absmax,
      nested_code, offset, out_features, in_features, blocksize, nested_blocksize, need_grad_input):
    grad_x = x_adapter.new_empty(x_adapter.shape) if need_grad_input else grad_out.new_empty(0)
    return grad_x, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


class LoRALinearFunction(torch.autograd.Function):
    """Autograd for y = x W^T + bias + scale (x_adapter A^T) B^T, x_adapter = x * dropout_mask.

    Saves the adapter input (x itself without dropout), xa = x_adapter A^T (M x r) and the mask;
    the base weight is referenced, never copied (a 4-bit one is decoded again in backward).
    """

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, dropout_mask, absmax, code, nested_absmax, nested_code,
                offset, scale, out_features, in_features, blocksize, nested_blocksize):
        x_adapter = None if dropout_mask is None else x * dropout_mask
        y, xa = torch.ops.qlora_fast.lora_forward(
            x, weight, lora_A, lora_B, scale, bias, x_adapter, absmax, code, nested_absmax, nested_code, offset,
            out_features, in_features, blocksize, nested_blocksize,
        )
        ctx.save_for_backward(x if x_adapter is None else x_adapter, xa, weight, lora_A, lora_B, dropout_mask,
                              absmax, code, nested_absmax, nested_code, offset)
        ctx.scale = scale
        ctx.meta = (out_features, in_features, blocksize, nested_blocksize)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x_adapter, xa, weight, lora_A, lora_B, mask, absmax, code, nested_absmax, nested_code, offset = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_x, grad_A, grad_B = torch.ops.qlora_fast.lora_backward(
            grad_out, x_adapter, xa, weight, lora_A, lora_B, ctx.scale, mask, absmax, code, nested_absmax,
            nested_code, offset, *ctx.meta, need[0],
        )
        grad_bias = grad_out.reshape(-1, ctx.meta[0]).sum(0) if need[4] else None
        return (grad_x if need[0] else None, None, grad_A if need[2] else None, grad_B if need[3] else None,
                grad_bias) + (None,) * 11


def _autocast(x: Tensor, *tensors):
    """Cast x and float tensors to the autocast dtype when autocast is on for x's device."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in (x, *tensors))


def lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                bias: Optional[Tensor] = None, quant_state=None, dropout_p: float = 0.0,
                training: bool = False) -> Tensor:
    """y = x W^T + bias + scaling * (dropout(x) A^T) B^T, differentiable in x, lora_A, lora_B, bias.

    x: (..., in) float16/bfloat16/float32 (float64 on the reference path). weight: the frozen
    base, (out, in) in x's dtype, or packed uint8 with `quant_state` (a QuantState of shape
    (out, in)). lora_A: (r, in); lora_B: (out, r); bias: (out,) or None; all in x's dtype
    (under autocast everything is cast to the autocast dtype first). Dropout with probability
    `dropout_p` is applied to the adapter's input only, and only when `training`.
    Returns (..., out) in x's dtype.
    Raises ValueError for bad shapes, rank or dropout_p, TypeError for mismatched dtypes and
    ValueError when the base weight requires grad (only the adapter and bias are trained here).
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if weight.requires_grad:
        raise ValueError("weight (the base) must be frozen (requires_grad=False); lora_linear trains the adapter")
    dense = quant_state is None
    x, lora_A, lora_B, bias, *w = _autocast(x, lora_A, lora_B, bias, *((weight,) if dense else ()))
    if dense:
        weight = w[0]
        if weight.dim() != 2:
            raise ValueError(f"weight must be (out_features, in_features), got shape {tuple(weight.shape)}")
        quant = (None,) * 5 + (weight.shape[0], weight.shape[1], 64, 256)
    else:
        quant = _quant_fields(quant_state, weight)
    out_features, in_features = quant[5], quant[6]
    if x.shape[-1] != in_features:
        raise ValueError(f"x must have last dimension in_features={in_features}, got shape {tuple(x.shape)}")
    if lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(f"lora_A and lora_B must be 2-D, got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    r = lora_A.shape[0]
    if not 1 <= r <= min(in_features, out_features):
        raise ValueError(f"rank r={r} must be in [1, min(in_features, out_features)={min(in_features, out_features)}]")
    if lora_A.shape[1] != in_features or tuple(lora_B.shape) != (out_features, r):
        raise ValueError(f"lora_A must be ({r}, {in_features}) and lora_B ({out_features}, {r}), "
                         f"got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must be ({out_features},), got {tuple(bias.shape)}")
    named = {"lora_A": lora_A, "lora_B": lora_B, "bias": bias, "weight": weight if dense else None}
    for name, t in named.items():
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    mask = None
    if training and dropout_p > 0:
        mask = torch.nn.functional.dropout(torch.ones_like(x), dropout_p, training=True)
    return LoRALinearFunction.apply(x, weight, lora_A, lora_B, bias, mask, *quant[:5], float(scaling), *quant[5:])


# ---------------------------------------------------------------- 4-bit matmul ops

@torch.library.custom_op("qlora_fast::matmul_4bit", mutates_args=())
def _matmul_4bit_op(
    x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor], offset: Optional[Tensor], bias: Optional[Tensor],
    out_features: int, in_features: int, blocksize: int, nested_blocksize: int, transpose: bool,
) -> Tensor:
    quant = (absmax, code, nested_absmax, nested_code, offset, out_features, in_features, blocksize, nested_blocksize)
    if _use_kernels(x, packed):
        from qlora_fast.kernels.nf4_matmul import nf4_matmul

        w = _weight4bit(packed, *quant)
        return nf4_matmul(x, w.packed, w.absmax, w.code, w.shape, w.blocksize, w.nested_absmax, w.nested_code,
                          w.offset, w.nested_blocksize, bias=bias, transpose=transpose)
    dense = _dense_ref(packed, *quant, dtype=x.dtype)
    return _ref.matmul_4bit_ref(x, dense, bias, transpose)


@_matmul_4bit_op.register_fake
def _(x, packed, absmax, code, nested_absmax, nested_code, offset, bias, out_features, in_features, blocksize,
      nested_blocksize, transpose):
    return x.new_empty((*x.shape[:-1], in_features if transpose else out_features))


class MatMul4bitFunction(torch.autograd.Function):
    """Autograd for x W^T + bias with a frozen 4-bit W; backward is the same op on W (transposed)."""

    @staticmethod
    def forward(ctx, x, packed, bias, absmax, code, nested_absmax, nested_code, offset, out_features, in_features,
                blocksize, nested_blocksize):
        ctx.save_for_backward(packed, absmax, code, nested_absmax, nested_code, offset)
        ctx.meta = (out_features, in_features, blocksize, nested_blocksize)
        return torch.ops.qlora_fast.matmul_4bit(x, packed, absmax, code, nested_absmax, nested_code, offset, bias,
                                                out_features, in_features, blocksize, nested_blocksize, False)

    @staticmethod
    def backward(ctx, grad_out):
        packed, absmax, code, nested_absmax, nested_code, offset = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_x = None
        if need[0]:
            grad_x = torch.ops.qlora_fast.matmul_4bit(grad_out, packed, absmax, code, nested_absmax, nested_code,
                                                      offset, None, *ctx.meta, True)
        grad_bias = grad_out.reshape(-1, ctx.meta[0]).sum(0) if need[2] else None
        return (grad_x, None, grad_bias) + (None,) * 9


def matmul_4bit(x: Tensor, packed: Tensor, quant_state, bias: Optional[Tensor] = None) -> Tensor:
    """x @ W^T + bias with W (out, in) = quant_state.shape stored 4-bit (bitsandbytes layout).

    x: (..., in) float16/bfloat16/float32 (float64 on the reference path); bias (out,) in x's
    dtype or None. Differentiable in x and bias. On CUDA, M <= 16 rows use the fused decode
    kernel (the weight is never materialised), more rows dequantize into a reused workspace and
    call the vendor GEMM. Raises ValueError/TypeError for bad shapes or dtypes.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    x, bias = _autocast(x, bias)
    absmax, code, nested_absmax, nested_code, offset, out_features, in_features, blocksize, nb = \
        _quant_fields(quant_state, packed)
    if x.shape[-1] != in_features:
        raise ValueError(f"x must have last dimension in_features={in_features}, got shape {tuple(x.shape)}")
    if bias is not None and (tuple(bias.shape) != (out_features,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be ({out_features},) in {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    return MatMul4bitFunction.apply(x, packed, bias, absmax, code, nested_absmax, nested_code, offset,
                                    out_features, in_features, blocksize, nb)
