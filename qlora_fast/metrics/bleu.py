"""BLEU as sacrebleu computes it: 13a tokenisation, clipped n-gram matches against several
references, closest reference length for the brevity penalty, and the smoothing methods of
Chen & Cherry (2014): 'none', 'floor' (default 0.1), 'add-k' (default 1) and 'exp' (NIST),
optionally with effective order. Scores are on sacrebleu's 0-100 scale."""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

MAX_NGRAM_ORDER = 4
SMOOTH_DEFAULTS = {"none": None, "floor": 0.1, "add-k": 1, "exp": None}
_LOG_OF_ZERO = -9999999999  # sacrebleu floors log(0) to this, so a zero precision gives BLEU 0

_13A_RULES = [
    # punctuation and symbols become separate tokens
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    # period and comma split off unless between digits
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    # dash split off after a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
]


@lru_cache(maxsize=1 << 16)
def tokenize_13a(line: str) -> str:
    """mteval-v13a tokenisation (WMT's standard) of one line; tokens joined by single spaces."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _13A_RULES:
        line = pattern.sub(repl, line)
    return " ".join(line.split())


_TOKENIZERS = {"13a": tokenize_13a, "none": lambda line: line}


@dataclass
class BLEUScore:
    """BLEU and its statistics. `score` and `precisions` are percentages (0-100)."""

    score: float
    counts: List[float]
    totals: List[float]
    precisions: List[float]
    bp: float
    sys_len: int
    ref_len: int


def _ngrams(tokens: List[str], max_order: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for n in range(1, max_order + 1) for i in range(len(tokens) - n + 1))


def _closest_ref_len(hyp_len: int, ref_lens: List[int]) -> int:
    # The reference length closest to the hypothesis; the shorter one on a tie.
    return min(ref_lens, key=lambda r: (abs(hyp_len - r), r))


def _segment_stats(hyp: str, refs: List[str], max_order: int) -> Tuple[int, int, List[int], List[int]]:
    max_ref_counts: Counter = Counter()
    ref_lens = []
    for ref in refs:
        tokens = ref.split()
        ref_lens.append(len(tokens))
        for ngram, count in _ngrams(tokens, max_order).items():
            if count > max_ref_counts[ngram]:
                max_ref_counts[ngram] = count
    hyp_tokens = hyp.split()
    correct = [0] * max_order
    total = [0] * max_order
    for ngram, count in _ngrams(hyp_tokens, max_order).items():
        total[len(ngram) - 1] += count
        correct[len(ngram) - 1] += min(count, max_ref_counts.get(ngram, 0))
    return len(hyp_tokens), _closest_ref_len(len(hyp_tokens), ref_lens), correct, total


def _score_from_stats(
    correct, total, sys_len, ref_len, smooth_method, smooth_value, effective_order, max_order
) -> BLEUScore:
    if smooth_value is None:
        smooth_value = SMOOTH_DEFAULTS[smooth_method]
    correct, total = list(correct), list(total)
    bp = 1.0
    if sys_len < ref_len:
        bp = math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0
    precisions = [0.0] * max_order
    if not any(correct):
        return BLEUScore(0.0, correct, total, precisions, bp, sys_len, ref_len)
    smooth_exp = 1.0
    eff_order = max_order
    for n in range(1, max_order + 1):
        if smooth_method == "add-k" and n > 1:
            correct[n - 1] += smooth_value
            total[n - 1] += smooth_value
        if total[n - 1] == 0:
            break
        if effective_order:
            eff_order = n
        if correct[n - 1] == 0:
            if smooth_method == "exp":
                smooth_exp *= 2
                precisions[n - 1] = 100.0 / (smooth_exp * total[n - 1])
            elif smooth_method == "floor":
                precisions[n - 1] = 100.0 * smooth_value / total[n - 1]
        else:
            precisions[n - 1] = 100.0 * correct[n - 1] / total[n - 1]
    log_sum = sum(math.log(p) if p != 0.0 else _LOG_OF_ZERO for p in precisions[:eff_order])
    return BLEUScore(bp * math.exp(log_sum / eff_order), correct, total, precisions, bp, sys_len, ref_len)


def _check_options(smooth_method, smooth_value, tokenize, max_ngram_order):
    if smooth_method not in SMOOTH_DEFAULTS:
        raise ValueError(f"smooth_method must be one of {sorted(SMOOTH_DEFAULTS)}, got {smooth_method!r}")
    if smooth_value is not None and (isinstance(smooth_value, bool) or not isinstance(smooth_value, (int, float))):
        raise TypeError(f"smooth_value must be a number or None, got {type(smooth_value).__name__}")
    if smooth_value is not None and not 0 <= smooth_value < math.inf:  # a NaN or negative count skews every score
        raise ValueError(f"smooth_value must be a finite number >= 0, got {smooth_value!r}")
    if tokenize not in _TOKENIZERS:
        raise ValueError(f"tokenize must be one of {sorted(_TOKENIZERS)}, got {tokenize!r}")
    if isinstance(max_ngram_order, bool) or not isinstance(max_ngram_order, int) or max_ngram_order < 1:
        raise ValueError(f"max_ngram_order must be a positive int, got {max_ngram_order!r}")


def bleu(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[Optional[str]]],
    smooth_method: str = "exp",
    smooth_value: Optional[float] = None,
    lowercase: bool = False,
    tokenize: str = "13a",
    use_effective_order: bool = False,
    max_ngram_order: int = MAX_NGRAM_ORDER,
) -> BLEUScore:
    """Corpus BLEU, equal to `sacrebleu.corpus_bleu` with the same arguments.

    Args:
        hypotheses: one string per segment.
        references: reference *streams* as sacrebleu takes them: `references[k][i]` is the k-th
            reference of segment i. Every stream has one item per hypothesis; an item may be None
            (fewer references for that segment) but each segment needs at least one.
        smooth_method: 'exp' (default), 'floor', 'add-k' or 'none'; `smooth_value` for floor/add-k.
        lowercase, tokenize ('13a' or 'none'), use_effective_order, max_ngram_order: as sacrebleu.

    Raises TypeError for a non-string item, ValueError for mismatched lengths or bad options.
    """
    _check_options(smooth_method, smooth_value, tokenize, max_ngram_order)
    if isinstance(hypotheses, str) or not isinstance(hypotheses, Sequence):
        raise TypeError("hypotheses must be a sequence of str")
    if not hypotheses:
        raise ValueError("hypotheses must not be empty")
    if isinstance(references, str) or not isinstance(references, Sequence) or not references:
        raise TypeError("references must be a non-empty sequence of reference streams (each a sequence of str)")
    for i, h in enumerate(hypotheses):
        if not isinstance(h, str):
            raise TypeError(f"hypotheses[{i}] must be a str, got {type(h).__name__}")
    for k, stream in enumerate(references):
        if isinstance(stream, str) or not isinstance(stream, Sequence):
            raise TypeError(
                f"references[{k}] must be a sequence of str (one per hypothesis), got {type(stream).__name__}"
            )
        if len(stream) != len(hypotheses):
            raise ValueError(f"references[{k}] has {len(stream)} items but there are {len(hypotheses)} hypotheses")
        for i, r in enumerate(stream):
            if r is not None and not isinstance(r, str):
                raise TypeError(f"references[{k}][{i}] must be a str or None, got {type(r).__name__}")
    tok = _TOKENIZERS[tokenize]

    def prep(s: str) -> str:
        return tok((s.lower() if lowercase else s).rstrip())

    sys_len = ref_len = 0
    correct = [0] * max_ngram_order
    total = [0] * max_ngram_order
    for i, hyp in enumerate(hypotheses):
        refs = [prep(stream[i]) for stream in references if stream[i] is not None]
        if not refs:
            raise ValueError(f"segment {i} has no reference (every stream holds None there)")
        h_len, r_len, c, t = _segment_stats(prep(hyp), refs, max_ngram_order)
        sys_len += h_len
        ref_len += r_len
        correct = [a + b for a, b in zip(correct, c)]
        total = [a + b for a, b in zip(total, t)]
    return _score_from_stats(
        correct, total, sys_len, ref_len, smooth_method, smooth_value, use_effective_order, max_ngram_order
    )


def sentence_bleu(
    hypothesis: str,
    references: Sequence[str],
    smooth_method: str = "exp",
    smooth_value: Optional[float] = None,
    lowercase: bool = False,
    tokenize: str = "13a",
    use_effective_order: bool = True,
    max_ngram_order: int = MAX_NGRAM_ORDER,
) -> BLEUScore:
    """BLEU of one hypothesis against its references, equal to `sacrebleu.sentence_bleu`."""
    if not isinstance(hypothesis, str):
        raise TypeError(f"hypothesis must be a str, got {type(hypothesis).__name__}")
    if isinstance(references, str) or not isinstance(references, Sequence) or not references:
        raise TypeError("references must be a non-empty sequence of str")
    return bleu(
        [hypothesis],
        [[r] for r in references],
        smooth_method,
        smooth_value,
        lowercase,
        tokenize,
        use_effective_order,
        max_ngram_order,
    )
