"""The Porter stemmer with NLTK's extensions: the stemmer rouge-score uses (`nltk.stem.porter.
PorterStemmer()` in its default NLTK_EXTENSIONS mode), written here from the published rules so
ROUGE with stemming needs no nltk. Differences from Porter (1980) that NLTK adds and that are kept:
a table of irregular forms, words of at most two letters left alone, 'ies'/'ied' of four-letter
words -> 'ie', 'ied' -> 'i', y -> i only after a consonant that is not the whole stem, 'bli' ->
'ble', 'alli' handled recursively, 'fulli' -> 'ful', 'logi' -> 'log', and a two-letter
vowel-consonant stem counting as *o.

Suffix rules are applied as lists: the first rule whose suffix matches decides; if its condition
fails the word is left unchanged (later rules are not tried).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

_VOWELS = frozenset("aeiou")
_IRREGULAR = {
    "sky": ["sky", "skies"],
    "die": ["dying"],
    "lie": ["lying"],
    "tie": ["tying"],
    "news": ["news"],
    "inning": ["innings", "inning"],
    "outing": ["outings", "outing"],
    "canning": ["cannings", "canning"],
    "howe": ["howe"],
    "proceed": ["proceed"],
    "exceed": ["exceed"],
    "succeed": ["succeed"],
}
_IRREGULAR_FORMS = {form: stem for stem, forms in _IRREGULAR.items() for form in forms}

Rule = Tuple[str, str, Optional[Callable[[str], bool]]]


def _consonant_flags(word: str) -> List[bool]:
    # 'y' is a consonant at the start or after a vowel, a vowel after a consonant.
    flags: List[bool] = []
    for i, ch in enumerate(word):
        if ch in _VOWELS:
            flags.append(False)
        elif ch == "y":
            flags.append(i == 0 or not flags[i - 1])
        else:
            flags.append(True)
    return flags


def _measure(stem: str) -> int:
    """m in [C](VC){m}[V]: the number of vowel-to-consonant transitions."""
    flags = _consonant_flags(stem)
    return sum(1 for prev, cur in zip(flags, flags[1:]) if not prev and cur)


def _contains_vowel(stem: str) -> bool:
    return not all(_consonant_flags(stem))


def _ends_double_consonant(word: str) -> bool:
    return len(word) >= 2 and word[-1] == word[-2] and _consonant_flags(word)[-1]


def _ends_cvc(word: str) -> bool:
    """*o: ends consonant-vowel-consonant, the last not w, x or y (or is a two-letter vc word)."""
    flags = _consonant_flags(word)
    if len(word) >= 3 and flags[-3] and not flags[-2] and flags[-1] and word[-1] not in "wxy":
        return True
    return len(word) == 2 and not flags[0] and flags[1]


def _positive_measure(stem: str) -> bool:
    return _measure(stem) > 0


def _measure_gt_1(stem: str) -> bool:
    return _measure(stem) > 1


def _apply_rules(word: str, rules: Sequence[Rule]) -> str:
    for suffix, replacement, condition in rules:
        if suffix == "*d":  # a double consonant at the end
            if _ends_double_consonant(word):
                stem = word[:-2]
                return stem + replacement if condition is None or condition(stem) else word
            continue
        if word.endswith(suffix):
            stem = word[: len(word) - len(suffix)]
            return stem + replacement if condition is None or condition(stem) else word
    return word


def _step1a(word: str) -> str:
    if word.endswith("ies") and len(word) == 4:
        return word[:-3] + "ie"
    return _apply_rules(word, [("sses", "ss", None), ("ies", "i", None), ("ss", "ss", None), ("s", "", None)])


def _step1b(word: str) -> str:
    if word.endswith("ied"):
        return word[:-3] + ("ie" if len(word) == 4 else "i")
    if word.endswith("eed"):
        stem = word[:-3]
        return stem + "ee" if _measure(stem) > 0 else word
    for suffix in ("ed", "ing"):
        if word.endswith(suffix) and _contains_vowel(word[: -len(suffix)]):
            stem = word[: -len(suffix)]
            break
    else:
        return word
    return _apply_rules(
        stem,
        [
            ("at", "ate", None),
            ("bl", "ble", None),
            ("iz", "ize", None),
            ("*d", stem[-1], lambda _: stem[-1] not in "lsz"),
            ("", "e", lambda s: _measure(s) == 1 and _ends_cvc(s)),
        ],
    )


def _step1c(word: str) -> str:
    return _apply_rules(word, [("y", "i", lambda s: len(s) > 1 and _consonant_flags(s)[-1])])


_STEP2_RULES: List[Rule] = [
    ("ational", "ate", _positive_measure),
    ("tional", "tion", _positive_measure),
    ("enci", "ence", _positive_measure),
    ("anci", "ance", _positive_measure),
    ("izer", "ize", _positive_measure),
    ("bli", "ble", _positive_measure),
    ("alli", "al", _positive_measure),
    ("entli", "ent", _positive_measure),
    ("eli", "e", _positive_measure),
    ("ousli", "ous", _positive_measure),
    ("ization", "ize", _positive_measure),
    ("ation", "ate", _positive_measure),
    ("ator", "ate", _positive_measure),
    ("alism", "al", _positive_measure),
    ("iveness", "ive", _positive_measure),
    ("fulness", "ful", _positive_measure),
    ("ousness", "ous", _positive_measure),
    ("aliti", "al", _positive_measure),
    ("iviti", "ive", _positive_measure),
    ("biliti", "ble", _positive_measure),
    ("fulli", "ful", _positive_measure),
    # 'logi' -> 'log' when the word without 'ogi' has positive measure ('l' counts in the stem).
    ("logi", "log", lambda stem: _positive_measure(stem + "l")),
]


def _step2(word: str) -> str:
    if word.endswith("alli") and _positive_measure(word[:-4]):
        return _step2(word[:-4] + "al")
    return _apply_rules(word, _STEP2_RULES)


_STEP3_RULES: List[Rule] = [
    ("icate", "ic", _positive_measure),
    ("ative", "", _positive_measure),
    ("alize", "al", _positive_measure),
    ("iciti", "ic", _positive_measure),
    ("ical", "ic", _positive_measure),
    ("ful", "", _positive_measure),
    ("ness", "", _positive_measure),
]

_STEP4_RULES: List[Rule] = [
    (suffix, "", _measure_gt_1)
    for suffix in ("al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent")
] + [("ion", "", lambda s: _measure(s) > 1 and s[-1] in "st")] + [
    (suffix, "", _measure_gt_1) for suffix in ("ou", "ism", "ate", "iti", "ous", "ive", "ize")
]


def _step5a(word: str) -> str:
    if word.endswith("e"):
        stem = word[:-1]
        m = _measure(stem)
        if m > 1 or (m == 1 and not _ends_cvc(stem)):
            return stem
    return word


def _step5b(word: str) -> str:
    if word.endswith("ll") and _measure(word[:-1]) > 1:
        return word[:-1]
    return word


class PorterStemmer:
    """`stem(word)`: the same output as `nltk.stem.porter.PorterStemmer().stem(word)`."""

    def stem(self, word: str, to_lowercase: bool = True) -> str:
        if not isinstance(word, str):
            raise TypeError(f"word must be a str, got {type(word).__name__}")
        stem = word.lower() if to_lowercase else word
        if stem in _IRREGULAR_FORMS:
            return _IRREGULAR_FORMS[stem]
        if len(word) <= 2:
            return stem
        for step in (_step1a, _step1b, _step1c, _step2):
            stem = step(stem)
        stem = _apply_rules(stem, _STEP3_RULES)
        stem = _apply_rules(stem, _STEP4_RULES)
        return _step5b(_step5a(stem))
