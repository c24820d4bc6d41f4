"""Evaluation metrics: sliding-window perplexity of a causal LM, BLEU (sacrebleu's 13a, smoothing,
effective order) and ROUGE (Google's rouge-score, with its Porter stemmer), reimplemented here so
that evaluation needs no extra package; the reference packages are test oracles only."""
from .bleu import BLEUScore, bleu, sentence_bleu, tokenize_13a  # noqa: F401
from .perplexity import perplexity  # noqa: F401
from .porter import PorterStemmer  # noqa: F401
from .rouge import RougeScore, rouge, rouge_tokenize  # noqa: F401

__all__ = [
    "perplexity",
    "bleu",
    "sentence_bleu",
    "BLEUScore",
    "tokenize_13a",
    "rouge",
    "RougeScore",
    "rouge_tokenize",
    "PorterStemmer",
]
