"""Data shipped with qlora_fast: a small pretraining corpus and an instruction set with a
train/held-out split (see `build_data.py`, which wrote them), plus the prompt template."""
import json
import os
from typing import Dict, List

DATA_DIR = os.path.dirname(os.path.abspath(__file__))

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n### Response:\n"
SPLITS = ("train", "heldout")


def format_prompt(instruction: str) -> str:
    """The prompt the model sees before its response."""
    if not isinstance(instruction, str):
        raise TypeError(f"instruction must be a str, got {type(instruction).__name__}")
    return PROMPT_TEMPLATE.format(instruction=instruction)


def load_corpus() -> str:
    """The pretraining corpus as one string (newline-separated paragraphs)."""
    with open(os.path.join(DATA_DIR, "corpus.txt"), encoding="utf-8") as f:
        return f.read()


def load_instructions(split: str = "train") -> List[Dict[str, str]]:
    """The instruction pairs of a split ("train" or "heldout"): dicts with "instruction",
    "output" and "task"."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    with open(os.path.join(DATA_DIR, f"instructions_{split}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
