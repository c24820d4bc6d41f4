"""Metrics against their oracles: sacrebleu (BLEU), rouge-score and nltk's Porter stemmer (ROUGE),
and float64 NLL computed directly / Hugging Face's recipe (perplexity)."""
import math
import os
import random
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlora_fast.metrics import PorterStemmer, bleu, perplexity, rouge, rouge_tokenize, sentence_bleu

sacrebleu = pytest.importorskip("sacrebleu", reason="sacrebleu is the BLEU oracle (test extra)")
rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer", reason="rouge-score is the ROUGE oracle (test extra)")
nltk_porter = pytest.importorskip("nltk.stem.porter", reason="nltk (a rouge-score dependency) is the stemmer oracle")

TOL = 1e-9

VOCAB = [
    "the", "a", "cat", "cats", "sat", "sitting", "on", "mat", "mats", "dog", "dogs", "running", "runs", "ran",
    "quickly", "quick", "happiness", "happy", "relational", "conditional", "generalization", "hopefulness",
    "The", "CAT", "Hello", ",", ".", "!", "?", "3.5", "1,000", "-", "4-5", "&", "&amp;", "&quot;", "&lt;", "(", ")",
    "'s", "don't", "e.g.", "U.S.", "naïve", "café", "日本", "über", "x", "y", "z", "flies", "flying", "agreed",
]


def random_sentence(rng: random.Random, max_words: int = 25) -> str:
    n = rng.randrange(0, max_words + 1)
    words = [rng.choice(VOCAB) for _ in range(n)]
    return "".join(w + rng.choice([" ", " ", " ", "", "  ", "\t"]) for w in words)


def random_summary(rng: random.Random) -> str:
    return "\n".join(random_sentence(rng, 12) for _ in range(rng.randrange(0, 5))) + rng.choice(["", "\n", "\n\n"])


# ---------------------------------------------------------------------------------- BLEU
def assert_bleu_equal(ours, theirs):
    assert abs(ours.score - theirs.score) <= TOL, (ours.score, theirs.score)
    assert all(abs(a - b) <= TOL for a, b in zip(ours.precisions, theirs.precisions)), (
        ours.precisions,
        theirs.precisions,
    )
    assert abs(ours.bp - theirs.bp) <= TOL
    assert (ours.sys_len, ours.ref_len) == (theirs.sys_len, theirs.ref_len)
    assert list(ours.counts) == list(theirs.counts) and list(ours.totals) == list(theirs.totals)


@pytest.mark.parametrize("smooth_method", ["exp", "floor", "add-k", "none"])
@pytest.mark.parametrize("effective_order", [False, True])
@pytest.mark.parametrize("n_refs", [1, 3])
def test_corpus_bleu_equals_sacrebleu(smooth_method, effective_order, n_refs, seed):
    rng = random.Random(seed)
    for _ in range(8):
        n = rng.randrange(1, 12)
        hyps = [random_sentence(rng) for _ in range(n)]
        refs = [[random_sentence(rng) if rng.random() > 0.1 else "" for _ in range(n)] for _ in range(n_refs)]
        # Some hypotheses copy a reference partly so precisions are non-trivial.
        hyps = [
            h if rng.random() < 0.5 else " ".join(refs[0][i].split()[: rng.randrange(0, 20)])
            for i, h in enumerate(hyps)
        ]
        for lowercase in (False, True):
            kwargs = dict(smooth_method=smooth_method, lowercase=lowercase, use_effective_order=effective_order)
            assert_bleu_equal(bleu(hyps, refs, **kwargs), sacrebleu.corpus_bleu(hyps, refs, **kwargs))


@pytest.mark.parametrize("smooth_method,smooth_value", [("floor", 0.3), ("add-k", 2), ("exp", None), ("none", None)])
def test_sentence_bleu_equals_sacrebleu(smooth_method, smooth_value, seed):
    rng = random.Random(seed)
    for _ in range(30):
        refs = [random_sentence(rng) for _ in range(rng.randrange(1, 4))]
        hyp = random_sentence(rng) if rng.random() < 0.4 else " ".join(refs[0].split()[rng.randrange(0, 3) :])
        for eff in (True, False):
            kwargs = dict(smooth_method=smooth_method, smooth_value=smooth_value, use_effective_order=eff)
            assert_bleu_equal(sentence_bleu(hyp, refs, **kwargs), sacrebleu.sentence_bleu(hyp, refs, **kwargs))


def test_bleu_edge_cases_equal_sacrebleu():
    cases = [
        (["", ""], [["a b c", "d e"]]),  # empty hypotheses
        (["a b c d e f g"], [["a b c"], ["a b c d e f g h i j k"], ["x"]]),  # references of different lengths
        (["the the the the"], [["the cat"], ["the the dog"]]),  # clipping across references
        (["same length", "no match here"], [["same length", "zzz"]]),
        (["a"], [["a"]]),  # shorter than every n-gram order
        (["He said &quot;hi&quot; - 3-4 (ok)."], [['He said "hi" - 3 - 4 ( ok ) .']]),
    ]
    for hyps, refs in cases:
        for sm in ("exp", "floor", "add-k", "none"):
            for eff in (False, True):
                assert_bleu_equal(
                    bleu(hyps, refs, smooth_method=sm, use_effective_order=eff),
                    sacrebleu.corpus_bleu(hyps, refs, smooth_method=sm, use_effective_order=eff),
                )
    assert_bleu_equal(
        bleu(["a b", "c d"], [["a b", None], [None, "c d"]]),
        sacrebleu.corpus_bleu(["a b", "c d"], [["a b", None], [None, "c d"]]),
    )
    hyps, refs = ["x y . z"], [["x y. z"]]
    assert_bleu_equal(bleu(hyps, refs, tokenize="none"), sacrebleu.corpus_bleu(hyps, refs, tokenize="none"))


def test_bleu_bad_input():
    with pytest.raises(ValueError, match=r"references\[0\] has 1 items but there are 2"):
        bleu(["a", "b"], [["a"]])
    with pytest.raises(TypeError, match=r"hypotheses\[1\] must be a str"):
        bleu(["a", 3], [["a", "b"]])
    with pytest.raises(TypeError, match=r"references\[0\]\[0\] must be a str"):
        bleu(["a"], [[b"a"]])
    with pytest.raises(TypeError, match="references"):
        bleu(["a"], ["a"])
    with pytest.raises(ValueError, match="smooth_method"):
        bleu(["a"], [["a"]], smooth_method="bogus")
    with pytest.raises(ValueError, match="no reference"):
        bleu(["a"], [[None]])
    for method, value in (("floor", float("nan")), ("add-k", -1), ("add-k", float("inf"))):  # NaN / skewed scores
        with pytest.raises(ValueError, match="smooth_value must be a finite number >= 0"):
            bleu(["a b c"], [["a c b"]], smooth_method=method, smooth_value=value)
    with pytest.raises(TypeError, match="hypothesis must be a str"):
        sentence_bleu(None, ["a"])


# ---------------------------------------------------------------------------------- Porter
def _words_from_installed_text():
    """English words from the sources and docs of installed packages (no downloads)."""
    import nltk

    words = set()
    root = os.path.dirname(nltk.__file__)
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(dirpath, name), encoding="utf-8", errors="ignore") as f:
                    words.update(re.findall(r"[a-z]+", f.read().lower()))
    return sorted(words)


SUFFIXES = [
    "s", "es", "sses", "ies", "ied", "ed", "eed", "ing", "y", "ly", "ational", "tional", "enci", "anci", "izer",
    "bli", "abli", "alli", "entli", "eli", "ousli", "ization", "ation", "ator", "alism", "iveness", "fulness",
    "ousness", "aliti", "iviti", "biliti", "fulli", "logi", "icate", "ative", "alize", "iciti", "ical", "ful", "ness",
    "al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "sion", "tion", "ou", "ism",
    "ate", "iti", "ous", "ive", "ize", "e", "ll", "at", "bl", "iz",
]


def test_porter_stemmer_equals_nltk_on_a_large_word_list(seed):
    oracle = nltk_porter.PorterStemmer()
    ours = PorterStemmer()
    rng = random.Random(seed)
    words = _words_from_installed_text()
    stems = [w for w in words if 2 <= len(w) <= 8]
    words += [
        "".join(rng.choice(stems)[: rng.randrange(1, 8)] for _ in range(rng.randrange(1, 3))) + rng.choice(SUFFIXES)
        for _ in range(20000)
    ]
    words += [
        "sky",
        "skies",
        "dying",
        "news",
        "innings",
        "proceed",
        "ay",
        "by",
        "yy",
        "yyyy",
        "syzygy",
        "toy",
        "ies",
        "tied",
        "spied",
    ]
    assert len(words) > 30000
    mismatches = [(w, ours.stem(w), oracle.stem(w)) for w in words if ours.stem(w) != oracle.stem(w)]
    assert not mismatches, mismatches[:20]


@settings(max_examples=300, deadline=None)
@given(word=st.text(alphabet="abcdefgilmnorstuvyz", min_size=1, max_size=14))
def test_porter_stemmer_equals_nltk_on_arbitrary_words(word):
    assert PorterStemmer().stem(word) == nltk_porter.PorterStemmer().stem(word)


# ---------------------------------------------------------------------------------- ROUGE
TYPES = ["rouge1", "rouge2", "rouge3", "rougeL", "rougeLsum"]


def assert_rouge_equal(ours, theirs):
    for t, score in theirs.items():
        o = ours[t]
        assert (
            abs(o.precision - score.precision) <= TOL
            and abs(o.recall - score.recall) <= TOL
            and abs(o.fmeasure - score.fmeasure) <= TOL
        ), (t, o, score)


@pytest.mark.parametrize("stemmer", [False, True])
def test_rouge_equals_rouge_score(stemmer, seed):
    rng = random.Random(seed)
    scorer = rouge_scorer.RougeScorer(TYPES, use_stemmer=stemmer)
    preds = [random_summary(rng) for _ in range(40)]
    refs = [random_summary(rng) if rng.random() < 0.6 else preds[i].replace("cat", "dog") for i in range(40)]
    ours = rouge(preds, refs, types=TYPES, stemmer=stemmer, aggregate=None)
    expected = [scorer.score(r, p) for p, r in zip(preds, refs)]
    for o, e in zip(ours, expected):
        assert_rouge_equal(o, e)
    mean = rouge(preds, refs, types=TYPES, stemmer=stemmer)
    for t in TYPES:
        assert abs(mean[t].fmeasure - np.mean([e[t].fmeasure for e in expected], dtype=np.float64)) <= TOL
        assert abs(mean[t].precision - np.mean([e[t].precision for e in expected], dtype=np.float64)) <= TOL
        assert abs(mean[t].recall - np.mean([e[t].recall for e in expected], dtype=np.float64)) <= TOL


def test_rouge_multiple_references_equal_score_multi(seed):
    rng = random.Random(seed)
    for stemmer in (False, True):
        scorer = rouge_scorer.RougeScorer(TYPES, use_stemmer=stemmer)
        preds = [random_summary(rng) for _ in range(15)]
        refs = [[random_summary(rng) for _ in range(rng.randrange(1, 4))] for _ in range(15)]
        refs[0] = [preds[0], preds[0]]  # ties: the first reference wins
        ours = rouge(preds, refs, types=TYPES, stemmer=stemmer, aggregate=None)
        for o, p, r in zip(ours, preds, refs):
            assert_rouge_equal(o, scorer.score_multi(r, p))


def test_rouge_edge_cases_and_lsum_newline_split():
    cases = [
        ("", ""),
        ("", "the cat"),
        ("the cat", ""),
        ("!!! ,,,", "the cat"),
        ("the cat sat.\nthe dog ran.\n\nhappy cats", "the dog sat\nthe cat ran\ncats happy"),
        ("a a a a b\nb b a", "a b\na b a b a"),
        ("Running runs RAN runner", "run runs running ran"),
    ]
    for stemmer in (False, True):
        scorer = rouge_scorer.RougeScorer(TYPES, use_stemmer=stemmer)
        for ref, pred in cases:
            assert_rouge_equal(
                rouge([pred], [ref], types=TYPES, stemmer=stemmer, aggregate=None)[0], scorer.score(ref, pred)
            )
        only_lsum = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=stemmer)
        ref, pred = cases[4]
        assert_rouge_equal(rouge([pred], [ref], types=["rougeLsum"], stemmer=stemmer), only_lsum.score(ref, pred))
    assert rouge_tokenize("Running, RUNS! naïve 3x", stemmer=True) == ["run", "run", "na", "ve", "3x"]


def test_rouge_bad_input():
    with pytest.raises(ValueError, match="predictions has 2 items but references has 1"):
        rouge(["a", "b"], ["a"])
    with pytest.raises(TypeError, match=r"predictions\[0\] must be a str"):
        rouge([None], ["a"])
    with pytest.raises(TypeError, match=r"references\[0\]\[1\] must be a str"):
        rouge(["a"], [["a", 1]])
    with pytest.raises(ValueError, match="unknown ROUGE type"):
        rouge(["a"], ["a"], types=["rouge0"])
    with pytest.raises(ValueError, match="unknown ROUGE type"):
        rouge(["a"], ["a"], types=["bleu"])
    with pytest.raises(TypeError, match="predictions must be a sequence"):
        rouge("abc", ["a"])


# ---------------------------------------------------------------------------------- perplexity
class TinyLM(torch.nn.Module):
    """A causal LM with real context dependence: embeddings, a causal running mean, a linear head."""

    def __init__(self, vocab: int, dim: int, kind: str = "tensor"):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.mix = torch.nn.Linear(2 * dim, dim)
        self.head = torch.nn.Linear(dim, vocab)
        self.drop = torch.nn.Dropout(0.5)
        self.kind = kind

    def forward(self, input_ids):
        x = self.emb(input_ids)
        causal_mean = x.cumsum(1) / torch.arange(1, x.shape[1] + 1, device=x.device).view(1, -1, 1)
        logits = self.head(torch.tanh(self.drop(self.mix(torch.cat([x, causal_mean], -1)))))
        if self.kind == "tuple":
            return (logits, None)
        if self.kind == "object":
            @dataclass
            class Out:
                logits: torch.Tensor

            return Out(logits)
        return logits


def direct_ppl(model, ids, max_length, stride):
    """Independent float64 reference: token t is predicted from the window that first covers it,
    from that window's start."""
    model.eval()
    ids = ids if ids.dim() == 2 else ids[None]
    seq_len = ids.shape[1]
    nll, count = 0.0, 0
    with torch.no_grad():
        for t in range(1, seq_len):
            # windows start at 0, stride, 2*stride, ...; t belongs to the first whose end passes t
            begin = 0
            while begin + max_length <= t:
                begin += stride
            if begin >= t:
                continue  # first token of a window that does not overlap the previous one: unscored
            context = ids[:, begin:t]
            logits = model(context)
            logits = (
                logits
                if isinstance(logits, torch.Tensor)
                else (logits[0] if isinstance(logits, tuple) else logits.logits)
            )
            logp = torch.log_softmax(logits[:, -1].double(), -1)
            nll -= logp.gather(-1, ids[:, t : t + 1]).sum().item()
            count += ids.shape[0]
    return math.exp(nll / count)


@pytest.mark.parametrize("kind", ["tensor", "tuple", "object"])
@pytest.mark.parametrize(
    "shape,max_length,stride", [((37,), 64, None), ((37,), 37, 5), ((2, 53), 16, 7), ((29,), 8, 8), ((41,), 9, 1)]
)
def test_perplexity_equals_direct_float64_nll(kind, shape, max_length, stride, seed):
    model = TinyLM(vocab=23, dim=8, kind=kind).double()
    model.train()
    ids = torch.randint(0, 23, shape)
    ours = perplexity(model, ids, stride=stride, max_length=max_length)
    assert model.training  # mode restored
    expected = direct_ppl(model, ids, max_length, stride or max_length)
    assert abs(ours - expected) <= 1e-9 * expected, (ours, expected)
    if max_length >= shape[-1]:
        # one window: exp of the mean NLL over all next-token predictions, straight from logits
        model.eval()
        flat = ids if ids.dim() == 2 else ids[None]
        logits = model(flat) if kind == "tensor" else (model(flat)[0] if kind == "tuple" else model(flat).logits)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].double().reshape(-1, 23), flat[:, 1:].reshape(-1))
        assert abs(ours - math.exp(nll.item())) <= 1e-9 * ours


@pytest.mark.parametrize("max_length,stride", [(64, None), (16, 5), (9, 9)])
def test_perplexity_of_a_right_padded_batch_scores_only_its_tokens(max_length, stride, seed):
    """Texts of different lengths padded into one batch: the same perplexity as the texts'
    tokens pooled, each text scored alone by the float64 reference."""
    model = TinyLM(vocab=23, dim=8).double()
    lengths = [int(n) for n in torch.randint(2, 41, (4,))]
    lengths[0] = 41
    rows = [torch.randint(0, 23, (n,)) for n in lengths]
    pad = int(torch.randint(-100, 1000, ()))  # padding ids need not be valid tokens
    ids = torch.full((4, 41), pad)
    mask = torch.zeros(4, 41, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    ours = perplexity(model, ids, stride=stride, max_length=max_length, attention_mask=mask)
    nll, count = 0.0, 0
    for row in rows:
        n = sum(1 for t in range(1, len(row)) if not _unscored(t, max_length, stride or max_length))
        nll += math.log(direct_ppl(model, row, max_length, stride or max_length)) * n
        count += n
    assert abs(ours - math.exp(nll / count)) <= 1e-9 * ours
    with pytest.raises(ValueError, match="pad on the right"):
        perplexity(model, ids, max_length=max_length, attention_mask=mask.flip(1))
    with pytest.raises(ValueError, match="shape of token_ids"):
        perplexity(model, ids, max_length=max_length, attention_mask=mask[:, :-1])
    with pytest.raises(ValueError, match="0 \\(padding\\) and 1"):
        perplexity(model, ids, max_length=max_length, attention_mask=mask * 2)


def _unscored(t, max_length, stride):
    """direct_ppl's rule: token t is skipped when it starts a window that does not overlap the last."""
    begin = 0
    while begin + max_length <= t:
        begin += stride
    return begin >= t


def test_perplexity_of_a_hugging_face_model_matches_the_docs_recipe(seed):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 50, (1, 90))
    max_length, stride = 32, 12
    # The docs' recipe, counting the scored tokens exactly (the shifted labels that are not -100).
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, ids.shape[1], stride):
            end = min(begin + max_length, ids.shape[1])
            trg_len = end - prev_end
            input_ids = ids[:, begin:end]
            labels = input_ids.clone()
            labels[:, :-trg_len] = -100
            loss = model(input_ids, labels=labels).loss
            n = int((labels[:, 1:] != -100).sum())
            nll_sum += loss.item() * n
            n_tokens += n
            prev_end = end
            if end == ids.shape[1]:
                break
    expected = math.exp(nll_sum / n_tokens)
    ours = perplexity(model, ids, stride=stride, max_length=max_length)
    assert abs(ours - expected) <= 1e-5 * expected  # the HF loss is float32
    assert perplexity(model, ids[0].tolist(), stride=stride) == pytest.approx(ours, rel=1e-12)  # max_length from config


def test_perplexity_bad_input():
    model = TinyLM(vocab=11, dim=4)
    with pytest.raises(ValueError, match="T >= 2"):
        perplexity(model, torch.tensor([3]), max_length=8)
    with pytest.raises(TypeError, match="integers"):
        perplexity(model, torch.rand(5), max_length=8)
    with pytest.raises(ValueError, match="max_length is required"):
        perplexity(model, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, torch.tensor([1, 2, 3]), max_length=4, stride=5)
    with pytest.raises(ValueError, match="logits must have shape"):
        perplexity(lambda x: torch.zeros(x.shape[1], 11), torch.tensor([1, 2, 3]), max_length=4)
    with pytest.raises(ValueError, match="model's vocabulary"):
        perplexity(lambda x: torch.zeros(*x.shape, 5), torch.tensor([1, 2, 7]), max_length=4)
    with pytest.raises(TypeError, match="must return logits"):
        perplexity(lambda x: "nope", torch.tensor([1, 2, 3]), max_length=4)


@pytest.mark.parametrize("offset", [-40, 40])
def test_perplexity_refuses_ids_outside_the_embedding_before_the_forward(offset, seed):
    """An id the embedding has no row for is a ValueError naming token_ids, not the embedding's
    bare IndexError from the first window's forward; the model is left in its mode."""
    from qlora_fast.models.llama import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=32, num_layers=1,
                                         num_heads=2, num_kv_heads=1, max_seq_len=32))
    model.train()
    ids = torch.randint(0, 37, (2, 19))
    ids[1, random.randrange(8)] += offset  # in the first window: the old check came after its forward
    with pytest.raises(ValueError, match=r"token_ids must lie in \[0, 37\)"):
        perplexity(model, ids, max_length=8)
    assert model.training
