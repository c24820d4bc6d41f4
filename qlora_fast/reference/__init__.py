"""Plain-PyTorch references: the CPU path, the kernels' test oracle, and a benchmark baseline."""
from .lora import *  # noqa: F401,F403
from .quant import *  # noqa: F401,F403
