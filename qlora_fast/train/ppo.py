"""PPO with a critic on the QLoRA stack: the value-based counterpart of GRPO.

GRPO's baseline is the mean reward of a group of samples of the same prompt. PPO learns one
instead: a small value head V(s_t) on the policy's own final hidden states (the same 4-bit base
and adapters; the head is the only extra trainable tensor), and per-token advantages come from
generalised advantage estimation (GAE, gamma / lambda) over the critic's estimates. Everything
else is GRPO's: the same sampling, rewards, clipped surrogate, k3 KL to the reference (the
adapters switched off), aggregation and optimizer. The loss adds vf_coef times the clipped value
loss, aggregated like the policy loss.
"""
import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from qlora_fast.optim.registry import make_optimizer

from .core import renamed_fields
from .grpo import GRPOConfig, GRPOTrainer, _output_layer, completion_hidden
from .policy_gradient import _aggregate, gae_advantages, grpo_loss, sequence_logprobs, value_loss, whiten
from .schedule import warmup_cosine_schedule


@renamed_fields()  # GRPOConfig's deprecated names (dataclass writes PPOConfig a new __init__)
@dataclass
class PPOConfig(GRPOConfig):
    """GRPOConfig plus the critic's settings. group_size may be 1 here (the critic is the
    baseline); advantage_scale is unused (advantages are whitened over the batch's tokens when
    whiten_advantages). gamma / lam: GAE discount and trace decay. vf_coef: weight of the value
    loss. value_clip: clip range of the value update around the sampling-time values (None: no
    clip). value_lr: learning rate of the value head (default: lr)."""

    group_size: int = 1
    prompts_per_step: int = 32
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.1
    value_clip: Optional[float] = 0.2
    value_lr: Optional[float] = None
    whiten_advantages: bool = True
    _min_group_size = 1

    def __post_init__(self):
        super().__post_init__()
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"PPOConfig.gamma and lam must be in [0, 1], got {self.gamma!r}, {self.lam!r}")
        if not self.vf_coef >= 0:
            raise ValueError(f"PPOConfig.vf_coef must be >= 0, got {self.vf_coef!r}")
        if self.value_clip is not None and not self.value_clip >= 0:
            raise ValueError(f"PPOConfig.value_clip must be >= 0 or None, got {self.value_clip!r}")
        if self.value_lr is not None and not self.value_lr > 0:
            raise ValueError(f"PPOConfig.value_lr must be > 0 or None, got {self.value_lr!r}")
        if self.drop_zero_variance_groups and self.group_size < 2:
            raise ValueError("PPOConfig.drop_zero_variance_groups needs group_size >= 2")


class PPOTrainer(GRPOTrainer):
    """PPO: `GRPOTrainer`'s loop with GAE advantages from a learned value head.

    Same arguments as `GRPOTrainer` (config a `PPOConfig`). The model must split as backbone +
    plain `nn.Linear` lm_head (the built-in model, transformers causal LMs, a LoRA `PeftModel`):
    the value head reads the backbone's final hidden states. `self.value_head` is an
    `nn.Linear(hidden, 1)` starting at zero; it trains with the adapters (its own learning rate
    value_lr) and is saved in checkpoints, not in the adapter.
    """

    def __init__(self, model, tokenizer, reward_funcs, train_dataset, config: Optional[PPOConfig] = None,
                 optimizer: Optional[torch.optim.Optimizer] = None):
        config = config or PPOConfig()
        if not isinstance(config, PPOConfig):
            raise TypeError(f"config must be a PPOConfig, got {type(config).__name__}")
        split = _output_layer(model)
        if split is None:
            raise ValueError(
                "PPOTrainer needs a model that splits as backbone + nn.Linear lm_head whose output is the logits "
                "as they are (for the value head; not Gemma 2/3's softcapping, Cohere's or Granite's logit scales)"
            )
        super().__init__(model, tokenizer, reward_funcs, train_dataset, config, optimizer=optimizer)
        self.value_head = nn.Linear(split[1].shape[1], 1).to(self.device)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        head = list(self.value_head.parameters())
        group = {"params": head, "lr": config.value_lr or config.lr}
        if optimizer is None:
            self.optimizer = make_optimizer(config.optimizer, self.params, config.lr, config.weight_decay)
        self.optimizer.add_param_group(group)
        self.scheduler = warmup_cosine_schedule(self.optimizer, config.warmup_steps, config.max_steps, min_ratio=1.0)
        self.params = self.params + head  # gradient checks and clipping cover the critic too

    def _values(self, hidden):
        return self.value_head(hidden.float()).squeeze(-1)

    @torch.no_grad()
    def _prepare(self, batch: dict) -> None:
        """Sampling-time values, then GAE advantages (whitened) and value targets per token."""
        c = self.config
        hidden = completion_hidden(self.model, batch["input_ids"], batch["attention"], batch["n_new"])
        old_values = self._values(hidden) * batch["mask"]
        advantages, returns = gae_advantages(batch["rewards"], old_values, batch["mask"], c.gamma, c.lam)
        if c.whiten_advantages:
            advantages = whiten(advantages, batch["mask"])
        batch.update(advantages=advantages, returns=returns, old_values=old_values)

    def _micro_loss(self, batch: dict, sl: slice, normalizer):
        c = self.config
        _, weight, bias = _output_layer(self.model)
        ids = batch["input_ids"][sl]
        hidden = completion_hidden(self.model, ids, batch["attention"][sl], batch["n_new"])
        lp = sequence_logprobs(hidden, weight, ids[:, -batch["n_new"]:], bias=bias, chunk_size=c.logprob_chunk_size,
                               temperature=c.temperature)
        old, ref, mask = batch["old"], batch["ref"], batch["mask"][sl]
        policy, stats = grpo_loss(
            lp, lp.detach() if old is None else old[sl], batch["advantages"][sl], mask,
            ref_logprobs=None if ref is None else ref[sl], beta=c.beta, eps_low=c.eps_low, eps_high=c.eps_high,
            loss_type=c.loss_type, max_length=c.max_new_tokens, normalizer=normalizer,
        )
        per_token = value_loss(self._values(hidden), batch["old_values"][sl], batch["returns"][sl], c.value_clip)
        critic = _aggregate(per_token, mask, c.loss_type, c.max_new_tokens, normalizer)
        self._value_loss_sum = getattr(self, "_value_loss_sum", 0.0) + float(critic.detach())
        return policy + c.vf_coef * critic, stats

    def train_step(self):
        self._value_loss_sum = 0.0
        log = super().train_step()
        log["value_loss"] = self._value_loss_sum / self.config.num_iterations
        return log

    def _extra_state(self) -> dict:
        return {"value_head": {k: v.detach().cpu() for k, v in self.value_head.state_dict().items()}}

    def _check_extra_state(self, extra: dict, path: str) -> None:
        super()._check_extra_state(extra, path)
        if "value_head" not in extra:
            raise ValueError(f"checkpoint {path} has no value head: it was not written by PPOTrainer")
        try:  # into a copy: nothing is restored until every part of the checkpoint fits
            copy.deepcopy(self.value_head).load_state_dict(extra["value_head"])
        except (RuntimeError, TypeError, AttributeError) as e:
            raise ValueError(f"checkpoint {path}: its value head does not fit this one: {e}") from None

    def _load_extra_state(self, extra: dict) -> None:
        self.value_head.load_state_dict(extra["value_head"])
