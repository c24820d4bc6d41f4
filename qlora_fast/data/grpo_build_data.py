"""Writes the GRPO task shipped with qlora_fast (run `python -m qlora_fast.data.grpo_build_data`
to rebuild; the output is deterministic).

The task: one more / one less than a three-digit number, in the instruction set's own phrasing
("What is 347 + 1?", "What is 347 - 1?"), for every n in 100..999 whose last digit is 1..8 (no
carry or borrow: the answer copies n and moves its last digit by one, a skill shared by every
problem, which the tiny model computes for numbers it never saw). 1,440 problems, shuffled once:

- `grpo_arithmetic_heldout.jsonl`: 300 problems that neither the warm-start SFT nor GRPO ever
  trains on: held-out accuracy measures what the policy learned, not what it memorised.
- `grpo_arithmetic_train.jsonl`: the other 1,140, for the warm-start SFT and for GRPO.

Each line: {"instruction": str, "answer": int, "demo": int}. `demo` is the answer of an imperfect
teacher that the warm-start SFT imitates: a PLANTED SYSTEMATIC ERROR. On `TEACHER_ERROR` = 60% of
the training problems the teacher forgets to do the step and repeats the number (answers 347 to
"What is 347 + 1?"), as a child who forgets the "+ 1" would. The SFT'd policy then samples the
right answer less than half the time and greedy decoding mostly follows the error: GRPO's
correctness reward (against `answer`, never `demo`) has one shared preference to move (do the
step), and held-out accuracy shows whether it moved (the standard "SFT on noisy demonstrations,
then RL with a verifier" story).
The held-out split's `demo` is the correct answer (it is never trained on).
"""
import json
import os
import random

from qlora_fast.utils import atomic_write_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
HELDOUT_SIZE = 300
TEACHER_ERROR = 0.6  # share of training demonstrations that repeat the number instead of answering


def all_problems():
    problems = []
    for n in range(100, 1000):
        if n % 10 in (0, 9):  # keep off carries and borrows: the last digit moves by one, the rest is copied
            continue
        problems.append({"instruction": f"What is {n} + 1?", "answer": n + 1, "wrong": n})
        problems.append({"instruction": f"What is {n} - 1?", "answer": n - 1, "wrong": n})
    return problems


def _write(path, rows):
    atomic_write_bytes(path, "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8"))


def main():
    problems = all_problems()
    rng = random.Random(0)
    rng.shuffle(problems)
    heldout, train = problems[:HELDOUT_SIZE], problems[HELDOUT_SIZE:]
    # Exactly round(60%) of the training demonstrations carry the error, on randomly chosen problems.
    wrong = set(rng.sample(range(len(train)), round(TEACHER_ERROR * len(train))))
    train = [{"instruction": p["instruction"], "answer": p["answer"], "demo": p["wrong"] if i in wrong else p["answer"]}
             for i, p in enumerate(train)]
    heldout = [{"instruction": p["instruction"], "answer": p["answer"], "demo": p["answer"]} for p in heldout]
    _write(os.path.join(HERE, "grpo_arithmetic_train.jsonl"), train)
    _write(os.path.join(HERE, "grpo_arithmetic_heldout.jsonl"), heldout)
    print(f"train {len(train)} ({len(wrong)} demonstrations repeat the number), heldout {len(heldout)}")


if __name__ == "__main__":
    main()
