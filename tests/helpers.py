"""Helpers shared by several test modules (fixtures live in conftest.py); test modules import
these, never each other."""
import pytest
import torch
from conftest import assert_close

from qlora_fast.functional import quantize_4bit
from qlora_fast.models import LlamaConfig, LlamaForCausalLM
from qlora_fast.nn import replace_linear
from qlora_fast.nn.lora import mark_only_lora_as_trainable

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ------------------------------------------------------------------ 4-bit weights judged in float64
# (test_nf4_matmul, test_decode_kernels, test_lora_kernels, test_lora_modules)

def quantize(weight, quant_type="nf4", nested=True, blocksize=64):
    """(packed, QuantState) from qlora_fast's quantizer."""
    return quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)


def oracle_dequantize(packed, state):
    """bitsandbytes' fp32 decode of exactly these tensors, through a flat (numel,) state: its CPU
    backend decodes a 2-D state wrongly when in_features is a multiple of 32 but not of the blocksize
    (seen with 0.50.2 on (16, 96) at blocksize 64: errors ~6 against code * absmax by hand)."""
    bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes (test extra) is the oracle")
    state2 = None
    if state.nested:
        state2 = bnb_functional.QuantState(absmax=state.nested_absmax.cpu(), code=state.nested_code.cpu(),
                                           blocksize=state.nested_blocksize, dtype=torch.float32)
    flat = bnb_functional.QuantState(
        absmax=state.absmax.cpu(), shape=torch.Size([state.shape[0] * state.shape[1]]), code=state.code.cpu(),
        blocksize=state.blocksize, quant_type=state.quant_type, dtype=torch.float32,
        offset=None if state.offset is None else state.offset.cpu(), state2=state2)
    return bnb_functional.dequantize_4bit(packed.cpu(), flat).reshape(tuple(state.shape)).to(packed.device)


def weight4bit(packed, state):
    """The kernels' `Weight4bit` of a quantized weight."""
    from qlora_fast.kernels import nf4_matmul as knf4

    return knf4.Weight4bit(packed, state.absmax, state.code, tuple(state.shape), state.blocksize,
                           state.nested_absmax, state.nested_code, state.offset, state.nested_blocksize)


def assert_matches_float64(out, ref64, out_torch, abs_sum=None, msg=""):
    """|out - ref64| <= 2 * max|out_torch - ref64| + one ulp of out's dtype at max|ref64|
    (+ fp32 accumulation in another order: eps32 * sqrt(K) * max sum_k |a_k b_k|, given as
    `abs_sum` = (max of |A| @ |B|, K) when the kernel sums in a different order than torch)."""
    torch_err = (out_torch.double() - ref64).abs().max().item()
    ulp = torch.finfo(out.dtype).eps * ref64.abs().max().item()
    order = 0.0
    if abs_sum is not None:
        order = torch.finfo(torch.float32).eps * abs_sum[1] ** 0.5 * abs_sum[0]
    assert out.dtype == out_torch.dtype, f"{msg} dtype {out.dtype} != {out_torch.dtype}"
    assert_close(out, ref64, atol=2 * torch_err + ulp + order, msg=msg)


def abs_sum(a, b):
    """(max of |a| @ |b|, inner dimension) for `assert_matches_float64`."""
    return (a.double().abs() @ b.double().abs()).max().item(), a.shape[-1]


# ------------------------------------------------------------------ tiny built-in models with adapters
# (test_grpo_trainer, test_ppo)

ADAPTER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_base(seed=0, hidden=32, layers=1, head_std=1.0):
    """A random built-in model. The output layer is re-drawn with std head_std / sqrt(hidden)
    (instead of 0.02) so that the frozen head can express preferences the adapters steer."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=259, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=layers,
                         num_heads=4, num_kv_heads=2, max_seq_len=128)
    model = LlamaForCausalLM(config)
    torch.nn.init.normal_(model.lm_head.weight, std=head_std / hidden**0.5)
    return model


def add_adapters(model, quantize=False, r=8, alpha=16, dropout=0.0):
    """LoRA (or QLoRA: NF4 base) on every attention and MLP projection; only adapters train."""
    replace_linear(model, quant_type="nf4" if quantize else None, target_modules=ADAPTER_TARGETS, r=r, lora_alpha=alpha,
                   lora_dropout=dropout)
    return mark_only_lora_as_trainable(model)


def trainable(model):
    """name -> a copy of each trainable parameter."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------ tokenizers


def corpus_hf_tokenizer(vocab_size: int = 300):
    """A byte-level BPE `transformers.PreTrainedTokenizerFast` trained on the shipped corpus, with
    an `<eos>` special: the tokenizer of the tiny Hugging Face models the tests save to disk."""
    import tokenizers
    import transformers

    from qlora_fast.data import load_corpus

    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([load_corpus()], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")


def dead_pid() -> int:
    """The pid of a process that has exited (for temporaries left by a killed writer)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
