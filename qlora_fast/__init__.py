"""qlora_fast: NF4 quantization, fused LoRA/QLoRA kernels, paged optimizers and trainers.

Public names are imported lazily so that `import qlora_fast` stays cheap and never pulls
Triton or the compiled extension until they are used.
"""
from qlora_fast.utils import lazy_getattr

__version__ = "0.1.0"

_LAZY = {
    "quantize_4bit": "qlora_fast.functional",
    "dequantize_4bit": "qlora_fast.functional",
    "QuantState": "qlora_fast.quant_state",
    "replace_linear": "qlora_fast.nn",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


def load_extension():
    """Return the compiled extension `qlora_fast._C`, building it on first use if needed.

    Raises ImportError naming what is missing when it can be neither imported nor built.
    """
    from qlora_fast._extension import load

    return load()


__all__ = sorted(_LAZY) + ["load_extension", "__version__"]
