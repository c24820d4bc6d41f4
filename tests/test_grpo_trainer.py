"""GRPOTrainer on the built-in model with LoRA / QLoRA adapters: reward goes up on the shipped
task, the reference (adapters off) is untouched, first-step invariants, chunked log-probs vs the
model's own logits, gradient accumulation / checkpointing equivalence, exact resume, bad input
and NaN handling."""
import os

import pytest
import torch
from conftest import assert_close
from helpers import add_adapters, tiny_base, trainable

from qlora_fast.nn import LoRALinear, disable_adapter
from qlora_fast.tokenizer import ByteTokenizer
from qlora_fast.train import GRPOConfig, GRPOTrainer
from qlora_fast.train.grpo import completion_logprobs
from qlora_fast.train.rewards import arithmetic_rewards, correctness_reward, format_reward, load_arithmetic_task


def make_trainer(model=None, seed=0, opt=None, **overrides):
    fns, weights = arithmetic_rewards()
    options = dict(steps=4, group_size=4, prompts_per_step=2, max_new_tokens=4, lr=3e-2, beta=0.04,
                   reward_weights=weights, progress=False, seed=seed)
    options.update(overrides)
    model = model if model is not None else add_adapters(tiny_base(seed))
    return GRPOTrainer(model, ByteTokenizer(), fns, load_arithmetic_task("train"), GRPOConfig(**options), optimizer=opt)


# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_end_to_end_reward_rises_and_reference_is_untouched(one_thread):
    """Seeded run on the shipped task: the training reward and the greedy held-out reward rise by
    a clear margin, and with adapters disabled the model reproduces the original logits exactly."""
    base = tiny_base(seed=0)
    probe = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference_logits = base(input_ids=probe).logits.clone()
    model = add_adapters(base)
    trainer = make_trainer(model, steps=40, group_size=8, prompts_per_step=2, beta=0.01)
    heldout = load_arithmetic_task("heldout", limit=32)
    before = trainer.evaluate(heldout)
    history = trainer.train()
    after = trainer.evaluate(heldout)

    rewards = [h["reward"] for h in history]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.02 and last > 2 * first, f"training reward {first:.4f} -> {last:.4f}"
    # Greedy answers on held-out prompts turn into numbers (seeds 0-5 all go from ~0 to 0.5 here).
    assert after["reward/format_reward"] >= before["reward/format_reward"] + 0.25, f"held-out {before} -> {after}"
    assert after["reward"] >= before["reward"] + 0.05, f"held-out reward {before} -> {after}"
    for h in history:
        for key in ("reward", "reward_std", "kl", "clip_fraction", "completion_length", "time"):
            assert key in h and h[key] == h[key]
    with torch.no_grad(), disable_adapter(model):
        assert torch.equal(model(input_ids=probe).logits, reference_logits)
    with torch.no_grad():
        assert not torch.equal(model(input_ids=probe).logits, reference_logits)


@pytest.mark.parametrize("quantize", [False, True])
def test_first_step_ratio_one_and_kl_zero(one_thread, quantize):
    """Fresh adapters (B = 0): sampling policy == policy == reference, so the first step sees
    ratio exactly 1, KL exactly 0 and nothing clipped."""
    trainer = make_trainer(add_adapters(tiny_base(3), quantize=quantize), beta=0.5)
    log = trainer.train_step()
    assert log["kl"] == 0.0 and log["clip_fraction"] == 0.0
    assert log["ratio_min"] == 1.0 and log["ratio_max"] == 1.0
    log = trainer.train_step()
    assert log["kl"] > 0.0  # the adapters moved, the reference did not


@pytest.mark.parametrize("quantize", [False, True])
def test_completion_logprobs_match_model_logits(seed, quantize):
    model = add_adapters(tiny_base(seed % 1000), quantize=quantize)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.1)  # a non-trivial adapter
    ids = torch.randint(0, 259, (3, 17))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    n = 6
    for temperature, chunk in ((1.0, 5), (0.7, 1024)):
        out = completion_logprobs(model, ids, mask, n, temperature=temperature, chunk_size=chunk)
        logits = model(input_ids=ids, attention_mask=mask).logits.double()[:, -n - 1 : -1]
        expect = torch.log_softmax(logits / temperature, -1).gather(-1, ids[:, -n:, None]).squeeze(-1)
        assert_close(out, expect, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_completion_logprobs_on_transformers_models(seed, arch):
    """transformers models from tiny configs, left-padded: Llama (with LoRA) goes through the
    chunked path, GPT-2 (no `.model`) through full logits; both number positions from the mask
    as generate() does (GPT-2's absolute positions would otherwise shift) and match the model."""
    transformers = pytest.importorskip("transformers")
    if arch == "llama":
        config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = add_adapters(transformers.LlamaForCausalLM(config).eval())
        for m in model.modules():
            if isinstance(m, LoRALinear):
                torch.nn.init.normal_(m.lora_B, std=0.1)
    else:
        config = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 97, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    n = 4
    out = completion_logprobs(model, ids, mask, n, chunk_size=3)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.double()[:, -n - 1 : -1]
    expect = torch.log_softmax(logits, -1).gather(-1, ids[:, -n:, None]).squeeze(-1)
    assert_close(out, expect, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_gradient_accumulation_and_checkpointing_match_one_batch(one_thread, loss_type):
    """SGD with lr 1 makes the update the gradient: micro-batches and recomputed activations
    must give the same update as one full batch."""
    updates = []
    for accum, checkpointing in ((1, False), (4, False), (2, True)):
        model = add_adapters(tiny_base(5, layers=2))
        for m in model.modules():
            if isinstance(m, LoRALinear):
                torch.nn.init.normal_(m.lora_B, std=0.05)
        start = trainable(model)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        trainer = make_trainer(model, seed=5, opt=optimizer, loss_type=loss_type, grad_accum_steps=accum,
                               gradient_checkpointing=checkpointing, max_grad_norm=None)
        trainer.train_step()
        updates.append({n: p.detach() - start[n] for n, p in model.named_parameters() if p.requires_grad})
    for other in updates[1:]:
        for name in updates[0]:
            assert_close(other[name], updates[0][name], atol=1e-6, rtol=1e-4, msg=name)
    assert any(u.abs().max() > 0 for u in updates[0].values())


def test_resume_is_exact(one_thread, tmp_path):
    """4 steps in one go == 2 steps, checkpoint, a fresh process-like restart, 2 more steps."""
    overrides = dict(steps=4, num_iterations=2, beta=0.1, save_every=2)
    straight = make_trainer(seed=7, output_dir=str(tmp_path / "straight"), **overrides)
    straight_history = straight.train()

    first = make_trainer(seed=7, output_dir=str(tmp_path / "split"), **dict(overrides, steps=2))
    first.train()
    assert os.path.exists(first.checkpoint_path(2))
    resumed = make_trainer(seed=7, output_dir=str(tmp_path / "split"), **overrides)
    torch.manual_seed(12345)  # whatever the global RNG holds now must not matter
    resumed_history = resumed.train(resume_from_checkpoint="latest")

    for a, b in zip(straight_history, resumed_history):
        for key in a:
            if key != "time":
                assert a[key] == b[key], (key, a, b)
    s, r = trainable(straight.model), trainable(resumed.model)
    assert all(torch.equal(s[n], r[n]) for n in s)


def test_resumed_eval_history_equals_the_uninterrupted_runs(one_thread, tmp_path):
    """The held-out evaluations survive a resume: the checkpoint carries eval_history, so the
    report's "before" is step 0's accuracy, not the checkpoint's (evaluated afresh only at a fresh start)."""
    heldout = load_arithmetic_task("heldout")[:4]
    overrides = dict(steps=4, eval_every=1, save_every=2)
    straight = make_trainer(seed=3, output_dir=str(tmp_path / "straight"), **overrides)
    straight.train(eval_dataset=heldout)
    first = make_trainer(seed=3, output_dir=str(tmp_path / "split"), **dict(overrides, steps=2))
    first.train(eval_dataset=heldout)
    resumed = make_trainer(seed=3, output_dir=str(tmp_path / "split"), **overrides)
    resumed.train(resume_from_checkpoint="latest", eval_dataset=heldout)
    assert [s for s, _ in straight.eval_history] == [0, 1, 2, 3, 4]
    assert resumed.eval_history == straight.eval_history


def test_qlora_with_paged_8bit_optimizer(one_thread, tmp_path):
    trainer = make_trainer(add_adapters(tiny_base(9), quantize=True), optimizer="paged_adamw_8bit", steps=2,
                           grad_accum_steps=2, gradient_checkpointing=True)
    start = trainable(trainer.model)
    history = trainer.train()
    assert len(history) == 2
    end = trainable(trainer.model)
    assert any(not torch.equal(start[n], end[n]) for n in start)
    assert all(torch.isfinite(t).all() for t in end.values())
    path = tmp_path / "adapter.safetensors"
    trainer.save_adapter(str(path))
    from safetensors.torch import load_file

    saved = load_file(str(path))
    assert set(saved) == set(end) and all(torch.equal(saved[n], end[n]) for n in end)


def test_peft_model_uses_chunked_logprobs_and_saves_its_adapter(one_thread, tmp_path):
    """A `get_peft_model` QLoRA model trains through the chunked path; its saved adapter loads into
    a fresh base and gives the trained model's logits."""
    from qlora_fast.peft import LoraConfig, get_peft_model, load_adapter
    from qlora_fast.train.grpo import _output_layer

    peft = get_peft_model(tiny_base(11), LoraConfig(r=4, lora_alpha=8, quantize_base="nf4"))
    assert _output_layer(peft) is not None
    trainer = make_trainer(peft, steps=2)
    trainer.train()
    trainer.save_adapter(str(tmp_path / "adapter"))
    probe = torch.randint(0, 256, (2, 15))
    loaded = load_adapter(tiny_base(11), str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=probe).logits, peft(input_ids=probe).logits)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------
def test_group_size_below_two_is_rejected():
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=1)


@pytest.mark.parametrize("overrides,match", [
    (dict(loss_type="ppo"), "loss_type"), (dict(advantage_scale="x"), "advantage_scale"),
    (dict(temperature=0.0), "temperature"), (dict(grad_accum_steps=3), "grad_accum_steps"),
    (dict(optimizer="sgd"), "optimizer"), (dict(save_every=2), "output_dir"), (dict(steps=0), "steps"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(eval_every=-1), "eval_every"),
])
def test_bad_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        GRPOConfig(**overrides)


def test_empty_dataset_and_prompts_are_rejected():
    model = add_adapters(tiny_base(0))
    fns, _ = arithmetic_rewards()
    with pytest.raises(ValueError, match="empty"):
        GRPOTrainer(model, ByteTokenizer(), fns, [], GRPOConfig())
    with pytest.raises(ValueError, match="empty prompt"):
        GRPOTrainer(model, ByteTokenizer(), fns, [{"prompt": "What is 1 + 1?"}, {"prompt": "  "}], GRPOConfig())
    with pytest.raises(ValueError, match="no trainable"):
        GRPOTrainer(tiny_base(0).requires_grad_(False), ByteTokenizer(), fns, [{"prompt": "x"}], GRPOConfig())


def _raises(p, c, **k):
    raise KeyError("no such field")


@pytest.mark.parametrize("bad,error,match", [
    (lambda p, c, **k: [0.0] * (len(c) - 1), ValueError, "returned 7 rewards for 8"),
    (lambda p, c, **k: ["high"] * len(c), ValueError, "must return floats"),
    (lambda p, c, **k: None, ValueError, "must return floats"),
    (_raises, RuntimeError, "reward function _raises raised KeyError"),
])
def test_bad_reward_function(one_thread, bad, error, match):
    trainer = make_trainer(group_size=4, prompts_per_step=2)
    trainer.reward_funcs = [correctness_reward, bad]
    trainer.reward_weights = [1.0, 1.0]
    start = trainable(trainer.model)
    with pytest.raises(error, match=match):
        trainer.train_step()
    assert trainer.step == 0 and all(torch.equal(p, start[n]) for n, p in trainable(trainer.model).items())


def test_nan_reward_skips_its_group_with_a_counted_warning(one_thread):
    """A NaN reward drops its whole group from the loss (warning, counter); the other group
    still trains; a step where every group is NaN changes nothing and the weights stay finite."""
    def nan_in_first_group(p, c, **k):
        return [float("nan")] + [float(i % 3) for i in range(1, len(c))]

    trainer = make_trainer(group_size=4, prompts_per_step=2, beta=0.0)
    trainer.reward_funcs, trainer.reward_weights = [nan_in_first_group], [1.0]
    start = trainable(trainer.model)
    with pytest.warns(RuntimeWarning, match="1 group"):
        log = trainer.train_step()
    assert trainer.skipped_nan_groups == 1 and log["skipped_groups"] == 1
    assert log["reward"] == pytest.approx(sum(float(i % 3) for i in range(1, 8)) / 7)
    moved = trainable(trainer.model)
    assert any(not torch.equal(moved[n], start[n]) for n in start)
    assert all(torch.isfinite(t).all() for t in moved.values())

    trainer.reward_funcs = [lambda p, c, **k: [float("nan")] * len(c)]
    with pytest.warns(RuntimeWarning, match="2 group"):
        log = trainer.train_step()
    assert trainer.skipped_nan_groups == 3 and trainer.step == 2
    assert all(torch.equal(t, moved[n]) for n, t in trainable(trainer.model).items())


def test_zero_variance_groups_are_counted_and_optionally_dropped(one_thread):
    """Group 1 all ties, group 2 varies: the fraction is 1/2; with the DAPO filter the update is
    the one of group 2 alone (SGD lr 1: the update is the gradient)."""
    def first_group_ties(p, c, **k):
        return [1.0] * (len(c) // 2) + [float(i % 2) for i in range(len(c) // 2)]

    updates = []
    for drop in (False, True):
        model = add_adapters(tiny_base(6))
        for m in model.modules():
            if isinstance(m, LoRALinear):
                torch.nn.init.normal_(m.lora_B, std=0.05)
        start = trainable(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        trainer = make_trainer(model, seed=6, opt=opt, group_size=4, prompts_per_step=2, beta=0.0, loss_type="dapo",
                               drop_zero_variance_groups=drop, max_grad_norm=None)
        trainer.reward_funcs, trainer.reward_weights = [first_group_ties], [1.0]
        log = trainer.train_step()
        assert log["zero_variance_fraction"] == 0.5 and log["skipped_groups"] == int(drop)
        updates.append({n: p.detach() - start[n] for n, p in model.named_parameters() if p.requires_grad})
    # Kept, the tied group has zero advantage (and beta = 0: zero gradient) but its tokens count
    # in DAPO's token mean, so dropping it scales every update by one factor, (all tokens) /
    # (group-2 tokens) > 1.
    factor = [(updates[1][n].norm() / updates[0][n].norm()).item() for n in updates[0] if updates[0][n].norm() > 0]
    assert factor and min(factor) > 1.0
    assert max(factor) == pytest.approx(min(factor), rel=1e-4)
    for n in updates[0]:
        assert_close(updates[1][n], updates[0][n] * factor[0], atol=1e-6, rtol=1e-4, msg=n)
    assert all(torch.isfinite(u).all() for u in updates[1].values())


def test_nan_loss_stops_and_keeps_the_adapter(one_thread, tmp_path):
    trainer = make_trainer(steps=3, output_dir=str(tmp_path), save_every=1)
    trainer.train_step()
    trainer.save_checkpoint(trainer.checkpoint_path(1))
    good = trainable(trainer.model)

    def poison(module, args, output):  # NaN only in the differentiable (training) forward
        if torch.is_grad_enabled():
            hidden, cache = output
            return hidden * float("nan"), cache
        return output

    handle = trainer.model.model.register_forward_hook(poison)
    with pytest.raises(FloatingPointError, match="loss is nan"):
        trainer.train()
    handle.remove()
    after = trainable(trainer.model)
    assert all(torch.equal(good[n], after[n]) for n in good)
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(trainer.checkpoint_path(1))]
    fresh = make_trainer(steps=3, output_dir=str(tmp_path))
    fresh.load_checkpoint(trainer.checkpoint_path(1))
    assert all(torch.equal(good[n], p) for n, p in trainable(fresh.model).items())


def test_reward_functions_by_hand():
    prompts = ["p"] * 6
    completions = ["7", "7\n", " 7 ", "12", "7 apples", "-3\nmore"]
    assert correctness_reward(prompts, completions, answer=[7, 7, 7, 7, 7, -3]) == [1, 1, 1, 0, 0, 1]
    # Half for the digit share of the first line, half for a clean bare integer.
    assert format_reward(prompts, completions) == [1.0, 1.0, 1.0, 1.0, 0.5 * 1 / 8, 0.5]
    assert format_reward(["p"], [""]) == [0.0]
    # A completion cut off at the length limit is not well formed, even if it reads as a number.
    assert format_reward(["p", "p"], ["12", "12"], stopped=[True, False]) == [1.0, 0.5]
    with pytest.raises(ValueError, match="answers"):
        correctness_reward(["p"], ["1"], answer=[1, 2])


def test_shipped_task_answers_and_planted_teacher_error():
    """Every shipped problem's answer re-derived from its text; the held-out split is disjoint from
    training and its `demo` is the true answer; the warm-start demonstrations repeat the number on
    exactly 60% of the training problems and are right on the rest (the planted error the docs
    describe), and `warmstart_pairs` trains on those demonstrations."""
    import re

    from qlora_fast.train.rewards import warmstart_pairs

    splits = {split: load_arithmetic_task(split) for split in ("train", "heldout")}
    assert len(splits["heldout"]) == 300 and len(splits["train"]) == 1140
    assert not {r["instruction"] for r in splits["train"]} & {r["instruction"] for r in splits["heldout"]}
    repeats = 0
    for split, rows in splits.items():
        for r in rows:
            n, op = re.fullmatch(r"What is (\d{3}) ([+-]) 1\?", r["instruction"]).groups()
            n = int(n)
            assert r["answer"] == (n + 1 if op == "+" else n - 1) and 1 <= n % 10 <= 8
            assert r["demo"] == r["answer"] or (split == "train" and r["demo"] == n)
            repeats += r["demo"] != r["answer"]
    assert repeats == round(0.6 * 1140)
    pairs = warmstart_pairs("train")
    assert [p["output"] for p in pairs] == [f"{r['demo']}." for r in splits["train"]]


# ------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("matplotlib", [True, False], ids=["plot", "no-matplotlib"])
def test_grpo_command_end_to_end(one_thread, tmp_path, monkeypatch, capsys, matplotlib):
    """`qlora-fast grpo` with a tiny base in place of the pretrained one: trains the SFT adapter
    first (absent), merges it, runs GRPO, writes the plot and the adapter, reports accuracy.
    Without matplotlib (a test extra) the adapter is still saved and the run says why no plot."""
    import sys

    import qlora_fast.models
    from qlora_fast.cli import main

    if not matplotlib:
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError

    asked = []
    monkeypatch.setattr(
        qlora_fast.models,
        "load_base_model",
        lambda cache_dir=None, progress=True, tokenizer="bpe": asked.append(tokenizer)
        or (tiny_base(4).eval(), ByteTokenizer()),
    )
    out, sft = tmp_path / "out", tmp_path / "sft"
    code = main(["grpo", "--sft-adapter", str(sft), "--sft-steps", "2", "--steps", "2", "--group-size", "2",
                 "--prompts-per-step", "2", "--max-new-tokens", "3", "--heldout", "4", "--output", str(out),
                 "--checkpoint-every", "1", "--no-progress"])
    assert code == 0
    assert asked == ["bpe", "bpe"]  # the SFT adapter and the GRPO policy on the same (default) base
    text = capsys.readouterr().out
    assert "no SFT adapter" in text and "held-out accuracy" in text and "reward curve" in text
    assert (sft / "adapter_config.json").exists()
    if matplotlib:
        assert (out / "grpo_reward_curve.png").stat().st_size > 1000
    else:
        assert "matplotlib is not installed" in text and not (out / "grpo_reward_curve.png").exists()
    assert (out / "adapter-grpo" / "adapter_model.safetensors").exists()
    assert len(list((out / "grpo-checkpoints").glob("checkpoint-*.pt"))) == 2


@pytest.mark.parametrize("arch,config", [
    ("Gemma2Config", dict(head_dim=8, final_logit_softcapping=0.5)),
    ("CohereConfig", dict(logit_scale=0.25)),
    ("GraniteConfig", dict(logits_scaling=4.0)),
    ("LlamaConfig", {}),
    ("OPTConfig", dict(ffn_dim=64, word_embed_proj_dim=32)),
])
def test_logprobs_follow_the_model_logits_whatever_follows_the_head(arch, config, seed):
    """Gemma 2's softcapping, Cohere's and Granite's logit scales act after lm_head: the chunked
    path (lm_head over the hidden states) would score another distribution than the model samples
    from, so only plain heads (Llama here) take it. Oracle: log_softmax of the model's own logits."""
    transformers = pytest.importorskip("transformers")
    from qlora_fast.models import positions_from_mask
    from qlora_fast.train.grpo import _output_layer, completion_logprobs

    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
    if arch != "OPTConfig":
        common.update(intermediate_size=64, num_key_value_heads=2)
    cfg = getattr(transformers, arch)(**common, **config)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)  # large logits: a transform after the head shows
    assert (_output_layer(model) is not None) == (arch in ("LlamaConfig", "OPTConfig"))  # plain heads chunk
    ids = torch.randint(0, 100, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded prompt
    with torch.no_grad():
        ours = completion_logprobs(model, ids, mask, 4, temperature=0.7)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        want = torch.log_softmax(logits[:, -5:-1].double() / 0.7, -1).gather(-1, ids[:, -4:, None]).squeeze(-1)
    torch.testing.assert_close(ours.double(), want, atol=1e-4, rtol=1e-4)


def test_a_checkpoint_whose_sampling_state_does_not_fit_changes_nothing(one_thread, tmp_path):
    """A checkpoint whose sampling-generator state this trainer's generator cannot take (as a CPU
    run's on a CUDA resume: 5056 bytes against 16) is refused with ValueError before anything is
    restored: the adapter, the optimizer, the scheduler and the step stay as they were."""
    import copy

    saver = make_trainer(steps=3, output_dir=str(tmp_path / "a"), save_every=1)
    saver.train_step()
    saver.step = 1
    path = saver.save_checkpoint()
    state = torch.load(path, weights_only=True)
    state["extra"]["sample_rng"] = torch.randint(0, 256, (16,), dtype=torch.uint8)  # another device's state
    torch.save(state, path)

    trainer = make_trainer(steps=3, output_dir=str(tmp_path / "a"))
    trainer.train_step()  # its own adapter, optimizer and scheduler state differ from the checkpoint's
    params, optim = trainable(trainer.model), copy.deepcopy(trainer.optimizer.state_dict())
    sched, step = trainer.scheduler.state_dict(), trainer.step
    with pytest.raises(ValueError, match="sampling generator"):
        trainer.load_checkpoint(path)
    assert trainer.step == step and trainer.scheduler.state_dict() == sched
    assert all(torch.equal(params[n], p) for n, p in trainable(trainer.model).items())
    after = trainer.optimizer.state_dict()
    for k, s in optim["state"].items():
        for name, v in s.items():
            w = after["state"][k][name]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w
