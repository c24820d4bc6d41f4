"""CLI commands, one module each (see qlora_fast/cli.py)."""
import argparse
import math
import os
import re
import shutil
import sys
import warnings

from qlora_fast.optim.registry import OPTIMIZERS  # noqa: F401 (torch-free: registering commands loads no torch)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" once: not when the help already says its default, nor for flags and
    options without one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return super()._get_help_string(action)


def _number(kind, minimum=None, exclusive=False, maximum=None):
    """An argparse `type` parsing `kind` (int or float) that must be finite and within bounds, so a
    bad value ends as one usage error naming the option."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an int' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if minimum is not None and (value <= minimum if exclusive else value < minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if exclusive else '>='} {minimum}, got {text!r}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


positive_int = _number(int, 1)
nonnegative_int = _number(int, 0)
finite_float = _number(float)
positive_float = _number(float, 0, exclusive=True)
nonnegative_float = _number(float, 0)
probability = _number(float, 0, exclusive=True, maximum=1)


class DeprecatedAliases(argparse.Action):
    """Stores an option's value like the default action; every spelling after the first is a
    deprecated alias kept for one release: using one still works, prints a one-line warning for the
    person at the terminal and raises a DeprecationWarning for programs. The first spelling is the
    trainers' field name (`--max-steps` for max_steps)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string != self.option_strings[0]:
            message = (f"{option_string} is deprecated: use {self.option_strings[0]} (the old spelling goes in the "
                       "next release)")
            print(f"{parser.prog}: warning: {message}", file=sys.stderr)
            warnings.warn(f"qlora-fast: {message}", DeprecationWarning, stacklevel=2)
        setattr(namespace, self.dest, values)


def add_training_arguments(parser) -> None:
    """Options every training command shares: device, optimizer, gradient checkpointing,
    checkpoint frequency, seed and progress bars."""
    parser.add_argument(
        "--device", default="auto", help="'auto' (cuda when present, else cpu), 'cpu', 'cuda', 'cuda:1', ..."
    )
    parser.add_argument("--optimizer", default="paged_adamw_8bit", choices=OPTIMIZERS, help="optimizer")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument(
        "--checkpoint-every",
        type=nonnegative_int,
        default=0,
        help="write a resumable checkpoint every N steps (0: never)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_resume_arguments(parser, what: str, subdir: str = "") -> None:
    """`--resume` (the newest checkpoint in `what`; an error when there is none),
    `--resume-if-exists` (the same, but start fresh when there is none) and `--overwrite-output`
    (start fresh, deleting the checkpoints `what` holds). `subdir`: where the checkpoints live
    under --output (`checkpoint_dir`)."""
    parser.add_argument(
        "--resume",
        action="store_true",
        help=f"resume from the newest checkpoint in {what} (an error when there is none, or when another run wrote it)",
    )
    parser.add_argument("--resume-if-exists", action="store_true",
                        help=f"like --resume, but start from step 0 when {what} holds no checkpoint")
    parser.add_argument("--overwrite-output", action="store_true",
                        help=f"start fresh even though {what} holds checkpoints of an earlier run: they are deleted "
                             "before training (without it such a start is refused)")
    parser.set_defaults(checkpoint_subdir=subdir)


# checkpoint-<step>.pt files (the trainers) and checkpoint-<step> folders (sharded, FSDP2)
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)(\.pt)?$")


def checkpoint_dir(args) -> str:
    """Where this command's checkpoints live: --output, or the folder under it that the command's
    `add_resume_arguments(subdir=...)` named."""
    return os.path.join(args.output, args.checkpoint_subdir) if args.checkpoint_subdir else args.output


def existing_checkpoints(directory: str) -> list:
    """The checkpoints in `directory` (checkpoint-<step>.pt files and checkpoint-<step> folders),
    as (step, path), oldest first; torch-free."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = _CHECKPOINT_NAME.match(name)
        path = os.path.join(directory, name)
        if m and (os.path.isfile(path) if m.group(2) else os.path.isdir(path)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def check_fresh_start(args) -> None:
    """A fresh start (no --resume / --resume-if-exists) into a directory that holds checkpoints
    is refused (they belong to an earlier run: a fresh run would overwrite only the steps it
    reaches, and a later --resume would pick the other run's newest) unless --overwrite-output;
    --overwrite-output with a resume flag is a contradiction. ValueError, before any work."""
    directory = checkpoint_dir(args)
    resuming = args.resume or args.resume_if_exists
    if args.overwrite_output and resuming:
        raise ValueError("--overwrite-output starts a fresh run and deletes the checkpoints in "
                         f"{directory}: drop it to resume, or drop --resume/--resume-if-exists")
    found = existing_checkpoints(directory)
    if found and not resuming and not args.overwrite_output:
        raise ValueError(f"{directory} already holds {len(found)} checkpoint(s) of an earlier run (newest "
                         f"{os.path.basename(found[-1][1])}): continue it with --resume, start fresh with "
                         "--overwrite-output (deletes them), or use another --output")


def note_resume_at_end(args, max_steps: int) -> None:
    """With --resume / --resume-if-exists: say so when the newest checkpoint is already at or past
    --max-steps (the trainer then runs no step), rather than finishing silently."""
    if not (args.resume or args.resume_if_exists):
        return
    found = existing_checkpoints(checkpoint_dir(args))
    if found and found[-1][0] >= max_steps:
        print(f"note: resuming {found[-1][1]}, at step {found[-1][0]}: at or past --max-steps {max_steps}, so no "
              "training step runs (raise --max-steps to train further)")


def remove_checkpoints(args) -> None:
    """With --overwrite-output, delete the checkpoints in this command's checkpoint directory
    (call it holding the output lock, before training)."""
    if not args.overwrite_output:
        return
    for _, path in existing_checkpoints(checkpoint_dir(args)):
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def resume_mode(args, directory: str):
    """(resume_from, allow_fresh) for the trainers from --resume / --resume-if-exists; with
    --resume and no checkpoint in `directory`, FileNotFoundError now, before any work."""
    if not (args.resume or args.resume_if_exists):
        return None, False
    from qlora_fast.train.checkpoint import resolve_resume

    resolve_resume("latest", directory, allow_fresh=bool(args.resume_if_exists))
    return "latest", bool(args.resume_if_exists)


def resolve_device(name: str):
    """The torch.device for `--device`: "auto" is cuda when present, else cpu; a bad name or cuda
    without a CUDA device raises ValueError naming --device."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from e
    if device.type not in ("cpu", "cuda"):  # torch knows mps, xpu, meta...: the trainers do not
        raise ValueError(f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is available")
    return device


def check_output(path: str):
    """A context holding `path` as this run's output directory: writable (checked now, before any
    work) and locked against a second run writing the same files (see `qlora_fast.utils.output_lock`)."""
    from qlora_fast.utils import output_lock

    return output_lock(path, "--output")


def add_base_model_arguments(parser) -> None:
    """`--cache-dir` and `--tokenizer` of the built-in base model, shared by the commands that load
    it (an adapter trained on one base only loads onto the same one)."""
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="where the built-in base model is cached (default $QLORA_FAST_CACHE or ~/.cache/qlora_fast)",
    )
    parser.add_argument("--tokenizer", choices=("bpe", "byte"), default="bpe",
                        help="tokenizer of the built-in base model: the BPE trained on the shipped corpus, or bytes "
                             "(each has its own cached base)")
