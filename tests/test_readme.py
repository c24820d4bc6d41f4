"""Every Python block of README.md runs as pasted, against tiny stand-ins for what a block takes
from its surroundings (a model, a weight, texts). Stand-ins are declared here, keyed by how the
block starts; a block without one runs in an empty namespace. Slow pieces a block calls
(pretraining the built-in model, 40 GRPO steps) are replaced by tiny ones of the same kind, and
each block's effect is checked after it runs."""
import dataclasses
import os
import re

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks():
    with open(README, encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def tiny_builtin(max_seq_len=256, vocab_size=259):
    from qlora_fast.models import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        max_seq_len=max_seq_len,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_hf():
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def stand_in_base_model(monkeypatch):
    """load_base_model() pretrains (or loads from the cache) the built-in model: a tiny untrained one here."""
    import qlora_fast.models
    from qlora_fast.tokenizer.base import ByteTokenizer

    monkeypatch.setattr(qlora_fast.models, "load_base_model", lambda *a, **k: (tiny_builtin(), ByteTokenizer()))


# ---- per block: (setup(monkeypatch) -> namespace, check(namespace))
def setup_quant(monkeypatch):
    return {"w": torch.randn(300, 64) * torch.rand(300, 1) * 3, "model": tiny_hf()}


def check_quant(ns):
    from qlora_fast.nn import Linear4bit, QLoRALinear

    model = ns["model"]
    # the second call adds adapters to the layers the first one quantized (never 0 adapters)
    adapters = [m for m in model.modules() if isinstance(m, QLoRALinear)]
    assert len(adapters) == 7 and all(isinstance(m.base, Linear4bit) for m in adapters)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        16 * (m.in_features + m.out_features) for m in adapters
    )
    assert ns["w_hat"].dtype == torch.bfloat16 and (ns["w_hat"].float() - ns["w"]).abs().max() < ns["w"].abs().max() / 4


def setup_lora(monkeypatch):
    from qlora_fast.nn import replace_linear

    model = replace_linear(tiny_hf(), quant_type=None, r=4)
    return {"model": model, "ids": torch.randint(0, 101, (2, 5))}


def check_lora(ns):
    base = ns["model"](ns["ids"]).logits
    assert torch.equal(ns["ref_logits"], base)  # a fresh adapter (B = 0) is the base model
    assert not ns["layer"].merged


def setup_optim(monkeypatch):
    model = nn.Linear(64, 32)
    model(torch.randn(3, 64)).square().sum().backward()
    peer = torch.optim.AdamW(model.parameters())  # the block's torch_adamw.pt: 3 steps of torch's AdamW
    for _ in range(3):
        peer.step()
    torch.save(peer.state_dict(), "torch_adamw.pt")
    model.load_state_dict(nn.Linear(64, 32).state_dict())  # the block starts from other weights
    return {"model": model}


def check_optim(ns):
    assert os.path.isfile("opt.pt")
    assert ns["opt"].paging_stats() is not None
    assert all(int(s["step"]) == 3 for s in ns["opt"].state_dict()["state"].values())


def setup_peft(monkeypatch):
    stand_in_base_model(monkeypatch)
    return {}


def check_peft(ns):
    from qlora_fast.peft import load_adapter

    assert sorted(os.listdir("out/adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert load_adapter(tiny_builtin(), "out/adapter").peft_config.quantize_base == "nf4"
    assert not any(hasattr(m, "lora_A") for m in ns["model"].base_model.modules())  # merged


def setup_grpo(monkeypatch):
    import qlora_fast.train
    from qlora_fast.peft import (  # noqa: F401  (the block takes them from the README's PEFT block)
        LoraConfig,
        get_peft_model,
    )
    from qlora_fast.tokenizer.base import ByteTokenizer
    from qlora_fast.train.grpo import GRPOConfig

    def short(**kw):  # the README's 40 steps x 8 completions, cut to one step of two
        return dataclasses.replace(GRPOConfig(**kw), max_steps=1, group_size=2, prompts_per_step=1, max_new_tokens=4)

    monkeypatch.setattr(qlora_fast.train, "GRPOConfig", short, raising=False)
    return {
        "base": tiny_builtin(),
        "tokenizer": ByteTokenizer(),
        "get_peft_model": get_peft_model,
        "LoraConfig": LoraConfig,
    }


def check_grpo(ns):
    assert len(ns["trainer"].history) == 1


def setup_tokenizer(monkeypatch):
    from qlora_fast.data import load_corpus

    corpus = load_corpus()
    # the block scores its own BPE ids (vocabulary up to 4096) with `model`
    return {
        "texts": [corpus[:20000]],
        "model": tiny_builtin(vocab_size=4096),
        "hyps": ["the cat sat on the mat", "a dog"],
        "refs_a": ["the cat sat on a mat", "a dog barks"],
        "refs_b": ["a cat sat on the mat", "the dog"],
        "preds": ["the cat sat", "a dog ran"],
        "refs": ["the cat sat down", "a dog ran off"],
    }


def check_tokenizer(ns):
    assert os.path.isfile("tok.json") and os.path.isfile("ranks.tiktoken")
    assert ns["tok"].decode(ns["ids"]).strip() == "hello"  # bos and the <|eos|> special are skipped on decode


def setup_tot(monkeypatch):
    from qlora_fast.reasoning import BuiltinLM
    from qlora_fast.tokenizer.base import ByteTokenizer

    monkeypatch.setattr(
        BuiltinLM, "from_pretrained", classmethod(lambda cls, *a, **k: cls(tiny_builtin(), ByteTokenizer()))
    )
    return {}


def check_tot(ns):
    assert ns["single"].model_calls >= 1 and ns["result"].model_calls >= 1


def setup_hf(monkeypatch):
    tokenizers = pytest.importorskip("tokenizers")
    from qlora_fast.data import load_corpus

    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator([load_corpus()[:20000]], tokenizers.trainers.BpeTrainer(
        vocab_size=101, special_tokens=["<eos>"], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    tiny_hf().save_pretrained("hf_dir")
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>").save_pretrained("hf_dir")
    return {}


def check_hf(ns):
    peft = pytest.importorskip("peft")
    loaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained("hf_dir"), "adapter")
    assert len([n for n, _ in loaded.named_parameters() if "lora_A" in n]) == 7
    reloaded = transformers.AutoModelForCausalLM.from_pretrained("merged").eval()
    ids = torch.randint(0, 101, (1, 6))
    assert torch.equal(reloaded(input_ids=ids).logits, ns["merged"](input_ids=ids).logits)


def setup_fsdp(monkeypatch):
    """A one-process gloo group (the block runs under torchrun in real use) and a built-in model whose
    projections split on 256-block boundaries (what shard_qlora_model needs with double quantization)."""
    import socket

    from qlora_fast.models import LlamaConfig, LlamaForCausalLM

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    cfg = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=320, num_layers=1, num_heads=4, num_kv_heads=2,
                      max_seq_len=32)
    return {"base_model": LlamaForCausalLM(cfg)}


def check_fsdp(ns):
    import os

    import torch.distributed as dist

    try:
        from torch.distributed.fsdp import FSDPModule

        assert isinstance(ns["model"], FSDPModule)
        assert os.path.isdir("ckpt/step100")
        assert ns["load_adapter_checkpoint"](ns["model"], ns["opt"], "ckpt/step100") == {"step": 100}
    finally:
        dist.destroy_process_group()


STAND_INS = {
    "from qlora_fast.models.hf import load_hf_model": (setup_hf, check_hf),
    "import torch\nfrom qlora_fast import quantize_4bit": (setup_quant, check_quant),
    "from torch import nn": (setup_lora, check_lora),
    "import torch\nfrom qlora_fast.optim import": (setup_optim, check_optim),
    "from qlora_fast.models import load_base_model": (setup_peft, check_peft),
    "from qlora_fast.train import GRPOConfig": (setup_grpo, check_grpo),
    "from qlora_fast.tokenizer import BPETokenizer": (setup_tokenizer, check_tokenizer),
    "from qlora_fast.reasoning import": (setup_tot, check_tot),
    "import torch\nimport torch.distributed as dist": (setup_fsdp, check_fsdp),
}


def stand_in_for(block):
    hits = [v for k, v in STAND_INS.items() if block.strip().startswith(k)]
    return hits[0] if hits else (lambda mp: {}, lambda ns: None)


BLOCKS = python_blocks()


def test_readme_has_the_blocks_this_file_knows():
    for key in STAND_INS:
        assert any(b.strip().startswith(key) for b in BLOCKS), (
            f"README lost the block starting {key!r}; update STAND_INS"
        )


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[" ".join(b.split()[:4])[:40] for b in BLOCKS])
def test_readme_block_runs(index, tmp_path, monkeypatch, seed):
    monkeypatch.chdir(tmp_path)  # blocks write files (opt.pt, out/adapter, tok.json)
    setup, check = stand_in_for(BLOCKS[index])
    namespace = setup(monkeypatch)
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), namespace)
    check(namespace)
