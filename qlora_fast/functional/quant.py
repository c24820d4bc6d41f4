"""4-bit quantization ops: argument checks, kernel/reference dispatch, torch.library registration.

`quantize_4bit` and `dequantize_4bit` are the public entry points. Their tensor work goes through
the custom ops `qlora_fast::quantize_4bit`, `qlora_fast::quantize_absmax` and
`qlora_fast::dequantize_4bit`, each with a fake (meta) implementation so that
`torch.compile(fullgraph=True)` traces through them. Each op runs the Triton kernel when
`use_kernels` says so (CUDA tensors by default) and the PyTorch reference otherwise.
"""
import warnings
from typing import Optional

import torch

from qlora_fast.functional._dispatch import tracing, use_kernels
from qlora_fast.quant_state import FLOAT_DTYPES, QuantState, check_compress_statistics, check_options
from qlora_fast.reference import quant as ref

__all__ = ["quantize_4bit", "dequantize_4bit"]

# Under double quantization every block's scale is coded relative to the mean absmax and to the
# largest one in its group of 256 blocks: one block this many times the median one already costs
# the other blocks ~30% more error (x12 at 1e4 times, measured on N(0, 1) weights).
OUTLIER_RATIO = 1e3


def _kernels():
    from qlora_fast.kernels import nf4

    return nf4


_TABLES = {}


def _table(name: str, device: torch.device) -> torch.Tensor:
    """A code table ("nf4", "fp4" or "dynamic") on `device`, copied there once."""
    key = (name, device)
    if key not in _TABLES:
        table = ref.dynamic_map_signed() if name == "dynamic" else ref.code_for(name)
        _TABLES[key] = table.to(device)
    return _TABLES[key]


# Each op: a plain function (what eager calls: no custom-op dispatch) and its custom op (what a
# tracer records, see `tracing`). no_grad: like the custom ops, the plain functions record no
# autograd history (the reference path would, for an x that requires grad).
@torch.no_grad()
def _quantize_4bit(x, blocksize, quant_type):
    if use_kernels(x):
        return _kernels().quantize_4bit(x, blocksize, _table(quant_type, x.device))
    return ref.quantize_4bit_ref(x, blocksize, quant_type)


@torch.library.custom_op("qlora_fast::quantize_4bit", mutates_args=())
def _quantize_4bit_op(x: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _quantize_4bit(x, blocksize, quant_type)


@_quantize_4bit_op.register_fake
def _(x, blocksize, quant_type):
    n = x.numel()
    return x.new_empty(((n + 1) // 2, 1), dtype=torch.uint8), x.new_empty((-(-n // blocksize),), dtype=torch.float32)


@torch.no_grad()
def _quantize_absmax(absmax):
    if use_kernels(absmax):
        return _kernels().quantize_absmax(absmax, _table("dynamic", absmax.device))
    return ref.quantize_absmax_ref(absmax)


@torch.library.custom_op("qlora_fast::quantize_absmax", mutates_args=())
def _quantize_absmax_op(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _quantize_absmax(absmax)


@_quantize_absmax_op.register_fake
def _(absmax):
    blocks = -(-absmax.numel() // ref.NESTED_BLOCKSIZE)
    return (
        absmax.new_empty(absmax.shape, dtype=torch.uint8),
        absmax.new_empty((blocks,), dtype=torch.float32),
        absmax.new_empty((), dtype=torch.float32),
    )


@torch.no_grad()
def _dequantize_4bit(packed, absmax, nested_absmax, nested_code, offset, numel, blocksize, quant_type, out_dtype):
    if use_kernels(packed):
        return _kernels().dequantize_4bit(
            packed, absmax, _table(quant_type, packed.device), numel, blocksize, out_dtype,
            nested_absmax=nested_absmax, nested_code=nested_code, offset=offset,
        )
    if nested_absmax is not None:
        absmax = ref.dequantize_absmax_ref(absmax, nested_absmax, offset, nested_code)
    return ref.dequantize_4bit_ref(packed, absmax, (numel,), blocksize, quant_type, out_dtype)


@torch.library.custom_op("qlora_fast::dequantize_4bit", mutates_args=())
def _dequantize_4bit_op(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    numel: int,
    blocksize: int,
    quant_type: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return _dequantize_4bit(packed, absmax, nested_absmax, nested_code, offset, numel, blocksize, quant_type,
                            out_dtype)


@_dequantize_4bit_op.register_fake
def _(packed, absmax, nested_absmax, nested_code, offset, numel, blocksize, quant_type, out_dtype):
    return packed.new_empty((numel,), dtype=out_dtype)


def _check_values(x: torch.Tensor, absmax: torch.Tensor, state: QuantState) -> None:
    """Refuse non-finite input and scales that could decode out of range; warn about outliers that
    spoil double quantization. One device sync (quantization happens once per weight)."""
    checks = [torch.isfinite(x).all()]
    if state.nested:
        checks += [absmax.max(), absmax.median(), state.offset.abs(), state.nested_absmax.max()]
    finite, *stats = torch.stack([c.float() for c in checks]).tolist()
    if not finite:
        raise ValueError("x must be finite to be quantized: it holds NaN or Inf "
                         "(under double quantization one such value would spoil every block)")
    if not stats:
        return
    largest, typical, offset, nested = stats
    bound = offset + nested  # a decoded scale is code8 * nested_absmax + offset, |code8| <= 1 (sum in float64)
    # rounding to state.dtype keeps anything below its largest value plus a quarter ulp finite
    limit = torch.finfo(state.dtype).max * (1 + torch.finfo(state.dtype).eps / 4)
    if not bound <= limit:
        raise ValueError(
            f"x is too large for double quantization: its block absmax (up to {largest:.4g}) could decode as "
            f"{bound:.4g}, beyond {state.dtype}'s range (e.g. the mean of the absmax overflows float32); "
            "quantize it with compress_statistics=False")
    if typical > 0 and largest > OUTLIER_RATIO * typical:
        warnings.warn(
            f"x has a block absmax {largest / typical:.3g} times the median one ({largest:.4g} vs {typical:.4g}): "
            "with double quantization (compress_statistics=True) that outlier coarsens the scales of the other "
            "blocks; consider compress_statistics=False or clipping the outlier", stacklevel=3)


def quantize_4bit(
    x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", compress_statistics: bool = True
) -> tuple[torch.Tensor, QuantState]:
    """Blockwise 4-bit quantization, bit-compatible with `bitsandbytes.functional.quantize_4bit`.

    x: fp32, fp16 or bf16 tensor of any shape with at least one element.
    blocksize: a power of two from 32 to 4096. quant_type: "nf4" or "fp4".
    compress_statistics: double-quantize the absmax (8-bit, blocksize 256, after subtracting mean).
    Returns (packed uint8 of shape (ceil(n / 2), 1), QuantState). Raises TypeError for a non-float
    `x` or a non-bool compress_statistics, ValueError for an empty `x`, a bad blocksize or an
    unknown quant_type, and ValueError when `x` holds NaN or Inf (under double quantization the
    mean of the absmax would carry it into every block) or, with compress_statistics, values so
    large that the scales' mean overflows (e.g. bfloat16's largest value in many blocks would come
    back as inf). Warns (UserWarning) with compress_statistics when one block's absmax is over
    OUTLIER_RATIO (1e3) times the median one, which coarsens every other block's scale. These
    value checks cost one device sync and are skipped while torch.compile traces. A meta `x`
    gives meta tensors of the right shapes and dtypes (a module built on the meta device).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"x must have at least one element, got shape {tuple(x.shape)}")
    check_options(blocksize, quant_type)
    check_compress_statistics(compress_statistics)
    # meta tensors (a model built on the meta device) take the custom ops, whose fake
    # implementations give the shapes and dtypes without computing anything
    traced = tracing() or x.device.type == "meta"
    packed, absmax = (_quantize_4bit_op if traced else _quantize_4bit)(x.contiguous(), blocksize, quant_type)
    nested = {}
    if compress_statistics:
        q, nested_absmax, offset = (_quantize_absmax_op if traced else _quantize_absmax)(absmax)
        nested = dict(absmax=q, offset=offset, nested_absmax=nested_absmax,
                      nested_code=_table("dynamic", x.device).clone())
    state = QuantState(**{"absmax": absmax, **nested}, shape=x.shape, dtype=x.dtype, blocksize=blocksize,
                       quant_type=quant_type, code=_table(quant_type, x.device).clone())
    if x.device.type != "meta" and not torch.compiler.is_compiling():
        _check_values(x, absmax, state)
    return packed, state


def dequantize_4bit(packed: torch.Tensor, state: QuantState, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Undo `quantize_4bit`: a tensor of `state.shape` in `out_dtype` (default `state.dtype`).

    Raises TypeError for a non-uint8 `packed`, a non-QuantState `state` or a non-float
    `out_dtype`; ValueError when `packed` does not hold `state.shape`'s elements or when `packed`
    and the state's tensors are on different devices.
    """
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got {getattr(packed, 'dtype', type(packed).__name__)}")
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
    out_dtype = state.dtype if out_dtype is None else out_dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    state.validate(packed)
    numel = state.numel
    tensors = {"state.absmax": state.absmax}
    if state.nested:
        tensors.update(
            {
                "state.nested_absmax": state.nested_absmax,
                "state.offset": state.offset,
                "state.nested_code": state.nested_code,
            }
        )
    for name, t in tensors.items():
        if t.device != packed.device:
            raise ValueError(f"packed is on {packed.device} but {name} is on {t.device}: move both with .to(device)")
    out = (_dequantize_4bit_op if tracing() else _dequantize_4bit)(
        packed.contiguous(),
        state.absmax.reshape(-1),  # flat (a copy only for a strided view, e.g. FSDP units)
        state.nested_absmax,
        state.nested_code,
        state.offset,
        numel,
        state.blocksize,
        state.quant_type,
        out_dtype,
    )
    return out.view(state.shape)
