"""Bad inputs across the API and the CLI end in one clear error naming the argument or the file,
and never in silently wrong results or lost data (issue 18 sections 2-6, issue 14 section 7):
output safety (file modes, stale temporaries, a lock, writability checked first), resume that
cannot continue the wrong run, validated hyperparameters and NaN guards, unreadable files and
corrupt caches named (caches rebuilt), and the CLI's one-line errors."""
import copy
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

from qlora_fast.cli import build_parser, main
from qlora_fast.models import LlamaConfig, LlamaForCausalLM, PretrainRecipe, load_base_model
from qlora_fast.models.pretrained import load_model
from qlora_fast.peft import LoraConfig, get_peft_model
from qlora_fast.tokenizer import ByteTokenizer
from qlora_fast.tokenizer.bpe import BPETokenizer, load_shipped_bpe
from qlora_fast.train import GRPOConfig, GRPOTrainer
from qlora_fast.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from qlora_fast.train.rewards import arithmetic_rewards, load_arithmetic_task
from qlora_fast.train.sft import SFTConfig, SFTTrainer
from qlora_fast.utils import atomic_write_bytes, check_finite_state, output_lock, temp_prefix

TINY = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                   max_seq_len=128)
PAIRS = [{"instruction": f"Add {i} and {i + 1}.", "output": str(2 * i + 1)} for i in range(12)]


def tiny_peft(seed=0, r=2, **lora):
    torch.manual_seed(seed)
    return get_peft_model(LlamaForCausalLM(TINY), LoraConfig(r=r, **lora))


def sft(out=None, model=None, data=PAIRS, **overrides):
    options = dict(max_steps=2, batch_size=2, warmup_steps=0, max_seq_len=48, optimizer="torch_adamw", progress=False,
                   output_dir=None if out is None else str(out))
    options.update(overrides)
    return SFTTrainer(model or tiny_peft(), ByteTokenizer(), data, config=SFTConfig(**options))


def adapter(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run_cli(argv, capsys):
    """(exit status, stderr) of `qlora-fast argv` run in this process."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    err = capsys.readouterr().err
    return rc, err


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------ output safety
def test_atomic_write_honours_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        os.umask(0o077)
        atomic_write_bytes(tmp_path / "b.bin", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.bin").st_mode) == 0o644  # was mkstemp's 0600
    assert stat.S_IMODE(os.stat(tmp_path / "b.bin").st_mode) == 0o600


def test_stale_temporaries_of_killed_writers_are_cleaned(tmp_path):
    dead = tmp_path / f".tmp-{dead_pid()}-abcdadapter.safetensors"
    live = tmp_path / f".tmp-{os.getpid()}-efghmodel.safetensors"  # a write in progress: kept
    legacy_old = tmp_path / ".tmp-k2j4x9zqconfig.json"
    legacy_new = tmp_path / ".tmp-p0o9i8u7config.json"
    dead_dir = tmp_path / f".tmp-{dead_pid()}-adapter"  # a directory meant to be renamed into place
    live_dir = tmp_path / f"{temp_prefix()}adapter"
    for f in (dead, live, legacy_old, legacy_new, dead_dir / "adapter_config.json", live_dir / "x"):
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(b"partial")
    os.utime(legacy_old, (time.time() - 2 * 3600,) * 2)
    atomic_write_bytes(tmp_path / "data.bin", b"new")
    assert sorted(os.listdir(tmp_path)) == sorted(["data.bin", live.name, legacy_new.name, live_dir.name])


def test_output_lock_refuses_a_second_run_and_survives_a_kill(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from qlora_fast.utils import output_lock\n"
            f"with output_lock({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")),
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(BlockingIOError, match=f"in use by another run \\(pid {holder.pid}\\)"):
            with output_lock(out):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with output_lock(out):  # the kernel dropped the dead holder's lock: no stale lock
        with output_lock(out):  # re-entrant within one process
            pass


def test_unwritable_output_is_found_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="SFTConfig.output_dir"):
        sft(blocker)
    with pytest.raises(OSError, match="SFTConfig.output_dir"):
        sft(blocker / "sub")
    fns, weights = arithmetic_rewards()
    with pytest.raises(OSError, match="GRPOConfig.output_dir"):
        GRPOTrainer(tiny_peft(), ByteTokenizer(), fns, load_arithmetic_task("train"),
                    GRPOConfig(steps=1, group_size=2, prompts_per_step=1, reward_weights=weights, progress=False,
                               output_dir=str(blocker / "ckpt")))


# ------------------------------------------------------------------------------ resume
def test_resume_with_nothing_to_resume_is_an_explicit_choice(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no checkpoint-\\*.pt in '{tmp_path / 'empty'}'"):
        sft(tmp_path / "empty").train(resume_from="latest")
    assert len(sft(tmp_path / "empty").train(resume_from="latest", allow_fresh=True)) == 2
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        sft(tmp_path).train(resume_from=str(tmp_path / "nope.pt"))
    fns, weights = arithmetic_rewards()
    grpo = GRPOTrainer(tiny_peft(), ByteTokenizer(), fns, load_arithmetic_task("train")[:4],
                       GRPOConfig(steps=1, group_size=2, prompts_per_step=1, max_new_tokens=2, reward_weights=weights,
                                  progress=False, optimizer="torch_adamw", output_dir=str(tmp_path / "grpo")))
    with pytest.raises(FileNotFoundError, match="allow_fresh"):
        grpo.train(resume_from_checkpoint="latest")
    assert len(grpo.train(resume_from_checkpoint="latest", allow_fresh=True)) == 1
    # GRPO checkpoints carry the run identity too: another lr is refused, naming it.
    grpo.save_checkpoint(grpo.checkpoint_path(1))
    other = GRPOTrainer(tiny_peft(), ByteTokenizer(), fns, load_arithmetic_task("train")[:4],
                        GRPOConfig(steps=2, group_size=2, prompts_per_step=1, max_new_tokens=2, reward_weights=weights,
                                   progress=False, optimizer="torch_adamw", output_dir=str(tmp_path / "grpo"), lr=1e-3))
    with pytest.raises(ValueError, match="different run.*config.lr: checkpoint 0.0001, this run 0.001"):
        other.train(resume_from_checkpoint="latest")


@pytest.mark.parametrize("change,named", [
    (dict(lr=1e-2), "config.lr"), (dict(seed=1), "config.seed"), (dict(max_grad_norm=0.5), "config.max_grad_norm"),
    (dict(data=PAIRS[:6]), "data"), (dict(r=4), "adapters"), (dict(model_seed=1), "model"),
])
def test_resuming_a_different_run_is_refused_naming_what_differs(tmp_path, change, named):
    first = sft(tmp_path, checkpoint_every=2)
    first.train()
    path = latest_checkpoint(str(tmp_path))
    change = dict(change)
    model = tiny_peft(seed=change.pop("model_seed", 0), r=change.pop("r", 2))
    data = change.pop("data", PAIRS)
    other = sft(tmp_path, model=model, data=data, max_steps=4, checkpoint_every=2, **change)
    before = adapter(model)
    with pytest.raises(ValueError, match=f"{path} belongs to a different run.*{named}"):
        other.train(resume_from="latest")
    assert all(torch.equal(before[n], p) for n, p in adapter(model).items())  # nothing was loaded
    # The same run with more steps resumes.
    same = sft(tmp_path, max_steps=3, checkpoint_every=2)
    assert [h["step"] for h in same.train(resume_from="latest")] == [1, 2, 3]


def test_unreadable_checkpoint_names_the_file_and_a_failed_load_changes_nothing(tmp_path):
    trainer = sft(tmp_path, checkpoint_every=2)
    trainer.train()
    path = latest_checkpoint(str(tmp_path))
    data = open(path, "rb").read()
    truncated = tmp_path / "checkpoint-9.pt"
    truncated.write_bytes(data[: len(data) // 2])
    model = tiny_peft(seed=3)
    before = adapter(model)
    with pytest.raises(ValueError, match=f"checkpoint {truncated} is unreadable"):
        load_checkpoint(str(truncated), model)
    # An optimizer state that does not fit: the parameters copied before it are restored.
    bad_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match="could not be restored"):
        load_checkpoint(path, model, optimizer=bad_opt)
    assert all(torch.equal(before[n], p) for n, p in adapter(model).items())
    # A scheduler that fails after the optimizer loaded: the optimizer goes back to its state too.
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before, opt_before = adapter(model), copy.deepcopy(opt.state_dict())

    class FailingScheduler:
        def load_state_dict(self, sd):
            raise KeyError("not this scheduler's state")

    with pytest.raises(ValueError, match="could not be restored: KeyError"):
        load_checkpoint(path, model, optimizer=opt, scheduler=FailingScheduler())
    after = opt.state_dict()
    assert all(torch.equal(before[n], p) for n, p in adapter(model).items())
    for k, st in opt_before["state"].items():
        assert all(torch.equal(v, after["state"][k][name]) for name, v in st.items())


class _RunsCode:
    """Unpickling this calls a function of the file's choosing (here: it writes a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_is_loaded_as_data_and_older_numpy_rng_states_still_resume(tmp_path):
    import numpy as np

    trainer = sft(tmp_path, checkpoint_every=2)
    trainer.train()
    path = latest_checkpoint(str(tmp_path))
    state = torch.load(path, weights_only=True)  # what we write is plain data
    # A file that would run code when unpickled is refused, and the code does not run.
    marker = tmp_path / "ran"
    evil = tmp_path / "checkpoint-7.pt"
    torch.save({**state, "extra": {"payload": _RunsCode(str(marker))}}, evil)
    model = tiny_peft(seed=3)
    before = adapter(model)
    with pytest.raises(ValueError, match=f"checkpoint {evil} is unreadable"):
        load_checkpoint(str(evil), model)
    assert not marker.exists() and all(torch.equal(before[n], p) for n, p in adapter(model).items())
    # Checkpoints written before the RNG state became a tensor held numpy's own state tuple.
    np.random.seed(int(torch.randint(0, 2**31, ())))
    old_numpy = np.random.get_state()
    expected = np.random.random(5)
    old = tmp_path / "checkpoint-8.pt"
    torch.save({**state, "rng": {**state["rng"], "numpy": old_numpy}}, old)
    np.random.seed(0)
    load_checkpoint(str(old), model)
    assert np.array_equal(np.random.random(5), expected)
    assert all(torch.equal(state["trainable"][n], p) for n, p in adapter(model).items())


# ------------------------------------------------------------------------------ hyperparameters
@pytest.mark.parametrize(
    "overrides,error,named",
    [
        (dict(max_grad_norm=-1.0), ValueError, "max_grad_norm"),
        (dict(max_grad_norm=float("nan")), ValueError, "max_grad_norm"),
        (dict(max_grad_norm=0.0), ValueError, "max_grad_norm"),
        (dict(lr=0.0), ValueError, "lr"),
        (dict(lr=float("nan")), ValueError, "lr"),
        (dict(lr=float("inf")), ValueError, "lr"),
        (dict(weight_decay=float("nan")), ValueError, "weight_decay"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay"),
        (dict(min_lr_ratio=1.5), ValueError, "min_lr_ratio"),
        (dict(min_lr_ratio=float("nan")), ValueError, "min_lr_ratio"),
        (dict(batch_size=True), TypeError, "batch_size"),
        (dict(warmup_steps=2.5), TypeError, "warmup_steps"),
        (dict(eval_every=True), TypeError, "eval_every"),
        (dict(seed="0"), TypeError, "seed"),
        (dict(packing="yes"), TypeError, "packing"),
        (dict(lr="1e-3"), TypeError, "lr"),
        (dict(prompt_template="{output}"), ValueError, "prompt_template"),
        (dict(prompt_template="{instruction} {answer}"), ValueError, "prompt_template"),
        (dict(output_dir=3), TypeError, "output_dir"),
    ],
)
def test_sft_config_rejects_every_bad_hyperparameter(overrides, error, named):
    with pytest.raises(error, match=f"SFTConfig.{named}"):
        SFTConfig(**overrides)


@pytest.mark.parametrize("overrides,named", [
    (dict(max_grad_norm=-1.0), "max_grad_norm"), (dict(max_grad_norm=float("nan")), "max_grad_norm"),
    (dict(lr=float("nan")), "lr"), (dict(beta=float("inf")), "beta"), (dict(eps_low=float("nan")), "eps_low"),
    (dict(temperature=float("inf")), "temperature"), (dict(top_p=1.5), "top_p"), (dict(top_k=0), "top_k"),
    (dict(reward_weights=[1.0, float("nan")]), "reward_weights"),
])
def test_grpo_config_rejects_non_finite_and_flipping_values(overrides, named):
    with pytest.raises(ValueError, match=f"GRPOConfig.{named}"):
        GRPOConfig(**overrides)


def test_sft_stops_on_a_nan_loss_or_gradient_and_keeps_the_adapter(tmp_path):
    model = tiny_peft()
    trainer = sft(tmp_path, model=model, checkpoint_every=1)
    before = adapter(model)
    hook = model.base_model.lm_head.register_forward_hook(lambda m, a, out: out * float("nan"))
    with pytest.raises(FloatingPointError, match="SFT step 1: the loss is nan"):
        trainer.train()
    hook.remove()
    assert all(torch.equal(before[n], p) for n, p in adapter(model).items())
    lora_b = next(p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)
    handle = lora_b.register_hook(lambda g: torch.full_like(g, float("inf")))
    with pytest.raises(FloatingPointError, match="gradient is NaN or inf"):
        trainer.train()
    handle.remove()
    assert all(torch.equal(before[n], p) for n, p in adapter(model).items())
    assert os.listdir(tmp_path) == []  # no checkpoint written


def test_a_nan_adapter_is_never_written(tmp_path):
    model = tiny_peft()
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad)[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="refusing to write checkpoint .*1 NaN/inf value"):
        save_checkpoint(str(tmp_path / "checkpoint-1.pt"), model)
    with pytest.raises(FloatingPointError, match="refusing to write the adapter"):
        check_finite_state(dict(model.adapter_parameters()), "the adapter")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------ files and caches
def test_truncated_model_files_are_named_and_a_corrupt_base_cache_is_rebuilt(tmp_path):
    config = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1, max_seq_len=64
    )
    recipe = PretrainRecipe(steps=1, batch_size=2, seq_len=16, warmup=1)
    model, _ = load_base_model(cache_dir=str(tmp_path), progress=False, recipe=recipe, config=config, tokenizer="byte")
    (entry,) = [d for d in os.listdir(tmp_path) if d.startswith("base-")]
    weights = tmp_path / entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"model weights '{weights}' are unreadable"):
        load_model(str(tmp_path / entry))
    with pytest.warns(UserWarning, match=f"cached base model in {tmp_path / entry} is unreadable"):
        again, _ = load_base_model(
            cache_dir=str(tmp_path), progress=False, recipe=recipe, config=config, tokenizer="byte"
        )
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n  # rebuilt deterministically
    assert isinstance(load_model(str(tmp_path / entry)), LlamaForCausalLM)  # and the cache is whole again
    # a weights file that lost a tensor or holds a foreign one is refused, tied head or not (the
    # tied head's lm_head.weight alone may be absent)
    from safetensors.torch import load_file, save_file

    whole = load_file(str(weights))
    for tie in (True, False):
        config_json = json.loads((tmp_path / entry / "config.json").read_text())
        (tmp_path / entry / "config.json").write_text(json.dumps({**config_json, "tie_embeddings": tie}))
        down = next(k for k in whole if k.endswith("down_proj.weight"))
        for bad in ({k: v for k, v in whole.items() if k != down}, {**whole, "extra.weight": torch.zeros(2)}):
            save_file(bad, str(weights))
            with pytest.raises(ValueError, match="missing keys|unexpected keys"):
                load_model(str(tmp_path / entry))
    (tmp_path / entry / "config.json").write_text(json.dumps({**config_json, "tie_embeddings": True}))
    save_file({k: v for k, v in whole.items() if k != "lm_head.weight"}, str(weights))
    assert isinstance(load_model(str(tmp_path / entry)), LlamaForCausalLM)  # tied: the head is the embedding
    (tmp_path / entry / "config.json").write_text('{"hidden_size": 16,')
    with pytest.raises(ValueError, match="config.json' is not valid JSON"):
        load_model(str(tmp_path / entry))


def test_truncated_tokenizer_is_named_and_a_corrupt_bpe_cache_is_rebuilt(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat; the cat ate the rat. " * 20)
    tok = load_shipped_bpe(vocab_size=280, cache_dir=str(tmp_path / "cache"), progress=False, corpus_path=str(corpus))
    (cached,) = (tmp_path / "cache").iterdir()
    cached.write_text(cached.read_text()[:50])
    with pytest.raises(ValueError, match=f"tokenizer '{cached}' is not valid JSON"):
        BPETokenizer.load(cached)
    with pytest.warns(UserWarning, match=f"cached tokenizer {cached} is unreadable"):
        again = load_shipped_bpe(
            vocab_size=280, cache_dir=str(tmp_path / "cache"), progress=False, corpus_path=str(corpus)
        )
    assert again.mergeable_ranks == tok.mergeable_ranks
    assert BPETokenizer.load(cached).mergeable_ranks == tok.mergeable_ranks


def test_finetune_report_counts_weights_not_biases():
    from qlora_fast.commands.finetune import _four_bit_weight_bytes
    from qlora_fast.nn.linear4bit import Linear4bit

    layers = torch.nn.Sequential(torch.nn.Linear(64, 96, bias=True), torch.nn.Linear(96, 32, bias=True))
    model = torch.nn.Sequential(*[Linear4bit.from_linear(m, quant_type="nf4") for m in layers])
    nbytes, n = _four_bit_weight_bytes(model)
    assert n == 64 * 96 + 96 * 32
    assert nbytes == n // 2 + sum(m.quant_state.statistics_bytes() for m in model)  # 4 bits a code, no bias


# ------------------------------------------------------------------------------ the CLI
@pytest.mark.parametrize("argv,named", [
    (["finetune", "--alpha", "nan"], "--alpha: must be a finite number"),
    (["finetune", "--alpha", "inf"], "--alpha: must be a finite number"),
    (["finetune", "--lr", "0"], "--lr: must be > 0"),
    (["finetune", "--steps", "-1"], "--steps: must be >= 1"),
    (["finetune", "--batch-size", "many"], "--batch-size: expected an int"),
    (["finetune", "--checkpoint-every", "-2"], "--checkpoint-every: must be >= 0"),
    (["grpo", "--top-p", "2"], "--top-p: must be <= 1"),
    (["grpo", "--temperature", "0"], "--temperature: must be > 0"),
    (["tot", "--puzzles", "0"], "--puzzles: must be >= 1"),
    (["quantize-report", "--blocksize", "0"], "--blocksize: must be >= 1"),
    (["train-bpe", "x.txt", "--out", "y.json", "--vocab-size", "-5"], "--vocab-size: must be >= 1"),
])
def test_cli_rejects_bad_values_naming_the_option(argv, named, capsys):
    rc, err = run_cli(argv, capsys)
    assert rc == 2 and named in err and "Traceback" not in err


def test_cli_errors_are_one_line_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [
        (["finetune", "--model", str(tmp_path / "missing")], "qlora-fast finetune: error: --model must be a local"),
        (["finetune", "--device", "gpu0"], "qlora-fast finetune: error: --device must be"),
        (["finetune", "--device", "meta"], "qlora-fast finetune: error: --device must be"),  # torch knows these,
        (["finetune", "--device", "mps"], "qlora-fast finetune: error: --device must be"),  # the trainers do not
        (["grpo", "--device", "xpu:0", "--output", str(tmp_path / "o")], "qlora-fast grpo: error: --device must be"),
        (["finetune", "--output", str(blocker / "out")], "qlora-fast finetune: error: --output"),
        (["finetune", "--output", str(tmp_path / "o"), "--resume"], "there is no checkpoint-*.pt in"),
        (
            ["finetune", "--fsdp", "--method", "prefix"],
            "error: --fsdp shards LoRA/QLoRA models only, got --method prefix",
        ),
        (
            ["finetune", "--fsdp", "--nproc", "2", "--output", str(tmp_path / "o"), "--resume"],
            "there is no sharded checkpoint-<step> folder in",
        ),
        (["finetune", "--fsdp", "--checkpoint-every", "5"], "error: --fsdp needs several processes: add --nproc N"),
        (["grpo", "--output", str(tmp_path / "o"), "--resume"], "grpo-checkpoints"),
        (
            ["train-bpe", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "t.json"), "--no-progress"],
            f"qlora-fast train-bpe: error: paths: '{tmp_path / 'missing.txt'}' is not a file",
        ),
        (
            ["tot", "--model", str(tmp_path / "missing"), "--no-progress"],
            "qlora-fast tot: error: --model must be 'builtin'",
        ),
    ]
    for argv, expected in cases:
        rc, err = run_cli(argv, capsys)
        assert rc == 2, argv
        assert expected in err and "Traceback" not in err and err.count("\n") == 1, (argv, err)
    with output_lock(tmp_path / "busy"):  # another run holds --output: refused (the lock is per process, so fake it)
        from qlora_fast import utils

        held = utils._HELD_LOCKS.pop(os.path.realpath(tmp_path / "busy"))
        try:
            rc, err = run_cli(["finetune", "--output", str(tmp_path / "busy")], capsys)
        finally:
            utils._HELD_LOCKS[os.path.realpath(tmp_path / "busy")] = held
    assert rc == 2 and "in use by another run" in err
    with pytest.raises(FileNotFoundError):  # --debug keeps the traceback
        main(["--debug", "finetune", "--model", str(tmp_path / "missing")])


def tiny_base_model(monkeypatch):
    """`finetune` on a tiny random built-in model (no pretraining) with the byte tokenizer."""
    import qlora_fast.models

    def load(cache_dir=None, progress=True, recipe=None, tokenizer="bpe"):
        torch.manual_seed(0)
        return LlamaForCausalLM(TINY), ByteTokenizer()

    monkeypatch.setattr(qlora_fast.models, "load_base_model", load)


# --max-seq-len 80: the byte tokenizer's first two held-out pairs are 70 and 75 tokens (cut before
# their answer, the held-out perplexity would measure nothing: refused)
TINY_RUN = ["--method", "lora", "--batch-size", "2", "--eval-pairs", "2", "--max-new-tokens", "2", "--max-seq-len",
            "80", "--optimizer", "torch_adamw", "--device", "cpu", "--no-progress"]


@pytest.mark.parametrize("command,subdir", [("finetune", ""), ("grpo", "grpo-checkpoints")])
def test_a_fresh_start_into_an_earlier_runs_checkpoints_is_refused(tmp_path, capsys, command, subdir):
    """A fresh run in an --output holding another run's checkpoints would overwrite only the steps
    it reaches, and a later --resume would pick the other run's newest: refused before any work,
    naming the directory and the ways out."""
    out = tmp_path / "out"
    (out / subdir).mkdir(parents=True)
    (out / subdir / "checkpoint-40.pt").write_bytes(b"not ours")
    rc, err = run_cli([command, "--output", str(out)], capsys)
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{out / subdir} already holds 1 checkpoint(s) of an earlier run (newest checkpoint-40.pt)" in err
    assert "--resume" in err and "--overwrite-output" in err
    rc, err = run_cli([command, "--output", str(out), "--resume", "--overwrite-output"], capsys)
    assert rc == 2 and "--overwrite-output starts a fresh run" in err
    assert (out / subdir / "checkpoint-40.pt").exists()  # refusals delete nothing


def test_overwrite_output_removes_the_earlier_checkpoints_then_trains(tmp_path, capsys, monkeypatch):
    tiny_base_model(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint-40.pt").write_bytes(b"not ours")
    (out / "checkpoint-7").mkdir()  # a sharded (FSDP2) checkpoint folder
    (out / "checkpoint-7" / "x.distcp").write_bytes(b"x")
    rc, err = run_cli(["finetune", "--output", str(out), "--max-steps", "1", "--checkpoint-every", "1",
                       "--overwrite-output", *TINY_RUN], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1.pt"]
    # and the checkpoint now there resumes (at max-steps: said so, nothing trained)
    rc, err = run_cli(["finetune", "--output", str(out), "--max-steps", "1", "--resume", *TINY_RUN], capsys)
    assert rc == 0, err


def test_finetune_refuses_a_max_seq_len_that_cuts_every_held_out_answer(tmp_path, capsys, monkeypatch):
    """--max-seq-len 48 cuts both held-out pairs (70 and 75 byte tokens) before their answer: the
    held-out perplexity printed 1.000, measured on nothing. Refused in one line before training."""
    tiny_base_model(monkeypatch)
    argv = ["finetune", "--output", str(tmp_path / "out"), *TINY_RUN, "--max-seq-len", "48"]
    rc, err = run_cli(argv, capsys)
    assert rc == 2 and "--max-seq-len 48 cuts all 2 held-out pairs before their answer" in err
    assert err.count("\n") == 1 and not (tmp_path / "out" / "history.json").exists()


def test_finetune_eval_every_prints_and_writes_the_history(tmp_path, capsys, monkeypatch):
    """--eval-every evaluations were computed and thrown away: each is printed, and the per-step
    history (train loss, lr, held-out loss/perplexity) is written to --output/history.json. A
    --warmup-steps longer than the run is clamped to it, and a resume at --max-steps says so."""
    tiny_base_model(monkeypatch)
    out = tmp_path / "out"
    assert main(["finetune", "--output", str(out), "--max-steps", "2", "--eval-every", "1", "--checkpoint-every", "2",
                 *TINY_RUN]) == 0
    text = capsys.readouterr().out
    assert "--warmup-steps 15 is more than --max-steps 2: the learning rate stays below --lr" in text
    history = json.loads((out / "history.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2]
    assert all({"loss", "lr", "eval_loss", "eval_perplexity"} <= set(h) for h in history)
    for h in history:
        assert f"step {h['step']:>5}: train loss {h['loss']:.4f}" in text
        assert f"perplexity {h['eval_perplexity']:.3f}" in text
    assert main(["finetune", "--output", str(out), "--max-steps", "2", "--resume", "--eval-every", "1", *TINY_RUN]) == 0
    text = capsys.readouterr().out
    assert "at step 2: at or past --max-steps 2, so no training step runs" in text
    assert json.loads((out / "history.json").read_text())["history"] == history  # the resumed run keeps it


@pytest.mark.parametrize("resume", [True, False])
def test_ctrl_c_is_one_line_and_exit_status_130(tmp_path, capsys, monkeypatch, resume):
    from qlora_fast.commands import finetune

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune, "run", interrupted)
    out = tmp_path / "out"
    out.mkdir()
    if resume:
        for step in (5, 10):
            (out / f"checkpoint-{step}.pt").write_bytes(b"x")
    try:
        rc, err = run_cli(["finetune", "--output", str(out)], capsys)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main() (a traceback and exit status 1 for the user)")
    assert rc == 130 and err.count("\n") == 1 and "Traceback" not in err
    if resume:
        newest = out / "checkpoint-10.pt"
        assert f"qlora-fast finetune: interrupted; resume with --resume (newest checkpoint: {newest})" in err
    else:
        assert f"qlora-fast finetune: interrupted; no checkpoint in {out} to resume from" in err
    with pytest.raises(KeyboardInterrupt):  # --debug keeps the traceback
        main(["--debug", "finetune", "--output", str(out)])


def test_finetune_refuses_sequences_beyond_a_hf_models_context(tmp_path, capsys, monkeypatch):
    """A learned position table (GPT-2's n_positions) ends in an IndexError past its length: the
    flag is named, with the model's limit, right after the model loads (before any evaluation)."""
    transformers = pytest.importorskip("transformers")
    import qlora_fast.models.hf

    def load(directory, dtype=None, quantize=None, **kwargs):
        torch.manual_seed(0)
        config = transformers.GPT2Config(vocab_size=259, n_embd=16, n_layer=1, n_head=2, n_positions=40,
                                          bos_token_id=None, eos_token_id=None)
        return transformers.GPT2LMHeadModel(config), ByteTokenizer()

    monkeypatch.setattr(qlora_fast.models.hf, "load_hf_model", load)
    model = ["finetune", "--model", str(tmp_path), "--output", str(tmp_path / "out"), "--eval-pairs", "2",
             "--no-progress", "--device", "cpu"]
    for argv, expected in [
        (["--method", "lora", "--packing", "--max-seq-len", "64"],
         "--max-seq-len 64 exceeds the model's context of 40 positions (config.n_positions)"),
        (["--method", "prompt", "--num-virtual-tokens", "40"],
         "--num-virtual-tokens 40 leaves no room for any token in the model's context of 40 positions"),
        (["--method", "prefix", "--num-virtual-tokens", "30", "--packing", "--max-seq-len", "16"],
         "--max-seq-len 16 + --num-virtual-tokens 30 exceeds the model's context of 40 positions"),
        # byte-level tokens: rows longer than 40
        (["--method", "lora", "--max-seq-len", "96"], "(at --max-seq-len 96) exceed the model's context of 40"),
    ]:
        rc, err = run_cli(model + argv, capsys)
        assert rc == 2 and "qlora-fast finetune: error: " in err and expected in err, (argv, err)
        assert err.count("\n") == 1


def test_train_bpe_says_when_the_vocabulary_falls_short(tmp_path, capsys):
    text = tmp_path / "tiny.txt"
    text.write_text("abab abab")
    rc, err = run_cli(
        ["train-bpe", str(text), "--vocab-size", "400", "--out", str(tmp_path / "t.json"), "--no-progress"], capsys
    )
    assert rc == 0 and "fewer than the 400 asked for" in err
    assert json.loads((tmp_path / "t.json").read_text())



def test_train_bpe_rejects_bad_inputs_in_one_line_before_training(tmp_path, capsys, monkeypatch):
    from qlora_fast.tokenizer import bpe_tokenizer

    text = tmp_path / "text.txt"
    text.write_text("abab abab")
    (tmp_path / "a-directory").mkdir()
    (tmp_path / "file").write_text("x")
    out = ["--out", str(tmp_path / "t.json"), "--no-progress"]
    # An invalid --pattern was a regex.error traceback (regex.error is not a ValueError).
    rc, err = run_cli(["train-bpe", str(text), "--pattern", "(", *out], capsys)
    assert rc == 2 and err.startswith("qlora-fast train-bpe: error: pattern is not a valid regular expression: '('")
    assert err.count("\n") == 1 and not (tmp_path / "t.json").exists()
    # Not UTF-8: the error names the file (it was only the codec's message).
    (tmp_path / "latin1.txt").write_bytes("abc café au lait".encode("latin-1"))
    rc, err = run_cli(["train-bpe", str(text), str(tmp_path / "latin1.txt"), *out], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert f"error: paths: '{tmp_path / 'latin1.txt'}' is not UTF-8 text (invalid continuation byte at byte 7)" in err

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(bpe_tokenizer, "learn_ranks", no_training)
    for argv, expected in [
        (["--out", str(tmp_path / "a-directory")], f"error: --out '{tmp_path / 'a-directory'}' is a directory"),
        (["--out", str(tmp_path / "file" / "t.json")], f"the directory of --out '{tmp_path / 'file'}' exists and is "
                                                       "not a directory"),
        ([*out, "--tiktoken-out", str(tmp_path / "a-directory")], "error: --tiktoken-out"),
    ]:
        rc, err = run_cli(["train-bpe", str(text), *argv, "--no-progress"], capsys)
        assert rc == 2 and expected in err and err.count("\n") == 1, (argv, err)
    assert os.listdir(tmp_path / "a-directory") == []


def test_help_shows_each_default_once(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and "finetune" in a.choices).choices
    finetune, grpo, tot = (" ".join(sub[c].format_help().split()) for c in ("finetune", "grpo", "tot"))
    assert "(default: 5e-3 for LoRA/QLoRA, 1e-2 for prefix/prompt)" in finetune
    assert "(default: None)" not in finetune and "(default: False)" not in finetune
    for name in ("finetune", "grpo", "tot", "train-bpe", "quantize-report"):
        formatter = sub[name]._get_formatter()
        for action in sub[name]._actions:
            if action.help and "default" in action.help:  # says its default itself: not added again
                assert formatter._get_help_string(action) == action.help, (name, action.dest)
    from qlora_fast.commands import grpo as grpo_command

    assert f"GRPO steps (default: {grpo_command.STEPS})" in grpo
    assert f"learning rate of the adapter (default: {grpo_command.LR})" in grpo
    assert "--no-progress" in tot
    assert build_parser().parse_args(["tot", "--no-progress"]).no_progress


def test_decoding_a_transformers_model_prints_no_deprecation_warning():
    """Reading the deprecated `out.past_key_values` (when `out.cache` is None) printed a
    transformers warning on every run."""
    transformers = pytest.importorskip("transformers")
    import logging

    from qlora_fast.models.generate import call_causal_lm

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2)).eval()
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        if hasattr(logging.Logger, "warning_once"):
            logging.Logger.warning_once.cache_clear()  # transformers prints it once per process
        ids = torch.randint(0, 50, (2, 5))
        for use_cache in (False, True):
            logits, cache = call_causal_lm(model, input_ids=ids, use_cache=use_cache)
            assert torch.equal(logits, model(input_ids=ids).logits)
            assert (cache is None) == (not use_cache)
    finally:
        logger.removeHandler(handler)
    assert not [m for m in messages if "deprecated" in m], messages


def test_grpo_command_rejects_a_bad_config_before_any_training(tmp_path, capsys):
    # --group-size 1 used to surface only after the SFT adapter was trained (250 steps by default).
    rc, err = run_cli(["grpo", "--group-size", "1", "--sft-adapter", str(tmp_path / "missing"), "--cache-dir",
                       str(tmp_path / "cache"), "--output", str(tmp_path / "out"), "--no-progress"], capsys)
    assert rc == 2 and "qlora-fast grpo: error: GRPOConfig.group_size must be an int >= 2" in err
    assert not (tmp_path / "missing").exists() and not (tmp_path / "cache").exists()  # nothing was trained



def test_grpo_command_rejects_an_sft_adapter_that_is_a_file_before_training(tmp_path, capsys, monkeypatch):
    # It used to train the whole warm start (250 SFT steps by default) and only then fail to save it.
    import qlora_fast.models
    from qlora_fast.commands import grpo

    def no_work(*args, **kwargs):
        raise AssertionError("the base model was loaded or the warm start trained")

    monkeypatch.setattr(qlora_fast.models, "load_base_model", no_work)
    monkeypatch.setattr(grpo, "train_warmstart_adapter", no_work)
    (tmp_path / "file").write_text("x")
    for adapter, expected in [
        (tmp_path / "file", f"error: --sft-adapter '{tmp_path / 'file'}' exists and is not a directory"),
        (tmp_path / "file" / "sub", f"error: --sft-adapter '{tmp_path / 'file' / 'sub'}' is not writable"),
    ]:
        rc, err = run_cli(["grpo", "--sft-adapter", str(adapter), "--cache-dir", str(tmp_path / "cache"),
                           "--output", str(tmp_path / "out"), "--no-progress"], capsys)
        assert rc == 2 and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "cache").exists()  # no base model was built


def test_finetune_command_rejects_a_bad_peft_value_before_loading_the_model(tmp_path, capsys):
    rc, err = run_cli(["finetune", "--target-modules", " , ", "--cache-dir", str(tmp_path / "cache"),
                       "--output", str(tmp_path / "out"), "--no-progress"], capsys)
    assert rc == 2 and err.startswith("qlora-fast finetune: error: ") and "target_modules" in err, err
    assert not (tmp_path / "cache").exists()  # no base model was built first
