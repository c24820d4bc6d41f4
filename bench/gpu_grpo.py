"""GRPO step on a 1B-parameter-class model (GPU): QLoRA with the reference as adapters-off vs bf16
LoRA with a separate reference copy.

UNVERIFIED: written without a GPU; no figure from it has been measured yet. `run(bench)` is called
by bench/gpu.py (`--areas grpo`; `--tiny` runs it on the CPU at toy size).

The model is built from a config (TinyLlama-1.1B shape: hidden 2048, 22 layers, 32 heads, 4 KV
heads, MLP 5632, vocabulary 32000), random weights, nothing downloaded. One GRPO step = sample
`PROMPTS x G` completions with the KV cache, reference log-probs, policy log-probs, the GRPO loss,
backward, optimizer step. Cases:

- `qlora_fast`: NF4 base (double-quantized), LoRA r=16 on every projection, reference = the same
  model with adapters disabled, chunked log-probs (no batch x length x vocab logits), paged 8-bit
  AdamW.
- `bf16 LoRA + ref copy` (the usual setup of other GRPO trainers): bf16 base + LoRA, a second bf16
  copy of the model as reference, full logits + log_softmax, torch AdamW.

Reported per case: median step time over a few steps (CUDA-synchronised wall clock: a step is
seconds long and includes sampling, so `do_bench`'s millisecond-scale repetition does not fit) and
peak allocated memory (torch.cuda.max_memory_allocated).
"""
import copy
import statistics
import time

import torch

PROMPTS, G, PROMPT_LEN, NEW_TOKENS = 4, 8, 128, 128
STEPS = 3
DEVICE = "cuda"
TINY = False  # set by run(): toy sizes on the CPU
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def one_b_config():
    from qlora_fast.models import LlamaConfig

    if TINY:
        return LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                           num_kv_heads=2, max_seq_len=PROMPT_LEN + NEW_TOKENS, tie_embeddings=False)
    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                       num_kv_heads=4, max_seq_len=PROMPT_LEN + NEW_TOKENS, tie_embeddings=False)


def _build(quantize):
    from qlora_fast.models import LlamaForCausalLM
    from qlora_fast.nn import replace_linear
    from qlora_fast.nn.lora import mark_only_lora_as_trainable

    torch.manual_seed(0)
    model = LlamaForCausalLM(one_b_config()).to(device=DEVICE, dtype=torch.bfloat16)
    reference = None if quantize else copy.deepcopy(model).eval().requires_grad_(False)
    replace_linear(model, quant_type="nf4" if quantize else None, target_modules=TARGETS, r=16, lora_alpha=32,
                   compute_dtype=torch.bfloat16)
    mark_only_lora_as_trainable(model)
    return model, reference


def _full_logprobs(model, ids, mask, n):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -n - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, -n:, None]).squeeze(-1)


def _step(model, reference, optimizer, quantize, generator):
    from qlora_fast.models.generate import generate
    from qlora_fast.nn import disable_adapter
    from qlora_fast.train.grpo import completion_logprobs
    from qlora_fast.train.policy_gradient import group_advantages, grpo_loss

    prompts = torch.randint(0, model.config.vocab_size, (PROMPTS, PROMPT_LEN), device=DEVICE, generator=generator)
    ids = prompts.repeat_interleave(G, 0)
    out = generate(model, ids, max_new_tokens=NEW_TOKENS, temperature=1.0, generator=generator)
    n = out.shape[1] - PROMPT_LEN
    mask = torch.ones_like(out)
    rewards = torch.rand(out.shape[0], device=DEVICE, generator=generator)  # scoring is not what we time
    adv = group_advantages(rewards, G)
    logprob = (lambda m: completion_logprobs(m, out, mask, n, chunk_size=1024)) if quantize else (
        lambda m: _full_logprobs(m, out, mask, n))
    with torch.no_grad():
        if quantize:
            with disable_adapter(model):
                ref = logprob(model)
        else:
            ref = logprob(reference)
    model.train()
    lp = logprob(model)
    loss, _ = grpo_loss(lp, lp.detach(), adv, mask[:, -n:].float(), ref_logprobs=ref, beta=0.04)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _case(quantize):
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, reference = _build(quantize)
    params = [p for p in model.parameters() if p.requires_grad]
    if quantize:
        from qlora_fast.optim import PagedAdamW8bit

        optimizer = PagedAdamW8bit(params, lr=1e-5)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-5)
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    times = []
    cuda = DEVICE == "cuda"
    for _ in range(STEPS):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        _step(model, reference, optimizer, quantize, generator)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    finite = all(torch.isfinite(p).all().item() for p in params)
    del model, reference, optimizer
    if cuda:
        torch.cuda.empty_cache()
    return statistics.median(times[1:] or times), peak, finite


def run(bench):
    global PROMPTS, G, PROMPT_LEN, NEW_TOKENS, STEPS, DEVICE, TINY
    DEVICE, TINY = bench.device.type, bench.tiny
    if bench.tiny:
        PROMPTS, G, PROMPT_LEN, NEW_TOKENS, STEPS = 1, 2, 5, 3, 1
    case = f"GRPO step, {PROMPTS} prompts x G={G}, prompt {PROMPT_LEN} + {NEW_TOKENS} new tokens"
    results = {}
    for name, quantize in (("qlora_fast (NF4 + LoRA, ref = adapters off, chunked log-probs, paged 8-bit)", True),
                           ("bf16 LoRA + separate ref copy, full logits, AdamW", False)):
        with bench.guard(f"{case} {name}"):
            step_s, peak_gib, finite = _case(quantize)
            results[quantize] = (step_s, peak_gib)
            bench.record(case, name, step_s=step_s, peak_gib=peak_gib)
            bench.check(f"{name}: adapters finite after the steps", finite)
    if len(results) == 2 and results[True][1]:
        (q_t, q_m), (b_t, b_m) = results[True], results[False]
        bench.log(f"  qlora_fast vs bf16+ref: memory {b_m / q_m:.2f}x less, time {q_t / b_t:.2f}x")
