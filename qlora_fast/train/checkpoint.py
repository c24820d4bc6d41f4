"""Checkpoints that resume a run exactly: the trainable parameters (the adapter), optimizer,
scheduler, every RNG (torch CPU and CUDA, Python, NumPy), the step and any extra state.

One file per checkpoint, written atomically (temp file in the same directory + os.replace), so a
crash mid-save leaves the previous checkpoint intact. The GRPO trainer uses the same helpers.
"""
import os
import random
import re
from typing import Optional

import torch
from torch import nn

from qlora_fast.utils import atomic_write

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)\.pt$")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def trainable_state_dict(model: nn.Module) -> dict:
    """{name: tensor} of the parameters that require grad (the adapter, for a PEFT model)."""
    return {n: p.detach().cpu().clone() for n, p in unwrap(model).named_parameters() if p.requires_grad}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def atomic_torch_save(obj, path: str) -> None:
    """torch.save to a temp file beside `path`, then os.replace onto it."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(path: str, model: nn.Module, optimizer=None, scheduler=None, step: int = 0, extra: Optional[dict] = None) -> str:
    """Write a checkpoint to the file `path` atomically and return `path`."""
    state = {
        "step": int(step),
        "trainable": trainable_state_dict(model),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "rng": rng_state(),
        "extra": extra or {},
    }
    atomic_torch_save(state, path)
    return path


def load_checkpoint(path: str, model: nn.Module, optimizer=None, scheduler=None, restore_rng: bool = True) -> dict:
    """Restore what `save_checkpoint` wrote into `model` (its trainable parameters, by name),
    `optimizer`, `scheduler` and the RNGs. Returns {"step": int, "extra": dict}.
    Raises FileNotFoundError or ValueError when the checkpoint does not fit the model."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    params = dict(unwrap(model).named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state["trainable"]]
    unknown = [n for n in state["trainable"] if n not in params]
    if missing or unknown:
        raise ValueError(f"checkpoint {path} does not fit the model: missing {missing[:5]}, unknown {unknown[:5]}")
    with torch.no_grad():
        for name, tensor in state["trainable"].items():
            params[name].copy_(tensor)
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return {"step": state["step"], "extra": state["extra"]}


def checkpoint_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"checkpoint-{step}.pt")


def latest_checkpoint(directory: str) -> Optional[str]:
    """The checkpoint with the highest step in `directory`, or None."""
    if not os.path.isdir(directory):
        return None
    steps = [int(m.group(1)) for f in os.listdir(directory) if (m := CHECKPOINT_PATTERN.match(f))]
    return checkpoint_path(directory, max(steps)) if steps else None
