"""`replace_linear`: convert a model's linear layers in place to 4-bit and/or LoRA modules.

Works on any `nn.Module` tree, Hugging Face transformers models included: `nn.Linear` layers and
GPT-2 style `Conv1D` layers (weight stored transposed, (in, out)) are swapped for `Linear4bit`,
`QLoRALinear` or `LoRALinear`; a converted Conv1D remembers its class (`conv1d_class`) so a merge
can give it back. bitsandbytes `Linear4bit` layers (a model loaded with
`BitsAndBytesConfig(load_in_4bit=True)`) are adopted as they are: their packed bytes and
statistics become our `Linear4bit` without requantizing. Any other already-quantized layer is a
ValueError. A layer that is already ours is left alone (calling it twice is harmless), but a
4-bit layer without an adapter gets one when `lora_r` is given.
"""
from typing import Iterable, Optional, Union

import torch
from torch import nn

from qlora_fast.nn.linear4bit import Linear4bit

__all__ = ["replace_linear", "default_lora_targets", "linear_layer_names", "adopt_bnb_4bit", "merge_linear_layers"]

ALL_LINEAR = "all-linear"
# Per architecture, the projections LoRA usually targets (the PEFT/QLoRA choice).
_ARCH_TARGETS = (
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),  # Llama, Mistral, Qwen, ...
    ("c_attn", "c_proj", "c_fc"),  # GPT-2
    ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),  # GPT-NeoX, Falcon
)


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


def _is_bnb_4bit(module: nn.Module) -> bool:
    """A bitsandbytes `Linear4bit` (it subclasses nn.Linear, but its weight is packed bytes)."""
    return type(module).__module__.startswith("bitsandbytes") and getattr(getattr(module, "weight", None), "quant_state", None) is not None


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _check_not_quantized(module: nn.Module, name: str) -> None:
    """ValueError for a linear layer whose weight is already quantized in a format we cannot adopt."""
    weight = getattr(module, "weight", None)
    if type(module).__module__.startswith("bitsandbytes") or (weight is not None and not weight.is_floating_point()):
        raise ValueError(f"layer {name!r} is already quantized ({type(module).__module__}.{type(module).__name__}, weight "
                         f"{None if weight is None else weight.dtype}); only full-precision layers and bitsandbytes 4-bit "
                         "(nf4/fp4) layers can be converted")


def _conv1d_to_linear(conv: nn.Module) -> nn.Linear:
    """The nn.Linear computing the same function as a transformers Conv1D (y = x W + b, W (in, out))."""
    in_features, out_features = conv.weight.shape
    linear = nn.Linear(in_features, out_features, bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


def from_bnb_4bit(module: nn.Module, compute_dtype: Optional[torch.dtype] = None) -> Linear4bit:
    """Our `Linear4bit` holding a bitsandbytes `Linear4bit`'s packed weight and statistics as they
    are (no requantization: the same bytes, so the same dequantized weight)."""
    state = {}
    module._save_to_state_dict(state, "", keep_vars=False)
    dtype = compute_dtype or getattr(module, "compute_dtype", None)
    return Linear4bit.from_state_dict({k: v.detach() for k, v in state.items()}, compute_dtype=dtype)


def adopt_bnb_4bit(model: nn.Module) -> nn.Module:
    """Swap every bitsandbytes 4-bit layer of `model` for our `Linear4bit` with the same bytes
    (in place, all built before any swap); the model forgets its transformers quantizer, which no
    longer owns its layers. Returns `model`."""
    plan = [(name, from_bnb_4bit(m)) for name, m in model.named_modules() if _is_bnb_4bit(m)]
    for name, new in plan:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    if plan and "hf_quantizer" in model.__dict__:
        model.hf_quantizer = None
    return model


def as_linear(module: nn.Module) -> Union[nn.Linear, Linear4bit]:
    """A layer we can wrap: our Linear4bit for a bitsandbytes 4-bit layer, an nn.Linear for a
    Conv1D (remembering its class in `conv1d_class`), the layer itself otherwise."""
    if _is_bnb_4bit(module):
        return from_bnb_4bit(module)
    if _is_conv1d(module):
        linear = _conv1d_to_linear(module)
        linear.conv1d_class = type(module)
        return linear
    return module


def linear_layer_names(model: nn.Module, include_output: bool = False):
    """Full dotted names of the linear layers (nn.Linear, Conv1D, bitsandbytes / our 4-bit, LoRA
    wrappers), outermost only; without `include_output`, the output layer (lm_head) is left out."""
    from qlora_fast.nn.lora import LoRALinear

    output = getattr(model, "get_output_embeddings", lambda: None)()
    names = []

    def walk(module, prefix):
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, (LoRALinear, Linear4bit)) or _is_linear(child):
                if include_output or not (child is output or name == "lm_head"):
                    names.append(full)
            else:
                walk(child, full)

    walk(model, "")
    return names


def default_lora_targets(model: nn.Module):
    """The usual LoRA targets of `model`'s architecture: the attention and MLP projections present
    among the known names (Llama-style, GPT-2, GPT-NeoX), else "all-linear"."""
    short = {n.split(".")[-1] for n in linear_layer_names(model)}
    for names in _ARCH_TARGETS:
        present = [n for n in names if n in short]
        if present:
            return present
    return ALL_LINEAR


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
    A layer already in 4 bits (ours, or bitsandbytes' adopted as is) keeps its bytes and gets the
    adapter. With lora_r, every other parameter of the model is frozen (only the adapters train).

    All or nothing: every new module is built before any is swapped in, so an error leaves the
    model as it was. Raises ValueError when there is nothing to do (quant_type and lora_r both
    None), when `target` matches no layer, when `lora_r` is given but every matching layer already
    has an adapter (none would be added), or for a layer quantized in another format.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if quant_type is None and lora_r is None:
        raise ValueError("replace_linear needs quant_type or lora_r (both are None: nothing to do)")
    if quant_type not in (None, "nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4', 'fp4' or None, got {quant_type!r}")
    skip = _as_names(skip, "skip")
    target = _as_names(target, "target")
    if lora_r is not None and lora_alpha is None:
        lora_alpha = 2 * lora_r
    from qlora_fast.nn.lora import LoRALinear, QLoRALinear

    def convert(layer: nn.Module) -> Optional[nn.Module]:
        """The replacement of `layer`, or None to leave it as it is."""
        if isinstance(layer, LoRALinear):
            return None
        quantized = isinstance(layer, Linear4bit) or _is_bnb_4bit(layer)
        if quantized and lora_r is None and isinstance(layer, Linear4bit):
            return None
        layer = as_linear(layer)
        if lora_r is not None:
            lora_args = dict(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, use_rslora=use_rslora)
            if isinstance(layer, Linear4bit):
                wrapped = QLoRALinear(layer, **lora_args)
            elif quant_type is None:
                wrapped = LoRALinear.from_linear(layer, **lora_args)
            else:
                wrapped = QLoRALinear.from_linear(layer, quant_type=quant_type, blocksize=blocksize,
                                                  compress_statistics=compress_statistics, compute_dtype=compute_dtype, **lora_args)
        elif isinstance(layer, Linear4bit):
            wrapped = layer
        else:
            wrapped = Linear4bit.from_linear(layer, quant_type=quant_type, blocksize=blocksize,
                                             compress_statistics=compress_statistics, compute_dtype=compute_dtype)
        if getattr(layer, "conv1d_class", None) is not None:
            (wrapped.base if isinstance(wrapped, LoRALinear) else wrapped).conv1d_class = layer.conv1d_class
        return wrapped

    matched, plan = [], []  # plan: (parent, attribute, new module), all built before any swap
    for full_name in linear_layer_names(model, include_output=True):
        if _matches(full_name, skip) or (target and not _matches(full_name, target)):
            continue
        parent_name, _, child_name = full_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child_name)
        if not (isinstance(layer, (LoRALinear, Linear4bit)) or _is_bnb_4bit(layer)):
            _check_not_quantized(layer, full_name)
        matched.append(full_name)
        new = convert(layer)
        if new is not None:
            plan.append((parent, child_name, new))
    if target and not matched:
        raise ValueError(f"target {target!r} matched no nn.Linear or Conv1D layer of the model")
    if lora_r is not None and matched and not plan:
        raise ValueError(f"every matching layer already has a LoRA adapter ({len(matched)} layers, e.g. {matched[0]!r}): "
                         "no adapter added; use the model as it is, or unload/merge its adapters first")
    for parent, child_name, new in plan:
        setattr(parent, child_name, new)
    if lora_r is not None:
        # as PEFT does: only the adapters train (embeddings, norms, lm_head are frozen too)
        from qlora_fast.nn.lora import mark_only_lora_as_trainable

        mark_only_lora_as_trainable(model)
    return model


# ---------------------------------------------------------------------------- merging back
def _dense(weight: torch.Tensor, bias: Optional[torch.Tensor], conv1d_class, dtype: torch.dtype) -> nn.Module:
    """A plain layer computing x W^T + b for `weight` (out, in): an nn.Linear, or the layer's
    original Conv1D class (weight stored (in, out)) when it was one."""
    out_features, in_features = weight.shape
    if conv1d_class is not None:
        layer = conv1d_class(out_features, in_features)  # Conv1D(nf, nx) holds weight (nx, nf)
        layer.weight = nn.Parameter(weight.t().to(dtype).contiguous(), requires_grad=False)
    else:
        layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
        layer.weight = nn.Parameter(weight.to(dtype).contiguous(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(device=weight.device, dtype=dtype).clone(), requires_grad=False)
    elif conv1d_class is not None:
        layer.bias = nn.Parameter(torch.zeros(out_features, device=weight.device, dtype=dtype), requires_grad=False)
    return layer


def _dequantized(layer: Linear4bit) -> torch.Tensor:
    from qlora_fast.functional.quant import dequantize_4bit

    return dequantize_4bit(layer.weight, layer.quant_state, torch.float32)


@torch.no_grad()
def merge_linear_layers(model: nn.Module, keep_4bit: bool = False, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """In place, all or nothing: merge every LoRA adapter into its layer and, unless `keep_4bit`,
    turn every 4-bit layer (ours or bitsandbytes') back into a dense one in its original class
    (nn.Linear or Conv1D) and original dtype (or `dtype`). The model's transformers config is
    updated to match: `quantization_config` removed (dense), or set for bitsandbytes (keep_4bit).
    Returns `model`."""
    from qlora_fast.nn.lora import LoRALinear, QLoRALinear

    plan = []
    for name in linear_layer_names(model, include_output=True):
        layer = model.get_submodule(name)
        if isinstance(layer, QLoRALinear) and keep_4bit:
            new = layer.base
        elif isinstance(layer, QLoRALinear):
            base = layer.base
            weight = _dequantized(base) + (0 if layer.merged else layer._delta())
            new = _dense(weight, base.bias, getattr(base, "conv1d_class", None), dtype or base.quant_state.dtype)
        elif isinstance(layer, LoRALinear):
            base = layer.base
            weight = base.weight.float() + (0 if layer.merged else layer._delta())
            new = _dense(weight, base.bias, getattr(base, "conv1d_class", None), dtype or base.weight.dtype)
        elif keep_4bit:
            continue
        elif isinstance(layer, Linear4bit) or _is_bnb_4bit(layer):
            four = layer if isinstance(layer, Linear4bit) else from_bnb_4bit(layer)
            new = _dense(_dequantized(four), four.bias, getattr(layer, "conv1d_class", None), dtype or four.quant_state.dtype)
        else:
            continue
        plan.append((name, layer, new))
    config = _bnb_quantization_config(model) if keep_4bit else None
    for name, layer, new in plan:
        if isinstance(layer, QLoRALinear) and keep_4bit and not layer.merged:
            layer.merge()  # requantizes W + scaling B A into the 4-bit base
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    for p in model.parameters():
        p.requires_grad_(False)
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "to_dict"):  # a transformers model
        if keep_4bit and config is not None:
            hf_config.quantization_config = config
        elif not keep_4bit:
            if "quantization_config" in hf_config.__dict__:
                del hf_config.quantization_config
            for attr, value in (("hf_quantizer", None), ("is_loaded_in_4bit", False), ("is_quantized", False)):
                if attr in model.__dict__:
                    setattr(model, attr, value)
        if dtype is not None:
            hf_config.dtype = dtype
    return model


def _bnb_quantization_config(model: nn.Module):
    """The bitsandbytes `quantization_config` a transformers model with our 4-bit layers needs to
    reload through `from_pretrained` (None when nothing is in 4 bits). ValueError when the 4-bit
    layers mix settings bitsandbytes' config cannot express."""
    from qlora_fast.nn.lora import LoRALinear

    fours, dense = {}, []
    for name in linear_layer_names(model, include_output=True):
        layer = model.get_submodule(name)
        layer = layer.base if isinstance(layer, LoRALinear) else layer
        (fours.__setitem__(name, layer) if isinstance(layer, Linear4bit) else dense.append(name))
    if not fours:
        return None
    kinds = {(m.quant_type, bool(m.quant_state.nested), m.compute_dtype) for m in fours.values()}
    if len(kinds) > 1:
        raise ValueError(f"the 4-bit layers mix settings {sorted(map(str, kinds))}; a bitsandbytes quantization_config holds one")
    if any(getattr(m, "conv1d_class", None) is not None for m in fours.values()):
        raise ValueError("keeping 4 bits is not supported for Conv1D (GPT-2) layers; merge to a dense model (requantize=False)")
    quant_type, nested, compute_dtype = kinds.pop()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=nested,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=dense or None)
