"""`replace_linear`: convert a model's linear layers in place to 4-bit and/or LoRA modules.

Works on any `nn.Module` tree, Hugging Face transformers models included: `nn.Linear` layers and
GPT-2 style `Conv1D` layers (weight stored transposed, (in, out)) are swapped for `Linear4bit`,
`QLoRALinear` or `LoRALinear`. Modules that are already converted are left alone, so calling it
twice is harmless.
"""
from typing import Iterable, Optional, Union

import torch
from torch import nn

from qlora_fast.nn.linear4bit import Linear4bit

__all__ = ["replace_linear"]


def _as_names(value, what: str) -> tuple:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        names = tuple(value)
    except TypeError:
        raise TypeError(f"{what} must be a string or an iterable of strings, got {type(value).__name__}") from None
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"{what} must hold strings, got {names!r}")
    return names


def _matches(full_name: str, patterns: tuple) -> bool:
    """A pattern matches a module whose full dotted name equals it or ends with '.' + pattern."""
    return any(full_name == p or full_name.endswith("." + p) for p in patterns)


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, detected by shape so transformers need not be imported
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None and module.weight.dim() == 2


def _conv1d_to_linear(conv: nn.Module) -> nn.Linear:
    """The nn.Linear computing the same function as a transformers Conv1D (y = x W + b, W (in, out))."""
    in_features, out_features = conv.weight.shape
    linear = nn.Linear(in_features, out_features, bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


def replace_linear(
    model: nn.Module,
    quant_type: Optional[str] = "nf4",
    skip: Union[str, Iterable[str], None] = ("lm_head",),
    target: Union[str, Iterable[str], None] = None,
    blocksize: int = 64,
    compress_statistics: bool = True,
    compute_dtype: Optional[torch.dtype] = None,
    lora_r: Optional[int] = None,
    lora_alpha: Optional[float] = None,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
) -> nn.Module:
    """Convert linear layers of `model` in place and return `model`.

    quant_type: "nf4" or "fp4" to store the base weight in 4 bits (`Linear4bit`), or None to keep it
    in full precision (only meaningful with `lora_r`).
    skip: module names (full dotted names or their trailing part, e.g. "lm_head") left untouched.
    target: if given, only modules whose name matches one of these (e.g. ("q_proj", "v_proj"))
    are converted. blocksize, compress_statistics, compute_dtype: passed to `Linear4bit`.
    lora_r: when set, wrap each converted layer with a LoRA adapter of this rank (`QLoRALinear`
    on a 4-bit base, `LoRALinear` on a full-precision one); lora_alpha defaults to 2 * lora_r.
    With lora_r, every other parameter of the model is frozen (only the adapters train).
    Raises ValueError when there is nothing to do (quant_type and lora_r both None) or when
    `target` matches no layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if quant_type is None and lora_r is None:
        raise ValueError("replace_linear needs quant_type or lora_r (both are None: nothing to do)")
    skip = _as_names(skip, "skip")
    target = _as_names(target, "target")
    if lora_r is not None and lora_alpha is None:
        lora_alpha = 2 * lora_r

    def convert(linear: nn.Linear) -> nn.Module:
        # ---- LoRA branch (qlora_fast.nn.lora, issue 3) ----
        if lora_r is not None:
            from qlora_fast.nn.lora import LoRALinear, QLoRALinear

            lora_args = dict(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, use_rslora=use_rslora)
            if quant_type is None:
                return LoRALinear.from_linear(linear, **lora_args)
            return QLoRALinear.from_linear(
                linear, quant_type=quant_type, blocksize=blocksize,
                compress_statistics=compress_statistics, compute_dtype=compute_dtype, **lora_args,
            )
        # ---- quantization only ----
        return Linear4bit.from_linear(
            linear, quant_type=quant_type, blocksize=blocksize,
            compress_statistics=compress_statistics, compute_dtype=compute_dtype,
        )

    converted = []

    def walk(parent: nn.Module, prefix: str):
        for name, child in list(parent.named_children()):
            full_name = f"{prefix}.{name}" if prefix else name
            if _is_converted(child):
                continue
            is_linear = isinstance(child, nn.Linear) or _is_conv1d(child)
            if is_linear and not _matches(full_name, skip) and (not target or _matches(full_name, target)):
                linear = child if isinstance(child, nn.Linear) else _conv1d_to_linear(child)
                setattr(parent, name, convert(linear))
                converted.append(full_name)
            elif not is_linear:
                walk(child, full_name)

    walk(model, "")
    if target and not converted:
        raise ValueError(f"target {target!r} matched no nn.Linear or Conv1D layer of the model")
    if lora_r is not None:
        # as PEFT does: only the adapters train (embeddings, norms, lm_head are frozen too)
        from qlora_fast.nn.lora import mark_only_lora_as_trainable

        mark_only_lora_as_trainable(model)
    return model


def _is_converted(module: nn.Module) -> bool:
    if isinstance(module, Linear4bit):
        return True
    try:
        from qlora_fast.nn.lora import LoRALinear
    except ImportError:
        return False
    return isinstance(module, LoRALinear)
