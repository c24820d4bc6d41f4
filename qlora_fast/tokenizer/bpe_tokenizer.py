"""`BPETokenizer`: byte-level BPE whose encoding is identical to tiktoken's for the same ranks.

A token is a byte string with a *rank*; the rank is also the token's id. Encoding splits the text
with a pre-tokenisation regex (`patterns`), then merges each piece's bytes the way tiktoken does
(`merge`); pieces over 128 bytes use an equivalent O(n log n) heap-based merge. With the C++
extension `qlora_fast._bpe` built (`native`), the merge loop (with a cache of encoded pieces) runs
in C++, and for GPT-2's and cl100k's patterns so does the split, by a scanner using the `regex`
module's own character classes; otherwise everything runs in pure Python. Both paths give the same
ids (tested against each other and against tiktoken). Special tokens take the ids after the merges.

The class is the API; the work behind `train` is in `training`, behind `save`/`load` in
`json_format` and behind the tiktoken methods in `tiktoken_format`.
"""
from __future__ import annotations

import operator
import os
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import regex

from . import json_format, native, tiktoken_format
from .merge import merge_piece
from .patterns import compile_pattern, piece_splitter, resolve_pattern
from .training import learn_ranks

DEFAULT_SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>")
_CACHE_LIMIT = 1 << 16  # pieces remembered by the pure-Python encoder before its cache is reset


def _replace_lone_surrogates(text: str) -> str:
    """Lone surrogates cannot be UTF-8 encoded: U+FFFD instead, as tiktoken does."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


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
            raise ValueError(f"mergeable_ranks must contain all 256 single bytes; missing {len(missing)}, "
                             f"e.g. {missing[:5]}")
        self.pattern = resolve_pattern(pattern)
        self._pat = compile_pattern(self.pattern)
        self._split = piece_splitter(self._pat)  # the whole matches, even when the pattern has groups

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
        self._native = native.extension.Encoder(ranks) if native.extension is not None else None
        self._native_split = native.split_id(self.pattern)
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
        self.__init__(*json_format.init_args(state))

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
                ids = tuple(merge_piece(piece.encode("utf-8"), ranks))
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                cache[piece] = ids
            out.extend(ids)
        return out

    def _encode_ordinary(self, text: str) -> List[int]:
        if self._native is not None and self._native_split is not None:
            return self._native.encode_ordinary(text, self._native_split)
        return self._encode_pieces(self._split(text))

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
        return merge_piece(bytes(data), self._ranks)

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
        for piece in self._split(data[:valid].decode("utf-8")):
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
        i = operator.index(i)  # not int(): a float tensor has __index__ too, and int() would truncate it
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
            raise ValueError(f"vocab_size must be an int >= 256 + number of special tokens ({256 + len(specials)}), "
                             f"got {vocab_size!r}")
        ranks = learn_ranks(texts, vocab_size - 256 - len(specials), resolve_pattern(pattern), progress)
        special_ids = {t: len(ranks) + k for k, t in enumerate(specials)}
        return cls(ranks, pattern, special_ids, pad_token, bos_token, eos_token)

    @classmethod
    def train_from_files(cls, paths: Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]], vocab_size: int,
                         **kwargs) -> "BPETokenizer":
        """`train` on the UTF-8 text of each file (one text per file). A path that is not a file,
        or a file that is not UTF-8, raises ValueError naming it."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = [os.fspath(p) for p in paths]
        for p in paths:
            if not os.path.isfile(p):
                raise ValueError(f"paths: {p!r} is not a file")

        def read():
            for p in paths:
                with open(p, "rb") as f:  # decoded whole: \r\n kept as written, the error's offset is the file's
                    data = f.read()
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"paths: {p!r} is not UTF-8 text ({e.reason} at byte {e.start})") from e
                yield text

        return cls.train(read(), vocab_size, **kwargs)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        """Our JSON form: pattern, tokens (base64) in rank order with their ranks, special tokens."""
        return json_format.to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "BPETokenizer":
        return cls(*json_format.init_args(d))

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write our JSON form to `path` atomically."""
        json_format.save(self, path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "BPETokenizer":
        """Read a tokenizer written by `save`; a truncated or malformed file raises ValueError naming it."""
        return json_format.load(cls, path)

    def save_tiktoken(self, path: Union[str, os.PathLike]) -> None:
        """Write the mergeable ranks in tiktoken's format ("<base64 token> <rank>" per line), atomically.

        The pattern and special tokens are not part of that format; `tiktoken_kwargs()` has them.
        """
        tiktoken_format.write_ranks(self._ranks, path)

    @classmethod
    def load_tiktoken(cls, path: Union[str, os.PathLike], pattern: str = "cl100k",
                      special_tokens: Optional[Mapping[str, int]] = None, **kwargs) -> "BPETokenizer":
        """Read a tiktoken-format ranks file (e.g. one written by `save_tiktoken`)."""
        return cls(tiktoken_format.read_ranks(path), pattern, special_tokens, **kwargs)

    def tiktoken_kwargs(self) -> dict:
        """Keyword arguments for `tiktoken.Encoding(name, **tok.tiktoken_kwargs())` giving the same ids."""
        return tiktoken_format.encoding_kwargs(self)
