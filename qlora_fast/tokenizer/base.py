"""The tokenizer interface the trainers use, and the byte-level tokenizer.

Any tokenizer the trainers take provides: `vocab_size`, `pad_id`, `bos_id`, `eos_id`,
`encode(text, add_bos=False, add_eos=False) -> list[int]`, `decode(ids, skip_special=True) -> str`
and `encode_batch(texts, ...) -> list[list[int]]`.
"""
import operator
from typing import Iterable, List, Protocol, Sequence, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> List[int]: ...

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str: ...

    def encode_batch(self, texts: Iterable[str], add_bos: bool = False, add_eos: bool = False) -> List[List[int]]: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then <pad>=256, <bos>=257, <eos>=258."""

    vocab_size = 259
    pad_id = 256
    bos_id = 257
    eos_id = 258

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> List[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        data = bytearray()
        for i in ids:
            if isinstance(i, bool) or not hasattr(i, "__index__"):  # int() would truncate 1.5 to 1
                raise TypeError(f"ids must be ints, got {type(i).__name__}")
            i = operator.index(i)  # a float tensor has __index__, and refuses here
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ids must be in [0, {self.vocab_size}), got {i}")
            if i < 256:
                data.append(i)
            elif not skip_special:
                data.extend({self.pad_id: b"<pad>", self.bos_id: b"<bos>", self.eos_id: b"<eos>"}[i])
        return data.decode("utf-8", errors="replace")

    def encode_batch(self, texts: Iterable[str], add_bos: bool = False, add_eos: bool = False) -> List[List[int]]:
        if isinstance(texts, (str, bytes)):  # else each character would be a text of its own
            raise TypeError("texts must be an iterable of str, not a single str/bytes")
        return [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]
