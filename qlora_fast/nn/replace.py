"""The one LoRA/4-bit injector: which layers a target picks, how each kind of base layer is wrapped,
and the in-place swap. `replace_linear` and `qlora_fast.peft.PeftModel` both go through it.

Works on any `nn.Module` tree, Hugging Face transformers models included. The kinds of base layer
(`wrap_linear` decides for each, like PEFT's `tuners/lora/model.py`):
- `nn.Linear`: quantized to our `Linear4bit` and/or wrapped by `LoRALinear` / `QLoRALinear`;
- GPT-2 style `Conv1D` (weight stored transposed, (in, out)): converted to the `nn.Linear` computing
  the same function first (`conv1d_to_linear`), which remembers its class (`conv1d_class`) so a
  merge gives it back;
- bitsandbytes `Linear4bit` (a model loaded with `BitsAndBytesConfig(load_in_4bit=True)`): adopted
  as it is, its packed bytes and statistics becoming our `Linear4bit` without requantizing;
- our `Linear4bit`: kept, and given an adapter when `r` is set; a LoRA layer: left alone.
Any other already-quantized layer is a ValueError.
Fused MoE experts (transformers' 3-D `gate_up_proj`/`down_proj` parameters, Mixtral, Qwen-MoE,
OLMoE, ...) are not linear layers: when a model is quantized they become `Experts4bit`
(`fused_experts_names`); their 3-D weights get per-expert adapters only when named by PEFT's
`target_parameters` (`match_target_parameters`, `qlora_fast.nn.experts_lora`), never by a target module.

Targets read as PEFT's `target_modules` (`match_target_modules`): a list of names (a layer matches
when its full dotted name equals one or ends with "." + one), one string used as a regular
expression on the full name, or "all-linear".
"""
import re
import warnings
from typing import Iterable, Optional, Union

import torch
from torch import nn

from qlora_fast.nn.experts4bit import EXPERT_WEIGHTS, Experts4bit, is_fused_experts, unsupported_experts
from qlora_fast.nn.linear4bit import Linear4bit
from qlora_fast.quant_state import check_compress_statistics
from qlora_fast.utils import renamed_kwargs

__all__ = [
    "replace_linear", "match_target_modules", "wrap_linear", "default_lora_targets", "linear_layer_names",
    "keep_in_fp32_modules", "linear_features", "is_conv1d", "conv1d_to_linear", "adopt_bnb_4bit", "merge_linear_layers",
    "present_target_names", "fused_experts_names", "check_target_parameters", "match_target_parameters",
]

ALL_LINEAR = "all-linear"
# The attention and MLP projections by their usual names (Llama/Mistral/Qwen, Phi-3's fused ones,
# OPT/BART, GPT-2, GPT-NeoX/Falcon), in the order default targets are listed.
_PROJECTIONS = (
    "q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "gate_up_proj",
    "down_proj", "fc1", "fc2", "c_attn", "c_proj", "c_fc", "query_key_value", "dense", "dense_h_to_4h",
    "dense_4h_to_h",
)


# ---------------------------------------------------------------------------- kinds of base layer
def is_conv1d(module: nn.Module) -> bool:
    """Whether `module` is a transformers `Conv1D` (GPT-2: y = x W + b with W stored (in, out));
    recognised by name and shape so transformers need not be imported."""
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and weight is not None and weight.dim() == 2


def _is_bnb_4bit(module: nn.Module) -> bool:
    """A bitsandbytes `Linear4bit` (it subclasses nn.Linear, but its weight is packed bytes)."""
    weight = getattr(module, "weight", None)
    return type(module).__module__.startswith("bitsandbytes") and getattr(weight, "quant_state", None) is not None


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _check_not_quantized(module: nn.Module, name: str) -> None:
    """ValueError for a linear layer whose weight is already quantized in a format we cannot adopt."""
    weight = getattr(module, "weight", None)
    if type(module).__module__.startswith("bitsandbytes") or (weight is not None and not weight.is_floating_point()):
        raise ValueError(f"layer {name!r} is already quantized ({type(module).__module__}.{type(module).__name__}, "
                         f"weight {None if weight is None else weight.dtype}); only full-precision layers and "
                         "bitsandbytes 4-bit (nf4/fp4) layers can be converted")


def linear_features(layer: nn.Module) -> tuple:
    """(in_features, out_features) of a linear layer of any kind we wrap (a Conv1D keeps (in, out))."""
    if is_conv1d(layer):
        return tuple(layer.weight.shape)
    return layer.in_features, layer.out_features


def conv1d_to_linear(conv: nn.Module) -> nn.Linear:
    """The nn.Linear computing the same function as a transformers Conv1D (y = x W + b, W (in, out)),
    with the Conv1D's class in `conv1d_class` so `merge_linear_layers` can give a Conv1D back."""
    if not is_conv1d(conv):
        raise TypeError(f"conv must be a transformers Conv1D, got {type(conv).__name__}")
    in_features, out_features = conv.weight.shape
    linear = nn.Linear(in_features, out_features, bias=conv.bias is not None, device=conv.weight.device,
                       dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    linear.conv1d_class = type(conv)
    return linear


def from_bnb_4bit(module: nn.Module, compute_dtype: Optional[torch.dtype] = None) -> Linear4bit:
    """Our `Linear4bit` holding a bitsandbytes `Linear4bit`'s packed weight and statistics as they
    are (no requantization: the same bytes, so the same dequantized weight)."""
    state = {}
    module._save_to_state_dict(state, "", keep_vars=False)
    dtype = compute_dtype or getattr(module, "compute_dtype", None)
    return Linear4bit.from_state_dict({k: v.detach() for k, v in state.items()}, compute_dtype=dtype)


def _swap(model: nn.Module, plan) -> None:
    """Put each (full name, module) of `plan` in place."""
    for name, module in plan:
        model.set_submodule(name, module)


def adopt_bnb_4bit(model: nn.Module) -> nn.Module:
    """Swap every bitsandbytes 4-bit layer of `model` for our `Linear4bit` with the same bytes
    (in place, all built before any swap); the model forgets its transformers quantizer, which no
    longer owns its layers. Returns `model`."""
    plan = [(name, from_bnb_4bit(m)) for name, m in model.named_modules() if _is_bnb_4bit(m)]
    _swap(model, plan)
    if plan and "hf_quantizer" in model.__dict__:
        model.hf_quantizer = None
    return model


def as_linear(module: nn.Module) -> Union[nn.Linear, Linear4bit]:
    """A layer we can wrap: our Linear4bit for a bitsandbytes 4-bit layer, an nn.Linear for a
    Conv1D (remembering its class in `conv1d_class`), the layer itself otherwise."""
    if _is_bnb_4bit(module):
        return from_bnb_4bit(module)
    if is_conv1d(module):
        return conv1d_to_linear(module)
    return module


def wrap_linear(layer: nn.Module, name: str = "layer", *, quant_type: Optional[str] = "nf4", r: Optional[int] = None,
                lora_alpha: Optional[float] = None, lora_dropout: float = 0.0, use_rslora: bool = False,
                blocksize: int = 64, compress_statistics: bool = True,
                compute_dtype: Optional[torch.dtype] = None) -> Optional[nn.Module]:
    """The module that replaces the linear layer `layer` (full name `name`, for errors), or None to
    leave it as it is: the one place that decides, per kind of base layer (see the module docstring).

    quant_type "nf4"/"fp4" stores a full-precision base in 4 bits (`Linear4bit` with blocksize,
    compress_statistics, compute_dtype); None keeps it. A layer already in 4 bits keeps its bytes.
    r: when set, the result is a `QLoRALinear` (4-bit base) or `LoRALinear` with that rank,
    lora_alpha (default 2 * r), lora_dropout and use_rslora. A LoRA layer is left alone (one
    adapter per layer), and so is our 4-bit layer when r is None.
    """
    from qlora_fast.nn.lora import LoRALinear, QLoRALinear

    check_compress_statistics(compress_statistics)
    if isinstance(layer, LoRALinear):
        return None
    if not (isinstance(layer, Linear4bit) or _is_bnb_4bit(layer)):
        _check_not_quantized(layer, name)
    if r is None and isinstance(layer, Linear4bit):
        return None
    base = as_linear(layer)
    if quant_type is not None and not isinstance(base, Linear4bit):
        linear, base = base, Linear4bit.from_linear(base, quant_type=quant_type, blocksize=blocksize,
                                                    compress_statistics=compress_statistics,
                                                    compute_dtype=compute_dtype)
        if getattr(linear, "conv1d_class", None) is not None:
            base.conv1d_class = linear.conv1d_class
    if r is None:
        return base
    kind = QLoRALinear if isinstance(base, Linear4bit) else LoRALinear
    alpha = 2 * r if lora_alpha is None else lora_alpha
    return kind(base, r=r, lora_alpha=alpha, lora_dropout=lora_dropout, use_rslora=use_rslora)


# ---------------------------------------------------------------------------- matching
def linear_layer_names(model: nn.Module, include_output: bool = False):
    """Full dotted names of the linear layers (nn.Linear, Conv1D, bitsandbytes / our 4-bit, LoRA
    wrappers), outermost only, in module order; without `include_output`, the output layer (lm_head)
    is left out."""
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


def fused_experts_names(model: nn.Module) -> list:
    """Full dotted names of the fused MoE experts modules of `model` (`is_fused_experts`: 3-D
    gate_up_proj/up_proj/down_proj parameters of their own), in module order."""
    from qlora_fast.nn.experts_lora import LoRAExperts

    wrapped = {id(m.base) for m in model.modules() if isinstance(m, LoRAExperts)}  # adapted: left alone
    return [name for name, m in model.named_modules() if is_fused_experts(m) and id(m) not in wrapped]


def default_lora_targets(model: nn.Module):
    """The LoRA targets of `model` when none are given: every linear layer but the output layer (as
    QLoRA, and PEFT's "all-linear"), as the list of their names when all are familiar projection
    names (q_proj, qkv_proj, out_proj, fc1, c_attn, query_key_value, ...; the list PEFT reads back),
    else "all-linear". A known group only partly present (Phi-3's o_proj beside its fused qkv_proj)
    never narrows the choice."""
    short = {n.split(".")[-1] for n in linear_layer_names(model)}
    output = set(linear_layer_names(model, include_output=True)) - set(linear_layer_names(model))
    if short and short <= set(_PROJECTIONS) and not short & {n.split(".")[-1] for n in output}:
        return [n for n in _PROJECTIONS if n in short]
    return ALL_LINEAR


def keep_in_fp32_modules(model: nn.Module) -> tuple:
    """Names of the layers a transformers model keeps in float32 (T5's wo: its activations outgrow
    float16), which no quantization touches."""
    names = []
    for module in model.modules():
        for attr in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
            names += list(getattr(module, attr, None) or ())
    return tuple(dict.fromkeys(names))


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


def check_target_modules(target_modules) -> Union[None, str, list]:
    """`target_modules` checked as PEFT reads it: None, "all-linear", a string (a regular
    expression: ValueError when it does not compile) or a non-empty list of non-empty names
    (returned as a list). TypeError/ValueError name the argument."""
    if target_modules is None or target_modules == ALL_LINEAR:
        return target_modules
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules is not a valid regular expression: {e}") from None
        return target_modules
    names = list(_as_names(target_modules, "target_modules"))
    if not names or not all(names):
        raise ValueError(f"target_modules must be a regex string or a non-empty list of names, got {target_modules!r}")
    return names


def _matches(full_name: str, patterns) -> bool:
    """A pattern matches a module whose full dotted name equals it or ends with '.' + pattern."""
    return any(full_name == p or full_name.endswith("." + p) for p in patterns)


def match_target_modules(model: nn.Module, target_modules=ALL_LINEAR, skip: Union[str, Iterable[str], None] = (),
                         include_output: bool = False) -> list:
    """Full dotted names of the linear layers of `model` that `target_modules` picks, in module order.

    target_modules (as PEFT's): a list of names (a layer whose full name equals one or ends with
    "." + one; every name must match a layer), one string used as a regular expression the full
    name must match (re.fullmatch), "all-linear" (every linear layer but the output layer), or None
    (every linear layer). skip: names (same rule) left out first. include_output: the output layer
    (lm_head) is a candidate too (never for "all-linear"). ValueError when a name, the regex or
    "all-linear" matches no layer.
    """
    targets = check_target_modules(target_modules)
    skip = _as_names(skip, "skip")
    names = [n for n in linear_layer_names(model, include_output and targets != ALL_LINEAR) if not _matches(n, skip)]
    if targets is None:
        return names
    if targets == ALL_LINEAR:
        if not names:
            raise ValueError(f"target_modules='all-linear' matches no linear layer of {type(model).__name__}")
        return names
    if isinstance(targets, str):
        pattern = re.compile(targets)
        matched = [n for n in names if pattern.fullmatch(n)]
        if not matched:
            raise ValueError(f"target_modules regex {targets!r} matches no linear layer; linear layers: {names[:12]}")
        return matched
    for target in targets:
        if not any(_matches(n, (target,)) for n in names):
            experts = [f"{m}.{w}" for m in fused_experts_names(model) for w in EXPERT_WEIGHTS]
            if any(_matches(e, (target,)) for e in experts):
                raise ValueError(f"target module {target!r} names a fused MoE experts parameter (3-D, one weight for "
                                 "all experts), not a linear layer: name it in target_parameters (as PEFT) to "
                                 "give its experts LoRA adapters")
            short = sorted({n.split(".")[-1] for n in names})
            raise ValueError(f"target module {target!r} matched no linear layer of {type(model).__name__}; "
                             f"its linear layers are named {short}")
    return [n for n in names if _matches(n, targets)]


def check_target_parameters(target_parameters) -> Optional[list]:
    """`target_parameters` checked as PEFT reads it: None or a non-empty list of non-empty names
    (a string is a TypeError, as in PEFT: regular expressions are not supported there)."""
    if target_parameters is None:
        return None
    if isinstance(target_parameters, str):
        raise TypeError("target_parameters must be a list of strings or None (a regular expression is not "
                        f"supported, as in PEFT), got {target_parameters!r}")
    names = list(_as_names(target_parameters, "target_parameters"))
    if not names or not all(names):
        raise ValueError(f"target_parameters must be a non-empty list of non-empty names, got {target_parameters!r}")
    return names


def _parameter_owners(model: nn.Module):
    """(module name, module, parameter name, is an experts weight) of every parameter of `model`,
    with a `LoRAExperts` wrapper standing for the experts module it wraps (as PEFT strips
    `base_layer` from names); an `Experts4bit`'s packed weights count as experts weights."""
    from qlora_fast.nn.experts_lora import LoRAExperts

    wrapped = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRAExperts):
            wrapped[id(m.base)] = name
    for name, m in model.named_modules():
        if isinstance(m, LoRAExperts):
            continue
        shown = wrapped.get(id(m), name)
        experts = isinstance(m, Experts4bit) or is_fused_experts(m)
        for p_name, p in m.named_parameters(recurse=False):
            weight = isinstance(m, Experts4bit) and p_name in m.quant_states or p.dim() == 3
            yield shown, m, p_name, experts and p_name in EXPERT_WEIGHTS and weight


def match_target_parameters(model: nn.Module, target_parameters, present_only: bool = False) -> dict:
    """{full name of a fused experts module: [its weight names that `target_parameters` picks, in the
    module's parameter order]}, modules in model order, read as PEFT reads target_parameters: a name
    matches the parameter whose full dotted name ("model.layers.0.mlp.experts.gate_up_proj") equals
    it or ends with "." + it. ValueError when a name matches no parameter (with present_only, only
    when none matches: a saved list may be written for several architectures), or matches a
    parameter that is not a 3-D experts weight (gate_up_proj / up_proj / down_proj of a fused
    experts module, dense or `Experts4bit`): LoRA on other parameters is not supported."""
    targets = check_target_parameters(target_parameters)
    picked, hit, known = {}, set(), set()
    for module_name, _, p_name, is_expert in _parameter_owners(model):
        if is_expert:
            known.add(f"{module_name.split('.')[-1]}.{p_name}")
        key = f"{module_name}.{p_name}" if module_name else p_name
        matched = [t for t in targets if _matches(key, (t,))]
        if not matched:
            continue
        if not is_expert:
            raise ValueError(f"target_parameters {matched[0]!r} matches {key!r}, which is not a fused MoE experts "
                             "weight (3-D gate_up_proj / up_proj / down_proj): LoRA on other parameters is not "
                             "supported (name linear layers in target_modules)")
        hit.update(matched)
        picked.setdefault(module_name, []).append(p_name)
    missing = [t for t in targets if t not in hit]
    if (missing and not present_only) or not picked:
        raise ValueError(f"target_parameters {missing[:3]} matched no parameter of {type(model).__name__}; its fused "
                         f"experts weights are {sorted(known) or 'none'}")
    return picked


def present_target_names(model: nn.Module, target_modules, include_output: bool = True) -> list:
    """The names of the list `target_modules` that match a linear layer of `model`, read as PEFT
    reads a saved list: a list written for several architectures may name layers this model lacks.
    ValueError only when none matches."""
    layers = linear_layer_names(model, include_output)
    present = [t for t in target_modules if any(_matches(n, (t,)) for n in layers)]
    if not present:
        short = sorted({n.split(".")[-1] for n in layers})
        raise ValueError(f"none of target_modules {list(target_modules)} matches a linear layer of "
                         f"{type(model).__name__}; its linear layers are named {short}")
    return present


# ---------------------------------------------------------------------------- swapping
def _old_target(target):
    """The deprecated `target` as target_modules: one string was one name (not a regex), () all."""
    return _as_names(target, "target") or None


@renamed_kwargs("replace_linear", {"lora_r": "r", "target": ("target_modules", _old_target)})
def replace_linear(
    model: nn.Module,
    quant_type: Optional[str] = "nf4",
    skip: Union[str, Iterable[str], None] = ("lm_head",),
    target_modules: Union[str, Iterable[str], None] = None,
    blocksize: int = 64,
    compress_statistics: bool = True,
    compute_dtype: Optional[torch.dtype] = None,
    r: Optional[int] = None,
    lora_alpha: Optional[float] = None,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    include_output: bool = True,
) -> nn.Module:
    """Convert linear layers of `model` in place and return `model`.

    quant_type: "nf4" or "fp4" to store the base weight in 4 bits (`Linear4bit`), or None to keep it
    in full precision (only meaningful with `r`). The layers a transformers model keeps in float32
    (`keep_in_fp32_modules`, T5's wo) stay in full precision, as bitsandbytes' quantizer leaves them.
    skip: module names (full dotted names or their trailing part, e.g. "lm_head") left untouched.
    target_modules: which layers to convert, read as PEFT's (`match_target_modules`): e.g.
    ["q_proj", "v_proj"], a regular expression on the full name, or "all-linear"; None (default)
    converts every linear layer not in `skip`. With None or "all-linear" and a quant_type, the
    fused MoE experts modules not in `skip` go to 4 bits too (`Experts4bit`, same options; no
    adapter); one that cannot (transposed/biased experts, out * in per expert not a multiple of the
    blocksize) stays in full precision with a warning naming it (none when it is in `skip`).
    include_output=False: the output layer is never a target (as in `get_peft_model`), whatever
    `skip` says. blocksize, compress_statistics, compute_dtype: passed
    to `Linear4bit`. r: when set, wrap each converted layer with a LoRA adapter of this rank
    (`QLoRALinear` on a 4-bit base, `LoRALinear` on a full-precision one); lora_alpha defaults to
    2 * r. A layer already in 4 bits (ours, or bitsandbytes' adopted as is) keeps its bytes and gets
    the adapter. With r, every other parameter of the model is frozen (only the adapters train).
    Deprecated names (one release, with a DeprecationWarning): lora_r (r), target (target_modules,
    where one string is one name, not a regex).

    All or nothing: every new module is built before any is swapped in, so an error leaves the
    model as it was. Raises ValueError when there is nothing to do (quant_type and r both None),
    when a target matches no layer, when `r` is given but every matching layer already has an
    adapter (none would be added), or for a layer quantized in another format.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if quant_type is None and r is None:
        raise ValueError("replace_linear needs quant_type or r (both are None: nothing to do)")
    if quant_type not in (None, "nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4', 'fp4' or None, got {quant_type!r}")
    check_compress_statistics(compress_statistics)
    names = match_target_modules(model, target_modules, skip=skip, include_output=include_output)
    plan = []  # all built before any swap
    # building a LoRA module freezes its base in place: an error below must thaw what it froze
    flags = [(p, p.requires_grad) for p in model.parameters()]
    keep_fp32 = keep_in_fp32_modules(model)
    try:
        for name in names:
            quant = None if _matches(name, keep_fp32) else quant_type  # as bitsandbytes' quantizer skips them
            if quant is None and r is None:
                continue
            new = wrap_linear(model.get_submodule(name), name, quant_type=quant, r=r, lora_alpha=lora_alpha,
                              lora_dropout=lora_dropout, use_rslora=use_rslora, blocksize=blocksize,
                              compress_statistics=compress_statistics, compute_dtype=compute_dtype)
            if new is not None:
                plan.append((name, new))
        linears = len(plan)
        if quant_type is not None and targets_all(target_modules):
            plan += _experts_plan(model, skip=(*_as_names(skip, "skip"), *keep_fp32), quant_type=quant_type,
                                  blocksize=blocksize, compress_statistics=compress_statistics,
                                  compute_dtype=compute_dtype)
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    if r is not None and names and not linears:
        raise ValueError(f"every matching layer already has a LoRA adapter ({len(names)} layers, e.g. {names[0]!r}): "
                         "no adapter added; use the model as it is, or unload/merge its adapters first")
    _swap(model, plan)
    if r is not None:
        # as PEFT does: only the adapters train (embeddings, norms, lm_head are frozen too)
        from qlora_fast.nn.lora import mark_only_lora_as_trainable

        mark_only_lora_as_trainable(model)
    return model


def targets_all(target_modules) -> bool:
    """Whether `target_modules` picks every layer (None or "all-linear"): only then are fused
    experts, which no name or regex of linear layers picks, quantized too."""
    return target_modules is None or target_modules == ALL_LINEAR


def _experts_plan(model: nn.Module, skip, quant_type, blocksize, compress_statistics, compute_dtype) -> list:
    """(name, Experts4bit) for every fused experts module of `model` not in `skip`. One that cannot
    be quantized (`unsupported_experts`) stays in full precision, with a warning naming it and why:
    such models (GPT-OSS, Llama4) quantized their linear layers before experts were quantized at all."""
    plan, kept = [], []
    for name in (n for n in fused_experts_names(model) if not _matches(n, skip)):
        experts = model.get_submodule(name)
        why = unsupported_experts(experts, blocksize)
        if why:
            kept.append((name, why))
        else:
            plan.append((name, Experts4bit.from_experts(experts, quant_type, blocksize, compress_statistics,
                                                        compute_dtype)))
    if kept:  # one warning per model, not per layer
        (name, why), more = kept[0], f" and {len(kept) - 1} more like it" if len(kept) > 1 else ""
        warnings.warn(f"the fused MoE experts {name!r}{more} stay in full precision: {why} (skip={name!r} says "
                      "so without this warning)", stacklevel=4)
    return plan


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
    (nn.Linear or Conv1D) and original dtype (or `dtype`), and every `Experts4bit` back into its
    dense experts module. Experts adapters (PEFT's target_parameters) are merged into the dense
    experts weights (W + scaling B_e A_e per expert), whatever keep_4bit says. The model's
    transformers config is updated to match:
    `quantization_config` removed (dense), or set for bitsandbytes (keep_4bit). Returns `model`.
    keep_4bit with 4-bit fused experts is a ValueError: bitsandbytes' quantization_config cannot
    describe them, so transformers could not load the model back. FloatingPointError, nothing
    changed, when an unmerged adapter is NaN or inf."""
    from qlora_fast.nn.experts_lora import LoRAExperts, experts_lora_modules
    from qlora_fast.nn.lora import LoRALinear, QLoRALinear

    # Checked before anything changes: a NaN/inf adapter would make the dense weight NaN, or stop
    # the 4-bit requantization (it refuses non-finite weights) with the earlier layers merged.
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear) and not m.merged and not (m.lora_A.isfinite().all() and m.lora_B.isfinite().all()):
            raise FloatingPointError(f"the LoRA adapter of {name!r} holds NaN or inf values; nothing was merged")
    for m in experts_lora_modules(model):
        if not (m.lora_A.isfinite().all() and m.lora_B.isfinite().all()):
            raise FloatingPointError("an experts LoRA adapter holds NaN or inf values; nothing was merged")
    experts = [(n, m) for n, m in model.named_modules() if isinstance(m, Experts4bit)]
    if keep_4bit and experts:
        raise ValueError(f"cannot keep 4 bits: {experts[0][0]!r} holds fused MoE experts in 4 bits, which a "
                         "bitsandbytes quantization_config cannot describe; merge to a dense model (keep_4bit=False)")
    plan = [(name, m, m.dequantize(dtype)) for name, m in experts]  # adapters merged in
    weights = {}  # LoRAExperts: its base with W + delta, the new weights put in at the swap
    for name, m in model.named_modules():
        if isinstance(m, LoRAExperts):
            weights[name] = m.merged_weights(dtype)
            plan.append((name, m, m.base))
    for name in linear_layer_names(model, include_output=True):
        layer = model.get_submodule(name)
        if isinstance(layer, QLoRALinear) and keep_4bit:
            new = layer.base
        elif isinstance(layer, LoRALinear):
            base = layer.base
            original = base.quant_state.dtype if isinstance(layer, QLoRALinear) else base.weight.dtype
            new = _dense(layer._merged_weight(), base.bias, getattr(base, "conv1d_class", None), dtype or original)
        elif keep_4bit:
            continue
        elif isinstance(layer, Linear4bit) or _is_bnb_4bit(layer):
            four = layer if isinstance(layer, Linear4bit) else from_bnb_4bit(layer)
            new = _dense(
                _dequantized(four), four.bias, getattr(layer, "conv1d_class", None), dtype or four.quant_state.dtype
            )
        else:
            continue
        plan.append((name, layer, new))
    config = _bnb_quantization_config(model) if keep_4bit else None
    for name, layer, new in plan:
        if isinstance(layer, QLoRALinear) and keep_4bit and not layer.merged:
            layer.merge()  # requantizes W + scaling B A into the 4-bit base
        for w, value in weights.get(name, {}).items():
            setattr(new, w, nn.Parameter(value, requires_grad=False))
        model.set_submodule(name, new)
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
        raise ValueError(
            f"the 4-bit layers mix settings {sorted(map(str, kinds))}; a bitsandbytes quantization_config holds one"
        )
    if any(getattr(m, "conv1d_class", None) is not None for m in fours.values()):
        raise ValueError(
            "keeping 4 bits is not supported for Conv1D (GPT-2) layers; merge to a dense model (requantize=False)"
        )
    quant_type, nested, compute_dtype = kinds.pop()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=nested,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=dense or None)
