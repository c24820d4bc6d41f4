"""Byte-level BPE, as one import: the names `qlora_fast.tokenizer.bpe` has always offered, now kept in
files that each hold one part of it:

- `bpe_tokenizer`: `BPETokenizer` (encoding, decoding, the API);
- `patterns`: the pre-tokenisation regexes;      - `merge`: the pure-Python byte-pair merge;
- `native`: the C++ extension `qlora_fast._bpe`;  - `training`: learning merges;
- `json_format`, `tiktoken_format`: the files;    - `shipped`: the shipped tokenizer's cache.
"""
from .bpe_tokenizer import DEFAULT_SPECIAL_TOKENS, BPETokenizer
from .native import SPLIT_IDS as _NATIVE_SPLIT  # noqa: F401  (private names read by tests and bench/)
from .native import ensure_char_classes as _ensure_char_classes  # noqa: F401
from .native import extension as _native  # noqa: F401
from .patterns import CL100K_PATTERN, GPT2_PATTERN, PATTERNS
from .shipped import SHIPPED_BPE_VOCAB_SIZE, SHIPPED_CORPUS, load_shipped_bpe
from .training import train_merges as _train_merges  # noqa: F401

__all__ = [
    "BPETokenizer",
    "DEFAULT_SPECIAL_TOKENS",
    "GPT2_PATTERN",
    "CL100K_PATTERN",
    "PATTERNS",
    "SHIPPED_CORPUS",
    "SHIPPED_BPE_VOCAB_SIZE",
    "load_shipped_bpe",
]
