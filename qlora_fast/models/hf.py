"""Loading a local Hugging Face causal LM directory (no downloads) with its tokenizer behind the
qlora_fast `Tokenizer` interface."""
import json
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
    tokenizer files). A bitsandbytes 4-bit checkpoint (`quantization_config` with `load_in_4bit`
    in config.json, as saved by transformers) loads with its layers as our `Linear4bit`, the same
    bytes (no requantization); `dtype` then applies to the layers kept in full precision.
    Raises FileNotFoundError when `directory` is not a model directory, ValueError for a checkpoint
    quantized in another format (8-bit, GPTQ, AWQ, ...)."""
    config_file = os.path.join(directory, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{directory} is not a Hugging Face model directory (no config.json)")
    try:
        with open(config_file) as f:
            quantization = json.load(f).get("quantization_config")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{config_file} is not a valid JSON config ({e})") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(local_files_only=True, dtype=dtype or "auto")
    if quantization:
        method = quantization.get("quant_method")
        if method != "bitsandbytes" or not quantization.get("load_in_4bit"):
            raise ValueError(f"{directory} holds a model already quantized ({method}, "
                             f"{'8-bit' if quantization.get('load_in_8bit') else quantization.get('bits', '?')}); only full-precision and "
                             "bitsandbytes 4-bit (nf4/fp4) checkpoints can be loaded")
        kwargs["device_map"] = "cpu"  # bitsandbytes' loader places the packed bytes
    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    if quantization:
        from qlora_fast.nn.replace import adopt_bnb_4bit

        adopt_bnb_4bit(model)
    tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(directory, local_files_only=True))
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer
