"""Tokenizers behind one interface (`Tokenizer`): byte-level, byte-level BPE, and a Hugging Face
tokenizer seen through it."""
from .base import ByteTokenizer, Tokenizer  # noqa: F401
from .bpe_tokenizer import BPETokenizer  # noqa: F401
from .hf import HFTokenizer  # noqa: F401
from .patterns import CL100K_PATTERN, GPT2_PATTERN  # noqa: F401
from .shipped import load_shipped_bpe  # noqa: F401

__all__ = ["Tokenizer", "ByteTokenizer", "BPETokenizer", "HFTokenizer", "GPT2_PATTERN", "CL100K_PATTERN",
           "load_shipped_bpe"]
