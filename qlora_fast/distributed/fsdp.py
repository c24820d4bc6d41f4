"""QLoRA under PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`) with the 4-bit base sharded.

Mechanism: flat uint8 storage with the state carried alongside (not a tensor subclass).
`ShardableLinear4bit` keeps its weight as ONE uint8 parameter `units` of shape
(n_units, unit_bytes). A unit is the smallest piece of a 4-bit weight that dequantizes on its own:
one nested block of 256 quantization blocks when the absmax is double-quantized (256 * blocksize
elements: their packed nibbles, their 256 absmax codes and their fp32 nested absmax), or one
quantization block otherwise (its packed nibbles and its fp32 absmax). Each row of `units` holds
one unit's bytes side by side, so FSDP2's ordinary dim-0 sharding hands every rank whole units:
shards split on block boundaries by construction, each rank stores 1/world of the packed weight
and of its block scales (nested ones included), and the all-gather before a layer's forward and
backward moves exactly these bytes (the 4-bit size), never a bf16 copy. The replicated remainder
is a few hundred bytes per layer (the 16-entry code table, the 256-entry nested map and the
nested offset), kept as non-persistent buffers that FSDP2 leaves alone.

Why not a tensor subclass with `fsdp_pre_all_gather`/`fsdp_post_all_gather` (torchao's
NF4Tensor)? FSDP2 chunks, pads, narrows, copies and views a subclass parameter at set-up, so the
subclass must implement those aten ops and keep them in step with FSDP2's internals; a plain
uint8 parameter needs none of that (FSDP2 already all-gathers mixed dtypes as bytes, and leaves
non-float parameters out of `MixedPrecisionPolicy` casts). The forward reads the packed weight,
the absmax codes and the nested absmax as strided *views* of the unsharded `units`, so what
autograd keeps for the backward points into FSDP2's unsharded storage, which FSDP2 frees after
the forward (`reshard_after_forward=True`) and all-gathers again for the backward: no full 4-bit
copy of a layer outlives its use.

Limits: a weight whose element count is not a multiple of the unit (256 * blocksize elements with
double quantization, blocksize without) cannot be split on block boundaries and raises
ValueError, or with `unsplittable="replicate"` stays a plain Linear4bit kept whole on every rank; a
different number of units per rank is fine (FSDP2 pads the last shard). The reference (CPU) path
dequantizes from the strided views; the Triton kernels index flat buffers, so on the kernel path
`QuantState.kernel_weight` hands them contiguous copies of the views for the call (the 4-bit size
of the layer; the autograd plan keeps that copy until the backward, so on the kernel path a layer's
4-bit bytes do outlive its forward). Checked in the Triton interpreter on the CPU
(tests/test_fsdp.py, bench/gpu_fsdp.py --tiny); not run on a GPU.
"""
import contextlib
from typing import Optional

import torch
from torch import nn

from qlora_fast.nn.linear4bit import Linear4bit
from qlora_fast.quant_state import NESTED_BLOCKSIZE, QuantState

__all__ = ["ShardableLinear4bit", "prepare_4bit_for_fsdp", "shard_qlora_model", "four_bit_bytes", "unit_layout",
           "unsharded", "check_optimizer_params"]


class ShardableLinear4bit(Linear4bit):
    """A `Linear4bit` whose 4-bit weight and block scales live in one uint8 parameter `units`
    (n_units, unit_bytes) that FSDP2 shards on dim 0 (see the module docstring). `weight` and
    `quant_state` are read-only views rebuilt from `units` on each access (`set_quantized` takes
    new weights). Build with `from_linear4bit`; `to_linear4bit` gives back a plain module (on
    unsharded weights)."""

    @classmethod
    def from_linear4bit(cls, module: Linear4bit, name: str = "module") -> "ShardableLinear4bit":
        """The same weights in the unit layout. ValueError (naming `name`) when the weight cannot
        be split on quantization-block boundaries."""
        if not isinstance(module, Linear4bit):
            raise TypeError(f"{name} must be a qlora_fast.nn.Linear4bit, got {type(module).__name__}")
        if isinstance(module, ShardableLinear4bit):
            return module
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = module.in_features, module.out_features
        new.compute_dtype = module.compute_dtype
        new._set_units(module.weight, module.quant_state, name)
        new.bias = module.bias
        return new

    def _set_units(self, packed: torch.Tensor, state: QuantState, name: str = "module") -> None:
        """Hold `packed` and `state` in the unit layout: `units` and the replicated buffers."""
        state.validate(packed)
        n, _ = unit_layout(tuple(state.shape), state.blocksize, state.nested, name)
        unit = state.numel // n
        parts = [packed.detach().reshape(n, unit // 2)]
        if state.nested:
            parts += [state.absmax.reshape(n, NESTED_BLOCKSIZE), state.nested_absmax.reshape(n, 1).view(torch.uint8)]
        else:
            parts.append(state.absmax.reshape(n, 1).contiguous().view(torch.uint8))
        self.units = nn.Parameter(torch.cat(parts, dim=1).contiguous(), requires_grad=False)
        self._meta = (state.shape, state.dtype, state.blocksize, state.quant_type, state.nested, unit // 2)
        self.register_buffer("code", state.code.clone(), persistent=False)
        if state.nested:
            self.register_buffer("nested_code", state.nested_code.clone(), persistent=False)
            self.register_buffer("offset", state.offset.clone(), persistent=False)

    def set_quantized(self, packed: torch.Tensor, quant_state: QuantState) -> None:
        """Take new 4-bit weights of the same shape and format (`QLoRALinear.merge`/`unmerge`),
        rebuilt in the unit layout. Call it on an unsharded module (before `shard_qlora_model`, or
        as `to_linear4bit`): under FSDP2 `units` is a DTensor shard and cannot be replaced here.
        Raises ValueError when the new weights have another layout."""
        old = self._meta[:5]
        new = (quant_state.shape, quant_state.dtype, quant_state.blocksize, quant_state.quant_type, quant_state.nested)
        if tuple(new) != tuple(old):
            raise ValueError(f"set_quantized needs weights in this module's format (shape, dtype, blocksize, "
                             f"quant_type, nested) = {old}, got {new}")
        if hasattr(self.units, "to_local"):
            raise RuntimeError("set_quantized on an FSDP2-sharded module: merge before sharding, or unshard first")
        self._set_units(packed, quant_state)

    @property
    def weight(self) -> torch.Tensor:
        """The packed nibbles, (n_units, unit_elements / 2): a strided view of `units`."""
        return self.units[:, : self._meta[5]]

    @property
    def quant_state(self) -> QuantState:
        """A QuantState whose absmax (and nested absmax) are views of `units`."""
        shape, dtype, blocksize, quant_type, nested, p = self._meta
        units = self.units
        if nested:
            absmax = units[:, p : p + NESTED_BLOCKSIZE]
            nested_absmax = units[:, p + NESTED_BLOCKSIZE :].view(torch.float32).reshape(-1)
            return QuantState(absmax, shape, dtype, blocksize, quant_type, self.code,
                              self.offset, nested_absmax, self.nested_code)
        return QuantState(units[:, p:].view(torch.float32).reshape(-1), shape, dtype, blocksize, quant_type, self.code)

    def to_linear4bit(self) -> Linear4bit:
        """A plain `Linear4bit` with contiguous copies (call on an unsharded module)."""
        state = self.quant_state
        state = QuantState(state.absmax.reshape(-1).contiguous(), state.shape, state.dtype, state.blocksize,
                           state.quant_type, state.code.clone(), state.offset, state.nested_absmax,
                           state.nested_code)
        if state.nested:
            state.offset, state.nested_absmax = state.offset.clone(), state.nested_absmax.clone()
            state.nested_code = state.nested_code.clone()
        packed = self.weight.reshape(-1, 1).contiguous()
        return Linear4bit.from_quantized(packed, state, self.bias, self.compute_dtype)

    def _apply(self, fn, recurse=True):
        return nn.Module._apply(self, fn, recurse)  # the state follows `units` and the buffers

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args, **kwargs):
        nn.Module._load_from_state_dict(self, *args, **kwargs)


def unit_layout(shape: tuple, blocksize: int, nested: bool, name: str = "weight") -> tuple:
    """(n_units, unit_bytes) of a 4-bit weight of `shape` in `ShardableLinear4bit`'s layout.
    ValueError (naming `name`) when it cannot be split on quantization-block boundaries."""
    numel = 1
    for s in shape:
        numel *= int(s)
    unit = blocksize * (NESTED_BLOCKSIZE if nested else 1)
    if numel % unit:
        what = (f"{NESTED_BLOCKSIZE} absmax blocks of {blocksize} (double quantization)"
                if nested else f"blocks of {blocksize}")
        raise ValueError(
            f"{name}: a {tuple(shape)} 4-bit weight ({numel} elements) cannot be split on "
            f"quantization-block boundaries: FSDP shards whole units of {unit} elements ({what}); "
            f"use a size that is a multiple of {unit}, compress_statistics=False, or leave this layer unsharded"
        )
    return numel // unit, unit // 2 + (NESTED_BLOCKSIZE + 4 if nested else 4)


def _splittable(module: Linear4bit) -> bool:
    state = module.quant_state
    return state.numel % (state.blocksize * (NESTED_BLOCKSIZE if state.nested else 1)) == 0


def prepare_4bit_for_fsdp(model: nn.Module, unsplittable: str = "error") -> nn.Module:
    """Swap every `Linear4bit` in `model` (QLoRA bases included) for a `ShardableLinear4bit`, in
    place. Every weight is checked before anything is swapped: a ValueError naming the module
    leaves the model as it was. unsplittable="replicate" leaves a weight that cannot be split on
    block boundaries a plain `Linear4bit` instead (`shard_qlora_model` then keeps it whole on
    every rank). Returns `model`."""
    if unsplittable not in ("error", "replicate"):
        raise ValueError(f"unsplittable must be 'error' or 'replicate', got {unsplittable!r}")
    todo = [(name, module) for name, module in model.named_modules()
            if isinstance(module, Linear4bit) and not isinstance(module, ShardableLinear4bit)
            and (unsplittable == "error" or _splittable(module))]
    new = {name: ShardableLinear4bit.from_linear4bit(module, name or "model") for name, module in todo}
    for name, module in new.items():
        if not name:
            raise TypeError("model itself is a Linear4bit: wrap it in a container before sharding")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module)
    return model


def four_bit_bytes(model: nn.Module, local: bool = True) -> int:
    """Bytes of the 4-bit weights and their block scales in `model`'s `ShardableLinear4bit`
    modules: this rank's shards (`local=True`) or the whole unpadded weights."""
    total = 0
    for module in model.modules():
        if isinstance(module, ShardableLinear4bit):
            units = module.units
            if local and hasattr(units, "to_local"):
                units = units.to_local()  # a DTensor's numel() is the global one
            total += units.numel() * units.element_size()
    return total


def shard_qlora_model(model: nn.Module, mesh=None, mp_policy=None, reshard_after_forward: bool = True,
                      layer_types: Optional[tuple] = None, unsplittable: str = "error") -> nn.Module:
    """Apply FSDP2 to a (Q)LoRA model: 4-bit bases put in the shardable layout
    (`prepare_4bit_for_fsdp`), `fully_shard` on every decoder layer (modules whose class name
    ends with "DecoderLayer", or instances of `layer_types`) and on the root.

    mesh: a 1-D DeviceMesh (default: all ranks of the default process group). mp_policy: an FSDP2
    `MixedPrecisionPolicy` (adapters compute in its param_dtype; 4-bit bytes are never cast).
    unsplittable: "error" (a ValueError naming the first 4-bit weight that cannot be split on
    block boundaries) or "replicate" (such weights stay plain `Linear4bit`s, kept whole on every
    rank: FSDP2 ignores their parameters). Fused 4-bit MoE experts (`Experts4bit`) shard their
    packed bytes as any parameter (their block scales, a small part, stay whole on every rank).
    Needs an initialised process group. Returns the model (now an FSDPModule).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("shard_qlora_model needs torch.distributed initialised (e.g. run under torchrun)")
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError("model is already sharded with FSDP2 (fully_shard / shard_qlora_model): shard it once")
    if mesh is None:
        device = next((p.device.type for p in model.parameters()), "cpu")
        mesh = init_device_mesh(device, (dist.get_world_size(),))
    if mesh.ndim != 1:
        raise ValueError(f"mesh must be 1-D (plain FSDP sharding), got a {mesh.ndim}-D mesh {tuple(mesh.shape)}")
    if mp_policy is None:
        mp_policy = MixedPrecisionPolicy()
    elif not isinstance(mp_policy, MixedPrecisionPolicy):
        raise TypeError(
            f"mp_policy must be a torch.distributed.fsdp.MixedPrecisionPolicy, got {type(mp_policy).__name__}"
        )
    prepare_4bit_for_fsdp(model, unsplittable)
    ignored = {p for m in model.modules() if isinstance(m, Linear4bit) and not isinstance(m, ShardableLinear4bit)
               for p in m.parameters(recurse=False)}
    if layer_types is None:
        layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    else:
        layers = [m for m in model.modules() if isinstance(m, tuple(layer_types))]
    if not layers:
        raise ValueError("shard_qlora_model found no decoder layers to shard: pass layer_types=(YourLayerClass,)")
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward,
                    ignored_params=ignored or None)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward,
                ignored_params=ignored or None)
    return model


@contextlib.contextmanager
def unsharded(model: nn.Module):
    """Every FSDP2 module of `model` unsharded (one all-gather each, on entry, on every rank) until
    exit, where they are resharded. Forwards inside run no collectives, so ranks may run different
    numbers of them: generation that stops at a different length on each rank (GRPO sampling).
    Meanwhile each rank holds the whole model (the 4-bit bytes of every layer, not a bf16 copy).
    A model without FSDP2 modules is left alone."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    # whether each module reshards after forward (FSDP2 keeps it in its parameter group)
    groups = [m._get_fsdp_state()._fsdp_param_group for m in modules]
    before = [g is None or g.post_forward_mesh_info is not None for g in groups]
    for m in modules:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m, reshard in zip(modules, before):
            m.set_reshard_after_forward(reshard, recurse=False)
            m.reshard()


def check_optimizer_params(model: nn.Module, optimizer, name: str = "optimizer") -> None:
    """ValueError when `optimizer` steps tensors that are not parameters of `model`: an optimizer
    built before `shard_qlora_model` holds the pre-sharding tensors, which FSDP2 replaced by
    DTensor shards, so its steps would silently leave the model unchanged."""
    params = {id(p) for p in model.parameters()}
    stale = sum(id(p) not in params for group in optimizer.param_groups for p in group["params"])
    if stale:
        raise ValueError(f"{name} holds {stale} tensor(s) that are not parameters of the model (built before "
                         "shard_qlora_model? FSDP2 replaces the parameters): build it after sharding")
