"""Pre-tokenisation patterns: the regexes that cut text into pieces before byte-pair merging
(pieces never merge across them), by name or as a regex."""
from typing import Callable, List

import regex

# GPT-2's pattern as tiktoken writes it (equivalent to the original, faster with possessives).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# cl100k_base's pattern: case-insensitive contractions, digits in groups of at most three.
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "cl100k": CL100K_PATTERN}


def resolve_pattern(pattern: str) -> str:
    """The regex of `pattern`: a name in `PATTERNS` or a regex itself (TypeError if not a str)."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str (a regex or one of {sorted(PATTERNS)}), got {type(pattern).__name__}")
    return PATTERNS.get(pattern, pattern)


def compile_pattern(pattern: str) -> "regex.Pattern":
    """`pattern` (a name in `PATTERNS` or a regex) compiled; ValueError naming the argument when it
    is not a valid regular expression (`regex.error` is not a ValueError), TypeError if not a str."""
    pattern = resolve_pattern(pattern)
    try:
        return regex.compile(pattern)
    except regex.error as e:
        raise ValueError(f"pattern is not a valid regular expression: {pattern!r} ({e})") from e


def piece_splitter(pat: "regex.Pattern") -> Callable[[str], List[str]]:
    """The function cutting a text into its pieces: the whole text of each match of `pat`, as
    tiktoken takes them. `findall` gives that only for a pattern without capturing groups (with
    groups it returns the groups' text, silently dropping the rest), so it is kept for those
    (the built-in patterns: the fast path) and a pattern with groups goes through `finditer`."""
    if pat.groups == 0:
        return pat.findall
    return lambda text: [m.group() for m in pat.finditer(text)]
