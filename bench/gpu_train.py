"""The headline: one full QLoRA training step (forward, backward, optimizer) of a stack of
Llama-3-8B-shaped decoder layers, qlora_fast vs transformers + PEFT + bitsandbytes, `run(bench)`
for bench/gpu.py.

UNVERIFIED on a GPU: written without one; only the CPU rehearsal (`--tiny`) has run.

Shape: hidden 4096, MLP 14336, 32 heads, 8 KV heads, vocabulary 128256, rope theta 500000,
`LAYERS` decoder layers (env QLORA_FAST_TRAIN_LAYERS, default 4), one sequence of 2048 tokens, LoRA
r=16 (alpha 32) on all seven projections, NF4 double-quantized bases, bf16 compute. Both stacks start
from the same random weights (built once, copied by name: qlora_fast's module names are Hugging
Face's):
  qlora_fast: LlamaForCausalLM + replace_linear(nf4, r=16) + qlora_fast PagedAdamW8bit;
  peer: transformers LlamaForCausalLM (sdpa) with bitsandbytes Linear4bit bases + PEFT LoRA +
        bitsandbytes PagedAdamW8bit.
Reported: median step time, tokens/s and peak allocated memory over the steps (one stack alive at a
time), each stack's peak above its own baseline (taken after freeing our kernels' workspaces and
emptying the cache, before it is built). Goal: >= 2x the peer's tokens/s at no more memory. Checks:
before training (adapters at zero), our logits against an fp32 dense copy of the stack holding the
same dequantized weights (the peer's distance to it is reported beside: bit-compatible codes, so
the same reference); every loss finite. The reference is computed first, by qlora_fast's
plain-PyTorch reference backend, and the peer runs before ours: each in its own guard, so a
failure of one (ours included) leaves the other's figures and a missing reference skips only the
comparisons.
"""
import gc
import math
import os

import torch
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
R, ALPHA, LR = 16, 32, 1e-4
REL = 2e-2  # a bf16 stack against fp32 on the same weights: relative error of the logits well under this


def _shape(bench):
    layers = int(os.environ.get("QLORA_FAST_TRAIN_LAYERS", "4"))
    return bench.size(
        gpu=dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=layers, num_heads=32,
                 num_kv_heads=8, seq=2048, rope_theta=500000.0),
        tiny=dict(vocab_size=97, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2,
                  seq=24, rope_theta=500000.0))


def _ours(shape, state, device):
    from qlora_fast.models import LlamaConfig, LlamaForCausalLM
    from qlora_fast.nn import replace_linear
    from qlora_fast.optim import PagedAdamW8bit

    config = LlamaConfig(**{k: v for k, v in shape.items() if k != "seq"}, max_seq_len=shape["seq"])
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.load_state_dict(state)
    replace_linear(model, quant_type="nf4", target_modules=TARGETS, r=R, lora_alpha=ALPHA, compute_dtype=torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, PagedAdamW8bit(params, lr=LR)


def _peer(shape, state, device):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM as HFLlama

    config = HFConfig(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                      intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
                      num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
                      max_position_embeddings=shape["seq"], rope_theta=shape["rope_theta"], rms_norm_eps=1e-5,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    with torch.device(device):
        model = HFLlama(config).to(torch.bfloat16)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise RuntimeError(f"weights do not map onto transformers' Llama: missing {missing}, unexpected {unexpected}")
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    q = bnb.nn.Linear4bit(  # on meta: no fp32 weight built and initialized only to be replaced
                        child.in_features,
                        child.out_features,
                        bias=False,
                        compute_dtype=torch.bfloat16,
                        quant_type="nf4",
                        compress_statistics=True,
                        device="meta",
                    )
                    q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True)
                    setattr(parent, name, q.to(device))
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.0,
                                             task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, bnb.optim.PagedAdamW8bit(params, lr=LR)


def _fp32_logits(config, state, ids):
    """The last 16 positions' logits of a dense fp32 copy of the stack whose projections hold the
    NF4 (double-quantized, blocksize 64) round trip of `state`'s bf16 weights, decoded to bf16 as
    both stacks' 4-bit layers decode them (bitsandbytes' codes are bit-compatible with ours, so it
    is one reference for both). Computed with qlora_fast's plain-PyTorch reference backend (call it
    inside `bench.backend("reference")`), before and apart from either stack: a failure of ours
    cannot take the peer's comparison with it."""
    from qlora_fast.functional import dequantize_4bit, quantize_4bit
    from qlora_fast.models import LlamaForCausalLM

    weights = {}
    for k, v in state.items():
        if k.endswith(tuple(f".{t}.weight" for t in TARGETS)):
            packed, qstate = quantize_4bit(v.to(ids.device), 64, "nf4", True)
            v = dequantize_4bit(packed, qstate, torch.bfloat16)
            del packed, qstate
        weights[k] = v.to(ids.device, torch.float32)
    with torch.device(ids.device):
        dense = LlamaForCausalLM(config).float()
    dense.load_state_dict(weights)
    out = dense(input_ids=ids).logits[:, -16:].double().cpu()
    del dense, weights
    return out


def _baseline(bench):
    """Allocated bytes once everything but the inputs is freed: our kernels' reused workspaces
    (kernels/nf4_matmul.py) dropped and the caches emptied, the peak counter reset. Each stack's
    peak is measured from its own baseline, so neither is charged with what the other left."""
    from qlora_fast.kernels.nf4_matmul import release_workspaces

    gc.collect()
    release_workspaces()
    if bench.device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


PEER = "transformers + PEFT + bitsandbytes (paged AdamW 8-bit)"


def run(bench):
    from qlora_fast.models import LlamaConfig, LlamaForCausalLM

    shape = _shape(bench)
    torch.manual_seed(0)
    config = LlamaConfig(**{k: v for k, v in shape.items() if k != "seq"}, max_seq_len=shape["seq"])
    with torch.device(bench.device):
        init = LlamaForCausalLM(config).to(torch.bfloat16)
    state = {k: v.detach().cpu() for k, v in init.state_dict().items()}
    del init
    ids = torch.randint(0, shape["vocab_size"], (1, shape["seq"]), device=bench.device)
    case = (f"QLoRA train step, {shape['num_layers']} Llama-3-8B-shaped layers (h{shape['hidden_size']}), "
            f"seq {shape['seq']}, r={R} on all projections")
    bench.log(f"  {case}")
    truth = None
    with bench.guard(f"{case} fp32 reference"), bench.backend("reference"), torch.no_grad():
        truth = _fp32_logits(config, state, ids)
    results = {}
    # the peer first: a fault of ours (a CUDA error poisons the process) cannot cost its figure
    for name, build in ((PEER, _peer), ("qlora_fast", _ours)):
        _provider(bench, case, name, build, shape, state, ids, truth, results)
    ours, peer = results.get("qlora_fast"), results.get(PEER)
    if ours and peer:
        memory = f"; peak memory {ours[1]:.2f} vs {peer[1]:.2f} GiB" if ours[1] is not None else ""
        bench.log(f"  qlora_fast tokens/s = {peer[0] / ours[0]:.2f}x the peer's (goal >= 2x){memory} (goal: no more)")
        bench.record(case, "qlora_fast vs peer", speedup=peer[0] / ours[0],
                     memory_ratio=(ours[1] / peer[1]) if ours[1] else None)


def _provider(bench, case, name, build, shape, state, ids, truth, results):
    """Build one stack, compare its untrained logits with the reference (when there is one), time
    its steps and record them; any failure is recorded (the area fails) and the next one still runs."""
    tokens = ids.numel()
    base = _baseline(bench)
    model = opt = None
    with bench.guard(f"{case} {name}"):
        model, opt = build(shape, state, bench.device)
        model.train()
        losses = []

        def step():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach().float().item())

        with bench.guard(f"{case} {name} logits vs fp32"):
            if truth is None:
                bench.log(f"  {name} logits vs fp32: skipped (no reference: it failed above)")
            else:
                with torch.no_grad():  # untrained (adapters at zero): both compute the dequantized stack
                    got = model(input_ids=ids).logits[:, -16:].double().cpu()
                err = ((got - truth).norm() / truth.norm()).item()
                if name == "qlora_fast":
                    bench.check("qlora_fast logits vs fp32 on the same dequantized weights", err <= REL,
                                f"rel err {err:.2e} (<= {REL:g})")
                else:  # a peer's precision is a figure, not our failure (bitsandbytes' CPU path is ~4e-2 here)
                    bench.record(case, name, logits_rel_err_vs_fp32=err)
        if bench.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()  # the peak of the steps (the model is still counted)
        seconds = bench.wall(step, steps=bench.size(gpu=3, tiny=1))
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if bench.device.type == "cuda" else None
        results[name] = (seconds, peak, losses[0])
        bench.record(case, name, step_s=seconds, tokens_per_s=tokens / seconds, peak_gib=peak,
                     first_loss=losses[0], last_loss=losses[-1])
        bench.check(f"{name}: every loss finite", all(math.isfinite(v) for v in losses), f"losses {losses}")
    model = opt = step = None  # free them (the step closure names them)
    gc.collect()
