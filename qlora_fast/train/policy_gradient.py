"""Policy-gradient pieces of GRPO, usable on their own.

- `sequence_logprobs(hidden, weight, targets)`: per-token log-probabilities of `targets` under
  `softmax(hidden @ weight.T)`, computed a chunk of tokens at a time. The backward recomputes each
  chunk's logits instead of storing them, so peak memory grows with `chunk_size x vocab`, never
  with `batch x length x vocab` (the tensor that makes other GRPO trainers run out of memory).
- `group_advantages(rewards, group_size)`: group-relative advantages (DeepSeekMath, eq. 3 of
  the GRPO section): reward minus its group's mean, divided by the group's std (or the batch's
  std, or not at all as in Dr. GRPO).
- `grpo_loss(...)`: the clipped surrogate on per-token ratios against the sampling policy, plus
  beta times the k3 estimate of KL(policy || reference), aggregated per sequence (GRPO), per token
  over the batch (DAPO) or by a fixed constant (Dr. GRPO); asymmetric clipping (clip-higher).
- `reinforce_loss(...)`: plain REINFORCE with a baseline, for comparison.
- `gae_advantages`, `whiten`, `value_loss`: the critic side of PPO (`qlora_fast.train.ppo`):
  per-token advantages from a learned V(s) by GAE, and the clipped value loss.
"""
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
ADVANTAGE_SCALES = ("group", "batch", "none")


# --------------------------------------------------------------------------------------------
# Chunked per-token log-probabilities
# --------------------------------------------------------------------------------------------
def _compute_dtype(dtype):
    """At least fp32: the logsumexp must not run in bf16/fp16 (vocabulary-sized sums)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(hidden_chunk, weight, bias, temperature):
    """Logits of one chunk in the compute dtype."""
    dt = _compute_dtype(hidden_chunk.dtype)
    logits = hidden_chunk.to(dt) @ weight.to(dt).t()
    if bias is not None:
        logits = logits + bias.to(dt)
    if temperature != 1.0:
        logits = logits / temperature
    return logits


class SequenceLogprobsFunction(torch.autograd.Function):
    """log softmax(h W^T + b)[target] per token; backward recomputes logits chunk by chunk.

    Saved for backward: the inputs plus one logsumexp per token, never the logits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, temperature):
        n = hidden.shape[0]
        dt = _compute_dtype(hidden.dtype)
        out = torch.empty(n, dtype=dt, device=hidden.device)
        lse = torch.empty(n, dtype=dt, device=hidden.device)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            logits = _chunk_logits(hidden[start:stop], weight, bias, temperature)
            lse[start:stop] = torch.logsumexp(logits, dim=-1)
            out[start:stop] = logits.gather(1, targets[start:stop, None]).squeeze(1) - lse[start:stop]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size = chunk_size
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        chunk_size, temperature = ctx.chunk_size, ctx.temperature
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        dt = lse.dtype
        grad_w = torch.zeros(weight.shape, dtype=dt, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=dt, device=bias.device) if need_b else None
        w32 = weight.to(dt)
        n = hidden.shape[0]
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            h32 = hidden[start:stop].to(dt)
            logits = _chunk_logits(hidden[start:stop], weight, bias, temperature)
            # d logp[target] / d logits = onehot(target) - softmax, times the incoming grad,
            # then through the 1/temperature scaling.
            g = grad_out[start:stop].to(dt)
            grad_logits = logits.sub_(lse[start:stop, None]).exp_().mul_(-g[:, None])  # in place: one chunk buffer
            grad_logits.scatter_add_(1, targets[start:stop, None], g[:, None])
            if temperature != 1.0:
                grad_logits.div_(temperature)
            if need_h:
                grad_h[start:stop] = (grad_logits @ w32).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(grad_logits.t(), h32)
            if need_b:
                grad_b.add_(grad_logits.sum(0))
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        if need_b:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None


def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    chunk_size: int = 1024,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probabilities of `targets` under the output layer, a chunk of tokens at a time.

    hidden: (..., H) final hidden states; position i predicts `targets[..., i]`.
    weight: (V, H) output layer (lm_head) weight; bias: optional (V,).
    targets: (...) integer ids in [0, V), same leading shape as `hidden`.
    chunk_size: tokens whose logits exist at once (forward and backward).
    temperature: logits are divided by it (use the sampling temperature so ratios are against the
    distribution that was actually sampled).
    Returns (...) log-probabilities in float32 (float64 for float64 inputs). Gradients flow to hidden,
    weight and bias; the backward recomputes each chunk's logits, so no (tokens x V) tensor is ever stored.
    """
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        raise TypeError("hidden must be a floating-point tensor")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (vocab, {hidden.shape[-1]}), got {tuple(weight.shape)}")
    if targets.dtype not in (torch.int64, torch.int32) or targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets must be an integer tensor of shape {tuple(hidden.shape[:-1])}, "
            f"got {targets.dtype} {tuple(targets.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if targets.numel() and (targets.min() < 0 or targets.max() >= weight.shape[0]):
        raise ValueError(f"targets must be in [0, {weight.shape[0]})")
    lead = targets.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).long()
    out = SequenceLogprobsFunction.apply(flat_hidden, weight, bias, flat_targets, chunk_size, float(temperature))
    return out.reshape(lead)


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------
def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages for rewards laid out as consecutive groups of `group_size`.

    rewards: (N,) with N a multiple of group_size; rows [k*G, (k+1)*G) are one prompt's group.
    scale: "group": (r - group mean) / (group std + eps) (GRPO); "batch": (r - group mean) /
    (std of all N rewards + eps) (batch-level normalisation); "none": r - group mean (Dr. GRPO).
    Std uses Bessel's correction (as torch.std and TRL). Returns float32 (N,).
    """
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2 (a group needs a baseline), got {group_size!r}")
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if rewards.dim() != 1 or rewards.numel() == 0 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be 1-D with a length that is a positive multiple of group_size={group_size}, "
            f"got shape {tuple(rewards.shape)}"
        )
    r = rewards.float()
    if not torch.isfinite(r).all():
        raise ValueError("rewards contain NaN or inf")
    grouped = r.view(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1)
        return centred / (std + eps)
    if scale == "batch":
        return centred / (r.std() + eps)
    return centred


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------
@dataclass
class LossStats:
    """Detached diagnostics of one loss evaluation (masked token means unless noted)."""

    kl: float
    clip_fraction: float  # tokens whose gradient the clip switched off
    ratio_mean: float
    ratio_min: float
    ratio_max: float

    def as_dict(self) -> Dict[str, float]:
        return dict(self.__dict__)


def _check_token_tensors(logprobs, mask, **others):
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be (batch, length), got shape {tuple(logprobs.shape)}")
    if mask.shape != logprobs.shape:
        raise ValueError(f"mask must have shape {tuple(logprobs.shape)}, got {tuple(mask.shape)}")
    for name, t in others.items():
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(f"{name} must have shape {tuple(logprobs.shape)}, got {tuple(t.shape)}")


def _token_advantages(advantages, logprobs):
    if advantages.shape == logprobs.shape[:1]:
        return advantages[:, None].to(logprobs.dtype)
    if advantages.shape == logprobs.shape:
        return advantages.to(logprobs.dtype)
    raise ValueError(
        f"advantages must be (batch,) or (batch, length) = {tuple(logprobs.shape)}, got {tuple(advantages.shape)}"
    )


def _aggregate(per_token, mask, loss_type, max_length, normalizer):
    """Reduce (B, T) per-token losses. `normalizer` replaces the denominator (sequences for
    "grpo", tokens for "dapo", B * max_length for "dr_grpo") so micro-batches of a larger batch
    sum to the loss of the whole batch."""
    masked = per_token * mask
    if loss_type == "grpo":
        per_seq = masked.sum(1) / mask.sum(1).clamp(min=1)
        return per_seq.sum() / (normalizer if normalizer is not None else per_token.shape[0])
    if loss_type == "dapo":
        return masked.sum() / (normalizer if normalizer is not None else mask.sum().clamp(min=1))
    length = max_length if max_length is not None else per_token.shape[1]
    return masked.sum() / (normalizer if normalizer is not None else per_token.shape[0] * length)


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: Optional[float] = None,
    loss_type: str = "grpo",
    max_length: Optional[int] = None,
    normalizer: Optional[Union[int, float, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, LossStats]:
    """The GRPO objective as a loss to minimise, and its diagnostics.

    logprobs: (B, T) per-token log-probs under the policy being trained (carries the gradient).
    old_logprobs: (B, T) under the sampling policy (no gradient). ref_logprobs: (B, T) under the
    reference policy, needed when beta > 0. advantages: (B,) or (B, T). mask: (B, T), 1 on
    completion tokens, 0 on padding.

    Per token: ratio = exp(logprobs - old_logprobs),
      loss_t = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * k3,
      k3 = exp(ref - logprobs) - (ref - logprobs) - 1   (unbiased, always >= 0).
    eps_high defaults to eps_low (symmetric clip); eps_high > eps_low is DAPO's clip-higher.
    loss_type: "grpo" mean over each sequence's tokens, then over sequences; "dapo" mean over
    all tokens of the batch; "dr_grpo" sum over tokens divided by B * max_length (max_length
    defaults to T). normalizer: overrides that denominator (for gradient accumulation).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not eps_low >= 0:
        raise ValueError(f"eps_low must be >= 0, got {eps_low!r}")
    eps_high = eps_low if eps_high is None else eps_high
    if not eps_high >= 0:
        raise ValueError(f"eps_high must be >= 0, got {eps_high!r}")
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta!r}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when beta > 0")
    _check_token_tensors(logprobs, mask, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs)
    adv = _token_advantages(advantages, logprobs)
    mask = mask.to(logprobs.dtype)

    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    kl = None
    if ref_logprobs is not None:
        delta = ref_logprobs.detach() - logprobs
        kl = torch.exp(delta) - delta - 1.0
        if beta > 0:
            per_token = per_token + beta * kl
    loss = _aggregate(per_token, mask, loss_type, max_length, normalizer)

    with torch.no_grad():
        n_tokens = mask.sum().clamp(min=1)
        low = (ratio < 1.0 - eps_low) & (adv < 0)
        high = (ratio > 1.0 + eps_high) & (adv > 0)
        clip_fraction = ((low | high).to(mask.dtype) * mask).sum() / n_tokens
        valid = mask.bool()
        r = ratio[valid] if valid.any() else ratio.new_ones(1)
        stats = LossStats(
            kl=float((kl * mask).sum() / n_tokens) if kl is not None else 0.0,
            clip_fraction=float(clip_fraction),
            ratio_mean=float(r.mean()),
            ratio_min=float(r.min()),
            ratio_max=float(r.max()),
        )
    return loss, stats


def reinforce_loss(
    logprobs: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    baseline: Optional[Union[float, torch.Tensor]] = None,
) -> torch.Tensor:
    """REINFORCE with a baseline: -mean_i (r_i - b_i) * sum_t mask_it * logprobs_it.

    logprobs, mask: (B, T); rewards: (B,). baseline: None uses the batch mean reward, a float a
    constant, a (B,) tensor one baseline per sequence. The baseline is treated as a constant.
    """
    _check_token_tensors(logprobs, mask)
    if rewards.shape != logprobs.shape[:1]:
        raise ValueError(f"rewards must be ({logprobs.shape[0]},), got {tuple(rewards.shape)}")
    r = rewards.to(logprobs.dtype).detach()
    if not torch.isfinite(r).all():
        raise ValueError("rewards contain NaN or inf")
    if baseline is None:
        b = r.mean()
    elif isinstance(baseline, torch.Tensor):
        if baseline.shape not in ((), r.shape):
            raise ValueError(f"baseline must be a scalar or ({r.shape[0]},), got {tuple(baseline.shape)}")
        b = baseline.to(r.dtype).detach()
    else:
        b = float(baseline)
    seq_logprob = (logprobs * mask.to(logprobs.dtype)).sum(1)
    return -((r - b) * seq_logprob).mean()


# --------------------------------------------------------------------------------------------
# PPO with a critic: GAE and the clipped value loss
# --------------------------------------------------------------------------------------------
def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token advantages by generalised advantage estimation, and the value targets.

    rewards: (B,) one reward per sequence, received after its last real token. values: (B, T)
    V(s_t), the critic's estimate before token t is emitted. mask: (B, T), 1 on real tokens;
    each row's real tokens must come first (a prefix). With r_t = reward on the last real token
    and 0 before it, and V = 0 after the end:
      delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},
    returns R_t = A_t + V_t. Both (B, T) in the values' dtype, 0 on padding, no gradient.
    """
    _check_token_tensors(values, mask)
    if rewards.shape != values.shape[:1]:
        raise ValueError(f"rewards must be ({values.shape[0]},), got {tuple(rewards.shape)}")
    if not (0 <= gamma <= 1 and 0 <= lam <= 1):
        raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma!r}, lam={lam!r}")
    m = mask.to(values.dtype)
    v = values.detach() * m
    length = m.sum(1).long()
    token_reward = torch.zeros_like(v)
    has = length > 0
    token_reward[has, length[has] - 1] = rewards[has].to(v.dtype)
    next_v = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], 1)  # masked: 0 after the end
    delta = (token_reward + gamma * next_v - v) * m
    adv = torch.zeros_like(v)
    running = torch.zeros_like(v[:, 0])
    for t in range(v.shape[1] - 1, -1, -1):
        running = delta[:, t] + gamma * lam * running * m[:, t]
        adv[:, t] = running
    adv = adv * m
    return adv, (adv + v) * m


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (PPO's advantage normalisation); 0 on padding."""
    m = mask.to(x.dtype)
    n = m.sum().clamp(min=1)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / (n - 1).clamp(min=1)
    return (x - mean) / (var.sqrt() + eps) * m


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: Optional[float] = 0.2
) -> torch.Tensor:
    """Per-token clipped value loss (PPO2): 0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2);
    without clip (None) 0.5 (V - R)^2. Aggregate it with the policy loss's mask and normaliser."""
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * unclipped
    if not clip >= 0:
        raise ValueError(f"clip must be >= 0 or None, got {clip!r}")
    clipped = (old_values + torch.clamp(values - old_values, -clip, clip) - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped)
