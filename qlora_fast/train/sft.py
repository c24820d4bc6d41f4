"""Supervised instruction tuning: `SFTTrainer` trains a (PEFT-wrapped) causal LM on
(instruction, output) pairs rendered with a prompt template, with the loss on output tokens only.

Features: optional packing (several examples per row; attention is not blocked between them, as
in TRL's simple packing), gradient accumulation, gradient checkpointing, warmup + cosine lr,
the qlora_fast optimizers (paged 8-bit AdamW by default), a tqdm bar, periodic held-out
perplexity, checkpoints that resume exactly, and DDP under torchrun (gloo on the CPU). Field
names, resume, NaN guards, clipping and checkpoints are the trainer core's (`train/core.py`),
shared with GRPO.

Data order is a function of (seed, step): each epoch is a fresh permutation drawn from the seed,
and each global batch takes the next `batch_size * gradient_accumulation_steps * world_size` examples, so a
resumed run sees the same batches as an uninterrupted one.
"""
import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from qlora_fast.data import PROMPT_TEMPLATE
from qlora_fast.models.generate import left_pad
from qlora_fast.optim.registry import OPTIMIZERS, make_optimizer  # noqa: F401 (re-exported: their old home)
from qlora_fast.utils import check_number, check_writable_dir

from . import core
from .checkpoint import checkpoint_path, load_checkpoint, save_checkpoint, unwrap


@core.renamed_fields(grad_accum="gradient_accumulation_steps")
@dataclass
class SFTConfig:
    """Training settings. Steps count optimizer updates (each = gradient_accumulation_steps
    micro-batches). The names shared with GRPOConfig follow HF/TRL (see `qlora_fast.train.core`);
    `grad_accum` is the deprecated name of gradient_accumulation_steps."""

    max_steps: int = 100
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    max_grad_norm: Optional[float] = 1.0
    max_seq_len: int = 128
    packing: bool = False
    gradient_checkpointing: bool = False
    optimizer: str = "paged_adamw_8bit"
    eval_every: int = 0
    eval_batch_size: int = 32
    checkpoint_every: int = 0
    output_dir: Optional[str] = None
    seed: int = 0
    progress: bool = True
    prompt_template: str = PROMPT_TEMPLATE

    def __post_init__(self):
        for name in ("batch_size", "max_seq_len", "eval_batch_size"):
            check_number("SFTConfig", name, getattr(self, name), integer=True, minimum=1)
        check_number("SFTConfig", "min_lr_ratio", self.min_lr_ratio, minimum=0, maximum=1)
        if not isinstance(self.packing, bool):
            raise TypeError(f"SFTConfig.packing must be a bool, got {self.packing!r}")
        core.check_training_fields(self)
        if not isinstance(self.prompt_template, str) or "{instruction}" not in self.prompt_template:
            raise ValueError("SFTConfig.prompt_template must be a str containing '{instruction}'")
        try:
            self.prompt_template.format(instruction="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"SFTConfig.prompt_template must format with only {{instruction}}: {e!r}") from None


# The SFTConfig fields a resumed run may change (the rest must match the checkpoint's run).
RESUMABLE_CHANGES = core.RESUMABLE_CHANGES + ("eval_batch_size",)


# ---------------------------------------------------------------------------- data
def encode_example(
    tokenizer, instruction: str, output: str, template: str = PROMPT_TEMPLATE, max_len: Optional[int] = None
):
    """(ids, labels): <bos> prompt output <eos>, labels -100 on <bos> and the prompt. Cut to
    max_len tokens (from the end of the output)."""
    prompt = [tokenizer.bos_id] + tokenizer.encode(template.format(instruction=instruction))
    answer = tokenizer.encode(output) + [tokenizer.eos_id]
    ids = prompt + answer
    labels = [-100] * len(prompt) + answer
    if max_len is not None:
        ids, labels = ids[:max_len], labels[:max_len]
    return ids, labels


def scored_pairs(tokenizer, pairs, template: str, max_len: int) -> int:
    """How many of `pairs` keep an output token (one the loss scores) when cut to max_len tokens."""
    return sum(any(t != -100 for t in encode_example(tokenizer, p["instruction"], p["output"], template, max_len)[1])
               for p in pairs)


def _check_pairs(pairs, what):
    if not isinstance(pairs, Sequence) or not pairs:
        raise ValueError(f"{what} must be a non-empty list of {{'instruction', 'output'}} dicts")
    for i, p in enumerate(pairs):  # every item: a bad one deep in the data failed mid-run with a KeyError
        if not isinstance(p, dict) or "instruction" not in p or "output" not in p:
            raise ValueError(f"{what} items must be dicts with 'instruction' and 'output', got {p!r} at index {i}")
        for key in ("instruction", "output"):
            if not isinstance(p[key], str):  # the template would format a number silently
                raise TypeError(f"{what}[{i}][{key!r}] must be a str, got {type(p[key]).__name__}")


def build_examples(tokenizer, pairs, template: str, max_len: int, packing: bool, seed: int = 0):
    """Encoded rows: one per pair, cut to max_len (an answer cut short keeps its first tokens and
    loses its end-of-sequence token; a pair cut before any answer token is dropped), or
    with `packing` rows of exactly `max_len` tokens filled with
    consecutive examples of a seeded shuffle (the last partial row is dropped)."""
    encoded = [encode_example(tokenizer, p["instruction"], p["output"], template, max_len) for p in pairs]
    # An example cut before its answer would teach nothing (and a batch of them has no loss).
    encoded = [(ids, labels) for ids, labels in encoded if any(t != -100 for t in labels)]
    if not encoded:
        raise ValueError(f"no example keeps any answer token within max_seq_len={max_len}; raise max_seq_len")
    if not packing:
        return encoded
    order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed)).tolist()
    rows, ids, labels = [], [], []
    for i in order:
        ids += encoded[i][0]
        labels += encoded[i][1]
        while len(ids) >= max_len:
            rows.append((ids[:max_len], labels[:max_len]))
            ids, labels = ids[max_len:], labels[max_len:]
    if not rows:
        raise ValueError(f"packing needs at least max_seq_len={max_len} tokens of data")
    return rows


def collate(rows, pad_id: int, device=None) -> Dict[str, torch.Tensor]:
    """Right-pad rows of (ids, labels) into input_ids, attention_mask and labels tensors."""
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_loss(
    model, tokenizer, pairs, template: str = PROMPT_TEMPLATE, max_len: int = 128, batch_size: int = 32
) -> dict:
    """Mean cross entropy per output token over `pairs` (each token weighted equally) and its
    perplexity exp(loss)."""
    was = model.training
    model.eval()
    device = _device(model)
    total, count = 0.0, 0
    rows = [encode_example(tokenizer, p["instruction"], p["output"], template, max_len) for p in pairs]
    for i in range(0, len(rows), batch_size):
        batch = collate(rows[i:i + batch_size], tokenizer.pad_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="sum"
        )
        total += nll.item()
        count += int((targets != -100).sum())
    model.train(was)
    if not count:  # else a loss of 0 (perplexity 1) that nothing measured
        raise ValueError(f"no pair keeps any output token within max_len={max_len}: nothing to evaluate")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


@torch.no_grad()
def exact_match(
    model,
    tokenizer,
    pairs,
    template: str = PROMPT_TEMPLATE,
    max_new_tokens: int = 16,
    batch_size: int = 32,
    return_predictions: bool = False,
):
    """Fraction of pairs whose greedy answer (up to <eos>, stripped) equals the output exactly."""
    device = _device(model)
    hits, predictions = 0, []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        prompts = [[tokenizer.bos_id] + tokenizer.encode(template.format(instruction=p["instruction"])) for p in chunk]
        ids, mask = left_pad(prompts, tokenizer.pad_id)
        T = ids.shape[1]
        out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        for j, p in enumerate(chunk):
            new = out[j, T:].tolist()
            if tokenizer.eos_id in new:
                new = new[:new.index(tokenizer.eos_id)]
            text = tokenizer.decode([t for t in new if t != tokenizer.pad_id]).strip()
            predictions.append(text)
            hits += text == str(p["output"]).strip()
    score = hits / len(pairs)
    return (score, predictions) if return_predictions else score


def _device(model) -> torch.device:
    return next(iter(unwrap(model).parameters())).device


# ---------------------------------------------------------------------------- trainer
class SFTTrainer(core.TrainerCore):
    """Instruction tuning of `model` (usually a `PeftModel`; only parameters with requires_grad
    train) on `train_data`, a list of {"instruction", "output"} dicts, with optional `eval_data`
    for held-out perplexity. Under an initialised torch.distributed process group the model is
    wrapped in DistributedDataParallel and each rank trains on its slice of every global batch;
    rank 0 logs, evaluates and writes checkpoints. Resume, NaN guards, clipping, the optimizer and
    checkpoints are the trainer core's (`qlora_fast.train.core`), the same as GRPO's.
    """

    kind = "SFT"
    resumable_changes = RESUMABLE_CHANGES

    def __init__(self, model: nn.Module, tokenizer, train_data: List[dict], eval_data: Optional[List[dict]] = None,
                 config: Optional[SFTConfig] = None, optimizer=None):
        self.config = config or SFTConfig()
        if not isinstance(self.config, SFTConfig):
            raise TypeError(f"config must be an SFTConfig, got {type(self.config).__name__}")
        _check_pairs(train_data, "train_data")
        if eval_data is not None:
            _check_pairs(eval_data, "eval_data")
        self.tokenizer = tokenizer
        self.eval_data = eval_data
        self.model = model
        c = self.config
        if c.output_dir:  # fail now, not at the first checkpoint after minutes of training
            check_writable_dir(c.output_dir, "SFTConfig.output_dir")
        self._train_data, self._run = train_data, None
        self.rows = build_examples(tokenizer, train_data, c.prompt_template, c.max_seq_len, c.packing, c.seed)
        if eval_data is not None and not scored_pairs(tokenizer, eval_data, c.prompt_template, c.max_seq_len):
            raise ValueError(f"no eval_data pair keeps any output token within max_seq_len={c.max_seq_len}: "
                             "its loss would measure nothing; raise max_seq_len")
        self.params = params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no trainable parameters (wrap it with get_peft_model first)")
        if c.gradient_checkpointing:
            if not hasattr(model, "gradient_checkpointing_enable"):
                raise ValueError(f"{type(model).__name__} has no gradient_checkpointing_enable()")
            model.gradient_checkpointing_enable()
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self._setup_optimizer(optimizer, c.min_lr_ratio)
        self.step = 0
        self.history: List[dict] = []
        self._ddp = None
        self._perm, self._perm_epoch = None, None
        # a model already sharded with FSDP2 (qlora_fast.distributed.shard_qlora_model) reduces its
        # own gradients; anything else is wrapped in DDP
        from torch.distributed.fsdp import FSDPModule

        self._fsdp = isinstance(model, FSDPModule)  # checkpoints: sharded DCP folders (qlora_fast.distributed)
        if self._fsdp and optimizer is not None:
            from qlora_fast.distributed import check_optimizer_params

            check_optimizer_params(model, optimizer)
        if self.distributed and not self._fsdp:
            device_ids = [_device(model).index] if _device(model).type == "cuda" else None
            self._ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def _micro_batches(self, step: int):
        """The rows this rank trains on at `step`, as gradient_accumulation_steps lists of batch_size rows."""
        c = self.config
        per_step = c.batch_size * c.gradient_accumulation_steps * self.world
        n = len(self.rows)
        start = step * per_step
        indices = []
        for pos in range(start, start + per_step):
            epoch, offset = divmod(pos, n)
            indices.append(self._permutation(epoch)[offset])
        mine = indices[self.rank::self.world]
        b = c.batch_size
        return [[self.rows[i] for i in mine[k * b:(k + 1) * b]] for k in range(c.gradient_accumulation_steps)]

    def _permutation(self, epoch: int) -> List[int]:
        if self._perm_epoch != epoch:
            gen = torch.Generator().manual_seed(self.config.seed * 100003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.rows), generator=gen).tolist(), epoch
        return self._perm

    def evaluate(self) -> dict:
        """Held-out loss and perplexity of the current model (needs eval_data)."""
        if self.eval_data is None:
            raise ValueError("evaluate() needs eval_data")
        c = self.config
        return evaluate_loss(
            self.model, self.tokenizer, self.eval_data, c.prompt_template, c.max_seq_len, c.eval_batch_size
        )

    def save_checkpoint(self, path: Optional[str] = None) -> Optional[str]:
        """Write the resumable state (rank 0 only); default path output_dir/checkpoint-<step>.pt.
        An FSDP2 model: every rank writes its shards to the folder output_dir/checkpoint-<step>."""
        if self._fsdp:
            from qlora_fast.distributed import save_trainer_checkpoint, sharded_checkpoint_path

            if path is None and not self.config.output_dir:
                raise ValueError("save_checkpoint needs a path or config.output_dir")
            path = path or sharded_checkpoint_path(self.config.output_dir, self.step)
            extra = {"history": self.history, "config": asdict(self.config)}
            save_trainer_checkpoint(path, self.model, self.optimizer, self.scheduler, self.step, extra=extra,
                                    run=self.run_identity())
            return path if self.is_main else None
        if not self.is_main:
            return None
        if path is None:
            if not self.config.output_dir:
                raise ValueError("save_checkpoint needs a path or config.output_dir")
            path = checkpoint_path(self.config.output_dir, self.step)
        return save_checkpoint(path, self.model, self.optimizer, self.scheduler, self.step,
                               extra={"history": self.history, "config": asdict(self.config)}, run=self.run_identity())

    def _run_data(self):
        return list(self._train_data)

    def load_checkpoint(self, path: str) -> None:
        """Restore a checkpoint of this run; ValueError naming what differs when another run wrote it."""
        load = load_checkpoint
        if self._fsdp:
            from qlora_fast.distributed import load_trainer_checkpoint as load  # every rank its shards
        state = load(path, self.model, self.optimizer, self.scheduler, run=self.run_identity())
        self.step = state["step"]
        self.history = list(state["extra"].get("history", []))

    def _token_weights(self, batches, device) -> List[float]:
        """Per micro-batch, the factor on its mean loss that makes the update's gradient the mean
        over every target token of the update (all micro-batches, all ranks), as one large batch
        gives: its token count / the total (x world size, as DDP averages the ranks' gradients).
        Dividing each micro-batch's mean by the number of micro-batches weighted a short answer's
        tokens like a long one's."""
        counts = [sum(sum(1 for t in labels[1:] if t != -100) for _, labels in rows) for rows in batches]
        total = float(sum(counts))
        if self.distributed:
            t = torch.tensor([total], device=device, dtype=torch.float64)
            dist.all_reduce(t)
            total = t.item()
        return [n * self.world / total if total else 0.0 for n in counts]

    def _find_checkpoint(self, resume_from_checkpoint: Optional[str], allow_fresh: bool) -> Optional[str]:
        if self._fsdp:  # sharded checkpoint-<step> folders, same rules as the core's
            from qlora_fast.distributed import resolve_sharded_resume

            return resolve_sharded_resume(resume_from_checkpoint, self.config.output_dir, allow_fresh)
        return super()._find_checkpoint(resume_from_checkpoint, allow_fresh)

    def train(self, resume_from_checkpoint: Optional[str] = None, allow_fresh: bool = False,
              resume_from: Optional[str] = None) -> List[dict]:
        """Train until config.max_steps; returns the history (one dict per step: step, loss, lr,
        grad_norm (before clipping), and eval_loss / eval_perplexity at evaluation steps).
        `resume_from_checkpoint`: a checkpoint file, or "latest" for the newest in output_dir; when
        there is none, FileNotFoundError unless `allow_fresh` (then training starts at step 0), as
        in GRPO (`qlora_fast.train.core`). A checkpoint of another run (different model, adapters,
        data, seed, optimizer or hyperparameters) raises ValueError naming what differs. A non-finite
        loss or gradient raises FloatingPointError before the optimizer step. `resume_from`: the
        deprecated name of resume_from_checkpoint."""
        resume = core.renamed_argument("SFTTrainer.train", "resume_from", "resume_from_checkpoint", resume_from,
                                       resume_from_checkpoint)
        c = self.config
        self._resume(resume, allow_fresh)
        model = self._ddp or self.model
        model.train()
        device = _device(self.model)
        bar = self._progress_bar("instruction tuning")
        while self.step < c.max_steps:
            batches = self._micro_batches(self.step)
            weights = self._token_weights(batches, device)
            total_loss = 0.0
            self.optimizer.zero_grad(set_to_none=True)
            for k, rows in enumerate(batches):
                batch = collate(rows, self.tokenizer.pad_id, device)
                sync = self._ddp is None or k == len(batches) - 1
                ctx = model.no_sync() if not sync else contextlib.nullcontext()
                with ctx:
                    out = model(**batch)
                    # a micro-batch without target tokens has a NaN mean; it adds nothing (and under
                    # DDP still takes part in the gradient sync)
                    loss = out.loss * weights[k] if weights[k] else out.logits.sum() * 0.0
                    self._check_loss(loss)
                    loss.backward()
                total_loss += loss.item()
            lr = self.scheduler.get_last_lr()[0]  # the lr this update uses (step() moves to the next one)
            grad_norm = self._optimizer_step()
            self.scheduler.step()
            self.step += 1
            if self.distributed:
                t = torch.tensor([total_loss], device=device)
                dist.all_reduce(t)
                total_loss = t.item() / self.world
            record = {"step": self.step, "loss": total_loss, "lr": lr, "grad_norm": grad_norm}
            evaluating = c.eval_every and self.eval_data is not None
            if evaluating and (self.step % c.eval_every == 0 or self.step == c.max_steps):
                ev = self.evaluate()
                record.update(eval_loss=ev["loss"], eval_perplexity=ev["perplexity"])
                model.train()
            self.history.append(record)
            self._show(bar, record, ("loss", "eval_loss"))
            if self._maybe_checkpoint() and self.distributed:
                dist.barrier()
        bar.close()
        self.model.eval()
        return self.history
