"""qlora_fast's own tokenizer file: JSON holding the pattern, the tokens (base64) in rank order with
their ranks, the special tokens and which of them pad, begin and end a sequence. Also the pickled
state of a `BPETokenizer` (its C++ encoder cannot be pickled)."""
import base64
import json
import os
from typing import Mapping, Union

from qlora_fast.utils import atomic_write_bytes, read_json

FORMAT = "qlora_fast.bpe"


def to_dict(tok) -> dict:
    """The JSON form of a `BPETokenizer`."""
    return {
        "format": FORMAT,
        "version": 1,
        "pattern": tok.pattern,
        "mergeable_ranks": [[base64.b64encode(t).decode("ascii"), r]
                            for t, r in sorted(tok.mergeable_ranks.items(), key=lambda kv: kv[1])],
        "special_tokens": dict(sorted(tok.special_tokens.items(), key=lambda kv: kv[1])),
        "pad_token": tok.pad_token,
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
    }


def init_args(d: Mapping) -> tuple:
    """`BPETokenizer`'s positional arguments from its JSON form (ValueError if `d` is not one)."""
    if not isinstance(d, Mapping) or d.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} tokenizer description")
    if d.get("version") != 1:
        raise ValueError(f"unsupported {FORMAT} version {d.get('version')!r} (this code reads version 1)")
    ranks = {base64.b64decode(t): int(r) for t, r in d["mergeable_ranks"]}
    specials = {k: int(v) for k, v in d["special_tokens"].items()}
    return ranks, d["pattern"], specials, d["pad_token"], d["bos_token"], d["eos_token"]


def save(tok, path: Union[str, os.PathLike]) -> None:
    """Write the JSON form of `tok` to `path` atomically."""
    atomic_write_bytes(path, json.dumps(to_dict(tok), ensure_ascii=False, indent=1).encode("utf-8"))


def load(cls, path: Union[str, os.PathLike]):
    """`cls` built from a file written by `save`; a truncated or malformed file raises ValueError naming it."""
    d = read_json(path, "tokenizer")
    try:
        return cls(*init_args(d))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"tokenizer {os.fspath(path)!r} is not a qlora_fast BPE file: {type(e).__name__}: {e}") from e
