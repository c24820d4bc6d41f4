"""Optimizers: Adam/AdamW with fp32 or 8-bit blockwise states, optionally paged to host memory,
running the fused ops of the `qlora_fast._C` extension (C++ on the CPU, CUDA on the GPU).

Names are imported lazily, so the torch-free `qlora_fast.optim.registry` (the names the trainers
and the CLI accept) can be imported without torch."""
from qlora_fast.utils import lazy_getattr

_LAZY = {name: "qlora_fast.optim.adam" for name in ("Adam", "AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit",
                                                    "paging_stats")}
_LAZY.update(PageManager="qlora_fast.optim.paging", OPTIMIZERS="qlora_fast.optim.registry",
             make_optimizer="qlora_fast.optim.registry", optimizer_class="qlora_fast.optim.registry")

__getattr__ = lazy_getattr(__name__, _LAZY)

__all__ = sorted(_LAZY)
