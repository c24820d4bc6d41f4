"""Interop with tiktoken: its ranks file ("<base64 token> <rank>" per line; the pattern and special
tokens are not part of it) and the arguments of a `tiktoken.Encoding` giving the same ids."""
import base64
import os
from typing import Dict, Mapping, Union

from qlora_fast.utils import atomic_write_bytes


def write_ranks(ranks: Mapping[bytes, int], path: Union[str, os.PathLike]) -> None:
    """Write `ranks` in tiktoken's format, in rank order, atomically."""
    lines = [f"{base64.b64encode(t).decode('ascii')} {r}\n" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    atomic_write_bytes(path, "".join(lines).encode("ascii"))


def read_ranks(path: Union[str, os.PathLike]) -> Dict[bytes, int]:
    """token bytes -> rank from a tiktoken-format file; a bad line raises ValueError naming file and line."""
    ranks: Dict[bytes, int] = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f.read().splitlines(), 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except Exception as e:
                raise ValueError(f"{os.fspath(path)}:{n}: not a '<base64> <rank>' line: {line[:80]!r}") from e
    return ranks


def encoding_kwargs(tok) -> dict:
    """Keyword arguments for `tiktoken.Encoding(name, **encoding_kwargs(tok))` giving `tok`'s ids."""
    return {"pat_str": tok.pattern, "mergeable_ranks": tok.mergeable_ranks, "special_tokens": tok.special_tokens}
