"""Writes the GRPO task shipped with qlora_fast (run `python -m qlora_fast.data.grpo_build_data`
to rebuild; the output is deterministic).

Small-number arithmetic in the instruction set's own phrasing ("What is 12 + 7?"), so a model
instruction-tuned on `instructions_train.jsonl` already knows the format:

- `grpo_arithmetic_train.jsonl`: 400 sums and differences of numbers 0..29 (differences never
  negative), drawn from the pairs the instruction set trains on.
- `grpo_arithmetic_heldout.jsonl`: the pairs the instruction set never trains on, so held-out
  accuracy measures generalisation of both SFT and GRPO.

Each line: {"instruction": str, "answer": int}.
"""
import json
import os
import random

from qlora_fast.utils import atomic_write_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_OPERAND = 29
TRAIN_SIZE = 400


def all_problems():
    problems = []
    for a in range(MAX_OPERAND + 1):
        for b in range(MAX_OPERAND + 1):
            problems.append({"instruction": f"What is {a} + {b}?", "answer": a + b})
            if a >= b:
                problems.append({"instruction": f"What is {a} - {b}?", "answer": a - b})
    return problems


def sft_train_instructions():
    path = os.path.join(HERE, "instructions_train.jsonl")
    if not os.path.exists(path):
        return set()
    with open(path, encoding="utf-8") as f:
        return {json.loads(line)["instruction"] for line in f if line.strip()}


def _write(path, rows):
    atomic_write_bytes(path, "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8"))


def main():
    rng = random.Random(0)
    seen = sft_train_instructions()
    problems = all_problems()
    heldout = [p for p in problems if p["instruction"] not in seen]
    train_pool = [p for p in problems if p["instruction"] in seen]
    rng.shuffle(train_pool)
    rng.shuffle(heldout)
    _write(os.path.join(HERE, "grpo_arithmetic_train.jsonl"), train_pool[:TRAIN_SIZE])
    _write(os.path.join(HERE, "grpo_arithmetic_heldout.jsonl"), heldout)
    print(f"train {min(TRAIN_SIZE, len(train_pool))}, heldout {len(heldout)}")


if __name__ == "__main__":
    main()
