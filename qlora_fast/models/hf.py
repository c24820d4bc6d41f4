"""Loading a local Hugging Face causal LM directory (no downloads) with its tokenizer behind the
qlora_fast `Tokenizer` interface."""
import os
from typing import List, Sequence


class HFTokenizer:
    """A transformers tokenizer seen through qlora_fast's Tokenizer interface. A tokenizer without
    a pad token pads with its eos token; one without bos starts prompts with eos."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.vocab_size = len(hf_tokenizer)
        eos = hf_tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos token; instruction tuning needs one to end answers")
        self.eos_id = int(eos)
        self.bos_id = int(hf_tokenizer.bos_token_id if hf_tokenizer.bos_token_id is not None else eos)
        self.pad_id = int(hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else eos)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> List[int]:
        ids = self.hf.encode(text, add_special_tokens=False)
        return ([self.bos_id] if add_bos else []) + list(ids) + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def encode_batch(self, texts, add_bos: bool = False, add_eos: bool = False) -> List[List[int]]:
        return [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]


def load_hf_model(directory: str, device=None, dtype=None):
    """(model, tokenizer) from a local transformers model directory (config + weights +
    tokenizer files). Raises FileNotFoundError when `directory` is not a model directory."""
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FileNotFoundError(f"{directory} is not a Hugging Face model directory (no config.json)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=dtype or "auto")
    tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(directory, local_files_only=True))
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer
