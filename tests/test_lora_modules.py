"""LoRALinear / QLoRALinear: init, numerics vs float64, merge/unmerge, disable_adapter,
torch.compile, autocast, checkpointing, DDP (gloo, 2 processes), bad input, and a tiny Hugging
Face Llama converted with replace_linear that trains."""
import copy
import math

import pytest
import torch
from conftest import assert_close
from helpers import abs_sum, assert_matches_float64, oracle_dequantize
from lora_ddp_worker import ddp_data, ddp_model, ddp_worker
from torch import nn

from qlora_fast.functional import dequantize_4bit, lora_linear, matmul_4bit, quantize_4bit
from qlora_fast.nn import Linear4bit, LoRALinear, QLoRALinear, disable_adapter, replace_linear
from qlora_fast.reference.lora import lora_linear_ref


def make_lora(in_features=37, out_features=29, r=4, alpha=8.0, dropout=0.0, quantized=False, dtype=torch.float32,
              compute_dtype=None, bias=True, use_rslora=False):
    linear = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    if quantized:
        module = QLoRALinear.from_linear(linear, r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora,
                                         compute_dtype=compute_dtype)
    else:
        module = LoRALinear.from_linear(linear, r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora)
    with torch.no_grad():
        module.lora_B.normal_()  # a trained-looking adapter (fresh B is zero)
    return module


def base_weight64(module):
    if isinstance(module, QLoRALinear):
        return oracle_dequantize(module.base.weight, module.base.quant_state).double()
    return module.base.weight.double()


# ------------------------------------------------------------------ construction

@pytest.mark.parametrize("quantized", [False, True])
def test_init_and_trainable_parameters(seed, quantized):
    linear = nn.Linear(40, 24)
    module = (QLoRALinear if quantized else LoRALinear).from_linear(linear, r=6, lora_alpha=12)
    assert module.lora_A.shape == (6, 40) and module.lora_B.shape == (24, 6)
    assert torch.count_nonzero(module.lora_B) == 0
    bound = 1 / math.sqrt(40)  # kaiming_uniform(a=sqrt(5)) as nn.Linear
    assert module.lora_A.abs().max() <= bound and module.lora_A.abs().max() > bound / 2
    assert module.scaling == 2.0
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    x = torch.randn(3, 40)
    # a fresh adapter computes exactly the base layer
    assert_close(module(x), module.base(x), atol=1e-6)
    rs = LoRALinear(nn.Linear(40, 24), r=16, lora_alpha=8, use_rslora=True)
    assert rs.scaling == 8 / 4


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("quantized,dtype,compute_dtype", [
    (False, torch.float32, None), (False, torch.bfloat16, None), (False, torch.float16, None),
    (True, torch.float32, None), (True, torch.float32, torch.bfloat16), (True, torch.float16, None),
])
def test_forward_and_grads_vs_float64(seed, monkeypatch, backend, quantized, dtype, compute_dtype):
    monkeypatch.setenv("QLORA_FAST_BACKEND", backend)
    module = make_lora(quantized=quantized, dtype=dtype, compute_dtype=compute_dtype)
    cdt = compute_dtype or dtype
    w64 = base_weight64(module)
    x = torch.randn(2, 3, 37).to(dtype).requires_grad_()
    y = module(x)
    assert y.dtype == dtype
    grad = torch.randn_like(y)
    y.backward(grad)
    leaves = [t.detach().double().requires_grad_() for t in (x, module.lora_A, module.lora_B)]
    y64 = lora_linear_ref(leaves[0], w64, leaves[1], leaves[2], module.scaling, module.base.bias.double())
    y64.backward(grad.double())
    # PyTorch's own result in the compute dtype (for the error budget)
    pt = [t.detach().to(cdt).requires_grad_() for t in (x, module.lora_A, module.lora_B)]
    y_pt = lora_linear_ref(pt[0], w64.to(cdt), pt[1], pt[2], module.scaling, module.base.bias.to(cdt))
    y_pt.backward(grad.to(cdt))
    assert_matches_float64(y.to(cdt), y64.detach(), y_pt.detach(), abs_sum(x, w64.t()), msg="y")
    assert_matches_float64(x.grad.to(cdt), leaves[0].grad, pt[0].grad, abs_sum(grad, w64), msg="dx")
    for p, want, got_pt, name in ((module.lora_A, leaves[1], pt[1], "dA"), (module.lora_B, leaves[2], pt[2], "dB")):
        assert p.grad.dtype == p.dtype == torch.float32
        assert_matches_float64(p.grad.to(cdt), want.grad, got_pt.grad, msg=name)
    assert all(p.grad is None for p in module.base.parameters())


# ------------------------------------------------------------------ merge / unmerge

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_dense(seed, dtype):
    module = make_lora(dtype=dtype).eval()
    x = torch.randn(5, 37).to(dtype)
    before = module(x)
    original = module.base.weight.detach().clone()
    module.merge()
    assert module.merged
    merged_weight = original.double() + module.scaling * module.lora_B.double() @ module.lora_A.double()
    ulp = torch.finfo(dtype).eps * merged_weight.abs().max().item()
    assert_close(module.base.weight, merged_weight, atol=ulp)
    after = module(x)
    assert_close(after, before, atol=4 * torch.finfo(dtype).eps * before.abs().max().item() + 1e-6)
    with pytest.raises(RuntimeError, match="already merged"):
        module.merge()
    module.unmerge()
    assert not module.merged
    assert_close(module.base.weight, original, atol=2 * ulp)
    with pytest.raises(RuntimeError, match="not merged"):
        module.unmerge()


def test_merge_unmerge_float64_keeps_float64_precision(seed):
    """A float64 base merges in float64 (as PEFT does): float32 math lost ~1e-7 of W in merge,
    unmerge and merge_linear_layers (merge_and_unload)."""
    from qlora_fast.nn.replace import merge_linear_layers

    module = make_lora(dtype=torch.float64, use_rslora=True).eval()
    original = module.base.weight.detach().clone()
    merged64 = original + module.scaling * module.lora_B.detach() @ module.lora_A.detach()
    ulp = torch.finfo(torch.float64).eps * merged64.abs().max().item()
    dense = merge_linear_layers(nn.Sequential(copy.deepcopy(module)))[0]
    assert type(dense) is nn.Linear and dense.weight.dtype == torch.float64
    assert_close(dense.weight, merged64, atol=ulp, rtol=0)
    module.merge()
    assert_close(module.base.weight, merged64, atol=ulp, rtol=0)
    module.unmerge()
    assert_close(module.base.weight, original, atol=2 * ulp, rtol=0)


@pytest.mark.parametrize("quantized,dtype", [(False, torch.float32), (False, torch.bfloat16), (False, torch.float64),
                                             (True, torch.float32)])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_public_weights_against_float64(seed, quantized, dtype, use_rslora):
    """delta_weight / base_weight / merged_weight (what merging and merge_and_unload read) against
    W + scaling B A in float64, W dequantized by the oracle for a 4-bit base."""
    module = make_lora(r=5, alpha=3.0, quantized=quantized, dtype=dtype, use_rslora=use_rslora)
    scaling = 3.0 / (math.sqrt(5) if use_rslora else 5)
    delta64 = scaling * module.lora_B.double() @ module.lora_A.double()
    w64 = base_weight64(module)
    cases = ((module.delta_weight(), delta64), (module.base_weight(), w64), (module.merged_weight(), w64 + delta64))
    for got, want in cases:
        assert got.dtype == torch.float32 and got.shape == (29, 37) and not got.requires_grad
        assert_close(got.double(), want, atol=2 * torch.finfo(torch.float32).eps * want.abs().max().item())
    copy_ = module.base_weight()
    copy_.add_(1.0)  # a copy: the layer's weight is untouched
    assert_close(module.base_weight().double(), w64, atol=1e-6 * w64.abs().max().item())


def per_block_absmax(t, blocksize=64):
    """max |t| of each element's quantization block, per element (flat)."""
    flat = t.reshape(-1).abs()
    padded = torch.cat([flat, flat.new_zeros(-flat.numel() % blocksize)])
    return padded.reshape(-1, blocksize).amax(1).repeat_interleave(blocksize)[: flat.numel()]


def test_merge_unmerge_nf4_requantizes(seed):
    module = make_lora(quantized=True).eval()
    packed_before = module.base.weight.detach().clone()
    w_before = dequantize_4bit(module.base.weight, module.base.quant_state, torch.float32)
    delta = module.scaling * module.lora_B.detach() @ module.lora_A.detach()
    target = w_before + delta
    module.merge()
    # merging is exactly "quantize(dequantize(W) + s B A)" with the base's settings
    packed, state = quantize_4bit(target, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(module.base.weight, packed)
    merged = oracle_dequantize(module.base.weight, module.base.quant_state)
    # ... whose error is one requantization: at most half the widest NF4 code gap (0.139) of each
    # block's absmax, plus the double quantization's rounding of that absmax (a few %).
    block_absmax = per_block_absmax(target)
    err = (merged - target).abs().reshape(-1)
    assert (err <= 0.15 * block_absmax * 1.05).all(), (err / block_absmax).max()
    # the merged layer computes the requantized weight, not the exact W + s B A
    x = torch.randn(4, 37)
    assert_close(module(x), x @ merged.t() + module.base.bias, atol=1e-4)
    with pytest.raises(RuntimeError, match="already merged"):
        module.merge()
    module.unmerge()
    restored = oracle_dequantize(module.base.weight, module.base.quant_state)
    # unmerge requantizes again: close to the original weight, but the codes are not recovered
    bound = 0.15 * 1.05 * (per_block_absmax(target) + per_block_absmax(restored + delta))
    assert ((restored - w_before).abs().reshape(-1) <= bound).all()
    assert not torch.equal(module.base.weight, packed_before)


# ------------------------------------------------------------------ disable_adapter

def test_disable_adapter_module_and_model(seed):
    model = nn.Sequential(make_lora(37, 30), nn.ReLU(), make_lora(30, 11, quantized=True)).eval()
    plain = nn.Sequential(model[0].base, nn.ReLU(), model[2].base)
    x = torch.randn(3, 37)
    with_adapter = model(x)
    with disable_adapter(model):
        assert_close(model(x), plain(x))
        assert not any(m.adapter_enabled for m in (model[0], model[2]))
    assert_close(model(x), with_adapter)
    with model[0].disable_adapter():
        assert_close(model[0](x), model[0].base(x))
        assert model[2].adapter_enabled
    assert (model(x) - plain(x)).abs().max() > 1e-3
    model[0].merge()
    with pytest.raises(RuntimeError, match="merged"):
        with disable_adapter(model):
            pass
    assert model[2].adapter_enabled, "a refused disable must change nothing"
    with pytest.raises(RuntimeError, match="merged"):
        with model[0].disable_adapter():
            pass


# ------------------------------------------------------------------ compile / autocast / checkpoint

@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_matches_eager(seed, monkeypatch, backend):
    monkeypatch.setenv("QLORA_FAST_BACKEND", backend)
    model = nn.Sequential(make_lora(37, 30), nn.GELU(), make_lora(30, 11, quantized=True))
    x = torch.randn(2, 3, 37)
    eager = model(x)
    eager.square().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    assert_close(out, eager, atol=1e-6)
    for got, want in zip((p.grad for p in model.parameters() if p.requires_grad), eager_grads):
        assert_close(got, want, atol=1e-5, rtol=1e-5)
    with disable_adapter(model):  # recompiles on the guard, still the base
        assert_close(compiled(x), model[2].base(nn.functional.gelu(model[0].base(x))), atol=1e-6)


@pytest.mark.parametrize("quantized", [False, True])
def test_autocast_bf16(seed, quantized):
    module = make_lora(quantized=quantized)
    x = torch.randn(4, 37, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
    assert y.dtype == torch.bfloat16
    grad = torch.randn_like(y)
    y.backward(grad)
    assert x.grad.dtype == torch.float32 and module.lora_A.grad.dtype == torch.float32
    w64 = base_weight64(module)
    leaves = [t.detach().to(torch.bfloat16).double().requires_grad_() for t in (x, module.lora_A, module.lora_B)]
    y64 = lora_linear_ref(leaves[0], w64.bfloat16().double(), leaves[1], leaves[2], module.scaling,
                          module.base.bias.bfloat16().double())
    y64.backward(grad.double())
    bf = [t.detach().bfloat16().requires_grad_() for t in (x, module.lora_A, module.lora_B)]
    y_bf = lora_linear_ref(bf[0], w64.bfloat16(), bf[1], bf[2], module.scaling, module.base.bias.bfloat16())
    y_bf.backward(grad)
    assert_matches_float64(y, y64.detach(), y_bf.detach(), msg="y")
    assert_matches_float64(module.lora_A.grad.bfloat16(), leaves[1].grad, bf[1].grad, msg="dA")
    assert_matches_float64(module.lora_B.grad.bfloat16(), leaves[2].grad, bf[2].grad, msg="dB")


def test_checkpoint_with_dropout_matches_plain(seed):
    model = nn.Sequential(make_lora(37, 30, dropout=0.3), nn.GELU(), make_lora(30, 11, quantized=True, dropout=0.3))
    x = torch.randn(6, 37, requires_grad=True)
    torch.manual_seed(7)
    plain = model(x)
    plain.sum().backward()
    want = [x.grad.clone()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    x.grad = None
    torch.manual_seed(7)
    out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
    out.sum().backward()
    got = [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]
    assert_close(out, plain)
    for g, w in zip(got, want):
        assert_close(g, w, atol=1e-6)
    model.eval()  # eval: no dropout, deterministic
    assert_close(model(x), model(x))


# ------------------------------------------------------------------ DDP

def test_ddp_gloo_two_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), 3), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # single process on both ranks' data (mean loss == DDP's averaged gradient)
    reference = ddp_model()
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    opt = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.1)
    data = [ddp_data(r) for r in range(2)]
    for _ in range(3):
        opt.zero_grad()
        sum(nn.functional.mse_loss(reference(x), t) for x, t in data).div(2).backward()
        opt.step()
    adapter_keys = [k for k in states[0] if "lora_" in k]
    assert len(adapter_keys) == 4
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), f"ranks differ in {k}"
    for k in adapter_keys:
        assert not torch.equal(states[0][k], initial[k]), f"{k} did not train"
        assert_close(states[0][k], reference.state_dict()[k], atol=1e-6, msg=k)
    for k in states[0]:
        if "lora_" not in k:
            assert torch.equal(states[0][k], initial[k]), f"frozen {k} changed"


# ------------------------------------------------------------------ bad input

def test_bad_input():
    linear = nn.Linear(8, 6)
    with pytest.raises(ValueError, match="r must be in"):
        LoRALinear(linear, r=0)
    with pytest.raises(ValueError, match="r must be in"):
        LoRALinear(linear, r=7)
    with pytest.raises(TypeError, match="r must be an int"):
        LoRALinear(linear, r=2.0)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(linear, r=2, lora_dropout=1.0)
    with pytest.raises(ValueError, match="alpha"):
        LoRALinear(linear, r=2, lora_alpha=0)
    for alpha in (float("nan"), float("inf")):  # a NaN/inf scaling would turn every output NaN
        with pytest.raises(ValueError, match="lora_alpha must be a finite positive"):
            LoRALinear(linear, r=2, lora_alpha=alpha)
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Conv1d(8, 6, 1), r=2)
    with pytest.raises(TypeError, match="Linear4bit"):
        QLoRALinear(linear, r=2)
    with pytest.raises(ValueError, match="r must be in"):
        QLoRALinear(Linear4bit.from_linear(nn.Linear(8, 6)), r=9)
    module = LoRALinear(linear, r=2)
    with pytest.raises(ValueError, match="last dimension"):
        module(torch.randn(3, 7))
    with pytest.raises(TypeError, match="dtype"):
        module(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="not merged"):
        module.unmerge()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_zero_dim_input_is_a_value_error_naming_x(monkeypatch, backend):
    # x.shape[-1] of a 0-d tensor was an IndexError from deep inside
    monkeypatch.setenv("QLORA_FAST_BACKEND", backend)
    x = torch.tensor(0.5)
    four = Linear4bit.from_linear(nn.Linear(8, 6))
    merged = QLoRALinear(copy.deepcopy(four), r=2)
    merged.merge()
    modules = [four, LoRALinear(nn.Linear(8, 6), r=2), QLoRALinear(four, r=2), merged]
    calls = [lambda: matmul_4bit(x, four.weight, four.quant_state),
             lambda: lora_linear(x, torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2), 1.0),
             lambda: lora_linear(x, four.weight, torch.randn(2, 8), torch.randn(6, 2), 1.0,
                                 quant_state=four.quant_state)]
    for call in [lambda m=m: m(x) for m in modules] + calls:
        with pytest.raises(ValueError, match=r"x must have at least 1 dimension \(\.\.\., in_features\), got a 0-d"):
            call()


# ------------------------------------------------------------------ a converted Hugging Face model trains

@pytest.mark.slow
@pytest.mark.parametrize("quant_type", ["nf4", None])
def test_tiny_hf_llama_with_lora_trains(seed, quant_type):
    transformers = pytest.importorskip("transformers")
    # initializer_range 0.3: with the default 0.02 a frozen random lm_head cannot produce logits
    # larger than ~0.6, so no adapter could bring the loss far below log(vocab).
    config = transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      initializer_range=0.3)
    model = transformers.LlamaForCausalLM(config)
    replace_linear(model, quant_type=quant_type, r=8, lora_alpha=16)
    lora = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(lora) == 2 * 7  # q, k, v, o, gate, up, down per layer; lm_head skipped
    assert isinstance(model.lm_head, nn.Linear)
    assert all(isinstance(m, QLoRALinear) == (quant_type is not None) for m in lora)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    # data: 8 sequences walking one random 6-token cycle from random starting points
    cycle = torch.randperm(48)[:6]
    ids = cycle[(torch.randint(0, 6, (8, 1)) + torch.arange(24)) % 6]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), f"frozen {n} changed"
    with disable_adapter(model), torch.no_grad():
        base_loss = model(input_ids=ids, labels=ids).loss.item()
    assert abs(base_loss - losses[0]) < 1e-3, "adapters off must give the untrained model back"


@pytest.mark.parametrize("quantized", [False, True])
def test_old_argument_names_warn_and_build_the_same_module(quantized, seed):
    """LoRALinear / QLoRALinear take PEFT's lora_alpha / lora_dropout; alpha= / dropout= still work
    for one release, with a DeprecationWarning, and build exactly the module the new names build."""
    cls = QLoRALinear if quantized else LoRALinear
    linear = nn.Linear(40, 24)
    torch.manual_seed(seed)
    with pytest.warns(DeprecationWarning, match=r"from_linear\(alpha=...\) is deprecated: use lora_alpha="):
        old = cls.from_linear(copy.deepcopy(linear), r=4, alpha=3.0, dropout=0.25)
    torch.manual_seed(seed)
    new = cls.from_linear(copy.deepcopy(linear), r=4, lora_alpha=3.0, lora_dropout=0.25)
    assert (old.alpha, old.dropout, old.scaling) == (new.alpha, new.dropout, new.scaling) == (3.0, 0.25, 0.75)
    a, b = old.state_dict(), new.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TypeError, match="both lora_alpha= and its deprecated name alpha="):
        cls.from_linear(copy.deepcopy(linear), r=4, alpha=3.0, lora_alpha=3.0)


@pytest.mark.parametrize("dtype, p", [(torch.bfloat16, 0.05), (torch.float16, 0.1), (torch.bfloat16, 0.3)])
def test_dropout_scales_kept_inputs_by_exactly_one_over_one_minus_p(seed, dtype, p):
    """In 16 bits the factor 1/(1-p) itself would round (bf16: 1/0.95 -> 1.0547, +0.2% on every
    kept input: a bias, where PEFT's float32 adapter is exact). Oracle: float64 math on the same
    kept inputs; the adapter term's projection on it is 1 up to noise that averages out."""
    module = make_lora(256, 96, r=8, dropout=p, dtype=dtype).train()
    x = torch.distributions.StudentT(3.0).sample((512, 256)).to(dtype)  # heavy tails
    state = torch.get_rng_state()
    with torch.no_grad():
        y = module(x).double()
    torch.set_rng_state(state)  # the same draw: which inputs were kept
    kept = torch.nn.functional.dropout(torch.ones_like(x), p, training=True) != 0
    base = module.base(x).double()
    A, B = (w.to(dtype).double() for w in (module.lora_A, module.lora_B))  # as computed, in x's dtype
    adapter = (x.double() * kept) @ A.t() @ B.t() * module.scaling / (1 - p)
    ratio = ((y - base) * adapter).sum() / (adapter * adapter).sum()
    assert abs(ratio.item() - 1) < 4e-4, ratio.item()
