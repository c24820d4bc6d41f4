"""BPETokenizer against tiktoken (oracle) for the same ranks and pattern, against a naive trainer,
and its files, special tokens and errors. Every encoding test runs on both merge loops: the C++
extension `qlora_fast._bpe` and the pure-Python fallback."""
import base64
import os
import pickle
import random
import unicodedata
from collections import Counter

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_fast.tokenizer import BPETokenizer, Tokenizer, load_shipped_bpe
from qlora_fast.tokenizer import bpe as bpe_module

tiktoken = pytest.importorskip("tiktoken", reason="tiktoken is the test oracle (test extra)")
tiktoken_load = pytest.importorskip("tiktoken.load")

WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "I'll", "we're", "DON'T", "it's",
    "café", "naïve", "Straße", "Ærøskøbing", "привет", "мир", "Ελληνικά", "αβγ", "日本語", "東京", "中文字符",
    "한국어", "العربية", "שלום", "हिन्दी", "ภาษาไทย", "🎉", "👍🏽", "👨‍👩‍👧", "🇫🇷", "∑∫√", "½", "٣٤٥",
    "def", "return", "self.x", "x += 1", "if (a && b) {", "}", "[1, 2, 3]", "#include <vector>", "0x1F",
    "foo_bar", "->", "==", "!=", "'''", '"""', "\\n", "12345678", "3.14159", "2024-01-01",
]
SPACES = [
    " ",
    " ",
    " ",
    "  ",
    "\t",
    "\n",
    "\r\n",
    "\n\n",
    "   \n",
    " \t ",
    "\u00a0",
    "\u3000",
    "\u2003",
    "\x0b\x0c",
    "    ",
]


def _assigned_char(rng: random.Random) -> str:
    """A code point in U+0020..U+2FFF assigned in Python's Unicode tables (14.0 on 3.11). The
    `regex` module follows the newest Unicode (it calls U+0C5C, new in Unicode 17, a letter) while
    tiktoken's Rust regex has older tables, so a code point assigned since splits differently in
    the two: not something one tokenizer can match in both at once."""
    while True:
        c = chr(rng.randrange(0x20, 0x3000))
        if unicodedata.category(c) != "Cn":
            return c


def random_text(rng: random.Random, n_words: int) -> str:
    parts = []
    for _ in range(n_words):
        parts.append(
            rng.choice(WORDS)
            if rng.random() < 0.9
            else "".join(_assigned_char(rng) for _ in range(rng.randrange(1, 6)))
        )
        parts.append(rng.choice(SPACES))
    return "".join(parts)


VARIED_TEXTS = [
    "",
    "hello world",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }\r\n",
    "Привет, мир! Γειά σου κόσμε. こんにちは世界。 안녕하세요 مرحبا بالعالم नमस्ते สวัสดี",
    "emoji: 😀😃😄 👨‍👩‍👧‍👦 🏳️‍🌈 🇯🇵🇺🇸 ✌🏿 ©®™",
    "whitespace    runs\t\t\tand\n\n\n\nnewlines   \n  \n\t \r\n\r\n    ",
    "   leading and trailing   ",
    "\n",
    " ",
    "numbers 1234567890 12 3.1415926535 1e-10 ١٢٣٤ ⅷ",
    "I'm you're he'll she'd THEY'VE We'RE it's 's 't",
    "non-breaking\u00a0space and\u3000ideographic\u2028line\u2029para\u0085nel",
    "control \x00\x01\x1f\x7f chars",
    "<|pad|> <|bos|> text <|eos|><|eos|>",
    "combining: e\u0301 a\u0308 ñ Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇",
    "a" * 300 + " " + "ab" * 200,
]


def _train(pattern: str, seed: int, vocab_size: int = 700) -> BPETokenizer:
    rng = random.Random(seed)
    texts = [random_text(rng, 400) for _ in range(12)] + VARIED_TEXTS
    return BPETokenizer.train(texts, vocab_size, pattern=pattern, progress=False)


# A pattern the C++ scanner does not implement: split by `regex` in Python, merged in C++.
CUSTOM_PATTERN = r"""[a-zA-Z]+| ?[0-9]+|\s+|[^a-zA-Z0-9\s]+"""


@pytest.fixture(scope="module", params=["cl100k", "gpt2", CUSTOM_PATTERN])
def trained(request):
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"corpus seed={seed}")
    tok = _train(request.param, seed)
    enc = tiktoken.Encoding(f"test-{len(request.param)}", **tok.tiktoken_kwargs())
    return tok, enc


@pytest.fixture(params=["native", "python"])
def pair(request, trained):
    """(our tokenizer on the requested merge loop, tiktoken Encoding with the same ranks)."""
    tok, enc = trained
    tok = BPETokenizer(tok.mergeable_ranks, tok.pattern, tok.special_tokens)
    if request.param == "native":
        if bpe_module._native is None:
            pytest.skip("qlora_fast._bpe is not built (pip install -e . builds it)")
        assert tok.uses_native
    else:
        tok._native = None
    return tok, enc


def test_is_a_tokenizer(trained):
    tok, _ = trained
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 700
    assert {tok.pad_id, tok.bos_id, tok.eos_id} == {697, 698, 699}


@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_encode_equals_tiktoken_on_varied_text(pair, text):
    tok, enc = pair
    assert tok.encode(text, disallowed_special=()) == enc.encode(text, disallowed_special=())
    assert tok.encode_ordinary(text) == enc.encode_ordinary(text)


def test_encode_equals_tiktoken_on_random_long_text(pair, seed):
    tok, enc = pair
    rng = random.Random(seed)
    for _ in range(5):
        text = random_text(rng, rng.randrange(1, 3000))
        assert tok.encode_ordinary(text) == enc.encode_ordinary(text)


_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(text=st.text(st.characters(blacklist_categories=("Cs", "Cn")), max_size=80))  # Cn: see _assigned_char
def test_encode_equals_tiktoken_on_arbitrary_text(pair, text):
    tok, enc = pair
    assert tok.encode_ordinary(text) == enc.encode_ordinary(text)


@_SETTINGS
@given(text=st.text(alphabet=st.sampled_from(list(" \t\n\r\u00a0\u3000\u2028ab1'é日😀")), max_size=40))
def test_encode_equals_tiktoken_on_whitespace_heavy_text(pair, text):
    tok, enc = pair
    assert tok.encode_ordinary(text) == enc.encode_ordinary(text)


@_SETTINGS
@given(text=st.text())
def test_decode_encode_roundtrip(pair, text):
    tok, _ = pair
    ids = tok.encode(text, disallowed_special=())
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


@_SETTINGS
@given(data=st.binary(max_size=60))
def test_encode_bytes_equals_tiktoken_on_arbitrary_bytes(pair, data):
    tok, enc = pair
    ids = tok.encode_bytes(data)
    assert ids == enc._encode_bytes(data)
    assert tok.decode_bytes(ids) == data == enc.decode_bytes(ids)


_SPLIT_ALPHABET = list(" \t\n\r\x0b\x0c\x85\u00a0\u2028\u3000abcSsTdDmMlLvVeErR'\u017f19\u0663\u2167.,!-_(é日😀\u0301")


@pytest.mark.parametrize("pattern", ["gpt2", "cl100k"])
@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(), st.text(alphabet=st.sampled_from(_SPLIT_ALPHABET))))
def test_native_scanner_splits_exactly_like_the_regex(pattern, text):
    if bpe_module._native is None:
        pytest.skip("qlora_fast._bpe is not built (pip install -e . builds it)")
    bpe_module._ensure_char_classes()
    regex_pattern = bpe_module.PATTERNS[pattern]
    expected = [p.encode("utf-8") for p in regex.findall(regex_pattern, text)]
    assert bpe_module._native.split(text, bpe_module._NATIVE_SPLIT[regex_pattern]) == expected


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(list("abé日 ")), min_size=100, max_size=2500), spaced=st.booleans())
def test_long_pieces_use_the_heap_merge_and_equal_tiktoken(pair, text, spaced):
    # Pieces over 128 bytes take the O(n log n) merge; without spaces the whole text is one piece.
    tok, enc = pair
    text = text if spaced else text.replace(" ", "")
    assert tok.encode_ordinary(text) == enc.encode_ordinary(text)
    data = text.encode("utf-8")
    assert tok.encode_single_piece(data) == enc._encode_single_piece(data)


def test_very_long_piece_is_fast_enough(pair):
    tok, enc = pair
    text = "ab" * 20000 + "é" * 5000  # quadratic merging would take minutes in Python
    assert tok.encode_ordinary(text) == enc.encode_ordinary(text)


INVALID_UTF8 = [
    b"\xff",
    b"\x80\x80abc",
    b"hello \xe6\x97",  # truncated 3-byte character
    b"hello   \xf0\x9f\x98",  # truncated emoji after a whitespace run
    b"caf\xc3",  # truncated 2-byte character
    b"valid text\n\n \xc0\xaf then more valid text",  # overlong encoding in the middle
    b"\xed\xa0\x80 surrogate half",  # UTF-8 encoded surrogate
    b"tab\t\t\xfe\xfe",
    "日本語".encode("utf-8")[:-1] + b" tail",
]


@pytest.mark.parametrize("data", INVALID_UTF8)
def test_encode_bytes_equals_tiktoken_on_invalid_utf8(pair, data, seed):
    tok, enc = pair
    assert tok.encode_bytes(data) == enc._encode_bytes(data)
    rng = random.Random(seed)
    noisy = random_text(rng, 50).encode("utf-8") + data + bytes(rng.randrange(256) for _ in range(20))
    ids = tok.encode_bytes(noisy)
    assert ids == enc._encode_bytes(noisy)
    assert tok.decode_bytes(ids) == noisy
    assert tok.decode(ids) == enc.decode(ids) == noisy.decode("utf-8", errors="replace")


def test_lone_surrogates_are_replaced_like_tiktoken(pair):
    tok, enc = pair
    text = "a\ud800b \udfff c"
    assert tok.encode(text) == enc.encode(text)
    assert tok.encode_ordinary(text) == enc.encode_ordinary(text)


def test_special_tokens_allowed_refused_or_ordinary(pair):
    tok, enc = pair
    text = "say <|bos|>hi<|eos|> and <|pad|>"
    with pytest.raises(ValueError, match="special token"):
        tok.encode(text)
    with pytest.raises(ValueError):
        enc.encode(text)
    for allowed in ("all", {"<|eos|>"}, {"<|bos|>", "<|pad|>"}):
        assert tok.encode(text, allowed_special=allowed, disallowed_special=()) == enc.encode(
            text, allowed_special=allowed, disallowed_special=()
        )
    assert tok.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")
    with pytest.raises(ValueError, match="<\\|pad\\|>"):
        tok.encode(text, allowed_special={"<|bos|>", "<|eos|>"})
    assert tok.encode(text, disallowed_special=()) == enc.encode(text, disallowed_special=())
    ids = tok.encode(text, allowed_special="all")
    assert tok.eos_id in ids and tok.bos_id in ids and tok.pad_id in ids
    assert tok.decode(ids) == "say hi and "
    assert tok.decode(ids, skip_special=False) == text
    with pytest.raises(ValueError, match="not special tokens"):
        tok.encode(text, allowed_special={"<|nope|>"})


def test_add_bos_eos_and_batch(pair, seed):
    tok, enc = pair
    rng = random.Random(seed)
    texts = [random_text(rng, rng.randrange(0, 40)) for _ in range(7)]
    batch = tok.encode_batch(texts, add_bos=True, add_eos=True)
    assert batch == [[tok.bos_id] + enc.encode_ordinary(t) + [tok.eos_id] for t in texts]
    assert tok.encode_batch(texts) == [enc.encode_ordinary(t) for t in texts]
    assert [tok.decode(ids) for ids in batch] == texts
    import numpy as np
    import torch

    assert [tok.decode(torch.tensor(ids)) for ids in batch] == texts  # tensors and numpy ints decode too
    assert [tok.decode(np.array(ids, dtype=np.int64)) for ids in batch] == texts


def test_bad_input_gets_clear_errors(trained):
    tok, _ = trained
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"bytes")
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        tok.encode_batch(["ok", 3])
    with pytest.raises(TypeError, match="iterable of str"):
        tok.encode_batch("one string")
    with pytest.raises(ValueError, match="not a token"):
        tok.decode([tok.vocab_size + 5])
    with pytest.raises(TypeError, match="ids must be ints"):
        tok.decode(["a"])
    with pytest.raises(TypeError, match="data must be bytes"):
        tok.encode_bytes("str")
    with pytest.raises(ValueError, match="all 256 single bytes"):
        BPETokenizer({b"a": 0})
    with pytest.raises(ValueError, match="distinct rank"):
        BPETokenizer({**{bytes([b]): b for b in range(256)}, b"ab": 5})
    with pytest.raises(ValueError, match="special_tokens ids"):
        BPETokenizer({bytes([b]): b for b in range(256)}, special_tokens={"<|pad|>": 3})
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train(["abc"], 100, progress=False)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        BPETokenizer.train(["abc", None], 300, progress=False)
    with pytest.raises(TypeError, match="pattern"):
        BPETokenizer({bytes([b]): b for b in range(256)}, pattern=3)


def test_ids_that_are_not_ints_are_refused_not_truncated(trained):
    """decode took 65.7 as 65 (ByteTokenizer: any float; both: a float tensor, through int());
    ByteTokenizer.encode_batch took one string as a batch of one-character texts."""
    import torch

    from qlora_fast.tokenizer import ByteTokenizer

    tok, _ = trained
    ids = [random.randrange(97, 123) for _ in range(5)]
    for t in (tok, ByteTokenizer()):
        assert t.decode(torch.tensor(ids)) == t.decode(ids)  # integer tensors still decode
        for bad in (ids[:2] + [ids[2] + 0.5], torch.tensor(ids, dtype=torch.float32)):
            with pytest.raises(TypeError, match="ids must be ints|integer tensors"):
                t.decode(bad)
        with pytest.raises(TypeError, match="iterable of str"):
            t.encode_batch("one string")



# Patterns with capturing groups: pieces are the whole matches (as tiktoken takes them), never the
# groups' text (`findall` gave that, dropping the rest of the text). Each is paired with the same
# pattern without capturing groups, which must give the same tokenizer.
GROUP_PATTERNS = [
    (r"'(s|t)|\w+|\s+", r"'(?:s|t)|\w+|\s+"),
    (r"(\w+)|\s+", r"\w+|\s+"),
    (r"'(s|t)|(\p{L}+)|(\p{N}{1,3})|\s+|([^\s\p{L}\p{N}]+)", r"'(?:s|t)|\p{L}+|\p{N}{1,3}|\s+|[^\s\p{L}\p{N}]+"),
]
GROUP_TEXTS = ["hello it's world", "don't  stop\n\tthe_quick 123 fox's tail", "   leading and trailing   ", ""]


@pytest.mark.parametrize("merge_loop", ["native", "python"])
@pytest.mark.parametrize("pattern,plain", GROUP_PATTERNS)
def test_patterns_with_capturing_groups_split_on_whole_matches(pattern, plain, merge_loop, seed):
    if merge_loop == "native" and bpe_module._native is None:
        pytest.skip("qlora_fast._bpe is not built (pip install -e . builds it)")
    rng = random.Random(seed)
    texts = [random_text(rng, 300) for _ in range(4)] + GROUP_TEXTS
    tok = BPETokenizer.train(texts, 500, pattern=pattern, progress=False)
    assert tok.pattern == pattern and tok.vocab_size == 500
    assert tok.mergeable_ranks == BPETokenizer.train(texts, 500, pattern=plain, progress=False).mergeable_ranks
    if merge_loop == "python":
        tok._native = None
    enc = tiktoken.Encoding(f"groups-{len(pattern)}", **tok.tiktoken_kwargs())
    covers_all = "[^" in pattern  # the third pattern matches every character: nothing is left out
    for text in GROUP_TEXTS + ([random_text(rng, 200)] if covers_all else []):
        ids = tok.encode_ordinary(text)
        assert ids == enc.encode_ordinary(text), text
        # The second pattern matches no apostrophe: it is left out, by tiktoken too.
        assert tok.decode(ids) == (text.replace("'", "") if pattern == r"(\w+)|\s+" else text)
        data = text.encode("utf-8") + b"\xff\xfe tail"
        assert tok.encode_bytes(data) == enc._encode_bytes(data)


def test_an_invalid_pattern_is_a_value_error_naming_it():
    ranks = {bytes([b]): b for b in range(256)}
    with pytest.raises(ValueError, match=r"pattern is not a valid regular expression: '\('"):
        BPETokenizer(ranks, pattern="(")
    with pytest.raises(ValueError, match=r"pattern is not a valid regular expression: '\[a-'"):
        BPETokenizer.train(["abc"], 300, pattern="[a-", progress=False)


def naive_train(text_pieces, n_merges):
    """Independent reference: recount every pair from scratch each step; pick (max count, min bytes)."""
    words = Counter(p.encode("utf-8") for p in text_pieces)
    seqs = {w: [bytes([c]) for c in w] for w in words}
    merges = []
    known = {bytes([b]) for b in range(256)}
    while len(merges) < n_merges:
        counts = Counter()
        for w, n in words.items():
            s = seqs[w]
            for pair in zip(s, s[1:]):
                counts[pair] += n
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        new = best[0] + best[1]
        if new not in known:
            known.add(new)
            merges.append(new)
        for w in words:
            s, out, i = seqs[w], [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


@pytest.mark.parametrize("pattern", ["cl100k", "gpt2"])
def test_training_matches_naive_trainer_and_is_deterministic(pattern, seed):
    rng = random.Random(seed)
    # Few distinct words so that count ties are frequent and the tie rule is exercised.
    texts = [
        " ".join(
            rng.choice(["aab", "abab", "bba", "ab", "ba", "aaa", "b'll", "éé", "日日"])
            for _ in range(rng.randrange(5, 60))
        )
        for _ in range(20)
    ]
    pieces = [p for t in texts for p in regex.findall(bpe_module.PATTERNS[pattern], t)]
    n_merges = 60
    expected = naive_train(pieces, n_merges)
    words = [(w.encode("utf-8"), n) for w, n in Counter(pieces).items()]
    assert bpe_module._train_merges(words, n_merges, progress=False) == expected
    if bpe_module._native is not None:
        assert bpe_module._native.train(words, n_merges) == expected
    tok = BPETokenizer.train(texts, 256 + n_merges + 3, pattern=pattern, progress=False)
    again = BPETokenizer.train(iter(texts), 256 + n_merges + 3, pattern=pattern, progress=False)
    assert tok.mergeable_ranks == again.mergeable_ranks
    assert sorted(tok.mergeable_ranks, key=tok.mergeable_ranks.get)[256:] == expected


def test_native_and_python_trainers_agree_on_a_larger_corpus(seed):
    if bpe_module._native is None:
        pytest.skip("qlora_fast._bpe is not built (pip install -e . builds it)")
    rng = random.Random(seed)
    text = random_text(rng, 3000)
    words = [(w.encode("utf-8"), n) for w, n in Counter(regex.findall(bpe_module.CL100K_PATTERN, text)).items()]
    reported = []
    merges = bpe_module._native.train(words, 400, reported.append)
    assert merges == bpe_module._train_merges(words, 400, progress=False)
    assert reported == list(range(64, len(merges) + 1, 64)) + ([len(merges)] if len(merges) % 64 else [])


def test_save_load_json_and_tiktoken_files(trained, tmp_path, seed):
    tok, enc = trained
    path = tmp_path / "sub" / "tok.json"
    tok.save(path)
    assert sorted(os.listdir(path.parent)) == ["tok.json"]  # no temp file left behind
    loaded = BPETokenizer.load(path)
    assert loaded.mergeable_ranks == tok.mergeable_ranks
    assert loaded.special_tokens == tok.special_tokens and loaded.pattern == tok.pattern
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id, loaded.vocab_size) == (
        tok.pad_id,
        tok.bos_id,
        tok.eos_id,
        tok.vocab_size,
    )
    text = random_text(random.Random(seed), 200)
    assert loaded.encode(text) == enc.encode(text)

    ranks_path = tmp_path / "ranks.tiktoken"
    tok.save_tiktoken(ranks_path)
    assert tiktoken_load.load_tiktoken_bpe(str(ranks_path)) == tok.mergeable_ranks
    oracle_path = tmp_path / "oracle.tiktoken"
    # What tiktoken.load.dump_tiktoken_bpe writes (it needs blobfile, so written here by hand).
    oracle_path.write_bytes(
        b"".join(
            base64.b64encode(t) + b" " + str(r).encode() + b"\n"
            for t, r in sorted(tok.mergeable_ranks.items(), key=lambda kv: kv[1])
        )
    )
    from_oracle = BPETokenizer.load_tiktoken(oracle_path, pattern=tok.pattern, special_tokens=tok.special_tokens)
    assert from_oracle.mergeable_ranks == tok.mergeable_ranks
    assert from_oracle.encode(text) == enc.encode(text)

    (tmp_path / "bad.tiktoken").write_bytes(b"QUJD 0\nnot-base64!! x\n")
    with pytest.raises(ValueError, match="bad.tiktoken:2"):
        BPETokenizer.load_tiktoken(tmp_path / "bad.tiktoken")
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a qlora_fast.bpe"):
        BPETokenizer.load(tmp_path / "bad.json")


def test_train_from_files(tmp_path, seed):
    rng = random.Random(seed)
    texts = [random_text(rng, 300) for _ in range(3)]
    paths = []
    for i, t in enumerate(texts):
        p = tmp_path / f"part{i}.txt"
        p.write_bytes(t.encode("utf-8"))
        paths.append(p)
    from_files = BPETokenizer.train_from_files(paths, 400, progress=False)
    from_texts = BPETokenizer.train(texts, 400, progress=False)
    assert from_files.mergeable_ranks == from_texts.mergeable_ranks
    with pytest.raises(ValueError, match="not a file"):
        BPETokenizer.train_from_files([tmp_path / "missing.txt"], 400, progress=False)


def test_shipped_bpe_is_trained_once_then_loaded_from_cache(tmp_path):
    if not os.path.exists(bpe_module.SHIPPED_CORPUS):
        pytest.skip("the shipped corpus qlora_fast/data/corpus.txt is not in this checkout")
    first = load_shipped_bpe(vocab_size=400, cache_dir=str(tmp_path), progress=False)
    cached = [p.name for p in tmp_path.iterdir()]
    assert len(cached) == 1 and cached[0].startswith("bpe-") and cached[0].endswith(".json")
    mtime = (tmp_path / cached[0]).stat().st_mtime_ns
    second = load_shipped_bpe(vocab_size=400, cache_dir=str(tmp_path), progress=False)
    assert (tmp_path / cached[0]).stat().st_mtime_ns == mtime  # loaded, not retrained
    assert second.mergeable_ranks == first.mergeable_ranks and first.vocab_size == 400
    with open(bpe_module.SHIPPED_CORPUS, encoding="utf-8") as f:
        corpus = f.read()
    assert first.mergeable_ranks == BPETokenizer.train([corpus], 400, progress=False).mergeable_ranks
    assert first.decode(first.encode(corpus[:2000])) == corpus[:2000]
    assert len(first.encode(corpus)) < len(corpus.encode("utf-8")) / 2  # merges actually compress


def test_pickle_roundtrip_rebuilds_the_encoder(trained, seed):
    tok, enc = trained
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.mergeable_ranks == tok.mergeable_ranks and clone.special_tokens == tok.special_tokens
    assert clone.uses_native == tok.uses_native
    text = random_text(random.Random(seed), 100)
    assert clone.encode(text) == enc.encode(text)


def test_train_bpe_command(tmp_path, seed):
    import argparse

    from qlora_fast import cli
    from qlora_fast.commands import train_bpe

    assert "qlora_fast.commands.train_bpe" in cli.COMMANDS
    parser = argparse.ArgumentParser()
    train_bpe.register(parser.add_subparsers())

    def main(argv):
        args = parser.parse_args(argv)
        return args.func(args)

    rng = random.Random(seed)
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(random_text(rng, 2000).encode("utf-8"))
    out, ranks = tmp_path / "tok.json", tmp_path / "tok.tiktoken"
    assert (
        main(
            [
                "train-bpe",
                str(corpus),
                "--vocab-size",
                "350",
                "--pattern",
                "gpt2",
                "--out",
                str(out),
                "--tiktoken-out",
                str(ranks),
                "--no-progress",
            ]
        )
        == 0
    )
    tok = BPETokenizer.load(out)
    assert tok.vocab_size == 350 and tok.pattern == bpe_module.GPT2_PATTERN
    assert (
        tok.mergeable_ranks
        == BPETokenizer.train(
            [corpus.read_bytes().decode("utf-8")], 350, pattern="gpt2", progress=False
        ).mergeable_ranks
    )
    assert tiktoken_load.load_tiktoken_bpe(str(ranks)) == tok.mergeable_ranks
