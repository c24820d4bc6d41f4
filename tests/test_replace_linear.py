"""replace_linear on Hugging Face models built from tiny configs (no downloads) and on plain stacks.

"Close to the original" is judged against an independent model: the original with every
converted weight replaced by bitsandbytes' own quantize + dequantize of it (the oracle). The
converted model's logits must equal that model's up to fp32 rounding; the distance to the
full-precision logits is only sanity-checked (it is the 4-bit error itself).
"""
import copy

import pytest
import torch
from conftest import no_dynamo
from torch import nn

from qlora_fast.nn import Linear4bit, replace_linear

transformers = pytest.importorskip("transformers", reason="transformers is a test extra")
bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes (the oracle) is a test extra")
import bitsandbytes.functional as bnbF  # noqa: E402

pytestmark = pytest.mark.usefixtures("reference_backend")


def oracle_fake_quant_(model, names, transposed=False, blocksize=64):
    """Replace each named module's weight (out, in) by bitsandbytes' NF4 round trip of it.

    No double quantization here: the oracle's compiled 8-bit kernel is not always nearest
    (test_quant.py), and double quantization is checked bit-exactly elsewhere.
    """
    modules = dict(model.named_modules())
    with torch.no_grad(), no_dynamo():
        for name in names:
            weight = modules[name].weight
            w = weight.t().contiguous() if transposed else weight
            packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
            # the PyTorch backend: the compiled CPU kernel is wrong when blocks straddle rows
            keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
            deq = torch.ops.bitsandbytes.dequantize_4bit.default.redispatch(
                keys, packed, state.absmax, blocksize, "nf4", w.shape, torch.float32
            ).reshape(w.shape)
            weight.copy_(deq.t() if transposed else deq)


def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2():
    config = transformers.GPT2Config(
        vocab_size=101, n_positions=32, n_embd=48, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).eval()


def linear_names(model, cls):
    return [n for n, m in model.named_modules() if isinstance(m, cls) and not n.endswith("lm_head")]


def check_logits(model, ids, oracle, original_logits):
    with torch.no_grad():
        out = model(ids).logits
        expected = oracle(ids).logits
    err = (out - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= 1e-5 * max(scale, 1.0), f"logits differ from the oracle-quantized model by {err:.3e}"
    rel = ((out - original_logits).norm() / original_logits.norm()).item()
    assert rel < 0.5, f"4-bit logits drift {rel:.3f} from the original"


def test_llama_tiny(seed):
    model = tiny_llama()
    ids = torch.randint(0, 101, (2, 13))
    with torch.no_grad():
        original = model(ids).logits
    names = linear_names(model, nn.Linear)
    assert len(names) == 14  # 7 projections x 2 layers
    oracle = copy.deepcopy(model)
    oracle_fake_quant_(oracle, names)

    assert replace_linear(model, compress_statistics=False) is model
    modules = dict(model.named_modules())
    assert all(isinstance(modules[n], Linear4bit) for n in names)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, Linear4bit)
    check_logits(model, ids, oracle, original)


def test_gpt2_tiny_conv1d(seed):
    from transformers.pytorch_utils import Conv1D

    model = tiny_gpt2()
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        original = model(ids).logits
    names = linear_names(model, Conv1D)
    assert len(names) == 8  # c_attn, c_proj, mlp.c_fc, mlp.c_proj x 2 layers
    oracle = copy.deepcopy(model)
    oracle_fake_quant_(oracle, names, transposed=True)

    replace_linear(model, compress_statistics=False)
    modules = dict(model.named_modules())
    for n in names:
        assert isinstance(modules[n], Linear4bit)
    attn = modules["transformer.h.0.attn.c_attn"]
    assert (attn.in_features, attn.out_features) == (48, 144)
    check_logits(model, ids, oracle, original)


def test_target_skip_and_idempotence(seed):
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 8)))
    replace_linear(model, target_modules=["2.0"], skip=())
    assert isinstance(model[2][0], Linear4bit)
    assert type(model[0]) is nn.Linear and type(model[2][1]) is nn.Linear
    replace_linear(model, skip=("2.1",), blocksize=32, quant_type="fp4")
    assert isinstance(model[0], Linear4bit) and model[0].quant_type == "fp4" and model[0].blocksize == 32
    assert model[2][0].quant_type == "nf4"  # converted once, left alone the second time
    assert type(model[2][1]) is nn.Linear
    with pytest.raises(ValueError, match="matched no"):
        replace_linear(model, target_modules=["nonexistent"])
    with pytest.raises(ValueError, match="nothing to do"):
        replace_linear(model, quant_type=None)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        replace_linear("model")
    with pytest.raises(ValueError, match="quant_type"):
        replace_linear(nn.Sequential(nn.Linear(64, 8)), quant_type="int4")


def test_lora_branch(seed):
    from qlora_fast.nn import lora

    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16))
    x = torch.randn(3, 64)
    replace_linear(model, r=4, target_modules=["0"])
    assert isinstance(model[0], lora.QLoRALinear) and isinstance(model[0].base, Linear4bit)
    assert model[0].r == 4 and model[0].scaling == 2.0  # alpha defaults to 2 * r
    assert type(model[1]) is nn.Linear
    plain = nn.Sequential(nn.Linear(64, 32))
    reference = copy.deepcopy(plain)
    replace_linear(plain, quant_type=None, r=2, lora_alpha=4.0, skip=())
    assert isinstance(plain[0], lora.LoRALinear) and isinstance(plain[0].base, nn.Linear)
    # a fresh adapter (B = 0) leaves the full-precision function unchanged
    torch.testing.assert_close(plain(x), reference(x))


def test_converted_model_state_dict_round_trip(seed):
    # a whole converted model saves and loads (strict) with bitsandbytes-style keys
    model = replace_linear(tiny_llama())
    sd = model.state_dict()
    assert "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in sd
    assert sd["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
    fresh = replace_linear(tiny_llama())
    fresh.load_state_dict(sd, strict=True)
    ids = torch.randint(0, 101, (1, 7))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


# ------------------------------------------------------------------ one injector, two entry points
def linear_like(model):
    """{full name: module} of every nn.Linear / Conv1D, found independently of qlora_fast's walk."""
    from transformers.pytorch_utils import Conv1D

    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


# targets as PEFT reads them, and the layers each must pick (written out from the architecture)
TARGET_CASES = {
    "gpt2": [(["c_attn", "mlp.c_proj"], lambda n: n.endswith(".c_attn") or n.endswith(".mlp.c_proj")),
             (r"transformer\.h\.1\..*c_(fc|attn)",
              lambda n: n.startswith("transformer.h.1.") and n.endswith((".c_attn", ".c_fc"))),
             ("all-linear", lambda n: n != "lm_head")],
    "llama": [(["q_proj", "down_proj"], lambda n: n.endswith(("q_proj", "down_proj"))),
              (r"model\.layers\.0\.self_attn\.[kv]_proj", lambda n: n in ("model.layers.0.self_attn.k_proj",
                                                                        "model.layers.0.self_attn.v_proj")),
              ("all-linear", lambda n: n != "lm_head")],
}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
# names, regex, all-linear; 4 bits with all-linear only (quantize_base also quantizes what PeftModel does not adapt)
@pytest.mark.parametrize("case, quant_type", [(0, None), (1, None), (2, None), (2, "nf4")])
def test_replace_linear_and_get_peft_model_wrap_the_same_layers(seed, kind, case, quant_type):
    """replace_linear and get_peft_model share one matcher and one wrapper: the same layers, each
    of the same kind with the same adapter (same seed: the same initial A), the same logits."""
    from qlora_fast.nn import LoRALinear, QLoRALinear
    from qlora_fast.peft import LoraConfig, get_peft_model

    targets, expected = TARGET_CASES[kind][case]
    model = tiny_gpt2() if kind == "gpt2" else tiny_llama()
    want = sorted(n for n in linear_like(model) if expected(n))
    assert want  # the case picks something
    ours, peft_base = copy.deepcopy(model), copy.deepcopy(model)
    torch.manual_seed(seed)
    replace_linear(ours, quant_type=quant_type, target_modules=targets, r=4, lora_alpha=6.0, lora_dropout=0.1)
    torch.manual_seed(seed)
    peft = get_peft_model(peft_base, LoraConfig(target_modules=targets, r=4, lora_alpha=6.0, lora_dropout=0.1,
                                                quantize_base=quant_type))
    kind_wanted = LoRALinear if quant_type is None else QLoRALinear
    for adapted in (ours, peft.base_model):
        layers = {n: m for n, m in adapted.named_modules() if isinstance(m, LoRALinear)}
        assert sorted(layers) == want
        assert all(type(m) is kind_wanted and m.scaling == 1.5 and m.dropout == 0.1 for m in layers.values())
        assert all((getattr(m.base, "conv1d_class", None) is not None) == (kind == "gpt2") for m in layers.values())
        assert isinstance(adapted.lm_head, nn.Linear) and not isinstance(adapted.lm_head, Linear4bit)
    a, b = ours.state_dict(), peft.base_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "different tensors"
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == [
        n for n, p in peft.base_model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        for (_, p), (_, q) in zip(sorted(ours.named_parameters()), sorted(peft.base_model.named_parameters())):
            if p.requires_grad:  # a trained-looking adapter, the same on both
                p.add_(torch.randn_like(p))
                q.copy_(p)
    ids = torch.randint(0, 101, (2, 7))
    ours.eval(), peft.eval()  # the new LoRA layers start in training mode (their dropout on)
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, peft(input_ids=ids).logits)


def test_deprecated_names_warn_and_give_the_same_model(seed):
    """replace_linear(lora_r=, target=) and LoraConfig(alpha=, dropout=) still work for one release:
    a DeprecationWarning naming the new name, and exactly the model the new names give."""
    import warnings

    from qlora_fast.peft import LoraConfig, get_peft_model
    from qlora_fast.peft.config import config_from_dict

    model = tiny_llama()
    old, new = copy.deepcopy(model), copy.deepcopy(model)
    torch.manual_seed(seed)
    with pytest.warns(DeprecationWarning) as record:
        replace_linear(old, lora_r=3, target="v_proj", lora_alpha=5.0)  # old target: one string is one name
    assert sorted(str(w.message).split(" is ")[0] for w in record) == [
        "replace_linear(lora_r=...)", "replace_linear(target=...)"]
    assert all(("use r=" in str(w.message)) != ("use target_modules=" in str(w.message)) for w in record)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replace_linear(new, r=3, target_modules=["v_proj"], lora_alpha=5.0)
    a, b = old.state_dict(), new.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TypeError, match="both r= and its deprecated name lora_r="):
        replace_linear(tiny_llama(), r=2, lora_r=2)

    with pytest.warns(DeprecationWarning) as record:
        config = LoraConfig(target_modules=["q_proj"], r=2, alpha=3.0, dropout=0.25)
    assert sorted(str(w.message) for w in record) == [
        f"LoraConfig.{old} is deprecated: use lora_{old} (the old name goes in the next release)"
        for old in ("alpha", "dropout")]
    assert config == LoraConfig(target_modules=["q_proj"], r=2, lora_alpha=3.0, lora_dropout=0.25)
    with pytest.warns(DeprecationWarning, match="LoraConfig.alpha is deprecated: use lora_alpha"):
        assert config.alpha == 3.0
    with pytest.warns(DeprecationWarning, match="LoraConfig.dropout"):
        assert config.dropout == 0.25
    torch.manual_seed(seed)
    with pytest.warns(DeprecationWarning):
        old_peft = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], r=2, alpha=3.0))
    torch.manual_seed(seed)
    new_peft = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], r=2, lora_alpha=3.0))
    a, b = old_peft.state_dict(), new_peft.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # an adapter file written before the rename is data: it loads under the new names, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        saved = config_from_dict({"peft_type": "lora", "target_modules": ["q_proj"], "r": 2, "alpha": 3.0,
                                  "dropout": 0.25, "use_rslora": False, "quantize_base": None, "blocksize": 64,
                                  "double_quant": True})
    assert saved == config


def test_conv1d_to_linear_computes_the_same_function(seed):
    from transformers.pytorch_utils import Conv1D

    from qlora_fast.nn import conv1d_to_linear

    conv = Conv1D(13, 7).double()  # nf=13 outputs, nx=7 inputs: weight stored (7, 13)
    with torch.no_grad():
        conv.bias.normal_()
    linear = conv1d_to_linear(conv)
    x = torch.randn(3, 5, 7, dtype=torch.float64)
    assert type(linear) is nn.Linear and linear.conv1d_class is Conv1D
    assert torch.equal(linear(x), x @ conv.weight + conv.bias) or torch.allclose(linear(x), conv(x), rtol=0, atol=1e-12)
    with pytest.raises(TypeError, match="conv must be a transformers Conv1D"):
        conv1d_to_linear(nn.Linear(7, 13))


def test_every_target_name_must_match_and_nothing_changes_when_one_does_not():
    """One matcher, one rule: each listed name must pick a layer (a typo is an error naming it, not
    a silently smaller adapter), a regex must pick one, and nothing is swapped before the check."""
    from qlora_fast.nn import match_target_modules

    model = tiny_llama()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="target module 'v_prj' matched no linear layer.*'v_proj'"):
        replace_linear(model, r=2, target_modules=["q_proj", "v_prj"])
    with pytest.raises(ValueError, match="regex 'q_proj' matches no linear layer"):  # a regex sees the full name
        replace_linear(model, target_modules="q_proj")
    with pytest.raises(TypeError, match="target_modules must hold strings"):
        replace_linear(model, target_modules=["q_proj", 3])
    assert {n: type(m) for n, m in model.named_modules()} == before
    q = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert match_target_modules(model, r".*\.q_proj") == q
    # "all-linear" never picks the output layer, whatever include_output says; None does when asked
    assert "lm_head" not in match_target_modules(model, "all-linear", include_output=True)
    assert match_target_modules(model, None, include_output=True)[-1] == "lm_head"


@pytest.mark.parametrize("quant_type, r", [("nf4", None), ("nf4", 4), (None, 4)])
def test_t5_keeps_wo_in_full_precision_and_trains(seed, quant_type, r):
    """T5 keeps wo in float32 (_keep_in_fp32_modules) and casts to wo.weight.dtype in forward: wo
    stays full precision (as bitsandbytes' quantizer leaves it) and a LoRA layer shows its base's
    weight (as PEFT's). Oracle: bitsandbytes' NF4 round trip of the other layers, the adapters through PEFT."""
    from qlora_fast.nn import LoRALinear

    cfg = transformers.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, vocab_size=101,
                                decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    names = linear_names(model, nn.Linear)
    quantized = [n for n in names if quant_type and not n.endswith(".wo")]
    assert len(quantized) in (0, len(names) - 4)  # wo: 2 encoder + 2 decoder blocks
    ours = replace_linear(copy.deepcopy(model), quant_type=quant_type, compress_statistics=False, r=r)
    modules = dict(ours.named_modules())
    oracle = copy.deepcopy(model)
    oracle_fake_quant_(oracle, quantized)
    for n in names:
        layer = modules[n]
        assert isinstance(layer.base if r else layer, Linear4bit) == (n in quantized), n
        if r:
            assert isinstance(layer, LoRALinear) and layer.weight is layer.base.weight
            with torch.no_grad():
                layer.lora_B.normal_()  # a trained-looking adapter
    if r:  # the same adapters through PEFT on the oracle, unmerged as ours are (merged, W + BA rounds otherwise)
        peft = pytest.importorskip("peft", reason="peft (the oracle) is a test extra")
        oracle = peft.get_peft_model(oracle, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=names))
        with torch.no_grad():
            for n in names:
                theirs = oracle.base_model.model.get_submodule(n)
                theirs.lora_A["default"].weight.copy_(modules[n].lora_A)
                theirs.lora_B["default"].weight.copy_(modules[n].lora_B)
        oracle.eval()
    state = ours.state_dict()
    if r:  # the property adds no key
        assert not any(k in state for n in names for k in (n + ".weight", n + ".bias"))
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        out = ours(input_ids=ids, decoder_input_ids=ids).logits
        expected = oracle(input_ids=ids, decoder_input_ids=ids).logits
        exact = copy.deepcopy(oracle).double()(input_ids=ids, decoder_input_ids=ids).logits
    # float32 rounding judged as flash-attention does: at most twice the oracle's own float32 error
    assert (out - exact).abs().max() <= 2 * (expected - exact).abs().max()
    if r:
        ours.train()
        ours(input_ids=ids, labels=ids).loss.backward()
        grads = [p.grad for p in ours.parameters() if p.requires_grad]
        assert len(grads) == 2 * len(names) and all(g is not None and g.isfinite().all() and g.any() for g in grads)
