"""Dispatch and autograd: the one place that chooses kernel or reference for every op.

`quant.py` holds the 4-bit quantization ops, `lora.py` the fused matmul and LoRA ops; both
choose their backend through `_dispatch.use_kernels`.
"""
from ._dispatch import backend, use_kernels  # noqa: F401
from .lora import *  # noqa: F401,F403
from .quant import *  # noqa: F401,F403
