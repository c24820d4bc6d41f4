"""Autoregressive decoding with a KV cache, shared by the built-in model, PEFT-wrapped models and
Hugging Face causal LMs.

`model(input_ids=..., attention_mask=..., past_key_values=... (or cache=...), position_ids=...,
use_cache=True)` must return an object with `.logits` and `.past_key_values` (or `.cache`); that is
all `generate` uses.
"""
import functools
import inspect
from typing import Iterable, Optional, Union

import torch

from .positions import positions_from_mask


def _takes_cache_keyword(model) -> bool:
    # transformers >= 5.2x renamed `past_key_values` to `cache` (the old name is deprecated).
    if "forward" in vars(model):  # a forward patched onto this instance: look at it
        return _forward_takes_cache(model.forward)
    return _class_takes_cache(type(model))


@functools.lru_cache(maxsize=None)
def _class_takes_cache(cls) -> bool:
    """Per class, since `inspect.signature` on every decoding step costs more than a tiny model's step."""
    return _forward_takes_cache(cls.forward)


def _forward_takes_cache(forward) -> bool:
    try:
        return "cache" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def call_causal_lm(model, past_key_values=None, **kwargs):
    """model(**kwargs) with the KV cache passed under the name the model takes; returns
    (logits, cache). Works for qlora_fast models and transformers models old and new."""
    if past_key_values is not None:
        kwargs["cache" if _takes_cache_keyword(model) else "past_key_values"] = past_key_values
    out = model(**kwargs)
    if "cache" in getattr(out, "__dataclass_fields__", ()):
        # transformers >= 5.2x: `cache` is the field, and reading the deprecated `past_key_values`
        # property would print a warning on every run even when the cache is None.
        return out.logits, out.cache
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    return out.logits, cache


def left_pad(rows, pad_id: int):
    """(input_ids, attention_mask) LongTensors for token-id lists padded on the left, as batched
    generation wants (every row's next token lands in the last column)."""
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        if len(ids):
            input_ids[row, width - len(ids):] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask


def _filter_logits(logits: torch.Tensor, top_k: Optional[int], top_p: Optional[float]) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set whose probability
    reaches top-p (the most likely token always stays)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_token_id: Optional[Union[int, Iterable[int]]] = None,
    stop_token_ids: Optional[Iterable[int]] = None,
    pad_token_id: int = 0,
    generator: Optional[torch.Generator] = None,
) -> torch.LongTensor:
    """Continue each prompt; returns (B, T_prompt + n_new) with n_new <= max_new_tokens.

    input_ids (B, T) LongTensor, prompts LEFT-padded, with attention_mask (B, T) marking real
    tokens (all real when omitted). temperature 0 is greedy; otherwise sampling from
    softmax(logits / temperature) restricted by top_k / top_p, drawn with `generator`.
    A row finishes after emitting eos_token_id (one id or several, as transformers' generation
    configs give) or any of stop_token_ids (the stop token is kept); later positions of finished
    rows hold pad_token_id. Decoding stops early when all rows finish.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise TypeError("input_ids must be a (batch, length) LongTensor")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids must hold at least one token per prompt")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k <= 0):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
            f"{tuple(attention_mask.shape)}"
        )
    mask_values = attention_mask.long()
    if bool(((mask_values != 0) & (mask_values != 1)).any()) or bool((mask_values[:, 1:] < mask_values[:, :-1]).any()):
        # a right-padded prompt would predict its first new token from a padding position
        raise ValueError("attention_mask must mark each prompt's tokens with 1 after its padding (0): pad prompts "
                         "on the LEFT (padding_side='left'; qlora_fast.models.generate.left_pad)")
    stops = set(stop_token_ids or ())
    if eos_token_id is not None:
        stops.update(int(t) for t in torch.as_tensor(eos_token_id).reshape(-1).tolist())  # an id, ids or a tensor
    stop_tensor = torch.tensor(sorted(stops), dtype=torch.long, device=input_ids.device)

    was_training = model.training
    model.eval()
    try:
        mask = mask_values
        tokens = input_ids
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        step_ids, positions, past = input_ids, positions_from_mask(mask), None
        for _ in range(max_new_tokens):
            logits, past = call_causal_lm(model, input_ids=step_ids, attention_mask=mask, past_key_values=past,
                                          position_ids=positions, use_cache=True)
            logits = logits[:, -1, :].float()
            if temperature == 0.0:
                next_ids = logits.argmax(-1)
            else:
                if temperature < 1e-30:  # logits / T would overflow to inf (NaN probabilities): shift first
                    logits = logits - logits.amax(-1, keepdim=True)
                logits = _filter_logits(logits / temperature, top_k, top_p)
                next_ids = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
            # Finished rows show pad_token_id but feed the model their sampled token, which is
            # always a valid id (pad_token_id need not be one).
            shown = torch.where(finished, torch.full_like(next_ids, pad_token_id), next_ids)
            tokens = torch.cat([tokens, shown[:, None]], dim=1)
            if len(stops):
                finished = finished | torch.isin(next_ids, stop_tensor)
            if bool(finished.all()):
                break
            step_ids = next_ids[:, None]
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return tokens
    finally:
        model.train(was_training)
