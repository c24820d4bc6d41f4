"""ROUGE as Google's rouge-score package computes it: lowercase, non-[a-z0-9] characters become
spaces, optional Porter stemming of tokens longer than three characters; ROUGE-N from clipped
n-gram overlap, ROUGE-L from the longest common subsequence, and ROUGE-Lsum from the union LCS of
newline-separated summary sentences (ROUGE paper, section 3.2)."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

from .porter import PorterStemmer

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_SPACES = re.compile(r"\s+")
_VALID_TOKEN = re.compile(r"^[a-z0-9]+$")
_ROUGE_N = re.compile(r"rouge([0-9])$")
_STEMMER = PorterStemmer()


@dataclass(frozen=True)
class RougeScore:
    precision: float
    recall: float
    fmeasure: float


_ZERO = RougeScore(0.0, 0.0, 0.0)


def _fmeasure(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def rouge_tokenize(text: str, stemmer: bool = False) -> List[str]:
    """rouge-score's default tokenisation of `text`."""
    tokens = _SPACES.split(_NON_ALNUM.sub(" ", text.lower()))
    if stemmer:
        tokens = [_STEMMER.stem(t) if len(t) > 3 else t for t in tokens]
    return [t for t in tokens if _VALID_TOKEN.match(t)]


def _ngrams(tokens: List[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _score_ngrams(target: Counter, prediction: Counter) -> RougeScore:
    overlap = sum(min(count, prediction[ngram]) for ngram, count in target.items())
    precision = overlap / max(sum(prediction.values()), 1)
    recall = overlap / max(sum(target.values()), 1)
    return RougeScore(precision, recall, _fmeasure(precision, recall))


def _lcs_table(ref: List[str], can: List[str]) -> List[List[int]]:
    table = [[0] * (len(can) + 1) for _ in range(len(ref) + 1)]
    for i, r in enumerate(ref, 1):  # the hot loop of rougeL/rougeLsum: locals, no re-indexing
        row, prev = table[i], table[i - 1]
        left = 0
        for j, c in enumerate(can, 1):
            left = row[j] = prev[j - 1] + 1 if r == c else max(prev[j], left)
    return table


def _lcs_indices(ref: List[str], can: List[str]) -> List[int]:
    """Indices into `ref` of one LCS, read back from the table's corner (ties move up in ref)."""
    table = _lcs_table(ref, can)
    i, j, out = len(ref), len(can), []
    while i > 0 and j > 0:
        if ref[i - 1] == can[j - 1]:
            out.append(i - 1)
            i -= 1
            j -= 1
        elif table[i][j - 1] > table[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return out[::-1]


def _score_lcs(target: List[str], prediction: List[str]) -> RougeScore:
    if not target or not prediction:
        return _ZERO
    lcs = _lcs_table(target, prediction)[-1][-1]
    precision, recall = lcs / len(prediction), lcs / len(target)
    return RougeScore(precision, recall, _fmeasure(precision, recall))


def _score_summary_lcs(target_sents: List[List[str]], prediction_sents: List[List[str]]) -> RougeScore:
    if not target_sents or not prediction_sents:
        return _ZERO
    m = sum(map(len, target_sents))
    n = sum(map(len, prediction_sents))
    if not n or not m:
        return _ZERO
    left_ref = Counter(t for s in target_sents for t in s)
    left_can = Counter(t for s in prediction_sents for t in s)
    hits = 0
    for ref in target_sents:
        union = sorted(set().union(*(_lcs_indices(ref, can) for can in prediction_sents)))
        for token in (ref[i] for i in union):
            # each token is credited at most as often as it occurs on both sides
            if left_can[token] > 0 and left_ref[token] > 0:
                hits += 1
                left_can[token] -= 1
                left_ref[token] -= 1
    precision, recall = hits / n, hits / m
    return RougeScore(precision, recall, _fmeasure(precision, recall))


def _check_types(types: Sequence[str]) -> List[str]:
    if isinstance(types, str):
        types = [types]
    types = list(types)
    if not types:
        raise ValueError("types must name at least one ROUGE type")
    for t in types:
        m = _ROUGE_N.match(t) if isinstance(t, str) else None
        if t in ("rougeL", "rougeLsum"):
            continue
        if m is None or int(m.group(1)) == 0:
            raise ValueError(f"types: unknown ROUGE type {t!r} (expected rouge1..rouge9, rougeL or rougeLsum)")
    return types


def _score_pair(target: str, prediction: str, types: List[str], stemmer: bool) -> Dict[str, RougeScore]:
    target_tokens = rouge_tokenize(target, stemmer)
    prediction_tokens = rouge_tokenize(prediction, stemmer)
    out = {}
    for t in types:
        if t == "rougeL":
            out[t] = _score_lcs(target_tokens, prediction_tokens)
        elif t == "rougeLsum":
            # Summary sentences are the non-empty lines.
            out[t] = _score_summary_lcs(
                [rouge_tokenize(s, stemmer) for s in target.split("\n") if s],
                [rouge_tokenize(s, stemmer) for s in prediction.split("\n") if s],
            )
        else:
            n = int(t[5:])
            out[t] = _score_ngrams(_ngrams(target_tokens, n), _ngrams(prediction_tokens, n))
    return out


def rouge(
    predictions: Sequence[str],
    references: Sequence[Union[str, Sequence[str]]],
    types: Sequence[str] = ("rouge1", "rouge2", "rougeL", "rougeLsum"),
    stemmer: bool = False,
    aggregate: Optional[str] = "mean",
) -> Union[Dict[str, RougeScore], List[Dict[str, RougeScore]]]:
    """ROUGE precision, recall and F1, equal to rouge-score's `RougeScorer(types, use_stemmer=stemmer)`.

    Args:
        predictions: one string per example.
        references: per example a string, or a non-empty sequence of strings (several
            references: per type the one with the highest F1 is used, the first on a tie, as
            `RougeScorer.score_multi`).
        types: any of "rouge1".."rouge9", "rougeL", "rougeLsum" (sentences split at newlines).
        stemmer: use the Porter stemmer (NLTK's variant, as rouge-score) on tokens longer than 3.
        aggregate: "mean" -> {type: RougeScore of per-example means}; None -> per-example dicts.

    Raises TypeError for a non-string item, ValueError for mismatched lengths or unknown types.
    """
    types = _check_types(types)
    if aggregate not in ("mean", None):
        raise ValueError(f"aggregate must be 'mean' or None, got {aggregate!r}")
    for name, seq in (("predictions", predictions), ("references", references)):
        if isinstance(seq, str) or not isinstance(seq, Sequence):
            raise TypeError(f"{name} must be a sequence (list/tuple), got {type(seq).__name__}")
    if len(predictions) != len(references):
        raise ValueError(f"predictions has {len(predictions)} items but references has {len(references)}")
    if not predictions:
        raise ValueError("predictions must not be empty")
    per_example = []
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        if not isinstance(pred, str):
            raise TypeError(f"predictions[{i}] must be a str, got {type(pred).__name__}")
        if isinstance(refs, str):
            refs = [refs]
        elif not isinstance(refs, Sequence) or not refs:
            raise TypeError(f"references[{i}] must be a str or a non-empty sequence of str, got {refs!r:.60}")
        for k, r in enumerate(refs):
            if not isinstance(r, str):
                raise TypeError(f"references[{i}][{k}] must be a str, got {type(r).__name__}")
        scores = [_score_pair(r, pred, types, stemmer) for r in refs]
        per_example.append(
            {t: max(scores, key=lambda s: s[t].fmeasure)[t] if len(scores) > 1 else scores[0][t] for t in types}
        )
    if aggregate is None:
        return per_example
    n = len(per_example)
    return {
        t: RougeScore(
            sum(s[t].precision for s in per_example) / n,
            sum(s[t].recall for s in per_example) / n,
            sum(s[t].fmeasure for s in per_example) / n,
        )
        for t in types
    }
