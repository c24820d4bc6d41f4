"""`Linear4bit`: a drop-in `nn.Linear` whose weight is stored in 4 bits (NF4/FP4).

The weight lives as a packed uint8 `nn.Parameter` (frozen) plus a `QuantState`; the forward pass
runs `functional.matmul_4bit` in the compute dtype (the fused NF4 kernels on CUDA, dequantize +
matmul on the CPU).
`state_dict` uses bitsandbytes' keys (`weight`, `weight.absmax`, `weight.quant_map`, ...,
`weight.quant_state.bitsandbytes__nf4`, `bias`), so checkpoints move both ways.
"""
import math
from typing import Optional

import torch
from torch import nn

from qlora_fast.functional.lora import matmul_4bit
from qlora_fast.functional.quant import dequantize_4bit, quantize_4bit
from qlora_fast.quant_state import FLOAT_DTYPES, QuantState

__all__ = ["Linear4bit"]


class Linear4bit(nn.Module):
    """y = x @ W^T + b with W held in 4 bits.

    in_features, out_features, bias: as `nn.Linear`; the fresh weight gets nn.Linear's init and is
    quantized at once. quant_type, blocksize, compress_statistics: see `quantize_4bit`.
    compute_dtype: dtype of the dequantized weight and the matmul (default: the weight's original
    dtype). Inputs are cast to it and the output is cast back to the input's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        quant_type: str = "nf4",
        blocksize: int = 64,
        compress_statistics: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
        device=None,
    ):
        super().__init__()
        _check_compute_dtype(compute_dtype)
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        weight = torch.empty(out_features, in_features, device=device)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        bias_tensor = None
        if bias:
            bound = 1 / math.sqrt(in_features)
            bias_tensor = torch.empty(out_features, device=device).uniform_(-bound, bound)
        self._set_weight(weight, quant_type, blocksize, compress_statistics)
        self.bias = None if bias_tensor is None else nn.Parameter(bias_tensor)
        self.compute_dtype = compute_dtype if compute_dtype is not None else weight.dtype

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = 64,
        compress_statistics: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
    ) -> "Linear4bit":
        """Quantize an `nn.Linear` (its weight dtype becomes the default compute dtype)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        _check_compute_dtype(compute_dtype)
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        with torch.no_grad():
            module._set_weight(linear.weight.detach(), quant_type, blocksize, compress_statistics)
            module.bias = (
                None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), linear.bias.requires_grad)
            )
        module.compute_dtype = compute_dtype if compute_dtype is not None else linear.weight.dtype
        return module

    @classmethod
    def from_quantized(
        cls,
        packed: torch.Tensor,
        quant_state: QuantState,
        bias: Optional[torch.Tensor] = None,
        compute_dtype: Optional[torch.dtype] = None,
    ) -> "Linear4bit":
        """Wrap already-quantized state (e.g. from a bitsandbytes checkpoint) without requantizing.

        The state is validated against `packed` here, once (sizes, dtypes, 2-D shape); raises
        ValueError/TypeError naming the bad field.
        """
        if len(quant_state.shape) != 2:
            raise ValueError(f"quant_state.shape must be (out_features, in_features), got {tuple(quant_state.shape)}")
        _check_compute_dtype(compute_dtype)
        packed = packed.detach()
        quant_state.validate(packed)
        if bias is not None and tuple(bias.shape) != (int(quant_state.shape[0]),):
            raise ValueError(f"bias must be ({int(quant_state.shape[0])},), got {tuple(bias.shape)}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.out_features, module.in_features = (int(s) for s in quant_state.shape)
        module.weight = nn.Parameter(packed, requires_grad=False)
        module.quant_state = quant_state
        module.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        module.compute_dtype = compute_dtype if compute_dtype is not None else quant_state.dtype
        return module

    @classmethod
    def from_state_dict(
        cls, state_dict: dict, prefix: str = "", compute_dtype: Optional[torch.dtype] = None
    ) -> "Linear4bit":
        """Build from a bitsandbytes-format state dict (keys `<prefix>weight`, `<prefix>weight.absmax`, ...).

        Every entry is checked before anything is built; raises ValueError/TypeError naming the key.
        """
        key = prefix + "weight"
        if key not in state_dict:
            raise ValueError(f"state_dict is missing {key!r}")
        quant_state = _quant_state_from(state_dict, prefix)
        packed = _packed_from(state_dict[key], quant_state, key)
        return cls.from_quantized(packed, quant_state, state_dict.get(prefix + "bias"), compute_dtype)

    def _set_weight(self, weight, quant_type, blocksize, compress_statistics):
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        packed, self.quant_state = quantize_4bit(weight, blocksize, quant_type, compress_statistics)
        self.weight = nn.Parameter(packed, requires_grad=False)

    def set_quantized(self, packed: torch.Tensor, quant_state: QuantState) -> None:
        """Take new 4-bit weights of this module's shape (e.g. `QLoRALinear.merge` requantizing W +
        B A): `packed` becomes the frozen weight as it is, `quant_state` the state. Validated here;
        raises ValueError/TypeError naming the bad field."""
        if tuple(quant_state.shape) != (self.out_features, self.in_features):
            raise ValueError(f"quant_state.shape must be ({self.out_features}, {self.in_features}), "
                             f"got {tuple(quant_state.shape)}")
        quant_state.validate(packed)
        self.weight = nn.Parameter(packed.detach(), requires_grad=False)
        self.quant_state = quant_state

    @property
    def quant_type(self) -> str:
        return self.quant_state.quant_type

    @property
    def blocksize(self) -> int:
        return self.quant_state.blocksize

    def dequantize_weight(self) -> torch.Tensor:
        """The (out_features, in_features) weight in the compute dtype."""
        return dequantize_4bit(self.weight, self.quant_state, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features), floating point -> (..., out_features) in x's dtype, computed in
        `compute_dtype`. Raises TypeError for a non-float x, ValueError for a wrong last dim."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            # an int input would be cast to float and the output cast back: truncated, silently
            raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        # The fused 4-bit matmul: on CUDA the decode kernel for few rows, a dequantize workspace
        # plus the vendor GEMM for many; on the CPU dequantize + matmul (the reference).
        # matmul_4bit checks x's last dimension; casts are skipped when the dtype already matches.
        dtype = self.compute_dtype
        bias = self.bias
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        out = matmul_4bit(x if x.dtype == dtype else x.to(dtype), self.weight, self.quant_state, bias)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, nested={self.quant_state.nested}, "
            f"compute_dtype={self.compute_dtype}"
        )

    def _apply(self, fn, recurse=True):
        # nn.Module._apply moves the packed weight and the bias; the quant state is not a
        # parameter or buffer, so it follows the weight here (dtype casts leave uint8 alone).
        super()._apply(fn, recurse)
        if self.quant_state.device != self.weight.device:
            self.quant_state = self.quant_state.to(self.weight.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        weight = self.weight if keep_vars else self.weight.detach()
        destination[prefix + "weight"] = weight
        for key, value in self.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + key] = value
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Everything is read and checked before anything is assigned: a failed load (ValueError or
        # TypeError naming the key for corrupt entries, a size mismatch in error_msgs) leaves the
        # module as it was.
        # load_state_dict(..., assign=True), as nn.Module: take the loaded tensors themselves (and
        # their device) instead of copying into ours, e.g. to fill a module built on the meta device
        assign = local_metadata.get("assign_to_params_buffers", False)
        weight_key, bias_key = prefix + "weight", prefix + "bias"
        quant_keys = [k for k in state_dict if k.startswith(weight_key + ".")]
        errors, new = [], {}
        if weight_key not in state_dict:
            missing_keys.append(weight_key)
            unexpected_keys.extend(quant_keys)
        else:
            device = getattr(state_dict[weight_key], "device", None) if assign else self.weight.device
            quant_state = _quant_state_from(state_dict, prefix, device)
            if quant_state.shape != torch.Size([self.out_features, self.in_features]):
                errors.append(
                    f"size mismatch for {weight_key}: quant state shape {tuple(quant_state.shape)}, "
                    f"module is ({self.out_features}, {self.in_features})"
                )
            else:
                packed = _packed_from(state_dict[weight_key], quant_state, weight_key).detach()
                new["weight"] = nn.Parameter(packed if assign else packed.to(device).clone(), requires_grad=False)
                new["quant_state"] = quant_state
        if self.bias is not None:
            if bias_key in state_dict:
                bias = state_dict[bias_key]
                if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != tuple(self.bias.shape):
                    errors.append(
                        f"size mismatch for {bias_key}: copying a param with shape "
                        f"{tuple(getattr(bias, 'shape', ()))}, the shape in current model is {tuple(self.bias.shape)}"
                    )
                else:
                    new["bias"] = bias
            else:
                missing_keys.append(bias_key)
        elif bias_key in state_dict:
            unexpected_keys.append(bias_key)
        if strict:
            known = {weight_key, bias_key, *quant_keys}
            unexpected_keys.extend(
                k for k in state_dict if k.startswith(prefix) and k not in known and "." not in k[len(prefix) :]
            )
        if errors:
            error_msgs.extend(errors)
            return
        if "weight" in new:
            self.weight, self.quant_state = new["weight"], new["quant_state"]
        if "bias" in new and assign:
            self.bias = nn.Parameter(new["bias"].detach(), self.bias.requires_grad)
        elif "bias" in new:
            with torch.no_grad():
                self.bias.copy_(new["bias"])


def _quant_state_from(state_dict: dict, prefix: str, device=None, name: str = "weight", dims: int = 2) -> QuantState:
    """The QuantState stored under `<prefix><name>.*`, of a `dims`-D weight (2: a Linear4bit's; 3:
    fused experts'), fully checked (`QuantState.from_dict`); a ValueError/TypeError names the missing
    or bad key."""
    base = prefix + name + "."
    entries = {k[len(base):]: v for k, v in state_dict.items() if k.startswith(base)}
    for key in ("absmax", "quant_map"):
        if key not in entries:
            raise ValueError(f"state_dict is missing the quant key {base + key!r}")
    if not any(k.startswith("quant_state.bitsandbytes__") for k in entries):
        raise ValueError(f"state_dict is missing the quant key {base + 'quant_state.bitsandbytes__<nf4|fp4>'!r}")
    if "nested_absmax" in entries and "nested_quant_map" not in entries:
        raise ValueError(f"state_dict is missing the quant key {base + 'nested_quant_map'!r}")
    state = QuantState.from_dict(entries, device=device, where=base)
    if len(state.shape) != dims:
        what = "(out_features, in_features)" if dims == 2 else "(experts, out_features, in_features)"
        raise ValueError(f"{base}quant_state shape must be {what}, got {tuple(state.shape)}")
    return state


def _packed_from(weight, quant_state: QuantState, key: str) -> torch.Tensor:
    """The packed uint8 bytes of a checkpoint's `weight` entry (bitsandbytes' quant_storage may be
    any dtype: int8, float16, bfloat16, float32, ...; its bytes are the packed nibbles), checked
    against the quant state."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{key} must be a tensor, got {type(weight).__name__}")
    if weight.dtype != torch.bool:  # a bool tensor is a mask, not storage
        weight = weight.detach().contiguous().view(torch.uint8)
    quant_state.validate(weight, where=key + ".")
    return weight


def _check_compute_dtype(compute_dtype):
    if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
        raise TypeError(f"compute_dtype must be float32, float16, bfloat16 or None, got {compute_dtype}")
