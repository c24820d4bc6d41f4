"""The shipped tokenizer: a BPE trained on the shipped corpus (`qlora_fast/data/corpus.txt`) for the
built-in base model, cached on disk so it is trained once per corpus, size and pattern."""
import hashlib
import os
import warnings
from typing import Optional

from qlora_fast.utils import default_cache_dir

from .bpe_tokenizer import BPETokenizer
from .patterns import resolve_pattern

SHIPPED_CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "corpus.txt")


# The built-in base model's vocabulary: 384 tuned as well as bytes after `qlora-fast finetune` (held-out
# exact match 11.9% and 11.2% over two seeds, bytes 11.2-12.5%), 512 did worse (5.0-8.1%); see
# bench/RESULTS.md. The corpus is small (57 kB), so more merges mostly memorise whole words.
SHIPPED_BPE_VOCAB_SIZE = 384


def load_shipped_bpe(vocab_size: int = SHIPPED_BPE_VOCAB_SIZE, pattern: str = "cl100k", cache_dir: Optional[str] = None,
                     progress: bool = True, corpus_path: Optional[str] = None) -> BPETokenizer:
    """A BPE trained on the shipped corpus (`qlora_fast/data/corpus.txt`), cached on disk.

    The cache file `bpe-<key>.json` in `cache_dir` (default `default_cache_dir()`) is keyed by the
    corpus bytes, vocab size and pattern, so a changed corpus retrains. Written atomically.
    Raises FileNotFoundError when the corpus is missing.
    """
    corpus_path = corpus_path or SHIPPED_CORPUS
    with open(corpus_path, "rb") as f:
        corpus = f.read()
    key = hashlib.sha256(corpus + f"|{vocab_size}|{resolve_pattern(pattern)}|v1".encode()).hexdigest()[:16]
    path = os.path.join(cache_dir or default_cache_dir(), f"bpe-{key}.json")
    if os.path.exists(path):
        try:
            return BPETokenizer.load(path)
        except (OSError, ValueError) as e:  # a damaged cache entry: rebuild it rather than fail every later run
            warnings.warn(f"the cached tokenizer {path} is unreadable ({e}); training it again", stacklevel=2)
    tok = BPETokenizer.train([corpus.decode("utf-8")], vocab_size, pattern=pattern, progress=progress)
    tok.save(path)
    return tok
