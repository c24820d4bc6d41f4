"""Backend choice shared by every op.

QLORA_FAST_BACKEND=auto (default): Triton kernels for CUDA tensors, the PyTorch reference
otherwise. `triton`: kernels wherever Triton can run (CPU only under TRITON_INTERPRET=1).
`reference`: always the PyTorch reference.
"""
import functools
import os

import torch

_CHOICES = ("auto", "triton", "reference")
_MODES = (torch._C._TorchDispatchModeKey.PROXY, torch._C._TorchDispatchModeKey.FAKE)


_PARSED: dict = {}  # raw QLORA_FAST_BACKEND value -> checked choice (parsing it costs more than reading it)


def backend() -> str:
    """The backend asked for in QLORA_FAST_BACKEND (read at each call so tests can switch it)."""
    raw = os.environ.get("QLORA_FAST_BACKEND", "auto")
    choice = _PARSED.get(raw)
    if choice is None:
        choice = raw.lower()
        if choice not in _CHOICES:
            raise ValueError(f"QLORA_FAST_BACKEND must be one of {_CHOICES}, got {choice!r}")
        _PARSED[raw] = choice
    return choice


@functools.cache  # a failed import is not cached by Python: without this every CPU op call retries it
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _device_ok():
    from qlora_fast.kernels.utils import device_ok

    return device_ok


def use_kernels(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernels should run for these tensors."""
    choice = backend()
    if choice == "reference" or not _triton_importable():
        return False
    # plain loops, no generators: this runs on every eager call (bench/bench_host.py)
    if choice == "triton":
        device_ok = _device_ok()
        for t in tensors:
            if not device_ok(t):
                return False
        return True
    for t in tensors:
        if not t.is_cuda:
            return False
    return True


def tracing() -> bool:
    """True while torch.compile / export, make_fx or torch.jit.trace traces: then the custom ops
    (with their fake implementations) must stand for the launchers, which a tracer cannot see.
    Otherwise (eager) the ops call their implementations directly: a custom-op dispatch costs tens
    of microseconds of host time."""
    # (no generator here: this runs on every eager call)
    return (torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None
            or torch._C._get_dispatch_mode(_MODES[0]) is not None or torch._C._get_dispatch_mode(_MODES[1]) is not None)
