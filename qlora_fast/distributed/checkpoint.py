"""Sharded checkpoints of the trainable part of a (Q)LoRA model with `torch.distributed.checkpoint`.

`save_adapter_checkpoint` writes the trainable parameters (the adapters; the frozen 4-bit base is
rebuilt from the base model, not saved) and the optimizer state (torch's optimizers, or
qlora_fast's, paged or not, 32-bit or 8-bit), each rank writing its own shards, to a folder;
`load_adapter_checkpoint` reads it back on any world size (DCP reshards DTensors, and loads into
plain tensors in a single process without a process group).

32-bit states and 8-bit codes are per element and shard like their parameters. 8-bit absmax are
per 256-block of each rank's shard: they are saved as one table row per rank and mapped onto the
loading sharding's blocks: bit-identical on the same world size (and wherever shard boundaries
fall on block boundaries), requantized (within half a code step) where a new block straddles two
saved ones.
The folder appears only once every rank has finished (written under `<path>.partial`, then
renamed), and a load fills copies first, so a failed load leaves the model and optimizer as they were.
"""
import copy
import os
import re
import shutil
import warnings
from typing import Optional

import torch
from torch import nn

from qlora_fast.utils import _exchange

__all__ = ["save_adapter_checkpoint", "load_adapter_checkpoint", "save_trainer_checkpoint", "load_trainer_checkpoint",
           "sharded_checkpoint_path", "resolve_sharded_resume"]


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _barrier():
    dist = _dist()
    if dist is not None:
        dist.barrier()


def _state(model: nn.Module, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    from .fsdp import check_optimizer_params

    check_optimizer_params(model, optimizer)
    # the trainable parameters by name (FSDP2 keeps the names; under it they are DTensor shards).
    # Not model.state_dict(): 4-bit modules add bitsandbytes-style keys that DCP's helpers reject.
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("model has no trainable parameters to checkpoint")
    optim = _optimizer_state(model, optimizer, get_optimizer_state_dict)
    for name, state in optim["state"].items():
        p = trainable.get(name)
        if not isinstance(state, dict) or "kind" not in state or p is None or hasattr(p, "to_local"):
            continue
        # qlora_fast states of an unsharded parameter in the layout of sharded ones (per-element
        # states shaped like the parameter, 8-bit absmax a one-row table), so that one checkpoint
        # format loads on any world size
        for key in ("exp_avg", "exp_avg_sq", "exp_avg_codes", "exp_avg_sq_codes"):
            if key in state:
                state[key] = state[key].reshape(p.shape)
        for key in ("exp_avg_absmax", "exp_avg_sq_absmax"):
            if key in state and state[key].dim() == 1:
                state[key] = state[key].reshape(1, -1)
    return {"model": trainable, "optim": optim}


def _optimizer_state(model: nn.Module, optimizer, get_optimizer_state_dict) -> dict:
    """torch's get_optimizer_state_dict, without its side effects on an optimizer that has not
    stepped yet: torch creates the states by a zero-lr step (which counts as a step: the next
    real one would use other bias corrections) and skips that when any gradient is set (then the
    state is empty and nothing is saved or loaded). Here the gradients are set aside for it, the
    states it made are returned as never stepped, and the optimizer is put back as it was."""
    if optimizer.state:
        return get_optimizer_state_dict(model, optimizer)
    before = copy.deepcopy(optimizer.state_dict())
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        optim = get_optimizer_state_dict(model, optimizer)
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.load_state_dict(before)
    for state in optim["state"].values():
        if isinstance(state, dict) and "step" in state:
            step = state["step"]
            state["step"] = torch.zeros_like(step) if isinstance(step, torch.Tensor) else 0
    return optim


def _saved_shapes(state: dict, path: str) -> None:
    """Give the 8-bit absmax tables of `state` the saved shapes (they depend on the saving world
    size): plain tensors, which every rank reads whole. Plain optimizer states saved flat (by an
    unsharded optimizer before they were saved shaped like their parameters) are read flat."""
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    for name, entry in state["optim"]["state"].items():
        if not isinstance(entry, dict):
            continue
        for key, value in entry.items():
            meta = saved.get(f"optim.state.{name}.{key}")
            if not hasattr(meta, "size") or not isinstance(value, torch.Tensor):
                continue
            if key in ("exp_avg_absmax", "exp_avg_sq_absmax") and len(meta.size) == 2:  # the whole table
                entry[key] = torch.zeros(tuple(meta.size), dtype=torch.float32)
            elif value.shape != meta.size and not hasattr(value, "to_local") and value.numel() == meta.size.numel():
                entry[key] = value.reshape(meta.size)


_EXTRA = "trainer_state.pt"


def save_adapter_checkpoint(model: nn.Module, optimizer, path: str, extra: Optional[dict] = None,
                            overwrite: bool = False) -> None:
    """Save the trainable parameters and optimizer state of `model` (FSDP2-sharded or not) to the
    folder `path`, which must not exist yet (FileExistsError) unless `overwrite` (then the old
    folder is replaced only once the new one is complete). Call on every rank. `extra`: the
    trainer state (step, scheduler state, history...: plain Python values and tensors), written
    once by rank 0 and returned by `load_adapter_checkpoint`."""
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}")
    import torch.distributed.checkpoint as dcp

    path = os.path.normpath(os.fspath(path))  # "ck/" would put ck/.partial inside the folder it replaces
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"checkpoint folder {path!r} already exists; choose a new path")
    state = _state(model, optimizer)
    partial = path + ".partial"
    dist = _dist()
    if dist is None or dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    _barrier()
    dcp.save(state, checkpoint_id=partial, no_dist=dist is None)
    if dist is None or dist.get_rank() == 0:
        torch.save({} if extra is None else extra, os.path.join(partial, _EXTRA))
    _barrier()
    if dist is None or dist.get_rank() == 0:
        if os.path.exists(path):  # overwrite: the old folder goes only once the new one is complete
            if _exchange(partial, path):  # one atomic swap (Linux): the old folder is now `partial`
                shutil.rmtree(partial)
            else:  # two renames: a crash between them leaves the old folder whole as `path`.old
                shutil.rmtree(path + ".old", ignore_errors=True)
                os.replace(path, path + ".old")
                os.replace(partial, path)
                shutil.rmtree(path + ".old")
        else:
            os.replace(partial, path)
    _barrier()


def load_adapter_checkpoint(model: nn.Module, optimizer, path: str) -> dict:
    """Load a `save_adapter_checkpoint` folder into `model` and `optimizer` (same parameter names;
    any world size) and return its `extra` trainer state. Call on every rank. FileNotFoundError
    for a missing folder, ValueError for missing or mis-shaped entries; on error the model and
    optimizer are left as they were."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    from qlora_fast.nn.lora import check_unmerged

    path = os.path.normpath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint folder at {path!r}")
    check_unmerged(model, f"checkpoint {path!r}")
    extra = torch.load(os.path.join(path, _EXTRA), weights_only=True)
    # DCP's helpers create the states of a fresh optimizer: restore them if the load fails
    optimizer_before = copy.deepcopy(optimizer.state_dict())
    try:
        state = _state(model, optimizer)
        # fill copies (the state dicts may hand out live tensors) so a failed read changes nothing
        state = torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), state)
        _saved_shapes(state, path)
        dcp.load(state, checkpoint_id=path, no_dist=_dist() is None)
    except CheckpointException as e:  # a BaseException in torch: made an ordinary, catchable error
        optimizer.load_state_dict(optimizer_before)
        raise ValueError(f"checkpoint {path!r} does not match this model/optimizer (names or shapes): {e}") from None
    except Exception:
        optimizer.load_state_dict(optimizer_before)
        raise
    set_optimizer_state_dict(model, optimizer, state["optim"])  # checks the state; then the copies cannot fail
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["model"].items():
            params[name].copy_(value)
    return extra


# ---------------------------------------------------------------------------- trainer checkpoints
# The sharded counterpart of qlora_fast.train.checkpoint for trainers on an FSDP2 model: one DCP
# folder `checkpoint-<step>` per checkpoint (adapters and optimizer sharded) whose trainer state
# holds the step, the scheduler, every rank's RNG state, the run identity and the trainer's extra.
_DCP_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def sharded_checkpoint_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"checkpoint-{step}")


def _latest(directory: str) -> Optional[str]:
    if not os.path.isdir(directory):
        return None
    steps = [int(m.group(1)) for f in os.listdir(directory)
             if (m := _DCP_PATTERN.match(f)) and os.path.isfile(os.path.join(directory, f, _EXTRA))]
    return sharded_checkpoint_path(directory, max(steps)) if steps else None


def resolve_sharded_resume(resume_from: Optional[str], directory: Optional[str], allow_fresh: bool = False):
    """`qlora_fast.train.checkpoint.resolve_resume` for sharded checkpoint folders: `resume_from`
    itself (it must be a folder), or for "latest" the newest `checkpoint-<step>` folder in
    `directory` (FileNotFoundError when there is none, unless `allow_fresh`: then None)."""
    from qlora_fast.train.checkpoint import resolve_resume

    return resolve_resume(resume_from, directory, allow_fresh, latest=_latest, exists=os.path.isdir,
                          kind="sharded checkpoint folder", pattern="sharded checkpoint-<step> folder")


def _rng_states() -> list:
    """Every rank's RNG states (`rng_state`: tensors and plain values, so the trainer state loads
    with weights_only=True), gathered on every rank."""
    from qlora_fast.train.checkpoint import rng_state

    state = rng_state()
    dist = _dist()
    if dist is None:
        return [state]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, state)
    return out


def _set_rng(states: list) -> None:
    """This rank's RNG states (rank 0's when the checkpoint was written by another world size)."""
    from qlora_fast.train.checkpoint import set_rng_state

    dist = _dist()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)
    set_rng_state(states[rank] if len(states) == world else states[0])


def save_trainer_checkpoint(path: str, model: nn.Module, optimizer, scheduler=None, step: int = 0,
                            extra: Optional[dict] = None, run: Optional[dict] = None) -> str:
    """Write a trainer checkpoint of an FSDP2 (or unsharded) model to the folder `path` (replaced
    once complete if it exists): adapters and optimizer as `save_adapter_checkpoint`, plus the
    step, scheduler state, RNG states, `extra` and the run identity `run`. Call on every rank.
    FloatingPointError (on every rank, nothing written) for NaN/inf adapters."""
    from qlora_fast.utils import check_finite_state

    bad = torch.zeros(())
    for name, p in model.named_parameters():
        if p.requires_grad:
            local = p.to_local() if hasattr(p, "to_local") else p
            bad += (~torch.isfinite(local.detach())).any().float().cpu()
    dist = _dist()
    if dist is not None:
        dist.all_reduce(bad)
    if bad.item():
        trainable = {n: (p.to_local() if hasattr(p, "to_local") else p) for n, p in model.named_parameters()
                     if p.requires_grad}
        check_finite_state(trainable, f"checkpoint {path}")  # names the tensor on the rank that has it
        raise FloatingPointError(f"checkpoint {path}: an adapter tensor on another rank is NaN or inf; not saved")
    rng = _rng_states()
    state = {"step": int(step), "run": run, "scheduler": None if scheduler is None else scheduler.state_dict(),
             "rng": rng, "world_size": len(rng), "extra": extra or {}}
    save_adapter_checkpoint(model, optimizer, path, extra=state, overwrite=True)
    return path


def load_trainer_checkpoint(path: str, model: nn.Module, optimizer, scheduler=None, run: Optional[dict] = None) -> dict:
    """Restore a `save_trainer_checkpoint` folder (any world size; RNG states per rank when the
    world size is the same). Call on every rank. Returns {"step", "extra"}. ValueError (on every
    rank, nothing changed) when another run wrote it (rank 0 compares `run`: under FSDP2 only
    rank 0's shard holds the fingerprinted values) or it does not fit."""
    from qlora_fast.train.checkpoint import check_same_run

    path = os.path.normpath(os.fspath(path))
    extra_file = os.path.join(path, _EXTRA)
    if not os.path.isfile(extra_file):
        raise FileNotFoundError(f"no sharded checkpoint folder at {path!r}")
    saved = torch.load(extra_file, weights_only=True)
    if not isinstance(saved, dict) or not {"step", "run", "scheduler", "rng", "extra"} <= saved.keys():
        raise ValueError(f"{path} is not a qlora_fast trainer checkpoint (a save_adapter_checkpoint folder?)")
    dist = _dist()
    error = [None]
    if dist is None or dist.get_rank() == 0:
        try:
            check_same_run(saved["run"], run, path)
        except ValueError as e:
            error[0] = str(e)
    if dist is not None:
        dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise ValueError(error[0])
    world = dist.get_world_size() if dist is not None else 1
    if saved.get("world_size", world) != world:
        warnings.warn(f"checkpoint {path} was written by {saved['world_size']} ranks, resumed on {world}: adapters and "
                      "optimizer states are resharded, but each rank's data and RNG streams differ from the saved "
                      "run's, so training continues, not bit-identically", RuntimeWarning, stacklevel=2)
    scheduler_before = None if scheduler is None else copy.deepcopy(scheduler.state_dict())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params_before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer_before = copy.deepcopy(optimizer.state_dict())
    load_adapter_checkpoint(model, optimizer, path)
    if scheduler is not None and saved["scheduler"] is not None:
        try:
            scheduler.load_state_dict(saved["scheduler"])
        except Exception as e:  # put back what the adapter load changed: all or nothing
            scheduler.load_state_dict(scheduler_before)
            with torch.no_grad():
                for name, p in trainable.items():
                    p.copy_(params_before[name])
            optimizer.load_state_dict(optimizer_before)
            raise ValueError(f"checkpoint {path!r}: the scheduler state does not fit this scheduler "
                             f"({type(e).__name__}: {e}); nothing was changed") from e
    _set_rng(saved["rng"])
    return {"step": saved["step"], "extra": saved["extra"]}
