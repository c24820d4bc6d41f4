"""Adapter files: PEFT's layout (`adapter_config.json` + `adapter_model.safetensors`, PEFT's
tensor names), written as one unit and read back only as one.

Writing: both files go into a fresh hidden directory beside the target, which then takes the
target's place in one atomic rename (Linux `renameat2(RENAME_EXCHANGE)` when the target exists,
two renames elsewhere, where a crash between them leaves the previous adapter whole as
".old-<pid>-<name>-..." beside the target), so a crash or a full disk loses nothing. The hidden
directory is named like every temporary of the package (`utils.temp_prefix()`: ".tmp-<pid>-"), so a
killed save's leftover is removed by the next save into the same folder, and no cleaner takes one
whose writer still runs (older versions' ".tmp-<name>-" leftovers go once an hour old). The weights'
metadata holds the SHA-256 of the config written with them: a directory whose files come from two
different saves (copied by hand, or written by an older version file by file) is refused.
"""
import hashlib
import json
import os
import shutil
import time

import torch

from ..utils import atomic_write_dir
from .config import LoraConfig, PrefixTuningConfig, config_from_dict

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CONFIG_HASH = "qlora_fast_config_sha256"
OUR_CONFIG = "qlora_fast_config"  # our exact config (JSON) in the weights' metadata; PEFT ignores it
EXTRA = "qlora_fast."  # our tensors PEFT has no place for (the prefix MLP): PEFT ignores them


# ---------------------------------------------------------------------------- names
def to_peft_names(state: dict, config, prefix_flat=None) -> dict:
    """Our adapter tensors (names as `PeftModel.adapter_parameters()`) under PEFT's names.

    LoRA: `base_model.<path>.lora_A` -> `base_model.model.<path>.lora_A.weight`. Prefix/prompt:
    `prompt_embeddings` (n, ...) as PEFT stores it: the prefix flattened per virtual token
    (`prefix_flat`, (n, layers * 2 * kv_heads * head_dim)) or the soft prompt (n, hidden)."""
    if isinstance(config, LoraConfig):
        return {f"base_model.model.{name[len('base_model.'):]}.weight": t for name, t in state.items()}
    if isinstance(config, PrefixTuningConfig):
        out = {"prompt_embeddings": prefix_flat}
        if config.prefix_projection:
            out.update({EXTRA + name: t for name, t in state.items()})
        return out
    return {"prompt_embeddings": state["prompt_encoder.embedding"]}


def from_peft_names(state: dict, config, geometry=None) -> dict:
    """The inverse of `to_peft_names` (our earlier layout, our own names, passes through).
    geometry: (num_layers, kv_heads, head_dim, hidden) for a prefix."""
    out = {}
    for key, t in state.items():
        if key.startswith(EXTRA):
            out[key[len(EXTRA):]] = t
        elif key == "prompt_embeddings" and isinstance(config, PrefixTuningConfig):
            if config.prefix_projection:
                continue  # the MLP that produced it rides along under EXTRA
            layers, kv_heads, head_dim, _ = geometry
            n = config.num_virtual_tokens
            if tuple(t.shape) != (n, layers * 2 * kv_heads * head_dim):
                raise ValueError(
                    f"adapter tensor prompt_embeddings has shape {tuple(t.shape)}, this model's prefix needs "
                    f"{(n, layers * 2 * kv_heads * head_dim)} ({layers} layers x 2 x {kv_heads} kv heads x {head_dim})"
                )
            out["prompt_encoder.prefix"] = t.view(n, layers, 2, kv_heads, head_dim).permute(1, 2, 3, 0, 4).contiguous()
        elif key == "prompt_embeddings":
            out["prompt_encoder.embedding"] = t
        elif key.startswith("base_model.model.") and key.endswith((".lora_A.weight", ".lora_B.weight")):
            out["base_model." + key[len("base_model.model."):-len(".weight")]] = t
        else:
            out[key] = t
    return out


def check_state(state: dict, expected: dict, path: str) -> None:
    """ValueError unless `state` has exactly the names of `expected` ({name: shape}), each a finite
    floating tensor of that shape. Checks everything before anything is loaded."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"adapter at {path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name]):
            raise ValueError(
                f"adapter tensor {name} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[name])}"
            )
        if not tensor.is_floating_point():
            raise ValueError(f"adapter tensor {name} has dtype {tensor.dtype}, expected a floating dtype")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"adapter tensor {name} holds NaN or Inf values")


# ---------------------------------------------------------------------------- reading
def read_adapter(path: str):
    """(config, tensors by their stored names, metadata, written_by_peft) of the adapter directory
    `path`. FileNotFoundError / ValueError naming the file for anything missing, unreadable or
    inconsistent."""
    path = os.fspath(path)
    config_file, weights_file = os.path.join(path, ADAPTER_CONFIG), os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {path} (not an adapter directory)")
    if not os.path.isfile(weights_file):
        if os.path.isfile(os.path.join(path, "adapter_model.bin")):
            raise ValueError(
                f"{path} holds adapter_model.bin (a pickle); only {ADAPTER_WEIGHTS} is read: save it with "
                "safe_serialization=True"
            )
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {path}")
    with open(config_file, "rb") as f:
        raw = f.read()
    try:
        d = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file} is not valid JSON ({e})") from None
    from safetensors import safe_open

    try:
        with safe_open(weights_file, framework="pt") as f:
            metadata = f.metadata() or {}
            state = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a truncated/corrupt file
        raise ValueError(f"{weights_file} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    saved_hash = metadata.get(CONFIG_HASH)
    if saved_hash is not None and saved_hash != hashlib.sha256(raw).hexdigest():
        raise ValueError(
            f"{config_file} and {weights_file} come from different saves (the config's hash does not match "
            "the one stored with the weights); re-save the adapter"
        )
    ours = metadata.get(OUR_CONFIG)
    try:
        config = config_from_dict(json.loads(ours) if ours is not None else d)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{config_file}: {e}") from None
    written_by_peft = (
        ours is None and isinstance(d, dict) and isinstance(d.get("peft_type"), str) and d["peft_type"].isupper()
    )
    return config, state, metadata, written_by_peft


# ---------------------------------------------------------------------------- writing
STALE_AFTER_S = 3600  # an older version's temporary this old is a save that was killed, not one in progress


def _remove_stale(parent: str, prefix: str) -> None:
    """Remove older versions' temporaries (no pid in the name) of killed saves to the same path."""
    now = time.time()
    for name in os.listdir(parent):
        full = os.path.join(parent, name)
        try:
            if name.startswith(prefix) and os.path.isdir(full) and now - os.stat(full).st_mtime > STALE_AFTER_S:
                shutil.rmtree(full, ignore_errors=True)
        except OSError:
            pass


def write_adapter_dir(path: str, files: dict) -> None:
    """Make directory `path` hold `files` ({name: bytes}) in one atomic step (see the module
    docstring and `utils.atomic_write_dir`). On any error the previous `path` is untouched and
    nothing is left behind. A symlinked `path` keeps its link: the directory it points to is replaced."""
    path = os.path.realpath(os.fspath(path))
    parent = os.path.dirname(path)
    if os.path.isdir(parent):
        _remove_stale(parent, f".tmp-{os.path.basename(path)}-")
    atomic_write_dir(path, files, what="adapter path")
