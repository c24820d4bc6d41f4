"""Drop-in torch.nn modules: Linear4bit, LoRALinear, QLoRALinear, and replace_linear."""
import importlib

_LAZY = {
    "Linear4bit": "qlora_fast.nn.linear4bit",
    "LoRALinear": "qlora_fast.nn.lora",
    "QLoRALinear": "qlora_fast.nn.lora",
    "disable_adapter": "qlora_fast.nn.lora",
    "mark_only_lora_as_trainable": "qlora_fast.nn.lora",
    "lora_modules": "qlora_fast.nn.lora",
    "replace_linear": "qlora_fast.nn.replace",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qlora_fast.nn' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_LAZY)
