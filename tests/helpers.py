"""Helpers shared by several test modules (fixtures live in conftest.py)."""


def corpus_hf_tokenizer(vocab_size: int = 300):
    """A byte-level BPE `transformers.PreTrainedTokenizerFast` trained on the shipped corpus, with
    an `<eos>` special: the tokenizer of the tiny Hugging Face models the tests save to disk."""
    import tokenizers
    import transformers

    from qlora_fast.data import load_corpus

    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator([load_corpus()], tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>"], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")


def dead_pid() -> int:
    """The pid of a process that has exited (for temporaries left by a killed writer)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
