"""`qlora-fast grpo`: GRPO on the shipped arithmetic task, starting from the SFT demo's adapter.

Loads the built-in base model, loads the adapter `qlora-fast finetune` wrote (or trains one first
with the SFT trainer and saves it there) and merges it into the base, so the SFT model is the
starting policy and the KL reference; GRPO then trains a fresh (Q)LoRA adapter on top (the
reference is that same model with the fresh adapter disabled: no second copy). Measures held-out
accuracy, runs GRPO with the correctness + format rewards, prints the reward curve and writes it
as a PNG, measures held-out accuracy again and saves the GRPO adapter.
"""
import os
import time

from qlora_fast.commands import (HelpFormatter, add_base_model_arguments, add_resume_arguments, add_training_arguments,
                                 check_output, finite_float, nonnegative_float, positive_float, positive_int, probability,
                                 resolve_device, resume_mode)
from qlora_fast.utils import atomic_write

DEFAULT_SFT_ADAPTER = os.path.join("qlora_fast_output", "adapter-qlora")  # `qlora-fast finetune`'s default


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "grpo", help="GRPO on the shipped arithmetic task from the SFT demo's adapter (CPU, a few minutes)",
        description=__doc__.splitlines()[0], formatter_class=HelpFormatter,
    )
    p.add_argument("--sft-adapter", default=DEFAULT_SFT_ADAPTER, metavar="DIR",
                   help="adapter to start from; trained here with the SFT trainer and saved there when absent "
                        f"(default {DEFAULT_SFT_ADAPTER}, where `qlora-fast finetune` writes it)")
    p.add_argument("--sft-steps", type=positive_int, default=250, help="SFT steps when the adapter has to be trained first")
    add_base_model_arguments(p)
    p.add_argument("--steps", type=positive_int, default=40, help="GRPO steps")
    p.add_argument("--group-size", type=positive_int, default=8, help="completions sampled per prompt (G >= 2)")
    p.add_argument("--prompts-per-step", type=positive_int, default=4, help="prompts per GRPO step")
    p.add_argument("--max-new-tokens", type=positive_int, default=6, help="longest completion")
    p.add_argument("--method", choices=("qlora", "lora"), default="qlora",
                   help="GRPO adapter: QLoRA (NF4 base of the merged SFT model) or LoRA (full-precision base)")
    p.add_argument("--r", type=positive_int, default=8, help="rank of the GRPO adapter")
    p.add_argument("--alpha", type=finite_float, default=16.0, help="alpha of the GRPO adapter (scaling alpha / r)")
    p.add_argument("--temperature", type=positive_float, default=0.7, help="sampling temperature")
    p.add_argument("--top-p", type=probability, default=None, help="nucleus sampling threshold (default: off)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="learning rate of the adapter")
    p.add_argument("--beta", type=nonnegative_float, default=0.04, help="weight of the KL to the reference (0 skips the reference pass)")
    p.add_argument("--eps-low", type=nonnegative_float, default=0.2, help="lower clip range of the ratio")
    p.add_argument("--eps-high", type=nonnegative_float, default=None, help="upper clip range (default eps-low; larger is clip-higher)")
    p.add_argument("--num-iterations", type=positive_int, default=1, help="optimisation passes over each sampled batch")
    p.add_argument("--loss-type", choices=("grpo", "dapo", "dr_grpo"), default="grpo",
                   help="aggregation: per-sequence mean (grpo), token mean over the batch (dapo), constant (dr_grpo)")
    p.add_argument("--advantage-scale", choices=("group", "batch", "none"), default="group",
                   help="divide advantages by the group std, the batch std, or nothing (Dr. GRPO)")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per step")
    p.add_argument("--heldout", type=positive_int, default=None, help="held-out problems to score (default: all)")
    p.add_argument("--output", default="qlora_fast_output", help="directory for the GRPO adapter, checkpoints and plot")
    add_resume_arguments(p, "--output/grpo-checkpoints")
    add_training_arguments(p)
    p.set_defaults(func=run)


def _train_sft_adapter(path, steps, cache_dir, tokenizer, device, seed, progress):
    """The SFT demo's QLoRA adapter, trained with `qlora-fast finetune`'s defaults and saved to `path`."""
    import torch

    from qlora_fast.data import load_instructions
    from qlora_fast.models import load_base_model
    from qlora_fast.peft import LoraConfig, get_peft_model
    from qlora_fast.train.sft import SFTConfig, SFTTrainer

    print(f"no SFT adapter at {path}: training one first ({steps} SFT steps, QLoRA)")
    torch.manual_seed(seed)
    model, tokenizer = load_base_model(cache_dir=cache_dir, progress=progress, tokenizer=tokenizer)
    peft = get_peft_model(model, LoraConfig(r=8, alpha=16.0, quantize_base="nf4")).to(device)
    config = SFTConfig(max_steps=steps, batch_size=16, lr=3e-3, warmup_steps=15, max_seq_len=96, seed=seed,
                       progress=progress)
    SFTTrainer(peft, tokenizer, load_instructions("train"), None, config).train()
    peft.save_adapter(path)


def _save_plot(history, before, after, path):
    """Reward per step, its moving average and the correctness share, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    reward = [h["reward"] for h in history]
    correct = [h.get("reward/correctness_reward", float("nan")) for h in history]
    window = max(1, len(reward) // 8)
    smooth = [sum(reward[max(0, i - window + 1): i + 1]) / len(reward[max(0, i - window + 1): i + 1]) for i in range(len(reward))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, reward, ".", alpha=0.4, label="mean reward (batch)")
    ax.plot(steps, smooth, "-", label=f"moving average ({window} steps)")
    ax.plot(steps, correct, "--", alpha=0.7, label="share correct (batch)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("reward")
    ax.set_title(f"GRPO on shipped arithmetic: held-out accuracy {100 * before:.1f}% -> {100 * after:.1f}%")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)


def run(args) -> int:
    started = time.time()
    resume_from, allow_fresh = resume_mode(args, os.path.join(args.output, "grpo-checkpoints"))
    device = resolve_device(args.device)
    with check_output(args.output):  # writable, and no other run writing it, before any work
        return _run(args, device, started, resume_from, allow_fresh)


def _run(args, device, started, resume_from, allow_fresh) -> int:
    import torch  # here, not at import: `qlora-fast --help` should not load torch
    from qlora_fast.models import load_base_model
    from qlora_fast.peft import LoraConfig, get_peft_model, load_adapter
    from qlora_fast.train.grpo import GRPOConfig, GRPOTrainer
    from qlora_fast.train.rewards import arithmetic_rewards, load_arithmetic_task

    progress = not args.no_progress
    funcs, weights = arithmetic_rewards()  # the config first: a bad value fails before any training
    config = GRPOConfig(
        steps=args.steps, group_size=args.group_size, prompts_per_step=args.prompts_per_step,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, lr=args.lr,
        beta=args.beta, eps_low=args.eps_low, eps_high=args.eps_high, num_iterations=args.num_iterations,
        loss_type=args.loss_type, advantage_scale=args.advantage_scale, grad_accum_steps=args.grad_accum,
        gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer, reward_weights=weights,
        output_dir=os.path.join(args.output, "grpo-checkpoints"), save_every=args.checkpoint_every,
        seed=args.seed, progress=progress,
    )
    if not os.path.exists(os.path.join(args.sft_adapter, "adapter_config.json")):
        _train_sft_adapter(args.sft_adapter, args.sft_steps, args.cache_dir, args.tokenizer, device, args.seed, progress)
    torch.manual_seed(args.seed)
    base, tokenizer = load_base_model(cache_dir=args.cache_dir, progress=progress, tokenizer=args.tokenizer)
    sft_model = load_adapter(base, args.sft_adapter).merge_and_unload()
    model = get_peft_model(sft_model, LoraConfig(r=args.r, alpha=args.alpha,
                                                 quantize_base="nf4" if args.method == "qlora" else None)).to(device)
    print(f"policy: built-in base + SFT adapter {os.path.abspath(args.sft_adapter)} (merged) + a fresh "
          f"{args.method} adapter ({sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable "
          f"parameters); reference: the same model with the fresh adapter disabled; device {device}")

    trainer = GRPOTrainer(model, tokenizer, funcs, load_arithmetic_task("train"), config)
    heldout = load_arithmetic_task("heldout", limit=args.heldout)
    before = trainer.evaluate(heldout)["reward/correctness_reward"]
    print(f"held-out accuracy before GRPO: {100 * before:.1f}% ({len(heldout)} problems, greedy)")

    history = trainer.train(resume_from_checkpoint=resume_from, allow_fresh=allow_fresh)
    after = trainer.evaluate(heldout)["reward/correctness_reward"]

    print("\nreward curve (batch means):")
    print(f"{'step':>5} {'reward':>7} {'std':>6} {'correct':>7} {'format':>6} {'kl':>7} {'clip':>5} {'len':>4} {'time s':>6}")
    every = max(1, len(history) // 20)
    for h in history:
        if h["step"] % every == 0 or h["step"] in (1, len(history)):
            print(f"{h['step']:>5} {h['reward']:>7.3f} {h['reward_std']:>6.3f} {h['reward/correctness_reward']:>7.3f} "
                  f"{h['reward/format_reward']:>6.3f} {h['kl']:>7.4f} {h['clip_fraction']:>5.2f} "
                  f"{h['completion_length']:>4.1f} {h['time']:>6.2f}")
    plot = os.path.join(args.output, "grpo_reward_curve.png")
    _save_plot(history, before, after, plot)
    adapter_dir = os.path.join(args.output, "adapter-grpo")
    trainer.save_adapter(adapter_dir)
    first = history[: max(1, len(history) // 5)]
    last = history[-max(1, len(history) // 5):]
    print("\n=== qlora-fast grpo report ===")
    print(f"mean reward            {sum(h['reward'] for h in first) / len(first):.3f} (first {len(first)} steps) -> "
          f"{sum(h['reward'] for h in last) / len(last):.3f} (last {len(last)} steps)")
    print(f"held-out accuracy      {100 * before:.1f}% -> {100 * after:.1f}% ({len(heldout)} problems, greedy)")
    print(f"reward curve plot      {os.path.abspath(plot)}")
    print(f"adapter saved to       {os.path.abspath(adapter_dir)}")
    print(f"wall time              {time.time() - started:.0f} s")
    return 0
