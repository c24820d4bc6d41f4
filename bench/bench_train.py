"""Training-step throughput on the CPU (tokens/s): LoRA vs QLoRA (NF4 base, double quantization)
vs full fine-tuning of the built-in model (BASE_CONFIG shape, random weights), each with the same
batch of shipped instruction pairs and the optimizer `qlora-fast finetune` uses (PagedAdamW8bit;
full fine-tuning also with torch AdamW as the peer).

`pytest bench/bench_train.py --benchmark-only` for pytest-benchmark tables;
`python bench/bench_train.py` for a summary with tokens/s and ratios to full fine-tuning.
"""

import pytest
import torch
from timing import median, run_times

from qlora_fast.data import PROMPT_TEMPLATE, load_instructions
from qlora_fast.models import BASE_CONFIG, LlamaForCausalLM
from qlora_fast.peft import LoraConfig, get_peft_model
from qlora_fast.tokenizer.base import ByteTokenizer
from qlora_fast.train.sft import build_examples, collate, make_optimizer

BATCH, MAX_LEN = 16, 96
PROVIDERS = ("full_torch_adamw", "full_paged_adamw_8bit", "lora", "qlora")


def setup(provider):
    """(step function, tokens per step) for one provider."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(BASE_CONFIG)
    if provider in ("lora", "qlora"):
        model = get_peft_model(model, LoraConfig(r=8, quantize_base="nf4" if provider == "qlora" else None))
        optimizer = make_optimizer("paged_adamw_8bit", [p for p in model.parameters() if p.requires_grad], 3e-3, 0.0)
    else:
        optimizer = make_optimizer(provider[len("full_"):], model.parameters(), 3e-3, 0.0)
    model.train()
    tok = ByteTokenizer()
    batch = collate(
        build_examples(tok, load_instructions("train")[:BATCH], PROMPT_TEMPLATE, MAX_LEN, False), tok.pad_id
    )
    tokens = int(batch["attention_mask"].sum())

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()

    return step, tokens


@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step(benchmark, provider):
    step, tokens = setup(provider)
    step()  # warm-up: optimizer state allocation
    benchmark.extra_info["tokens_per_step"] = tokens
    benchmark(step)


def main():
    results = {}
    for provider in PROVIDERS:
        step, tokens = setup(provider)
        results[provider] = tokens / median(run_times(step, 9))
    base = results["full_torch_adamw"]
    print(f"{'provider':24s} {'tokens/s':>10s} {'vs full (torch AdamW)':>22s}")
    for provider, tps in results.items():
        print(f"{provider:24s} {tps:10.0f} {tps / base:21.2f}x")


if __name__ == "__main__":
    main()
