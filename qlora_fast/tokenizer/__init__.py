"""Tokenizers behind one interface (`Tokenizer`): byte-level now, byte-level BPE beside it."""
from .base import ByteTokenizer, Tokenizer  # noqa: F401

__all__ = ["Tokenizer", "ByteTokenizer"]
