"""Tokenizers behind one interface (`Tokenizer`): byte-level now, byte-level BPE beside it."""
from .base import ByteTokenizer, Tokenizer  # noqa: F401
from .bpe import CL100K_PATTERN, GPT2_PATTERN, BPETokenizer, load_shipped_bpe  # noqa: F401

__all__ = ["Tokenizer", "ByteTokenizer", "BPETokenizer", "GPT2_PATTERN", "CL100K_PATTERN", "load_shipped_bpe"]
