"""GRPO (Group Relative Policy Optimization, DeepSeekMath) on the QLoRA stack.

One step: take `prompts_per_step` prompts, sample `group_size` completions for each with the
KV-cache `generate()` (temperature / top-k / top-p), score them with the weighted reward
functions, turn rewards into group-relative advantages, then run `num_iterations` optimisation
passes over the batch with the clipped surrogate (`grpo_loss`), split into
`gradient_accumulation_steps` micro-batches. The KL penalty's reference policy is the same model
with its adapters disabled, so there is never a second copy of the weights; with beta = 0 the
reference pass is skipped.

Per-token log-probabilities go through `sequence_logprobs`: hidden states through the output
layer a chunk of tokens at a time, recomputed in backward, so no batch x length x vocabulary
logits tensor ever exists.

Field names, resume, NaN guards, clipping, the optimizer and checkpoints are the trainer core's
(`train/core.py`), shared with SFT.

FSDP2 (a model sharded with `qlora_fast.distributed.shard_qlora_model`, under torchrun): each rank
takes its share of every step's prompts (prompts_per_step must divide by the world size) and
samples them with its own generator, with the model unsharded for the generation (so ranks may
stop at different lengths without a collective); groups left out of the loss are masked rather
than removed, so every rank runs the same forward/backward passes; the loss normalizer is the
global one, and FSDP2 averages the gradients, so a step equals single-process GRPO on the
union of the ranks' samples. Log-probs use the full-logits path (the chunked head would bypass
the root module's all-gather). Logged reward, reward_std, completion_length and loss are global;
kl, clip and ratio statistics are rank 0's. Checkpoints (checkpoint_every) and PPO are not supported.
"""
import math
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from qlora_fast.models.generate import left_pad
from qlora_fast.utils import atomic_write_bytes, check_finite_state, check_number, check_writable_dir

from . import checkpoint, core
from .policy_gradient import ADVANTAGE_SCALES, LOSS_TYPES, group_advantages, grpo_loss, sequence_logprobs

RewardFunction = Callable[..., List[float]]
_FSDP_CHECKPOINT = ("GRPOTrainer checkpoints of an FSDP2-sharded model are not supported (save_adapter is): "
                    "sharded adapters and optimizer: qlora_fast.distributed.save_adapter_checkpoint")


@core.renamed_fields(steps="max_steps", grad_accum_steps="gradient_accumulation_steps", save_every="checkpoint_every")
@dataclass
class GRPOConfig:
    """Everything a GRPO run needs besides the model, tokenizer, rewards and data.

    max_steps optimisation steps (each samples a fresh batch). The names shared with SFTConfig
    follow HF/TRL (see `qlora_fast.train.core`); `steps`, `grad_accum_steps` and `save_every` are
    the deprecated names of max_steps, gradient_accumulation_steps and checkpoint_every.

    group_size (G) completions per prompt, at least 2 (the group mean is the baseline).
    prompts_per_step prompts per optimisation step, so a step samples prompts_per_step * G
    sequences; gradient_accumulation_steps splits those into micro-batches (must divide the count).
    temperature / top_k / top_p: sampling; log-probs use softmax(logits / temperature), so the
    ratios ignore the top-k / top-p truncation (as TRL does). num_iterations: optimisation passes
    over each sampled batch (PPO-style; the clip matters from the second pass on; the sampling
    policy's log-probs come from an eval-mode pass, so LoRA dropout makes ratios differ from 1).
    beta: weight of the k3 KL to the reference (0 skips the reference pass). eps_low / eps_high:
    clip range (eps_high > eps_low is clip-higher). loss_type: "grpo" | "dapo" | "dr_grpo".
    advantage_scale: "group" | "batch" | "none".
    optimizer: a name in `qlora_fast.optim.registry.OPTIMIZERS`: "paged_adamw_8bit" (8-bit states
    paged to host memory: the QLoRA recipe), "paged_adamw", "adamw_8bit", "adamw", or "torch_adamw".
    reward_weights: one per reward function (default all 1).
    drop_zero_variance_groups: leave out of the loss the groups whose rewards are all equal
    (their advantages are all zero, so they only dilute the mean; DAPO's dynamic-sampling filter
    without the resampling). The log's "zero_variance_fraction" counts them either way.
    eval_every: with an eval_dataset given to `train`, evaluate greedily every that many steps
    (and at the start and the end); 0 never.
    """

    max_steps: int = 50
    group_size: int = 8
    prompts_per_step: int = 4
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    stop_token_ids: Optional[Sequence[int]] = None
    add_bos: bool = True
    num_iterations: int = 1
    beta: float = 0.04
    eps_low: float = 0.2
    eps_high: Optional[float] = None
    loss_type: str = "grpo"
    advantage_scale: str = "group"
    reward_weights: Optional[Sequence[float]] = None
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: Optional[float] = 1.0
    optimizer: str = "paged_adamw_8bit"
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    logprob_chunk_size: int = 1024
    drop_zero_variance_groups: bool = False
    eval_every: int = 0
    seed: int = 0
    output_dir: Optional[str] = None
    _min_group_size = 2  # a class attribute, not a field: PPO's critic needs no group
    checkpoint_every: int = 0
    progress: bool = True

    def __post_init__(self):
        def positive_int(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GRPOConfig.{name} must be a positive int, got {value!r}")

        core.check_training_fields(self)
        for name in ("prompts_per_step", "max_new_tokens", "num_iterations", "logprob_chunk_size"):
            positive_int(name)
        if not isinstance(self.group_size, int) or self.group_size < self._min_group_size:
            raise ValueError(f"{type(self).__name__}.group_size must be an int >= {self._min_group_size} "
                             f"(the group mean is the baseline), got {self.group_size!r}")
        if (self.prompts_per_step * self.group_size) % self.gradient_accumulation_steps:
            raise ValueError(
                f"GRPOConfig.gradient_accumulation_steps ({self.gradient_accumulation_steps}) must divide "
                f"prompts_per_step * group_size ({self.prompts_per_step * self.group_size})"
            )
        if not self.temperature > 0:
            raise ValueError(f"GRPOConfig.temperature must be > 0 (GRPO samples), got {self.temperature!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"GRPOConfig.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.advantage_scale not in ADVANTAGE_SCALES:
            raise ValueError(
                f"GRPOConfig.advantage_scale must be one of {ADVANTAGE_SCALES}, got {self.advantage_scale!r}"
            )
        for name in ("beta", "eps_low"):  # finite: NaN/inf would give a NaN adapter
            check_number("GRPOConfig", name, getattr(self, name), minimum=0)
        check_number("GRPOConfig", "eps_high", self.eps_high, minimum=0, optional=True)
        check_number("GRPOConfig", "temperature", self.temperature)
        check_number("GRPOConfig", "top_p", self.top_p, minimum=0, exclusive_minimum=True, maximum=1, optional=True)
        check_number("GRPOConfig", "top_k", self.top_k, integer=True, minimum=1, optional=True)
        for i, w in enumerate(self.reward_weights or ()):
            check_number("GRPOConfig", f"reward_weights[{i}]", w)


# ------------------------------------------------------------------------------------------
# Model plumbing
# ------------------------------------------------------------------------------------------
# Config fields of Hugging Face models that change the logits after the head (Gemma 2/3's
# final_logit_softcapping, Cohere's logit_scale, Granite's logits_scaling): for such a model the
# chunked path (lm_head over the hidden states) would score another distribution than the one
# sampled, so it takes the full-logits path.
def _transforms_logits_after_head(config) -> bool:
    if getattr(config, "final_logit_softcapping", None) is not None:
        return True
    return any(getattr(config, name, None) not in (None, 1.0) for name in ("logit_scale", "logits_scaling"))


def _output_layer(model):
    """(backbone, lm_head weight, bias) when the model's logits are a plain linear head over its
    backbone's output, so log-probs can be chunked; None otherwise (then full logits are used:
    also under FSDP2, whose root module gathers the embedding and head only in its own forward)."""
    from torch.distributed.fsdp import FSDPModule

    from qlora_fast.models.llama import LlamaForCausalLM
    from qlora_fast.peft.model import PeftModel

    if isinstance(model, FSDPModule):
        return None
    if isinstance(model, PeftModel) and model.prompt_encoder is None:
        # A PeftModel with LoRA: its forward is exactly its base model's (the adapters live inside).
        model = model.base_model
    if not isinstance(model, LlamaForCausalLM) and _transforms_logits_after_head(getattr(model, "config", None)):
        return None
    head = getattr(model, "lm_head", None)
    backbone = getattr(model, "model", None)
    if type(head) is nn.Linear and isinstance(backbone, nn.Module):
        return backbone, head.weight, head.bias
    return None


def completion_logprobs(model, input_ids, attention_mask, n_completion, temperature=1.0, chunk_size=1024):
    """Per-token log-probs (B, n_completion) of the last `n_completion` tokens of `input_ids`
    under softmax(logits / temperature), with the chunked output layer when the model allows."""
    from qlora_fast.models import positions_from_mask

    split = _output_layer(model)
    prompt_len = input_ids.shape[1] - n_completion
    targets = input_ids[:, prompt_len:]
    if split is not None:
        hidden = completion_hidden(model, input_ids, attention_mask, n_completion)
        return sequence_logprobs(
            hidden, split[1], targets, bias=split[2], chunk_size=chunk_size, temperature=temperature
        )
    # Positions count real tokens only, as generate() numbered them (left-padded prompts start at
    # 0); transformers models would otherwise number the padding too.
    positions = positions_from_mask(attention_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits
    logits = logits[:, prompt_len - 1 : -1].float()
    return torch.log_softmax(logits / temperature, -1).gather(-1, targets[..., None]).squeeze(-1)


def completion_hidden(model, input_ids, attention_mask, n_completion):
    """Final hidden states (B, n_completion, H) at the positions that predict the last
    `n_completion` tokens (position t-1 for token t), for a model that splits as backbone +
    plain linear head (ValueError otherwise)."""
    from qlora_fast.models import positions_from_mask

    split = _output_layer(model)
    if split is None:
        raise ValueError("the model does not split into a backbone and a plain nn.Linear lm_head")
    prompt_len = input_ids.shape[1] - n_completion
    out = split[0](input_ids=input_ids, attention_mask=attention_mask, position_ids=positions_from_mask(attention_mask))
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0] if isinstance(out, (tuple, list)) else out
    return hidden[:, prompt_len - 1 : -1]


def reference_context(model):
    """Context in which `model` is the reference policy: its adapters disabled."""
    if hasattr(model, "disable_adapter") and callable(model.disable_adapter):
        return model.disable_adapter()
    from qlora_fast.nn import disable_adapter

    return disable_adapter(model)


# ------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------
class GRPOTrainer(core.TrainerCore):
    """GRPO on a model whose trainable parameters are its adapters (LoRA / QLoRA).

    model: a causal LM (the built-in `LlamaForCausalLM`, a PEFT-wrapped or transformers one)
    with adapters; only parameters with requires_grad are trained and checkpointed.
    tokenizer: the `qlora_fast.tokenizer.Tokenizer` interface. reward_funcs: one function or a
    list (see `qlora_fast.train.rewards` for the signature). train_dataset: non-empty sequence
    of dicts with a non-empty "prompt" str; their other fields go to the reward functions.
    optimizer: optional, else built from config.optimizer.
    """

    kind = "GRPO"
    resumable_changes = core.RESUMABLE_CHANGES + ("logprob_chunk_size",)

    def __init__(self, model, tokenizer, reward_funcs, train_dataset, config: Optional[GRPOConfig] = None,
                 optimizer: Optional[torch.optim.Optimizer] = None):
        self.config = config or GRPOConfig()
        if not isinstance(self.config, GRPOConfig):
            raise TypeError(f"config must be a GRPOConfig, got {type(self.config).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.reward_funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not self.reward_funcs or not all(callable(f) for f in self.reward_funcs):
            raise TypeError("reward_funcs must be a callable or a non-empty list of callables")
        weights = self.config.reward_weights
        self.reward_weights = [1.0] * len(self.reward_funcs) if weights is None else [float(w) for w in weights]
        if len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} entries for {len(self.reward_funcs)} reward functions"
            )
        self.dataset = self._check_dataset(train_dataset)
        if self.config.output_dir:  # fail now, not at the first checkpoint
            check_writable_dir(self.config.output_dir, "GRPOConfig.output_dir")
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model has no trainable parameters: add adapters (LoRA / QLoRA) first")
        self.device = self.params[0].device
        from torch.distributed.fsdp import FSDPModule

        self._fsdp = isinstance(model, FSDPModule)  # ranks split each step's prompts (module docstring)
        self.rank, self.world = 0, 1
        if self._fsdp:
            self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        # Linear warmup, then constant (a cosine that ends where it starts).
        self._setup_optimizer(optimizer, min_lr_ratio=1.0)
        if self._fsdp:
            self._check_fsdp()
        if self.config.gradient_checkpointing:
            if not hasattr(model, "gradient_checkpointing_enable"):
                raise ValueError("gradient_checkpointing=True but the model has no gradient_checkpointing_enable()")
            model.gradient_checkpointing_enable()
        # every rank samples its own prompts: its own stream (rank 0's is the single-process one)
        self.sample_generator = torch.Generator(device=self.device).manual_seed(self.config.seed + 7919 * self.rank)
        self.step = 0
        self.epoch = 0
        self.position = 0  # next index into this epoch's prompt order
        self._epoch_order = (-1, [])
        self.history: List[Dict[str, float]] = []
        self.eval_history: List = []
        self.skipped_nan_groups = 0  # groups left out because a reward was NaN / inf
        stops = set(self.config.stop_token_ids or ())
        stops.add(int(tokenizer.eos_id))
        self.stop_ids = torch.tensor(sorted(stops), dtype=torch.long, device=self.device)

    def _check_fsdp(self) -> None:
        from qlora_fast.distributed import check_optimizer_params

        check_optimizer_params(self.model, self.optimizer)
        c = self.config
        if c.prompts_per_step % self.world:
            raise ValueError(f"GRPOConfig.prompts_per_step ({c.prompts_per_step}) must be a multiple of the world size "
                             f"({self.world}) under FSDP2: each rank samples an equal share of every step's prompts")
        if c.checkpoint_every:
            raise NotImplementedError("GRPOTrainer checkpoints (checkpoint_every) of an FSDP2-sharded model are not "
                                      "supported: set checkpoint_every=0 (sharded adapters and optimizer: "
                                      "qlora_fast.distributed.save_adapter_checkpoint)")
        if type(self)._prepare is not GRPOTrainer._prepare:
            raise NotImplementedError(f"{type(self).__name__} does not run on an FSDP2-sharded model "
                                      "(GRPOTrainer does)")

    def _global(self, value: float, op: str = "mean") -> float:
        """`value` summed or averaged over the ranks (itself without FSDP2)."""
        if not self._fsdp:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t) / (self.world if op == "mean" else 1)

    # --- data ---------------------------------------------------------------------------
    @staticmethod
    def _check_dataset(dataset):
        if dataset is None or len(dataset) == 0:
            raise ValueError("train_dataset is empty: need at least one prompt")
        for i, row in enumerate(dataset):
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"train_dataset[{i}] must be a dict with a 'prompt' str")
            if not row["prompt"].strip():
                raise ValueError(f"train_dataset[{i}] has an empty prompt")
        return list(dataset)

    def _order(self, epoch):
        if self._epoch_order[0] != epoch:  # one permutation per epoch, not one per step
            g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            self._epoch_order = (epoch, torch.randperm(len(self.dataset), generator=g).tolist())
        return self._epoch_order[1]

    def _next_rows(self):
        rows = []
        while len(rows) < self.config.prompts_per_step:
            order = self._order(self.epoch)
            take = order[self.position : self.position + self.config.prompts_per_step - len(rows)]
            rows += [self.dataset[i] for i in take]
            self.position += len(take)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return rows

    def encode_prompts(self, prompts: Sequence[str]):
        """Left-padded (ids, attention mask) of the prompts."""
        encoded = [self.tokenizer.encode(p, add_bos=self.config.add_bos) for p in prompts]
        if any(len(e) == 0 for e in encoded):
            raise ValueError("a prompt encodes to no tokens")
        ids, mask = left_pad(encoded, self.tokenizer.pad_id)
        return ids.to(self.device), mask.to(self.device)

    # --- sampling and rewards ------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: Sequence[str], n: int, greedy: bool = False):
        """Each prompt `n` times (rows grouped by prompt): (prompt ids, prompt mask, completion
        ids, completion mask, completion texts, stopped flags). The mask covers tokens up to and
        including the first stop token; stopped[i] says row i emitted one."""
        from qlora_fast.distributed.fsdp import unsharded
        from qlora_fast.models.generate import generate

        ids, mask = self.encode_prompts(prompts)
        ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
        c = self.config
        with unsharded(self.model):  # FSDP2: gathered once, no collective per token
            out = generate(
                self.model, ids, attention_mask=mask, max_new_tokens=c.max_new_tokens,
                temperature=0.0 if greedy else c.temperature, top_k=None if greedy else c.top_k,
                top_p=None if greedy else c.top_p, stop_token_ids=self.stop_ids.tolist(),
                pad_token_id=self.tokenizer.pad_id, generator=None if greedy else self.sample_generator,
            )
        completion = out[:, ids.shape[1]:]
        is_stop = torch.isin(completion, self.stop_ids)
        after_stop = (is_stop.long().cumsum(1) - is_stop.long()) > 0
        completion_mask = (~after_stop).long()
        texts = [
            self.tokenizer.decode(
                [t for t, keep, stop in zip(row.tolist(), m.tolist(), s.tolist()) if keep and not stop]
            )
            for row, m, s in zip(completion, completion_mask, is_stop)
        ]
        stopped = is_stop.any(1).tolist()
        return ids, mask, completion, completion_mask, texts, stopped

    def score(self, rows: Sequence[dict], completions: List[str], n: int, stopped: Optional[List[bool]] = None,
              allow_nan: bool = False):
        """(total weighted rewards (len(completions),), {function name: mean reward}). Reward
        functions get the rows' fields and, when given, `stopped` (completion ended with a stop token).
        A function that raises, returns non-numbers or the wrong count raises an error naming it; a
        NaN / inf reward raises ValueError unless `allow_nan` (then the total is NaN there and the
        means skip it)."""
        prompts = [r["prompt"] for r in rows for _ in range(n)]
        fields = {k: [r.get(k) for r in rows for _ in range(n)] for k in rows[0] if k != "prompt"}
        if stopped is not None:
            fields["stopped"] = list(stopped)
        total = torch.zeros(len(completions), dtype=torch.float32)
        means = {}
        for fn, weight in zip(self.reward_funcs, self.reward_weights):
            name = getattr(fn, "__name__", type(fn).__name__)
            try:
                values = fn(prompts, completions, **fields)
            except Exception as e:
                raise RuntimeError(f"reward function {name} raised {type(e).__name__}: {e}") from e
            try:
                values = torch.tensor([float(v) for v in values], dtype=torch.float32)
            except (TypeError, ValueError) as e:
                raise ValueError(f"reward function {name} must return floats, got {values!r:.200}") from e
            if values.numel() != len(completions):
                raise ValueError(
                    f"reward function {name} returned {values.numel()} rewards for {len(completions)} completions"
                )
            finite = torch.isfinite(values)
            if not finite.all() and not allow_nan:
                bad = int((~finite).nonzero()[0])
                raise ValueError(
                    f"reward function {name} returned {values[bad].item()} for completion {bad} ({completions[bad]!r})"
                )
            total += weight * torch.where(finite, values, torch.full_like(values, math.nan))
            means[name] = float(values[finite].mean()) if finite.any() else math.nan
        return total, means

    # --- one step -----------------------------------------------------------------------
    def _normalizer(self, completion_mask):
        c = self.config
        if c.loss_type == "grpo":
            return completion_mask.shape[0]
        if c.loss_type == "dapo":
            return completion_mask.sum().clamp(min=1).float()
        return completion_mask.shape[0] * c.max_new_tokens

    def _prepare(self, batch: dict) -> None:
        """Hook run once per step after the sampling / reference log-probs, in eval mode without
        gradients (the PPO trainer computes values and GAE advantages here). GRPO: nothing."""

    def _micro_loss(self, batch: dict, sl: slice, normalizer):
        """(loss, LossStats) of the rows `sl` of the step's batch."""
        c = self.config
        lp = completion_logprobs(self.model, batch["input_ids"][sl], batch["attention"][sl], batch["n_new"],
                                 c.temperature, c.logprob_chunk_size)
        old, ref = batch["old"], batch["ref"]
        return grpo_loss(
            lp, lp.detach() if old is None else old[sl], batch["advantages"][sl], batch["mask"][sl],
            ref_logprobs=None if ref is None else ref[sl], beta=c.beta, eps_low=c.eps_low,
            eps_high=c.eps_high, loss_type=c.loss_type, max_length=c.max_new_tokens, normalizer=normalizer,
        )

    def train_step(self) -> Dict[str, float]:
        """Sample, score and optimise once; returns the step's log."""
        c = self.config
        start = time.perf_counter()
        rows = self._next_rows()[self.rank::self.world]  # FSDP2: this rank's share of the step's prompts
        prompt_ids, prompt_mask, completion, completion_mask, texts, stopped = self.sample(
            [r["prompt"] for r in rows], c.group_size
        )
        rewards, reward_means = self.score(rows, texts, c.group_size, stopped, allow_nan=True)
        length = float(completion_mask.sum(1).float().mean())  # of every sample, kept or not
        grouped = rewards.view(-1, c.group_size)
        nan_groups = ~torch.isfinite(grouped).all(1)
        if nan_groups.any():
            self.skipped_nan_groups += int(nan_groups.sum())
            warnings.warn(f"GRPO step {self.step + 1}: {int(nan_groups.sum())} group(s) with a NaN / inf reward "
                          f"left out of the loss ({self.skipped_nan_groups} so far)", RuntimeWarning, stacklevel=2)
        zero_var = (grouped.max(1).values == grouped.min(1).values) & ~nan_groups & (c.group_size > 1)
        keep_groups = ~nan_groups & ~zero_var if c.drop_zero_variance_groups else ~nan_groups
        keep = keep_groups.repeat_interleave(c.group_size).to(self.device)
        advantages = torch.zeros(rewards.shape, device=self.device)
        if keep_groups.any() and c.group_size > 1:  # (group_size 1 only under PPO, whose critic sets them)
            advantages[keep] = group_advantages(rewards[keep.cpu()], c.group_size, scale=c.advantage_scale).to(
                self.device
            )

        # FSDP2: every rank keeps all its rows (same passes on every rank) and masks the left-out ones
        rows_kept = torch.ones_like(keep) if self._fsdp else keep
        input_ids = torch.cat([prompt_ids, completion], 1)[rows_kept]
        attention = torch.cat([prompt_mask, completion_mask], 1)[rows_kept]
        completion_mask, advantages = completion_mask[rows_kept], advantages[rows_kept]
        n_new = completion.shape[1]
        mask = completion_mask.float() * keep[:, None] if self._fsdp else completion_mask.float()
        if self._fsdp:  # the log's reward statistics over every rank's samples
            gathered = [torch.empty_like(rewards) for _ in range(self.world)]
            torch.distributed.all_gather(gathered, rewards)
            rewards_all = torch.cat(gathered)
        else:
            rewards_all = rewards
        finite_rewards = rewards_all[torch.isfinite(rewards_all)]
        log = {
            "reward": float(finite_rewards.mean()) if finite_rewards.numel() else math.nan,
            "reward_std": float(finite_rewards.std()) if finite_rewards.numel() > 1 else 0.0,
            **{f"reward/{k}": v for k, v in reward_means.items()},
            "completion_length": self._global(length),
            "zero_variance_fraction": self._global(float(zero_var.float().mean())),
            "skipped_groups": int(self._global(int((~keep_groups).sum()), "sum")),
        }
        if not self._global(float(keep.any()), "sum"):  # nothing carries signal anywhere: no update, the step advances
            self.scheduler.step()
            self.step += 1
            log.update(step=self.step, kl=math.nan, clip_fraction=0.0, ratio_min=1.0, ratio_max=1.0, loss=0.0,
                       grad_norm=0.0, lr=self.scheduler.get_last_lr()[0], time=time.perf_counter() - start)
            self.history.append(log)
            return log
        logprob = lambda ids, att: completion_logprobs(self.model, ids, att, n_new, c.temperature, c.logprob_chunk_size)  # noqa: E731

        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            old = logprob(input_ids, attention) if c.num_iterations > 1 else None
            ref = None
            if c.beta > 0:
                with reference_context(self.model):
                    ref = logprob(input_ids, attention)
            batch = {"input_ids": input_ids, "attention": attention, "mask": mask, "advantages": advantages,
                     "rewards": rewards[rows_kept.cpu()].to(self.device), "old": old, "ref": ref, "n_new": n_new}
            self._prepare(batch)
        self.model.train()

        normalizer = self._normalizer(completion_mask)
        if self._fsdp:  # the global batch's normalizer; FSDP2 averages the gradients over the ranks
            normalizer = self._global(float(self._normalizer(completion_mask[keep])), "sum") / self.world
        micro = -(-input_ids.shape[0] // c.gradient_accumulation_steps)  # dropped groups can leave an uneven split
        stats_sum = {"kl": 0.0, "clip_fraction": 0.0}
        ratio_min, ratio_max = math.inf, -math.inf
        n_stats, loss_total, grad_norm = 0, 0.0, 0.0
        try:
            for _ in range(c.num_iterations):
                self.optimizer.zero_grad(set_to_none=True)
                loss_iter = 0.0
                for s in range(0, input_ids.shape[0], micro):
                    sl = slice(s, s + micro)
                    loss, stats = self._micro_loss(batch, sl, normalizer)
                    self._check_loss(loss)
                    loss.backward()
                    loss_iter += float(loss.detach())
                    stats_sum["kl"] += stats.kl
                    stats_sum["clip_fraction"] += stats.clip_fraction
                    ratio_min, ratio_max = min(ratio_min, stats.ratio_min), max(ratio_max, stats.ratio_max)
                    n_stats += 1
                grad_norm = self._optimizer_step()
                loss_total = self._global(loss_iter, "sum") / self.world if self._fsdp else loss_iter
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.model.train(was_training)
        lr = self.scheduler.get_last_lr()[0]  # the lr this update used (step() moves to the next one)
        self.scheduler.step()
        self.step += 1
        log.update({
            "step": self.step,
            "kl": stats_sum["kl"] / n_stats,
            "clip_fraction": stats_sum["clip_fraction"] / n_stats,
            "ratio_min": ratio_min,
            "ratio_max": ratio_max,
            "loss": loss_total,
            "grad_norm": grad_norm,
            "lr": lr,
            "time": time.perf_counter() - start,
        })
        self.history.append(log)
        return log

    # --- the loop -----------------------------------------------------------------------
    def train(self, resume_from_checkpoint: Optional[str] = None, allow_fresh: bool = False,
              eval_dataset: Optional[Sequence[dict]] = None) -> List[Dict[str, float]]:
        """Run until config.max_steps; returns the per-step logs. `resume_from_checkpoint`: a
        checkpoint file, or "latest" for the newest in config.output_dir (none there:
        FileNotFoundError unless `allow_fresh`, as in the SFT trainer: `qlora_fast.train.core`). A
        non-finite loss or gradient raises FloatingPointError before the optimizer step. With `eval_dataset` and
        config.eval_every, `evaluate` runs every eval_every steps and at the last step, its results
        added to that step's log as "eval/<key>"; `self.eval_history` gets (step, results), step 0
        included (a resumed run continues the checkpoint's: the same as an uninterrupted run's)."""
        resumed = self._resume(resume_from_checkpoint, allow_fresh)
        c = self.config
        evaluating = eval_dataset is not None and c.eval_every > 0
        if evaluating:
            eval_dataset = self._check_dataset(eval_dataset)
            if not (resumed and self.eval_history):  # fresh (or a checkpoint without one): start it here
                self.eval_history = [(self.step, self.evaluate(eval_dataset))]
        bar = self._progress_bar("GRPO")
        try:
            while self.step < c.max_steps:
                log = self.train_step()
                self._show(bar, log, ("reward", "kl", "clip_fraction", "completion_length"))
                if evaluating and (self.step % c.eval_every == 0 or self.step == c.max_steps):
                    result = self.evaluate(eval_dataset)
                    self.eval_history.append((self.step, result))
                    log.update({f"eval/{k}": v for k, v in result.items()})
                self._maybe_checkpoint()
        finally:
            bar.close()
        return self.history

    @torch.no_grad()
    def evaluate(self, dataset: Sequence[dict], batch_size: int = 32) -> Dict[str, float]:
        """Greedy completions for each row: mean of every reward function and of the weighted total."""
        dataset = self._check_dataset(dataset)
        totals, per_fn = [], {}
        for s in range(0, len(dataset), batch_size):
            rows = dataset[s : s + batch_size]
            texts, stopped = self.sample([r["prompt"] for r in rows], 1, greedy=True)[4:]
            total, means = self.score(rows, texts, 1, stopped)
            totals.append(total)
            for k, v in means.items():
                per_fn[k] = per_fn.get(k, 0.0) + v * len(rows)
        result = {"reward": float(torch.cat(totals).mean())}
        result.update({f"reward/{k}": v / len(dataset) for k, v in per_fn.items()})
        return result

    # --- checkpoints --------------------------------------------------------------------
    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        return checkpoint.trainable_state_dict(self.model)

    def save_checkpoint(self, path: Optional[str] = None) -> str:
        """Adapter, optimizer, scheduler, every RNG, the sampling generator and the data position,
        written atomically to `path` (default output_dir/checkpoint-<step>.pt; the SFT trainer's
        checkpoint format) and returned. Refuses non-finite parameters."""
        if self._fsdp:
            raise NotImplementedError(_FSDP_CHECKPOINT)
        path = self.checkpoint_path() if path is None else path
        if not self._all_finite():
            raise FloatingPointError("refusing to checkpoint: a trainable parameter is NaN or inf")
        extra = {
            **self._extra_state(),
            "epoch": self.epoch,
            "position": self.position,
            "sample_rng": self.sample_generator.get_state(),
            "history": self.history,
            "eval_history": [[step, result] for step, result in self.eval_history],
            "config": asdict(self.config),
        }
        return checkpoint.save_checkpoint(path, self.model, self.optimizer, self.scheduler, step=self.step, extra=extra,
                                          run=self.run_identity())

    def _all_finite(self) -> bool:
        """Whether every trainable parameter is finite: one device sync, not one per parameter."""
        return bool(torch.stack([torch.isfinite(p).all() for p in self.params]).all())

    def _run_data(self):
        return self.dataset

    def load_checkpoint(self, path: str) -> None:
        """Restore what `save_checkpoint` wrote; ValueError when it does not fit the model or
        another run (different model, adapters, data or settings) wrote it."""
        if self._fsdp:
            raise NotImplementedError(_FSDP_CHECKPOINT)
        state = checkpoint.load_checkpoint(path, self.model, self.optimizer, self.scheduler, run=self.run_identity(),
                                           check_extra=lambda extra: self._check_extra_state(extra, path))
        extra = state["extra"]
        self.step, self.epoch, self.position = state["step"], extra["epoch"], extra["position"]
        self.sample_generator.set_state(extra["sample_rng"])
        self.history = list(extra["history"])
        self.eval_history = [(int(step), dict(result)) for step, result in extra.get("eval_history", [])]
        self._load_extra_state(extra)

    def _check_extra_state(self, extra: dict, path: str) -> None:
        """ValueError unless `load_checkpoint` can restore the trainer state `extra` of the
        checkpoint `path`; called before anything is restored, so a refusal changes nothing."""
        missing = [k for k in ("epoch", "position", "sample_rng", "history") if k not in extra]
        if missing:
            raise ValueError(f"checkpoint {path} has no {missing}: it was not written by {type(self).__name__}")
        try:
            torch.Generator(device=self.device).set_state(extra["sample_rng"])
        except (RuntimeError, TypeError) as e:  # a CPU run's state on a CUDA resume, or the reverse
            raise ValueError(f"checkpoint {path}: its sampling generator state does not fit this trainer's "
                             f"{self.device} generator (written on another device?): {e}") from None

    def _extra_state(self) -> dict:
        """What a subclass adds to the checkpoint (PPO: its value head)."""
        return {}

    def _load_extra_state(self, extra: dict) -> None:
        pass

    def save_adapter(self, path: str) -> None:
        """The trained parameters alone, written atomically: through the model's own
        `save_adapter(path)` when it has one (a `PeftModel`: `path` is a directory holding
        adapter_config.json + adapter_model.safetensors), else as one safetensors file `path`.
        FSDP2: call on every rank (the adapter's shards are gathered); rank 0 writes it."""
        if self._fsdp:
            named = self.model.adapter_parameters() if hasattr(self.model, "adapter_parameters") else [
                (n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            state = {n: p.full_tensor().detach().cpu().contiguous() for n, p in named}
            if self.rank != 0:
                return
            check_finite_state(state, f"the adapter {path}")
            if hasattr(self.model, "save_adapter"):
                self.model.save_adapter(path, state)
                return
            from safetensors.torch import save

            atomic_write_bytes(path, save(state))
            return
        if not self._all_finite():
            raise FloatingPointError("refusing to save the adapter: a parameter is NaN or inf")
        if hasattr(self.model, "save_adapter"):
            self.model.save_adapter(path)
            return
        from safetensors.torch import save

        atomic_write_bytes(path, save({n: t.contiguous() for n, t in self.trainable_state_dict().items()}))
