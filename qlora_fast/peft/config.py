"""Configs of the PEFT methods. Each validates itself on construction (ValueError/TypeError naming
the field) and round-trips through `to_dict()` / `config_from_dict()` (the adapter's JSON)."""
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence, Union

from qlora_fast.utils import renamed_fields

# LoraConfig fields renamed to PEFT's names (old -> new); the old ones work for one release.
_LORA_RENAMES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


@renamed_fields(**_LORA_RENAMES)
@dataclass
class LoraConfig:
    """LoRA (or QLoRA with `quantize_base="nf4"`) on the matching linear layers; PEFT's field names.

    target_modules: a list of module names, each matching a module whose full dotted name equals it
    or ends with "." + it (e.g. "q_proj"), or one string used as a regular expression that must
    match the full dotted name (re.fullmatch), e.g. r".*\\.(q|v)_proj", or "all-linear" (as PEFT:
    every linear / Conv1D layer but the output layer), as `qlora_fast.nn.match_target_modules`
    reads it. The default, None, means every linear layer but the output layer (`default_lora_targets`:
    their names when all are familiar projection names, q/k/v/o/gate/up/down_proj on Llama-style
    models, c_attn/c_proj/c_fc on GPT-2, qkv_proj/o_proj/gate_up_proj/down_proj on Phi-3, ..., else
    "all-linear"); the output layer is adapted only when a list names it
    (as PEFT does), never by a regex or "all-linear". A regex is saved to adapter_config.json as
    the list of the full names it matched, which PEFT reads as we do. r > 0; lora_alpha > 0;
    lora_dropout in [0, 1); use_rslora scales by lora_alpha / sqrt(r) instead of lora_alpha / r.
    quantize_base: None (full-precision base, LoRA) or "nf4"/"fp4": every linear layer except the
    output layer (lm_head; kept in full precision even when adapted) is stored in 4 bits, with
    double quantization unless double_quant=False (QLoRA).
    blocksize: 4-bit block size. `alpha` and `dropout`, the names before this release, still work
    (as arguments and attributes) with a DeprecationWarning.
    target_parameters (PEFT's): fused MoE experts weights to give per-expert adapters, e.g.
    ["experts.gate_up_proj", "experts.down_proj"] (Mixtral, Qwen3-MoE, OLMoE): a name matches a
    parameter whose full dotted name equals it or ends with "." + it, and must match one
    (`qlora_fast.nn.match_target_parameters`); only 3-D experts weights, dense or in 4 bits
    (`Experts4bit`, QLoRA). As in PEFT, target_modules=None (or []) then adapts no linear layer,
    and lora_dropout must be 0 (a ValueError otherwise: PEFT refuses it too).
    """

    target_modules: Union[Sequence[str], str, None] = None
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    quantize_base: Optional[str] = None
    blocksize: int = 64
    double_quant: bool = True
    target_parameters: Optional[Sequence[str]] = None
    peft_type: str = field(default="lora", init=False)

    def __post_init__(self):
        from qlora_fast.nn.replace import check_target_modules, check_target_parameters

        self.target_parameters = check_target_parameters(self.target_parameters)
        if self.target_parameters and isinstance(self.target_modules, (list, tuple, set)) and not self.target_modules:
            self.target_modules = []  # PEFT's way to say "parameters only"
        else:
            self.target_modules = check_target_modules(self.target_modules)
        _positive_int("r", self.r)
        alpha = self.lora_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < float("inf"):
            raise ValueError(f"lora_alpha must be a finite positive number, got {alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.target_parameters and self.lora_dropout:
            raise ValueError(f"lora_dropout must be 0 with target_parameters, got {self.lora_dropout!r} (as PEFT: "
                             "an expert's adapter cannot take dropout(x) apart from x)")
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
    """Rebuild a config from `to_dict()` output, or from an `adapter_config.json` in PEFT's format
    (ours, or written by PEFT's own `save_pretrained`: see `config_from_peft_dict`)."""
    if not isinstance(d, dict):
        raise TypeError(f"an adapter config must be a JSON object, got {type(d).__name__}")
    if d.get("peft_type") in PEFT_TYPES.values():
        return config_from_peft_dict(d)
    d = dict(d)
    kind = d.pop("peft_type", None)
    if kind not in CONFIG_TYPES:
        raise ValueError(f"peft_type must be one of {sorted(CONFIG_TYPES)}, got {kind!r}")
    if kind == "lora":  # a file written before the rename is data, not a caller to warn
        d = {_LORA_RENAMES.get(k, k): v for k, v in d.items()}
    return CONFIG_TYPES[kind](**d)


# ---------------------------------------------------------------------------- PEFT's format
PEFT_TYPES = {"lora": "LORA", "prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING"}
# PEFT LoRA settings we do not implement, with the value that means "off".
_PEFT_LORA_OFF = {
    "use_dora": False,
    "bias": "none",
    "lora_bias": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "modules_to_save": None,
    "layers_to_transform": None,
    "exclude_modules": None,
    "trainable_token_indices": None,
    "layer_replication": None,
    "use_qalora": False,
    "use_bdlora": None,
    "alora_invocation_tokens": None,
    "arrow_config": None,
}
# init_lora_weights values that leave the base weights as they were (the saved A and B are the whole
# change). PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA rewrite the base at init, so their adapters are
# only right on that rewritten base, which the file does not hold; MiCA freezes B, which we would train.
_PEFT_INIT_KEEPS_BASE = ("gaussian", "eva", "orthogonal")


def config_to_peft_dict(config, geometry=None, fan_in_fan_out=False, base_model_name_or_path=None) -> dict:
    """`adapter_config.json` in PEFT's format (PEFT's `from_pretrained` reads it). Our exact config
    (`to_dict()`) is stored beside it in the weights' metadata, where PEFT does not look.

    geometry: (num_layers, kv_heads, head_dim, hidden, attention_heads) for prefix/prompt tuning.
    fan_in_fan_out: the LoRA targets are GPT-2 style Conv1D layers (weight stored (in, out))."""
    d = {"peft_type": PEFT_TYPES[config.peft_type], "task_type": "CAUSAL_LM", "inference_mode": True,
         "base_model_name_or_path": base_model_name_or_path, "revision": None, "modules_to_save": None}
    if isinstance(config, LoraConfig):
        targets = config.target_modules
        d.update(
            r=config.r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            target_modules=targets if isinstance(targets, str) else sorted(targets),
            fan_in_fan_out=bool(fan_in_fan_out),
            init_lora_weights=True,
            target_parameters=config.target_parameters,
            **{k: v for k, v in _PEFT_LORA_OFF.items() if k != "modules_to_save"},
        )
    else:
        layers, kv_heads, head_dim, hidden, heads = geometry
        d.update(num_virtual_tokens=config.num_virtual_tokens, num_layers=layers, num_transformer_submodules=1)
        if isinstance(config, PrefixTuningConfig):
            d.update(
                token_dim=kv_heads * head_dim,
                num_attention_heads=kv_heads,
                prefix_projection=config.prefix_projection,
                encoder_hidden_size=config.encoder_hidden_size,
                init_weights=None,
            )
        else:
            # "TEXT" would make PEFT load a tokenizer by name; the weights hold the prompt anyway.
            d.update(
                token_dim=hidden,
                num_attention_heads=heads,
                prompt_tuning_init="RANDOM",
                prompt_tuning_init_text=None,
                tokenizer_name_or_path=None,
                tokenizer_kwargs=None,
            )
    return d


def config_from_peft_dict(d: dict):
    """Our config for an adapter_config.json written by PEFT (LoRA, prefix or prompt tuning of a
    causal LM). A setting PEFT has and we do not (DoRA, biases, per-layer ranks, ...) is a
    ValueError naming it, never silently dropped."""
    kind = d.get("peft_type")
    if d.get("task_type") not in (None, "CAUSAL_LM"):
        raise ValueError(f"adapter task_type must be 'CAUSAL_LM', got {d.get('task_type')!r}")
    if d.get("modules_to_save"):
        raise ValueError(
            f"adapter has modules_to_save={d['modules_to_save']!r} (full copies of base layers), which is not supported"
        )
    if kind == "LORA":
        for key, off in _PEFT_LORA_OFF.items():
            if d.get(key, off) not in (off, None):
                raise ValueError(f"PEFT LoRA setting {key}={d[key]!r} is not supported (only {off!r})")
        init = d.get("init_lora_weights", True)
        if not (init is None or isinstance(init, bool) or init in _PEFT_INIT_KEEPS_BASE):
            raise ValueError(
                f"PEFT LoRA setting init_lora_weights={init!r} is not supported: it changes the base weights, "
                "which the adapter does not hold (PiSSA/OLoRA/CorDA: PEFT's save_pretrained("
                "path_initial_model_for_weight_conversion=...) writes a plain LoRA adapter)"
            )
        return LoraConfig(target_modules=d.get("target_modules"), r=d.get("r", 8), lora_alpha=d.get("lora_alpha", 8),
                          lora_dropout=d.get("lora_dropout", 0.0), use_rslora=bool(d.get("use_rslora", False)),
                          target_parameters=d.get("target_parameters") or None)
    n = d.get("num_virtual_tokens")
    if d.get("num_transformer_submodules", 1) not in (1, None):
        raise ValueError(
            "adapter num_transformer_submodules must be 1 (a decoder-only model), got "
            f"{d['num_transformer_submodules']!r}"
        )
    if kind == "PREFIX_TUNING":
        # PEFT saves a projected prefix as its output (the MLP is not saved), so it loads as a plain one.
        return PrefixTuningConfig(num_virtual_tokens=n)
    if kind == "PROMPT_TUNING":
        return PromptTuningConfig(num_virtual_tokens=n)
    raise ValueError(f"adapter peft_type must be one of {sorted(PEFT_TYPES.values())}, got {kind!r}")
