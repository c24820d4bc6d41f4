"""BPE speed on the CPU against the peers, on the same inputs in one run.

- encode throughput (MB/s of UTF-8 text): our BPETokenizer (C++ merge loop, and the pure-Python
  fallback) vs tiktoken built from the *same* ranks and pattern (no download: the ranks are
  trained here on the shipped corpus);
- training time: our trainer vs Hugging Face `tokenizers`' BpeTrainer (byte-level, GPT-2 split)
  with the same vocabulary size on the same texts.

Run `pytest bench/bench_tokenizer.py --benchmark-only` for pytest-benchmark tables, or
`python bench/bench_tokenizer.py` for a short summary with the ratios (used for RESULTS.md).
The encode text is held out from training: Python sources of installed packages plus varied
multilingual text, so neither side gets a free ride from repetition.
"""
import glob
import os
import random
import time

import pytest
from timing import run_times

from qlora_fast.tokenizer import BPETokenizer
from qlora_fast.tokenizer import bpe as bpe_module

VOCAB_SIZE = 4096
_HERE = os.path.dirname(os.path.abspath(__file__))
_CORPUS = os.path.join(_HERE, "..", "qlora_fast", "data", "corpus.txt")


def training_texts():
    """The shipped corpus plus Python sources (many distinct words, so merges are meaningful)."""
    import torch

    texts = [open(_CORPUS, encoding="utf-8").read()] if os.path.exists(_CORPUS) else []
    files = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "nn", "*.py")))
    texts += [open(f, encoding="utf-8").read() for f in files]
    return texts


def encode_text(target_bytes: int = 1_000_000) -> str:
    import torch

    files = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "optim", "*.py")))
    rng = random.Random(0)
    words = ["Привет", "мир", "日本語の文章", "emoji 😀👍🏽", "naïve café", "  \n\t", "12345", "don't", "ελληνικά"]
    parts, size = [], 0
    while size < target_bytes:
        for f in files:
            text = open(f, encoding="utf-8").read()
            text += " ".join(rng.choice(words) for _ in range(2000))
            parts.append(text)
            size += len(text.encode("utf-8"))
            if size >= target_bytes:
                break
    return "".join(parts)


@pytest.fixture(scope="module")
def trained():
    return BPETokenizer.train(training_texts(), VOCAB_SIZE, pattern="cl100k", progress=False)


@pytest.fixture(scope="module")
def text():
    return encode_text()


def _mbps(benchmark, text):
    benchmark.extra_info["MB"] = len(text.encode("utf-8")) / 1e6


@pytest.mark.parametrize("provider", ["qlora_fast", "qlora_fast-python", "tiktoken"])
def test_encode(benchmark, trained, text, provider):
    if provider == "tiktoken":
        tiktoken = pytest.importorskip("tiktoken")
        enc = tiktoken.Encoding("bench", **trained.tiktoken_kwargs())
        _mbps(benchmark, text)
        benchmark.pedantic(enc.encode_ordinary, args=(text,), rounds=3, iterations=1, warmup_rounds=1)
        return
    if provider == "qlora_fast" and bpe_module._native is None:
        pytest.skip("qlora_fast._bpe is not built")

    def fresh():
        # A new tokenizer each round: its piece cache starts empty (tiktoken keeps no cache).
        tok = fresh_tokenizer(trained, python=provider == "qlora_fast-python")
        return (tok, text), {}

    _mbps(benchmark, text)
    benchmark.pedantic(lambda tok, t: tok.encode_ordinary(t), setup=fresh, rounds=3, iterations=1)


def fresh_tokenizer(trained, python=False):
    tok = BPETokenizer(trained.mergeable_ranks, trained.pattern, trained.special_tokens)
    if python:
        tok._native = None
    return tok


@pytest.mark.parametrize("provider", ["qlora_fast", "hf_tokenizers"])
def test_train(benchmark, provider):
    texts = training_texts()
    if provider == "hf_tokenizers":
        pytest.importorskip("tokenizers")
        fn = lambda: train_hf(texts)  # noqa: E731
    else:
        fn = lambda: BPETokenizer.train(texts, VOCAB_SIZE, pattern="gpt2", progress=False)  # noqa: E731
    benchmark.pedantic(fn, rounds=2, iterations=1)


def train_hf(texts):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def _best(fn, rounds=3):
    return min(run_times(fn, rounds))


def _best_fresh(make, text, rounds=3):
    times = []
    for _ in range(rounds):
        tok = make()
        t = time.perf_counter()
        tok.encode_ordinary(text)
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    import tiktoken

    texts = training_texts()
    text = encode_text()
    mb = len(text.encode("utf-8")) / 1e6
    ours = BPETokenizer.train(texts, VOCAB_SIZE, pattern="cl100k", progress=False)
    enc = tiktoken.Encoding("bench", **ours.tiktoken_kwargs())
    assert ours.encode_ordinary(text) == enc.encode_ordinary(text)
    t_tik = _best(lambda: enc.encode_ordinary(text))
    t_warm = _best(lambda: ours.encode_ordinary(text))
    t_cold = _best_fresh(lambda: fresh_tokenizer(ours), text)
    t_py = _best_fresh(lambda: fresh_tokenizer(ours, python=True), text, rounds=1)
    t_split = _best(lambda: ours._pat.findall(text))
    print(f"encode {mb:.2f} MB, vocab {VOCAB_SIZE}, cl100k pattern, native={bpe_module._native is not None}")
    print(f"  tiktoken                        {mb / t_tik:7.2f} MB/s")
    print(f"  qlora_fast C++, empty cache     {mb / t_cold:7.2f} MB/s   {t_tik / t_cold:.2f}x tiktoken's throughput")
    print(f"  qlora_fast C++, warm cache      {mb / t_warm:7.2f} MB/s   {t_tik / t_warm:.2f}x tiktoken's throughput")
    print(f"  qlora_fast python, empty cache  {mb / t_py:7.2f} MB/s   {t_tik / t_py:.2f}x tiktoken's throughput")
    print(f"  regex split alone (python)      {mb / t_split:7.2f} MB/s")
    corpus_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    t_train = _best(lambda: BPETokenizer.train(texts, VOCAB_SIZE, pattern="gpt2", progress=False), rounds=2)
    t_hf = _best(lambda: train_hf(texts), rounds=2)
    print(
        f"train {corpus_mb:.2f} MB to vocab {VOCAB_SIZE}: qlora_fast {t_train:.2f} s, HF tokenizers {t_hf:.2f} s "
        f"(ours takes {t_train / t_hf:.2f}x HF's time)"
    )


if __name__ == "__main__":
    main()
