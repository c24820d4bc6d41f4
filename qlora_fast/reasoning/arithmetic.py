"""Multi-step arithmetic, a task the built-in model can partly do (Game of 24 it cannot).

A problem is a start number and a chain of additions and subtractions read left to right,
"12 plus 7 minus 5 plus 9", with every operand and every running value in 0..29: the range of
the "a plus b is c." / "a minus b is c." sentences of the shipped pretraining corpus. One step
applies one operation; an expert proposes its result by continuing the corpus sentence
"19 minus 5 is" (the built-in base model gets one such sum right about 55% of the time, so a
greedy chain of 3-4 steps usually fails somewhere).

The judge is the model itself, checking a step against the sums it implies: "19 minus 5 is 14"
implies "14 plus 5 is 19", "19 minus 14 is 5", "15 plus 5 is 20", "20 minus 5 is 15", ...
(`implied_sums`); the step's value is the fraction of them the model answers as implied. One
wrong sum is easy for the tiny model to say, but a wrong step rarely agrees with two dozen
neighbouring facts (on 400 single sums: greedy 56% right, the best-valued of 16 samples 91%,
bench/RESULTS.md). The final answer is NOT verified by the task (`verifies_answers` is False):
whether it is right is for the caller to check against `evaluate(question)`.
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


def _first_int(text: str):
    match = _FIRST_INT.search(text)
    return int(match.group()) if match is not None else None


def _step_text(current: int, op: str, operand: int) -> str:
    return f"{current} {op} {operand} is"


def implied_sums(a: int, op: str, b: int, result: int, n: int) -> List[Tuple[str, int]]:
    """Up to `n` corpus sentences ("p plus q is", answer) / ("p minus q is", answer) that are true
    when "a op b is result" is, nearest first; only sentences the corpus teaches (operands in
    LOW..HIGH, no negative difference). The inverse sum comes first, then the step's own sentence.

    Written as a sum s = p + q (plus: a + b = result; minus: result + b = a), shifting p or q by
    d = 0, 1, -1, 2, -2, ... gives p' + q = s + d, q + p' = s + d, (s + d) - q = p', (s + d) - p' = q
    (and the same with q shifted)."""
    if op not in _OPS:
        raise ValueError(f"op must be 'plus' or 'minus', got {op!r}")
    for name, value in (("a", a), ("b", b), ("result", result), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    p, q, s = (a, b, result) if op == "plus" else (result, b, a)
    found, seen = [], set()

    def add(x, word, y, answer):
        if (x, word, y) in seen or not (LOW <= x <= HIGH and LOW <= y <= HIGH) or (word == "minus" and x < y):
            return
        seen.add((x, word, y))
        found.append((_step_text(x, word, y), answer))

    if op == "plus":  # the inverse sum first: "c minus b is" for "a plus b is c", "c plus b is" for minus
        add(s, "minus", q, p)
    else:
        add(p, "plus", q, s)
    add(a, op, b, result)
    for shift in range(HIGH - LOW + 1):
        for d in ((0,) if shift == 0 else (shift, -shift)):
            for p2, q2 in ((p + d, q), (p, q + d)):
                add(p2, "plus", q2, s + d)
                add(q2, "plus", p2, s + d)
                add(s + d, "minus", q2, p2)
                add(s + d, "minus", p2, q2)
        if len(found) >= n:
            break
    return found[:n]


class ArithmeticTask(ReasoningTask):
    """`TreeOfThought` task for `problems()`: a step is "a op b is c" (c read from the expert's
    continuation), the answer is c after the last operation, the judge asks the `checks` sums the
    step implies (`implied_sums`) and values it by the fraction the model gets as implied.

    Every expert gets the same prompt (the corpus sentence for the next operation); the experts
    differ only through sampling, and the judge decides which of their results the line keeps.
    `checks=1` is one check: the inverse sum ("14 plus 5 is" for "19 minus 5 is 14") when the corpus
    teaches it, else the step's own sentence asked again.
    """

    stop = (".", "\n")
    verifies_answers = False

    def __init__(self, checks: int = 24):
        if isinstance(checks, bool) or not isinstance(checks, int) or checks < 1:
            raise ValueError(f"checks must be an int >= 1, got {checks!r}")
        self.checks = checks

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
        value = _first_int(text)
        if not rest or value is None:
            return None
        return f"{_step_text(current, *rest[0])} {value}"

    def final_answer(self, question, steps):
        _, rest = self._position(question, steps)
        return steps[-1].rsplit(" ", 1)[1] if steps and not rest else None

    def _checks(self, steps) -> List[Tuple[str, int]]:
        a, op, b, _, c = steps[-1].split(" ")
        return implied_sums(int(a), op, int(b), int(c), self.checks)

    def value_prompts(self, question, steps, experts):
        """The sums implied by the last step (the inverse sum first); none when the step's numbers
        all lie outside the corpus' (then its value is 0)."""
        return [prompt for prompt, _ in self._checks(steps)]

    def judge_replies(self, question, steps, texts):
        """The fraction of the implied sums the model answered as the step implies (0.0 when the
        step implies none the corpus teaches)."""
        checks = self._checks(steps)
        agree = sum(_first_int(text) == answer for (_, answer), text in zip(checks, texts))
        return agree / len(checks) if checks else 0.0

    def value_prompt(self, question, steps, experts):
        """The one-prompt judge (what `value_prompts` asks first when the corpus teaches it): the
        inverse of the last step, for "a plus b is c", "c minus b is" (and vice versa)."""
        a, op, b, _, c = steps[-1].split(" ")
        return _step_text(int(c), "minus" if op == "plus" else "plus", int(b))

    def judge(self, question, steps, text):
        """1.0 when the model's inverse sum gives back the step's first operand, else 0.0."""
        return 1.0 if _first_int(text) == int(steps[-1].split(" ")[0]) else 0.0

    def single_prompt(self, question, n_experts):
        raise ValueError("the arithmetic task has no single-prompt variant: use the search (or one greedy chain)")

    def check_answer(self, question, answer):
        answer = answer.strip()
        return answer if re.fullmatch(r"-?\d+", answer) else None
