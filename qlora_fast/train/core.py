"""The one trainer core under `SFTTrainer` and `GRPOTrainer` (and `PPOTrainer`, a GRPO trainer):
what every training loop here shares, defined once so both behave the same.

Field names. Both configs use one set, spelled as Hugging Face `TrainingArguments` / TRL's configs
spell them where those have the concept, so a TRL config ports by name:
  max_steps                    optimizer updates to train for (HF/TRL `max_steps`)
  gradient_accumulation_steps  micro-batches per optimizer update (HF/TRL `gradient_accumulation_steps`)
  checkpoint_every             a resumable checkpoint every N updates, 0 never (the pair of `eval_every`,
                               and the CLI's `--checkpoint-every`; HF's `save_steps` also drives a
                               save strategy these trainers do not have)
  train(resume_from_checkpoint=...)   HF `Trainer.train`'s argument
The old names (SFT `grad_accum`, `train(resume_from=)`; GRPO `steps`, `grad_accum_steps`,
`save_every`) keep working for one release with a DeprecationWarning.

Behaviour both trainers share:
- Resume. `resume_from_checkpoint` is a checkpoint file or "latest" (the newest checkpoint-*.pt in
  output_dir). "latest" with no checkpoint raises FileNotFoundError unless `allow_fresh=True`
  (then step 0), as HF's Trainer refuses `resume_from_checkpoint=True` without one: a mistyped
  output directory must not silently restart a long run from scratch. CLI: `--resume` /
  `--resume-if-exists`. A checkpoint of another run is refused naming what differs.
- Non-finite values. A NaN/inf loss (checked per micro-batch, before its backward) or gradient
  (after accumulation, one device sync) raises FloatingPointError before the optimizer step: the
  gradients are cleared, the adapter keeps its last finite values, no checkpoint is written. The
  step is not skipped: skipping would hide a diverging run. (GRPO's NaN *rewards* are a data
  matter, not a numerical one: their group is left out of the loss, counted and warned about.)
- Clipping: `clip_grad_norm_` to max_grad_norm (None: off); the logged grad_norm is the norm before.
- The optimizer by name from `qlora_fast.optim.registry`; linear warmup, then cosine to SFT's
  min_lr_ratio (GRPO: constant after warmup).
- Checkpoints every checkpoint_every updates at output_dir/checkpoint-<step>.pt (see `checkpoint`).
- A tqdm progress bar (rank 0, `progress`) and `history`, one dict per update.
"""
import os
from dataclasses import asdict
from typing import Optional

import torch

from qlora_fast import utils
from qlora_fast.optim.registry import OPTIMIZERS, make_optimizer
from qlora_fast.utils import check_number

from . import checkpoint
from .schedule import warmup_cosine_schedule

# The config fields a resumed run may change (the rest must match the checkpoint's run).
RESUMABLE_CHANGES = ("max_steps", "eval_every", "checkpoint_every", "output_dir", "progress", "gradient_checkpointing")


# Deprecated names: one mechanism for the package, in utils (re-exported for the trainers).
renamed_fields, renamed_argument = utils.renamed_fields, utils.renamed_argument


# ---------------------------------------------------------------------------- config validation
def check_training_fields(config) -> None:
    """Validate the fields every trainer config shares, with the same rules and messages:
    ValueError / TypeError naming "<Config>.<field>"."""
    owner = type(config).__name__
    for name in ("max_steps", "gradient_accumulation_steps"):
        check_number(owner, name, getattr(config, name), integer=True, minimum=1)
    for name in ("warmup_steps", "eval_every", "checkpoint_every"):
        check_number(owner, name, getattr(config, name), integer=True, minimum=0)
    check_number(owner, "seed", config.seed, integer=True)
    check_number(owner, "lr", config.lr, minimum=0, exclusive_minimum=True)
    check_number(owner, "weight_decay", config.weight_decay, minimum=0)
    # A negative norm would flip the gradient (clip_grad_norm_ scales by max_norm / norm): None disables clipping.
    check_number(owner, "max_grad_norm", config.max_grad_norm, minimum=0, exclusive_minimum=True, optional=True)
    for name in ("gradient_checkpointing", "progress"):
        if not isinstance(getattr(config, name), bool):
            raise TypeError(f"{owner}.{name} must be a bool, got {getattr(config, name)!r}")
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"{owner}.optimizer must be one of {OPTIMIZERS}, got {config.optimizer!r}")
    if config.output_dir is not None and not isinstance(config.output_dir, (str, os.PathLike)):
        raise TypeError(f"{owner}.output_dir must be a path or None, got {config.output_dir!r}")
    if config.checkpoint_every and not config.output_dir:
        raise ValueError(f"{owner}.checkpoint_every needs output_dir")


# ---------------------------------------------------------------------------- the shared loop pieces
def clip_gradients(params, max_norm: Optional[float]) -> float:
    """Clip the gradients of `params` to total L2 norm `max_norm` (None: leave them) and return the
    norm before clipping (0.0 without gradients)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm is None:
        return float(torch.nn.utils.get_total_norm(grads))
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


class TrainerCore:
    """The parts of a trainer that do not depend on what it trains on. A subclass sets `config`
    (validated by `check_training_fields`), `model`, `params` (the trainable parameters), `step`
    and `history`, calls `_setup_optimizer`, and provides `save_checkpoint(path=None)` (None: its
    default path), `load_checkpoint(path)` and `_run_data()` (what identifies its data set)."""

    kind = "training"  # names the trainer in errors: "SFT step 3: the loss is nan ..."
    rank = 0
    resumable_changes = RESUMABLE_CHANGES

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _setup_optimizer(self, optimizer=None, min_lr_ratio: float = 0.0) -> None:
        """`optimizer`, or the config's by name; linear warmup, then cosine to min_lr_ratio at max_steps."""
        c = self.config
        self.optimizer = optimizer or make_optimizer(c.optimizer, self.params, c.lr, c.weight_decay)
        self.scheduler = warmup_cosine_schedule(self.optimizer, c.warmup_steps, c.max_steps, min_lr_ratio)

    def _check_loss(self, loss: torch.Tensor) -> None:
        """FloatingPointError (gradients cleared) when the micro-batch loss is NaN / inf."""
        if not torch.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(
                f"{self.kind} step {self.step + 1}: the loss is {loss.item()}; stopping before the optimizer step, "
                "so the adapter keeps its last finite values (lower lr or check the data)")

    def _optimizer_step(self) -> float:
        """Apply the accumulated gradients: FloatingPointError (gradients cleared) when one is NaN /
        inf, else clip to max_grad_norm and step. Returns the gradient norm before clipping."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads and not torch.stack([torch.isfinite(g).all() for g in grads]).all():  # one sync, not one per tensor
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"{self.kind} step {self.step + 1}: a gradient is NaN or inf; stopping before "
                                     "the optimizer step, so the adapter keeps its last finite values")
        norm = clip_gradients(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        return norm

    # --- checkpoints -------------------------------------------------------------------
    def checkpoint_path(self, step: Optional[int] = None) -> str:
        """output_dir/checkpoint-<step>.pt (default: the current step); ValueError without output_dir."""
        if not self.config.output_dir:
            raise ValueError(f"{type(self.config).__name__}.output_dir is not set")
        return checkpoint.checkpoint_path(self.config.output_dir, self.step if step is None else step)

    def _find_checkpoint(self, resume_from_checkpoint: Optional[str], allow_fresh: bool) -> Optional[str]:
        """The checkpoint to resume (`checkpoint.resolve_resume` in output_dir), or None. A trainer
        whose checkpoints live elsewhere (sharded folders) overrides this with the same rules."""
        return checkpoint.resolve_resume(resume_from_checkpoint, self.config.output_dir, allow_fresh)

    def _resume(self, resume_from_checkpoint: Optional[str], allow_fresh: bool) -> Optional[str]:
        """Load the checkpoint `resume_from_checkpoint` names (see the module docstring for "latest");
        returns its path, or None when training starts fresh."""
        path = self._find_checkpoint(resume_from_checkpoint, allow_fresh)
        if path:
            self.load_checkpoint(path)
        return path

    def _maybe_checkpoint(self) -> bool:
        """Save a checkpoint (at the trainer's default path) when this step is a multiple of
        checkpoint_every; whether it was one."""
        every = self.config.checkpoint_every
        if every and self.step % every == 0:
            self.save_checkpoint()
            return True
        return False

    def run_identity(self) -> dict:
        """What a checkpoint of this run records and a resume must match (`checkpoint.run_identity`:
        the model, its adapters, the data and the config minus `resumable_changes`). Computed once
        per config: it hashes the data set and fingerprints the frozen base."""
        config = asdict(self.config)
        cached = getattr(self, "_run", None)
        if cached is None or cached[0] != config:
            identity = checkpoint.run_identity(self.model, config, data=self._run_data(), ignore=self.resumable_changes)
            self._run = (config, identity)
        return self._run[1]

    # --- progress ----------------------------------------------------------------------
    def _progress_bar(self, desc: str):
        from tqdm.auto import tqdm

        c = self.config
        return tqdm(total=c.max_steps, initial=self.step, desc=desc, disable=not (c.progress and self.is_main),
                    dynamic_ncols=True)

    @staticmethod
    def _show(bar, record: dict, keys) -> None:
        """Advance the bar by one update and show `keys` of its record."""
        bar.update(1)
        bar.set_postfix({k: f"{record[k]:.4g}" for k in keys if k in record})
