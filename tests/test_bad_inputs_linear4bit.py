"""Linear4bit and quantize_4bit under bad input: corrupt or inconsistent checkpoints are refused at
load with the key named and the module left as it was; integer inputs, NaN/Inf weights, outliers
and values too large for double quantization are refused or warned about, never silently wrong."""
import json
import warnings

import pytest
import torch

from qlora_fast.functional import matmul_4bit, quantize_4bit
from qlora_fast.nn import Linear4bit, QLoRALinear
from qlora_fast.quant_state import QuantState

pytestmark = pytest.mark.usefixtures("reference_backend")

PACKED = "weight.quant_state.bitsandbytes__nf4"


def layer_and_sd(nested=True, in_features=96, out_features=24):
    layer = Linear4bit(in_features, out_features, compress_statistics=nested)
    return layer, {k: v.clone() for k, v in layer.state_dict().items()}


def edit_json(sd, **changes):
    fields = json.loads(bytes(sd[PACKED].tolist()).decode())
    fields.update(changes)
    return {**sd, PACKED: torch.tensor(list(json.dumps(fields).encode()), dtype=torch.uint8)}


def assert_unchanged(module, before_sd, x, before_out):
    after = module.state_dict()
    assert set(after) == set(before_sd)
    for key, value in after.items():
        assert torch.equal(value, before_sd[key]), key
    assert torch.equal(module(x), before_out)


def load_fails(sd, error, match):
    """Both loaders refuse `sd`, and load_state_dict leaves the target module as it was."""
    target = Linear4bit(96, 24)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    x = torch.randn(3, 96)
    out = target(x)
    with pytest.raises(error, match=match):
        target.load_state_dict(sd)
    assert_unchanged(target, before, x, out)
    with pytest.raises(error, match=match):
        Linear4bit.from_state_dict(sd)


def test_missing_nested_absmax_is_refused(seed):
    # the packed JSON still says double-quantized: decoding the uint8 codes as scales was off by ~4e3
    _, sd = layer_and_sd()
    load_fails({k: v for k, v in sd.items() if k != "weight.nested_absmax"}, ValueError, "weight.nested_absmax")
    # and with every nested key gone, the uint8 absmax alone still betrays it
    plain = {k: v for k, v in sd.items() if "nested" not in k}
    fields = {k: v for k, v in json.loads(bytes(sd[PACKED].tolist()).decode()).items() if "nested" not in k}
    plain[PACKED] = torch.tensor(list(json.dumps(fields).encode()), dtype=torch.uint8)
    load_fails(plain, ValueError, "weight.nested_absmax")


@pytest.mark.parametrize("blocksize", [32, 128, 48, 0])
def test_wrong_blocksize_is_refused(seed, blocksize):
    _, sd = layer_and_sd(nested=False)  # written with blocksize 64
    load_fails(edit_json(sd, blocksize=blocksize), ValueError, "weight.(absmax|blocksize)")


def test_quant_type_disagreeing_with_quant_map_is_refused(seed):
    _, sd = layer_and_sd(nested=False)
    load_fails(edit_json(sd, quant_type="fp4"), ValueError, "weight.quant_map")
    fp4 = quantize_4bit(torch.randn(4, 64), quant_type="fp4")[1].code
    load_fails({**sd, "weight.quant_map": fp4}, ValueError, "weight.quant_map")


@pytest.mark.parametrize("key", ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                                 "weight.nested_quant_map"])
def test_truncated_tensors_are_refused_at_load(seed, key):
    _, sd = layer_and_sd()
    load_fails({**sd, key: sd[key][:-1]}, ValueError, key.replace(".", r"\."))


def test_wrong_dtypes_and_corrupt_json_are_refused(seed):
    _, sd = layer_and_sd(nested=False)
    load_fails({**sd, "weight.absmax": sd["weight.absmax"].half()}, TypeError, "weight.absmax")
    load_fails({**sd, PACKED: sd[PACKED][:-3]}, ValueError, "bitsandbytes__nf4")
    load_fails(edit_json(sd, shape=[24, 96.5]), ValueError, "weight.shape")


def test_bias_of_the_wrong_shape_is_a_size_mismatch_and_loads_nothing(seed):
    _, sd = layer_and_sd(nested=False)
    bad = {**sd, "bias": torch.randn(1)}  # a (1,) bias used to be broadcast into every output silently
    target = Linear4bit(96, 24)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    x = torch.randn(3, 96)
    out = target(x)
    with pytest.raises(RuntimeError, match="size mismatch for bias"):
        target.load_state_dict(bad)
    assert_unchanged(target, before, x, out)
    with pytest.raises(ValueError, match="bias must be"):
        Linear4bit.from_state_dict(bad)


def test_good_checkpoint_still_loads_exactly(seed):
    source, sd = layer_and_sd()
    target = Linear4bit(96, 24)
    target.load_state_dict(sd)
    x = torch.randn(5, 96)
    assert torch.equal(target(x), source(x))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_input_is_a_type_error(dtype):
    layer = Linear4bit(32, 8)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        layer(torch.ones(2, 32, dtype=dtype))
    qlora = QLoRALinear(Linear4bit(32, 8), r=2)
    for merged in (False, True):
        if merged:
            qlora.merge()
        with pytest.raises(TypeError, match="x must be a floating-point tensor"):
            qlora(torch.ones(2, 32, dtype=dtype))
    with pytest.raises(ValueError, match="last dimension 32"):
        qlora(torch.ones(2, 31))


@pytest.mark.parametrize("value", [1, 0, "false", None])
def test_compress_statistics_must_be_a_bool(value):
    # a truthy non-bool ("false", 1) would silently pick double quantization
    from qlora_fast.models.hf import load_hf_model
    from qlora_fast.nn import replace_linear, wrap_linear

    model = torch.nn.Sequential(torch.nn.Linear(64, 8))
    calls = [lambda: quantize_4bit(torch.randn(4, 64), compress_statistics=value),
             lambda: Linear4bit(64, 8, compress_statistics=value),
             lambda: Linear4bit.from_linear(torch.nn.Linear(64, 8), compress_statistics=value),
             lambda: QLoRALinear.from_linear(torch.nn.Linear(64, 8), r=2, compress_statistics=value),
             lambda: wrap_linear(torch.nn.Linear(64, 8), compress_statistics=value),
             lambda: replace_linear(model, compress_statistics=value),
             lambda: load_hf_model("no-such-model-dir", quantize="nf4", compress_statistics=value)]
    for call in calls:
        with pytest.raises(TypeError, match="compress_statistics must be a bool"):
            call()
    assert type(model[0]) is torch.nn.Linear


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("nested", [True, False])
def test_non_finite_weights_are_refused(seed, bad, nested):
    w = torch.randn(16, 64)
    w[3, 5] = bad
    with pytest.raises(ValueError, match="x must be finite"):
        quantize_4bit(w, compress_statistics=nested)
    linear = torch.nn.Linear(64, 16)
    with torch.no_grad():
        linear.weight[0, 0] = bad
    with pytest.raises(ValueError, match="finite"):
        Linear4bit.from_linear(linear, compress_statistics=nested)


def test_outlier_warns_under_double_quantization_only(seed):
    w = torch.randn(64, 256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_4bit(w)  # ordinary weights: no warning
    w[10, 10] = w.abs().max() * 1e4
    with pytest.warns(UserWarning, match="median"):
        quantize_4bit(w, compress_statistics=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_4bit(w, compress_statistics=False)  # the outlier only costs its own block


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_largest_values_never_come_back_inf(seed, dtype):
    big = torch.finfo(dtype).max
    many = torch.randn(64, 64).to(dtype)
    many[:, 0] = big  # every block: the mean of the absmax overflows float32
    with pytest.raises(ValueError, match="compress_statistics=False"):
        quantize_4bit(many, compress_statistics=True)
    packed, state = quantize_4bit(many, compress_statistics=False)
    w = Linear4bit.from_quantized(packed, state).dequantize_weight()
    assert torch.isfinite(w).all() and w[:, 0].eq(big).all()
    one = torch.randn(64, 64).to(dtype)
    one[7, 7] = big
    with pytest.warns(UserWarning):  # an outlier, but it decodes to finite values
        packed, state = quantize_4bit(one, compress_statistics=True)
    assert torch.isfinite(Linear4bit.from_quantized(packed, state).dequantize_weight()).all()


def test_state_is_validated_once_and_again_after_a_change(seed):
    packed, state = quantize_4bit(torch.randn(24, 96))
    copy = QuantState.from_dict(state.as_dict())
    x = torch.randn(2, 96)
    first = matmul_4bit(x, packed, state)
    fields = state.weight_fields(packed)
    assert state.weight_fields(packed) is fields  # cached: not rebuilt per call
    state.absmax = state.absmax[:-1]  # setting a field drops the cache: checked again
    with pytest.raises(ValueError, match="absmax must have"):
        matmul_4bit(x, packed, state)
    with pytest.raises(ValueError, match="packed has"):
        matmul_4bit(x, packed[:-1], copy)
    assert torch.equal(matmul_4bit(x, packed, copy), first)
