"""Drop-in torch.nn modules: Linear4bit, LoRALinear, QLoRALinear, and replace_linear."""
from qlora_fast.utils import lazy_getattr

_LAZY = {
    "Linear4bit": "qlora_fast.nn.linear4bit",
    "LoRALinear": "qlora_fast.nn.lora",
    "QLoRALinear": "qlora_fast.nn.lora",
    "disable_adapter": "qlora_fast.nn.lora",
    "mark_only_lora_as_trainable": "qlora_fast.nn.lora",
    "lora_modules": "qlora_fast.nn.lora",
    "replace_linear": "qlora_fast.nn.replace",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = sorted(_LAZY)
