"""Tree-of-Thought rounds on a 1B-parameter-class model (GPU): all experts' proposals in one
batched `generate` call (what `BuiltinLM` does) vs one call per prompt.

UNVERIFIED: written without a GPU; no figure from it has been measured yet. `run(bench)` is called
by bench/gpu.py (`--areas reasoning`; `--tiny` runs it on the CPU at toy size).

The model is the built-in architecture in a TinyLlama-1.1B shape (hidden 2048, 22 layers, 32
heads, 4 KV heads, MLP 5632) with the byte tokenizer's vocabulary (259), random bf16 weights,
nothing downloaded. A round is 3 experts x a beam of 3 Game-of-24 propose prompts, 32 new tokens
each, greedy, no stop strings (every prompt decodes all tokens, so both providers do the same
work). Reported: median round time (CUDA-synchronised wall clock over a few rounds: a round is
many decode steps, too long for `do_bench`'s repetition) and generated tokens per second.
"""

import torch

NEW_TOKENS, ROUNDS = 32, 3


def _round_prompts():
    from qlora_fast.reasoning.game24 import Game24Task

    task = Game24Task()
    lines = [[], ["4 + 6 = 10 (left: 8 10 13)"], ["13 - 8 = 5 (left: 4 5 6)"]]
    return [task.propose_prompt("4 6 8 13", steps, [1] * len(steps), e) for steps in lines for e in (1, 2, 3)]


def run(bench):
    from qlora_fast.models import LlamaConfig, LlamaForCausalLM
    from qlora_fast.reasoning import BuiltinLM
    from qlora_fast.tokenizer import ByteTokenizer

    global NEW_TOKENS, ROUNDS
    config = LlamaConfig(vocab_size=259, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                         num_kv_heads=4, max_seq_len=512)
    if bench.tiny:
        NEW_TOKENS, ROUNDS = 2, 1
        config = LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                             num_kv_heads=2, max_seq_len=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=bench.device, dtype=torch.bfloat16).eval()
    llm = BuiltinLM(model, ByteTokenizer())
    prompts = _round_prompts()
    outputs = {}

    def batched():
        return llm.generate(prompts, max_new_tokens=NEW_TOKENS, temperature=0.0, stop=[])

    def one_at_a_time():
        return [llm.generate([p], max_new_tokens=NEW_TOKENS, temperature=0.0, stop=[])[0] for p in prompts]

    results = {}
    for name, fn in (("batched (1 call)", batched), (f"one prompt at a time ({len(prompts)} calls)", one_at_a_time)):
        outputs[name] = fn()  # warm-up, kept for the check
        results[name] = bench.wall(fn, ROUNDS)
        tokens = len(prompts) * NEW_TOKENS
        bench.record(f"tot round {len(prompts)} prompts x {NEW_TOKENS} tokens", name, ms=results[name] * 1e3,
                     tokens_per_s=tokens / results[name])
    names = list(results)
    bench.log(f"  speed-up of batching: x{results[names[1]] / results[names[0]]:.2f}")
    # greedy decoding: batching must not change what is generated (bf16 ties aside, so report, don't demand equality)
    same = sum(a == b for a, b in zip(*outputs.values()))
    bench.check("batched and one-at-a-time greedy outputs mostly agree", same >= len(prompts) // 2,
                f"{same} of {len(prompts)} identical")
