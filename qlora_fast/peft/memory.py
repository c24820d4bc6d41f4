"""Bytes a model's weights take, as stored and as they would in bf16."""
from torch import nn


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def four_bit_weights(model: nn.Module) -> list:
    """(packed weight, QuantState) of every 4-bit weight of `model` (`Linear4bit`s and the 3-D
    weights of `Experts4bit`s), shared ones once."""
    from qlora_fast.nn.experts4bit import Experts4bit
    from qlora_fast.nn.linear4bit import Linear4bit

    found = {}
    for m in model.modules():
        if isinstance(m, Linear4bit):
            found.setdefault(id(m.weight), (m.weight, m.quant_state))
        elif isinstance(m, Experts4bit):
            for name, state in m.quant_states.items():
                if state is not None:
                    found.setdefault(id(m._parameters[name]), (m._parameters[name], state))
    return list(found.values())


def base_weight_bytes(model: nn.Module) -> dict:
    """Weight memory of `model`, shared tensors counted once:

    - "quantized": bytes of the 4-bit layers and fused experts (packed codes + per-block statistics; the 16- and
      256-entry code tables are constants shared in spirit and left out),
      "quantized_bf16": what the same layers take in bf16, "quantized_params": their weights;
    - "other": bytes of every other base parameter/buffer as stored, "other_bf16": in bf16;
    - "stored" / "bf16": the two totals; "adapter": bytes of the LoRA / prefix / prompt parameters.
    """
    from qlora_fast.nn.linear4bit import Linear4bit

    sizes = dict(quantized=0, quantized_bf16=0, quantized_params=0, other=0, other_bf16=0, adapter=0)
    seen = set()
    for weight, state in four_bit_weights(model):
        seen.add(id(weight))
        sizes["quantized"] += _tensor_bytes(weight) + state.statistics_bytes()
        sizes["quantized_bf16"] += 2 * state.numel
        sizes["quantized_params"] += state.numel
    for m in model.modules():
        if isinstance(m, Linear4bit) and m.bias is not None and id(m.bias) not in seen:
            seen.add(id(m.bias))
            sizes["quantized"] += _tensor_bytes(m.bias)
            sizes["quantized_bf16"] += 2 * m.bias.numel()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("lora_A", "lora_B") or name.startswith("prompt_encoder.") or ".prompt_encoder." in name:
            sizes["adapter"] += _tensor_bytes(t)
        elif "quant_state" not in name and "absmax" not in name and "quant_map" not in name:
            sizes["other"] += _tensor_bytes(t)
            sizes["other_bf16"] += 2 * t.numel()
    sizes["stored"] = sizes["quantized"] + sizes["other"]
    sizes["bf16"] = sizes["quantized_bf16"] + sizes["other_bf16"]
    return sizes
