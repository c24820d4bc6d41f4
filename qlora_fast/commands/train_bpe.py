"""`qlora-fast train-bpe`: train a byte-level BPE tokenizer on text files and save it (our JSON,
optionally tiktoken-format ranks too)."""
import os
import sys

from qlora_fast.commands import HelpFormatter, positive_int


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-bpe",
        help="train a byte-level BPE tokenizer on UTF-8 text files and save it as JSON",
        description="Learn byte-level BPE merges by pair frequency (ties: lexicographically smallest pair) "
        "over the pre-tokenised files, then save the tokenizer (and optionally tiktoken-format ranks).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("files", nargs="+", help="UTF-8 text files to train on (each read whole)")
    p.add_argument(
        "--vocab-size", type=positive_int, default=4096, help="total vocabulary: 256 bytes + merges + special tokens"
    )
    p.add_argument("--pattern", default="cl100k", help="pre-tokenisation regex: 'gpt2', 'cl100k' or a regex")
    p.add_argument("--special", action="append", default=None, metavar="TOKEN",
                   help="a special token (repeatable; default <|pad|>, <|bos|>, <|eos|>; those three are always added)")
    p.add_argument("--out", required=True, help="where to write the tokenizer JSON (atomically)")
    p.add_argument("--tiktoken-out", default=None, help="also write the mergeable ranks in tiktoken's format here")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run)


def check_output_file(path: str, option: str) -> None:
    """Fail before training, not at the save after it: `path` must not be a directory and its
    directory must be one that can be created and written (`check_writable_dir`)."""
    from qlora_fast.utils import check_writable_dir

    if os.path.isdir(path):
        raise IsADirectoryError(f"{option} {path!r} is a directory: give the path of the file to write")
    check_writable_dir(os.path.dirname(os.path.abspath(path)), f"the directory of {option}")


def run(args) -> int:
    from qlora_fast.tokenizer import BPETokenizer
    from qlora_fast.tokenizer.bpe import DEFAULT_SPECIAL_TOKENS

    check_output_file(args.out, "--out")
    if args.tiktoken_out:
        check_output_file(args.tiktoken_out, "--tiktoken-out")
    specials = tuple(args.special) if args.special else DEFAULT_SPECIAL_TOKENS
    tok = BPETokenizer.train_from_files(
        args.files, args.vocab_size, pattern=args.pattern, special_tokens=specials, progress=not args.no_progress
    )
    tok.save(args.out)
    if args.tiktoken_out:
        tok.save_tiktoken(args.tiktoken_out)
    if tok.vocab_size < args.vocab_size:  # the corpus ran out of pairs to merge
        print(
            f"qlora-fast train-bpe: warning: the vocabulary has {tok.vocab_size} tokens, fewer than the "
            f"{args.vocab_size} asked for: the training text has no pair left to merge (give it more text)",
            file=sys.stderr,
        )
    print(f"trained {tok!r}: {len(tok.mergeable_ranks) - 256} merges, saved to {args.out}")
    return 0
