"""Shared helpers for the Triton launchers: interpreter detection and small checks."""
import contextlib
import functools
import os

import torch

# Triton's CPU interpreter stores bf16 as raw bits: kernels that would feed bf16 to tl.dot
# or do bf16 arithmetic switch on this flag (see the interpreter notes in the README).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def device_ok(t: torch.Tensor) -> bool:
    """True when a Triton kernel can run on this tensor's device (CUDA, or CPU under the interpreter)."""
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")


@functools.lru_cache(maxsize=None)
def _several_gpus() -> bool:
    return torch.cuda.device_count() > 1


def on_device_of(t: torch.Tensor):
    """A context making `t`'s GPU the current one for a launch: Triton launches on the current
    device, not on its arguments' (a model spread over GPUs, device_map="auto", has layers on
    cuda:1 while cuda:0 is current). A no-op when it already is current, on a one-GPU host (no
    per-launch device query) and on the CPU."""
    if t.is_cuda and _several_gpus() and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
