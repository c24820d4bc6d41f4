"""A small Llama-style decoder: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention,
a KV cache, and `generate()`.

Module names follow Hugging Face's Llama (`model.layers[i].self_attn.q_proj`, `mlp.gate_proj`,
`lm_head`, ...) and every projection is a plain `nn.Linear`, so `replace_linear` and the PEFT
configs find and replace them the same way they do in a transformers model.

The KV cache (`past_key_values`) is a tuple with one `(key, value)` pair per layer, each of
shape (batch, num_kv_heads, past_len, head_dim); keys are stored after the rotary embedding.
"""
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .generate import generate
from .positions import positions_from_mask

KVCache = Tuple[Tuple[torch.Tensor, torch.Tensor], ...]


@dataclass
class LlamaConfig:
    """Shape of a `LlamaForCausalLM`. `num_heads` must be a multiple of `num_kv_heads` and divide
    `hidden_size`."""

    vocab_size: int = 259
    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "max_seq_len",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("head_dim (hidden_size // num_heads) must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CausalLMOutput:
    """What `LlamaForCausalLM.forward` returns."""

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    past_key_values: Optional[KVCache] = None
    hidden_states: Optional[torch.Tensor] = None


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 and cast back."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(x.dtype) * self.weight.to(x.dtype)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables of shape (B, 1, T, head_dim) for integer positions (B, T) (HF's half-split
    layout: the first half of each head pairs with the second half)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    )
    angles = position_ids.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class LlamaAttention(nn.Module):
    """Grouped-query causal self-attention with rotary positions and an optional KV cache."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, past: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        """x (B, T, H); mask (B, 1, T, S) bool, True where a query may attend; past keys/values
        (B, kv_heads, P, D) with S = P + T. Returns (output (B, T, H), (keys, values) of length S)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if past is not None:
            k = torch.cat([past[0].to(k.dtype), k], dim=2)
            v = torch.cat([past[1].to(v.dtype), v], dim=2)
        groups = self.num_heads // self.num_kv_heads
        k_rep = k.repeat_interleave(groups, dim=1) if groups > 1 else k
        v_rep = v.repeat_interleave(groups, dim=1) if groups > 1 else v
        out = F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=mask)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(out), (k, v)


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, cos, sin, mask, past=None):
        attn, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and the final norm; returns the final hidden states."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([LlamaDecoderLayer(config) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[Sequence] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        use_cache: bool = False,
    ):
        """Returns (hidden states (B, T, H), cache or None).

        attention_mask (B, P + T) covers the cached tokens too (1 = real token, 0 = padding);
        without it every token is real. position_ids (B, T) default to the count of real tokens
        before each token, so left-padded prompts start at position 0.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        if past_key_values is not None and len(past_key_values) != len(self.layers):
            raise ValueError(
                f"past_key_values must have one (key, value) pair per layer ({len(self.layers)}), got "
                f"{len(past_key_values)}"
            )
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if attention_mask is None:
            attention_mask = torch.ones(B, past_len + T, dtype=torch.long, device=x.device)
        if attention_mask.shape != (B, past_len + T):
            raise ValueError(
                f"attention_mask must have shape {(B, past_len + T)} (batch, past + new tokens), got "
                f"{tuple(attention_mask.shape)}"
            )
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)[:, past_len:]
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        # Query i (absolute index past_len + i) sees key j when j is real and j <= past_len + i;
        # it always sees itself so that fully padded rows stay finite.
        S = past_len + T
        key_idx = torch.arange(S, device=x.device)
        query_idx = torch.arange(past_len, S, device=x.device)
        causal = key_idx[None, :] <= query_idx[:, None]
        mask = causal[None] & attention_mask.bool()[:, None, :]
        mask = (mask | (key_idx[None, :] == query_idx[:, None])[None])[:, None]
        presents: List[Tuple[torch.Tensor, torch.Tensor]] = []
        for i, layer in enumerate(self.layers):
            past = None if past_key_values is None else past_key_values[i]
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, present = checkpoint(layer, x, cos, sin, mask, past, use_reentrant=False)
            else:
                x, present = layer(x, cos, sin, mask, past)
            presents.append(present)
        return self.norm(x), (tuple(presents) if use_cache else None)


class LlamaForCausalLM(nn.Module):
    """`LlamaModel` plus the `lm_head`. See the module docstring for the cache layout."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"config must be a LlamaConfig, got {type(config).__name__}")
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def gradient_checkpointing_enable(self):
        """Recompute each decoder layer in the backward pass instead of keeping its activations."""
        self.model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.model.gradient_checkpointing = False

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[Sequence] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        use_cache: bool = False,
        position_ids: Optional[torch.Tensor] = None,
    ) -> CausalLMOutput:
        """logits (B, T, vocab) in the model's dtype; the loss is computed in at least float32. `labels`
        (B, T) are the input ids themselves (shifted inside: token t predicts label t+1); -100 is ignored."""
        hidden, cache = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            use_cache=use_cache,
        )
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
        return CausalLMOutput(logits=logits, loss=loss, past_key_values=cache, hidden_states=hidden)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, **kwargs) -> torch.LongTensor:
        """See `qlora_fast.models.generate.generate`."""
        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy: logits[:, t] predicts labels[:, t + 1]; -100 is ignored."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    if shift_logits.dtype in (torch.float16, torch.bfloat16):
        shift_logits = shift_logits.float()  # the log-sum-exp needs float32 range and precision
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
