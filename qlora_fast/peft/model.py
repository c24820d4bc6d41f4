"""`get_peft_model` and `PeftModel`: LoRA/QLoRA, prefix tuning and prompt tuning on the built-in
`LlamaForCausalLM` and on transformers causal LMs (Llama, GPT-2, ...).

- LoRA swaps the targeted linear layers for `LoRALinear` (or `QLoRALinear` on a 4-bit base) in
  place; the forward pass is the base model's.
- Prefix tuning hands every attention layer `num_virtual_tokens` learned keys and values through
  the model's own KV cache (`past_key_values`: a tuple of pairs for the built-in model, a
  `DynamicCache` for transformers), with the attention mask extended to cover them.
- Prompt tuning prepends learned embeddings through `inputs_embeds`; its logits are returned
  for the real tokens only, so they line up with `input_ids` and `labels`.

Positions: the virtual tokens of both methods take positions 0..n-1 and the real tokens follow
them (as if n tokens came first), so a prefix equal to the KV cache of n real tokens, or a soft
prompt equal to their embeddings, gives exactly the base model's output on those tokens followed
by the input. `generate()` works on every kind.
"""
import contextlib
import dataclasses
import hashlib
import json
import warnings
import weakref
from typing import Optional

import torch
from torch import nn

from qlora_fast.models.generate import call_causal_lm
from qlora_fast.models.llama import CausalLMOutput, LlamaForCausalLM, causal_lm_loss, positions_from_mask
from qlora_fast.utils import check_finite_state

from .config import LoraConfig, PrefixTuningConfig, PromptTuningConfig, config_to_peft_dict
from .io import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CONFIG_HASH,
    OUR_CONFIG,
    check_state,
    from_peft_names,
    read_adapter,
    to_peft_names,
    write_adapter_dir,
)


# ---------------------------------------------------------------------------- model geometry
def attention_geometry(model: nn.Module):
    """(num_layers, num_kv_heads, head_dim, hidden_size) of a supported model, or ValueError."""
    if isinstance(model, LlamaForCausalLM):
        c = model.config
        return c.num_layers, c.num_kv_heads, c.head_dim, c.hidden_size
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    if not (isinstance(layers, int) and isinstance(heads, int) and isinstance(hidden, int)) or not hasattr(
        model, "get_input_embeddings"
    ):
        raise ValueError(
            f"{type(model).__name__} has no attention this adapter understands: expected a qlora_fast "
            "LlamaForCausalLM or a transformers causal LM (config.num_hidden_layers, num_attention_heads, hidden_size)"
        )
    kv_heads = getattr(cfg, "num_key_value_heads", None)
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    if kv_heads is None:  # no standard field: as the model caches them
        probed = _cached_kv_geometry(model)
        if isinstance(probed, str):
            warnings.warn(f"{type(model).__name__}: a one-token forward to read how many key heads its cache holds "
                          f"failed ({probed}); assuming num_attention_heads={heads}, "
                          f"head_dim={head_dim}", stacklevel=3)
        else:
            kv_heads, head_dim = probed
        kv_heads = heads if kv_heads is None else kv_heads
    return layers, kv_heads, head_dim, hidden


_KV_GEOMETRY = weakref.WeakKeyDictionary()  # model -> probed (key heads, head_dim): one forward per model


def _cached_kv_geometry(model: nn.Module):
    """(key heads, head_dim) of the cache a one-token forward builds, or the error it raised, as text
    (the exception itself would keep the model alive through its traceback).
    Configs without num_key_value_heads say it each their own way (Falcon caches 1 key head with
    multi_query, all heads with its new decoder whatever num_kv_heads says; GPT-BigCode 1).
    Probed once per model: saves and loads ask again."""
    if model not in _KV_GEOMETRY:
        _KV_GEOMETRY[model] = _probe_kv_geometry(model)
    return _KV_GEOMETRY[model]


@torch.no_grad()
def _probe_kv_geometry(model: nn.Module):
    was = model.training
    try:
        model.eval()
        ids = torch.zeros(1, 1, dtype=torch.long, device=next(iter(model.parameters())).device)
        key = _cache_pairs(call_causal_lm(model, input_ids=ids, use_cache=True)[1])[0][0]
        return int(key.shape[1]), int(key.shape[-1])
    except Exception as e:  # the caller warns and falls back on num_attention_heads
        return f"{type(e).__name__}: {e}"
    finally:
        model.train(was)


def _is_hf(model: nn.Module) -> bool:
    return not isinstance(model, LlamaForCausalLM)


def _cache_pairs(cache):
    """(key, value) per layer from a built-in tuple cache or a transformers Cache."""
    if isinstance(cache, (tuple, list)):
        return [(k, v) for k, v in cache]
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache_length(cache) -> int:
    """Tokens seen by a cache: a transformers Cache counts them (a sliding-window layer keeps only
    the last window of keys), a built-in tuple cache holds them all."""
    if isinstance(cache, (tuple, list)):
        return cache[0][0].shape[2]
    return cache.get_seq_length()


@dataclasses.dataclass
class PeftOutput(CausalLMOutput):
    """`CausalLMOutput` that also reads like transformers' ModelOutput: `out[0]` is the loss when
    there is one (else the logits), `out["loss"]`, `out.keys()` (transformers' Trainer reads these)."""

    def _fields(self):
        names = ["loss"] + [f.name for f in dataclasses.fields(self) if f.name != "loss"]  # transformers' order
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def __getitem__(self, key):
        fields = self._fields()
        return fields[key] if isinstance(key, str) else list(fields.values())[key]

    def keys(self):
        return self._fields().keys()


# ---------------------------------------------------------------------------- encoders
class PrefixEncoder(nn.Module):
    """Produces the prefix keys/values, shape (num_layers, 2, kv_heads, n, head_dim)."""

    def __init__(self, config: PrefixTuningConfig, geometry, init_pairs=None, dtype=torch.float32):
        super().__init__()
        self.layers, self.kv_heads, self.head_dim, hidden = geometry
        n = config.num_virtual_tokens
        self.n = n
        out = self.layers * 2 * self.kv_heads * self.head_dim
        if config.prefix_projection:
            self.embedding = nn.Embedding(n, hidden)
            self.mlp = nn.Sequential(
                nn.Linear(hidden, config.encoder_hidden_size), nn.Tanh(), nn.Linear(config.encoder_hidden_size, out)
            )
            self.prefix = None
            self.to(dtype)
        else:
            self.embedding = self.mlp = None
            init = torch.randn(self.layers, 2, self.kv_heads, n, self.head_dim) * 0.02
            if init_pairs is not None:
                # Keys/values of real tokens: attention starts in the range it was trained on.
                init = torch.stack([torch.stack([k[0], v[0]]) for k, v in init_pairs])
            self.prefix = nn.Parameter(init.to(dtype).contiguous())

    def forward(self) -> torch.Tensor:
        if self.prefix is not None:
            return self.prefix
        flat = self.mlp(self.embedding.weight)  # (n, L * 2 * kv * hd)
        return flat.view(self.n, self.layers, 2, self.kv_heads, self.head_dim).permute(1, 2, 3, 0, 4)


class PromptEncoder(nn.Module):
    """The soft prompt: (n, hidden) embeddings."""

    def __init__(self, init: torch.Tensor, dtype=torch.float32):
        super().__init__()
        self.embedding = nn.Parameter(init.detach().clone().to(dtype).contiguous())

    def forward(self) -> torch.Tensor:
        return self.embedding


# ---------------------------------------------------------------------------- the wrapper
class PeftModel(nn.Module):
    """A base causal LM with one adapter. Build it with `get_peft_model`.

    forward(input_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None,
    labels=None, use_cache=False, position_ids=None) -> CausalLMOutput whose logits (B, T, vocab)
    line up with the inputs; `loss` is the shifted next-token cross entropy (-100 ignored).
    `attention_mask` covers real tokens (and the cache's real tokens) only, never the virtual ones.
    """

    def __init__(self, model: nn.Module, config, tokenizer=None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.base_model = model
        self.peft_config = config
        self.adapter_enabled = True
        self.prompt_encoder: Optional[nn.Module] = None
        if isinstance(config, LoraConfig) and config.target_modules is None:
            from qlora_fast.nn.replace import default_lora_targets

            # as PEFT: with target_parameters, no target_modules means no linear layer
            targets = [] if config.target_parameters else default_lora_targets(model)
            self.peft_config = config = dataclasses.replace(config, target_modules=targets)
        if not isinstance(config, (LoraConfig, PrefixTuningConfig, PromptTuningConfig)):
            raise TypeError(
                f"config must be a LoraConfig, PrefixTuningConfig or PromptTuningConfig, got {type(config).__name__}"
            )
        trainable = [(p, p.requires_grad) for p in model.parameters()]
        try:  # all or nothing: an error leaves the model as it was (LoRA swaps are undone in _inject_lora)
            for p, _ in trainable:
                p.requires_grad_(False)
            if isinstance(config, LoraConfig):
                self._inject_lora(config)
            elif isinstance(config, PrefixTuningConfig):
                geometry = attention_geometry(model)
                init_pairs = None if config.prefix_projection else self._real_token_cache(config.num_virtual_tokens)
                self.prompt_encoder = PrefixEncoder(config, geometry, init_pairs, self._adapter_dtype())
            else:
                attention_geometry(model)
                self.prompt_encoder = PromptEncoder(self._prompt_init(config, tokenizer), self._adapter_dtype())
        except BaseException:
            for p, flag in trainable:
                p.requires_grad_(flag)
            raise

    # ---- construction helpers
    def _inject_lora(self, config: LoraConfig):
        """Swap the targets (the output layer only when a list names it) for LoRA modules through
        `replace_linear`, all or nothing. A layer already in 4 bits (ours or bitsandbytes') keeps its
        bytes under the adapter; with quantize_base every other linear layer but the output layer
        goes to 4 bits too. The output layer keeps full precision even when adapted (as bitsandbytes'
        quantizer leaves it; a tied one stays tied to the embeddings). The fused experts weights named
        by target_parameters get per-expert adapters last (after any quantization: on `Experts4bit`
        when in 4 bits, else through a `LoRAExperts` wrapper)."""
        from qlora_fast.nn.experts_lora import add_experts_lora, check_experts_lora
        from qlora_fast.nn.lora import LoRALinear
        from qlora_fast.nn.replace import match_target_parameters, replace_linear

        model = self.base_model
        targets = _target_names(model, config)
        experts = match_target_parameters(model, config.target_parameters) if config.target_parameters else {}
        for name, weights in experts.items():  # refused before anything changes (quantize_base would)
            check_experts_lora(model.get_submodule(name), weights, config.r)
        adapted = [n for n in targets if isinstance(model.get_submodule(n), LoRALinear)]
        if adapted:
            raise ValueError(f"layer {adapted[0]!r} already has a LoRA adapter; "
                             "merge or unload it before adding another")
        output = getattr(model, "get_output_embeddings", lambda: None)()
        heads = [n for n, m in model.named_modules() if m is output and output is not None] or ["lm_head"]
        originals = [(n, model.get_submodule(n)) for n in [*targets, *experts]]
        quant = dict(quant_type=config.quantize_base, blocksize=config.blocksize,
                     compress_statistics=config.double_quant)
        lora = dict(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                    use_rslora=config.use_rslora)
        body = [n for n in targets if n not in heads]
        head = [n for n in targets if n in heads]
        try:
            if body:
                replace_linear(model, skip=(), target_modules=body, **lora, **quant)
            if head:
                replace_linear(model, skip=(), target_modules=head, include_output=True, **lora, quant_type=None)
            if config.quantize_base:  # QLoRA: every other linear layer (but the output layer) in 4 bits too
                replace_linear(model, skip=heads, **quant)
            plan = [(name, add_experts_lora(model.get_submodule(name), weights, config.r, config.lora_alpha,
                                            config.use_rslora)) for name, weights in experts.items()]
            for name, module in plan:
                model.set_submodule(name, module)
        except BaseException:
            for name, module in originals:
                if getattr(module, "lora", None) is not None and name in experts:  # an Experts4bit adapted in place
                    module.lora = None
                model.set_submodule(name, module)
            raise

    @torch.no_grad()
    def _real_token_cache(self, n: int):
        ids = torch.randint(0, self.base_model.get_input_embeddings().num_embeddings, (1, n), device=self._device())
        was = self.base_model.training
        self.base_model.eval()
        _, cache = call_causal_lm(self.base_model, input_ids=ids, use_cache=True)
        self.base_model.train(was)
        pairs = [(k.detach().cpu(), v.detach().cpu()) for k, v in _cache_pairs(cache)]
        if any(k.shape[2] != n for k, _ in pairs):
            return None  # sliding-window layers keep fewer than n keys (Gemma2, Mistral): a random start
        return pairs

    def _prompt_init(self, config: PromptTuningConfig, tokenizer):
        table = self.base_model.get_input_embeddings().weight.detach()
        n = config.num_virtual_tokens
        if config.init == "random":
            return torch.randn(n, table.shape[1], device=table.device, dtype=table.dtype) * table.float().std()
        if tokenizer is None:
            raise ValueError("PromptTuningConfig(init='text') needs the tokenizer passed to get_peft_model")
        ids = tokenizer.encode(config.init_text)
        if not ids:
            raise ValueError("init_text encodes to no tokens")
        ids = (ids * (n // len(ids) + 1))[:n]
        return table[torch.tensor(ids, device=table.device)]

    def _adapter_dtype(self):
        # Adapters train in float32 over a low-precision base (as LoRALinear), float64 over float64.
        is64 = self.base_model.get_input_embeddings().weight.dtype == torch.float64
        return torch.float64 if is64 else torch.float32

    def _device(self):
        return next(iter(self.base_model.parameters())).device

    # ---- introspection
    @property
    def method(self) -> str:
        return self.peft_config.peft_type

    @property
    def config(self):
        return self.base_model.config

    def lora_modules(self):
        from qlora_fast.nn.lora import lora_modules

        return lora_modules(self.base_model)

    def adapter_parameters(self):
        """(name, parameter) of the adapter's own parameters (what training updates and
        `save_adapter` writes)."""
        if self.prompt_encoder is not None:
            return [(f"prompt_encoder.{n}", p) for n, p in self.prompt_encoder.named_parameters()]
        return [
            (f"base_model.{n}", p)
            for n, p in self.base_model.named_parameters()
            if n.endswith("lora_A") or n.endswith("lora_B")
        ]

    def parameter_counts(self):
        """(trainable, total); a 4-bit weight counts its logical (out * in) elements."""
        from qlora_fast.peft.memory import four_bit_weights

        total = trainable = 0
        packed = {id(weight): state.numel for weight, state in four_bit_weights(self)}
        seen = set()
        for p in self.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = packed.get(id(p), p.numel())
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self):
        """Print and return (trainable, total) parameter counts."""
        trainable, total = self.parameter_counts()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
        return trainable, total

    def get_input_embeddings(self):
        return self.base_model.get_input_embeddings()

    def gradient_checkpointing_enable(self):
        self.base_model.gradient_checkpointing_enable()

    # ---- forward
    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside the block the model computes its base (no LoRA, no prefix, no soft prompt)."""
        if self.prompt_encoder is None:
            from qlora_fast.nn.lora import disable_adapter

            with disable_adapter(self.base_model):
                yield self
            return
        previous, self.adapter_enabled = self.adapter_enabled, False
        try:
            yield self
        finally:
            self.adapter_enabled = previous

    def _virtual(self) -> int:
        if self.prompt_encoder is None or not self.adapter_enabled:
            return 0
        return self.peft_config.num_virtual_tokens

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None, labels=None,
                use_cache=False, position_ids=None) -> PeftOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        ref = input_ids if input_ids is not None else inputs_embeds
        B, T = ref.shape[:2]
        n = self._virtual()
        if n == 0:
            logits, cache = call_causal_lm(self.base_model, input_ids=input_ids, attention_mask=attention_mask,
                                           past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                                           position_ids=position_ids, use_cache=use_cache)
            return PeftOutput(logits=logits, loss=None if labels is None else causal_lm_loss(logits, labels),
                                  past_key_values=cache if use_cache else None)
        device = ref.device
        past_len = 0 if past_key_values is None else _cache_length(past_key_values)
        real_past = past_len - n if past_key_values is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, real_past + T, dtype=torch.long, device=device)
        if attention_mask.shape != (B, real_past + T):
            raise ValueError(
                f"attention_mask must have shape {(B, real_past + T)} (real tokens only), got "
                f"{tuple(attention_mask.shape)}"
            )
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)[:, -T:]
        position_ids = position_ids + n  # the virtual tokens take positions 0..n-1
        ones = torch.ones(B, n, dtype=attention_mask.dtype, device=device)
        full_mask = torch.cat([ones, attention_mask], dim=1)

        if isinstance(self.peft_config, PrefixTuningConfig) and past_key_values is None:
            past_key_values = self._prefix_cache(B, ref)
        if past_key_values is None:  # prompt tuning's first call: the soft prompt goes in front
            embeds = inputs_embeds if inputs_embeds is not None else self.base_model.get_input_embeddings()(input_ids)
            soft = self.prompt_encoder().to(embeds.dtype)[None].expand(B, -1, -1)
            embeds = torch.cat([soft, embeds], dim=1)
            virtual_pos = torch.arange(n, device=device)[None].expand(B, -1)
            logits, cache = call_causal_lm(self.base_model, inputs_embeds=embeds, attention_mask=full_mask,
                                           position_ids=torch.cat([virtual_pos, position_ids], 1), use_cache=use_cache)
            logits = logits[:, n:]
        else:  # the prefix (or the soft prompt already in the cache) sits in past_key_values
            logits, cache = call_causal_lm(self.base_model, input_ids=input_ids, inputs_embeds=inputs_embeds,
                                           attention_mask=full_mask, past_key_values=past_key_values,
                                           position_ids=position_ids, use_cache=use_cache)
        loss = None if labels is None else causal_lm_loss(logits, labels)
        return PeftOutput(logits=logits, loss=loss, past_key_values=cache if use_cache else None)

    def _prefix_cache(self, batch: int, ref: torch.Tensor):
        dtype = ref.dtype if ref.is_floating_point() else next(iter(self.base_model.parameters())).dtype
        prefix = self.prompt_encoder().to(dtype)  # (L, 2, kv, n, hd)
        pairs = [
            (prefix[i, 0][None].expand(batch, -1, -1, -1), prefix[i, 1][None].expand(batch, -1, -1, -1))
            for i in range(prefix.shape[0])
        ]
        if not _is_hf(self.base_model):
            return tuple(pairs)
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=pairs)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, **kwargs):
        """`qlora_fast.models.generate` through the adapter (same arguments)."""
        from qlora_fast.models.generate import generate

        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)

    # ---- save / load / merge
    def adapter_state_dict(self):
        """The adapter's tensors under our names (`adapter_parameters()`), on the CPU."""
        return {name: p.detach().cpu().contiguous() for name, p in self.adapter_parameters()}

    def peft_state_dict(self, state: Optional[dict] = None):
        """The adapter's tensors under PEFT's names, as `save_adapter` writes them (`state`: ours
        under our names instead of `adapter_state_dict()`, e.g. gathered from FSDP2 shards)."""
        prefix_flat = None
        if isinstance(self.peft_config, PrefixTuningConfig):
            with torch.no_grad():  # PEFT stores the prefix (projected, if so) flattened per virtual token
                prefix_flat = (
                    self.prompt_encoder()
                    .detach()
                    .permute(3, 0, 1, 2, 4)
                    .reshape(self.peft_config.num_virtual_tokens, -1)
                )
            prefix_flat = prefix_flat.cpu().contiguous()
        state = self.adapter_state_dict() if state is None else state
        if isinstance(self.peft_config, LoraConfig) and self.peft_config.target_parameters:
            names = _experts_adapter_names(self.base_model, self.peft_config)
            renames = {ours: peft for ours, (peft, _) in names.items()}
            state = {renames.get(name, name): t for name, t in state.items()}
        return to_peft_names(state, self.peft_config, prefix_flat)

    def peft_config_dict(self) -> dict:
        """`adapter_config.json` as `save_adapter` writes it (PEFT's fields)."""
        geometry, config = None, self.peft_config
        if not isinstance(config, LoraConfig):
            geometry = (*attention_geometry(self.base_model), _attention_heads(self.base_model))
        elif isinstance(config.target_modules, str) and config.target_modules != "all-linear":
            # PEFT's regex matching also hits dropouts and activations and then fails, so PEFT gets
            # the layers it picked by name (our regex stays in the weights' metadata)
            names = sorted(_lora_names(self.base_model))
            config = dataclasses.replace(config, target_modules=names)
        fan_in_fan_out = any(getattr(m.base, "conv1d_class", None) is not None for m in self.lora_modules())
        name = getattr(getattr(self.base_model, "config", None), "name_or_path", None) or None
        return config_to_peft_dict(config, geometry, fan_in_fan_out, name)

    def save_adapter(self, path: str, state: Optional[dict] = None) -> str:
        """Write the adapter into directory `path` in PEFT's format (`adapter_config.json` +
        `adapter_model.safetensors`: `peft.PeftModel.from_pretrained` loads it), as one unit: a
        crash or an error leaves the previous adapter at `path` whole. `state`: the adapter's
        tensors (as `adapter_state_dict()` gives them) to write instead of this model's own, e.g.
        full tensors gathered from FSDP2 shards. Returns `path`."""
        from safetensors.torch import save

        if state is not None:
            own = {name: p.shape for name, p in self.adapter_parameters()}
            if not isinstance(state, dict) or {n: tuple(t.shape) for n, t in state.items()} != {
                n: tuple(s) for n, s in own.items()
            }:
                raise ValueError(
                    "state must map this model's adapter parameter names to tensors of their (full) shapes"
                )
        tensors = self.peft_state_dict(state)
        check_finite_state(tensors, f"the adapter {path}")  # a diverged run must not replace the last good one
        config_bytes = json.dumps(self.peft_config_dict(), indent=2).encode()
        metadata = {
            "format": "pt",
            **_base_signature(self.base_model),
            CONFIG_HASH: hashlib.sha256(config_bytes).hexdigest(),
            OUR_CONFIG: json.dumps(self.peft_config.to_dict()),
        }
        write_adapter_dir(
            path, {ADAPTER_WEIGHTS: save(tensors, metadata=metadata), ADAPTER_CONFIG: config_bytes}
        )
        return path

    def load_adapter(self, path: str) -> "PeftModel":
        """Load the adapter at `path` (ours, in PEFT's format or our earlier one, or PEFT's own
        `save_pretrained` output) into this model, whose config must match. Everything is checked
        before any tensor is copied: an error leaves this model as it was. A merged layer is refused
        (the new adapter would not reach its output, and unmerging would subtract it from the base)."""
        from qlora_fast.nn.lora import check_unmerged

        check_unmerged(self.base_model, "an adapter")
        config, state, metadata, by_peft = read_adapter(path)
        config = _present_targets(self.base_model, config, by_peft)
        if not _same_adapter(self.base_model, config, self.peft_config, by_peft):
            raise ValueError(
                f"adapter at {path} has config {config.to_dict()}, this model has {self.peft_config.to_dict()}"
            )
        _check_base_signature(self.base_model, metadata, path)
        geometry = None if isinstance(config, LoraConfig) else attention_geometry(self.base_model)
        state = _from_experts_peft_names(self.base_model, self.peft_config,
                                         from_peft_names(state, self.peft_config, geometry))
        own = dict(self.adapter_parameters())
        check_state(state, {n: p.shape for n, p in own.items()}, path)
        with torch.no_grad():
            for name, tensor in state.items():
                own[name].copy_(tensor)
        return self

    @torch.no_grad()
    def merge_and_unload(self, requantize: bool = False, dtype: Optional[torch.dtype] = None) -> nn.Module:
        """Fold every LoRA adapter into its base weight and return the plain base model, ready for
        transformers' `save_pretrained` / `from_pretrained`.

        Default: a dense model. Every adapted layer becomes W + scaling * B A (float32 math, float64
        for a float64 layer); every 4-bit layer (adapted or not) is dequantized; each gets back its
        original class (a GPT-2 `Conv1D` stays a Conv1D, weight (in, out)) and its original dtype, or
        `dtype` for the whole model when given. A model loaded in 4 bits by transformers loses its
        `quantization_config`. requantize=True keeps 4 bits: each 4-bit adapted weight is merged and
        quantized again (adding quantization error), and a transformers model's config gets the
        bitsandbytes `quantization_config` that reloads it. Only LoRA adapters merge (ValueError otherwise).
        """
        if self.prompt_encoder is not None:
            raise ValueError(f"merge_and_unload needs a LoRA adapter; {self.method} tuning has nothing to merge")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        if requantize and dtype is not None:
            raise ValueError("dtype is for a dense merge; requantize=True keeps the 4-bit layers as they are")
        from qlora_fast.nn.replace import merge_linear_layers

        merge_linear_layers(self.base_model, keep_4bit=requantize, dtype=dtype)
        if dtype is not None:
            # parameters only: buffers such as rotary frequencies stay as the model computes them
            for p in self.base_model.parameters():
                p.data = p.data.to(dtype)
        return self.base_model


def _attention_heads(model: nn.Module) -> int:
    cfg = model.config
    return cfg.num_heads if isinstance(model, LlamaForCausalLM) else cfg.num_attention_heads


def _base_signature(model: nn.Module) -> dict:
    """What identifies the base beyond its layer shapes (stored in the adapter file's metadata);
    empty for a base without token embeddings (LoRA on any module)."""
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    if embeddings is None:
        return {}
    return {"base_embedding_shape": "x".join(str(n) for n in embeddings.weight.shape)}


def _check_base_signature(model: nn.Module, saved: dict, path: str) -> None:
    ours = _base_signature(model)
    for key in ours.keys() & saved.keys():
        # A LoRA adapter fits any base of the same layer shapes, so a base with another
        # tokenizer (e.g. the byte-level vs the BPE built-in model) would load silently.
        if saved[key] != ours[key]:
            raise ValueError(f"adapter at {path} was trained on a base with {key} {saved[key]}; "
                             f"this model has {ours[key]} (a different base model or tokenizer)")


def _lora_names(model: nn.Module) -> list:
    """Full names of the LoRA layers of `model`."""
    from qlora_fast.nn.lora import LoRALinear

    return [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _target_names(model: nn.Module, config: LoraConfig) -> list:
    """Full names of the layers `config` adapts on `model`: the output layer only when a list of
    names names it (PEFT adapts any layer named), never through a regex or "all-linear"."""
    from qlora_fast.nn.replace import default_lora_targets, match_target_modules

    targets = default_lora_targets(model) if config.target_modules is None else config.target_modules
    if targets == [] or (config.target_modules is None and config.target_parameters):
        return []  # target_parameters only (PEFT's target_modules=[])
    return match_target_modules(model, targets, include_output=isinstance(targets, list))


def _experts_adapter_names(model: nn.Module, config) -> dict:
    """{our name of an experts adapter tensor: (its name in PEFT's nesting, before `to_peft_names`;
    its shape)} for the fused experts weights `config.target_parameters` picks on `model` (adapted
    or not). PEFT wraps one `ParamWrapper` per targeted weight, the weight first in the module's
    parameter order innermost: of n weights on one module, the i-th's tensors sit under
    (n - 1 - i) ".base_layer"s (Mixtral: experts.base_layer.lora_A is gate_up_proj's, experts.lora_A
    down_proj's)."""
    from qlora_fast.nn.experts4bit import Experts4bit
    from qlora_fast.nn.experts_lora import LoRAExperts
    from qlora_fast.nn.replace import match_target_parameters

    if not (isinstance(config, LoraConfig) and config.target_parameters):
        return {}
    out = {}
    for name, weights in match_target_parameters(model, config.target_parameters).items():
        module = model.get_submodule(name)
        module = module.base if isinstance(module, LoRAExperts) else module
        for i, w in enumerate(weights):
            experts, out_features, in_features = (module.shapes[w] if isinstance(module, Experts4bit)
                                                  else tuple(getattr(module, w).shape))
            peft = f"base_model.{name}" + ".base_layer" * (len(weights) - 1 - i)
            out[f"base_model.{name}.lora.{w}.lora_A"] = (f"{peft}.lora_A", (experts * config.r, in_features))
            out[f"base_model.{name}.lora.{w}.lora_B"] = (f"{peft}.lora_B", (out_features, experts * config.r))
    return out


def _from_experts_peft_names(model: nn.Module, config, state: dict) -> dict:
    """`state` (after `from_peft_names`) with the experts adapters under our names."""
    renames = {peft: ours for ours, (peft, _) in _experts_adapter_names(model, config).items()}
    return {renames.get(name, name): t for name, t in state.items()}


def _present_targets(model: nn.Module, config, by_peft: bool):
    """A PEFT file's target list cut to the names this model has (PEFT skips the others: a list may
    be written for several architectures); ValueError when none is present."""
    if not (by_peft and isinstance(config, LoraConfig)):
        return config
    from qlora_fast.nn.replace import match_target_parameters, present_target_names

    if config.target_parameters:
        match_target_parameters(model, config.target_parameters, present_only=True)  # ValueError if none is
        present = []
        for name in config.target_parameters:
            try:
                match_target_parameters(model, [name])
                present.append(name)
            except ValueError:
                pass
        config = dataclasses.replace(config, target_parameters=present)
    if not isinstance(config.target_modules, list) or config.target_modules == []:
        return config
    return dataclasses.replace(config, target_modules=present_target_names(model, config.target_modules))


def _same_adapter(model: nn.Module, saved, ours, by_peft: bool) -> bool:
    """Whether a saved config fits `model` built with `ours`. LoRA: the same layers (however the
    targets are spelled), r, alpha and rsLoRA; dropout only matters to training. PEFT's own files
    say nothing of how the base is stored (4 bits or not) or how a prompt was initialised, so those
    are not compared."""
    if isinstance(saved, LoraConfig) and isinstance(ours, LoraConfig):
        def lora_key(c):
            stored = () if by_peft else (c.quantize_base, c.blocksize, c.double_quant)
            experts = sorted(_experts_adapter_names(model, c))
            return (_target_names(model, c), experts, c.r, float(c.lora_alpha), c.use_rslora, *stored)

        return lora_key(saved) == lora_key(ours)

    def key(config, loose):
        d = config.to_dict()
        if isinstance(d.get("target_modules"), list):
            d["target_modules"] = sorted(d["target_modules"])
        if loose:
            for field in ("quantize_base", "blocksize", "double_quant", "init", "init_text"):
                d.pop(field, None)
            if not d.get("prefix_projection", True):
                d.pop("encoder_hidden_size")
        return d

    return key(saved, by_peft) == key(ours, by_peft)


def _expected_shapes(model: nn.Module, config) -> dict:
    """{name: shape} of the adapter `config` would give `model`, worked out without changing it."""
    if isinstance(config, LoraConfig):
        from qlora_fast.nn.replace import linear_features

        shapes = {}
        for name in _target_names(model, config):
            in_features, out_features = linear_features(model.get_submodule(name))
            shapes[f"base_model.{name}.lora_A"] = (config.r, in_features)
            shapes[f"base_model.{name}.lora_B"] = (out_features, config.r)
        shapes.update({ours: shape for ours, (_, shape) in _experts_adapter_names(model, config).items()})
        return shapes
    geometry = attention_geometry(model)
    if isinstance(config, PrefixTuningConfig):
        return {f"prompt_encoder.{n}": tuple(p.shape) for n, p in PrefixEncoder(config, geometry).named_parameters()}
    return {"prompt_encoder.embedding": (config.num_virtual_tokens, geometry[3])}


def read_adapter_config(path: str):
    """The config of the adapter saved in directory `path` (by `save_adapter`, or by PEFT)."""
    return read_adapter(path)[0]


def get_peft_model(model: nn.Module, config, tokenizer=None) -> PeftModel:
    """Wrap `model` with the adapter `config` describes; the base is frozen (LoRA modules are
    swapped into it in place, all or nothing). `tokenizer` is needed only for
    PromptTuningConfig(init="text"). Layers already in 4 bits (ours, or bitsandbytes' from a model
    loaded with `BitsAndBytesConfig(load_in_4bit=True)`) keep their bytes. Raises ValueError for a
    target that matches nothing or a model without the expected attention."""
    return PeftModel(model, config, tokenizer=tokenizer)


def load_adapter(model: nn.Module, path: str) -> PeftModel:
    """A fresh `PeftModel` on `model` with the adapter saved at `path` (by `save_adapter`, in our
    earlier format, or by PEFT's `save_pretrained`). The files are read and checked against the
    model before it is touched: a bad or mismatched adapter raises and leaves `model` as it was."""
    config, state, metadata, by_peft = read_adapter(path)
    config = _present_targets(model, config, by_peft)
    _check_base_signature(model, metadata, path)
    geometry = None if isinstance(config, LoraConfig) else attention_geometry(model)
    check_state(_from_experts_peft_names(model, config, from_peft_names(state, config, geometry)),
                _expected_shapes(model, config), path)
    if isinstance(config, PromptTuningConfig) and config.init == "text":
        # The saved weights overwrite the initial prompt, so build it with a random init.
        saved = config
        peft = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=saved.num_virtual_tokens))
        peft.peft_config = saved
    else:
        peft = get_peft_model(model, config)
    return peft.load_adapter(path)


def save_adapter(model: nn.Module, path: str) -> str:
    """`model.save_adapter(path)` for a `PeftModel`; a model adapted in place by `replace_linear`
    (e.g. one trained by transformers' Trainer or TRL) is saved the same way, its LoraConfig read
    off its LoRA modules (which must share r, alpha, dropout and rsLoRA)."""
    if isinstance(model, PeftModel):
        return model.save_adapter(path)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a PeftModel or an nn.Module with LoRA layers, got {type(model).__name__}")
    return _wrap_adapted(model).save_adapter(path)


def _wrap_adapted(model: nn.Module) -> PeftModel:
    """A PeftModel view of a model whose LoRA modules are already in place (nothing is injected)."""
    from qlora_fast.nn.experts_lora import experts_adapters
    from qlora_fast.nn.lora import LoRALinear, QLoRALinear

    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    experts = experts_adapters(model)
    if not names and not experts:
        raise TypeError(f"model ({type(model).__name__}) has no LoRA layers to save; "
                        "build it with get_peft_model or replace_linear(r=...)")
    modules = [model.get_submodule(n) for n in names]
    settings = {(m.r, m.alpha, m.dropout, m.use_rslora) for m in modules}
    settings |= {(a.r, a.alpha, 0.0, a.use_rslora) for _, m in experts for a in m.lora.values()}
    if len(settings) > 1:
        raise ValueError(
            f"the LoRA layers mix settings (r, alpha, dropout, rslora) {sorted(settings)}; one adapter config holds one"
        )
    r, alpha, dropout, rslora = settings.pop()
    quant = next((m.base.quant_type for m in modules if isinstance(m, QLoRALinear)), None)
    config = LoraConfig(target_modules=names, r=r, lora_alpha=float(alpha), lora_dropout=dropout, use_rslora=rslora,
                        quantize_base=quant,
                        target_parameters=[f"{n}.{w}" for n, m in experts for w in m.lora] or None)
    view = PeftModel.__new__(PeftModel)
    nn.Module.__init__(view)
    view.base_model, view.peft_config, view.adapter_enabled, view.prompt_encoder = model, config, True, None
    return view
