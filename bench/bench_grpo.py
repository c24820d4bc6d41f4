"""GRPO on the CPU: generation speed, log-prob memory and a whole GRPO step, each against its peer
in the same run.

- generation (tokens generated per second): `generate()` with the KV cache vs re-running the
  whole prefix every step (what a cache-less sampler does);
- per-token log-probs, forward + backward, vocabulary 32k: `sequence_logprobs` (chunked, logits
  recomputed in backward) vs full logits + log_softmax; time here, peak memory in the summary;
- one GRPO step (sample, score, reference pass, loss, backward, optimizer) on the built-in model
  with LoRA vs QLoRA (NF4 base).

`pytest bench/bench_grpo.py --benchmark-only` for pytest-benchmark tables;
`python bench/bench_grpo.py` for a summary with ratios and peak memory (used for RESULTS.md);
`python bench/bench_grpo.py --rl [0,1,2]` for the RL results (GRPO over seeds, PPO vs GRPO).
Peak memory: growth of the resident-set high-water mark (/proc VmHWM, reset through clear_refs) over
one run of a provider in a fresh process; the CPU has no counter like torch.cuda.max_memory_allocated.
"""
import os
import subprocess
import sys
import time

import pytest
import torch
from timing import median, run_times

from qlora_fast.models import BASE_CONFIG, LlamaForCausalLM
from qlora_fast.models.generate import generate
from qlora_fast.nn import replace_linear
from qlora_fast.nn.lora import mark_only_lora_as_trainable
from qlora_fast.tokenizer import ByteTokenizer
from qlora_fast.train import GRPOConfig, GRPOTrainer
from qlora_fast.train.policy_gradient import sequence_logprobs
from qlora_fast.train.rewards import arithmetic_rewards, load_arithmetic_task

GEN_BATCH, GEN_PROMPT, GEN_NEW = 16, 48, 16
LP_TOKENS, LP_HIDDEN, LP_VOCAB, LP_CHUNK = 1024, 128, 32000, 128
STEP_NEW = 8
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def built_in_model(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(BASE_CONFIG).eval()


@torch.no_grad()
def generate_without_cache(model, ids, max_new_tokens, generator):
    """The peer: sample by re-running the whole sequence for every new token."""
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids).logits[:, -1].float()
        nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
        ids = torch.cat([ids, nxt], 1)
    return ids


def gen_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (GEN_BATCH, GEN_PROMPT), generator=g)


def run_generate(model, ids, provider):
    g = torch.Generator().manual_seed(1)
    if provider == "kv_cache":
        return generate(model, ids, max_new_tokens=GEN_NEW, temperature=1.0, generator=g)
    return generate_without_cache(model, ids, GEN_NEW, g)


def logprob_inputs():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(LP_TOKENS, LP_HIDDEN, generator=g).requires_grad_(True)
    weight = (torch.randn(LP_VOCAB, LP_HIDDEN, generator=g) / LP_HIDDEN**0.5).requires_grad_(True)
    targets = torch.randint(0, LP_VOCAB, (LP_TOKENS,), generator=g)
    return hidden, weight, targets


def run_logprobs(hidden, weight, targets, provider):
    if provider == "chunked":
        out = sequence_logprobs(hidden, weight, targets, chunk_size=LP_CHUNK)
    else:
        out = torch.log_softmax(hidden @ weight.t(), -1).gather(-1, targets[:, None]).squeeze(-1)
    out.sum().backward()
    hidden.grad = weight.grad = None


def grpo_trainer(quantize):
    model = built_in_model()
    replace_linear(model, quant_type="nf4" if quantize else None, target_modules=TARGETS, r=8, lora_alpha=16)
    mark_only_lora_as_trainable(model)
    fns, weights = arithmetic_rewards()
    config = GRPOConfig(max_steps=1_000_000, group_size=8, prompts_per_step=4, max_new_tokens=STEP_NEW, beta=0.04,
                        reward_weights=weights, progress=False)
    return GRPOTrainer(model, ByteTokenizer(), fns, load_arithmetic_task("train"), config)


# ------------------------------------------------------------------------------------------ pytest
@pytest.mark.parametrize("provider", ["kv_cache", "no_cache"])
def test_generate(benchmark, provider):
    model, ids = built_in_model(), gen_inputs()
    benchmark.extra_info["new_tokens"] = GEN_BATCH * GEN_NEW
    benchmark.pedantic(run_generate, args=(model, ids, provider), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("provider", ["chunked", "full_logits"])
def test_logprobs_forward_backward(benchmark, provider):
    hidden, weight, targets = logprob_inputs()
    benchmark.pedantic(run_logprobs, args=(hidden, weight, targets, provider), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("provider", ["lora", "qlora"])
def test_grpo_step(benchmark, provider):
    trainer = grpo_trainer(provider == "qlora")
    benchmark.pedantic(trainer.train_step, rounds=3, warmup_rounds=1)


# ------------------------------------------------------------------------------------------ summary
def _median_time(fn, rounds=3):
    return median(run_times(fn, rounds))


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _measure_in_this_process(kind, provider):
    """Set up one provider, reset the resident-set high-water mark, run it once, print the growth."""
    if kind == "logprobs":
        hidden, weight, targets = logprob_inputs()
        fn = lambda: run_logprobs(hidden, weight, targets, provider)  # noqa: E731
    else:
        trainer = grpo_trainer(provider == "qlora")
        fn = trainer.train_step
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    fn()
    print((_status_kib("VmHWM") - base) / 1024)


def peak_mib(kind, provider):
    """Peak resident-set growth (MiB) of one run of a provider in a fresh process (so earlier
    runs' freed-but-kept heap does not hide it); NaN where /proc is unavailable (not Linux)."""
    if not os.path.exists("/proc/self/clear_refs"):
        return float("nan")
    # Large blocks straight from mmap and back on free, so the resident set follows live tensors
    # instead of glibc's heap, which keeps freed blocks and hides or inflates the figure.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--peak", kind, provider],
                         capture_output=True, text=True, check=True, env=env).stdout
    return float(out.strip().splitlines()[-1])


def main():
    torch.manual_seed(0)
    print(f"# bench_grpo on CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    model, ids = built_in_model(), gen_inputs()
    gen = {p: _median_time(lambda: run_generate(model, ids, p)) for p in ("kv_cache", "no_cache")}
    n = GEN_BATCH * GEN_NEW
    print(f"generate {GEN_BATCH}x({GEN_PROMPT}+{GEN_NEW}) built-in model: KV cache {n / gen['kv_cache']:.0f} tok/s, "
          f"no cache {n / gen['no_cache']:.0f} tok/s ({gen['no_cache'] / gen['kv_cache']:.2f}x)")
    hidden, weight, targets = logprob_inputs()
    lp = {p: _median_time(lambda: run_logprobs(hidden, weight, targets, p)) for p in ("chunked", "full_logits")}
    mem = {p: peak_mib("logprobs", p) for p in ("chunked", "full_logits")}
    print(f"log-probs fwd+bwd {LP_TOKENS} tokens x vocab {LP_VOCAB} (hidden {LP_HIDDEN}, chunk {LP_CHUNK}): "
          f"chunked {lp['chunked'] * 1e3:.0f} ms / +{mem['chunked']:.0f} MiB peak, "
          f"full logits {lp['full_logits'] * 1e3:.0f} ms / +{mem['full_logits']:.0f} MiB peak "
          f"(time {lp['chunked'] / lp['full_logits']:.2f}x)")
    for provider in ("lora", "qlora"):
        trainer = grpo_trainer(provider == "qlora")
        step = _median_time(trainer.train_step)
        print(f"GRPO step, built-in model ({provider}), 4 prompts x G=8, {STEP_NEW} new tokens, beta 0.04: "
              f"{step * 1e3:.0f} ms, +{peak_mib('step', provider):.0f} MiB peak")


# ------------------------------------------------------------------------------------------ RL
# `python bench/bench_grpo.py --rl [seeds]`: `qlora-fast grpo` at its defaults for each seed
# (held-out accuracy, KL, length, zero-variance groups, wall time), then PPO (critic) vs GRPO
# (group) from the same warm-started policy and budget, each in a fresh process: accuracy, wall
# time, peak resident-set growth of the training loop. Uses the cached base ($QLORA_FAST_CACHE).
def _report_value(text, label):
    line = next(l for l in text.splitlines() if l.startswith(label))
    return line[len(label):].strip()


def rl_command(seed):
    import re

    cmd = ("import sys, torch; torch.set_num_threads(1); from qlora_fast.cli import main; "
           f"raise SystemExit(main(['grpo', '--no-progress', '--seed', '{seed}', '--output', sys.argv[1]]))")
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        text = subprocess.run([sys.executable, "-c", cmd, out], capture_output=True, text=True, check=True).stdout
    acc = re.findall(r"(-?[\d.]+)%", _report_value(text, "held-out accuracy"))
    practice = re.findall(r"(-?[\d.]+)%", _report_value(text, "practice accuracy"))
    return {
        "before": float(acc[0]),
        "after": float(acc[1]),
        "p_before": float(practice[0]),
        "p_after": float(practice[1]),
        "kl": float(_report_value(text, "KL to the reference").split()[0]),
        "length": _report_value(text, "completion length").split(" tokens")[0],
        "zero_var": _report_value(text, "zero-variance groups").split("%")[0],
        "wall": float(_report_value(text, "wall time").split()[0]),
    }


def _rl_trainer(kind, seed, steps):
    from qlora_fast.commands.grpo import (
        LR,
        MAX_NEW_TOKENS,
        PRACTICE,
        PROMPTS_PER_STEP,
        SFT_STEPS,
        TEMPERATURE,
        warmstart_dir,
    )
    from qlora_fast.models import load_base_model
    from qlora_fast.peft import LoraConfig, get_peft_model, load_adapter
    from qlora_fast.train import PPOConfig, PPOTrainer
    from qlora_fast.train.rewards import answer_stop_ids, arithmetic_rewards, load_arithmetic_task

    warm = warmstart_dir(None, "bpe", SFT_STEPS, 0)  # written by the `qlora-fast grpo` runs above
    torch.manual_seed(seed)
    base, tok = load_base_model(progress=False)
    model = get_peft_model(load_adapter(base, warm).merge_and_unload(),
                           LoraConfig(r=8, lora_alpha=16.0, quantize_base="nf4"))
    funcs, weights = arithmetic_rewards()
    common = dict(max_steps=steps, max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, lr=LR, beta=0.04,
                  reward_weights=weights, stop_token_ids=answer_stop_ids(tok), progress=False, seed=seed)
    if kind == "ppo":
        config = PPOConfig(group_size=1, prompts_per_step=8 * PROMPTS_PER_STEP, value_lr=1e-2, **common)
        return PPOTrainer(model, tok, funcs, load_arithmetic_task("train", limit=PRACTICE or None), config)
    return GRPOTrainer(model, tok, funcs, load_arithmetic_task("train", limit=PRACTICE or None),
                       GRPOConfig(group_size=8, prompts_per_step=PROMPTS_PER_STEP, **common))


def _rl_run_in_this_process(kind, seed, steps):
    import json

    from qlora_fast.train.rewards import load_arithmetic_task

    torch.set_num_threads(1)
    trainer = _rl_trainer(kind, int(seed), int(steps))
    heldout = load_arithmetic_task("heldout")
    before = trainer.evaluate(heldout)["reward/correctness_reward"]
    p_before = trainer.evaluate(trainer.dataset)["reward/correctness_reward"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    peak = (_status_kib("VmHWM") - base) / 1024
    after = trainer.evaluate(heldout)["reward/correctness_reward"]
    p_after = trainer.evaluate(trainer.dataset)["reward/correctness_reward"]
    print(
        json.dumps(
            {"before": before, "after": after, "p_before": p_before, "p_after": p_after, "wall": wall, "peak_mib": peak}
        )
    )


def rl_main(seeds):
    import json
    import statistics

    print(f"# RL on CPU, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    runs = []
    for seed in seeds:
        r = rl_command(seed)
        runs.append(r)
        print(f"qlora-fast grpo --seed {seed}: practice {r['p_before']:.1f}% -> {r['p_after']:.1f}% "
              f"({r['p_after'] - r['p_before']:+.1f}), held-out {r['before']:.1f}% -> {r['after']:.1f}% "
              f"({r['after'] - r['before']:+.1f}), KL {r['kl']:.4f}, length {r['length']}, zero-variance groups "
              f"{r['zero_var']}%, wall {r['wall']:.0f} s")
    for name, b, a in (("practice", "p_before", "p_after"), ("held-out", "before", "after")):
        gains = [r[a] - r[b] for r in runs]
        spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
        print(f"{name} gain over {len(gains)} seeds: mean {statistics.mean(gains):+.1f} points, std {spread:.1f}, "
              f"min {min(gains):+.1f}, max {max(gains):+.1f}")
    from qlora_fast.commands.grpo import STEPS

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
    for kind in ("grpo", "ppo"):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--rl-run", kind, str(seeds[0]), str(STEPS)],
                             capture_output=True, text=True, check=True, env=env).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(
            f"{kind.upper():4} ({'critic' if kind == 'ppo' else 'group'}), seed {seeds[0]}, {STEPS} steps x 64 "
            "samples: "
            f"practice {100 * r['p_before']:.1f}% -> {100 * r['p_after']:.1f}%, "
            f"held-out {100 * r['before']:.1f}% -> {100 * r['after']:.1f}%, wall {r['wall']:.0f} s, "
            f"+{r['peak_mib']:.0f} MiB peak"
        )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--peak":
        _measure_in_this_process(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 5 and sys.argv[1] == "--rl-run":
        _rl_run_in_this_process(*sys.argv[2:])
    elif len(sys.argv) >= 2 and sys.argv[1] == "--rl":
        rl_main([int(s) for s in (sys.argv[2] if len(sys.argv) > 2 else "0,1,2").split(",")])
    else:
        main()
