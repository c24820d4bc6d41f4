"""The C++ extension `qlora_fast._bpe` (merge loop with a cache, trainer, and a pre-tokenising
scanner for GPT-2's and cl100k's patterns), loaded once; `extension` is None without it, and the
pure-Python code gives the same ids.

QLORA_FAST_BPE=python forces the pure-Python code.
"""
import os
from typing import Optional

from .patterns import CL100K_PATTERN, GPT2_PATTERN

SPLIT_IDS = {GPT2_PATTERN: 1, CL100K_PATTERN: 2}  # patterns the C++ scanner implements


def _load():
    if os.environ.get("QLORA_FAST_BPE", "").lower() == "python":
        return None
    try:
        import torch  # noqa: F401  (the extension is built by torch's CppExtension and links libc10)

        from qlora_fast import _bpe

        return _bpe
    except ImportError:  # pragma: no cover - exercised when the extension is not built
        return None


extension = _load()
_char_classes_ready = False


def ensure_char_classes() -> None:
    """Give the C++ scanner the code-point classes \\p{L}, \\p{N}, \\s exactly as `regex` defines them."""
    global _char_classes_ready
    if _char_classes_ready:
        return
    import numpy as np
    import regex

    every_char = np.arange(0x110000, dtype="<u4").tobytes().decode("utf-32-le", "surrogatepass")
    ranges = []
    for bit, pattern in ((1, r"\p{L}+"), (2, r"\p{N}+"), (4, r"\s+")):
        ranges += [(m.start(), m.end(), bit) for m in regex.finditer(pattern, every_char)]
    extension.set_char_classes(ranges)
    _char_classes_ready = True


def split_id(pattern: str) -> Optional[int]:
    """The C++ scanner's id for the regex `pattern` (its character tables made ready), or None when
    the extension is missing or the pattern is not one it implements (the regex module splits then)."""
    split = SPLIT_IDS.get(pattern) if extension is not None and hasattr(extension, "split") else None
    if split is not None:
        ensure_char_classes()
    return split
