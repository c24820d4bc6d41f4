"""The verifiable task shipped for GRPO (one more / one less than a three-digit number, "What is
347 + 1?") and its reward functions. The warm-start SFT imitates an imperfect teacher that repeats
the number instead of answering on 60% of its demonstrations (a planted systematic error,
`qlora_fast.data.grpo_build_data`); the correctness reward always checks the true answer.

A reward function takes the prompts, the completions (decoded text, one per sampled sequence)
and, as keyword lists aligned with them, every other field of the dataset rows (here `answer`)
plus `stopped` (whether each completion ended with a stop token), and returns one float per
completion (so it should accept **kwargs for fields it does not use):

    def reward(prompts: list[str], completions: list[str], **fields) -> list[float]

`GRPOTrainer` calls each function once per batch and sums them with the configured weights.
"""
import json
import os
import re
from typing import Dict, List, Optional

from qlora_fast.data import DATA_DIR

SPLITS = ("train", "heldout")
# Weights for (correctness, format): the right answer counts most, the answer format a little.
DEFAULT_WEIGHTS = (1.0, 0.2)

_INTEGER = re.compile(r"-?\d+")


def load_arithmetic_task(split: str = "train", limit: Optional[int] = None) -> List[Dict]:
    """Rows of the shipped arithmetic task: {"prompt", "instruction", "answer", "demo"} (`demo`: the
    imperfect teacher's answer that the warm-start SFT imitates; the rewards check `answer`).

    `prompt` is the instruction in the instruction set's template (`qlora_fast.data.format_prompt`),
    so a model tuned by the SFT demo already knows the format. `limit` keeps the first rows only.
    """
    from qlora_fast.data import format_prompt

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    with open(os.path.join(DATA_DIR, f"grpo_arithmetic_{split}.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = rows[:limit] if limit is not None else rows
    return [{"prompt": format_prompt(r["instruction"]), "instruction": r["instruction"], "answer": int(r["answer"]),
             "demo": int(r["demo"])} for r in rows]


ANSWER_END = "."  # the warm-start SFT ends each answer with it; GRPO stops sampling there


def warmstart_pairs(split: str = "train") -> List[Dict[str, str]]:
    """SFT pairs {"instruction", "output"} of the task, each output the teacher's answer (`demo`:
    on 60% of the training problems it repeats the number, the planted error GRPO has to undo) and
    a full stop (`ANSWER_END`: the corpus says "12 plus 7 is 19.", so the base model already ends
    a number that way; teaching it a newline or the never-pretrained <eos> instead takes far longer)."""
    rows = load_arithmetic_task(split)
    return [{"instruction": r["instruction"], "output": f"{r['demo']}{ANSWER_END}"} for r in rows]


def answer_stop_ids(tokenizer) -> List[int]:
    """Every token whose text starts with `ANSWER_END` (the BPE also has ".\n"): sampling stops
    there, and the answer is what came before."""
    return [
        i for i in range(tokenizer.vocab_size) if i != tokenizer.eos_id and tokenizer.decode([i]).startswith(ANSWER_END)
    ]


def answer_line(completion: str) -> str:
    """The part of a completion that counts as the answer: its first line, stripped."""
    return completion.split("\n", 1)[0].strip()


def parse_answer(completion: str) -> Optional[int]:
    """The integer the completion answers with, or None when its first line is not a bare integer."""
    line = answer_line(completion)
    return int(line) if _INTEGER.fullmatch(line) else None


def _check(prompts, completions):
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")


def correctness_reward(prompts: List[str], completions: List[str], answer: List[int], **_) -> List[float]:
    """1.0 when the completion's first line is exactly the right integer, else 0.0."""
    _check(prompts, completions)
    if len(answer) != len(completions):
        raise ValueError(f"got {len(answer)} answers for {len(completions)} completions")
    return [1.0 if parse_answer(c) == int(a) else 0.0 for c, a in zip(completions, answer)]


def format_reward(prompts: List[str], completions: List[str], stopped: Optional[List[bool]] = None, **_) -> List[float]:
    """Credit for answering with a bare number, graded so a model far from it still gets signal:
    half for the share of the first line's characters that are digits (or a leading minus), half
    when the completion is a bare integer and nothing else. `stopped` (the trainer passes it: the
    completion ended with a stop token rather than at the length limit) is then required too, so
    a completion cut off mid-way ("12\n\n\n\n...") does not count as well formed."""
    _check(prompts, completions)
    if stopped is not None and len(stopped) != len(completions):
        raise ValueError(f"got {len(stopped)} stopped flags for {len(completions)} completions")
    rewards = []
    for i, c in enumerate(completions):
        line = answer_line(c)
        share = sum(ch.isdigit() or (i == 0 and ch == "-") for i, ch in enumerate(line)) / len(line) if line else 0.0
        rest = c.split("\n", 1)[1] if "\n" in c else ""
        clean = _INTEGER.fullmatch(line) is not None and rest.strip() == "" and (stopped is None or bool(stopped[i]))
        rewards.append(0.5 * share + 0.5 * float(clean))
    return rewards


def arithmetic_rewards():
    """(reward functions, weights) for the shipped task."""
    return [correctness_reward, format_reward], list(DEFAULT_WEIGHTS)


def accuracy(completions: List[str], answers: List[int]) -> float:
    """Share of completions whose answer is exactly right."""
    if len(completions) != len(answers) or not completions:
        raise ValueError("need one answer per completion and at least one completion")
    return sum(parse_answer(c) == int(a) for c, a in zip(completions, answers)) / len(completions)
