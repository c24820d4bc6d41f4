"""The one trainer core (qlora_fast/train/core.py) under SFT and GRPO, and the one optimizer
registry: both trainers resolve "latest" the same way, stop on NaN the same way, clip the same way
and build the optimizer a name gives; the old field names, argument names and CLI flags still work
for one release, with a DeprecationWarning."""
import dataclasses
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import assert_close

from qlora_fast.models import LlamaConfig, LlamaForCausalLM
from qlora_fast.peft import LoraConfig, PrefixTuningConfig, get_peft_model
from qlora_fast.tokenizer import ByteTokenizer
from qlora_fast.train import GRPOConfig, GRPOTrainer, PPOConfig, SFTConfig, SFTTrainer
from qlora_fast.train.core import clip_gradients
from qlora_fast.train.rewards import load_arithmetic_task

TINY = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                   max_seq_len=64)
PAIRS = [{"instruction": f"Add {i} and {i + 3}.", "output": str(2 * i + 3)} for i in range(10)]
KINDS = ("SFT", "GRPO")


def tiny_peft(seed=0):
    torch.manual_seed(seed)
    return get_peft_model(LlamaForCausalLM(TINY), LoraConfig(r=2))


def make(kind, out=None, model=None, opt=None, **overrides):
    """A 2-step trainer of `kind` on a tiny LoRA model, configured with the shared field names only."""
    common = dict(max_steps=2, warmup_steps=0, optimizer="torch_adamw", progress=False, lr=1e-2,
                  output_dir=None if out is None else str(out))
    common.update(overrides)
    model = model if model is not None else tiny_peft()
    if kind == "SFT":
        return SFTTrainer(model, ByteTokenizer(), PAIRS, config=SFTConfig(batch_size=2, max_seq_len=48, **common),
                          optimizer=opt)
    config = GRPOConfig(group_size=2, prompts_per_step=2, max_new_tokens=3, **common)
    return GRPOTrainer(model, ByteTokenizer(), varied_reward, load_arithmetic_task("train")[:6], config, optimizer=opt)


def varied_reward(prompts, completions, **fields):
    """Rewards that differ within a group (so GRPO has a gradient at its first step)."""
    return [float(sum(map(ord, c)) % 97) for c in completions]


def adapter(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------ resume
def test_latest_without_a_checkpoint_behaves_the_same_in_sft_and_grpo(tmp_path):
    """Both raise the same FileNotFoundError (naming the directory and the way out), both start
    fresh with allow_fresh, and both resume the newest checkpoint once there is one."""
    messages = {}
    for kind in KINDS:
        out = tmp_path / kind
        trainer = make(kind, out, checkpoint_every=1)
        with pytest.raises(FileNotFoundError) as e:
            trainer.train(resume_from_checkpoint="latest")
        messages[kind] = str(e.value).replace(str(out), "<dir>")
        assert trainer.step == 0 and not os.listdir(out)
        history = trainer.train(resume_from_checkpoint="latest", allow_fresh=True)
        assert [h["step"] for h in history] == [1, 2]
        assert sorted(os.listdir(out)) == ["checkpoint-1.pt", "checkpoint-2.pt"]
        # with a checkpoint there, "latest" resumes it (allow_fresh or not) and trains the remaining steps
        more = make(kind, out, max_steps=3, checkpoint_every=1)
        assert [h["step"] for h in more.train(resume_from_checkpoint="latest")] == [1, 2, 3]
    assert messages["SFT"] == messages["GRPO"]
    assert "no checkpoint-*.pt in '<dir>'" in messages["SFT"] and "allow_fresh=True" in messages["SFT"]


# ------------------------------------------------------------------------------ NaN
def _poison_training_forward(model):
    """NaN hidden states, only in the forward that builds the graph (GRPO samples without grad)."""
    def hook(module, args, output):
        if not torch.is_grad_enabled():
            return output
        if isinstance(output, tuple):
            return (output[0] * float("nan"),) + tuple(output[1:])
        return output * float("nan")

    return model.base_model.model.register_forward_hook(hook)


def test_nan_loss_and_gradient_are_handled_the_same_in_sft_and_grpo(tmp_path):
    """The same guard in both: FloatingPointError naming the trainer and step, before the optimizer
    step; gradients cleared, the adapter and step unchanged, nothing checkpointed, nothing logged."""
    messages = {"loss": {}, "grad": {}}
    for kind in KINDS:
        model = tiny_peft(seed=1)
        trainer = make(kind, tmp_path / kind, model=model, checkpoint_every=1)
        before = adapter(model)
        for what in ("loss", "grad"):
            if what == "loss":
                handle = _poison_training_forward(model)
            else:
                lora_b = next(p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)
                handle = lora_b.register_hook(lambda g: torch.full_like(g, float("inf")))
            with pytest.raises(FloatingPointError) as e:
                trainer.train()
            handle.remove()
            messages[what][kind] = str(e.value).replace(kind, "<trainer>")
            assert str(e.value).startswith(f"{kind} step 1: ")
            assert all(p.grad is None for p in model.parameters() if p.requires_grad)
            assert all(torch.equal(before[n], p) for n, p in adapter(model).items())
            assert trainer.step == 0 and trainer.history == [] and not os.listdir(tmp_path / kind)
    assert messages["loss"]["SFT"] == messages["loss"]["GRPO"]
    assert messages["grad"]["SFT"] == messages["grad"]["GRPO"]
    assert "the loss is nan" in messages["loss"]["SFT"] and "a gradient is NaN or inf" in messages["grad"]["SFT"]


# ------------------------------------------------------------------------------ clipping
@pytest.mark.parametrize("max_norm", [None, 0.5, 1e-3, 7.0])
def test_clip_gradients_against_float64(seed, max_norm):
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((7, 3), (1,), (5,))]
    for p in params:
        p.grad = torch.distributions.StudentT(2.0).sample(p.shape) * 3  # heavy tails
    params.append(torch.nn.Parameter(torch.randn(4)))  # no gradient: left out
    grads64 = [p.grad.double().clone() for p in params[:3]]
    norm64 = torch.cat([g.reshape(-1) for g in grads64]).norm()
    assert clip_gradients(params, max_norm) == pytest.approx(float(norm64), rel=1e-6)
    scale = 1.0 if max_norm is None else min(1.0, max_norm / (float(norm64) + 1e-6))
    for p, g in zip(params, grads64):
        assert_close(p.grad, g * scale, rtol=1e-6, atol=1e-12)
    assert params[3].grad is None
    assert clip_gradients([params[3]], max_norm) == 0.0


class RecordingSGD(torch.optim.SGD):
    """SGD that records the total gradient norm it is asked to apply (float64)."""

    def __init__(self, params, lr=1e-2):
        super().__init__(params, lr=lr)
        self.norms = []

    def step(self, closure=None):
        grads = [p.grad.double().reshape(-1) for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.norms.append(float(torch.cat(grads).norm()))
        return super().step(closure)


@pytest.mark.parametrize("kind", KINDS)
def test_both_trainers_clip_to_max_grad_norm_and_log_the_norm_before(kind):
    runs = {}
    for max_norm in (None, 1e-4):
        model = tiny_peft(seed=2)
        opt = RecordingSGD([p for p in model.parameters() if p.requires_grad])
        history = make(kind, model=model, opt=opt, max_steps=1, max_grad_norm=max_norm).train()
        runs[max_norm] = (opt.norms[0], history[0]["grad_norm"])
    unclipped, logged = runs[None]
    assert logged == pytest.approx(unclipped, rel=1e-5) and unclipped > 1e-3
    clipped, logged = runs[1e-4]
    assert logged == pytest.approx(unclipped, rel=1e-5)  # the same first step: the norm before clipping
    assert clipped == pytest.approx(1e-4 * unclipped / (unclipped + 1e-6), rel=1e-5)  # clip_grad_norm_'s epsilon


# ------------------------------------------------------------------------------ deprecated names
def _warns(match):
    return pytest.warns(DeprecationWarning, match=match)


def test_old_config_names_warn_and_still_work():
    with _warns("SFTConfig.grad_accum is deprecated: use gradient_accumulation_steps"):
        sft = SFTConfig(grad_accum=3)
    assert sft.gradient_accumulation_steps == 3 and "grad_accum" not in dataclasses.asdict(sft)
    with _warns("GRPOConfig.steps is deprecated: use max_steps"), \
            _warns("GRPOConfig.grad_accum_steps is deprecated: use gradient_accumulation_steps"), \
            _warns("GRPOConfig.save_every is deprecated: use checkpoint_every"):
        grpo = GRPOConfig(steps=5, grad_accum_steps=2, save_every=4, output_dir="out")
    assert (grpo.max_steps, grpo.gradient_accumulation_steps, grpo.checkpoint_every) == (5, 2, 4)
    assert grpo == GRPOConfig(max_steps=5, gradient_accumulation_steps=2, checkpoint_every=4, output_dir="out")
    with _warns("PPOConfig.steps is deprecated"):
        assert PPOConfig(steps=3).max_steps == 3
    # attributes read and write through to the new fields
    with _warns("GRPOConfig.steps is deprecated"):
        assert grpo.steps == 5
    with _warns("SFTConfig.grad_accum is deprecated"):
        sft.grad_accum = 4
    assert sft.gradient_accumulation_steps == 4
    # dataclasses.replace with an old name: the name the caller wrote wins
    with _warns("GRPOConfig.steps is deprecated"):
        assert dataclasses.replace(grpo, steps=9).max_steps == 9
    # a bad value under an old name is refused naming both spellings
    named = "gradient_accumulation_steps.*given as grad_accum_steps"
    with _warns("grad_accum_steps"), pytest.raises(ValueError, match=named):
        GRPOConfig(grad_accum_steps=3)
    with _warns("steps"), pytest.raises(ValueError, match="GRPOConfig.max_steps must be an int >= 1.*given as steps"):
        GRPOConfig(steps=0)
    with warnings.catch_warnings():  # the new names never warn
        warnings.simplefilter("error")
        SFTConfig(max_steps=2, gradient_accumulation_steps=2, checkpoint_every=1, output_dir="out")
        GRPOConfig(max_steps=2, gradient_accumulation_steps=2, checkpoint_every=1, output_dir="out")


def test_sft_train_resume_from_is_a_deprecated_name(tmp_path):
    trainer = make("SFT", tmp_path, checkpoint_every=1)
    trainer.train()
    resumed = make("SFT", tmp_path, max_steps=3, checkpoint_every=1)
    with _warns("SFTTrainer.train.resume_from is deprecated: use resume_from_checkpoint"):
        assert [h["step"] for h in resumed.train(resume_from="latest")] == [1, 2, 3]
    with pytest.raises(TypeError, match="give resume_from_checkpoint only"):
        resumed.train(resume_from="latest", resume_from_checkpoint="latest")


def test_old_cli_flags_warn_and_parse_like_the_new_ones(capsys):
    from qlora_fast.cli import build_parser

    parser = build_parser()
    for command in ("finetune", "grpo"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the new spellings are silent
            new = parser.parse_args([command, "--max-steps", "7", "--gradient-accumulation-steps", "2"])
        assert capsys.readouterr().err == ""
        with _warns("qlora-fast: --steps is deprecated: use --max-steps"), \
                _warns("qlora-fast: --grad-accum is deprecated: use --gradient-accumulation-steps"):
            old = parser.parse_args([command, "--steps", "7", "--grad-accum", "2"])
        assert (old.steps, old.grad_accum) == (new.steps, new.grad_accum) == (7, 2)
        err = capsys.readouterr().err.splitlines()  # and the person at the terminal is told, one line each
        assert err == [f"qlora-fast {command}: warning: --steps is deprecated: use --max-steps (the old spelling goes "
                       "in the next release)", f"qlora-fast {command}: warning: --grad-accum is deprecated: use "
                       "--gradient-accumulation-steps (the old spelling goes in the next release)"]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            new_alpha = parser.parse_args([command, "--lora-alpha", "5"]).alpha
        with _warns("qlora-fast: --alpha is deprecated: use --lora-alpha"):
            assert parser.parse_args([command, "--alpha", "5"]).alpha == new_alpha == 5.0
        capsys.readouterr()


# ------------------------------------------------------------------------------ optimizer registry
def test_optimizer_registry_is_torch_free_and_the_only_list_of_names():
    code = ("import sys; from qlora_fast.optim.registry import OPTIMIZERS; import qlora_fast.commands; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(','.join(OPTIMIZERS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    from qlora_fast import commands, optim
    from qlora_fast.optim.registry import OPTIMIZERS
    from qlora_fast.train import sft

    assert out.stdout.strip().split(",") == list(OPTIMIZERS)
    assert commands.OPTIMIZERS is OPTIMIZERS and sft.OPTIMIZERS is OPTIMIZERS and optim.OPTIMIZERS is OPTIMIZERS
    expected = {"paged_adamw_8bit": optim.PagedAdamW8bit, "paged_adamw": optim.PagedAdamW,
                "adamw_8bit": optim.AdamW8bit, "adamw": optim.AdamW, "torch_adamw": torch.optim.AdamW}
    assert {name: optim.optimizer_class(name) for name in OPTIMIZERS} == expected
    with pytest.raises(ValueError, match="optimizer must be one of .*got 'sgd'"):
        optim.optimizer_class("sgd")
    for config in (SFTConfig, GRPOConfig):
        with pytest.raises(ValueError, match=f"{config.__name__}.optimizer must be one of"):
            config(optimizer="sgd")


@pytest.mark.parametrize("name", ["torch_adamw", "adamw", "paged_adamw_8bit"])
def test_both_trainers_build_the_registered_optimizer(name):
    from qlora_fast.optim import optimizer_class

    for kind in KINDS:
        trainer = make(kind, optimizer=name, weight_decay=0.01)
        assert type(trainer.optimizer) is optimizer_class(name)
        group = trainer.optimizer.param_groups[0]
        assert (group["initial_lr"], group["weight_decay"]) == (1e-2, 0.01)
        assert {id(p) for p in group["params"]} == {id(p) for p in trainer.params}


# ------------------------------------------------------------------------------ PEFT model by type
def test_grpo_unwraps_a_peft_model_by_type_not_by_attribute():
    from qlora_fast.train.grpo import _output_layer

    peft = tiny_peft()
    backbone, weight, bias = _output_layer(peft)
    assert backbone is peft.base_model.model and weight is peft.base_model.lm_head.weight and bias is None

    class LooksLikePeft(torch.nn.Module):  # the attributes the old duck-typing checked, but not a PeftModel
        def __init__(self, inner):
            super().__init__()
            self.prompt_encoder, self.base_model = None, inner

    assert _output_layer(LooksLikePeft(LlamaForCausalLM(TINY))) is None
    torch.manual_seed(0)
    prefix = get_peft_model(LlamaForCausalLM(TINY), PrefixTuningConfig(num_virtual_tokens=2))
    assert _output_layer(prefix) is None  # its forward is not its base model's: full logits


def test_checkpoints_written_before_the_rename_still_resume(tmp_path):
    """A run identity recorded under the old field name (config.grad_accum) matches the new one."""
    trainer = make("SFT", tmp_path, checkpoint_every=2)
    trainer.train()
    path = str(tmp_path / "checkpoint-2.pt")
    state = torch.load(path, weights_only=False)
    run = state["run"]
    run["config.grad_accum"] = run.pop("config.gradient_accumulation_steps")
    torch.save(state, path)
    resumed = make("SFT", tmp_path, max_steps=3)
    assert [h["step"] for h in resumed.train(resume_from_checkpoint="latest")] == [1, 2, 3]
    run["config.grad_accum"] = 2  # a different value under the old name is still refused
    torch.save(state, path)
    with pytest.raises(ValueError, match="config.gradient_accumulation_steps: checkpoint 2, this run 1"):
        make("SFT", tmp_path, max_steps=3).train(resume_from_checkpoint="latest")


def test_run_identity_of_a_lora_config_written_before_the_rename_matches():
    """LoraConfig's alpha/dropout became lora_alpha/lora_dropout: an identity recorded under the old
    names is the same run; a different value under an old name is still a different run."""
    from qlora_fast.train.checkpoint import check_same_run, run_identity

    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(TINY), LoraConfig(target_modules=["q_proj"], r=2, lora_alpha=3.0))
    current = run_identity(model)
    assert current["peft_config.lora_alpha"] == 3.0
    old = {("peft_config." + k[len("peft_config.lora_"):] if k.startswith("peft_config.lora_") else k): v
           for k, v in current.items()}
    assert "peft_config.alpha" in old and "peft_config.dropout" in old
    check_same_run(old, current, "ckpt")
    old["peft_config.alpha"] = 5.0
    with pytest.raises(ValueError, match="peft_config.lora_alpha: checkpoint 5.0, this run 3.0"):
        check_same_run(old, current, "ckpt")
