"""tiktoken's byte-pair merge of one piece, in pure Python (the C++ extension's merge loop gives the
same ids): while some adjacent pair of parts concatenates to a known token, merge the pair whose
concatenation has the lowest rank (the leftmost one on a tie)."""
from heapq import heappop, heappush
from typing import List, Mapping

LONG_PIECE = 128  # pieces longer than this (bytes) use the heap-based merge, as the C++ loop does


def _merge_long_piece(piece: bytes, ranks: Mapping[bytes, int]) -> List[int]:
    """The same merges as `merge_piece` in O(n log n): parts in a linked list, candidate pairs in
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


def merge_piece(piece: bytes, ranks: Mapping[bytes, int]) -> List[int]:
    """tiktoken's byte-pair merge of one piece, in pure Python."""
    rank = ranks.get(piece)
    if rank is not None:
        return [rank]
    if len(piece) > LONG_PIECE:
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
