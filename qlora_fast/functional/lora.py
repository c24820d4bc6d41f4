"""4-bit matmul and LoRA ops: dispatch (kernel or reference), custom ops, autograd.

`lora_linear` computes y = x W^T + bias + scaling * (dropout(x) A^T) B^T with a frozen base W
that is dense (float16/bfloat16/float32) or 4-bit (packed uint8 + QuantState), and trains
A, B (and the bias when it requires grad). `matmul_4bit` is x W^T + bias for a 4-bit W.

Two ways to the same code:
- eager (the fast path, and what a CUDA graph captures): the public function checks its
  arguments and makes the one dispatch decision of the call (`_dispatch`, reused by backward),
  then calls the launchers' validated entries (`matmul_validated`, `lora_forward_validated`,
  `lora_backward_validated`: they re-check nothing) or the reference directly, through a
  `torch.autograd.Function` only when a gradient is needed. The 4-bit weight reaches the launcher
  as the `Weight4bit` its QuantState caches (`QuantState.kernel_weight`: validated once, not per
  call), which keeps its launch arguments and per-shape launch plans; no custom-op dispatch, no
  host sync, no allocation besides the outputs.
- under torch.compile / tracing: the same Functions call the `torch.library.custom_op`s
  (`qlora_fast::matmul_4bit`, `lora_forward`, `lora_backward`), whose fake implementations let
  `torch.compile(fullgraph=True)` trace through without graph breaks.
`use_kernels` picks the Triton kernels (CUDA tensors, or QLORA_FAST_BACKEND=triton under
TRITON_INTERPRET) or the plain-PyTorch reference (qlora_fast.reference.lora) in both.
"""
import functools
from typing import Optional

import torch
from torch import Tensor

from qlora_fast.quant_state import NESTED_BLOCKSIZE, QuantState
from qlora_fast.reference import lora as _ref

from ._dispatch import tracing, use_kernels

__all__ = ["lora_linear", "matmul_4bit", "LoRALinearFunction", "MatMul4bitFunction"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _use_kernels(x: Tensor, weight: Tensor) -> bool:
    return x.dtype in _KERNEL_DTYPES and use_kernels(x, weight)


@functools.cache
def _kernels():
    """(kernels.nf4_matmul, kernels.lora), imported once (an import statement per call costs ~1 us)."""
    from qlora_fast.kernels import lora, nf4_matmul

    return nf4_matmul, lora


# A base weight travels as a dense Tensor or as the 9 fields of `Weight4bit` (packed, absmax, code,
# shape, blocksize, nested_absmax, nested_code, offset, nested_blocksize): the launcher's type on
# the kernel path, a plain tuple in the same order on the reference path (which needs no Triton).

def _eager_weight(weight: Tensor, quant_state, kernels: bool):
    if quant_state is None:
        return weight
    if not isinstance(quant_state, QuantState):
        raise TypeError(f"quant_state must be a qlora_fast QuantState, got {type(quant_state).__name__}")
    return quant_state.kernel_weight(weight) if kernels else quant_state.weight_fields(weight)


def _dispatch(x: Tensor, weight: Tensor, quant_state):
    """The one dispatch decision of a call, reused by its forward and backward: None while tracing
    (the custom ops stand in for the launchers), else (the launcher's weight, whether the Triton
    kernels run). A 4-bit weight is validated on first use and then served from its state's cache."""
    if tracing():
        return None
    kernels = _use_kernels(x, weight)
    return _eager_weight(weight, quant_state, kernels), kernels


def _op_weight(weight, absmax, code, nested_absmax, nested_code, offset, out_features, in_features, blocksize,
               nested_blocksize, kernels: bool):
    """The weight from a custom op's arguments (the compiled path rebuilds it per call)."""
    if absmax is None:
        return weight
    fields = (weight, absmax, code, (out_features, in_features), blocksize, nested_absmax, nested_code, offset,
              nested_blocksize)
    if kernels:
        return _kernels()[0].Weight4bit(*fields)
    return fields


def _op_fields(weight: Tensor, quant_state) -> tuple:
    """(absmax, code, nested_absmax, nested_code, offset, out, in, blocksize, nested_blocksize): the
    custom ops' spelling of a base weight (all None and the dense shape for a dense one)."""
    if quant_state is None:
        return (None,) * 5 + (int(weight.shape[0]), int(weight.shape[1]), 64, NESTED_BLOCKSIZE)
    s = quant_state
    return (s.absmax, s.code, s.nested_absmax, s.nested_code, s.offset, int(s.shape[0]), int(s.shape[1]),
            s.blocksize, s.nested_blocksize)


def _dense(w, dtype: torch.dtype) -> Tensor:
    """The reference path's (out, in) weight in `dtype` (a 4-bit one decoded in fp32 first)."""
    return w if isinstance(w, Tensor) else _ref.dequantize_weight_4bit_ref(*w, dtype=dtype)


def _check_4bit(weight: Tensor, quant_state) -> None:
    if not isinstance(weight, Tensor) or weight.dtype != torch.uint8:
        raise TypeError(f"a 4-bit weight must be packed uint8, got {getattr(weight, 'dtype', type(weight).__name__)}")
    if len(quant_state.shape) != 2:
        raise ValueError(f"quant_state.shape must be (out_features, in_features), got {tuple(quant_state.shape)}")


def _autocast(x: Tensor, *tensors):
    """Cast x and float tensors to the autocast dtype when autocast is on for x's device."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in (x, *tensors))


def _needs_grad(*tensors) -> bool:
    if not torch.is_grad_enabled():
        return False
    for t in tensors:  # a loop, not any(generator): this runs on every eager call
        if t is not None and t.requires_grad:
            return True
    return False


# ---------------------------------------------------------------- 4-bit matmul

def _matmul_4bit_run(x, w, bias, transpose: bool, kernels: bool) -> Tensor:
    if kernels:
        return _kernels()[0].matmul_validated(x, w, bias, transpose)
    return _ref.matmul_4bit_ref(x, _dense(w, x.dtype), bias, transpose)


@torch.library.custom_op("qlora_fast::matmul_4bit", mutates_args=())
def _matmul_4bit_op(
    x: Tensor, packed: Tensor, bias: Optional[Tensor], absmax: Tensor, code: Tensor,
    nested_absmax: Optional[Tensor], nested_code: Optional[Tensor], offset: Optional[Tensor],
    out_features: int, in_features: int, blocksize: int, nested_blocksize: int, transpose: bool,
) -> Tensor:
    kernels = _use_kernels(x, packed)
    w = _op_weight(packed, absmax, code, nested_absmax, nested_code, offset, out_features, in_features, blocksize,
                   nested_blocksize, kernels)
    return _matmul_4bit_run(x, w, bias, transpose, kernels)


@_matmul_4bit_op.register_fake
def _(x, packed, bias, absmax, code, nested_absmax, nested_code, offset, out_features, in_features, blocksize,
      nested_blocksize, transpose):
    return x.new_empty((*x.shape[:-1], in_features if transpose else out_features))


def _matmul_4bit(x, packed, quant_state, bias, transpose: bool, plan) -> Tensor:
    """x W^T + bias (x W when `transpose`): the custom op while tracing (`plan` None), else the launcher."""
    if plan is None:
        return torch.ops.qlora_fast.matmul_4bit(x, packed, bias, *_op_fields(packed, quant_state), transpose)
    return _matmul_4bit_run(x, plan[0], bias, transpose, plan[1])


def _not_a_view(y: Tensor, plan) -> Tensor:
    """An autograd Function's output `y`, no longer a view. The launchers return their (M, out)
    result reshaped to x's rows, and autograd refuses in-place ops on a Function's view outputs
    (Falcon adds into one); that (M, out) tensor is ours alone, so it is viewed untracked, no copy.
    Traced calls (`plan` None) go through the custom ops, which return no views."""
    return torch.ops.aten._unsafe_view(y, y.shape) if plan is not None and y._is_view() else y


class MatMul4bitFunction(torch.autograd.Function):
    """Autograd for x W^T + bias with a frozen 4-bit W; backward is the same op on W (transposed)."""

    @staticmethod
    def forward(ctx, x, bias, packed, quant_state, plan=None):
        # `plan`: matmul_4bit's dispatch decision (`_dispatch`), made once per call
        plan = _dispatch(x, packed, quant_state) if plan is None else plan
        # the frozen weight is referenced, not saved: it never changes and needs no version check
        ctx.weight, ctx.plan = (packed, quant_state), plan
        return _not_a_view(_matmul_4bit(x, packed, quant_state, bias, False, plan), plan)

    @staticmethod
    def backward(ctx, grad_out):
        (packed, quant_state), plan = ctx.weight, ctx.plan
        if plan is not None and tracing():  # an eager forward whose backward is traced (compiled autograd)
            plan = None
        need = ctx.needs_input_grad
        grad_x = _matmul_4bit(grad_out, packed, quant_state, None, True, plan) if need[0] else None
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if need[1] else None
        return grad_x, grad_bias, None, None, None


def matmul_4bit(x: Tensor, packed: Tensor, quant_state, bias: Optional[Tensor] = None) -> Tensor:
    """x @ W^T + bias with W (out, in) = quant_state.shape stored 4-bit (bitsandbytes layout).

    x: (..., in) float16/bfloat16/float32 (float64 on the reference path); bias (out,) in x's
    dtype or None. Differentiable in x and bias. On CUDA, M <= 16 rows use the fused decode
    kernel (the weight is never materialised), more rows dequantize into a reused workspace and
    call the vendor GEMM. The state is validated on first use with `packed` and then trusted
    (`QuantState.kernel_weight`). Raises ValueError/TypeError for bad shapes (a 0-d x included)
    or dtypes.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension (..., in_features), got a 0-d tensor")
    if not isinstance(quant_state, QuantState):
        raise TypeError(f"quant_state must be a qlora_fast QuantState, got {type(quant_state).__name__}")
    x, bias = _autocast(x, bias)
    plan = _dispatch(x, packed, quant_state)
    if plan is None:
        _check_4bit(packed, quant_state)
        quant_state.validate(packed)  # traced once
        shape = quant_state.shape
    else:
        # eager: the state was validated on its first use with `packed` and is served from its
        # cache, shapes included; the launcher gets the cached Weight4bit
        shape = plan[0][3]
    out_features, in_features = int(shape[0]), int(shape[1])
    if x.shape[-1] != in_features:
        raise ValueError(f"x must have last dimension {in_features} (in_features), got shape {tuple(x.shape)}")
    if bias is not None and (tuple(bias.shape) != (out_features,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be ({out_features},) in {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if _needs_grad(x, bias):
        return MatMul4bitFunction.apply(x, bias, packed, quant_state, plan)
    return _matmul_4bit(x, packed, quant_state, bias, False, plan)


# ---------------------------------------------------------------- LoRA

def _lora_forward_run(x, w, lora_A, lora_B, scale, bias, x_adapter, kernels: bool):
    if kernels:
        return _kernels()[1].lora_forward_validated(x, w, lora_A, lora_B, scale, bias, x_adapter)
    return _ref.lora_forward_ref(x, _dense(w, x.dtype), lora_A, lora_B, scale, bias, x_adapter)


def _lora_backward_run(grad_out, x_adapter, xa, w, lora_A, lora_B, scale, mask, need_grad_input, kernels: bool):
    if kernels:
        return _kernels()[1].lora_backward_validated(grad_out, x_adapter, xa, w, lora_A, lora_B, scale, mask,
                                                     need_grad_input)
    return _ref.lora_backward_ref(grad_out, x_adapter, xa, _dense(w, grad_out.dtype), lora_A, lora_B, scale, mask,
                                  need_grad_input)


@torch.library.custom_op("qlora_fast::lora_forward", mutates_args=())
def _lora_forward_op(
    x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float,
    bias: Optional[Tensor], x_adapter: Optional[Tensor],
    absmax: Optional[Tensor], code: Optional[Tensor], nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor], offset: Optional[Tensor],
    out_features: int, in_features: int, blocksize: int, nested_blocksize: int,
) -> tuple[Tensor, Tensor]:
    kernels = _use_kernels(x, weight)
    w = _op_weight(weight, absmax, code, nested_absmax, nested_code, offset, out_features, in_features, blocksize,
                   nested_blocksize, kernels)
    return _lora_forward_run(x, w, lora_A, lora_B, scale, bias, x_adapter, kernels)


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
    kernels = _use_kernels(grad_out, weight)
    w = _op_weight(weight, absmax, code, nested_absmax, nested_code, offset, out_features, in_features, blocksize,
                   nested_blocksize, kernels)
    grad_x, grad_A, grad_B = _lora_backward_run(grad_out, x_adapter, xa, w, lora_A, lora_B, scale, dropout_mask,
                                                need_grad_input, kernels)
    return grad_out.new_empty(0) if grad_x is None else grad_x, grad_A, grad_B


@_lora_backward_op.register_fake
def _(grad_out, x_adapter, xa, weight, lora_A, lora_B, scale, dropout_mask, absmax, code, nested_absmax,
      nested_code, offset, out_features, in_features, blocksize, nested_blocksize, need_grad_input):
    grad_x = x_adapter.new_empty(x_adapter.shape) if need_grad_input else grad_out.new_empty(0)
    return grad_x, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


def _lora_forward(x, weight, quant_state, lora_A, lora_B, scale, bias, x_adapter, plan):
    """The custom op while tracing (`plan` None, see `_dispatch`), else the launcher."""
    if plan is None:
        return torch.ops.qlora_fast.lora_forward(x, weight, lora_A, lora_B, scale, bias, x_adapter,
                                                 *_op_fields(weight, quant_state))
    return _lora_forward_run(x, plan[0], lora_A, lora_B, scale, bias, x_adapter, plan[1])


def _lora_backward(grad_out, x_adapter, xa, weight, quant_state, plan, lora_A, lora_B, scale, mask, need_grad_input):
    if plan is None:
        grad_x, grad_A, grad_B = torch.ops.qlora_fast.lora_backward(
            grad_out, x_adapter, xa, weight, lora_A, lora_B, scale, mask, *_op_fields(weight, quant_state),
            need_grad_input)
        return (grad_x if need_grad_input else None), grad_A, grad_B
    return _lora_backward_run(grad_out, x_adapter, xa, plan[0], lora_A, lora_B, scale, mask, need_grad_input, plan[1])


class LoRALinearFunction(torch.autograd.Function):
    """Autograd for y = x W^T + bias + scale (x_adapter A^T) B^T, x_adapter = x * dropout_mask.

    Saves the adapter input (x itself without dropout), xa = x_adapter A^T (M x r) and the mask;
    the frozen base weight (and its QuantState) is referenced, never copied (a 4-bit one is decoded
    again in backward).
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, bias, dropout_mask, weight, quant_state, scale, plan=None):
        # `plan`: lora_linear's dispatch decision (`_dispatch`), made once per call
        plan = _dispatch(x, weight, quant_state) if plan is None else plan
        x_adapter = None if dropout_mask is None else x * dropout_mask
        y, xa = _lora_forward(x, weight, quant_state, lora_A, lora_B, scale, bias, x_adapter, plan)
        y = _not_a_view(y, plan)
        ctx.save_for_backward(x if x_adapter is None else x_adapter, xa, lora_A, lora_B, dropout_mask)
        ctx.weight, ctx.plan = (weight, quant_state), plan
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x_adapter, xa, lora_A, lora_B, mask = ctx.saved_tensors
        (weight, quant_state), plan = ctx.weight, ctx.plan
        if plan is not None and tracing():  # an eager forward whose backward is traced (compiled autograd)
            plan = None
        need = ctx.needs_input_grad
        grad_x, grad_A, grad_B = _lora_backward(grad_out, x_adapter, xa, weight, quant_state, plan, lora_A, lora_B,
                                                ctx.scale, mask, need[0])
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if need[3] else None
        return (grad_x if need[0] else None, grad_A if need[1] else None, grad_B if need[2] else None, grad_bias,
                None, None, None, None, None)


def lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                bias: Optional[Tensor] = None, quant_state=None, dropout_p: float = 0.0,
                training: bool = False) -> Tensor:
    """y = x W^T + bias + scaling * (dropout(x) A^T) B^T, differentiable in x, lora_A, lora_B, bias.

    x: (..., in) float16/bfloat16/float32 (float64 on the reference path). weight: the frozen
    base, (out, in) in x's dtype, or packed uint8 with `quant_state` (a QuantState of shape
    (out, in), validated on first use and then trusted). lora_A: (r, in); lora_B: (out, r); bias:
    (out,) or None; all in x's dtype (under autocast everything is cast to the autocast dtype
    first). Dropout with probability `dropout_p` is applied to the adapter's input only, and only
    when `training`. Returns (..., out) in x's dtype.
    Raises ValueError for bad shapes, rank or dropout_p, TypeError for mismatched dtypes and
    ValueError when the base weight requires grad (only the adapter and bias are trained here).
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension (..., in_features), got a 0-d tensor")
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
        out_features, in_features = weight.shape
    else:
        _check_4bit(weight, quant_state)
        out_features, in_features = int(quant_state.shape[0]), int(quant_state.shape[1])
    if x.shape[-1] != in_features:
        raise ValueError(f"x must have last dimension {in_features} (in_features), got shape {tuple(x.shape)}")
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
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias), ("weight", weight if dense else None)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    mask, scale = None, float(scaling)
    if training and dropout_p > 0:
        # a 0/1 mask, 1/(1 - p) folded into the float scale: in x's dtype the factor itself rounds
        # (bf16: 1/0.95 -> 1.0547, +0.2% on every kept input; PEFT's float32 adapter is exact)
        mask = (torch.nn.functional.dropout(torch.ones_like(x), dropout_p, training=True) != 0).to(x.dtype)
        scale /= 1.0 - float(dropout_p)
    plan = _dispatch(x, weight, quant_state)  # eager: validates a 4-bit state on first use, then cached
    if plan is None and not dense:
        quant_state.validate(weight)  # traced once
    if not _needs_grad(x, lora_A, lora_B, bias):
        x_adapter = None if mask is None else x * mask
        return _lora_forward(x, weight, quant_state, lora_A, lora_B, scale, bias, x_adapter, plan)[0]
    return LoRALinearFunction.apply(x, lora_A, lora_B, bias, mask, weight, quant_state, scale, plan)
