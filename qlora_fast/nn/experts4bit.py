"""`Experts4bit`: a transformers fused-experts module with its expert weights in 4 bits (NF4/FP4).

transformers >= 5 stores a mixture of experts (Mixtral, Qwen2/3-MoE, OLMoE, ...) as one module
whose class is decorated with `transformers.integrations.moe.use_experts_implementation`: 3-D
parameters `gate_up_proj` (E, 2I, H) (or `up_proj` (E, I, H) without a gate) and `down_proj`
(E, H, I), and flags (`has_gate`, `has_bias`, `is_transposed`, ...) set by the decorator.

Each 3-D weight is quantized as bitsandbytes quantizes any tensor (`quantize_4bit`: flattened,
blocks of `blocksize`), one `QuantState` of shape (E, out, in). out * in must be a multiple of the
blocksize, so that no block straddles two experts: expert e's weight is then a slice of the packed
bytes and of the absmax. The forward is transformers' eager loop over the experts the router hit,
each expert's two projections going through `matmul_4bit` (Linear4bit's matmul) on its slice, so
at most one expert's weight is ever dequantized at a time (on CUDA with few rows, none is).
state_dict: bitsandbytes' keys after each weight's name (`gate_up_proj`, `gate_up_proj.absmax`,
`gate_up_proj.quant_state.bitsandbytes__nf4`, ...), as `Linear4bit` writes them after `weight`.
"""
from typing import Optional

import torch
from torch import nn

from qlora_fast.functional.lora import matmul_4bit
from qlora_fast.functional.quant import dequantize_4bit, quantize_4bit
from qlora_fast.quant_state import FLOAT_DTYPES, NESTED_BLOCKSIZE, QuantState

__all__ = ["Experts4bit", "is_fused_experts", "unsupported_experts"]

EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")
_FLAGS = ("has_gate", "has_bias", "is_transposed")


def is_fused_experts(module: nn.Module) -> bool:
    """Whether `module` holds fused expert weights: a 3-D parameter of its own named gate_up_proj,
    up_proj or down_proj (recognised by name and shape, not by class; `Experts4bit` is not one)."""
    return any(p is not None and p.dim() == 3 for n, p in module._parameters.items() if n in EXPERT_WEIGHTS)


def unsupported_experts(module: nn.Module, blocksize: int) -> Optional[str]:
    """Why the fused-experts `module` cannot become an `Experts4bit` at `blocksize`, or None."""
    missing = [f for f in _FLAGS if not hasattr(module, f)]
    if missing:
        return (f"{type(module).__name__} is not a transformers `use_experts_implementation` class (it lacks "
                f"{missing}), so its forward is unknown")
    if module.is_transposed or module.has_bias:
        return "transposed or biased expert weights (is_transposed/has_bias, as GPT-OSS) are not supported"
    names = ("gate_up_proj" if module.has_gate else "up_proj", "down_proj")
    weights = dict(module.named_parameters(recurse=False))
    if set(weights) != set(names) or any(weights[n].dim() != 3 for n in names):
        return f"expected exactly the 3-D parameters {names}, found {sorted(weights)}"
    if list(module.buffers(recurse=False)):
        return "buffers of its own are not supported"
    for name in names:
        _, out_features, in_features = weights[name].shape
        if (out_features * in_features) % blocksize:
            return (f"{name} has {out_features} x {in_features} = {out_features * in_features} elements per expert, "
                    f"not a multiple of the blocksize {blocksize}, so one quantization block would straddle two "
                    "experts")
    return None


class Experts4bit(nn.Module):
    """The fused-experts module `experts` computed from 4-bit weights; its attributes (config,
    flags, act_fn, post_expert_norm, ...) and its class's `_apply_gate` are kept.

    forward(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H) in
    hidden_states' dtype, as transformers' eager experts forward (whatever
    `config._experts_implementation` says), computed in `compute_dtype`. Differentiable in
    hidden_states and top_k_weights; the 4-bit weights are frozen. With per-expert LoRA adapters
    (`lora`, PEFT's target_parameters: see `qlora_fast.nn.experts_lora`) each adapted projection adds
    its expert's adapter output, and the adapters are trainable.
    """

    @classmethod
    def from_experts(cls, experts: nn.Module, quant_type: str = "nf4", blocksize: int = 64,
                     compress_statistics: bool = True, compute_dtype: Optional[torch.dtype] = None) -> "Experts4bit":
        """Quantize the 3-D weights of `experts` (see `quantize_4bit` for the options; compute_dtype
        defaults to the weights' dtype). Weights on the meta device stay there, to be filled by
        `quantize_weight_` (a model loaded tensor by tensor). ValueError (`unsupported_experts`)
        when the module cannot be converted."""
        why = unsupported_experts(experts, blocksize)
        if why:
            raise ValueError(f"cannot quantize the experts module {type(experts).__name__}: {why}")
        if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
            raise TypeError(f"compute_dtype must be float32, float16, bfloat16 or None, got {compute_dtype}")
        module = cls()
        for key, value in vars(experts).items():
            if not key.startswith("_") and key != "training":
                setattr(module, key, value)
        module.training = experts.training
        module._is_expert_parallel = getattr(experts, "_is_expert_parallel", False)
        for name, child in experts.named_children():
            module.add_module(name, child)
        module.experts_class = type(experts)  # to give a dense module back (`dequantize`)
        module._apply_gate_fn = type(experts)._apply_gate if experts.has_gate else None
        module.quant_states, module._slices = {}, {}
        module.lora = None  # per-expert LoRA adapters (`experts_lora.add_experts_lora`): a ModuleDict by weight
        weights = dict(experts.named_parameters(recurse=False))
        module.compute_dtype = compute_dtype or next(iter(weights.values())).dtype
        module.options = (blocksize, quant_type, compress_statistics)  # quantize_4bit's order
        module.shapes = {name: tuple(weight.shape) for name, weight in weights.items()}
        for name, weight in weights.items():
            module.quant_states[name] = None
            module.register_parameter(name, nn.Parameter(torch.empty(0, dtype=torch.uint8, device="meta"), False))
            if weight.device.type != "meta":
                module.quantize_weight_(name, weight)
        return module

    @torch.no_grad()
    def quantize_weight_(self, name: str, weight: torch.Tensor) -> None:
        """Quantize the 3-D `weight` into the slot `name` (with this module's options)."""
        if tuple(weight.shape) != self.shapes.get(name):
            raise ValueError(f"{name} must have shape {self.shapes.get(name)}, got {tuple(weight.shape)}")
        packed, state = quantize_4bit(weight.detach().contiguous(), *self.options)
        self.quant_states[name] = state
        self._parameters[name] = nn.Parameter(packed, requires_grad=False)
        self._slices.pop(name, None)  # views of the old bytes

    def dequantize_weight(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The 3-D weight `name` in `dtype` (default the compute dtype): all experts at once."""
        return dequantize_4bit(self._parameters[name], self.quant_states[name], dtype or self.compute_dtype)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> nn.Module:
        """The dense experts module of the original class, weights dequantized to `dtype`
        (default: the weights' original dtype), frozen. Adapters (`lora`) are merged into it:
        W + scaling * B_e A_e per expert, in float32, then `dtype`."""
        cls = self.experts_class
        dense = cls.__new__(cls)
        nn.Module.__init__(dense)
        skip = {"experts_class", "quant_states", "options", "shapes", "compute_dtype", "training", "lora"}
        for key, value in vars(self).items():
            if not key.startswith("_") and key not in skip:
                setattr(dense, key, value)
        dense._is_expert_parallel = self._is_expert_parallel
        for name, child in self.named_children():
            if name != "lora":
                dense.add_module(name, child)
        lora = getattr(self, "lora", None)
        for name, state in self.quant_states.items():
            if lora is not None and name in lora:
                merged = self.dequantize_weight(name, torch.float32) + lora[name].delta_weight(torch.float32).detach()
                weight = merged.to(dtype or state.dtype)
            else:
                weight = self.dequantize_weight(name, dtype or state.dtype)
            dense.register_parameter(name, nn.Parameter(weight, requires_grad=False))
        return dense.train(self.training)

    def _expert(self, name: str, e: int) -> tuple:
        """(packed bytes, QuantState) of expert e's (out, in) weight `name`: slices of the 3-D one."""
        packed, state = self._parameters[name], self.quant_states[name]
        cached = self._slices.get(name)
        if cached is None or cached[0] is not packed or cached[1] is not state:
            cached = self._slices[name] = (packed, state, {})
        if e in cached[2]:
            return cached[2][e]
        _, out_features, in_features = state.shape
        n = out_features * in_features
        blocks = n // state.blocksize
        start, stop = e * blocks, (e + 1) * blocks
        fields = dict(absmax=state.absmax[start:stop])
        if state.nested and blocks % NESTED_BLOCKSIZE == 0:
            # the expert's absmax codes fill whole nested blocks: it is a double-quantized state itself
            fields.update(offset=state.offset, nested_code=state.nested_code,
                          nested_absmax=state.nested_absmax[start // NESTED_BLOCKSIZE:stop // NESTED_BLOCKSIZE])
        elif state.nested:
            fields["absmax"] = _absmax_fp32(state, start, stop)
        expert = (packed.view(-1, 1)[e * n // 2:(e + 1) * n // 2],  # (bytes, 1), as a Linear4bit's
                  QuantState(**fields, shape=torch.Size([out_features, in_features]), dtype=state.dtype,
                             blocksize=state.blocksize, quant_type=state.quant_type, code=state.code))
        if "nested_absmax" in fields or not state.nested:  # views only: cache; a decoded absmax is not kept
            cached[2][e] = expert
        return expert

    def _project(self, x: torch.Tensor, name: str, e: int) -> torch.Tensor:
        out = matmul_4bit(x, *self._expert(name, e))
        lora = getattr(self, "lora", None)
        if lora is not None and name in lora and lora[name].adapter_enabled:
            out = out + lora[name].project(x, e)  # x W_e^T + scaling (x A_e^T) B_e^T, the base frozen
        return out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        missing = [n for n, s in self.quant_states.items() if s is None]
        if missing:
            raise RuntimeError(f"Experts4bit weights {missing} were never loaded (still on the meta device)")
        dtype = self.compute_dtype
        x = hidden_states if hidden_states.dtype == dtype else hidden_states.to(dtype)
        out = torch.zeros_like(hidden_states)
        first = "gate_up_proj" if self.has_gate else "up_proj"
        with torch.no_grad():
            hit = torch.unique(top_k_index).tolist()
        for e in hit:
            if not 0 <= e < self.shapes["down_proj"][0]:  # expert parallelism's sentinel for a remote expert
                continue
            token, pos = torch.where(top_k_index == e)
            h = self._project(x[token], first, e)
            h = self._apply_gate_fn(self, h) if self.has_gate else self.act_fn(h)
            h = self._project(h, "down_proj", e)
            if getattr(self, "has_post_expert_norm", False):
                h = self.post_expert_norm(h)
            h = h * top_k_weights[token, pos, None]
            out.index_add_(0, token, h.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{n}={s}" for n, s in self.shapes.items())
        state = self.quant_states["down_proj"]
        quant = "not loaded" if state is None else (f"quant_type={state.quant_type}, blocksize={state.blocksize}, "
                                                    f"nested={state.nested}")
        return f"{self.experts_class.__name__}: {shapes}, {quant}, compute_dtype={self.compute_dtype}"

    def _apply(self, fn, recurse=True):
        # the quant states are not parameters: they follow their packed weights (as Linear4bit's)
        super()._apply(fn, recurse)
        # the cached per-expert slices are views of the old bytes: dropped, or a move (to the CPU,
        # say) would keep the whole old packed weights alive until the next forward
        self._slices = {}
        for name, state in self.quant_states.items():
            weight = self._parameters[name]
            if state is not None and state.device != weight.device:
                self.quant_states[name] = state.to(weight.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, state in self.quant_states.items():
            weight = self._parameters[name]
            destination[prefix + name] = weight if keep_vars else weight.detach()
            if state is not None:
                for key, value in state.as_dict(packed=True).items():
                    destination[prefix + name + "." + key] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # as Linear4bit's: every weight is read and checked before any is assigned
        from qlora_fast.nn.linear4bit import _packed_from, _quant_state_from

        assign = local_metadata.get("assign_to_params_buffers", False)
        errors, new = [], {}
        for name in self.quant_states:
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            device = getattr(state_dict[key], "device", None) if assign else self._parameters[name].device
            if device is not None and device.type == "meta" and not assign:
                device = state_dict[key].device  # a module built on the meta device takes the loaded one's
            state = _quant_state_from(state_dict, prefix, device, name=name, dims=3)
            if tuple(state.shape) != self.shapes[name]:
                errors.append(f"size mismatch for {key}: quant state shape {tuple(state.shape)}, "
                              f"module is {self.shapes[name]}")
                continue
            packed = _packed_from(state_dict[key], state, key).detach()
            new[name] = (nn.Parameter(packed if assign else packed.to(device).clone(), requires_grad=False), state)
        if strict:
            known = set(self.quant_states) | set(self._modules)
            unexpected_keys.extend(k for k in state_dict
                                   if k.startswith(prefix) and k[len(prefix):].split(".")[0] not in known)
        if errors:
            error_msgs.extend(errors)
            return
        for name, (weight, state) in new.items():
            self._parameters[name], self.quant_states[name] = weight, state
            self._slices.pop(name, None)  # views of the old bytes: they would keep them alive


def _absmax_fp32(state: QuantState, start: int, stop: int) -> torch.Tensor:
    """The fp32 absmax of blocks [start, stop) of a double-quantized state, decoded from the nested
    blocks that cover them (for an expert whose blocks do not fill whole nested blocks)."""
    from qlora_fast.reference.quant import dequantize_absmax_ref

    first, last = start // NESTED_BLOCKSIZE, -(-stop // NESTED_BLOCKSIZE)
    codes = state.absmax[first * NESTED_BLOCKSIZE:last * NESTED_BLOCKSIZE]
    absmax = dequantize_absmax_ref(codes, state.nested_absmax[first:last], state.offset, state.nested_code)
    return absmax[start - first * NESTED_BLOCKSIZE:stop - first * NESTED_BLOCKSIZE].contiguous()
