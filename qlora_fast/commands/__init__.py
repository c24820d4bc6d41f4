"""CLI commands, one module each (see qlora_fast/cli.py)."""


def add_tokenizer_argument(parser) -> None:
    """`--tokenizer` of the built-in base model, shared by the commands that load it (an adapter
    trained on one base only loads onto the same one)."""
    parser.add_argument("--tokenizer", choices=("bpe", "byte"), default="bpe",
                        help="tokenizer of the built-in base model: the BPE trained on the shipped corpus, or bytes "
                             "(each has its own cached base; ignored with a Hugging Face --model)")
