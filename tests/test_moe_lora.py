"""LoRA on fused MoE experts (PEFT's `target_parameters`): per-expert adapters on transformers'
dense experts and on `Experts4bit` (QLoRA).

The oracle is PEFT 0.21 itself (`lora.ParamWrapper`) on transformers' model: for a 4-bit base, the
dequantized twin (every 4-bit weight replaced by its dequantized value). Adapters cross between
the two only through files: ours saved and read by `peft.PeftModel.from_pretrained`, and PEFT's
`save_pretrained` output read by ours. Tiny models built from configs (no downloads).
"""
import copy
import json
import os

import pytest
import torch
from conftest import assert_close
from test_moe_4bit import VOCAB, dequantized_twin, experts_of, moe_model
from torch import nn

from qlora_fast.nn import Linear4bit, replace_linear
from qlora_fast.nn.experts4bit import Experts4bit
from qlora_fast.nn.experts_lora import ExpertLoRA, LoRAExperts
from qlora_fast.peft import LoraConfig, get_peft_model, load_adapter, read_adapter_config

peft = pytest.importorskip("peft", reason="peft is a test extra (the oracle)")

pytestmark = pytest.mark.usefixtures("reference_backend", "one_thread")

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def _randomize(params, std=0.1):
    with torch.no_grad():
        for p in params:
            p.normal_(0, std)


def twin_of(original, model):
    """`dequantized_twin` of a model whose 4-bit layers may sit under LoRA wrappers (`q_proj.base`)."""
    from qlora_fast.functional.quant import dequantize_4bit
    from qlora_fast.nn import Linear4bit

    twin = copy.deepcopy(original)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, Linear4bit):
                target = name.removesuffix(".base") if name.endswith(".base") else name
                twin.get_submodule(target).weight.copy_(dequantize_4bit(m.weight, m.quant_state))
            elif isinstance(m, Experts4bit):
                for w in m.quant_states:
                    getattr(twin.get_submodule(name), w).copy_(m.dequantize_weight(w, torch.float32))
    return twin


def ours_adapted(kind, quant, target_parameters=EXPERTS, target_modules=None, **lora):
    """(original dense model, our PeftModel on a copy with random adapters, PEFT's base for it:
    the original or the dequantized twin of our 4-bit model)."""
    original = moe_model(kind)
    config = LoraConfig(target_parameters=target_parameters, target_modules=target_modules, r=4, lora_alpha=8,
                        quantize_base=quant, **lora)
    model = get_peft_model(copy.deepcopy(original), config)
    _randomize([p for _, p in model.adapter_parameters()])
    twin = twin_of(original, model.base_model) if quant else copy.deepcopy(original)
    return original, model, twin


def peft_adapter_grads(peft_model):
    """{adapter tensor name as PEFT saves it: its gradient}."""
    return {n.replace(".default", ""): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}


def our_adapter_grads(model):
    """{adapter tensor name as PEFT saves it: its gradient}, through our name mapping."""
    params = dict(model.adapter_parameters())
    return model.peft_state_dict({n: p.grad for n, p in params.items()})


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "olmoe"])
@pytest.mark.parametrize("quant", [None, "nf4"])
def test_our_adapter_loads_in_peft_with_the_same_logits(tmp_path, seed, kind, quant):
    _, model, twin = ours_adapted(kind, quant)
    adapted = experts_of(model.base_model) if quant else [m for m in model.modules() if isinstance(m, LoRAExperts)]
    assert len(adapted) == 2
    model.save_adapter(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_parameters"] == EXPERTS and saved["target_modules"] == []
    reference = peft.PeftModel.from_pretrained(twin, str(tmp_path))
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        out, ref = model(input_ids=ids).logits, reference(input_ids=ids).logits
        with reference.disable_adapter():
            base = reference(input_ids=ids).logits
    assert (ref - base).abs().max() > 1e-2, "the adapters change the output"
    assert_close(out, ref, atol=2e-5, rtol=2e-5, msg="logits")


# the last names a weight this model lacks beside one it has: PEFT skips it, and so do we
@pytest.mark.parametrize("targets", [EXPERTS, ["down_proj"], ["layers.1.mlp.experts.gate_up_proj"],
                                     ["experts.up_proj", "experts.down_proj"]])
@pytest.mark.parametrize("quant", [None, "nf4"])
def test_a_peft_adapter_loads_in_ours_with_peft_logits(tmp_path, seed, targets, quant):
    original = moe_model("mixtral")
    modules = ["q_proj", "v_proj"] if targets == EXPERTS else []  # linear layers beside the experts
    reference = peft.get_peft_model(copy.deepcopy(original), peft.LoraConfig(
        target_parameters=targets, target_modules=modules, r=4, lora_alpha=16, use_rslora=quant is None))
    _randomize([p for p in reference.parameters() if p.requires_grad])
    reference.save_pretrained(tmp_path)
    base = replace_linear(copy.deepcopy(original), quant) if quant else copy.deepcopy(original)
    config = read_adapter_config(tmp_path)
    assert sorted(config.target_parameters) == sorted(targets) and sorted(config.target_modules) == modules
    if quant:  # PEFT's adapter on the weights our 4-bit model holds
        reference = peft.PeftModel.from_pretrained(dequantized_twin(original, base), str(tmp_path))
    model = load_adapter(base, tmp_path)
    assert model.peft_config.target_parameters == [t for t in config.target_parameters if t != "experts.up_proj"]
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=2e-5, rtol=2e-5)
    # saved again by us, it is the same set of tensors PEFT wrote
    model.save_adapter(tmp_path / "again")
    from safetensors.torch import load_file

    theirs, ours = load_file(tmp_path / "adapter_model.safetensors"), load_file(tmp_path / "again" /
                                                                                "adapter_model.safetensors")
    assert sorted(theirs) == sorted(ours) and all(torch.equal(theirs[k], ours[k]) for k in theirs)


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_training_step_gradients_equal_peft(tmp_path, seed, quant):
    """A QLoRA step (4-bit Mixtral, experts and attention adapted): every adapter gradient equals
    PEFT's on the dequantized twin with the same adapter weights, within float32 rounding."""
    _, model, twin = ours_adapted("mixtral", quant, target_modules=["q_proj", "o_proj"])
    model.train()
    model.save_adapter(tmp_path)
    reference = peft.PeftModel.from_pretrained(twin.train(), str(tmp_path), is_trainable=True)
    ids = torch.randint(0, VOCAB, (2, 11))
    loss = model(input_ids=ids, labels=ids).loss
    ref_loss = reference(input_ids=ids, labels=ids).loss
    loss.backward()
    ref_loss.backward()
    assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5, msg="loss")
    ours, theirs = our_adapter_grads(model), peft_adapter_grads(reference)
    assert sorted(ours) == sorted(theirs) and any("experts.base_layer.lora_A" in k for k in ours)
    for name, grad in theirs.items():
        assert_close(ours[name], grad, atol=1e-5 * grad.abs().max().item(), rtol=1e-4, msg=name)
    # only the adapters train; the 4-bit experts are frozen
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for _, p in model.adapter_parameters()}
    assert all(isinstance(m, ExpertLoRA) for m in model.modules() if hasattr(m, "num_experts") and
               hasattr(m, "lora_A"))


def test_a_fresh_adapter_leaves_the_model_unchanged_and_disable_adapter_turns_it_off(seed):
    original = moe_model("olmoe")
    model = get_peft_model(copy.deepcopy(original), LoraConfig(target_parameters=["gate_up_proj"], r=2))
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        expected = original(input_ids=ids).logits
        assert_close(model(input_ids=ids).logits, expected, atol=1e-6, rtol=1e-6)
        _randomize([p for _, p in model.adapter_parameters()])
        assert (model(input_ids=ids).logits - expected).abs().max() > 1e-3
        with model.disable_adapter():
            assert_close(model(input_ids=ids).logits, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_merge_and_unload_folds_the_experts_adapters_as_peft(tmp_path, seed, quant):
    _, model, twin = ours_adapted("qwen3_moe", quant)
    model.save_adapter(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    merged = model.merge_and_unload()
    experts = merged.model.layers[0].mlp.experts
    assert type(experts).__name__ == "Qwen3MoeExperts" and experts.gate_up_proj.dtype == torch.float32
    assert not any(isinstance(m, (ExpertLoRA, LoRAExperts, Experts4bit)) for m in merged.modules())
    reference = peft.PeftModel.from_pretrained(twin, str(tmp_path)).merge_and_unload()
    for name, p in reference.named_parameters():
        assert_close(dict(merged.named_parameters())[name], p, atol=1e-6, rtol=1e-6, msg=name)
    with torch.no_grad():
        assert_close(merged(input_ids=ids).logits, before, atol=2e-5, rtol=2e-5)


def test_what_peft_refuses_and_what_we_cannot_do_are_clear_errors(tmp_path):
    model = moe_model("mixtral")
    with pytest.raises(ValueError, match="lora_dropout must be 0 with target_parameters"):
        LoraConfig(target_parameters=EXPERTS, lora_dropout=0.1)
    with pytest.raises(TypeError, match="target_parameters must be a list"):
        LoraConfig(target_parameters="experts.gate_up_proj")
    with pytest.raises(ValueError, match="target_parameters must be a non-empty list"):
        LoraConfig(target_parameters=[])
    with pytest.raises(ValueError, match="'q_proj.weight'.*not a fused MoE experts weight"):
        get_peft_model(model, LoraConfig(target_parameters=["q_proj.weight"]))
    with pytest.raises(ValueError, match=r"\['experts.up_proj'\] matched no parameter.*experts.gate_up_proj"):
        get_peft_model(model, LoraConfig(target_parameters=["experts.up_proj", "experts.down_proj"]))
    with pytest.raises(ValueError, match=r"r must be in \[1, min\(out, in\)\] = \[1, 64\] for gate_up_proj"):
        get_peft_model(model, LoraConfig(target_parameters=EXPERTS, r=65, quantize_base="nf4"))
    assert not any(isinstance(m, (Linear4bit, Experts4bit)) for m in model.modules())
    assert not any(p.requires_grad is False for p in model.parameters()), "a refused config changes nothing"
    # a target module naming an experts weight points at target_parameters
    with pytest.raises(ValueError, match="name it in target_parameters"):
        get_peft_model(model, LoraConfig(target_modules=["gate_up_proj"]))
    # PEFT settings we do not implement, in a PEFT file (PEFT itself refuses DoRA on parameters)
    d = peft.LoraConfig(target_parameters=EXPERTS, target_modules=[]).to_dict()
    for key, value in (("use_dora", True), ("lora_bias", True), ("lora_dropout", 0.1)):
        from qlora_fast.peft import config_from_dict

        with pytest.raises(ValueError, match=key):
            config_from_dict({**d, "peft_type": "LORA", "task_type": "CAUSAL_LM", key: value})
    # one adapter per experts module
    adapted = get_peft_model(model, LoraConfig(target_parameters=["down_proj"], r=2))
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        get_peft_model(adapted.base_model, LoraConfig(target_parameters=["gate_up_proj"], r=2))
    # the 4-bit merge keeps no 4 bits for experts: refused, nothing changed
    quantized = get_peft_model(moe_model("mixtral"), LoraConfig(target_parameters=EXPERTS, quantize_base="nf4"))
    with pytest.raises(ValueError, match="fused MoE experts in 4 bits"):
        quantized.merge_and_unload(requantize=True)
    assert len(experts_of(quantized.base_model)) == 2


def test_transposed_experts_are_refused_by_name():
    transformers = pytest.importorskip("transformers")
    config = transformers.GptOssConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       num_local_experts=4, num_experts_per_tok=2, vocab_size=VOCAB)
    model = transformers.AutoModelForCausalLM.from_config(config)
    for quant in (None, "nf4"):  # refused before any layer is quantized
        with pytest.raises(ValueError, match="is_transposed.*not supported"):
            get_peft_model(model, LoraConfig(target_parameters=["experts.down_proj"], quantize_base=quant))
        assert not any(isinstance(m, (LoRAExperts, Linear4bit)) for m in model.modules())


def test_save_adapter_of_a_model_adapted_in_place_keeps_its_target_parameters(tmp_path, seed):
    from qlora_fast.peft import save_adapter

    _, model, twin = ours_adapted("mixtral", "nf4", target_parameters=["experts.down_proj"])
    save_adapter(model.base_model, tmp_path)  # the bare model, as a trainer hands it back
    config = read_adapter_config(tmp_path)
    assert config.target_parameters == ["model.layers.0.mlp.experts.down_proj", "model.layers.1.mlp.experts.down_proj"]
    reference = peft.PeftModel.from_pretrained(twin, str(tmp_path))
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=2e-5, rtol=2e-5)
    assert os.path.isfile(tmp_path / "adapter_model.safetensors")


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_bfloat16_experts_adapter_error_is_that_of_peft_in_bfloat16(seed, quant):
    """One experts module in bf16 with adapters (fp32 adapters, as ours train): its error against
    PEFT in float64 on the same weights is at most twice that of PEFT's own bf16 forward. Routing
    is given (top_k_index), so no expert choice can flip."""
    from qlora_fast.nn.experts_lora import add_experts_lora

    dense = moe_model("mixtral").model.layers[0].mlp.experts
    names = ["gate_up_proj", "down_proj"]
    ours = copy.deepcopy(dense).to(torch.bfloat16)
    if quant:
        ours = Experts4bit.from_experts(ours, quant)
    ours = add_experts_lora(ours, names, r=4, lora_alpha=8)
    lora = ours.lora
    _randomize(lora.parameters())
    weights = {w: ours.dequantize_weight(w, torch.float32) if quant else getattr(ours.base, w).float() for w in names}

    def peft_experts(dtype):
        holder = nn.Module()
        holder.experts = copy.deepcopy(dense).to(dtype)
        with torch.no_grad():
            for w in names:
                getattr(holder.experts, w).copy_(weights[w])
        holder = peft.inject_adapter_in_model(peft.LoraConfig(target_parameters=names, target_modules=[], r=4,
                                                              lora_alpha=8), holder)
        inner, outer = holder.experts.base_layer, holder.experts  # gate_up_proj innermost, as PEFT nests
        with torch.no_grad():
            for module, w in ((inner, "gate_up_proj"), (outer, "down_proj")):
                module.lora_A["default"].weight.copy_(lora[w].lora_A)
                module.lora_B["default"].weight.copy_(lora[w].lora_B)
        return holder.experts

    tokens, k = 13, 2
    hidden = torch.randn(tokens, dense.gate_up_proj.shape[-1])
    index = torch.stack([torch.randperm(dense.gate_up_proj.shape[0])[:k] for _ in range(tokens)])
    route = torch.softmax(torch.randn(tokens, k), -1)
    with torch.no_grad():
        out = ours(hidden.bfloat16(), index, route.bfloat16())
        ref64 = peft_experts(torch.float64)(hidden.double(), index, route.double())
        ref16 = peft_experts(torch.bfloat16)(hidden.bfloat16(), index, route.bfloat16())
    assert (out.double() - ref64).abs().max() <= 2 * (ref16.double() - ref64).abs().max()
