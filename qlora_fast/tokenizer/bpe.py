"""Byte-level BPE: training, encoding identical to tiktoken's for the same ranks, and file formats.

A token is a byte string with a *rank*; the rank is also the token's id. Encoding splits the text
with a pre-tokenisation regex (GPT-2's or cl100k's pattern), then merges each piece's bytes the way
tiktoken does: while some adjacent pair of parts concatenates to a known token, merge the pair whose
concatenation has the lowest rank (the leftmost one on a tie); pieces over 128 bytes use an
equivalent O(n log n) heap-based merge. With the C++ extension `qlora_fast._bpe` built, the merge
loop (with a cache of encoded pieces) runs in C++, and for GPT-2's and cl100k's patterns so does the
split, by a scanner using the `regex` module's own character classes; otherwise everything runs in
pure Python. Both paths give the same ids (tested against each other and against tiktoken).

Training learns merges by pair frequency over the pre-tokenised corpus. Ties are broken
deterministically: the pair with the highest count wins; among equal counts, the pair whose
(left bytes, right bytes) is lexicographically smallest wins. Token `256 + k` is the k-th merge,
single bytes keep their byte value as rank, and special tokens take the ids after the merges.
"""
from __future__ import annotations

import base64
import json
import os
from collections import Counter
from heapq import heappop, heappush
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import regex

from qlora_fast.utils import atomic_write_bytes, default_cache_dir

# GPT-2's pattern as tiktoken writes it (equivalent to the original, faster with possessives).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# cl100k_base's pattern: case-insensitive contractions, digits in groups of at most three.
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "cl100k": CL100K_PATTERN}
_NATIVE_SPLIT = {GPT2_PATTERN: 1, CL100K_PATTERN: 2}  # patterns the C++ scanner implements


def _load_native():
    """The compiled merge loop `qlora_fast._bpe`, or None (the pure-Python loop gives the same ids).

    QLORA_FAST_BPE=python forces the pure-Python loop.
    """
    if os.environ.get("QLORA_FAST_BPE", "").lower() == "python":
        return None
    try:
        import torch  # noqa: F401  (the extension is built by torch's CppExtension and links libc10)

        from qlora_fast import _bpe

        return _bpe
    except ImportError:  # pragma: no cover - exercised when the extension is not built
        return None


_native = _load_native()
_char_classes_ready = False


def _ensure_char_classes() -> None:
    """Give the C++ scanner the code-point classes \\p{L}, \\p{N}, \\s exactly as `regex` defines them."""
    global _char_classes_ready
    if _char_classes_ready:
        return
    import numpy as np

    every_char = np.arange(0x110000, dtype="<u4").tobytes().decode("utf-32-le", "surrogatepass")
    ranges = []
    for bit, pattern in ((1, r"\p{L}+"), (2, r"\p{N}+"), (4, r"\s+")):
        ranges += [(m.start(), m.end(), bit) for m in regex.finditer(pattern, every_char)]
    _native.set_char_classes(ranges)
    _char_classes_ready = True



DEFAULT_SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>")
_FORMAT = "qlora_fast.bpe"
_CACHE_LIMIT = 1 << 16  # pieces remembered by the pure-Python encoder before its cache is reset


def _resolve_pattern(pattern: str) -> str:
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str (a regex or one of {sorted(PATTERNS)}), got {type(pattern).__name__}")
    return PATTERNS.get(pattern, pattern)


def _native_split_for(pattern: str) -> Optional[int]:
    """The C++ scanner's id for `pattern` (its character tables made ready), or None when the
    extension is missing or the pattern is not one it implements (the regex module splits then)."""
    split = _NATIVE_SPLIT.get(pattern) if _native is not None and hasattr(_native, "split") else None
    if split is not None:
        _ensure_char_classes()
    return split


def _replace_lone_surrogates(text: str) -> str:
    """Lone surrogates cannot be UTF-8 encoded: U+FFFD instead, as tiktoken does."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


_LONG_PIECE = 128  # pieces longer than this (bytes) use the heap-based merge, as the C++ loop does


def _merge_long_piece(piece: bytes, ranks: Mapping[bytes, int]) -> List[int]:
    """The same merges as `_merge_piece` in O(n log n): parts in a linked list, candidate pairs in
    a heap keyed (rank, start), so the lowest rank wins and the leftmost on a tie; entries made
    stale by a merge are skipped by a per-part generation count."""
    n = len(piece)
    nxt = list(range(1, n + 1))
    prev = list(range(-1, n - 1))
    gen = [0] * n
    alive = [True] * n

    def pair_rank(i):
        j = nxt[i]
        return None if j >= n else ranks.get(piece[i : nxt[j]])

    heap = [(r, i, 0) for i in range(n - 1) if (r := pair_rank(i)) is not None]
    heap.sort()

    def refresh(i):
        gen[i] += 1
        r = pair_rank(i)
        if r is not None:
            heappush(heap, (r, i, gen[i]))

    while heap:
        _, i, g = heappop(heap)
        if not alive[i] or gen[i] != g:
            continue
        j = nxt[i]
        alive[j] = False
        nxt[i] = nxt[j]
        if nxt[j] < n:
            prev[nxt[j]] = i
        refresh(i)
        if prev[i] >= 0:
            refresh(prev[i])
    out, i = [], 0
    while i < n:
        out.append(ranks[piece[i : nxt[i]]])
        i = nxt[i]
    return out


def _merge_piece(piece: bytes, ranks: Mapping[bytes, int]) -> List[int]:
    """tiktoken's byte-pair merge of one piece, in pure Python."""
    rank = ranks.get(piece)
    if rank is not None:
        return [rank]
    if len(piece) > _LONG_PIECE:
        return _merge_long_piece(piece, ranks)
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best_rank is None or r < best_rank):
                best_rank, best_i = r, i
        if best_rank is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return [ranks[p] for p in parts]


class BPETokenizer:
    """Byte-level BPE tokenizer implementing the trainers' `Tokenizer` interface.

    Args:
        mergeable_ranks: token bytes -> rank (= id). Must contain all 256 single bytes so any
            text can be encoded; ranks must be distinct non-negative ints.
        pattern: the pre-tokenisation regex, or "gpt2" / "cl100k".
        special_tokens: special token text -> id, ids distinct from every rank. None gives
            `<|pad|>`, `<|bos|>`, `<|eos|>` the ids after the largest rank.
        pad_token, bos_token, eos_token: which special tokens serve as pad/bos/eos; one missing
            from `special_tokens` is added with the next free id.

    Raises ValueError/TypeError naming the argument when one of these promises is broken.
    """

    def __init__(
        self,
        mergeable_ranks: Mapping[bytes, int],
        pattern: str = "cl100k",
        special_tokens: Optional[Mapping[str, int]] = None,
        pad_token: str = "<|pad|>",
        bos_token: str = "<|bos|>",
        eos_token: str = "<|eos|>",
    ):
        if not isinstance(mergeable_ranks, Mapping):
            raise TypeError(f"mergeable_ranks must be a mapping bytes -> int, got {type(mergeable_ranks).__name__}")
        ranks: Dict[bytes, int] = {}
        for token, rank in mergeable_ranks.items():
            if not isinstance(token, (bytes, bytearray)) or not token:
                raise TypeError(f"mergeable_ranks keys must be non-empty bytes, got {token!r}")
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
                raise ValueError(f"mergeable_ranks values must be non-negative ints, got {rank!r} for {token!r}")
            ranks[bytes(token)] = rank
        if len(set(ranks.values())) != len(ranks):
            raise ValueError("mergeable_ranks must give every token a distinct rank")
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise ValueError(f"mergeable_ranks must contain all 256 single bytes; missing {len(missing)}, e.g. {missing[:5]}")
        self.pattern = _resolve_pattern(pattern)
        self._pat = regex.compile(self.pattern)

        if special_tokens is None:
            special_tokens = {}
            for text in DEFAULT_SPECIAL_TOKENS:
                if text in (pad_token, bos_token, eos_token):
                    special_tokens[text] = max(ranks.values()) + 1 + len(special_tokens)
        if not isinstance(special_tokens, Mapping):
            raise TypeError(f"special_tokens must be a mapping str -> int, got {type(special_tokens).__name__}")
        specials: Dict[str, int] = {}
        for text, i in special_tokens.items():
            if not isinstance(text, str) or not text:
                raise TypeError(f"special_tokens keys must be non-empty str, got {text!r}")
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise ValueError(f"special_tokens values must be non-negative ints, got {i!r} for {text!r}")
            specials[text] = i
        for text in (pad_token, bos_token, eos_token):
            if not isinstance(text, str) or not text:
                raise TypeError(f"pad_token, bos_token and eos_token must be non-empty str, got {text!r}")
            if text not in specials:
                specials[text] = max(list(ranks.values()) + list(specials.values())) + 1
        taken = set(ranks.values())
        if len(set(specials.values())) != len(specials) or taken & set(specials.values()):
            raise ValueError("special_tokens ids must be distinct from each other and from every rank")

        self._ranks = ranks
        self._special = specials
        self._special_set = frozenset(specials)
        self.pad_token, self.bos_token, self.eos_token = pad_token, bos_token, eos_token
        self.pad_id, self.bos_id, self.eos_id = specials[pad_token], specials[bos_token], specials[eos_token]
        self.vocab_size = max(list(ranks.values()) + list(specials.values())) + 1
        self._decoder: Dict[int, bytes] = {rank: token for token, rank in ranks.items()}
        self._special_decoder: Dict[int, bytes] = {i: t.encode("utf-8") for t, i in specials.items()}
        self._cache: Dict[str, Tuple[int, ...]] = {}
        self._native = _native.Encoder(ranks) if _native is not None else None
        self._native_split = _native_split_for(self.pattern)
        self._special_pat_cache: Dict[frozenset, "regex.Pattern"] = {}

    # ------------------------------------------------------------------ properties
    @property
    def mergeable_ranks(self) -> Dict[bytes, int]:
        """A copy of token bytes -> rank."""
        return dict(self._ranks)

    @property
    def special_tokens(self) -> Dict[str, int]:
        """A copy of special token text -> id."""
        return dict(self._special)

    @property
    def uses_native(self) -> bool:
        """True when the C++ merge loop (`qlora_fast._bpe`) is in use."""
        return self._native is not None

    def __getstate__(self) -> dict:
        # The C++ encoder cannot be pickled (DataLoader workers, multiprocessing): rebuild it.
        return self.to_dict()

    def __setstate__(self, state: dict) -> None:
        ranks = {base64.b64decode(t): int(r) for t, r in state["mergeable_ranks"]}
        self.__init__(ranks, state["pattern"], state["special_tokens"], state["pad_token"], state["bos_token"], state["eos_token"])

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, specials={len(self._special)}, native={self.uses_native})"

    # ------------------------------------------------------------------ encoding
    def _encode_pieces(self, pieces: List[str]) -> List[int]:
        if self._native is not None:
            return self._native.encode_pieces(pieces)
        out: List[int] = []
        cache, ranks = self._cache, self._ranks
        for piece in pieces:
            ids = cache.get(piece)
            if ids is None:
                ids = tuple(_merge_piece(piece.encode("utf-8"), ranks))
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                cache[piece] = ids
            out.extend(ids)
        return out

    def _encode_ordinary(self, text: str) -> List[int]:
        if self._native is not None and self._native_split is not None:
            return self._native.encode_ordinary(text, self._native_split)
        return self._encode_pieces(self._pat.findall(text))

    def encode_ordinary(self, text: str) -> List[int]:
        """Encode `text` treating special-token text as ordinary text (never raises on it)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        try:
            return self._encode_ordinary(text)
        except UnicodeEncodeError:
            return self._encode_ordinary(_replace_lone_surrogates(text))

    def _special_regex(self, tokens: frozenset) -> "regex.Pattern":
        pat = self._special_pat_cache.get(tokens)
        if pat is None:
            # Longest first so a special token that is a prefix of another never hides it.
            pat = regex.compile("|".join(regex.escape(t) for t in sorted(tokens, key=lambda t: (-len(t), t))))
            self._special_pat_cache[tokens] = pat
        return pat

    def _allowed_sets(self, allowed_special, disallowed_special) -> Tuple[frozenset, frozenset]:
        specials = self._special_set
        if isinstance(allowed_special, tuple) and not allowed_special and disallowed_special == "all":
            return frozenset(), specials  # the defaults, on every trainer's encode: nothing to check
        if allowed_special == "all":
            allowed = specials
        else:
            if isinstance(allowed_special, str):
                raise TypeError('allowed_special must be "all" or a collection of special token strings')
            allowed = frozenset(allowed_special)
            unknown = allowed - specials
            if unknown:
                raise ValueError(f"allowed_special names tokens that are not special tokens: {sorted(unknown)}")
        if disallowed_special == "all":
            disallowed = specials - allowed
        else:
            if isinstance(disallowed_special, str):
                raise TypeError('disallowed_special must be "all" or a collection of special token strings')
            disallowed = frozenset(disallowed_special)
        return allowed, disallowed

    def encode(
        self,
        text: str,
        add_bos: bool = False,
        add_eos: bool = False,
        allowed_special: Union[str, Iterable[str]] = (),
        disallowed_special: Union[str, Iterable[str]] = "all",
    ) -> List[int]:
        """Encode `text` to ids, as tiktoken's `Encoding.encode` with the same special-token rules.

        Special-token text in `allowed_special` ("all" or a collection) becomes its special id.
        Text matching a token in `disallowed_special` (default: every special token not allowed)
        raises ValueError; pass `disallowed_special=()` to encode such text as ordinary text.
        `add_bos` / `add_eos` put `bos_id` / `eos_id` around the result.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        allowed, disallowed = self._allowed_sets(allowed_special, disallowed_special)
        if disallowed:
            match = self._special_regex(disallowed).search(text)
            if match:
                raise ValueError(
                    f"text contains the special token {match.group()!r}, which is disallowed; pass "
                    f"allowed_special={{{match.group()!r}}} to encode it as a special token or "
                    f"disallowed_special=() to encode it as ordinary text"
                )
        ids = [self.bos_id] if add_bos else []
        try:
            ids.extend(self._encode_with_specials(text, allowed))
        except UnicodeEncodeError:
            fixed = _replace_lone_surrogates(text)
            ids = ([self.bos_id] if add_bos else []) + self._encode_with_specials(fixed, allowed)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def _encode_with_specials(self, text: str, allowed: frozenset) -> List[int]:
        if not allowed:
            return self._encode_ordinary(text)
        ids: List[int] = []
        start = 0
        for match in self._special_regex(allowed).finditer(text):
            ids.extend(self._encode_ordinary(text[start : match.start()]))
            ids.append(self._special[match.group()])
            start = match.end()
        ids.extend(self._encode_ordinary(text[start:]))
        return ids

    def encode_batch(
        self,
        texts: Iterable[str],
        add_bos: bool = False,
        add_eos: bool = False,
        allowed_special: Union[str, Iterable[str]] = (),
        disallowed_special: Union[str, Iterable[str]] = "all",
    ) -> List[List[int]]:
        """`encode` applied to each text; a non-str item raises TypeError naming its index."""
        if isinstance(texts, (str, bytes)):
            raise TypeError("texts must be an iterable of str, not a single str/bytes")
        out = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
            out.append(self.encode(text, add_bos, add_eos, allowed_special, disallowed_special))
        return out

    def encode_single_piece(self, data: bytes) -> List[int]:
        """Byte-pair merge of `data` as one piece (no regex split)."""
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        if not data:
            return []
        if self._native is not None:
            return self._native.encode_piece(bytes(data))
        return _merge_piece(bytes(data), self._ranks)

    def encode_bytes(self, data: bytes) -> List[int]:
        """Encode raw bytes that may be invalid UTF-8, exactly as tiktoken's `_encode_bytes`.

        The longest valid UTF-8 prefix is encoded as text; the tokens of its last regex piece
        (extended backwards over tokens that are all space, tab or newline) are undone and their
        bytes, followed by the remaining bytes, are merged as a single piece.
        """
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        data = bytes(data)
        try:
            return self._encode_ordinary(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            valid = e.start
        tokens: List[int] = []
        last_len = 0
        for piece in self._pat.findall(data[:valid].decode("utf-8")):
            piece_ids = self._encode_pieces([piece])
            tokens.extend(piece_ids)
            last_len = len(piece_ids)

        def all_space(token: int) -> bool:
            return all(b in b" \n\t" for b in self._decoder[token])

        if last_len and all_space(tokens[-last_len]):
            while last_len < len(tokens) and all_space(tokens[-last_len - 1]):
                last_len += 1
        if tokens and last_len:
            unstable = self.decode_bytes(tokens[-last_len:]) + data[valid:]
            del tokens[-last_len:]
        else:
            unstable = data[valid:]
        tokens.extend(self.encode_single_piece(unstable))
        return tokens

    # ------------------------------------------------------------------ decoding
    def _token_bytes(self, i, skip_special: bool) -> bytes:
        if isinstance(i, bool) or not hasattr(i, "__index__"):
            raise TypeError(f"ids must be ints, got {type(i).__name__}")
        i = int(i)
        token = self._decoder.get(i)
        if token is not None:
            return token
        special = self._special_decoder.get(i)
        if special is None:
            raise ValueError(f"id {i} is not a token of this tokenizer (vocab_size={self.vocab_size})")
        return b"" if skip_special else special

    def decode_bytes(self, ids: Sequence[int], skip_special: bool = False) -> bytes:
        """The bytes of `ids` concatenated (special tokens as their text unless `skip_special`)."""
        return b"".join(self._token_bytes(i, skip_special) for i in ids)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Decode ids to text; invalid UTF-8 becomes U+FFFD (as tiktoken's default `errors="replace"`).

        Special tokens are dropped when `skip_special`, else written as their text. Unknown ids
        raise ValueError.
        """
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def token_to_id(self, token: Union[str, bytes]) -> int:
        """The id of a special token's text or of a mergeable token's bytes (KeyError if none)."""
        if isinstance(token, str):
            if token in self._special:
                return self._special[token]
            token = token.encode("utf-8")
        return self._ranks[token]

    def id_to_bytes(self, i: int) -> bytes:
        """The bytes of one id (special tokens as their UTF-8 text)."""
        return self._token_bytes(i, skip_special=False)

    # ------------------------------------------------------------------ training
    @classmethod
    def train(
        cls,
        texts: Union[str, Iterable[str]],
        vocab_size: int,
        pattern: str = "cl100k",
        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
        pad_token: str = "<|pad|>",
        bos_token: str = "<|bos|>",
        eos_token: str = "<|eos|>",
        progress: bool = True,
    ) -> "BPETokenizer":
        """Learn a byte-level BPE from `texts` (a str or an iterable of str).

        `vocab_size` counts everything: 256 bytes + merges + special tokens; training stops early
        when no pair occurs any more. Each merge takes the most frequent adjacent pair over the
        pre-tokenised corpus (pieces never merge across regex splits); ties go to the pair whose
        (left bytes, right bytes) is lexicographically smallest, so training is deterministic.
        Special tokens in the text are *not* treated specially while counting.
        """
        if isinstance(texts, str):
            texts = [texts]
        specials = list(special_tokens)
        for t in (pad_token, bos_token, eos_token):
            if t not in specials:
                specials.append(t)
        if len(set(specials)) != len(specials):
            raise ValueError(f"special_tokens must be distinct, got {specials}")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 256 + len(specials):
            raise ValueError(f"vocab_size must be an int >= 256 + number of special tokens ({256 + len(specials)}), got {vocab_size!r}")
        pattern_str = _resolve_pattern(pattern)
        pat = regex.compile(pattern_str)
        native_split = _native_split_for(pattern_str)
        counts: Counter = Counter()  # piece bytes -> count
        from tqdm.auto import tqdm

        for i, text in enumerate(tqdm(texts, desc="bpe: pre-tokenising", unit="text", disable=not progress)):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
            if native_split is not None:
                try:
                    counts.update(_native.split(text, native_split))
                    continue
                except UnicodeEncodeError:  # lone surrogates: the regex path below keeps them
                    pass
            counts.update(piece.encode("utf-8", "surrogatepass") for piece in pat.findall(text))
        words = list(counts.items())
        n_merges = vocab_size - 256 - len(specials)
        if _native is not None and hasattr(_native, "train"):
            with tqdm(total=n_merges, desc="bpe: merges", unit="merge", disable=not progress) as bar:
                merged = _native.train(words, n_merges, lambda done: bar.update(done - bar.n))
        else:
            merged = _train_merges(words, n_merges, progress)
        ranks = {bytes([b]): b for b in range(256)}
        for token in merged:
            ranks[token] = len(ranks)
        special_ids = {t: len(ranks) + k for k, t in enumerate(specials)}
        return cls(ranks, pattern, special_ids, pad_token, bos_token, eos_token)

    @classmethod
    def train_from_files(cls, paths: Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]], vocab_size: int, **kwargs) -> "BPETokenizer":
        """`train` on the UTF-8 text of each file (one text per file)."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = [os.fspath(p) for p in paths]
        for p in paths:
            if not os.path.isfile(p):
                raise ValueError(f"paths: {p!r} is not a file")

        def read():
            for p in paths:
                with open(p, encoding="utf-8", newline="") as f:  # keep \r\n as written
                    yield f.read()

        return cls.train(read(), vocab_size, **kwargs)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        """Our JSON form: pattern, tokens (base64) in rank order with their ranks, special tokens."""
        return {
            "format": _FORMAT,
            "version": 1,
            "pattern": self.pattern,
            "mergeable_ranks": [[base64.b64encode(t).decode("ascii"), r] for t, r in sorted(self._ranks.items(), key=lambda kv: kv[1])],
            "special_tokens": dict(sorted(self._special.items(), key=lambda kv: kv[1])),
            "pad_token": self.pad_token,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "BPETokenizer":
        if not isinstance(d, Mapping) or d.get("format") != _FORMAT:
            raise ValueError(f"not a {_FORMAT} tokenizer description")
        if d.get("version") != 1:
            raise ValueError(f"unsupported {_FORMAT} version {d.get('version')!r} (this code reads version 1)")
        ranks = {base64.b64decode(t): int(r) for t, r in d["mergeable_ranks"]}
        return cls(ranks, d["pattern"], {k: int(v) for k, v in d["special_tokens"].items()}, d["pad_token"], d["bos_token"], d["eos_token"])

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write our JSON form to `path` atomically."""
        atomic_write_bytes(path, json.dumps(self.to_dict(), ensure_ascii=False, indent=1).encode("utf-8"))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "BPETokenizer":
        """Read a tokenizer written by `save`; a truncated or malformed file raises ValueError naming it."""
        from qlora_fast.utils import read_json

        d = read_json(path, "tokenizer")
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"tokenizer {os.fspath(path)!r} is not a qlora_fast BPE file: {type(e).__name__}: {e}") from e

    def save_tiktoken(self, path: Union[str, os.PathLike]) -> None:
        """Write the mergeable ranks in tiktoken's format ("<base64 token> <rank>" per line), atomically.

        The pattern and special tokens are not part of that format; `tiktoken_kwargs()` has them.
        """
        lines = [f"{base64.b64encode(t).decode('ascii')} {r}\n" for t, r in sorted(self._ranks.items(), key=lambda kv: kv[1])]
        atomic_write_bytes(path, "".join(lines).encode("ascii"))

    @classmethod
    def load_tiktoken(cls, path: Union[str, os.PathLike], pattern: str = "cl100k", special_tokens: Optional[Mapping[str, int]] = None, **kwargs) -> "BPETokenizer":
        """Read a tiktoken-format ranks file (e.g. one written by `save_tiktoken`)."""
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
        return cls(ranks, pattern, special_tokens, **kwargs)

    def tiktoken_kwargs(self) -> dict:
        """Keyword arguments for `tiktoken.Encoding(name, **tok.tiktoken_kwargs())` giving the same ids."""
        return {"pat_str": self.pattern, "mergeable_ranks": dict(self._ranks), "special_tokens": dict(self._special)}


SHIPPED_CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "corpus.txt")


# The built-in base model's vocabulary: 384 tuned as well as bytes after `qlora-fast finetune` (held-out
# exact match 11.9% and 11.2% over two seeds, bytes 11.2-12.5%), 512 did worse (5.0-8.1%); see
# bench/RESULTS.md. The corpus is small (57 kB), so more merges mostly memorise whole words.
SHIPPED_BPE_VOCAB_SIZE = 384


def load_shipped_bpe(vocab_size: int = SHIPPED_BPE_VOCAB_SIZE, pattern: str = "cl100k", cache_dir: Optional[str] = None, progress: bool = True, corpus_path: Optional[str] = None) -> BPETokenizer:
    """A BPE trained on the shipped corpus (`qlora_fast/data/corpus.txt`), cached on disk.

    The cache file `bpe-<key>.json` in `cache_dir` (default `default_cache_dir()`) is keyed by the
    corpus bytes, vocab size and pattern, so a changed corpus retrains. Written atomically.
    Raises FileNotFoundError when the corpus is missing.
    """
    import hashlib

    corpus_path = corpus_path or SHIPPED_CORPUS
    with open(corpus_path, "rb") as f:
        corpus = f.read()
    key = hashlib.sha256(corpus + f"|{vocab_size}|{_resolve_pattern(pattern)}|v1".encode()).hexdigest()[:16]
    path = os.path.join(cache_dir or default_cache_dir(), f"bpe-{key}.json")
    if os.path.exists(path):
        try:
            return BPETokenizer.load(path)
        except (OSError, ValueError) as e:  # a damaged cache entry: rebuild it rather than fail every later run
            import warnings

            warnings.warn(f"the cached tokenizer {path} is unreadable ({e}); training it again", stacklevel=2)
    tok = BPETokenizer.train([corpus.decode("utf-8")], vocab_size, pattern=pattern, progress=progress)
    tok.save(path)
    return tok


def _train_merges(words: List[Tuple[bytes, int]], n_merges: int, progress: bool = True) -> List[bytes]:
    """The merged tokens' bytes, in merge order (pure Python; `qlora_fast._bpe.train` is the same).

    words: (piece bytes, count). Pair counts are kept incrementally: merging a pair touches only
    the words that contain it. A lazy max-heap keyed by (-count, left bytes, right bytes) gives the
    documented tie rule. A merge whose bytes already exist as a token (reachable from two splits)
    reuses that token and adds no rank.
    """
    from tqdm.auto import tqdm

    token_bytes: List[bytes] = [bytes([b]) for b in range(256)]
    by_bytes: Dict[bytes, int] = {t: i for i, t in enumerate(token_bytes)}
    symbols = [list(w) for w, _ in words]
    freq = [n for _, n in words]
    pair_count: Dict[Tuple[int, int], int] = {}
    where: Dict[Tuple[int, int], set] = {}
    for wi, sym in enumerate(symbols):
        for pair in zip(sym, sym[1:]):
            pair_count[pair] = pair_count.get(pair, 0) + freq[wi]
            where.setdefault(pair, set()).add(wi)
    heap = [(-c, token_bytes[a], token_bytes[b], a, b) for (a, b), c in pair_count.items()]
    heap.sort()
    merged: List[bytes] = []
    bar = tqdm(total=n_merges, desc="bpe: merges", unit="merge", disable=not progress)
    while len(merged) < n_merges and heap:
        neg, _, _, a, b = heappop(heap)
        if pair_count.get((a, b), 0) != -neg or neg == 0:
            continue  # stale entry: the count changed since it was pushed
        new_bytes = token_bytes[a] + token_bytes[b]
        new = by_bytes.get(new_bytes)
        if new is None:
            new = len(token_bytes)
            token_bytes.append(new_bytes)
            by_bytes[new_bytes] = new
            merged.append(new_bytes)
            bar.update(1)
        changed = set()
        for wi in where.pop((a, b), ()):
            sym = symbols[wi]
            out, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and sym[i] == a and sym[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            if len(out) == len(sym):
                continue
            n = freq[wi]
            for pair in zip(sym, sym[1:]):
                pair_count[pair] -= n
                changed.add(pair)
            for pair in zip(out, out[1:]):
                pair_count[pair] = pair_count.get(pair, 0) + n
                where.setdefault(pair, set()).add(wi)
                changed.add(pair)
            symbols[wi] = out
        for pair in changed:
            c = pair_count.get(pair, 0)
            if c <= 0:
                pair_count.pop(pair, None)
            elif pair != (a, b):
                heappush(heap, (-c, token_bytes[pair[0]], token_bytes[pair[1]], pair[0], pair[1]))
        pair_count.pop((a, b), None)
    bar.close()
    return merged
