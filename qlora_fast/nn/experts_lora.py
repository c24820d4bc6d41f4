"""LoRA on fused MoE experts (PEFT's `target_parameters`): one rank-r adapter per expert for each
targeted 3-D weight (`gate_up_proj` (E, 2I, H), `up_proj`, `down_proj` (E, H, I)).

The math and the tensors are PEFT 0.21's `lora.ParamWrapper` on a weight stored (E, out, in):
lora_A is (E * r, in) and lora_B (out, E * r), expert e's factors being A_e = lora_A[e*r:(e+1)*r]
(r, in) and B_e = lora_B[:, e::E] (out, r) (PEFT reshapes B to (out, r, E)), and expert e's
projection computes x W_e^T + scaling * (x A_e^T) B_e^T, scaling = alpha / r (alpha / sqrt(r) with
rsLoRA). A starts Kaiming-uniform and B at zero, as PEFT's nn.Linear-held factors.

Where the adapters live (in both cases a `lora` ModuleDict of `ExpertLoRA`, keyed by the weight's
name, in the experts module's parameter order):
- on an `Experts4bit` (QLoRA): in the module itself; its `_project` adds the adapter per hit expert,
  the 4-bit base frozen;
- on transformers' dense experts: `LoRAExperts` wraps the module and runs its own forward (whatever
  experts implementation it uses) with W + delta in place of each targeted weight, as PEFT's
  parametrization does.
Dropout is refused, as PEFT refuses it: x cannot be factored out of B A dropout(x) per expert.
"""
import math
from typing import Optional

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["ExpertLoRA", "LoRAExperts", "add_experts_lora", "check_experts_lora", "experts_lora_modules",
           "experts_adapters"]


class ExpertLoRA(nn.Module):
    """The per-expert adapters of one 3-D experts weight of shape (num_experts, out_features,
    in_features), in PEFT's layout: lora_A (num_experts * r, in), lora_B (out, num_experts * r),
    float32 (float64 over a float64 base) on `device`. ValueError for r outside [1, min(in, out)]
    or a non-positive lora_alpha."""

    def __init__(self, num_experts: int, out_features: int, in_features: int, r: int, lora_alpha: float,
                 use_rslora: bool = False, device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(in_features, out_features):
            raise ValueError(f"r must be an int in [1, min(in, out)] = [1, {min(in_features, out_features)}], "
                             f"got {r!r}")
        if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not 0 < lora_alpha < math.inf:
            raise ValueError(f"lora_alpha must be a finite positive number, got {lora_alpha!r}")
        self.num_experts, self.out_features, self.in_features = num_experts, out_features, in_features
        self.r, self.alpha, self.use_rslora = r, lora_alpha, bool(use_rslora)
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_A = nn.Parameter(torch.empty(num_experts * r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, num_experts * r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear(in, E * r), PEFT's lora_A
        self.adapter_enabled = True
        self.merged = False  # never merged in place: merge_linear_layers builds a new dense module

    def factors(self, e: int) -> tuple:
        """(A_e (r, in), B_e (out, r)) of expert e: views of lora_A / lora_B (differentiable)."""
        return self.lora_A[e * self.r:(e + 1) * self.r], self.lora_B[:, e::self.num_experts]

    def project(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """scaling * (x A_e^T) B_e^T for x (..., in), in x's dtype: expert e's adapter output."""
        a, b = self.factors(e)
        return (x @ a.to(x.dtype).t()) @ b.to(x.dtype).t() * self.scaling

    def delta_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """scaling * B_e A_e for every expert, (num_experts, out, in), in `dtype` (default the
        adapter's); differentiable (PEFT's `get_delta_weight`, "o r e, e r i -> e o i")."""
        dtype = dtype or self.lora_A.dtype
        a = self.lora_A.to(dtype).reshape(self.num_experts, self.r, self.in_features)
        b = self.lora_B.to(dtype).reshape(self.out_features, self.r, self.num_experts)
        return torch.einsum("ore,eri->eoi", b, a) * self.scaling

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, out_features={self.out_features}, in_features={self.in_features}, "
                f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}")


def _adapters(weights: dict, names, r, lora_alpha, use_rslora) -> nn.ModuleDict:
    lora = nn.ModuleDict()
    for name in names:
        shape, device, dtype = weights[name]
        if len(shape) != 3:
            raise ValueError(f"{name} must be a 3-D experts weight, got shape {shape}")
        lora[name] = ExpertLoRA(*shape, r=r, lora_alpha=lora_alpha, use_rslora=use_rslora, device=device,
                                dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return lora


class LoRAExperts(nn.Module):
    """A frozen dense fused-experts module (`base`, transformers' own class) with per-expert
    adapters on some of its 3-D weights (`lora`): forward(*args, **kwargs) is base's forward with
    each targeted weight W replaced by W + delta_weight() cast to W's dtype (PEFT's ParamWrapper)."""

    def __init__(self, base: nn.Module, lora: nn.ModuleDict):
        super().__init__()
        for p in base.parameters():
            p.requires_grad_(False)
        self.base, self.lora = base, lora

    def forward(self, *args, **kwargs):
        active = {name: a for name, a in self.lora.items() if a.adapter_enabled}
        if not active:
            return self.base(*args, **kwargs)
        weights = {}
        for name, adapter in active.items():
            w = getattr(self.base, name)
            weights[name] = w + adapter.delta_weight().to(w.dtype)
        return functional_call(self.base, weights, args, kwargs, strict=False)

    @torch.no_grad()
    def merged_weights(self, dtype: Optional[torch.dtype] = None) -> dict:
        """{weight name: W + delta} for every adapted weight: the sum in float32 (float64 over a
        float64 base), returned in `dtype` or W's dtype. Nothing is changed."""
        out = {}
        for name, adapter in self.lora.items():
            w = getattr(self.base, name)
            math_dtype = torch.promote_types(w.dtype, torch.float32)
            out[name] = (w.to(math_dtype) + adapter.delta_weight(math_dtype)).to(dtype or w.dtype)
        return out


def check_experts_lora(experts: nn.Module, names, r: int) -> None:
    """ValueError unless `add_experts_lora(experts, names, r, ...)` can adapt `experts` (see there)."""
    if isinstance(experts, LoRAExperts) or getattr(experts, "lora", None) is not None:
        raise ValueError("the experts module already has a LoRA adapter; merge or unload it before adding another")
    missing = [f for f in ("has_gate", "is_transposed") if not hasattr(experts, f)]
    if missing:
        raise ValueError(f"{type(experts).__name__} is not a transformers `use_experts_implementation` class (it "
                         f"lacks {missing}), so the layout of its weights is unknown")
    if experts.is_transposed:
        raise ValueError(f"{type(experts).__name__} stores its experts transposed (is_transposed, as GPT-OSS): LoRA "
                         "on such experts is not supported")
    shapes = getattr(experts, "shapes", None) or {n: tuple(p.shape) for n, p in experts.named_parameters(recurse=False)}
    for name in names:
        if not 1 <= r <= min(shapes[name][1:]):
            raise ValueError(f"r must be in [1, min(out, in)] = [1, {min(shapes[name][1:])}] for {name} "
                             f"{shapes[name]}, got {r}")


def add_experts_lora(experts: nn.Module, names, r: int, lora_alpha: float, use_rslora: bool = False) -> nn.Module:
    """The module that replaces the fused-experts module `experts` once its weights `names` carry
    adapters: `experts` itself for an `Experts4bit` (its `lora` is set in place), a `LoRAExperts`
    wrapper for a dense one. ValueError for a module already adapted, transposed experts
    (GPT-OSS), a module that is not a transformers `use_experts_implementation` class, or r
    outside [1, min(out, in)]."""
    from qlora_fast.nn.experts4bit import Experts4bit

    names = list(names)
    check_experts_lora(experts, names, r)
    if isinstance(experts, Experts4bit):
        order = [n for n in experts.quant_states if n in names]
        weights = {n: (experts.shapes[n], experts._parameters[n].device, experts.compute_dtype) for n in order}
        experts.lora = _adapters(weights, order, r, lora_alpha, use_rslora)
        return experts
    params = dict(experts.named_parameters(recurse=False))
    order = [n for n in params if n in names]
    weights = {n: (tuple(params[n].shape), params[n].device, params[n].dtype) for n in order}
    return LoRAExperts(experts, _adapters(weights, order, r, lora_alpha, use_rslora))


def experts_adapters(model: nn.Module) -> list:
    """(full name, module) of every fused-experts module of `model` carrying adapters (an
    `Experts4bit` with `lora`, or a `LoRAExperts`), in module order."""
    from qlora_fast.nn.experts4bit import Experts4bit

    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, LoRAExperts) or (isinstance(m, Experts4bit) and getattr(m, "lora", None) is not None)]


def experts_lora_modules(model: nn.Module) -> list:
    """Every `ExpertLoRA` of `model`."""
    return [m for m in model.modules() if isinstance(m, ExpertLoRA)]

