"""SFTTrainer: every PEFT method lowers held-out loss on the shipped data, loss only on output
tokens, packing, the schedule, exact resume from a checkpoint, DDP with two processes, and the
`finetune` command end to end."""
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import assert_close

from qlora_fast.data import PROMPT_TEMPLATE, format_prompt, load_instructions
from qlora_fast.models import LlamaConfig, PretrainRecipe, load_base_model
from qlora_fast.peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from qlora_fast.tokenizer.base import ByteTokenizer
from qlora_fast.train.checkpoint import latest_checkpoint
from qlora_fast.train.schedule import warmup_cosine
from qlora_fast.train.sft import SFTConfig, SFTTrainer, build_examples, encode_example, evaluate_loss, exact_match

TINY = LlamaConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=128)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """One tiny base model pretrained briefly on the shipped corpus, shared by this file."""
    cache = tmp_path_factory.mktemp("base-cache")
    recipe = PretrainRecipe(steps=30, batch_size=4, seq_len=64, lr=1e-2, warmup=5)
    return str(cache), recipe


def fresh_base(tiny_base):
    """The byte-level base: its ids are the UTF-8 bytes (an independent reference for encoding),
    and 30 pretraining steps leave it far enough from uniform for 16 tuning steps to show. The BPE
    base (the demo's default) is covered by the finetune command tests below."""
    cache, recipe = tiny_base
    model, tok = load_base_model(cache_dir=cache, progress=False, recipe=recipe, config=TINY, tokenizer="byte")
    return model, tok


TRAIN = load_instructions("train")
HELDOUT = load_instructions("heldout")[:24]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora", "prefix", "prompt"])
def test_each_method_lowers_heldout_loss(tiny_base, method, seed):
    model, tok = fresh_base(tiny_base)
    config = {
        "lora": LoraConfig(r=4),
        "qlora": LoraConfig(r=4, quantize_base="nf4"),
        "prefix": PrefixTuningConfig(num_virtual_tokens=6),
        "prompt": PromptTuningConfig(num_virtual_tokens=6, init="text", init_text="Answer:"),
    }[method]
    peft = get_peft_model(model, config, tokenizer=tok)
    frozen = {n: p.detach().clone() for n, p in peft.base_model.named_parameters() if not p.requires_grad}
    before = evaluate_loss(peft, tok, HELDOUT, max_len=96)["loss"]
    lr = 2e-2 if method in ("lora", "qlora") else 5e-2
    trainer = SFTTrainer(peft, tok, TRAIN, HELDOUT, SFTConfig(max_steps=16, batch_size=8, lr=lr, warmup_steps=2,
                                                              max_seq_len=96, eval_every=16, progress=False))
    history = trainer.train()
    after = evaluate_loss(peft, tok, HELDOUT, max_len=96)["loss"]
    print(method, before, after)
    assert after < before - 0.15, (before, after)
    assert history[-1]["eval_loss"] == pytest.approx(after, rel=1e-5)
    for n, p in peft.base_model.named_parameters():  # the base stays frozen
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_loss_is_on_output_tokens_only(tiny_base, seed):
    model, tok = fresh_base(tiny_base)
    pair = {"instruction": "Write the word cat in capital letters.", "output": "CAT"}
    ids, labels = encode_example(tok, pair["instruction"], pair["output"])
    prompt = [tok.bos_id] + list(format_prompt(pair["instruction"]).encode())
    assert ids == prompt + list(b"CAT") + [tok.eos_id]
    assert labels == [-100] * len(prompt) + list(b"CAT") + [tok.eos_id]
    # evaluate_loss against cross entropy of the 4 answer tokens computed by hand in float64
    logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    want = -sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(list(b"CAT") + [tok.eos_id])) / 4
    got = evaluate_loss(model, tok, [pair])
    assert got["loss"] == pytest.approx(want.item(), rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(want.item()), rel=1e-5)


def test_packing_fills_rows_with_whole_examples_in_order():
    tok = ByteTokenizer()
    L = 101
    pairs = [p for p in TRAIN[:60] if len(encode_example(tok, p["instruction"], p["output"])[0]) <= L][:40]
    rows = build_examples(tok, pairs, PROMPT_TEMPLATE, L, packing=True, seed=3)
    unpacked = [encode_example(tok, p["instruction"], p["output"]) for p in pairs]
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(3)).tolist()
    stream_ids = [t for i in order for t in unpacked[i][0]]
    stream_labels = [t for i in order for t in unpacked[i][1]]
    assert all(len(ids) == L == len(lab) for ids, lab in rows)
    assert len(rows) == len(stream_ids) // L
    assert [t for ids, _ in rows for t in ids] == stream_ids[:L * len(rows)]
    assert [t for _, lab in rows for t in lab] == stream_labels[:L * len(rows)]


def test_warmup_cosine_schedule_values():
    # warmup 4: 1/4, 2/4, 3/4, 4/4; then cosine from 1 to 0.1 over 10 steps
    assert [warmup_cosine(s, 4, 14, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    for s in range(4, 20):
        t = min(1.0, (s - 4) / 10)
        assert warmup_cosine(s, 4, 14, 0.1) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * t)) / 2)
    with pytest.raises(ValueError):
        warmup_cosine(0, -1, 10)


def _first_update(tiny_base, **overrides):
    """(gradients at the first optimizer step, its history record, the rows it trained on)."""
    base, tok = fresh_base(tiny_base)
    torch.manual_seed(0)
    model = get_peft_model(base.double(), LoraConfig(r=4, lora_alpha=8))
    options = dict(max_steps=1, lr=1e-3, warmup_steps=0, max_grad_norm=None, optimizer="torch_adamw",
                   progress=False, max_seq_len=96)
    trainer = SFTTrainer(model, tok, TRAIN[:40], None, SFTConfig(**{**options, **overrides}))
    grads, step = {}, trainer.optimizer.step

    def spy(*args, **kwargs):
        grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        return step(*args, **kwargs)

    trainer.optimizer.step = spy
    rows = [row for batch in trainer._micro_batches(0) for row in batch]
    return grads, trainer.train()[0], rows


def test_gradient_accumulation_equals_one_large_batch(tiny_base, seed):
    """k micro-batches of 1 row give the update (and the logged loss) of one batch of k rows:
    the mean over all the update's answer tokens. Dividing each micro-batch's mean by k weighted a
    2-token answer like a 7-token one. Oracle: the same rows as one batch, in float64."""
    one, record_one, rows_one = _first_update(tiny_base, batch_size=4, gradient_accumulation_steps=1)
    acc, record_acc, rows_acc = _first_update(tiny_base, batch_size=1, gradient_accumulation_steps=4)
    assert rows_one == rows_acc
    tokens = [sum(t != -100 for t in labels[1:]) for _, labels in rows_one]
    assert len(set(tokens)) > 1  # answers of different lengths, or the test could not tell
    assert record_acc["loss"] == pytest.approx(record_one["loss"], rel=1e-10)
    for name, g in one.items():
        assert_close(acc[name], g, atol=1e-12, rtol=1e-9, msg=name)


def test_logged_lr_is_the_one_each_update_used(tiny_base):
    base, tok = fresh_base(tiny_base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8))
    config = SFTConfig(max_steps=6, batch_size=2, warmup_steps=2, lr=1.0, min_lr_ratio=0.1, optimizer="torch_adamw",
                       progress=False, max_seq_len=96)
    trainer = SFTTrainer(model, tok, TRAIN[:40], None, config)
    used, step = [], trainer.optimizer.step

    def spy(*args, **kwargs):
        used.append(trainer.optimizer.param_groups[0]["lr"])
        return step(*args, **kwargs)

    trainer.optimizer.step = spy
    history = trainer.train()
    assert [r["lr"] for r in history] == used == [warmup_cosine(s, 2, 6, 0.1) for s in range(6)]


@pytest.mark.parametrize("optimizer", ["paged_adamw_8bit", "torch_adamw"])
def test_resume_from_checkpoint_is_exact(tiny_base, tmp_path, optimizer):
    def make(out):
        model, tok = fresh_base(tiny_base)
        torch.manual_seed(7)
        peft = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.2))  # dropout: the RNG state matters
        cfg = SFTConfig(max_steps=6, batch_size=4, grad_accum=2, lr=1e-2, warmup_steps=2, max_seq_len=80,
                        checkpoint_every=3, output_dir=str(out), optimizer=optimizer, progress=False, seed=5)
        return peft, SFTTrainer(peft, tok, TRAIN[:200], config=cfg)

    straight, trainer = make(tmp_path / "a")
    torch.manual_seed(99)
    history = trainer.train()

    interrupted, trainer = make(tmp_path / "b")
    trainer.config.max_steps = 3
    torch.manual_seed(99)
    trainer.train()
    path = latest_checkpoint(str(tmp_path / "b"))
    assert path.endswith("checkpoint-3.pt")
    assert sorted(os.listdir(tmp_path / "b")) == ["checkpoint-3.pt"]  # no temp files left
    torch.manual_seed(12345)  # the checkpoint must restore the RNG, not rely on this
    resumed, trainer = make(tmp_path / "b")
    history2 = trainer.train(resume_from="latest")
    assert [h["loss"] for h in history2] == [h["loss"] for h in history]
    for (n, a), (_, b) in zip(straight.adapter_parameters(), resumed.adapter_parameters()):
        assert torch.equal(a, b), n
    assert not torch.equal(dict(straight.adapter_parameters())[n], dict(interrupted.adapter_parameters())[n])


def test_gradient_checkpointing_gives_the_same_training(tiny_base):
    losses = []
    for ckpt in (False, True):
        model, tok = fresh_base(tiny_base)
        torch.manual_seed(3)
        peft = get_peft_model(model, LoraConfig(r=2))
        cfg = SFTConfig(
            max_steps=3,
            batch_size=4,
            max_seq_len=64,
            gradient_checkpointing=ckpt,
            optimizer="torch_adamw",
            progress=False,
        )
        losses.append(torch.tensor([h["loss"] for h in SFTTrainer(peft, tok, TRAIN[:50], config=cfg).train()]))
    assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)


def test_exact_match_scores_greedy_answers(tiny_base):
    model, tok = fresh_base(tiny_base)
    pairs = HELDOUT[:6]
    score, predictions = exact_match(model, tok, pairs, max_new_tokens=6, return_predictions=True)
    # recompute every answer one prompt at a time, without padding
    for pair, pred in zip(pairs, predictions):
        ids = torch.tensor([[tok.bos_id] + tok.encode(format_prompt(pair["instruction"]))])
        new = model.generate(ids, max_new_tokens=6, eos_token_id=tok.eos_id)[0, ids.shape[1]:].tolist()
        new = new[:new.index(tok.eos_id)] if tok.eos_id in new else new
        assert pred == tok.decode(new).strip()
    assert score == sum(p == q["output"] for p, q in zip(predictions, pairs)) / len(pairs)


def test_bad_sft_configs():
    with pytest.raises(ValueError, match="batch_size"):
        SFTConfig(batch_size=0)
    with pytest.raises(ValueError, match="optimizer"):
        SFTConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="output_dir"):
        SFTConfig(checkpoint_every=5)
    tok = ByteTokenizer()
    from qlora_fast.models import LlamaForCausalLM

    frozen = LlamaForCausalLM(TINY).requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        SFTTrainer(frozen, tok, TRAIN[:4])
    with pytest.raises(ValueError, match="instruction"):
        SFTTrainer(LlamaForCausalLM(TINY), tok, [{"prompt": "x"}])



def test_every_training_pair_is_checked_up_front():
    """A bad pair anywhere in the data is refused by the constructor, naming its index: past the
    third one it failed mid-run with a bare KeyError, and a number was formatted into the prompt."""
    import random

    from qlora_fast.models import LlamaForCausalLM

    tok, model = ByteTokenizer(), LlamaForCausalLM(TINY)
    i = random.randrange(3, 20)
    for bad, error, match in (({"instruction": "x"}, ValueError, f"at index {i}"),
                              ({"instruction": 5, "output": "y"}, TypeError, rf"train_data\[{i}\]\['instruction'\]"),
                              ({"instruction": "x", "output": None}, TypeError, rf"train_data\[{i}\]\['output'\]")):
        data = list(TRAIN[:20])
        data[i] = bad
        with pytest.raises(error, match=match):
            SFTTrainer(model, tok, data)
        with pytest.raises(error, match=match.replace("train_data", "eval_data")):
            SFTTrainer(model, tok, TRAIN[:4], eval_data=data)


def test_eval_data_that_keeps_no_output_token_is_refused_not_scored_zero():
    """Eval pairs cut before their output (a long prompt, a short max_seq_len) have no token to
    score: evaluate_loss said loss 0, perplexity 1. Refused by the trainer's constructor and by
    evaluate_loss, naming max_seq_len; one pair with an output token is enough."""
    from qlora_fast.models import LlamaForCausalLM

    tok, model = ByteTokenizer(), LlamaForCausalLM(TINY)
    long_prompts = [{"instruction": "x" * 200, "output": "y"} for _ in range(3)]
    config = SFTConfig(max_seq_len=64)
    with pytest.raises(ValueError, match="no eval_data pair keeps any output token within max_seq_len=64"):
        SFTTrainer(model, tok, TRAIN[:4], eval_data=long_prompts, config=config)
    with pytest.raises(ValueError, match="max_len=64"):
        evaluate_loss(model, tok, long_prompts, max_len=64)
    mixed = long_prompts + [{"instruction": "add 2 and 3", "output": "5"}]
    trainer = SFTTrainer(model, tok, TRAIN[:4], eval_data=mixed, config=config)
    one = evaluate_loss(model, tok, mixed[-1:], max_len=64)
    got = trainer.evaluate()  # the cut pairs count for nothing
    assert math.isclose(got["loss"], one["loss"], rel_tol=1e-6) and one["loss"] > 0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_train_the_same_adapter(tmp_path):
    worker = os.path.join(os.path.dirname(__file__), "sft_ddp_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        worker,
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["first_batch"] != r1["first_batch"]  # each rank trains on its own slice
    for name, p in r0["adapter"].items():
        assert torch.equal(p, r1["adapter"][name]), name  # gradients were averaged: ranks agree
    assert any(not torch.equal(p, r0["initial"][n]) for n, p in r0["adapter"].items())
    assert [h["loss"] for h in r0["history"]] == [h["loss"] for h in r1["history"]]  # all-reduced


@pytest.mark.slow
def test_finetune_command_end_to_end(tmp_path, capsys):
    from qlora_fast.cli import main

    rc = main(
        [
            "finetune",
            "--method",
            "qlora",
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--eval-pairs",
            "8",
            "--max-new-tokens",
            "4",
            "--pretrain-steps",
            "2",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--output",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    for needle in (
        "trainable",
        "4-bit linear layers",
        "peak memory",
        "held-out perplexity",
        "exact match",
        "adapter saved to",
    ):
        assert needle in out, needle
    assert sorted(os.listdir(tmp_path / "out" / "adapter-qlora")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    # The demo's default base speaks the BPE trained on the shipped corpus, cached beside it.
    from safetensors import safe_open

    from qlora_fast.tokenizer import load_shipped_bpe

    assert "bpe tokenizer" in out
    (bpe_file,) = [f for f in os.listdir(tmp_path / "cache") if f.startswith("bpe-")]
    vocab = load_shipped_bpe(cache_dir=str(tmp_path / "cache"), progress=False).vocab_size
    with safe_open(str(tmp_path / "out" / "adapter-qlora" / "adapter_model.safetensors"), framework="pt") as f:
        assert f.metadata()["base_embedding_shape"].startswith(f"{vocab}x")


def test_examples_cut_before_their_answer_are_dropped():
    tok = ByteTokenizer()
    pairs = [{"instruction": "x" * 200, "output": "long"}, {"instruction": "Hi?", "output": "yes"}]
    rows = build_examples(tok, pairs, PROMPT_TEMPLATE, 64, packing=False)
    assert rows == [encode_example(tok, "Hi?", "yes", PROMPT_TEMPLATE, 64)]
    with pytest.raises(ValueError, match="max_seq_len"):
        build_examples(tok, pairs[:1], PROMPT_TEMPLATE, 64, packing=False)


@pytest.mark.slow
def test_finetune_command_on_a_local_hf_model_dir(tmp_path, capsys):
    """--model DIR: a tiny transformers Llama + tokenizer saved locally (nothing downloaded)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from helpers import corpus_hf_tokenizer

    from qlora_fast.cli import main

    fast = corpus_hf_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, eos_token_id=fast.eos_token_id)
    model_dir = tmp_path / "hf"
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    rc = main(["finetune", "--model", str(model_dir), "--method", "lora", "--steps", "2", "--batch-size", "4",
               "--eval-pairs", "4", "--max-new-tokens", "3", "--output", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert str(model_dir) in out and "adapter saved to" in out
    from qlora_fast.peft import read_adapter_config

    assert read_adapter_config(str(tmp_path / "out" / "adapter-lora")).quantize_base is None


@pytest.mark.slow
def test_finetune_command_under_torchrun(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "-m",
        "qlora_fast.cli",
        "finetune",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--eval-pairs",
        "4",
        "--max-new-tokens",
        "2",
        "--pretrain-steps",
        "2",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--output",
        str(tmp_path / "out"),
        "--no-progress",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("=== qlora-fast finetune report ===") == 1  # rank 0 only
    assert sorted(os.listdir(tmp_path / "out" / "adapter-qlora")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
