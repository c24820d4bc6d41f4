"""Configs of the PEFT methods. Each validates itself on construction (ValueError/TypeError naming
the field) and round-trips through `to_dict()` / `config_from_dict()` (the adapter's JSON)."""
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence, Union

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


@dataclass
class LoraConfig:
    """LoRA (or QLoRA with `quantize_base="nf4"`) on the matching linear layers.

    target_modules: a list of module names, each matching a module whose full dotted name equals it
    or ends with "." + it (e.g. "q_proj"), or one string used as a regular expression that must
    match the full dotted name (re.fullmatch), e.g. r".*\\.(q|v)_proj". r > 0; alpha > 0;
    dropout in [0, 1); use_rslora scales by alpha / sqrt(r) instead of alpha / r.
    quantize_base: None (full-precision base, LoRA) or "nf4"/"fp4": every linear layer except the
    lm_head is stored in 4 bits with double quantization (QLoRA). blocksize: 4-bit block size.
    """

    target_modules: Union[Sequence[str], str] = DEFAULT_LORA_TARGETS
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    quantize_base: Optional[str] = None
    blocksize: int = 64
    double_quant: bool = True
    peft_type: str = field(default="lora", init=False)

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            import re

            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ValueError(f"target_modules is not a valid regular expression: {e}") from None
        else:
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(f"target_modules must be a regex string or a non-empty list of names, got {self.target_modules!r}")
        _positive_int("r", self.r)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.quantize_base not in (None, "nf4", "fp4"):
            raise ValueError(f"quantize_base must be None, 'nf4' or 'fp4', got {self.quantize_base!r}")
        _positive_int("blocksize", self.blocksize)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PrefixTuningConfig:
    """Learnable key/value prefixes of `num_virtual_tokens` positions at every attention layer.

    With `prefix_projection` the prefixes come from an embedding of size `encoder_hidden_size`
    through a two-layer tanh MLP (Li & Liang's reparameterisation); without it they are
    parameters themselves.
    """

    num_virtual_tokens: int = 8
    prefix_projection: bool = False
    encoder_hidden_size: int = 64
    peft_type: str = field(default="prefix", init=False)

    def __post_init__(self):
        _positive_int("num_virtual_tokens", self.num_virtual_tokens)
        _positive_int("encoder_hidden_size", self.encoder_hidden_size)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PromptTuningConfig:
    """A learnable soft prompt of `num_virtual_tokens` embeddings prepended to the input.

    init: "random" (normal with the embedding table's std) or "text": the embeddings of
    `init_text` tokenized by the tokenizer passed to `get_peft_model` (repeated or cut to length).
    """

    num_virtual_tokens: int = 8
    init: str = "random"
    init_text: Optional[str] = None
    peft_type: str = field(default="prompt", init=False)

    def __post_init__(self):
        _positive_int("num_virtual_tokens", self.num_virtual_tokens)
        if self.init not in ("random", "text"):
            raise ValueError(f"init must be 'random' or 'text', got {self.init!r}")
        if self.init == "text" and not (isinstance(self.init_text, str) and self.init_text):
            raise ValueError("init='text' needs a non-empty init_text")

    def to_dict(self) -> dict:
        return asdict(self)


CONFIG_TYPES = {"lora": LoraConfig, "prefix": PrefixTuningConfig, "prompt": PromptTuningConfig}


def config_from_dict(d: dict):
    """Rebuild a config from `to_dict()` output."""
    d = dict(d)
    kind = d.pop("peft_type", None)
    if kind not in CONFIG_TYPES:
        raise ValueError(f"peft_type must be one of {sorted(CONFIG_TYPES)}, got {kind!r}")
    return CONFIG_TYPES[kind](**d)
