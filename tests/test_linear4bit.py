"""Linear4bit: forward against a float64 matmul with the oracle's dequantized weight, state_dict
round trips (ours, safetensors, and to/from bitsandbytes' Linear4bit), device moves, errors."""
import pytest
import torch
from conftest import assert_close, no_dynamo
from torch import nn

from qlora_fast.nn import Linear4bit

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes (the oracle) is a test extra")
import bitsandbytes.functional as bnbF  # noqa: E402

pytestmark = pytest.mark.usefixtures("reference_backend")


def oracle_weight(weight, quant_type, blocksize, nested):
    """W after bitsandbytes' own quantize + dequantize, in float64."""
    with no_dynamo():
        packed, state = bnbF.quantize_4bit(
            weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested
        )
        return bnbF.dequantize_4bit(packed, state).double().reshape(weight.shape)


@pytest.mark.parametrize("quant_type,blocksize,nested", [("nf4", 64, False), ("fp4", 128, False), ("nf4", 32, True)])
def test_forward_fp32_matches_float64_oracle(seed, quant_type, blocksize, nested):
    linear = nn.Linear(67, 45)
    layer = Linear4bit.from_linear(linear, quant_type=quant_type, blocksize=blocksize, compress_statistics=nested)
    x = torch.randn(3, 5, 67)
    out = layer(x)
    if nested:
        # our double-quantized codes follow bnb's exact-nearest rule; the oracle's compiled kernel
        # may differ on rare absmax codes (test_quant.py), so build W from our own state
        w = layer.dequantize_weight().double()
        assert (w - oracle_weight(linear.weight.detach(), quant_type, blocksize, True)).abs().max() < 0.05
    else:
        w = oracle_weight(linear.weight.detach(), quant_type, blocksize, False)
        assert torch.equal(layer.dequantize_weight().double(), w)
    expected = x.double() @ w.T + linear.bias.double()
    pt = (x @ w.float().T + linear.bias).double()  # PyTorch's own fp32 error
    assert out.shape == (3, 5, 45) and out.dtype == torch.float32
    assert (out.double() - expected).abs().max() <= 2 * (pt - expected).abs().max() + 1e-7
    # and it stays close to the full-precision layer (4-bit error, not garbage)
    full = linear(x).double()
    assert ((out.double() - full).norm() / full.norm()).item() < 0.2


@pytest.mark.parametrize("compute_dtype", [torch.float16, torch.bfloat16])
def test_forward_low_precision_compute(seed, compute_dtype):
    linear = nn.Linear(96, 40, dtype=torch.float32)
    layer = Linear4bit.from_linear(linear, compute_dtype=compute_dtype)
    assert layer.compute_dtype == compute_dtype and layer.dequantize_weight().dtype == compute_dtype
    x = torch.randn(7, 96)
    out = layer(x)
    assert out.dtype == torch.float32  # cast back to the input's dtype
    w = layer.dequantize_weight()
    expected = x.double() @ w.double().T + linear.bias.to(compute_dtype).double()
    pt = (x.to(compute_dtype) @ w.T + linear.bias.to(compute_dtype)).double()
    assert (out.double() - expected).abs().max() <= 2 * (pt - expected).abs().max()


def test_gradients_flow_to_input_and_bias_not_weight(seed):
    linear = nn.Linear(50, 30)
    layer = Linear4bit.from_linear(linear)
    assert layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
    x = torch.randn(4, 50, requires_grad=True)
    grad_out = torch.randn(4, 30)
    layer(x).backward(grad_out)
    w = layer.dequantize_weight()
    assert_close(x.grad, grad_out @ w, atol=1e-5)
    assert_close(layer.bias.grad, grad_out.sum(0), atol=1e-5)
    assert layer.weight.grad is None


def test_state_dict_round_trip_exact(seed, tmp_path):
    layer = Linear4bit(70, 33, quant_type="fp4", blocksize=32)
    sd = layer.state_dict()
    assert set(sd) == {
        "weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
        "weight.nested_quant_map", "weight.quant_state.bitsandbytes__fp4", "bias",
    }
    other = Linear4bit(70, 33)  # different init and quant type: everything is overwritten
    result = other.load_state_dict(sd)
    assert not result.missing_keys and not result.unexpected_keys
    assert other.quant_state.quant_type == "fp4" and other.quant_state.blocksize == 32
    for key, value in other.state_dict().items():
        assert torch.equal(value, sd[key]), key
    x = torch.randn(2, 70)
    assert torch.equal(other(x), layer(x))

    safetensors = pytest.importorskip("safetensors.torch")
    path = tmp_path / "layer.safetensors"
    safetensors.save_file(sd, str(path))
    third = Linear4bit(70, 33)
    third.load_state_dict(safetensors.load_file(str(path)))
    assert torch.equal(third(x), layer(x))


def test_bitsandbytes_checkpoint_loads_into_ours_and_back(seed):
    # in_features a multiple of the blocksize: bitsandbytes' compiled CPU dequantize is only
    # consistent with its own PyTorch backend when rows hold whole blocks (see test_quant.py)
    bnb_layer = bnb.nn.Linear4bit(128, 24, quant_type="nf4", compress_statistics=True, compute_dtype=torch.float32)
    bnb_layer = bnb_layer.to("cpu")  # bitsandbytes quantizes on the move to a device
    bnb_sd = bnb_layer.state_dict()

    ours = Linear4bit.from_state_dict(bnb_sd)
    assert set(ours.state_dict()) == set(bnb_sd)
    module = Linear4bit(128, 24)
    module.load_state_dict(bnb_sd)
    x = torch.randn(6, 128)
    with no_dynamo():
        expected = bnbF.dequantize_4bit(bnb_layer.weight.data, bnb_layer.weight.quant_state).reshape(24, 128)
        bnb_out = bnb_layer(x)
    assert torch.equal(ours.dequantize_weight(), expected)
    assert torch.equal(module.dequantize_weight(), expected)
    assert_close(ours(x), bnb_out, atol=1e-5, rtol=1e-5)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, bnb_sd[key]), key

    # ours into theirs, the way Hugging Face loads a pre-quantized checkpoint
    layer = Linear4bit.from_linear(nn.Linear(128, 24))
    sd = layer.state_dict()
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    theirs = bnb.nn.Linear4bit(128, 24, compute_dtype=torch.float32)
    theirs.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=theirs)
    theirs.bias = nn.Parameter(sd["bias"])
    with no_dynamo():
        assert torch.equal(
            bnbF.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state).reshape(24, 128),
            layer.dequantize_weight(),
        )
        assert_close(theirs(x), layer(x), atol=1e-5, rtol=1e-5)
    their_sd = theirs.state_dict()
    assert set(their_sd) == set(sd)
    for key, value in their_sd.items():
        assert torch.equal(value, sd[key]), key


@pytest.mark.parametrize("storage", [torch.int8, torch.int32, torch.bfloat16])
def test_bitsandbytes_checkpoint_with_any_quant_storage(seed, storage):
    # bitsandbytes' quant_storage keeps the packed bytes in another dtype (FSDP with bnb uses it):
    # they decode like the uint8 ones bnb makes from the same weights
    linear = nn.Linear(128, 24)
    layers = {}
    for dtype in (torch.uint8, storage):
        layer = bnb.nn.Linear4bit(128, 24, compute_dtype=torch.float32, quant_storage=dtype)
        layer.load_state_dict(linear.state_dict())
        layers[dtype] = layer.to("cpu")  # bitsandbytes quantizes on the move to a device
    sd = layers[storage].state_dict()
    assert sd["weight"].dtype == storage
    loaded = Linear4bit(128, 24)
    loaded.load_state_dict(sd)
    x = torch.randn(5, 128)
    plain = layers[torch.uint8].weight
    with no_dynamo():
        expected = bnbF.dequantize_4bit(plain.data, plain.quant_state).reshape(24, 128)
        bnb_out = layers[storage](x)
    for module in (Linear4bit.from_state_dict(sd), loaded):
        assert torch.equal(module.dequantize_weight(), expected)
        assert_close(module(x), bnb_out, atol=1e-5, rtol=1e-5)


def test_to_device_moves_quant_state():
    layer = Linear4bit(64, 16, compress_statistics=True)
    moved = layer.to("meta")
    assert moved is layer
    state = layer.quant_state
    assert layer.weight.device.type == "meta" and layer.bias.device.type == "meta"
    for t in (state.absmax, state.code, state.offset, state.nested_absmax, state.nested_code):
        assert t.device.type == "meta"
    # a dtype cast leaves the packed weight alone and casts the bias
    layer = Linear4bit(64, 16).to(torch.float16)
    assert layer.weight.dtype == torch.uint8 and layer.bias.dtype == torch.float16


@pytest.mark.parametrize("nested", [True, False])
def test_built_on_the_meta_device_like_nn_linear(nested):
    # Linear4bit(..., device="meta") and under `with torch.device("meta")`, as nn.Linear: every
    # tensor on meta with the shape and dtype of a real module (no values computed)
    options = dict(blocksize=32, compress_statistics=nested)
    real = Linear4bit(130, 45, **options)
    made = [Linear4bit(130, 45, device="meta", **options)]
    with torch.device("meta"):
        made += [Linear4bit(130, 45, **options), Linear4bit.from_linear(nn.Linear(130, 45), **options)]
    fields = ("absmax", "code", "offset", "nested_absmax", "nested_code")
    for module in made:
        assert module.weight.is_meta and module.bias.is_meta
        assert (module.weight.shape, module.weight.dtype) == (real.weight.shape, real.weight.dtype)
        for name in fields:
            ours, theirs = getattr(module.quant_state, name), getattr(real.quant_state, name)
            assert (ours is None) == (theirs is None), name
            assert ours is None or (ours.is_meta and (ours.shape, ours.dtype) == (theirs.shape, theirs.dtype)), name
        assert set(module.state_dict()) == set(real.state_dict())


def test_load_state_dict_assign_fills_a_meta_module(seed):
    # load_state_dict(..., assign=True) takes the loaded tensors (and their device), as nn.Module
    # does: the usual way to fill a model built on the meta device
    source = Linear4bit(130, 45, blocksize=32)
    sd = source.state_dict()
    x = torch.randn(3, 130)
    for module in (Linear4bit(130, 45, blocksize=32, device="meta"), Linear4bit(130, 45).to("meta")):
        result = module.load_state_dict(sd, assign=True)
        assert not result.missing_keys and not result.unexpected_keys
        assert module.weight.device.type == module.quant_state.device.type == module.bias.device.type == "cpu"
        assert module.weight.data_ptr() == sd["weight"].data_ptr()  # assigned, not copied
        assert not module.weight.requires_grad and module.bias.requires_grad
        assert torch.equal(module(x), source(x))


@pytest.mark.gpu
def test_device_round_trip(seed, device):
    linear = nn.Linear(96, 48)
    layer = Linear4bit.from_linear(linear).to(device)
    assert layer.quant_state.absmax.device.type == device.type
    x = torch.randn(3, 96)
    assert_close(layer(x.to(device)).cpu(), Linear4bit.from_linear(linear)(x), atol=1e-5, rtol=1e-5)


def test_errors_name_the_argument():
    layer = Linear4bit(64, 8)
    sd = layer.state_dict()
    for key in ("weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4", "weight.nested_quant_map"):
        broken = {k: v for k, v in sd.items() if k != key}
        with pytest.raises(ValueError, match=key.split(".", 1)[1].split("bitsandbytes")[0]):
            Linear4bit(64, 8).load_state_dict(broken)
    with pytest.raises(RuntimeError, match="size mismatch"):
        Linear4bit(32, 8).load_state_dict(sd)
    with pytest.raises(ValueError, match="x must have last dimension 64"):
        layer(torch.randn(2, 63))
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        Linear4bit.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(TypeError, match="compute_dtype"):
        Linear4bit(64, 8, compute_dtype=torch.int32)
    with pytest.raises(ValueError, match="blocksize"):
        Linear4bit(64, 8, blocksize=48)
    with pytest.raises(ValueError, match="quant_type"):
        Linear4bit(64, 8, quant_type="int4")


def test_torch_compile_fullgraph_forward(seed):
    layer = Linear4bit.from_linear(nn.Linear(96, 40))
    x = torch.randn(5, 96)
    # aot_eager: dynamo + AOTAutograd through the custom ops' fake impls, no C++ build
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), layer(x))
