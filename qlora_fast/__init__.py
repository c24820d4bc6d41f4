"""qlora_fast: NF4 quantization, fused LoRA/QLoRA kernels, paged optimizers and trainers.

Public names are imported lazily so that `import qlora_fast` stays cheap and never pulls
Triton or the compiled extension until they are used.
"""
import importlib

__version__ = "0.1.0"

_LAZY = {
    "quantize_4bit": "qlora_fast.functional",
    "dequantize_4bit": "qlora_fast.functional",
    "QuantState": "qlora_fast.quant_state",
    "replace_linear": "qlora_fast.nn",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qlora_fast' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def load_extension():
    """Return the compiled extension `qlora_fast._C`, building it on first use if needed.

    Raises ImportError naming what is missing when it can be neither imported nor built.
    """
    from qlora_fast._extension import load

    return load()


__all__ = sorted(_LAZY) + ["load_extension", "__version__"]
