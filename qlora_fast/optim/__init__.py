"""Optimizers: Adam/AdamW with fp32 or 8-bit blockwise states, optionally paged to host memory,
running the fused ops of the `qlora_fast._C` extension (C++ on the CPU, CUDA on the GPU)."""
from qlora_fast.optim.adam import Adam, AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit, paging_stats
from qlora_fast.optim.paging import PageManager

__all__ = ["Adam", "AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "paging_stats", "PageManager"]
