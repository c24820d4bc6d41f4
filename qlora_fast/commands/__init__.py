"""CLI commands, one module each (see qlora_fast/cli.py)."""


# The trainers' optimizer names (`qlora_fast.train.sft.OPTIMIZERS`; spelled out here so that
# registering the commands does not import torch; a test keeps the two equal).
OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw", "adamw_8bit", "adamw", "torch_adamw")


def add_training_arguments(parser) -> None:
    """Options every training command shares: device, optimizer, gradient checkpointing,
    checkpoint frequency, seed and progress bars."""
    parser.add_argument("--device", default="auto", help="'auto' (cuda when present, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--optimizer", default="paged_adamw_8bit", choices=OPTIMIZERS, help="optimizer")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="write a resumable checkpoint every N steps (0: never)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def resolve_device(name: str):
    """The torch.device for `--device`: "auto" is cuda when present, else cpu; asking for cuda
    without one exits with a clear message."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but no CUDA device is available")
    return device


def add_base_model_arguments(parser) -> None:
    """`--cache-dir` and `--tokenizer` of the built-in base model, shared by the commands that load
    it (an adapter trained on one base only loads onto the same one)."""
    parser.add_argument("--cache-dir", default=None,
                        help="where the built-in base model is cached (default $QLORA_FAST_CACHE or ~/.cache/qlora_fast)")
    parser.add_argument("--tokenizer", choices=("bpe", "byte"), default="bpe",
                        help="tokenizer of the built-in base model: the BPE trained on the shipped corpus, or bytes "
                             "(each has its own cached base)")
