"""CLI commands, one module each (see qlora_fast/cli.py)."""


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
