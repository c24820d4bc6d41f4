"""`qlora-fast grpo`: GRPO on the shipped arithmetic task, from a warm-started policy.

The task: one more / one less than a three-digit number ("What is 347 + 1?"): the answer copies
the number and moves its last digit, a skill shared by every problem that the tiny model computes
for numbers it never saw (`qlora_fast.data.grpo_build_data`). The starting policy is the built-in
base plus an SFT on the task's training problems (the "warm start", cached beside the base model,
or the adapter given with --sft-adapter) whose demonstrations come from an imperfect teacher: on
60% of them it repeats the number instead of answering (a PLANTED SYSTEMATIC ERROR, the "SFT on
noisy demonstrations, then RL with a verifier" story). The SFT'd policy learns the copy-and-move
skill and the teacher's habit, so greedy decoding mostly repeats the number while samples are
often right. The adapter is merged
into the base; GRPO then trains a fresh (Q)LoRA adapter on top (the KL reference is that model
with the fresh adapter disabled: no second copy), with the correctness reward (against the true
answer) + a small format reward, on the training problems (--practice N: only the first N),
evaluating greedy accuracy on the 300 held-out problems as it goes. What it moves (follow the
sign) is shared across problems, so held-out accuracy rises with it. Prints the curve and a report
(practice and held-out accuracy before/after, KL to the reference, completion length, share of
groups whose rewards all tie), writes the plot and the adapter. Measured: bench/RESULTS.md ("RL").
"""
import dataclasses
import hashlib
import json
import os
import time

from qlora_fast.commands import (
    DeprecatedAliases,
    HelpFormatter,
    add_base_model_arguments,
    add_resume_arguments,
    add_training_arguments,
    check_fresh_start,
    check_output,
    finite_float,
    nonnegative_float,
    nonnegative_int,
    note_resume_at_end,
    positive_float,
    positive_int,
    probability,
    remove_checkpoints,
    resolve_device,
    resume_mode,
)
from qlora_fast.utils import atomic_write, check_writable_dir, default_cache_dir

WARMSTART = dict(r=8, alpha=16.0, batch_size=16, lr=3e-3, warmup_steps=5, max_seq_len=64)
# Defaults: measured in bench/RESULTS.md ("RL").
SFT_STEPS, STEPS, PROMPTS_PER_STEP, TEMPERATURE, LR, EVAL_EVERY, PRACTICE = 500, 100, 8, 1.0, 1e-3, 25, 0
MAX_NEW_TOKENS = 6  # a three-digit answer and its full stop are at most 4 tokens


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "grpo", help="GRPO on the shipped arithmetic task from a warm-started policy (CPU, a few minutes)",
        description=__doc__.splitlines()[0], formatter_class=HelpFormatter,
    )
    p.add_argument("--sft-adapter", default=None, metavar="DIR",
                   help="adapter to start from; trained here (warm start on the task) and saved there when absent "
                        "(default: the warm-start adapter cached in --cache-dir)")
    p.add_argument(
        "--sft-steps",
        type=positive_int,
        default=SFT_STEPS,
        help="warm-start SFT steps when the adapter has to be trained",
    )
    add_base_model_arguments(p)
    p.add_argument("--max-steps", "--steps", dest="steps", action=DeprecatedAliases, type=positive_int, metavar="N",
                   default=STEPS, help="GRPO steps")
    p.add_argument("--group-size", type=positive_int, default=8, help="completions sampled per prompt (G >= 2)")
    p.add_argument("--prompts-per-step", type=positive_int, default=PROMPTS_PER_STEP, help="prompts per GRPO step")
    p.add_argument("--max-new-tokens", type=positive_int, default=MAX_NEW_TOKENS,
                   help="longest completion (answers end with a full stop)")
    p.add_argument("--method", choices=("qlora", "lora"), default="qlora",
                   help="GRPO adapter: QLoRA (NF4 base of the merged SFT model) or LoRA (full-precision base)")
    p.add_argument("--r", type=positive_int, default=8, help="rank of the GRPO adapter")
    p.add_argument("--lora-alpha", "--alpha", dest="alpha", action=DeprecatedAliases, type=finite_float, default=16.0,
                   help="alpha of the GRPO adapter (scaling alpha / r; --alpha is its deprecated spelling)")
    p.add_argument("--temperature", type=positive_float, default=TEMPERATURE, help="sampling temperature")
    p.add_argument("--top-p", type=probability, default=None, help="nucleus sampling threshold (default: off)")
    p.add_argument("--lr", type=positive_float, default=LR, help="learning rate of the adapter")
    p.add_argument(
        "--beta",
        type=nonnegative_float,
        default=0.04,
        help="weight of the KL to the reference (0 skips the reference pass)",
    )
    p.add_argument("--eps-low", type=nonnegative_float, default=0.2, help="lower clip range of the ratio")
    p.add_argument(
        "--eps-high",
        type=nonnegative_float,
        default=None,
        help="upper clip range (default eps-low; larger is clip-higher)",
    )
    p.add_argument("--num-iterations", type=positive_int, default=1, help="optimisation passes over each sampled batch")
    p.add_argument("--loss-type", choices=("grpo", "dapo", "dr_grpo"), default="grpo",
                   help="aggregation: per-sequence mean (grpo), token mean over the batch (dapo), constant (dr_grpo)")
    p.add_argument("--advantage-scale", choices=("group", "batch", "none"), default="group",
                   help="divide advantages by the group std, the batch std, or nothing (Dr. GRPO)")
    p.add_argument("--drop-zero-variance-groups", action="store_true",
                   help="leave groups whose rewards all tie out of the loss (DAPO's filter; they carry no signal)")
    p.add_argument("--gradient-accumulation-steps", "--grad-accum", dest="grad_accum", action=DeprecatedAliases,
                   metavar="N", type=positive_int, default=1, help="micro-batches per step")
    p.add_argument(
        "--eval-every",
        type=nonnegative_int,
        default=EVAL_EVERY,
        help="held-out greedy accuracy every N steps (0: start and end only)",
    )
    p.add_argument("--heldout", type=positive_int, default=None, help="held-out problems to score (default: all 300)")
    p.add_argument("--practice", type=nonnegative_int, default=PRACTICE,
                   help="GRPO trains on the first N training problems only (0: all 1,140, each seen about 0.7 times "
                        "in the default budget)")
    p.add_argument("--output", default="qlora_fast_output", help="directory for the GRPO adapter, checkpoints and plot")
    add_resume_arguments(p, "--output/grpo-checkpoints", subdir="grpo-checkpoints")
    add_training_arguments(p)
    p.set_defaults(func=run)


def warmstart_dir(cache_dir, tokenizer, steps, seed) -> str:
    """Where the cached warm-start adapter lives: its name hashes the recipe and the task data."""
    from qlora_fast.train.rewards import warmstart_pairs

    blob = json.dumps({"recipe": WARMSTART, "steps": steps, "seed": seed, "tokenizer": tokenizer,
                       "data": warmstart_pairs("train")}, sort_keys=True)
    return os.path.join(
        cache_dir or default_cache_dir(), f"grpo-warmstart-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
    )


def train_warmstart_adapter(model, tokenizer, path, steps, device="cpu", seed=0, progress=True):
    """The warm start: a short QLoRA SFT of `model` (the base; it gets the adapter in place) on the
    task's training problems, each answer ended by a full stop; the adapter is saved to `path`."""
    import torch

    from qlora_fast.peft import LoraConfig, get_peft_model
    from qlora_fast.train.rewards import warmstart_pairs
    from qlora_fast.train.sft import SFTConfig, SFTTrainer

    torch.manual_seed(seed)
    w = WARMSTART
    peft = get_peft_model(model, LoraConfig(r=w["r"], lora_alpha=w["alpha"], quantize_base="nf4")).to(device)
    config = SFTConfig(
        max_steps=steps,
        batch_size=w["batch_size"],
        lr=w["lr"],
        warmup_steps=min(w["warmup_steps"], steps),
        max_seq_len=w["max_seq_len"],
        seed=seed,
        progress=progress,
    )
    SFTTrainer(peft, tokenizer, warmstart_pairs("train"), None, config).train()
    peft.save_adapter(path)


def _save_plot(history, eval_history, settings, path, practice=None):
    """Batch reward and share correct per step, and held-out greedy accuracy at the evaluation
    steps (second axis), with the run's settings in the title; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    reward = [h["reward"] for h in history]
    correct = [h.get("reward/correctness_reward", float("nan")) for h in history]
    window = max(1, len(reward) // 10)
    smooth = [
        sum(correct[max(0, i - window + 1) : i + 1]) / len(correct[max(0, i - window + 1) : i + 1])
        for i in range(len(correct))
    ]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps, reward, ".", alpha=0.3, color="tab:blue", label="mean reward of the batch (correct + 0.2 format)")
    ax.plot(steps, smooth, "-", color="tab:orange", label=f"share of samples correct ({window}-step average)")
    ax.plot(
        [s for s, _ in eval_history],
        [r["reward/correctness_reward"] for _, r in eval_history],
        "o-",
        color="tab:green",
        label="held-out greedy accuracy",
    )
    if practice is not None:
        ax.plot([0, steps[-1]], list(practice), "s--", color="tab:red",
                label="training-problem greedy accuracy (start, end)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("reward / accuracy")
    ax.set_ylim(0, 1.25)
    ax.set_title(f"GRPO on the shipped task (n + 1, n - 1; warm start imitated a teacher that repeats n 60% of the "
                 f"time)\n{settings}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)


def sample_accuracy(trainer, rows, n=8):
    """(share of n samples per problem that are correct, share of problems with at least one) at
    the trainer's temperature: what GRPO has to work with."""
    import torch

    from qlora_fast.train.rewards import correctness_reward

    hits = []
    for s in range(0, len(rows), 32):
        chunk = rows[s:s + 32]
        texts = trainer.sample([r["prompt"] for r in chunk], n)[4]
        answers = [r["answer"] for r in chunk for _ in range(n)]
        hits.append(torch.tensor(correctness_reward([""] * len(texts), texts, answer=answers)).view(-1, n))
    hits = torch.cat(hits)
    return float(hits.mean()), float(hits.max(1).values.mean())


def run(args) -> int:
    started = time.time()
    resume_from, allow_fresh = resume_mode(args, os.path.join(args.output, "grpo-checkpoints"))
    check_fresh_start(args)  # a fresh start never mixes its checkpoints with an earlier run's
    device = resolve_device(args.device)
    with check_output(args.output):  # writable, and no other run writing it, before any work
        remove_checkpoints(args)  # --overwrite-output: the earlier run's, before any work
        return _run(args, device, started, resume_from, allow_fresh)


def _run(args, device, started, resume_from, allow_fresh) -> int:
    import torch  # here, not at import: `qlora-fast --help` should not load torch

    from qlora_fast.models import load_base_model
    from qlora_fast.peft import LoraConfig, get_peft_model, load_adapter
    from qlora_fast.train.grpo import GRPOConfig, GRPOTrainer
    from qlora_fast.train.rewards import answer_stop_ids, arithmetic_rewards, load_arithmetic_task

    progress = not args.no_progress
    # The config first: a bad value fails before the warm start is trained or the base loaded.
    funcs, weights = arithmetic_rewards()
    config = GRPOConfig(
        max_steps=args.steps, group_size=args.group_size, prompts_per_step=args.prompts_per_step,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, lr=args.lr,
        beta=args.beta, eps_low=args.eps_low, eps_high=args.eps_high, num_iterations=args.num_iterations,
        loss_type=args.loss_type, advantage_scale=args.advantage_scale, gradient_accumulation_steps=args.grad_accum,
        drop_zero_variance_groups=args.drop_zero_variance_groups, eval_every=args.eval_every or args.steps,
        gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer, reward_weights=weights,
        output_dir=os.path.join(args.output, "grpo-checkpoints"), checkpoint_every=args.checkpoint_every,
        seed=args.seed, progress=progress,
    )
    sft_adapter = args.sft_adapter or warmstart_dir(args.cache_dir, args.tokenizer, args.sft_steps, args.seed)
    if not os.path.exists(os.path.join(sft_adapter, "adapter_config.json")):
        # The warm start is saved there: a file, or a directory that cannot be written, fails now
        # rather than after the warm start has trained.
        check_writable_dir(sft_adapter, "--sft-adapter" if args.sft_adapter else "the warm-start adapter directory")
        print(f"no SFT adapter at {sft_adapter}: training the warm start first ({args.sft_steps} SFT steps on the "
              "task's training problems)")
        base, tokenizer = load_base_model(cache_dir=args.cache_dir, progress=progress, tokenizer=args.tokenizer)
        train_warmstart_adapter(base, tokenizer, sft_adapter, args.sft_steps, device, args.seed, progress)
    torch.manual_seed(args.seed)
    base, tokenizer = load_base_model(cache_dir=args.cache_dir, progress=progress, tokenizer=args.tokenizer)
    sft_model = load_adapter(base, sft_adapter).merge_and_unload()
    model = get_peft_model(sft_model, LoraConfig(r=args.r, lora_alpha=args.alpha,
                                                 quantize_base="nf4" if args.method == "qlora" else None)).to(device)
    print(f"policy: built-in base + warm-start adapter {os.path.abspath(sft_adapter)} (merged) + a fresh "
          f"{args.method} adapter ({sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable "
          f"parameters); reference: the same model with the fresh adapter disabled; device {device}")

    config = dataclasses.replace(config, stop_token_ids=answer_stop_ids(tokenizer))
    practice = load_arithmetic_task("train", limit=args.practice or None)
    trainer = GRPOTrainer(model, tokenizer, funcs, practice, config)
    heldout = load_arithmetic_task("heldout", limit=args.heldout)
    practice_before = trainer.evaluate(practice)["reward/correctness_reward"]
    sampled, pass_g = sample_accuracy(trainer, heldout, args.group_size)
    print(f"starting policy on {len(heldout)} held-out problems: {100 * sampled:.1f}% of samples correct "
          f"(temperature {args.temperature}), {100 * pass_g:.1f}% solved by at least one of {args.group_size} samples")

    note_resume_at_end(args, args.steps)
    history = trainer.train(resume_from_checkpoint=resume_from, allow_fresh=allow_fresh, eval_dataset=heldout)
    before = trainer.eval_history[0][1]["reward/correctness_reward"]
    after = trainer.eval_history[-1][1]["reward/correctness_reward"]
    practice_after = trainer.evaluate(practice)["reward/correctness_reward"]

    print("\nreward curve (batch means; 'held-out' = greedy accuracy at the evaluation steps):")
    print(
        f"{'step':>5} {'reward':>7} {'correct':>7} {'format':>6} {'kl':>7} {'clip':>5} {'len':>4} {'0-var':>5} "
        f"{'held-out':>8} {'time s':>6}"
    )
    every = max(1, len(history) // 20)
    for h in history:
        if h["step"] % every == 0 or h["step"] in (1, len(history)) or "eval/reward" in h:
            held = f"{100 * h['eval/reward/correctness_reward']:>7.1f}%" if "eval/reward" in h else " " * 8
            print(f"{h['step']:>5} {h['reward']:>7.3f} {h['reward/correctness_reward']:>7.3f} "
                  f"{h['reward/format_reward']:>6.3f} {h['kl']:>7.4f} {h['clip_fraction']:>5.2f} "
                  f"{h['completion_length']:>4.1f} {h['zero_variance_fraction']:>5.2f} {held} {h['time']:>6.2f}")
    settings = (
        f"{len(practice)} practice problems, G={args.group_size}, {args.prompts_per_step} prompts/step, {args.steps} "
        f"steps, lr {args.lr:g}, "
        f"beta {args.beta:g}, T {args.temperature:g}, {args.loss_type}, {args.method} r={args.r}, seed {args.seed}"
    )
    adapter_dir = os.path.join(args.output, "adapter-grpo")
    trainer.save_adapter(adapter_dir)  # first: a failed plot must not lose the run's result
    plot = os.path.join(args.output, "grpo_reward_curve.png")
    try:
        _save_plot(history, trainer.eval_history, settings, plot, (practice_before, practice_after))
    except ImportError:
        plot = None
        print("matplotlib is not installed: no reward-curve plot (pip install matplotlib)")
    k = max(1, len(history) // 5)
    first, last = history[:k], history[-k:]
    mean = lambda rows, key: sum(h[key] for h in rows if h[key] == h[key]) / max(1, sum(h[key] == h[key] for h in rows))  # noqa: E731
    print("\n=== qlora-fast grpo report ===")
    print(
        f"practice accuracy      {100 * practice_before:.1f}% -> {100 * practice_after:.1f}% "
        f"({100 * (practice_after - practice_before):+.1f} points; the {len(practice)} problems GRPO trained on, "
        "greedy)"
    )
    print(f"held-out accuracy      {100 * before:.1f}% -> {100 * after:.1f}% ({100 * (after - before):+.1f} points; "
          f"{len(heldout)} problems never trained on, greedy)")
    print(f"share correct (batch)  {mean(first, 'reward/correctness_reward'):.3f} (first {k} steps) -> "
          f"{mean(last, 'reward/correctness_reward'):.3f} (last {k} steps)")
    print(
        f"format reward (batch)  {mean(first, 'reward/format_reward'):.3f} -> {mean(last, 'reward/format_reward'):.3f}"
    )
    print(f"KL to the reference    {mean(last, 'kl'):.4f} (mean k3 per token, last {k} steps)")
    print(
        f"completion length      {mean(first, 'completion_length'):.2f} -> {mean(last, 'completion_length'):.2f} tokens"
    )
    print(f"zero-variance groups   {100 * mean(history, 'zero_variance_fraction'):.0f}% of all groups "
          f"({'dropped' if args.drop_zero_variance_groups else 'kept'}; --drop-zero-variance-groups leaves them out)")
    if trainer.skipped_nan_groups:
        print(f"NaN-reward groups      {trainer.skipped_nan_groups} skipped")
    if plot:
        print(f"reward curve plot      {os.path.abspath(plot)}")
    print(f"adapter saved to       {os.path.abspath(adapter_dir)}")
    print(f"wall time              {time.time() - started:.0f} s")
    return 0
