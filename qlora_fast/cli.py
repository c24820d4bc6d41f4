"""The `qlora-fast` command line. Each command lives in `qlora_fast/commands/<name>.py` and
provides `register(subparsers)`, which adds its parser (with help for every option) and sets
`func` to the function that runs it."""
import argparse
import importlib
import sys

# Command modules, in the order `--help` lists them.
COMMANDS = [
    "qlora_fast.commands.quantize_report",
    "qlora_fast.commands.finetune",
    "qlora_fast.commands.grpo",
    "qlora_fast.commands.tot",
    "qlora_fast.commands.train_bpe",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora-fast",
        description="Fine-tune large language models on small hardware: NF4 quantization, "
        "fused LoRA/QLoRA, paged optimizers, SFT and GRPO trainers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
