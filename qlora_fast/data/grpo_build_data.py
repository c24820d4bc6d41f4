"""Writes the GRPO task shipped with qlora_fast (run `python -m qlora_fast.data.grpo_build_data`
to rebuild; the output is deterministic).

Small-number arithmetic in the instruction set's own phrasing ("What is 12 + 7?"): every sum
a + b and every non-negative difference a - b of numbers 0..29 (1,365 problems, all of them
stated in prose in the pretraining corpus, "12 plus 7 is 19."), shuffled once and split:

- `grpo_arithmetic_heldout.jsonl`: 300 problems that neither the warm-start SFT nor GRPO ever
  trains on: held-out accuracy measures what the policy learned, not what it memorised.
- `grpo_arithmetic_train.jsonl`: the other 1,065, for the warm-start SFT and for GRPO.

Each line: {"instruction": str, "answer": int}.
"""
import json
import os
import random

from qlora_fast.utils import atomic_write_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_OPERAND = 29
HELDOUT_SIZE = 300


def all_problems():
    problems = []
    for a in range(MAX_OPERAND + 1):
        for b in range(MAX_OPERAND + 1):
            problems.append({"instruction": f"What is {a} + {b}?", "answer": a + b})
            if a >= b:
                problems.append({"instruction": f"What is {a} - {b}?", "answer": a - b})
    return problems


def _write(path, rows):
    atomic_write_bytes(path, "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8"))


def main():
    problems = all_problems()
    random.Random(0).shuffle(problems)
    heldout, train = problems[:HELDOUT_SIZE], problems[HELDOUT_SIZE:]
    _write(os.path.join(HERE, "grpo_arithmetic_train.jsonl"), train)
    _write(os.path.join(HERE, "grpo_arithmetic_heldout.jsonl"), heldout)
    print(f"train {len(train)}, heldout {len(heldout)}")


if __name__ == "__main__":
    main()
