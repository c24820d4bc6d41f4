"""LoRA adapters on a frozen base: `LoRALinear` (nn.Linear base), `QLoRALinear` (4-bit base).

y = base(x) + scaling * dropout(x) A^T B^T, with A (r, in) Kaiming-uniform and B (out, r) zero at
start (so a fresh adapter leaves the model unchanged), scaling = alpha / r, or alpha / sqrt(r)
with rsLoRA. Only A and B are trainable; the base (weight and bias) is frozen. Both run through
`qlora_fast.functional.lora_linear` (one fused op for base + adapter, forward and backward).

`disable_adapter(model)` (and the method of the same name on each module) turns adapters off
inside a `with` block: the GRPO reference model is the same model with its adapters off.
"""
import contextlib
import dataclasses
import math

import torch
from torch import nn

from qlora_fast.functional.lora import lora_linear
from qlora_fast.utils import renamed_kwargs

_RENAMED = {"alpha": "lora_alpha", "dropout": "lora_dropout"}  # the names before PEFT's

__all__ = ["LoRALinear", "QLoRALinear", "disable_adapter", "mark_only_lora_as_trainable", "lora_modules"]


def _check_hyperparameters(r, alpha, dropout, in_features, out_features):
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an int, got {type(r).__name__}")
    if not 1 <= r <= min(in_features, out_features):
        raise ValueError(
            f"r must be in [1, min(in_features, out_features)] = [1, {min(in_features, out_features)}], got {r}"
        )
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha < float("inf"):
        raise ValueError(f"lora_alpha must be a finite positive number, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {dropout!r}")


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable rank-r adapter.

    base: the nn.Linear to wrap (frozen in place, kept as `.base`). r: rank, 1 <= r <=
    min(in, out). lora_alpha: scaling numerator. lora_dropout: probability of dropout on the
    adapter's input (training only). use_rslora: scaling alpha / sqrt(r) instead of alpha / r.
    (PEFT's argument names, as `replace_linear`'s; `alpha=` / `dropout=` still work for one release
    with a DeprecationWarning. The module keeps them as `.alpha` and `.dropout`.)
    The adapter is float32 (float64 for a float64 base) and cast to the compute dtype in forward,
    so a bf16/fp16 base trains fp32 adapters. Input: (..., in) in the base's dtype (or any dtype
    under autocast). Raises ValueError/TypeError for a bad base or hyperparameters.
    """

    @renamed_kwargs("LoRALinear", _RENAMED)
    def __init__(self, base: nn.Module, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        alpha, dropout = lora_alpha, lora_dropout
        self._check_base(base)
        in_features, out_features = base.in_features, base.out_features
        _check_hyperparameters(r, alpha, dropout, in_features, out_features)
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, float(dropout), bool(use_rslora)
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        weight = base.weight
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=weight.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=weight.device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and PEFT
        self.merged = False
        self.adapter_enabled = True

    # As PEFT's LoRA layers: model code reads its layers' weight (T5 casts to wo.weight.dtype).
    # Properties, not attributes: the state_dict keys stay the base's.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def __setattr__(self, name, value):
        # transformers ties and resizes an output layer by assigning its `weight`: that goes to
        # the base (nn.Module would refuse a Parameter under a property's name)
        if name in ("weight", "bias") and "base" in self._modules:
            setattr(self.base, name, value)
            return
        super().__setattr__(name, value)

    @staticmethod
    def _check_base(base):
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")

    @classmethod
    @renamed_kwargs("LoRALinear.from_linear", _RENAMED)
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                    use_rslora: bool = False) -> "LoRALinear":
        """Wrap `linear` (frozen, not copied) with a fresh adapter."""
        return cls(linear, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora)

    # ------------------------------------------------------------ forward
    def _lora_call(self, x, dtype):
        bias = self.base.bias
        return lora_linear(
            x, self.base.weight, self.lora_A.to(dtype), self.lora_B.to(dtype), self.scaling,
            bias=None if bias is None else bias.to(dtype), dropout_p=self.dropout, training=self.training,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0:
            raise ValueError("x must have at least 1 dimension (..., in_features), got a 0-d tensor")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have last dimension in_features={self.in_features}, got shape {tuple(x.shape)}")
        if self.merged or not self.adapter_enabled:
            return self.base(x)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return self._lora_call(x, dtype)

    # ------------------------------------------------------------ merge
    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in float32, (out_features, in_features), detached: what merge() adds to W."""
        return self._delta(torch.float32)

    def _delta(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.lora_B.detach().to(dtype) @ self.lora_A.detach().to(dtype)) * self.scaling

    def _merge_dtype(self) -> torch.dtype:
        # float32, float64 over a float64 base: float32 math would drop its low bits (PEFT keeps them)
        return torch.promote_types(self.base.weight.dtype, torch.float32)

    def _merged_weight(self) -> torch.Tensor:
        """merged_weight() in the merge's dtype (float64 over a float64 base), a fresh tensor."""
        dtype = self._merge_dtype()
        weight = self.base.weight.detach().to(dtype, copy=True)
        return weight if self.merged else weight.add_(self._delta(dtype))

    def base_weight(self) -> torch.Tensor:
        """A float32 copy of the base weight W, (out_features, in_features) (merged or not)."""
        return self.base.weight.detach().to(torch.float32, copy=True)

    def merged_weight(self) -> torch.Tensor:
        """W + scaling * B A in float32, (out_features, in_features): the dense weight of this layer
        with its adapter folded in (W itself once merged, the adapter being in it already)."""
        return self.base_weight() if self.merged else self.base_weight() + self.delta_weight()

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight: W <- W + scaling * B A (float32 math, float64 over a
        float64 base, rounded once to W's dtype).

        Forward then costs one plain matmul. Raises RuntimeError when already merged.
        """
        if self.merged:
            raise RuntimeError("adapter is already merged; call unmerge() before merging again")
        self.base.weight.copy_(self._merged_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge()`: W <- W - scaling * B A (exact in float32/float64 up to rounding;
        bf16/fp16 lose the low bits twice). Raises RuntimeError when not merged."""
        if not self.merged:
            raise RuntimeError("adapter is not merged; nothing to unmerge")
        weight, dtype = self.base.weight, self._merge_dtype()
        weight.copy_(weight.to(dtype) - self._delta(dtype))
        self.merged = False

    # ------------------------------------------------------------ enable / disable
    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside the block this module computes base(x) only. Raises RuntimeError when merged."""
        if self.merged:
            raise RuntimeError("cannot disable a merged adapter; call unmerge() first")
        previous = self.adapter_enabled
        self.adapter_enabled = False
        try:
            yield self
        finally:
            self.adapter_enabled = previous

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha}, "
                f"scaling={self.scaling:.4g}, dropout={self.dropout}, merged={self.merged}")


class QLoRALinear(LoRALinear):
    """A frozen 4-bit `Linear4bit` base plus a trainable rank-r adapter (QLoRA).

    Arguments as `LoRALinear`, with `base` a `qlora_fast.nn.Linear4bit`. The input is cast to the
    base's compute dtype and the output back to the input's dtype (as `Linear4bit` does), except
    under autocast where the autocast dtype is used and kept.

    merge() on a 4-bit base dequantizes W to float32, adds scaling * B A and quantizes the sum
    again with the base's settings. That requantization adds up to half a quantization step of
    error per element (like quantizing any weight), so merged outputs differ slightly from the
    unmerged base + adapter, and unmerge() (dequantize, subtract, requantize) cannot recover the
    original 4-bit codes exactly: after merge + unmerge the weight carries up to two steps of
    requantization error. Keep the unmerged module for training; merge for export/inference.
    """

    @staticmethod
    def _check_base(base):
        from qlora_fast.nn.linear4bit import Linear4bit

        if not isinstance(base, Linear4bit):
            raise TypeError(f"base must be a qlora_fast.nn.Linear4bit, got {type(base).__name__}")

    @classmethod
    @renamed_kwargs("QLoRALinear.from_linear", _RENAMED)
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                    use_rslora: bool = False, quant_type: str = "nf4", blocksize: int = 64,
                    compress_statistics: bool = True, compute_dtype=None) -> "QLoRALinear":
        """Quantize `linear` into a Linear4bit base and wrap it with a fresh adapter."""
        from qlora_fast.nn.linear4bit import Linear4bit

        base = Linear4bit.from_linear(linear, quant_type=quant_type, blocksize=blocksize,
                                      compress_statistics=compress_statistics, compute_dtype=compute_dtype)
        return cls(base, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # lora_linear and Linear4bit check x's last dimension; the dtype is checked here because an
        # integer x would be cast to the compute dtype and the output truncated back to integers
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if self.merged or not self.adapter_enabled:
            return self.base(x)
        if torch.is_autocast_enabled(x.device.type):
            return self._lora_call(x, torch.get_autocast_dtype(x.device.type))
        dtype = self.base.compute_dtype
        return self._lora_call(x.to(dtype), dtype).to(x.dtype)

    def _lora_call(self, x, dtype):
        bias = self.base.bias
        return lora_linear(
            x, self.base.weight, self.lora_A.to(dtype), self.lora_B.to(dtype), self.scaling,
            bias=None if bias is None else bias.to(dtype), quant_state=self.base.quant_state,
            dropout_p=self.dropout, training=self.training,
        )

    @torch.no_grad()
    def _requantize(self, weight: torch.Tensor) -> None:
        from qlora_fast.functional.quant import quantize_4bit

        state, device = self.base.quant_state, self.base.weight.device
        packed, new_state = quantize_4bit(weight, state.blocksize, state.quant_type, state.nested)
        # through the base's own setter: a ShardableLinear4bit (FSDP) keeps its weight in `units`
        self.base.set_quantized(packed.to(device), dataclasses.replace(new_state, dtype=state.dtype).to(device))

    def _merged_weight(self) -> torch.Tensor:
        return self.merged_weight()  # a 4-bit base decodes in float32

    def base_weight(self) -> torch.Tensor:
        """The 4-bit base weight dequantized to float32, (out_features, in_features)."""
        from qlora_fast.functional.quant import dequantize_4bit

        return dequantize_4bit(self.base.weight, self.base.quant_state, torch.float32)

    @torch.no_grad()
    def merge(self) -> None:
        """Requantize W + scaling * B A into the 4-bit base (see the class docstring for the error
        this adds). Raises RuntimeError when already merged."""
        if self.merged:
            raise RuntimeError("adapter is already merged; call unmerge() before merging again")
        self._requantize(self.merged_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Requantize W - scaling * B A; does not restore the original codes exactly (see the class
        docstring). Raises RuntimeError when not merged."""
        if not self.merged:
            raise RuntimeError("adapter is not merged; nothing to unmerge")
        self._requantize(self.base_weight() - self.delta_weight())
        self.merged = False


def lora_modules(model: nn.Module):
    """Every LoRALinear / QLoRALinear in `model` (including `model` itself)."""
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def check_unmerged(model: nn.Module, what: str) -> None:
    """Refuse to load trained LoRA weights (`what`) into merged layers: the loaded adapter would not
    reach their output, and unmerging would subtract it from the base instead of the merged one."""
    merged = [n for n, m in model.named_modules() if isinstance(m, LoRALinear) and m.merged]
    if merged:
        raise ValueError(f"cannot load {what} into merged LoRA layers ({len(merged)}, e.g. {merged[0]!r}); "
                         "unmerge() them first")


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Turn off every LoRA adapter in `model` inside the block (the model computes its base), fused
    experts' adapters (`ExpertLoRA`) included.

    Raises RuntimeError, changing nothing, when any adapter is merged.
    """
    from qlora_fast.nn.experts_lora import experts_lora_modules

    modules = lora_modules(model) + experts_lora_modules(model)
    merged = [m for m in modules if m.merged]
    if merged:
        raise RuntimeError(f"cannot disable merged adapters ({len(merged)} merged); call unmerge() first")
    previous = [m.adapter_enabled for m in modules]
    for m in modules:
        m.adapter_enabled = False
    try:
        yield model
    finally:
        for m, state in zip(modules, previous):
            m.adapter_enabled = state


def mark_only_lora_as_trainable(model: nn.Module) -> nn.Module:
    """Freeze every parameter of `model` except the LoRA adapters (lora_A, lora_B, fused experts'
    ones included); returns model."""
    from qlora_fast.nn.experts_lora import experts_lora_modules

    adapter = {id(p) for m in lora_modules(model) + experts_lora_modules(model) for p in (m.lora_A, m.lora_B)}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapter)
    return model
