"""Fused MoE experts (transformers >= 5: Mixtral, Qwen3-MoE, OLMoE store all experts as 3-D
parameters) quantized to 4 bits by replace_linear and the Hugging Face loader (`Experts4bit`).

The oracle is transformers itself: the same model with every quantized weight replaced by our
dequantized one (`dequantize_4bit`), run with its own eager experts forward. Tiny models built from
configs (no downloads).
"""
import copy
import json
import os
import warnings

import pytest
import torch
from conftest import assert_close
from torch import nn

from qlora_fast.functional.quant import dequantize_4bit, quantize_4bit
from qlora_fast.nn import Linear4bit, replace_linear
from qlora_fast.nn.experts4bit import Experts4bit
from qlora_fast.nn.lora import LoRALinear

transformers = pytest.importorskip("transformers", reason="transformers is a test extra")
from transformers.integrations.moe import use_experts_implementation  # noqa: E402

pytestmark = pytest.mark.usefixtures("reference_backend", "one_thread")

VOCAB = 128


def moe_config(kind, hidden=64, intermediate=96):
    common = dict(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=VOCAB, num_experts_per_tok=2)
    if kind == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=intermediate, num_local_experts=4)
    if kind == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, intermediate_size=2 * intermediate,
                                           moe_intermediate_size=intermediate, num_experts=4, head_dim=hidden // 4)
    if kind == "olmoe":
        return transformers.OlmoeConfig(**common, intermediate_size=intermediate, num_experts=4)
    raise ValueError(kind)


def moe_model(kind, dtype=torch.float32, **sizes):
    model = transformers.AutoModelForCausalLM.from_config(moe_config(kind, **sizes)).to(dtype).eval()
    model.set_experts_implementation("eager")  # the oracle's forward: transformers' own loop
    return model


def dequantized_twin(original, quantized):
    """`original` (a copy) with every weight `quantized` holds in 4 bits replaced by its
    dequantized value: what the quantized model must compute, run by transformers' own code."""
    twin = copy.deepcopy(original)
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, Linear4bit):
                twin.get_submodule(name).weight.copy_(dequantize_4bit(m.weight, m.quant_state))
            elif isinstance(m, Experts4bit):
                for w in m.quant_states:
                    getattr(twin.get_submodule(name), w).copy_(m.dequantize_weight(w, torch.float32))
    return twin


def quantized_experts_and_twin(blocksize):
    """(dense experts of a tiny Mixtral layer, their Experts4bit, the dense module holding the
    dequantized weights: what the 4-bit module must compute, run by transformers' loop)."""
    experts = moe_model("mixtral", hidden=128, intermediate=64).model.layers[0].mlp.experts
    quant = Experts4bit.from_experts(experts, blocksize=blocksize)
    twin = copy.deepcopy(experts)
    with torch.no_grad():
        for w in quant.quant_states:
            getattr(twin, w).copy_(quant.dequantize_weight(w, torch.float32))
    return experts, quant, twin


def param_bytes(model):
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total + sum(s.statistics_bytes() for m in model.modules() if isinstance(m, Experts4bit)
                       for s in m.quant_states.values())


def experts_of(model):
    return [m for m in model.modules() if isinstance(m, Experts4bit)]


# The first shape's experts hold 192 / 96 blocks each (not whole nested blocks of 256: their scales
# are decoded per expert); the second's, at blocksize 32, hold 512 / 256 (sliced as they are).
SHAPES = [dict(hidden=64, intermediate=96, blocksize=64), dict(hidden=128, intermediate=64, blocksize=32)]


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "olmoe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", range(len(SHAPES)))
@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False)])
def test_quantized_moe_matches_transformers_on_dequantized_weights(seed, kind, dtype, shape, quant_type, nested):
    blocksize = SHAPES[shape]["blocksize"]
    original = moe_model(kind, dtype, hidden=SHAPES[shape]["hidden"], intermediate=SHAPES[shape]["intermediate"])
    before = param_bytes(original)
    model = replace_linear(copy.deepcopy(original), quant_type, blocksize=blocksize, compress_statistics=nested)
    experts = experts_of(model)
    assert len(experts) == 2 and not any(
        p.dim() == 3 for p in model.parameters()), "every fused experts module is in 4 bits"
    assert all(m.compute_dtype == dtype and m.quant_states["down_proj"].nested == nested for m in experts)
    # an expert's state is double-quantized itself only where its scales fill whole nested blocks
    assert experts[0]._expert("down_proj", 1)[1].nested == (nested and shape == 1)
    twin = dequantized_twin(original, model)
    # the memory shrinks: the experts' weights are half a byte per element plus their block scales
    ratio = param_bytes(model) / before
    assert ratio < (0.3 if dtype == torch.float32 else 0.45), ratio

    embeds = torch.randn(2, 9, SHAPES[shape]["hidden"], dtype=dtype)
    x, x_twin = embeds.clone().requires_grad_(), embeds.clone().requires_grad_()
    out, ref = model(inputs_embeds=x).logits, twin(inputs_embeds=x_twin).logits
    (out.float().square().mean()).backward()
    (ref.float().square().mean()).backward()
    # the same weights and the same routing: equal up to the dtype's rounding (the order of sums differs)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close(out, ref, atol=tol, rtol=tol, msg="logits")
    assert_close(x.grad, x_twin.grad, atol=tol * x_twin.grad.abs().max().item(), rtol=tol, msg="input grad")


def test_experts_forward_error_is_that_of_pytorch_in_bfloat16(seed):
    """One Experts4bit against a float64 run of transformers' loop on the same (dequantized)
    weights: its bf16 error at most twice that of transformers' own bf16 forward."""
    original = moe_model("mixtral")
    experts = original.model.layers[0].mlp.experts
    quant = Experts4bit.from_experts(copy.deepcopy(experts).to(torch.bfloat16))
    ref64, ref16 = copy.deepcopy(experts).double(), copy.deepcopy(experts).to(torch.bfloat16)
    with torch.no_grad():
        for w in quant.quant_states:
            getattr(ref64, w).copy_(quant.dequantize_weight(w, torch.float32))
            getattr(ref16, w).copy_(quant.dequantize_weight(w, torch.bfloat16))
    h = torch.randn(13, 64)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(13)])
    weights = torch.rand(13, 2)
    exact = ref64(h.double(), idx, weights.double())
    ours = quant(h.bfloat16(), idx, weights.bfloat16())
    theirs = ref16(h.bfloat16(), idx, weights.bfloat16())
    assert ours.dtype == torch.bfloat16
    assert (ours.double() - exact).abs().max() <= 2 * (theirs.double() - exact).abs().max()


def test_state_dict_round_trip_into_a_fresh_quantized_model(seed):
    model = replace_linear(moe_model("mixtral"))
    state = model.state_dict()
    keys = [k for k in state if ".experts." in k]
    assert "model.layers.0.mlp.experts.gate_up_proj.quant_state.bitsandbytes__nf4" in keys
    assert state["model.layers.0.mlp.experts.gate_up_proj"].dtype == torch.uint8
    fresh = replace_linear(moe_model("mixtral"))  # other random weights
    fresh.load_state_dict(state)
    ids = torch.randint(0, VOCAB, (2, 7))
    assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    # a state dict of other sizes is refused, naming the key, and leaves the module as it was
    other = replace_linear(moe_model("mixtral", intermediate=32)).state_dict()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(RuntimeError, match="size mismatch for model.layers.0.mlp.experts.gate_up_proj"):
        fresh.load_state_dict(other)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items() if ".experts." in k)


def test_packed_bytes_are_those_of_bitsandbytes_quantizing_the_3d_weight(seed):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes (the oracle) is a test extra")
    import bitsandbytes.functional as bnbF
    from conftest import no_dynamo

    experts = moe_model("mixtral").model.layers[0].mlp.experts
    quant = Experts4bit.from_experts(experts, compress_statistics=False)
    with no_dynamo():
        packed, state = bnbF.quantize_4bit(experts.gate_up_proj.detach(), blocksize=64, quant_type="nf4")
    assert bnb is not None and torch.equal(quant.gate_up_proj, packed)
    assert torch.equal(quant.quant_states["gate_up_proj"].absmax, state.absmax)
    assert list(quant.quant_states["gate_up_proj"].shape) == list(state.shape)


def test_sizes_that_straddle_blocks_stay_in_full_precision_warned_by_name(seed):
    original = moe_model("mixtral", hidden=40, intermediate=50)  # 100 x 40 = 4000 per expert: not 64-blocks
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.mlp\.experts' and 1 more like it stay in full "
                                         "precision.*not a multiple of the blocksize 64"):
        warned = replace_linear(copy.deepcopy(original))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # skipped by name: no warning
        model = replace_linear(copy.deepcopy(original), skip=["lm_head", "experts"])
    for m in (warned, model):
        assert not experts_of(m) and any(isinstance(layer, Linear4bit) for layer in m.modules())
        kept, before = m.model.layers[0].mlp.experts, original.model.layers[0].mlp.experts
        assert torch.equal(kept.gate_up_proj, before.gate_up_proj)


def test_transposed_biased_or_unknown_experts_stay_in_full_precision_warned_by_name():
    config = transformers.PretrainedConfig()

    @use_experts_implementation(is_transposed=True, has_bias=True)
    class TransposedExperts(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(2, 64, 128))
            self.down_proj = nn.Parameter(torch.randn(2, 64, 64))

    class UnknownExperts(nn.Module):  # 3-D weights, but no transformers experts decorator
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(2, 64, 128))
            self.down_proj = nn.Parameter(torch.randn(2, 64, 64))

    for experts, why in [(TransposedExperts(config), "is_transposed"), (UnknownExperts(), "forward is unknown")]:
        model = nn.ModuleDict(dict(proj=nn.Linear(64, 64), moe=nn.ModuleDict(dict(experts=experts))))
        with pytest.warns(UserWarning, match=rf"'moe\.experts' stay in full precision.*{why}"):
            replace_linear(model)
        assert isinstance(model.proj, Linear4bit) and model.moe.experts is experts


def test_hf_loader_quantizes_the_experts_and_matches_the_reference(tmp_path, seed):
    from qlora_fast.models.hf import load_hf_model

    original = moe_model("mixtral")
    original.save_pretrained(str(tmp_path))  # per-expert tensors: loaded whole, then quantized (warned)
    with pytest.warns(UserWarning, match="builds some of its tensors from several"):
        model, _ = load_hf_model(str(tmp_path), quantize="nf4", tokenizer=False)
    assert len(experts_of(model)) == 2
    model.set_experts_implementation("eager")
    twin = dequantized_twin(original, model)
    ids = torch.randint(0, VOCAB, (2, 11))
    assert_close(model(input_ids=ids).logits, twin(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_hf_loader_quantizes_fused_checkpoint_tensors_as_it_reads_them(tmp_path, seed):
    """A checkpoint holding the fused 3-D tensors goes through the low-memory path (no whole
    load): the same bytes as replace_linear on the model in memory."""
    import warnings

    from safetensors.torch import save_file

    from qlora_fast.models.hf import load_hf_model

    original = moe_model("qwen3_moe")
    original.config.save_pretrained(str(tmp_path))
    state = {k: v.contiguous() for k, v in original.state_dict().items() if k != "lm_head.weight"
             or not original.config.tie_word_embeddings}
    save_file(state, os.path.join(tmp_path, "model.safetensors"), metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback to a whole load
        model, _ = load_hf_model(str(tmp_path), quantize="nf4", tokenizer=False)
    reference = replace_linear(copy.deepcopy(original), skip=["lm_head"])
    ref_state = reference.state_dict()
    assert model.state_dict().keys() == ref_state.keys()
    assert all(torch.equal(v, ref_state[k]) for k, v in model.state_dict().items())
    assert json.load(open(os.path.join(tmp_path, "config.json")))["model_type"] == "qwen3_moe"


def test_hf_loader_keeps_experts_it_cannot_quantize_in_full_precision_warned(tmp_path, seed):
    """GPT-OSS's experts are transposed and biased: the loader still quantizes the linear layers
    (as it did before experts were quantized at all), keeps the experts' tensors exactly, and says
    so. Oracle: transformers' own model with the same linear layers dequantized."""
    from qlora_fast.models.hf import load_hf_model

    config = transformers.GptOssConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                       num_experts_per_tok=2, vocab_size=VOCAB, layer_types=["full_attention"] * 2)
    original = transformers.AutoModelForCausalLM.from_config(config).eval()
    original.save_pretrained(str(tmp_path))
    with pytest.warns(UserWarning, match=r"'model\.layers\.0\.mlp\.experts' and 1 more like it stay in full "
                                         "precision: transposed or biased"):
        model, _ = load_hf_model(str(tmp_path), quantize="nf4", tokenizer=False)
    assert not experts_of(model) and any(isinstance(m, Linear4bit) for m in model.modules())
    kept = {k: v for k, v in model.state_dict().items() if ".experts." in k}
    assert kept and all(torch.equal(v, original.state_dict()[k]) for k, v in kept.items())
    twin = dequantized_twin(original, model)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert_close(model(input_ids=ids).logits, twin(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_lora_training_step_on_a_quantized_mixtral(seed):
    model = replace_linear(moe_model("mixtral").train(), "nf4", r=4, include_output=False)
    experts = experts_of(model)
    assert len(experts) == 2
    frozen = {id(m): {w: getattr(m, w).clone() for w in m.quant_states} for m in experts}
    lora = [p for p in model.parameters() if p.requires_grad]
    assert lora and all(isinstance(m, LoRALinear) for m in model.modules() if hasattr(m, "lora_A"))
    optimizer = torch.optim.AdamW(lora, lr=1e-2)
    ids = torch.randint(0, VOCAB, (2, 12))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    lora_b = [p for n, p in model.named_parameters() if n.endswith("lora_B")]
    lora_a = [p for n, p in model.named_parameters() if n.endswith("lora_A")]
    # B starts at zero, so A's gradient is zero on the first step; B's is not
    assert all(p.grad is not None for p in lora_a + lora_b) and all(p.grad.abs().sum() > 0 for p in lora_b)
    optimizer.step()
    assert all(torch.equal(getattr(m, w), frozen[id(m)][w]) for m in experts for w in m.quant_states)
    assert not any(p.requires_grad for m in experts for p in m.parameters())


def test_a_target_naming_an_expert_parameter_is_a_clear_error():
    model = moe_model("mixtral")
    with pytest.raises(ValueError, match="fused MoE experts parameter.*target_parameters"):
        replace_linear(model, r=4, target_modules=["gate_up_proj"])
    # a target list quantizes the layers it names only, as for linear layers
    replace_linear(model, r=4, target_modules=["q_proj"])
    assert not experts_of(model)


def test_merge_gives_the_dense_experts_back(seed):
    from qlora_fast.nn.replace import merge_linear_layers

    model = replace_linear(moe_model("mixtral"), r=4)
    with pytest.raises(ValueError, match="fused MoE experts in 4 bits"):
        merge_linear_layers(model, keep_4bit=True)
    assert len(experts_of(model)) == 2, "all or nothing"
    ids = torch.randint(0, VOCAB, (2, 7))
    before = model(input_ids=ids).logits
    merge_linear_layers(model)
    assert not experts_of(model) and not any(isinstance(m, (Linear4bit, LoRALinear)) for m in model.modules())
    experts = model.model.layers[0].mlp.experts
    assert type(experts).__name__ == "MixtralExperts" and experts.gate_up_proj.dtype == torch.float32
    assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)


def test_device_moves_and_quantize_weight_shape_check():
    experts = Experts4bit.from_experts(moe_model("mixtral").model.layers[0].mlp.experts)
    experts.to(torch.float16)  # a dtype cast leaves the packed bytes alone
    assert experts.gate_up_proj.dtype == torch.uint8 and experts.compute_dtype == torch.float32
    with pytest.raises(ValueError, match=r"down_proj must have shape \(4, 64, 96\)"):
        experts.quantize_weight_("down_proj", torch.randn(4, 96, 64))
    packed, _ = quantize_4bit(torch.randn(4, 64, 96))
    assert packed.numel() == experts.down_proj.numel()


@pytest.mark.parametrize("blocksize", [32, 64])  # per-expert scales as views / decoded per expert
def test_a_device_move_or_a_load_after_a_forward_frees_the_old_packed_weights(seed, blocksize):
    """The per-expert slices a forward caches are views of the packed bytes: a move (simulated by
    the meta device) must not keep the old bytes alive, e.g. when offloading a model to the CPU to
    free the GPU, nor must a load_state_dict. Then the module still matches transformers' loop."""
    import gc
    import weakref

    experts, quant, twin = quantized_experts_and_twin(blocksize)
    h, idx, weights = torch.randn(6, 128), torch.randint(0, 4, (6, 2)), torch.rand(6, 2)
    quant(h, idx, weights)
    state = quant.state_dict()
    old = [weakref.ref(getattr(quant, w)) for w in quant.quant_states]
    quant.to("meta")
    gc.collect()
    assert all(ref() is None for ref in old), "the old packed weights outlive the move"
    quant.load_state_dict(state, assign=True)
    assert_close(quant(h, idx, weights), twin(h, idx, weights), atol=1e-5, rtol=1e-5)
    # so does a load (new bytes replace the old ones: both would be held, e.g. on the GPU, until
    # the next forward), and re-quantizing one weight
    old = [weakref.ref(getattr(quant, w)) for w in quant.quant_states]
    quant.load_state_dict(state)
    quant.quantize_weight_("down_proj", experts.down_proj)
    gc.collect()
    assert all(ref() is None for ref in old), "the old packed weights outlive a load"
    assert_close(quant(h, idx, weights), twin(h, idx, weights), atol=1e-5, rtol=1e-5)


def test_memory_reports_count_the_experts_as_4bit_weights():
    from qlora_fast.peft.memory import base_weight_bytes

    original = moe_model("mixtral")
    model = replace_linear(copy.deepcopy(original))
    quantized = [n for n, m in original.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    experts = sum(p.numel() for n, p in original.named_parameters() if ".experts." in n)
    linears = sum(original.get_submodule(n).weight.numel() for n in quantized)
    sizes = base_weight_bytes(model)
    assert sizes["quantized_params"] == experts + linears
    kept = [*original.named_parameters(), *original.named_buffers()]  # rotary inv_freq: a buffer
    assert sizes["other"] == sum(t.numel() * 4 for n, t in kept
                                 if ".experts." not in n and n.rsplit(".", 1)[0] not in quantized)


@pytest.mark.parametrize("blocksize", [32, 64])  # experts' scales sliced as nested blocks / decoded per expert
def test_experts_forward_through_the_triton_kernels(monkeypatch, seed, blocksize):
    """The kernel path (the Triton interpreter on the CPU) on each expert's slice of the packed
    weight, against transformers' eager loop on the dequantized weights; input gradients too."""
    monkeypatch.setenv("QLORA_FAST_BACKEND", "triton")
    experts, quant, twin = quantized_experts_and_twin(blocksize)
    h = torch.randn(5, 128)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(5)])
    weights = torch.rand(5, 2)
    x, x_twin = h.clone().requires_grad_(), h.clone().requires_grad_()
    out, ref = quant(x, idx, weights), twin(x_twin, idx, weights)
    out.square().sum().backward()
    ref.square().sum().backward()
    assert_close(out, ref, atol=1e-5, rtol=1e-5, msg="output")
    assert_close(x.grad, x_twin.grad, atol=1e-5 * x_twin.grad.abs().max().item(), rtol=1e-5, msg="input grad")
