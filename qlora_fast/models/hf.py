"""Loading a local Hugging Face causal LM directory (no downloads) with its tokenizer behind the
qlora_fast `Tokenizer` interface."""
import ctypes
import json
import os
import re

import torch
from torch import nn

from qlora_fast.tokenizer.hf import HFTokenizer  # defined here before issue 17: still importable from here


def load_hf_model(directory: str, device=None, dtype=None, quantize=None, blocksize: int = 64,
                  compress_statistics: bool = True, tokenizer: bool = True):
    """(model, tokenizer) from a local transformers model directory (config + weights +
    tokenizer files; `tokenizer=False` returns (model, None)).

    quantize: None, or "nf4"/"fp4" to store every linear layer but the output layer in 4 bits as
    our `Linear4bit`, and fused MoE experts as `Experts4bit` (blocksize, compress_statistics as
    `quantize_4bit`; experts that cannot be quantized stay in full precision with a warning, see
    `replace_linear`), quantized one tensor at a
    time as the safetensors shards are read: the peak memory is about the 4-bit model plus one
    layer, never the full-precision model (checkpoints whose tensors transformers must build from
    several, such as Mixtral's per-expert weights, and .bin checkpoints are loaded whole, then
    quantized). `dtype` (default: the checkpoint's) is that of the
    layers kept in full precision and the 4-bit layers' compute dtype.
    A bitsandbytes 4-bit checkpoint (`quantization_config` with `load_in_4bit`
    in config.json, as saved by transformers) loads with its layers as our `Linear4bit`, the same
    bytes (no requantization); `dtype` then applies to the layers kept in full precision.
    Raises FileNotFoundError when `directory` is not a model directory, ValueError for a checkpoint
    quantized in another format (8-bit, GPTQ, AWQ, ...)."""
    from qlora_fast.quant_state import check_compress_statistics

    check_compress_statistics(compress_statistics)
    dtype = _torch_dtype(dtype)
    config_file = os.path.join(directory, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{directory} is not a Hugging Face model directory (no config.json)")
    try:
        with open(config_file) as f:
            quantization = json.load(f).get("quantization_config")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{config_file} is not a valid JSON config ({e})") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(local_files_only=True, dtype=dtype or "auto")
    if quantize is not None and not quantization:
        model = _load_quantized(directory, dtype, quantize, blocksize, compress_statistics)
    elif quantization:
        method = quantization.get("quant_method")
        if method != "bitsandbytes" or not quantization.get("load_in_4bit"):
            raise ValueError(
                f"{directory} holds a model already quantized ({method}, "
                f"{'8-bit' if quantization.get('load_in_8bit') else quantization.get('bits', '?')}); only "
                "full-precision and "
                "bitsandbytes 4-bit (nf4/fp4) checkpoints can be loaded"
            )
        kwargs["device_map"] = "cpu"  # bitsandbytes' loader places the packed bytes
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
        from qlora_fast.nn.replace import adopt_bnb_4bit

        adopt_bnb_4bit(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    if tokenizer:
        tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(directory, local_files_only=True))
    if device is not None:
        model = model.to(device)
    return model.eval(), (tokenizer or None)


def _safetensors_files(directory: str):
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return [os.path.join(directory, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(
        f"{directory} has no model.safetensors (or index); low-memory 4-bit loading reads safetensors only"
    )


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _safetensors_header(f, file: str):
    """(entries sorted by offset, data start) of an open safetensors file."""
    try:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        entries = sorted(
            ((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0]
        )
    except (ValueError, KeyError, TypeError, OverflowError, MemoryError, AttributeError) as e:
        raise ValueError(f"{file} is not a readable safetensors file ({e})") from None
    return entries, f.tell()


def _safetensors_keys(file: str):
    with open(file, "rb") as f:
        return [name for name, _ in _safetensors_header(f, file)[0]]


def _read_safetensors(file: str):
    """(name, tensor) of a safetensors file one at a time, each read into its own memory (no
    memory map: its pages would stay resident until the whole file is closed)."""
    with open(file, "rb") as f:
        entries, start = _safetensors_header(f, file)
        for name, info in entries:
            dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise ValueError(f"{file}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
            tensor = torch.empty(info["shape"], dtype=dtype)
            begin, end = info["data_offsets"]
            raw = tensor.reshape(-1).view(torch.uint8).numpy()
            f.seek(start + begin)
            if end - begin != raw.nbytes or f.readinto(memoryview(raw)) != raw.nbytes:
                raise ValueError(f"{file}: tensor {name} is truncated or its size disagrees with its shape")
            yield name, tensor


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the system (glibc keeps the full-precision tensors just
    quantized otherwise, and the peak would grow shard by shard)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rebuild_buffers(model: nn.Module) -> bool:
    """Buffers the checkpoint does not hold (rotary frequencies, Gemma's embed_scale: computed, not
    saved) made again for real after a load on the meta device; False where one cannot be."""
    from transformers import PreTrainedModel

    for name, module in list(model.named_modules()):
        unsaved = [k for k, b in module._buffers.items() if b is not None and b.is_meta]
        if not unsaved:
            continue
        if not any(p is not None for p in module._parameters.values()):
            try:  # a rotary embedding: built again from the config, as before transformers 5
                fresh = type(module)(config=getattr(module, "config", model.config))
            except Exception:
                return False
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, fresh)
            continue
        # As from_pretrained does: the model's own _init_weights sets the buffers, and leaves the
        # tensors marked as loaded alone. NaN placeholders show a buffer it did not set.
        owner, parts = model, name.split(".")
        for i in range(1, len(parts)):  # the innermost model holding the module: composite models init by part
            if isinstance(m := model.get_submodule(".".join(parts[:i])), PreTrainedModel):
                owner = m
        if not all(module._buffers[k].is_floating_point() for k in unsaved):
            return False
        for k in unsaved:
            module._buffers[k] = torch.full_like(module._buffers[k], float("nan"), device="cpu")
        tensors = {**module._parameters, **module._buffers}
        loaded = [t for k, t in tensors.items() if t is not None and k not in unsaved]
        for t in loaded:
            t._is_hf_initialized = True
        try:
            owner._init_weights(module)
        except Exception:
            return False
        finally:
            for t in loaded:
                del t._is_hf_initialized
        if any(module._buffers[k].isnan().any() for k in unsaved):
            return False
    return True


def _torch_dtype(dtype):
    """`dtype` as transformers takes it (a torch.dtype, its name, or "auto" = the checkpoint's) as a
    torch floating dtype or None."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, its name or 'auto', got {dtype!r}")
    return dtype


def _ignored_on_load(model):
    """Patterns of checkpoint keys transformers drops silently for this model (old checkpoints'
    per-layer rotary_emb.inv_freq and position_ids buffers, the model's own ignore list)."""
    patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    buffers = [name for name, _ in model.named_buffers()]
    if any(name.endswith("rotary_emb.inv_freq") for name in buffers):
        patterns.add(r"rotary_emb\.inv_freq")
    if any(name.endswith("position_ids") for name in buffers):
        patterns.add(r"(^|\.)position_ids$")
    return [re.compile(p) for p in patterns]


def _checkpoint_renamer(model):
    """key -> (the name transformers gives a checkpoint key for `model`, whether the tensor needs
    more than a rename): transformers >= 5 renames old names at load time (GPT-NeoX's embed_out is
    lm_head, Mixtral's block_sparse_moe is mlp); its own mapping, applied as from_pretrained does."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers < 5 takes the keys as they are
        return lambda key: (key, False)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    state = model.state_dict()

    def rename(key):
        new, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, state)
        return new, converter is not None

    return rename


def _load_then_quantize(directory, dtype, quant_type, blocksize, compress_statistics, why):
    """from_pretrained, then every linear layer but the output layer to 4 bits: the full-precision
    model is in memory once, for checkpoints the low-memory path cannot read as transformers does
    (said with a warning: on a large model that is the difference between fitting and not)."""
    import warnings

    from transformers import AutoModelForCausalLM

    warnings.warn(f"{directory}: {why}; loading it whole with from_pretrained, then quantizing (the full-precision "
                  "model is in memory once)", UserWarning, stacklevel=3)

    from qlora_fast.nn.replace import replace_linear

    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=dtype or "auto")
    output = model.get_output_embeddings()
    skip = [n for n, m in model.named_modules() if m is output] or ["lm_head"]
    return replace_linear(model, quant_type=quant_type, skip=skip, blocksize=blocksize,
                          compress_statistics=compress_statistics, compute_dtype=dtype)


@torch.no_grad()
def _load_quantized(directory, dtype, quant_type, blocksize, compress_statistics):
    """A transformers causal LM whose linear layers (but the output layer) are quantized to 4 bits
    tensor by tensor while the checkpoint's safetensors are read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora_fast.functional.quant import quantize_4bit
    from qlora_fast.nn.experts4bit import EXPERT_WEIGHTS, Experts4bit
    from qlora_fast.nn.linear4bit import Linear4bit
    from qlora_fast.nn.replace import _experts_plan, _matches, is_conv1d, keep_in_fp32_modules, linear_layer_names

    try:
        files = _safetensors_files(directory)
    except FileNotFoundError:
        return _load_then_quantize(directory, dtype, quant_type, blocksize, compress_statistics,
                                   "a .bin checkpoint cannot be read tensor by tensor")
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    with torch.device("meta"):  # no memory and no init for the full-precision model
        model = AutoModelForCausalLM.from_config(config)
    rename = _checkpoint_renamer(model)
    if any(rename(key)[1] for file in files for key in _safetensors_keys(file)):
        return _load_then_quantize(directory, dtype, quant_type, blocksize, compress_statistics,
                                   "transformers builds some of its tensors from several (e.g. Mixtral's fused "
                                   "experts), which are not read one by one")
    keep_fp32 = keep_in_fp32_modules(model)  # left in full precision, as replace_linear leaves them
    targets = {n for n in linear_layer_names(model) if not _matches(n, keep_fp32)}  # without the output layer
    # fused experts become Experts4bit now (weights still on meta, checked before any tensor is read);
    # each 3-D weight is quantized as it is read
    for name, experts in _experts_plan(model, keep_fp32, quant_type, blocksize, compress_statistics, None):
        model.set_submodule(name, experts)
    expected = set(model.state_dict())
    ignored = _ignored_on_load(model)
    for file in files:
        for key, tensor in _read_safetensors(file):
            key = rename(key)[0]
            module_name, _, attr = key.rpartition(".")
            if key not in expected and any(p.search(key) for p in ignored):
                continue  # as transformers' from_pretrained does
            if key not in expected:
                raise ValueError(f"{file}: tensor {key} does not belong to {type(model).__name__}")
            module = model.get_submodule(module_name)
            if isinstance(module, Experts4bit) and attr in EXPERT_WEIGHTS:
                module.compute_dtype = dtype or tensor.dtype  # as a Linear4bit's below
                module.quantize_weight_(attr, tensor)
                del tensor
            elif module_name in targets and attr == "weight":
                weight = tensor.t() if is_conv1d(module) else tensor  # Conv1D stores (in, out)
                packed, state = quantize_4bit(weight.contiguous(), blocksize, quant_type, compress_statistics)
                # the bias (loaded already, or still on meta until its key comes) moves over
                layer = Linear4bit.from_quantized(packed, state, module.bias, compute_dtype=dtype or weight.dtype)
                if is_conv1d(module):
                    layer.conv1d_class = type(module)
                parent_name, _, child = module_name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
                del tensor, weight
            elif attr in module._parameters:
                module._parameters[attr] = nn.Parameter(tensor.to(dtype or tensor.dtype), requires_grad=False)
            else:
                module._buffers[attr] = tensor.to(dtype or tensor.dtype) if tensor.is_floating_point() else tensor
        _release_freed_memory()
    model.tie_weights()
    if not _rebuild_buffers(model):
        del model
        return _load_then_quantize(directory, dtype, quant_type, blocksize, compress_statistics,
                                   "a buffer the checkpoint does not hold could not be rebuilt")
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ValueError(f"{directory}: the checkpoint lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model
