"""Drop-in torch.nn modules: Linear4bit, Experts4bit (fused MoE experts), LoRALinear, QLoRALinear, and
the injector that swaps them in (replace_linear; match_target_modules and wrap_linear are its two halves)."""
from qlora_fast.utils import lazy_getattr

_LAZY = {
    "Linear4bit": "qlora_fast.nn.linear4bit",
    "Experts4bit": "qlora_fast.nn.experts4bit",
    "LoRALinear": "qlora_fast.nn.lora",
    "QLoRALinear": "qlora_fast.nn.lora",
    "disable_adapter": "qlora_fast.nn.lora",
    "mark_only_lora_as_trainable": "qlora_fast.nn.lora",
    "lora_modules": "qlora_fast.nn.lora",
    "replace_linear": "qlora_fast.nn.replace",
    "match_target_modules": "qlora_fast.nn.replace",
    "wrap_linear": "qlora_fast.nn.replace",
    "conv1d_to_linear": "qlora_fast.nn.replace",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = sorted(_LAZY)
