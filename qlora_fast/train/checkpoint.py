"""Checkpoints that resume a run exactly: the trainable parameters (the adapter), optimizer,
scheduler, every RNG (torch CPU and CUDA, Python, NumPy), the step and any extra state.

One file per checkpoint, written atomically (temp file in the same directory + os.replace), so a
crash mid-save leaves the previous checkpoint intact. The GRPO trainer uses the same helpers.

Each checkpoint records what identifies its run (`run_identity`: the model and its adapters, the
data, the seed, the optimizer and the hyperparameters that shape the trajectory); loading into a
different run raises ValueError naming what differs, and `resolve_resume` makes "resume, but
there is nothing to resume" an explicit choice rather than a silent fresh start.
"""
import hashlib
import json
import os
import random
import re
import warnings
from typing import Iterable, Optional

import torch
from torch import nn

from qlora_fast.utils import (  # noqa: F401 (check_finite_state: re-exported for trainers)
    atomic_write,
    check_finite_state,
)

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

        name, keys, pos, has_gauss, cached = np.random.get_state()
        # as a tensor, not an ndarray: the checkpoint then loads with torch.load(weights_only=True)
        state["numpy"] = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
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

        name, keys, *rest = state["numpy"]
        keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys
        np.random.set_state((name, keys.astype(np.uint32), *rest))


def atomic_torch_save(obj, path: str) -> None:
    """torch.save to a temp file beside `path`, then os.replace onto it."""
    atomic_write(path, lambda f: torch.save(obj, f))


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> dict:
    """What identifies a model without hashing all its weights: the base (every tensor's name,
    shape and dtype, and the first values of the frozen ones) and the adapters (trainable names
    and shapes, the PEFT config when there is one)."""
    model = unwrap(model)
    base, adapters = [], []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                adapters.append((name, list(p.shape)))
            else:
                # FSDP2: this rank's shard (rank 0's holds the first values; no collective)
                local = p.to_local() if hasattr(p, "to_local") else p
                head = local.detach().reshape(-1)[:4].cpu()
                base.append(
                    (name, list(p.shape), str(p.dtype), (head.real if head.is_complex() else head).double().tolist())
                )
    peft = getattr(model, "peft_config", None)
    peft = (
        peft.to_dict()
        if hasattr(peft, "to_dict")
        else (vars(peft) if peft is not None and hasattr(peft, "__dict__") else peft)
    )
    identity = {"model": f"{type(model).__name__}:{_digest(base)}", "adapters": _digest(adapters)}
    if isinstance(peft, dict):  # one entry per field, so a refusal names the field that changed
        identity.update({f"peft_config.{k}": v for k, v in peft.items()})
    elif peft is not None:
        identity["peft_config"] = peft
    return identity


def run_identity(model: nn.Module, config: Optional[dict] = None, data=None, ignore: Iterable[str] = ()) -> dict:
    """What a checkpoint must share with the run that resumes it: `model_fingerprint(model)`, a
    hash of `data` (its JSON form) and the `config` dict minus the keys in `ignore` (those a
    resumed run may change: max steps, logging, output paths...)."""
    identity = model_fingerprint(model)
    if data is not None:
        identity["data"] = _digest(data)
    for k, v in (config or {}).items():
        if k not in set(ignore):
            identity[f"config.{k}"] = v
    return json.loads(json.dumps(identity, default=repr))  # plain JSON values compare reliably


# Run-identity keys of config fields renamed since (old -> new: the trainer configs, `train.core`,
# and LoraConfig, `peft.config`), so older checkpoints resume.
RENAMED_KEYS = {"config.grad_accum": "config.gradient_accumulation_steps",
                "config.grad_accum_steps": "config.gradient_accumulation_steps",
                "peft_config.alpha": "peft_config.lora_alpha", "peft_config.dropout": "peft_config.lora_dropout"}


def check_same_run(saved: Optional[dict], current: Optional[dict], path: str) -> None:
    """Raise ValueError naming every field in which the checkpoint `path`'s run differs from this one."""
    if current is None:
        return
    if saved is None:
        warnings.warn(f"checkpoint {path} records no run identity (written by an older version): "
                      "cannot check that it belongs to this run", stacklevel=3)
        return
    saved = {RENAMED_KEYS.get(k, k): v for k, v in saved.items()}  # written before a config field was renamed
    diffs = [f"{k}: checkpoint {saved.get(k, '<absent>')!r}, this run {current.get(k, '<absent>')!r}"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        raise ValueError(f"checkpoint {path} belongs to a different run; refusing to resume it ("
                         + "; ".join(diffs[:8]) + ("; ..." if len(diffs) > 8 else "")
                         + "). Use another output directory, or the original settings.")


def resolve_resume(resume_from: Optional[str], directory: Optional[str], allow_fresh: bool = False, *,
                   latest=None, exists=os.path.isfile, kind: str = "checkpoint file",
                   pattern: str = "checkpoint-*.pt") -> Optional[str]:
    """The checkpoint to resume from: `resume_from` itself (it must exist), or for "latest" the
    newest in `directory`. When "latest" finds none, FileNotFoundError naming the directory,
    unless `allow_fresh` (then None: start from step 0). None / "" means no resume. The rules of
    every trainer; sharded checkpoint folders (`qlora_fast.distributed`) pass their own `latest`,
    `exists`, `kind` and `pattern`."""
    if not resume_from:
        return None
    if resume_from != "latest":
        if not exists(resume_from):
            raise FileNotFoundError(f"no {kind} at {resume_from!r}")
        return resume_from
    found = (latest or latest_checkpoint)(directory) if directory else None
    if found is None and not allow_fresh:
        where = f"in {directory!r}" if directory else "(no output directory set)"
        raise FileNotFoundError(
            f"resume asked for, but there is no {pattern} {where}; "
            "start a fresh run without resume, or allow it explicitly (allow_fresh=True / --resume-if-exists)"
        )
    return found


def save_checkpoint(
    path: str,
    model: nn.Module,
    optimizer=None,
    scheduler=None,
    step: int = 0,
    extra: Optional[dict] = None,
    run: Optional[dict] = None,
) -> str:
    """Write a checkpoint to the file `path` atomically and return `path`. `run`: the run's
    `run_identity`, checked by `load_checkpoint`. Refuses (FloatingPointError) NaN/inf parameters."""
    trainable = trainable_state_dict(model)
    check_finite_state(trainable, f"checkpoint {path}")
    state = {
        "step": int(step),
        "run": run,
        "trainable": trainable,
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "rng": rng_state(),
        "extra": extra or {},
    }
    atomic_torch_save(state, path)
    return path


def _numpy_globals() -> list:
    """The numpy types an ndarray pickles with (older checkpoints hold numpy's RNG state)."""
    try:
        import numpy as np
    except ImportError:
        return []
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def read_checkpoint(path: str) -> dict:
    """The dict `save_checkpoint` wrote to `path`; FileNotFoundError, or ValueError naming the file
    when it is truncated, corrupt or not a checkpoint."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        # weights_only: a checkpoint is data, and loading one must not run code from the file;
        # checkpoints written before the numpy RNG state was stored as a tensor need numpy's types
        with torch.serialization.safe_globals(_numpy_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError... for a damaged file
        raise ValueError(f"checkpoint {path} is unreadable (truncated or corrupt; delete it to resume from an "
                         f"earlier one): {type(e).__name__}: {e}") from e
    needed = ("step", "trainable", "optimizer", "scheduler", "rng", "extra")
    if not isinstance(state, dict) or any(k not in state for k in needed):
        raise ValueError(f"{path} is not a qlora_fast checkpoint (expected the keys {needed})")
    return state


def load_checkpoint(path: str, model: nn.Module, optimizer=None, scheduler=None, restore_rng: bool = True,
                    run: Optional[dict] = None, check_extra=None) -> dict:
    """Restore what `save_checkpoint` wrote into `model` (its trainable parameters, by name),
    `optimizer`, `scheduler` and the RNGs. Returns {"step": int, "extra": dict}.
    Raises FileNotFoundError or ValueError (naming the file) when the checkpoint is unreadable,
    does not fit the model, or was written by a different run than `run` (a `run_identity`).
    On an error the model's parameters and the optimizer's state are left as they were.
    `check_extra(extra)`, when given, raises to refuse the checkpoint's extra state (what the
    caller restores from it afterwards) before anything is changed. A model
    with merged LoRA layers is refused: the restored adapter would not reach their output, and
    unmerging would corrupt the base."""
    from qlora_fast.nn.lora import check_unmerged

    check_unmerged(unwrap(model), f"checkpoint {path}")
    state = read_checkpoint(path)
    check_same_run(state.get("run"), run, path)
    params = dict(unwrap(model).named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state["trainable"]]
    unknown = [n for n in state["trainable"] if n not in params]
    wrong = [n for n, t in state["trainable"].items() if n in params and tuple(t.shape) != tuple(params[n].shape)]
    if missing or unknown or wrong:
        raise ValueError(f"checkpoint {path} does not fit the model: missing {missing[:5]}, unknown {unknown[:5]}, "
                         f"wrong shape {wrong[:5]}")
    if check_extra is not None:
        check_extra(state["extra"])
    backup = {n: params[n].detach().clone() for n in state["trainable"]}
    # A load replaces the optimizer's state tensors rather than writing into them, so the old
    # state_dict stays intact as a backup.
    restore_optimizer = optimizer is not None and state["optimizer"] is not None
    optimizer_backup = optimizer.state_dict() if restore_optimizer else None
    try:
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                params[name].copy_(tensor)
        if optimizer is not None and state["optimizer"] is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
    except Exception as e:
        with torch.no_grad():
            for name, tensor in backup.items():
                params[name].copy_(tensor)
        if restore_optimizer:
            optimizer.load_state_dict(optimizer_backup)
        raise ValueError(f"checkpoint {path} could not be restored: {type(e).__name__}: {e}") from e
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
