"""The Hugging Face ecosystem as the oracle: adapters move both ways with PEFT (logits equal),
saves are one unit and loads all-or-nothing, merged models round-trip through transformers'
save_pretrained / from_pretrained, bitsandbytes 4-bit models are adopted byte for byte. Tiny
Llama and GPT-2 models built from configs (no downloads)."""
import copy
import dataclasses
import errno
import json
import os
import warnings

import pytest
import torch
from conftest import assert_close
from torch import nn

from qlora_fast.peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model, load_adapter
from qlora_fast.tokenizer.base import ByteTokenizer

transformers = pytest.importorskip("transformers")
hf_peft = pytest.importorskip("peft")

VOCAB = 259


def hf_llama(dtype=torch.float32, hidden=48):
    # hidden=64 (with intermediate 128) for bitsandbytes 4-bit: its CPU kernels misread rows that
    # are not a whole number of 64-blocks (its own quantize -> dequantize is off there).
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=83 if hidden == 48 else 2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=6 if hidden == 48 else 4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def hf_gpt2(dtype=torch.float32):
    # n_embd 48: attn.c_proj is square (48 x 48), the layer that reloads silently transposed if
    # a merge hands back an nn.Linear in place of the Conv1D.
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg).to(dtype).eval()


MODELS = {"llama": hf_llama, "gpt2": hf_gpt2}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}


def ours_config(method, kind):
    return {
        "lora": LoraConfig(target_modules=TARGETS[kind], r=3, lora_alpha=5.0, lora_dropout=0.1),
        "rslora": LoraConfig(target_modules=TARGETS[kind], r=4, lora_alpha=3.0, use_rslora=True),
        "qlora": LoraConfig(target_modules=TARGETS[kind], r=3, quantize_base="nf4", blocksize=32),
        "prefix": PrefixTuningConfig(num_virtual_tokens=3),
        "prefix_mlp": PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=9),
        "prompt": PromptTuningConfig(num_virtual_tokens=4, init="text", init_text="hi"),
    }[method]


def perturb(params):
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.1)


def real_logits(logits, t):
    """PEFT's prompt tuning returns logits for the virtual tokens too; ours line up with the input."""
    return logits[:, -t:]


# ------------------------------------------------------------------------- ours -> PEFT
@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("method", ["lora", "rslora", "qlora", "prefix", "prefix_mlp", "prompt"])
def test_our_adapter_loads_in_peft_with_equal_logits(tmp_path, seed, kind, method):
    base = MODELS[kind]()
    fresh, fresh_ours = copy.deepcopy(base), copy.deepcopy(base)
    ours = get_peft_model(base, ours_config(method, kind), tokenizer=ByteTokenizer())
    perturb(p for _, p in ours.adapter_parameters())
    path = ours.save_adapter(str(tmp_path / "adapter"))
    assert sorted(os.listdir(path)) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = json.load(open(os.path.join(path, "adapter_config.json")))
    if method in ("lora", "rslora", "qlora"):
        assert saved["fan_in_fan_out"] is (kind == "gpt2")
    theirs = hf_peft.PeftModel.from_pretrained(fresh, path).eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    ours.eval()
    if method == "qlora":
        # PEFT has no 4-bit base here: its adapter tensors must be ours exactly (the base differs).
        got = {n: p for n, p in theirs.named_parameters() if "lora_" in n}
        for name, p in ours.adapter_parameters():
            key = (
                "base_model.model."
                + name[len("base_model.") :].replace("lora_A", "lora_A.default").replace("lora_B", "lora_B.default")
                + ".weight"
            )
            assert torch.equal(got[key], p), name
        assert theirs.peft_config["default"].use_rslora is False and theirs.peft_config["default"].r == 3
        return
    assert_close(real_logits(theirs(input_ids=ids).logits, 7), ours(input_ids=ids).logits)
    # and our own loader reads it back as it was (our extras kept beside PEFT's fields)
    again = load_adapter(fresh_ours, path).eval()
    assert again.peft_config.to_dict() == ours.peft_config.to_dict()
    assert torch.equal(again(input_ids=ids).logits, ours(input_ids=ids).logits)


# ------------------------------------------------------------------------- PEFT -> ours
def peft_config(method, kind):
    tm = TARGETS[kind]
    return {
        "lora": hf_peft.LoraConfig(
            r=3, lora_alpha=5, target_modules=tm, fan_in_fan_out=kind == "gpt2", task_type="CAUSAL_LM"
        ),
        "rslora": hf_peft.LoraConfig(
            r=4, lora_alpha=3, use_rslora=True, target_modules=tm, fan_in_fan_out=kind == "gpt2", task_type="CAUSAL_LM"
        ),
        "all_linear": hf_peft.LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"),
        "prefix": hf_peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
        "prefix_mlp": hf_peft.PrefixTuningConfig(
            num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=9, task_type="CAUSAL_LM"
        ),
        "prompt": hf_peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    }[method]


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("method", ["lora", "rslora", "all_linear", "prefix", "prefix_mlp", "prompt"])
def test_peft_adapter_loads_in_ours_with_equal_logits(tmp_path, seed, kind, method):
    base = MODELS[kind]()
    fresh, oracle_base, second = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    trained = hf_peft.get_peft_model(base, peft_config(method, kind))
    perturb(p for p in trained.parameters() if p.requires_grad)
    trained.save_pretrained(str(tmp_path))
    theirs = hf_peft.PeftModel.from_pretrained(oracle_base, str(tmp_path)).eval()  # what the files hold
    ours = load_adapter(fresh, str(tmp_path)).eval()
    ids = torch.randint(0, VOCAB, (3, 6))
    assert_close(ours(input_ids=ids).logits, real_logits(theirs(input_ids=ids).logits, 6))
    # and back: ours re-saved loads in PEFT with the same logits
    ours.save_adapter(str(tmp_path / "again"))
    back = hf_peft.PeftModel.from_pretrained(second, str(tmp_path / "again")).eval()
    assert_close(real_logits(back(input_ids=ids).logits, 6), ours(input_ids=ids).logits)


def test_our_earlier_format_still_loads(tmp_path, seed):
    from safetensors.torch import save_file

    base = hf_llama()
    fresh = copy.deepcopy(base)
    ours = get_peft_model(base, LoraConfig(target_modules=["q_proj", "v_proj"], r=2))
    perturb(p for _, p in ours.adapter_parameters())
    # the layout save_adapter wrote before PEFT's: our config dict, our tensor names
    (tmp_path / "adapter_config.json").write_text(json.dumps(ours.peft_config.to_dict()))
    save_file(
        ours.adapter_state_dict(),
        str(tmp_path / "adapter_model.safetensors"),
        metadata={"base_embedding_shape": f"{VOCAB}x48"},
    )
    loaded = load_adapter(fresh, str(tmp_path)).eval()
    ids = torch.randint(0, VOCAB, (2, 5))
    assert torch.equal(loaded(input_ids=ids).logits, ours.eval()(input_ids=ids).logits)


def test_unsupported_peft_settings_are_named(tmp_path):
    trained = hf_peft.get_peft_model(
        hf_llama(), hf_peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, task_type="CAUSAL_LM")
    )
    trained.save_pretrained(str(tmp_path))
    model = hf_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(model, str(tmp_path))
    assert all(type(m) is not hf_peft.tuners.lora.Linear for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("init", ["pissa", "olora", "gaussian", "orthogonal"])
def test_peft_inits_that_rewrite_the_base_are_refused(tmp_path, seed, init):
    # PiSSA/OLoRA move part of W into A and B at init: the adapter is only right on that changed
    # base, which its files do not hold, so it must be refused, not loaded onto the original base.
    base = hf_llama()
    fresh, oracle_base = copy.deepcopy(base), copy.deepcopy(base)
    trained = hf_peft.get_peft_model(
        base, hf_peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=init,
                                 task_type="CAUSAL_LM"))
    perturb(p for p in trained.parameters() if p.requires_grad)
    trained.save_pretrained(str(tmp_path))
    if init in ("pissa", "olora"):
        with pytest.raises(ValueError, match=f"init_lora_weights='{init}'"):
            load_adapter(fresh, str(tmp_path))
        return
    theirs = hf_peft.PeftModel.from_pretrained(oracle_base, str(tmp_path)).eval()
    ids = torch.randint(0, VOCAB, (2, 6))
    assert_close(load_adapter(fresh, str(tmp_path)).eval()(input_ids=ids).logits, theirs(input_ids=ids).logits)


@pytest.mark.parametrize("kind, regex", [("llama", r"model\.layers\.0\..*"), ("gpt2", r".*\.attn\..*")])
def test_our_regex_adapter_loads_in_peft(tmp_path, seed, kind, regex):
    # PEFT's regex also matches dropouts (and fails on them): it gets the matched layers' names
    base = MODELS[kind]()
    fresh, fresh_ours = copy.deepcopy(base), copy.deepcopy(base)
    ours = get_peft_model(base, LoraConfig(target_modules=regex, r=2, lora_alpha=4.0))
    perturb(p for _, p in ours.adapter_parameters())
    path = ours.save_adapter(str(tmp_path / "adapter"))
    names = json.load(open(os.path.join(path, "adapter_config.json")))["target_modules"]
    assert names == sorted(n for n, m in ours.base_model.named_modules() if m in set(ours.lora_modules()))
    theirs = hf_peft.PeftModel.from_pretrained(fresh, path).eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    ours.eval()
    assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits)
    assert load_adapter(fresh_ours, path).peft_config.target_modules == regex  # our exact config comes back


def test_peft_target_list_with_names_this_model_lacks(tmp_path, seed):
    # a list written for several architectures: PEFT adapts the names present and so do we
    base = hf_llama()
    fresh, oracle_base = copy.deepcopy(base), copy.deepcopy(base)
    trained = hf_peft.get_peft_model(base, hf_peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "query_key_value"], task_type="CAUSAL_LM"))
    perturb(p for p in trained.parameters() if p.requires_grad)
    trained.save_pretrained(str(tmp_path))
    theirs = hf_peft.PeftModel.from_pretrained(oracle_base, str(tmp_path)).eval()
    ours = load_adapter(fresh, str(tmp_path)).eval()
    ids = torch.randint(0, VOCAB, (2, 6))
    assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
    assert sorted(ours.peft_config.target_modules) == ["q_proj", "v_proj"]
    ours.load_adapter(str(tmp_path))  # and into the model built from it
    # none present is still an error
    config = json.load(open(tmp_path / "adapter_config.json"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["c_attn", "query"]}))
    with pytest.raises(ValueError, match="none of target_modules"):
        load_adapter(hf_llama(), str(tmp_path))


def test_peft_all_linear_adapter_loads_into_a_model_built_with_all_linear(tmp_path, seed):
    # PEFT 0.21 saves "all-linear" as the list of the layers it matched; other dropout is no mismatch
    base = hf_llama()
    oracle_base = copy.deepcopy(base)
    trained = hf_peft.get_peft_model(copy.deepcopy(base), hf_peft.LoraConfig(
        r=2, lora_alpha=4, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM"))
    perturb(p for p in trained.parameters() if p.requires_grad)
    trained.save_pretrained(str(tmp_path))
    assert isinstance(json.load(open(tmp_path / "adapter_config.json"))["target_modules"], list)
    ours = get_peft_model(base, LoraConfig(target_modules="all-linear", r=2, lora_alpha=4.0)).load_adapter(
        str(tmp_path)).eval()
    theirs = hf_peft.PeftModel.from_pretrained(oracle_base, str(tmp_path)).eval()
    ids = torch.randint(0, VOCAB, (2, 6))
    assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
    for other in (LoraConfig(target_modules=["q_proj"], r=2, lora_alpha=4.0),
                  LoraConfig(target_modules="all-linear", r=2, lora_alpha=8.0)):
        with pytest.raises(ValueError, match="config"):
            get_peft_model(hf_llama(), other).load_adapter(str(tmp_path))


def test_adapter_on_the_output_layer_round_trips(tmp_path, seed):
    # replace_linear adapts lm_head too (skip=()); PEFT loads such an adapter, and so do we
    from qlora_fast.nn import replace_linear
    from qlora_fast.peft import save_adapter

    base = hf_llama()
    fresh, oracle_base = copy.deepcopy(base), copy.deepcopy(base)
    model = replace_linear(base, quant_type=None, r=2, lora_alpha=4.0, skip=())
    perturb(p for n, p in model.named_parameters() if "lora_" in n)
    path = save_adapter(model, str(tmp_path / "adapter"))
    ids = torch.randint(0, VOCAB, (2, 6))
    want = model.eval()(input_ids=ids).logits
    assert_close(hf_peft.PeftModel.from_pretrained(oracle_base, path).eval()(input_ids=ids).logits, want)
    ours = load_adapter(fresh, path).eval()
    assert "lm_head" in [n for n, m in ours.base_model.named_modules() if m in set(ours.lora_modules())]
    assert torch.equal(ours(input_ids=ids).logits, want)


def test_a_tied_output_layer_with_an_adapter_still_ties_and_resizes(seed):
    """transformers ties and resizes an output layer by assigning its weight; on our LoRA wrapper
    the assignment reaches the base layer (a read-only property refused it). Oracle: the
    embedding itself."""
    from qlora_fast.nn import replace_linear

    base = hf_llama()
    base.config.tie_word_embeddings = True
    base.tie_weights()
    model = replace_linear(base, quant_type=None, r=2, lora_alpha=4.0, skip=(), target_modules=["lm_head"])
    model.tie_weights()
    embedding = model.get_input_embeddings().weight
    assert model.lm_head.base.weight is embedding and model.lm_head.weight is embedding
    assert model(input_ids=torch.randint(0, VOCAB, (2, 5))).logits.shape[-1] == VOCAB
    model.resize_token_embeddings(VOCAB + 11)  # reaches the base; the adapter keeps its shape (as PEFT's)
    assert model.lm_head.base.weight is model.get_input_embeddings().weight


# ------------------------------------------------------------------------- one unit, all or nothing
def test_interrupted_save_leaves_the_previous_adapter_whole(tmp_path, seed, monkeypatch):
    from qlora_fast import utils

    base = hf_llama()
    fresh = copy.deepcopy(base)
    first = get_peft_model(base, LoraConfig(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=4.0))
    perturb(p for _, p in first.adapter_parameters())
    path = first.save_adapter(str(tmp_path / "adapter"))
    (tmp_path / "adapter" / "README.md").write_text("kept")  # a file of the user's beside ours
    expected = {n: p.clone() for n, p in first.adapter_parameters()}
    # a second save with another rank and alpha hits a full disk between its two files
    second = get_peft_model(hf_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], r=3, lora_alpha=7.0))
    real_write, calls = utils._write_file, []

    def disk_full_on_second_file(file, data):
        calls.append(file)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", file)
        real_write(file, data)

    monkeypatch.setattr(utils, "_write_file", disk_full_on_second_file)
    with pytest.raises(OSError, match="No space"):
        second.save_adapter(path)
    monkeypatch.setattr(utils, "_write_file", real_write)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no temporary left behind
    loaded = load_adapter(fresh, path)
    assert loaded.peft_config.r == 2 and loaded.peft_config.lora_alpha == 4.0
    for name, p in loaded.adapter_parameters():
        assert torch.equal(p, expected[name]), name
    # a save that succeeds replaces the unit and keeps the user's file
    second.save_adapter(path)
    assert sorted(os.listdir(path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert load_adapter(hf_llama(), path).peft_config.r == 3
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o777 & ~_umask())


def test_a_diverged_adapter_is_not_written_over_the_last_good_one(tmp_path):
    ours = get_peft_model(hf_llama(), LoraConfig(target_modules=["q_proj"], r=2))
    perturb(p for _, p in ours.adapter_parameters())
    path = ours.save_adapter(str(tmp_path / "adapter"))
    before = {name: open(os.path.join(path, name), "rb").read() for name in os.listdir(path)}
    with torch.no_grad():
        ours.adapter_parameters()[-1][1][0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        ours.save_adapter(path)
    assert {name: open(os.path.join(path, name), "rb").read() for name in os.listdir(path)} == before
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_fallback_swap_that_fails_keeps_the_previous_adapter(tmp_path, seed, monkeypatch):
    # without RENAME_EXCHANGE the swap is two renames; the old adapter must survive either failing
    from qlora_fast import utils
    from qlora_fast.utils import clean_stale_temporaries

    ours = get_peft_model(hf_llama(), LoraConfig(target_modules=["q_proj"], r=2))
    perturb(p for _, p in ours.adapter_parameters())
    path = ours.save_adapter(str(tmp_path / "adapter"))
    before = {name: open(os.path.join(path, name), "rb").read() for name in os.listdir(path)}
    perturb(p for _, p in ours.adapter_parameters())
    monkeypatch.setattr(utils, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def rename_failing(*which):
        calls = []

        def rename(a, b):
            calls.append(a)
            if len(calls) in which:
                raise OSError(errno.EIO, "Input/output error")
            real_rename(a, b)
        return rename

    monkeypatch.setattr(utils.os, "rename", rename_failing(2))  # the new one fails to take the old one's place
    with pytest.raises(OSError, match="Input/output"):
        ours.save_adapter(path)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    assert {name: open(os.path.join(path, name), "rb").read() for name in os.listdir(path)} == before
    # a crash between the renames (here: both later renames fail) leaves the only copy where no cleaner takes it
    monkeypatch.setattr(utils.os, "rename", rename_failing(2, 3))
    with pytest.raises(OSError):
        ours.save_adapter(path)
    monkeypatch.setattr(utils.os, "rename", real_rename)
    (kept,) = os.listdir(tmp_path)
    monkeypatch.setattr("qlora_fast.utils._pid_alive", lambda pid: False)  # as if the writer had died
    clean_stale_temporaries(tmp_path)
    assert os.listdir(tmp_path) == [kept] and kept.startswith(".old-")
    assert {name: open(tmp_path / kept / name, "rb").read() for name in os.listdir(tmp_path / kept)} == before


def test_saving_through_a_symlink_replaces_its_target(tmp_path, seed):
    ours = get_peft_model(hf_llama(), LoraConfig(target_modules=["q_proj"], r=2))
    (tmp_path / "run1").mkdir()
    ours.save_adapter(str(tmp_path / "run1" / "adapter"))
    os.symlink("run1/adapter", tmp_path / "latest")
    perturb(p for _, p in ours.adapter_parameters())
    ours.save_adapter(str(tmp_path / "latest"))
    assert os.readlink(tmp_path / "latest") == "run1/adapter"
    assert sorted(os.listdir(tmp_path)) == ["latest", "run1"] and os.listdir(tmp_path / "run1") == ["adapter"]
    loaded = load_adapter(hf_llama(), str(tmp_path / "run1" / "adapter"))
    for (name, a), (_, b) in zip(loaded.adapter_parameters(), ours.adapter_parameters()):
        assert torch.equal(a, b), name


def test_a_killed_saves_temporary_is_cleaned_up_later(tmp_path):
    ours = get_peft_model(hf_llama(), LoraConfig(target_modules=["q_proj"], r=2))
    stale, recent = tmp_path / ".tmp-adapter-killed", tmp_path / ".tmp-adapter-inprogress"
    for d in (stale, recent):
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"half")
    os.utime(stale, (1, 1))  # a save killed long ago
    ours.save_adapter(str(tmp_path / "adapter"))
    assert sorted(os.listdir(tmp_path)) == [".tmp-adapter-inprogress", "adapter"]  # a save in progress is left alone


def test_adapter_temporaries_carry_the_writers_pid(tmp_path, monkeypatch):
    # An adapter named like a pid ("123") once gave a temporary ".tmp-123-..." that the checkpoint
    # cleaner read as pid 123's: every temporary now leads with its own writer's pid.
    from helpers import dead_pid

    from qlora_fast import utils
    from qlora_fast.utils import clean_stale_temporaries

    ours = get_peft_model(hf_llama(), LoraConfig(target_modules=["q_proj"], r=2))
    dead = tmp_path / f".tmp-{dead_pid()}-123-killed"  # a killed save, however recent
    dead.mkdir()
    (dead / "adapter_model.safetensors").write_bytes(b"half")
    seen = []
    write = utils._write_file

    def spy(path, data):
        tmp = os.path.dirname(path)
        seen.append(os.path.basename(tmp))
        assert clean_stale_temporaries(os.path.dirname(tmp)) == []  # a save in progress is never taken
        write(path, data)

    monkeypatch.setattr(utils, "_write_file", spy)
    ours.save_adapter(str(tmp_path / "123"))
    assert seen and all(name.startswith(f".tmp-{os.getpid()}-123-") for name in seen)
    assert sorted(os.listdir(tmp_path)) == ["123"]
    assert load_adapter(hf_llama(), str(tmp_path / "123")).peft_config.r == 2


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_files_from_two_saves_are_refused(tmp_path):
    a = get_peft_model(hf_llama(), LoraConfig(target_modules=["q_proj"], r=2, lora_alpha=4.0))
    b = get_peft_model(hf_llama(), LoraConfig(target_modules=["q_proj"], r=2, lora_alpha=8.0))
    a.save_adapter(str(tmp_path / "a"))
    b.save_adapter(str(tmp_path / "b"))
    os.replace(tmp_path / "b" / "adapter_config.json", tmp_path / "a" / "adapter_config.json")  # only alpha differs
    with pytest.raises(ValueError, match="different saves"):
        load_adapter(hf_llama(), str(tmp_path / "a"))


def _snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}, \
        [p.requires_grad for p in model.parameters()]


def _assert_unchanged(model, snapshot):
    modules, state, grads = snapshot
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    now = model.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], v) for k, v in state.items())
    assert [p.requires_grad for p in model.parameters()] == grads


@pytest.mark.parametrize("damage", ["shape", "nan", "missing", "truncated", "bad_json"])
def test_bad_adapter_leaves_the_model_as_it_was(tmp_path, seed, damage):
    from safetensors.torch import load_file, save_file

    ours = get_peft_model(
        hf_llama(), LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=2, quantize_base="nf4")
    )
    perturb(p for _, p in ours.adapter_parameters())
    path = ours.save_adapter(str(tmp_path / "adapter"))
    weights = os.path.join(path, "adapter_model.safetensors")
    from safetensors import safe_open

    metadata = safe_open(weights, "pt").metadata()
    state = load_file(weights)
    last = sorted(state)[-1]  # damage the last tensor, so a loader copying in order would have changed the rest
    if damage == "shape":
        state[last] = state[last][:, :1].contiguous()
    elif damage == "nan":
        state[last][0, 0] = float("nan")
    elif damage == "missing":
        del state[last]
    save_file(state, weights, metadata=metadata)
    if damage == "truncated":
        data = open(weights, "rb").read()
        open(weights, "wb").write(data[: len(data) // 2])
    if damage == "bad_json":
        open(os.path.join(path, "adapter_config.json"), "w").write("{\"peft_type\": \"LORA\", ")
    # a fresh model (module-level load_adapter) and a built PeftModel (its load_adapter)
    model = hf_llama()
    before = _snapshot(model)
    with pytest.raises(ValueError):
        load_adapter(model, path)
    _assert_unchanged(model, before)
    target = get_peft_model(
        hf_llama(), LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=2, quantize_base="nf4")
    )
    before = _snapshot(target)
    with pytest.raises(ValueError):
        target.load_adapter(path)
    _assert_unchanged(target, before)


@pytest.mark.parametrize("quant_type", ["nf4", None])
def test_replace_linear_is_all_or_nothing(seed, quant_type):
    from qlora_fast.nn import replace_linear

    model = hf_llama()
    before = _snapshot(model)
    # rank 20 fits the 48/83-wide projections but not k_proj/v_proj (48 -> 16): the last built fails,
    # after q_proj's LoRA module was built (on a full-precision base, freezing q_proj in place)
    with pytest.raises(ValueError, match="r must be"):
        replace_linear(model, quant_type=quant_type, r=20)
    _assert_unchanged(model, before)
    with pytest.raises(ValueError, match="r must be"):
        get_peft_model(model, LoraConfig(r=20, quantize_base=quant_type))
    _assert_unchanged(model, before)


def test_replace_linear_twice_adds_adapters_or_says_why(seed):
    from qlora_fast.nn import Linear4bit, LoRALinear, QLoRALinear, replace_linear

    model = hf_llama()
    replace_linear(model)  # quantize only
    fours = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    packed = {n: m.weight.clone() for n, m in fours.items()}
    replace_linear(model, r=4)  # adapters on the 4-bit layers, bytes kept
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, QLoRALinear)}
    assert set(wrapped) == set(fours)
    assert all(torch.equal(wrapped[n].base.weight, packed[n]) for n in wrapped)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(m.lora_A.numel() + m.lora_B.numel() for m in wrapped.values()) > 0
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        replace_linear(model, r=4)
    assert all(isinstance(m, LoRALinear) for n, m in model.named_modules() if n in wrapped)


# ------------------------------------------------------------------------- merge -> save_pretrained -> from_pretrained
def bnb_reference_path(model):
    """bitsandbytes' CPU inference repacks its weight for an AVX512 kernel (and fails on some
    shapes); its training path is dequantize + matmul, the oracle here."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize(
    "method, merge",
    [
        ("lora", {}),
        ("rslora", {}),
        ("qlora", {}),
        ("qlora", {"dtype": torch.bfloat16}),
        ("qlora_all", {}),
        ("qlora", {"requantize": True}),
    ],
)
def test_merged_model_round_trips_through_transformers(tmp_path, seed, kind, method, merge):
    if merge.get("requantize") and kind == "gpt2":
        pytest.skip("keeping 4 bits is refused for Conv1D layers (tested below)")
    cfg = LoraConfig(r=3, quantize_base="nf4") if method == "qlora_all" else ours_config(method, kind)
    if merge.get("requantize"):
        cfg = dataclasses.replace(cfg, blocksize=64)  # bitsandbytes' CPU dequantize needs rows of whole blocks
    base = hf_llama(hidden=64) if merge.get("requantize") else MODELS[kind]()
    conv_names = {n for n, m in base.named_modules() if type(m).__name__ == "Conv1D"}
    ours = get_peft_model(base, cfg)
    perturb(p for _, p in ours.adapter_parameters())
    ids = torch.randint(0, VOCAB, (2, 9))
    adapted = ours.eval()(input_ids=ids).logits
    merged = ours.merge_and_unload(**merge)
    got = merged(input_ids=ids).logits
    if not merge:
        # dense: W + s B A in float32 (a 4-bit base dequantized exactly): float32 rounding only
        assert_close(got, adapted, atol=2e-5, rtol=1e-4)
    merged.save_pretrained(str(tmp_path))
    saved = json.load(open(tmp_path / "config.json"))
    assert ("quantization_config" in saved) == bool(merge.get("requantize"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), device_map="cpu").eval()
    bnb_reference_path(reloaded)
    assert {n for n, m in reloaded.named_modules() if type(m).__name__ == "Conv1D"} == conv_names  # Conv1D stays Conv1D
    if merge.get("dtype"):
        assert reloaded.dtype == merge["dtype"] and all(p.dtype == merge["dtype"] for p in reloaded.parameters())
    else:
        assert all(m.weight.dtype == torch.float32 for m in reloaded.modules() if type(m) in (nn.Linear,))
    assert torch.equal(reloaded(input_ids=ids).logits, got)


def test_keep_4bit_refuses_conv1d_and_needs_no_dtype():
    ours = get_peft_model(hf_gpt2(), LoraConfig(target_modules=["c_attn"], r=2, quantize_base="nf4"))
    with pytest.raises(ValueError, match="Conv1D"):
        ours.merge_and_unload(requantize=True)
    assert len(ours.lora_modules()) == 2  # all or nothing: still adapted
    with pytest.raises(ValueError, match="dtype"):
        ours.merge_and_unload(requantize=True, dtype=torch.float16)


# ------------------------------------------------------------------------- bitsandbytes 4-bit checkpoints
def tiny_tokenizer():
    pytest.importorskip("tokenizers")
    from helpers import corpus_hf_tokenizer

    return corpus_hf_tokenizer(VOCAB)


@pytest.fixture
def bnb_checkpoint(tmp_path):
    """A tiny Llama saved by transformers after loading it with BitsAndBytesConfig(nf4, double quant)."""
    pytest.importorskip("bitsandbytes")
    dense = tmp_path / "dense"
    hf_llama(hidden=64).save_pretrained(str(dense))
    bnb_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(dense), quantization_config=bnb_config, device_map="cpu"
    )
    path = tmp_path / "bnb"
    model.save_pretrained(str(path))
    tiny_tokenizer().save_pretrained(str(path))
    return str(path), bnb_reference_path(model).eval()


def test_bnb_4bit_model_is_adopted_byte_for_byte(bnb_checkpoint, seed):
    from qlora_fast.models.hf import load_hf_model
    from qlora_fast.nn import Linear4bit, QLoRALinear, replace_linear

    path, bnb_model = bnb_checkpoint
    ids = torch.randint(0, VOCAB, (2, 7))
    want = bnb_model(input_ids=ids).logits
    packed = {
        n: m.weight.detach().clone()
        for n, m in bnb_model.named_modules()
        if hasattr(m.__dict__.get("_parameters", {}).get("weight"), "quant_state")
    }
    assert len(packed) == 14
    for make in (lambda m: replace_linear(m, r=4), lambda m: get_peft_model(m, LoraConfig(r=4)).eval(),
                 lambda m: get_peft_model(m, LoraConfig(r=4, quantize_base="nf4")).eval()):
        model = make(copy.deepcopy(bnb_model))
        assert torch.equal(model(input_ids=ids).logits, want)  # fresh adapters (B = 0): the bnb model exactly
        base = model.base_model if isinstance(model, PeftModel) else model
        for name, data in packed.items():
            layer = base.get_submodule(name)
            assert isinstance(layer, QLoRALinear) and torch.equal(layer.base.weight, data), name
    model, tokenizer = load_hf_model(path, dtype=torch.float32)
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 14
    assert torch.equal(model(input_ids=ids).logits, want)
    assert tokenizer.decode(tokenizer.encode("hello")) == "hello"


def test_peft_qlora_adapter_on_bnb_model_loads_in_ours(bnb_checkpoint, tmp_path, seed):
    from qlora_fast.models.hf import load_hf_model

    path, bnb_model = bnb_checkpoint
    theirs = hf_peft.get_peft_model(
        copy.deepcopy(bnb_model), hf_peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    perturb(p for p in theirs.parameters() if p.requires_grad)
    theirs.save_pretrained(str(tmp_path / "adapter"))
    ours = load_adapter(load_hf_model(path)[0], str(tmp_path / "adapter")).eval()
    ids = torch.randint(0, VOCAB, (2, 6))
    bnb_reference_path(theirs)
    assert_close(ours(input_ids=ids).logits, theirs.eval()(input_ids=ids).logits, atol=1e-6, rtol=1e-5)


def test_other_quantized_models_get_a_clear_error(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from qlora_fast.models.hf import load_hf_model
    from qlora_fast.nn import replace_linear

    model = nn.Sequential(nn.Linear(64, 64), bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False))
    with pytest.raises(ValueError, match="already quantized"):
        replace_linear(model)
    with pytest.raises(ValueError, match="already quantized"):
        get_peft_model(model, LoraConfig(target_modules=["1"], r=2))
    assert type(model[0]) is nn.Linear  # all or nothing
    hf_llama().save_pretrained(str(tmp_path))
    config = json.load(open(tmp_path / "config.json"))
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    json.dump(config, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="already quantized.*gptq"):
        load_hf_model(str(tmp_path))


# ------------------------------------------------------------------------- the CLI on transformers checkpoints
@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", ["gpt2", "bnb_llama", "llama_qlora"])
def test_finetune_command_default_targets_and_bnb_checkpoints(tmp_path, capsys, checkpoint, request):
    from qlora_fast.cli import main

    if checkpoint == "gpt2":  # default --target-modules on GPT-2: its own projections, not Llama's names
        path = str(tmp_path / "gpt2")
        hf_gpt2().save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
        method = "lora"
    elif checkpoint == "llama_qlora":  # quantized layer by layer while loading
        path = str(tmp_path / "llama")
        hf_llama(hidden=64).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
        method = "qlora"
    else:  # an already-4-bit checkpoint: its bytes are kept under the adapters
        path = request.getfixturevalue("bnb_checkpoint")[0]
        method = "qlora"
    out = tmp_path / "out"
    rc = main(
        [
            "finetune",
            "--model",
            path,
            "--method",
            method,
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--eval-pairs",
            "2",
            "--max-new-tokens",
            "2",
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    adapter = out / f"adapter-{method}"
    saved = json.load(open(adapter / "adapter_config.json"))
    llama = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    expected = {"gpt2": ["c_attn", "c_fc", "c_proj"], "bnb_llama": llama, "llama_qlora": llama}
    assert saved["target_modules"] == expected[checkpoint]
    assert saved["fan_in_fan_out"] is (checkpoint == "gpt2")


# ------------------------------------------------------------------------- low-memory loading
@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_low_memory_4bit_loading_equals_load_then_quantize(tmp_path, seed, kind, dtype):
    from qlora_fast.models.hf import load_hf_model
    from qlora_fast.nn import Linear4bit, replace_linear

    MODELS[kind]().to(dtype).save_pretrained(str(tmp_path), max_shard_size="40KB")  # several shards
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    model, tokenizer = load_hf_model(str(tmp_path), quantize="nf4", tokenizer=False)
    assert tokenizer is None
    reference = replace_linear(transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval())
    fours = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert fours == [n for n, m in reference.named_modules() if isinstance(m, Linear4bit)] and len(fours) > 0
    assert all(p.device.type != "meta" for p in model.parameters())
    ref_state = reference.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in model.state_dict().items())
    ids = torch.randint(0, VOCAB, (2, 7))
    assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    # Conv1D layers remember their class, so a merge gives them back
    assert all(getattr(model.get_submodule(n), "conv1d_class", None) is not None for n in fours) == (kind == "gpt2")


def test_low_memory_loading_rejects_foreign_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    from qlora_fast.models.hf import load_hf_model

    hf_llama().save_pretrained(str(tmp_path))
    state = load_file(str(tmp_path / "model.safetensors"))
    state["model.layers.9.mlp.up_proj.weight"] = torch.ones(2, 2)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="layers.9.mlp.up_proj.weight"):
        load_hf_model(str(tmp_path), quantize="nf4", tokenizer=False)
    del state["model.layers.9.mlp.up_proj.weight"], state["model.norm.weight"]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks.*model.norm.weight"):
        load_hf_model(str(tmp_path), quantize="nf4", tokenizer=False)


def test_low_memory_loading_takes_old_checkpoints_and_dtype_names_as_transformers_does(tmp_path, seed):
    """Checkpoints saved by transformers < 4.31 hold a rotary_emb.inv_freq per layer, which
    from_pretrained drops; a dtype may be given by name or as "auto". Oracle: from_pretrained."""
    from safetensors.torch import load_file, save_file

    from qlora_fast.models.hf import load_hf_model
    from qlora_fast.nn import replace_linear

    hf_llama().to(torch.bfloat16).save_pretrained(str(tmp_path))  # both paths quantize the same bf16 values
    state = load_file(str(tmp_path / "model.safetensors"))
    head_dim = hf_llama().config.hidden_size // hf_llama().config.num_attention_heads
    for i in range(hf_llama().config.num_hidden_layers):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(head_dim // 2)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ids = torch.randint(0, VOCAB, (2, 7))
    for dtype, torch_dtype in (("bfloat16", torch.bfloat16), ("auto", None), ("torch.float32", torch.float32)):
        model, _ = load_hf_model(str(tmp_path), quantize="nf4", dtype=dtype, tokenizer=False)
        reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch_dtype or "auto")
        reference = replace_linear(reference.eval(), compute_dtype=torch_dtype)
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits), dtype
    with pytest.raises(ValueError, match="dtype must be a floating torch dtype"):
        load_hf_model(str(tmp_path), quantize="nf4", dtype="int8", tokenizer=False)


def _tiny_hf_config(kind):
    llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB)
    return {
        # embed_scale: a buffer not saved, set by Gemma's own _init_weights
        "gemma2": lambda: transformers.Gemma2Config(**llama_like, head_dim=8),
        # saved as embed_out, renamed lm_head by transformers at load time
        "gpt_neox": lambda: transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                       num_attention_heads=4, vocab_size=VOCAB),
        # per-expert tensors transformers fuses into one: loaded, then quantized
        "mixtral": lambda: transformers.MixtralConfig(**llama_like, num_local_experts=3, num_experts_per_tok=2),
    }[kind]()


@pytest.mark.parametrize("kind", ["gemma2", "gpt_neox", "mixtral"])
def test_low_memory_loading_of_other_architectures_equals_load_then_quantize(tmp_path, seed, kind):
    from qlora_fast.models.hf import load_hf_model
    from qlora_fast.nn import Linear4bit, replace_linear

    transformers.AutoModelForCausalLM.from_config(_tiny_hf_config(kind)).save_pretrained(str(tmp_path))
    model, _ = load_hf_model(str(tmp_path), quantize="nf4", tokenizer=False)
    reference = replace_linear(transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval())
    fours = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert fours == [n for n, m in reference.named_modules() if isinstance(m, Linear4bit)] and len(fours) > 0
    ref_state = reference.state_dict()
    assert model.state_dict().keys() == ref_state.keys()
    assert all(torch.equal(v, ref_state[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, dict(reference.named_buffers())[k]) for k, v in model.named_buffers())
    ids = torch.randint(0, VOCAB, (2, 7))
    assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


# ------------------------------------------------------------------------- inside transformers' Trainer and TRL
def _train_texts():
    from qlora_fast.data import load_instructions

    return [f"{p['instruction']} {p['output']}" for p in load_instructions("train")[:16]]


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["transformers", "transformers_get_peft_model", "trl"])
def test_trains_inside_hf_trainers_and_saves_a_peft_adapter(tmp_path, seed, trainer):
    from qlora_fast.nn import replace_linear
    from qlora_fast.peft import save_adapter

    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    base = hf_llama(hidden=64)
    fresh, fresh_again = copy.deepcopy(base), copy.deepcopy(base)
    if trainer == "transformers_get_peft_model":  # our PeftModel wrapper instead of the model adapted in place
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16.0, quantize_base="nf4"))
    else:
        model = replace_linear(base, r=8)  # QLoRA in place; the model is still a transformers model
    texts = _train_texts()
    args = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=seed % 2**31,
        disable_tqdm=True,
    )
    if trainer != "trl":
        rows = [tokenizer(t, truncation=True, max_length=48) for t in texts]
        dataset = [dict(input_ids=r["input_ids"], attention_mask=r["attention_mask"]) for r in rows]
        collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)
        run = transformers.Trainer(
            model=model, args=transformers.TrainingArguments(**args), train_dataset=dataset, data_collator=collator
        )
    else:
        trl = pytest.importorskip("trl")
        datasets = pytest.importorskip("datasets")
        run = trl.SFTTrainer(
            model=model,
            args=trl.SFTConfig(max_length=48, bf16=False, **args),
            processing_class=tokenizer,
            train_dataset=datasets.Dataset.from_dict({"text": texts}),
        )
    run.train()
    losses = [h["loss"] for h in run.state.log_history if "loss" in h]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    path = save_adapter(model, str(tmp_path / "adapter"))
    theirs = hf_peft.PeftModel.from_pretrained(fresh, path).eval()  # PEFT reads it: the trained tensors exactly
    peft_tensors = {n.replace(".default", ""): p for n, p in theirs.named_parameters() if "lora_" in n}
    inner = model.base_model if isinstance(model, PeftModel) else model
    wrapped = [(n, m) for n, m in inner.named_modules() if hasattr(m, "lora_A")]
    assert len(peft_tensors) == 2 * len(wrapped) == 28
    for name, module in wrapped:
        assert torch.equal(peft_tensors[f"base_model.model.{name}.lora_A.weight"], module.lora_A)
        assert torch.equal(peft_tensors[f"base_model.model.{name}.lora_B.weight"], module.lora_B)
    # and ours rebuilds the same QLoRA model from it (same 4-bit base, same adapter): same logits
    again = load_adapter(fresh_again, path).eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


# ------------------------------------------------------------------------- other architectures
def tiny_falcon(**kw):
    # multi-query attention in parallel with the MLP, whose output Falcon adds into in place
    cfg = transformers.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB, **kw)
    return transformers.FalconForCausalLM(cfg).eval()


@pytest.mark.parametrize("quant_type", [None, "nf4"])
def test_falcon_trains_with_the_gradients_of_peft(seed, quant_type):
    """Oracle: PEFT's LoRA on the same model, the 4-bit bases given as their dequantized weights."""
    from qlora_fast.nn import LoRALinear, replace_linear

    model = tiny_falcon()
    ours = replace_linear(copy.deepcopy(model), quant_type=quant_type, target_modules="all-linear", r=4,
                          lora_alpha=8.0, blocksize=32)
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, LoRALinear)}
    base = copy.deepcopy(model)
    with torch.no_grad():
        for n, m in layers.items():
            base.get_submodule(n).weight.copy_(m.base_weight())
    peft = hf_peft.get_peft_model(base, hf_peft.LoraConfig(target_modules=list(layers), r=4, lora_alpha=8.0))
    with torch.no_grad():
        for n, m in layers.items():
            m.lora_B.normal_()  # a trained-looking adapter: gradients reach A too
            theirs = peft.base_model.model.get_submodule(n)
            theirs.lora_A["default"].weight.copy_(m.lora_A)
            theirs.lora_B["default"].weight.copy_(m.lora_B)
    ids = torch.randint(0, VOCAB, (2, 7))
    ours.train(), peft.train()
    ours(input_ids=ids, labels=ids).loss.backward()
    peft(input_ids=ids, labels=ids).loss.backward()
    for n, m in layers.items():
        theirs = peft.base_model.model.get_submodule(n)
        for mine, other in ((m.lora_A, theirs.lora_A["default"].weight), (m.lora_B, theirs.lora_B["default"].weight)):
            # the same float32 math summed in another order
            assert_close(mine.grad, other.grad, atol=1e-6 * other.grad.abs().max().item(), rtol=1e-5, msg=n)


ARCH_CONFIGS = {
    "phi3": lambda: transformers.Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                            pad_token_id=0),  # fused qkv_proj and gate_up_proj
    "opt": lambda: transformers.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                          vocab_size=VOCAB, word_embed_proj_dim=32),  # out_proj, fc1, fc2
    "llama": lambda: hf_llama().config,
    "gpt2": lambda: hf_gpt2().config,
    "gpt_neox": lambda: _tiny_hf_config("gpt_neox"),
    "falcon": lambda: tiny_falcon().config,
}


@pytest.mark.parametrize("kind", list(ARCH_CONFIGS))
def test_default_lora_targets_are_the_layers_peft_all_linear_picks(seed, kind):
    """Oracle: PEFT's "all-linear" (every linear layer but the output layer, the QLoRA choice)."""
    model = transformers.AutoModelForCausalLM.from_config(ARCH_CONFIGS[kind]())
    ours = get_peft_model(copy.deepcopy(model), LoraConfig(r=2))
    theirs = hf_peft.get_peft_model(copy.deepcopy(model), hf_peft.LoraConfig(r=2, target_modules="all-linear"))
    adapted = sorted(n for n, m in ours.base_model.named_modules() if hasattr(m, "lora_A"))
    assert adapted == sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                             if isinstance(m, hf_peft.tuners.lora.LoraLayer))
    assert isinstance(ours.peft_config.target_modules, list)  # familiar names: saved as names


@pytest.mark.parametrize("falcon", [{}, {"new_decoder_architecture": True, "num_kv_heads": 2}])
@pytest.mark.parametrize("method", ["prefix", "prefix_mlp"])
def test_falcon_prefix_round_trips_through_peft(tmp_path, seed, falcon, method):
    """Falcon caches 1 key head with multi_query, all 4 with its new decoder (num_kv_heads=2 broadcast),
    neither written as num_key_value_heads. Oracle: PEFT loading the adapter, and our own reload."""
    base = tiny_falcon(**falcon)
    fresh, fresh_ours = copy.deepcopy(base), copy.deepcopy(base)
    ours = get_peft_model(base, ours_config(method, "llama"))
    perturb(p for _, p in ours.adapter_parameters())
    path = ours.save_adapter(str(tmp_path / "adapter"))
    ids = torch.randint(0, VOCAB, (2, 7))
    ours.eval()
    theirs = hf_peft.PeftModel.from_pretrained(fresh, path).eval()
    assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits)
    again = load_adapter(fresh_ours, path).eval()
    assert torch.equal(again(input_ids=ids).logits, ours(input_ids=ids).logits)


def test_a_failed_cache_probe_warns_naming_the_error(seed, monkeypatch):
    """A config without num_key_value_heads is probed by a one-token forward; when that forward
    fails, the fallback (num_attention_heads) is announced with the error, not taken silently."""
    from qlora_fast.peft.model import attention_geometry

    model = tiny_falcon()
    heads = model.config.num_attention_heads
    def broken_forward(*args, **kwargs):
        raise RuntimeError("probe exploded")
    monkeypatch.setattr(model, "forward", broken_forward)
    with pytest.warns(UserWarning, match="probe exploded.*num_attention_heads=4"):
        assert attention_geometry(model)[1] == heads
    monkeypatch.undo()
    fresh = tiny_falcon()  # multi_query: the probe reads 1 key head, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert attention_geometry(fresh)[1] == 1


@pytest.mark.parametrize("kind", ["gemma2", "mistral"])
def test_prompt_tuning_generates_past_a_sliding_window_as_peft_decodes_without_cache(tmp_path, seed, kind):
    """Soft prompt + input longer than the window: the sliding layers' caches keep only the last
    window of keys. Oracle: PEFT (our adapter loaded), greedy, the whole sequence each step."""
    llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, sliding_window=4)
    cfg = (transformers.Gemma2Config(**llama_like, head_dim=8) if kind == "gemma2"
           else transformers.MistralConfig(**llama_like))
    base = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    fresh = copy.deepcopy(base)
    ours = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=3)).eval()
    theirs = hf_peft.PeftModel.from_pretrained(fresh, ours.save_adapter(str(tmp_path / "adapter"))).eval()
    ids = torch.randint(0, VOCAB, (2, 5))
    out = ours.generate(ids, max_new_tokens=4)
    expected = ids
    with torch.no_grad():
        for _ in range(4):
            logits = real_logits(theirs(input_ids=expected).logits, expected.shape[1])
            expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("tied", [False, True])
def test_qlora_keeps_an_adapted_output_layer_in_full_precision(tmp_path, seed, tied):
    """quantize_base stores every linear layer but the output layer in 4 bits, as bitsandbytes'
    quantizer does, also when a target list names the output layer (a tied one stays tied).
    Oracle: PEFT loading the adapter onto the model with our 4-bit layers dequantized."""
    from qlora_fast.nn import Linear4bit, LoRALinear

    base = hf_llama(hidden=64)
    if tied:
        base.config.tie_word_embeddings = True
        base.lm_head.weight = base.model.embed_tokens.weight
    head = base.lm_head
    oracle_base = copy.deepcopy(base)
    ours = get_peft_model(base, LoraConfig(target_modules=["q_proj", "lm_head"], r=2, quantize_base="nf4"))
    model = ours.base_model
    assert type(model.lm_head) is LoRALinear and model.lm_head.base is head
    assert (head.weight is model.model.embed_tokens.weight) == tied
    fours = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert len(fours) == 14 and not any("lm_head" in n for n in fours)  # 7 projections x 2 layers
    perturb(p for _, p in ours.adapter_parameters())
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, Linear4bit):
                oracle_base.get_submodule(name.removesuffix(".base")).weight.copy_(m.dequantize_weight())
    theirs = hf_peft.PeftModel.from_pretrained(oracle_base, ours.save_adapter(str(tmp_path / "adapter"))).eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    assert_close(ours.eval()(input_ids=ids).logits, theirs(input_ids=ids).logits)


@pytest.mark.parametrize("method", ["prefix", "prefix_mlp"])
def test_prefix_longer_than_a_sliding_window(tmp_path, seed, method):
    """6 virtual tokens, window 4: the sliding layers' cache of real tokens (our prefix's starting
    point) holds fewer than 6 keys, so the prefix starts random there. Oracle: PEFT loading the
    adapter, and our greedy decoding of the whole sequence each step."""
    cfg = transformers.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=VOCAB, head_dim=8, sliding_window=4)
    base = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    fresh = copy.deepcopy(base)
    config = dataclasses.replace(ours_config(method, "llama"), num_virtual_tokens=6)
    ours = get_peft_model(base, config).eval()
    perturb(p for _, p in ours.adapter_parameters())
    theirs = hf_peft.PeftModel.from_pretrained(fresh, ours.save_adapter(str(tmp_path / "adapter"))).eval()
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        # float32 rounding only: the two runs come out an ulp or so apart here (logits ~0.1-3)
        assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-6)
        expected = ids
        for _ in range(4):
            expected = torch.cat([expected, ours(input_ids=expected).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(ours.generate(ids, max_new_tokens=4), expected)
