"""Sliding-window perplexity of a causal language model (the Hugging Face docs' recipe).

Windows of at most `max_length` tokens start every `stride` tokens; each window scores only the
tokens not scored by an earlier window, with everything before them in the window as context. So
each token is scored at most once, with at least `max_length - stride` tokens of context once the
sequence is long enough; a window's first token is never scored (it has no context), which with
disjoint windows (stride == max_length) skips one token per window, as the recipe does. The
negative log-likelihoods are summed in float64 and divided by the number of scored tokens.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F


def _logits_of(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            "model must return logits: a tensor, an object with .logits, or a tuple starting with it; "
            f"got {type(output).__name__}"
        )
    return logits


def _default_max_length(model) -> Optional[int]:
    config = getattr(model, "config", None)
    for name in ("max_seq_len", "n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 1:
            return value
    return None


def _input_vocab_size(model) -> Optional[int]:
    """The number of rows of the model's input embedding, when it has one to ask."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    size = getattr(embedding, "num_embeddings", None)
    return size if isinstance(size, int) else None


def _right_padding_mask(attention_mask, shape) -> Optional[torch.Tensor]:
    """`attention_mask` as a bool tensor of `shape`, checked: 0/1 values, padding on the right, and
    some row with a token to score."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
    mask = attention_mask.unsqueeze(0) if attention_mask.dim() == 1 else attention_mask
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask must have the shape of token_ids {tuple(shape)}, got "
                         f"{tuple(attention_mask.shape)}")
    if mask.is_floating_point() or mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold 0 (padding) and 1 (a token), as integers or bools")
    mask = mask.bool().cpu()
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError("attention_mask has a token after padding: pad on the right (padding_side='right')")
    if int(mask[:, 1:].sum()) == 0:
        raise ValueError("attention_mask leaves no token to score (every row is shorter than 2 tokens)")
    return mask


def perplexity(
    model: torch.nn.Module,
    token_ids: Union[torch.Tensor, Sequence[int]],
    stride: Optional[int] = None,
    max_length: Optional[int] = None,
    progress: bool = False,
    attention_mask: Optional[torch.Tensor] = None,
) -> float:
    """exp(mean negative log-likelihood) of `token_ids` under `model`.

    Args:
        model: a causal LM called as `model(input_ids)` with input_ids (B, T) long; it returns
            logits (B, T, V) as a tensor, an object with `.logits` (Hugging Face models), or a
            tuple whose first item is the logits. Run in eval mode (restored afterwards), no grad.
        token_ids: (T,) or (B, T) ids, T >= 2; rows of a batch are scored together.
        max_length: the window length; defaults to the model config's max_seq_len /
            n_positions / max_position_embeddings, else required.
        stride: how far each window moves, 1 <= stride <= max_length; defaults to max_length
            (disjoint windows). Smaller strides give each token more context and cost more.
        progress: show a tqdm bar over windows.
        attention_mask: (B, T) of 1 (a token) and 0 (padding), as a tokenizer pads a batch of
            texts of different lengths: padding goes on the right, is never scored, and (the model
            being causal) never changes the score of a token before it. Default: all tokens.

    Returns a Python float. Raises TypeError/ValueError for bad arguments or logits of the
    wrong shape.
    """
    if not isinstance(model, torch.nn.Module) and not callable(model):
        raise TypeError(f"model must be a torch.nn.Module (or callable), got {type(model).__name__}")
    ids = token_ids if isinstance(token_ids, torch.Tensor) else torch.tensor(list(token_ids), dtype=torch.long)
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"token_ids must hold integers, got {ids.dtype}")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"token_ids must have shape (T,) or (B, T) with T >= 2, got {tuple(ids.shape)}")
    ids = ids.long()
    mask = _right_padding_mask(attention_mask, ids.shape)
    if max_length is None:
        max_length = _default_max_length(model)
        if max_length is None:
            raise ValueError(
                "max_length is required: the model has no config.max_seq_len / n_positions / max_position_embeddings"
            )
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    stride = max_length if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= max_length:
        raise ValueError(f"stride must be an int in [1, max_length={max_length}], got {stride!r}")

    params = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    device = params.device if params is not None else ids.device
    if mask is not None:  # padding is never scored: any id will do, and 0 is one the model embeds
        ids = ids.masked_fill(~mask.to(ids.device), 0)
        mask = mask.to(device)
    ids = ids.to(device)
    seq_len = ids.shape[1]
    starts = []
    for begin in range(0, seq_len, stride):
        starts.append(begin)
        if begin + max_length >= seq_len:
            break

    lowest, highest = int(ids.min()), int(ids.max())  # once, not a device sync per window
    # checked before the first forward, whose embedding lookup would fail with a bare IndexError
    # (the logits' width is checked again below, for models without get_input_embeddings)
    vocab = _input_vocab_size(model)
    if lowest < 0 or (vocab is not None and highest >= vocab):
        raise ValueError(f"token_ids must lie in [0, {vocab if vocab is not None else 'vocab_size'}) (the model's "
                         f"vocabulary), got {lowest}..{highest}")
    was_training = getattr(model, "training", False)
    if isinstance(model, torch.nn.Module):
        model.eval()
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)  # read back once, after the loop
    n_scored = 0
    prev_end = 0
    try:
        from tqdm.auto import tqdm

        with torch.no_grad():
            for begin in tqdm(starts, desc="perplexity", unit="window", disable=not progress):
                end = min(begin + max_length, seq_len)
                window = ids[:, begin:end]
                logits = _logits_of(model(window))
                if logits.dim() != 3 or logits.shape[:2] != window.shape:
                    raise ValueError(
                        f"logits must have shape (B, T, V) = ({window.shape[0]}, {window.shape[1]}, V), "
                        f"got {tuple(logits.shape)}"
                    )
                if highest >= logits.shape[-1] or lowest < 0:
                    raise ValueError(
                        f"token_ids must lie in [0, {logits.shape[-1]}) (the model's vocabulary), "
                        f"got {lowest}..{highest}"
                    )
                # Score tokens prev_end..end-1 (never the window's first token: it has no context).
                first = max(prev_end, begin + 1) - begin
                log_probs = F.log_softmax(logits[:, first - 1 : -1].double(), dim=-1)
                targets = window[:, first:]
                nll = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                if mask is not None:
                    keep = mask[:, begin:end][:, first:]
                    nll, n_scored = nll[keep], n_scored + int(keep.sum())
                else:
                    n_scored += targets.numel()
                nll_sum -= nll.sum()
                prev_end = end
    finally:
        if isinstance(model, torch.nn.Module):
            model.train(was_training)
    return math.exp(nll_sum.item() / n_scored)
