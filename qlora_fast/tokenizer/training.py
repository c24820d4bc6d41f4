"""Learning a byte-level BPE: pieces counted over the pre-tokenised corpus, then merges by pair
frequency (in C++ when the extension is built, else in pure Python, with the same result).

Ties are broken deterministically: the pair with the highest count wins; among equal counts, the
pair whose (left bytes, right bytes) is lexicographically smallest wins. Token `256 + k` is the
k-th merge and single bytes keep their byte value as rank.
"""
from collections import Counter
from heapq import heappop, heappush
from typing import Dict, Iterable, List, Tuple

from . import native
from .patterns import compile_pattern, piece_splitter


def learn_ranks(texts: Iterable[str], n_merges: int, pattern: str, progress: bool = True) -> Dict[bytes, int]:
    """token bytes -> rank: the 256 single bytes, then up to `n_merges` merges learnt from `texts`
    split by the regex `pattern` (fewer when no pair occurs any more). A non-str text raises
    TypeError naming its index; an invalid regex, ValueError naming `pattern`."""
    from tqdm.auto import tqdm

    split = piece_splitter(compile_pattern(pattern))
    native_split = native.split_id(pattern)
    counts: Counter = Counter()  # piece bytes -> count
    for i, text in enumerate(tqdm(texts, desc="bpe: pre-tokenising", unit="text", disable=not progress)):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
        if native_split is not None:
            try:
                counts.update(native.extension.split(text, native_split))
                continue
            except UnicodeEncodeError:  # lone surrogates: the regex path below keeps them
                pass
        counts.update(piece.encode("utf-8", "surrogatepass") for piece in split(text))
    words = list(counts.items())
    if native.extension is not None and hasattr(native.extension, "train"):
        with tqdm(total=n_merges, desc="bpe: merges", unit="merge", disable=not progress) as bar:
            merged = native.extension.train(words, n_merges, lambda done: bar.update(done - bar.n))
    else:
        merged = train_merges(words, n_merges, progress)
    ranks = {bytes([b]): b for b in range(256)}
    for token in merged:
        ranks[token] = len(ranks)
    return ranks


def train_merges(words: List[Tuple[bytes, int]], n_merges: int, progress: bool = True) -> List[bytes]:
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
