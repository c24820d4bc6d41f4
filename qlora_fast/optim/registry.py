"""The optimizer names trainers and the CLI accept, each mapped to its class.

Torch-free at import (a name maps to "module:Class", imported on first use), so the CLI can list
the choices without loading torch. `SFTConfig.optimizer`, `GRPOConfig.optimizer` and `--optimizer`
all read `OPTIMIZERS`; `make_optimizer` is the one factory the trainers use.
"""
import importlib

# name -> "module:Class". The qlora_fast ones run the compiled extension (`qlora_fast._C`).
_CLASSES = {
    "paged_adamw_8bit": "qlora_fast.optim.adam:PagedAdamW8bit",  # the QLoRA recipe: 8-bit states paged to host
    "paged_adamw": "qlora_fast.optim.adam:PagedAdamW",
    "adamw_8bit": "qlora_fast.optim.adam:AdamW8bit",
    "adamw": "qlora_fast.optim.adam:AdamW",
    "torch_adamw": "torch.optim:AdamW",
}

OPTIMIZERS = tuple(_CLASSES)


def optimizer_class(name: str):
    """The optimizer class registered as `name`; ValueError naming the choices for an unknown one."""
    if name not in _CLASSES:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    module, cls = _CLASSES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0):
    """The optimizer `name` (one of OPTIMIZERS) over `params` with this lr and decoupled weight decay."""
    return optimizer_class(name)(params, lr=lr, weight_decay=weight_decay)
