"""Multi-step arithmetic, a task the built-in model can partly do (Game of 24 it cannot).

A problem is a start number and a chain of additions and subtractions read left to right,
"12 plus 7 minus 5 plus 9", with every operand and every running value in 0..29: the range of
the "a plus b is c." / "a minus b is c." sentences of the shipped pretraining corpus. One step
applies one operation; an expert proposes its result by continuing the corpus sentence
"19 minus 5 is" (the built-in base model gets one such sum right about 60% of the time, so a
greedy chain of 3-4 steps usually fails somewhere).

The judge is the model itself, checking a step by its inverse: "19 minus 5 is 14" is kept when
the model, asked "14 plus 5 is", answers 19. Both directions stay in the corpus' range. The
final answer is NOT verified by the task (`verifies_answers` is False): whether it is right is
for the caller to check against `evaluate(question)`.
"""
import random
import re
from typing import List, Sequence, Tuple

from qlora_fast.reasoning.tasks import ReasoningTask

LOW, HIGH = 0, 29  # the corpus' operands and results (build_data.py: a, b in range(30), a >= b for minus)
_OPS = {"plus": 1, "minus": -1}
_QUESTION = re.compile(r"^\s*(\d+)((?:\s+(?:plus|minus)\s+\d+)+)\s*$")
_TERM = re.compile(r"(plus|minus)\s+(\d+)")
_FIRST_INT = re.compile(r"-?\d+")


def parse_question(question: str) -> Tuple[int, List[Tuple[str, int]]]:
    """(start, [(op, operand), ...]) of "12 plus 7 minus 5"; ValueError naming the question
    when it is not a number followed by one or more "plus N" / "minus N"."""
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    match = _QUESTION.match(question)
    if match is None:
        raise ValueError(f"question must look like '12 plus 7 minus 5' (a number, then plus/minus N terms), "
                         f"got {question!r}")
    return int(match.group(1)), [(op, int(n)) for op, n in _TERM.findall(match.group(2))]


def evaluate(question: str) -> int:
    """The exact value of the chain, left to right."""
    value, terms = parse_question(question)
    for op, n in terms:
        value += _OPS[op] * n
    return value


def problems(n: int, steps: int = 3, seed: int = 0) -> List[str]:
    """`n` distinct problems of `steps` operations, every operand and running value in LOW..HIGH,
    drawn with `random.Random(seed)`."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        value = rng.randint(LOW + 1, HIGH)
        text = str(value)
        for _ in range(steps):
            # Operands of at least 2 ("plus 0" would be a free step); every value stays in range.
            op = rng.choice([op for op, ok in (("plus", value <= HIGH - 2), ("minus", value >= 2)) if ok])
            b = rng.randint(2, HIGH - value if op == "plus" else value)
            value += _OPS[op] * b
            text += f" {op} {b}"
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def _step_text(current: int, op: str, operand: int) -> str:
    return f"{current} {op} {operand} is"


class ArithmeticTask(ReasoningTask):
    """`TreeOfThought` task for `problems()`: a step is "a op b is c" (c read from the expert's
    continuation), the answer is c after the last operation, the judge is the inverse sum.

    Every expert gets the same prompt (the corpus sentence for the next operation); the experts
    differ only through sampling, and the judge decides which of their results the line keeps.
    """

    stop = (".", "\n")
    verifies_answers = False

    def _position(self, question: str, steps: Sequence[str]) -> Tuple[int, List[Tuple[str, int]]]:
        """The running value after `steps` and the operations still to do."""
        start, terms = parse_question(question)
        current = start if not steps else int(steps[-1].rsplit(" ", 1)[1])
        return current, terms[len(steps):]

    def propose_prompt(self, question, steps, experts, expert):
        current, rest = self._position(question, steps)
        if not rest:
            raise ValueError(f"no operation is left in {question!r} after {len(steps)} steps")
        return _step_text(current, *rest[0])

    def normalize_step(self, question, steps, text):
        """The step "a op b is c" with c the first integer of `text`, or None when it holds none
        or the line is already complete."""
        current, rest = self._position(question, steps)
        match = _FIRST_INT.search(text)
        if not rest or match is None:
            return None
        return f"{_step_text(current, *rest[0])} {int(match.group())}"

    def final_answer(self, question, steps):
        _, rest = self._position(question, steps)
        return steps[-1].rsplit(" ", 1)[1] if steps and not rest else None

    def value_prompt(self, question, steps, experts):
        """The inverse of the last step: for "a plus b is c", "c minus b is" (and vice versa)."""
        a, op, b, _, c = steps[-1].split(" ")
        inverse = "minus" if op == "plus" else "plus"
        return _step_text(int(c), inverse, int(b))

    def judge(self, question, steps, text):
        """1.0 when the model's inverse sum gives back the step's first operand, else 0.0."""
        match = _FIRST_INT.search(text)
        return 1.0 if match is not None and int(match.group()) == int(steps[-1].split(" ")[0]) else 0.0

    def single_prompt(self, question, n_experts):
        raise ValueError("the arithmetic task has no single-prompt variant: use the search (or one greedy chain)")

    def check_answer(self, question, answer):
        answer = answer.strip()
        return answer if re.fullmatch(r"-?\d+", answer) else None
