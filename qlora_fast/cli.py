"""The `qlora-fast` command line. Each command lives in `qlora_fast/commands/<name>.py` and
provides `register(subparsers)`, which adds its parser (with help for every option) and sets
`func` to the function that runs it.

User-facing errors (a bad value, a missing or unwritable path, a run that would diverge) print
as one line, `qlora-fast <command>: error: ...`, with exit status 2; Ctrl-C prints one line
(how to resume, and from which checkpoint) with exit status 130; `--debug` (or
QLORA_FAST_DEBUG=1) shows the traceback instead."""
import argparse
import importlib
import os
import sys

# Command modules, in the order `--help` lists them.
COMMANDS = [
    "qlora_fast.commands.quantize_report",
    "qlora_fast.commands.finetune",
    "qlora_fast.commands.grpo",
    "qlora_fast.commands.tot",
    "qlora_fast.commands.train_bpe",
]

# What a user's input can cause (bad values, paths, files, NaN training); anything else is a bug
# and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, OSError, FloatingPointError, ImportError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora-fast",
        description="Fine-tune large language models on small hardware: NF4 quantization, "
        "fused LoRA/QLoRA, paged optimizers, SFT and GRPO trainers.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error (also QLORA_FAST_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("QLORA_FAST_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"qlora-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"qlora-fast {args.command}: {_interrupted(args)}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it


def _interrupted(args) -> str:
    """The line for Ctrl-C: how to resume, naming the newest checkpoint when the command writes them."""
    if getattr(args, "checkpoint_subdir", None) is None:  # a command without checkpoints
        return "interrupted"
    from qlora_fast.commands import checkpoint_dir, existing_checkpoints

    directory = checkpoint_dir(args)
    found = existing_checkpoints(directory)
    if not found:
        return (f"interrupted; no checkpoint in {directory} to resume from (--checkpoint-every N writes them; "
                "a rerun starts from step 0)")
    return f"interrupted; resume with --resume (newest checkpoint: {found[-1][1]})"


if __name__ == "__main__":
    sys.exit(main())
