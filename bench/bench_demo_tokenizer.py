"""Which tokenizer should the built-in base model use? Pretrains it with each tokenizer (the demo's
recipe and shape), tunes it exactly as `qlora-fast finetune` does by default (QLoRA r=8 on every
projection, 200 steps, paged 8-bit AdamW) and prints held-out exact match per task.

    python bench/bench_demo_tokenizer.py                       # bytes and BPE 320/384/512, seed 0
    python bench/bench_demo_tokenizer.py --tokenizers byte bpe384 --seeds 0 1

About three minutes per row on one core (`--threads`). Results: bench/RESULTS.md.
"""
import argparse
import collections
import time
from dataclasses import replace

import torch


def run_one(name: str, seed: int, steps: int) -> str:
    from qlora_fast.data import PROMPT_TEMPLATE, load_corpus, load_instructions
    from qlora_fast.models.llama import LlamaForCausalLM
    from qlora_fast.models.pretrained import BASE_CONFIG, PretrainRecipe, pretrain
    from qlora_fast.peft import LoraConfig, get_peft_model
    from qlora_fast.tokenizer import BPETokenizer, ByteTokenizer
    from qlora_fast.train.sft import SFTConfig, SFTTrainer, exact_match

    started = time.time()
    corpus = load_corpus()
    tok = (
        ByteTokenizer()
        if name == "byte"
        else BPETokenizer.train([corpus], int(name[3:]), pattern="cl100k", progress=False)
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(replace(BASE_CONFIG, vocab_size=tok.vocab_size))
    pretrain(model, torch.tensor(tok.encode(corpus)), PretrainRecipe(seed=seed), progress=False)
    torch.manual_seed(seed)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = get_peft_model(model, LoraConfig(target_modules=targets, r=8, lora_alpha=16.0, quantize_base="nf4"))
    held = load_instructions("heldout")[:160]
    config = SFTConfig(max_steps=steps, batch_size=16, lr=5e-3, warmup_steps=15, max_seq_len=96,
                       optimizer="paged_adamw_8bit", progress=False, seed=seed)
    SFTTrainer(peft, tok, load_instructions("train"), None, config).train()
    score, predictions = exact_match(peft, tok, held, PROMPT_TEMPLATE, max_new_tokens=12, return_predictions=True)
    per_task = collections.Counter()
    for pair, prediction in zip(held, predictions):
        per_task[pair["task"]] += prediction == pair["output"]
    tasks = " ".join(f"{t} {n}" for t, n in sorted(per_task.items()) if n)
    bytes_per_token = len(corpus.encode()) / len(tok.encode(corpus))
    return (f"| {name:7} | {seed} | {bytes_per_token:.2f} | {100 * score:5.1f}% | {tasks} | "
            f"{time.time() - started:.0f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--tokenizers", nargs="+", default=["byte", "bpe320", "bpe384", "bpe512"],
                        help="'byte' or 'bpe<vocab size>' (trained on the shipped corpus, cl100k pattern)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="pretraining and tuning seeds")
    parser.add_argument("--sft-steps", type=int, default=200, help="instruction-tuning steps (the demo's default)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    for name in args.tokenizers:
        if name != "byte" and not (name.startswith("bpe") and name[3:].isdigit()):
            parser.error(f"--tokenizers takes 'byte' or 'bpe<vocab size>', got {name!r}")
    torch.set_num_threads(args.threads)
    print("| tokenizer | seed | corpus bytes/token | held-out exact match (160) | correct per task | time |")
    print("|---|---:|---:|---:|---|---:|")
    for name in args.tokenizers:
        for seed in args.seeds:
            print(run_one(name, seed, args.sft_steps), flush=True)


if __name__ == "__main__":
    main()
