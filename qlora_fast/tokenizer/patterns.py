"""Pre-tokenisation patterns: the regexes that cut text into pieces before byte-pair merging
(pieces never merge across them), by name or as a regex."""
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
