"""Game of 24, the Tree-of-Thoughts paper's benchmark, as a task for `TreeOfThought`.

A puzzle is four numbers; the goal is an expression that uses each of them exactly once with
`+ - * /` and parentheses and equals 24. The search works in steps that combine two of the
remaining numbers (`4 + 8 = 12 (left: 6 12 13)`): three valid steps ending at 24 solve the puzzle.
Everything is checked with exact rational arithmetic (`fractions.Fraction`), so a proposed step
with wrong arithmetic or a number that is not left is rejected without asking the model, and a
final answer is verified exactly rather than judged.

The propose and value prompts are written for this project after the paper's (few-shot examples
of one step per expert, and a sure/likely/impossible judgement of the numbers left).
"""
import ast
import itertools
import random
import re
from fractions import Fraction
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

from qlora_fast.reasoning.tasks import ReasoningTask
from qlora_fast.reasoning.templates import experts_prompt

TARGET = 24

# Kept short: the built-in model's context is 256 tokens (bytes), answer included.
PROPOSE_PROMPT = """\
Game of 24: combine two numbers per step (+ - * /); reach 24.
Numbers: 2 8 8 14
Expert 1: 2 + 8 = 10 (left: 8 10 14)
Expert 2: 14 - 8 = 6 (left: 2 6 8)
Numbers: 4 6
Expert 1: 4 * 6 = 24 (left: 24)
Numbers: {numbers}
Expert {expert}:"""

VALUE_PROMPT = """\
Can the numbers reach 24 (sure/likely/impossible)?
Numbers: 4 4 10
Judgement: sure ((10 - 4) * 4 = 24)
Numbers: 11 12
Judgement: impossible (12 - 11 = 1, 11 + 12 = 23)
Numbers: 2 5 7
Judgement: likely (in range)
Numbers: {numbers}
Judgement:"""

_OPERATORS = {"+": "+", "-": "-", "*": "*", "/": "/", "x": "*", "×": "*", "÷": "/", "−": "-"}
_NUMBER = r"-?\d+(?:/\d+)?"
_STEP = re.compile(rf"^\s*({_NUMBER})\s*([-+*/x×÷−])\s*({_NUMBER})\s*=\s*({_NUMBER})")


def format_number(x: Fraction) -> str:
    """An integer as `12`, any other rational as `8/3`."""
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def _apply(a: Fraction, op: str, b: Fraction) -> Optional[Fraction]:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return None if b == 0 else a / b


def parse_numbers(puzzle) -> List[Fraction]:
    """The puzzle's numbers from `"4 6 8 13"` or a sequence of numbers (ValueError if none)."""
    if isinstance(puzzle, str):
        tokens = puzzle.replace(",", " ").split()
        try:
            numbers = [Fraction(t) for t in tokens]
        except ValueError:
            raise ValueError(f"puzzle must be numbers separated by spaces, got {puzzle!r}") from None
    else:
        numbers = [Fraction(x) for x in puzzle]
    if not numbers:
        raise ValueError("puzzle must contain at least one number")
    return numbers


class _Evaluator:
    """Exact value of an arithmetic expression, collecting the numbers it uses."""

    def __init__(self):
        self.numbers: List[Fraction] = []

    def value(self, node) -> Fraction:
        if isinstance(node, ast.Expression):
            return self.value(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
            self.numbers.append(Fraction(node.value))
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult, ast.Div):
            left, right = self.value(node.left), self.value(node.right)
            op = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}[type(node.op)]
            result = _apply(left, op, right)
            if result is None:
                raise ZeroDivisionError
            return result
        # Unary minus, powers, names, floats, calls...: not allowed in the game.
        raise ValueError(f"not allowed in Game of 24: {ast.dump(node)}")


def verify_expression(expression: str, numbers: Sequence, target: int = TARGET) -> bool:
    """True when `expression` uses each of `numbers` exactly once (as a multiset) with only
    `+ - * /` and parentheses and equals `target` exactly; False for anything else, including
    malformed text and division by zero. An `Answer:` prefix and a trailing `= 24` are allowed
    (the right-hand side, if given, must be the target); `x`/`×`/`÷` are read as `*`/`/`.
    """
    if not isinstance(expression, str):
        raise TypeError(f"expression must be a str, got {type(expression).__name__}")
    text = expression.strip()
    text = re.sub(r"^(?:final\s+)?answer\s*:\s*", "", text, flags=re.IGNORECASE)
    if "=" in text:
        text, _, rhs = text.partition("=")
        try:
            if Fraction(rhs.strip()) != target:
                return False
        except ValueError:
            return False
    for symbol, op in _OPERATORS.items():
        if symbol not in "+-*/":
            text = text.replace(symbol, op)
    try:
        tree = ast.parse(text.strip(), mode="eval")
        evaluator = _Evaluator()
        value = evaluator.value(tree)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return False
    return value == target and sorted(evaluator.numbers) == sorted(Fraction(x) for x in numbers)


def _combinations(numbers: Tuple[Fraction, ...]):
    """Every way to replace two of `numbers` (with their expressions) by one value."""
    for i, j in itertools.combinations(range(len(numbers)), 2):
        (a, ea), (b, eb) = numbers[i], numbers[j]
        rest = tuple(x for k, x in enumerate(numbers) if k not in (i, j))
        for x, ex, y, ey in ((a, ea, b, eb), (b, eb, a, ea)):
            for op in "+-*/":
                if op in "+*" and x is b:
                    continue  # commutative: one order is enough
                value = _apply(x, op, y)
                if value is not None:
                    yield rest + ((value, f"({ex} {op} {ey})"),)


def _search(numbers: Tuple[Tuple[Fraction, str], ...], target: Fraction) -> Optional[str]:
    # Combining two numbers at a time reaches every expression tree.
    if len(numbers) == 1:
        return numbers[0][1] if numbers[0][0] == target else None
    if not _reachable(tuple(sorted(x for x, _ in numbers)), target):
        return None
    for combined in _combinations(numbers):
        found = _search(combined, target)
        if found is not None:
            return found
    return None


@lru_cache(maxsize=100_000)
def _reachable(values: Tuple[Fraction, ...], target: Fraction) -> bool:
    if len(values) == 1:
        return values[0] == target
    numbers = tuple((x, "") for x in values)
    return any(_reachable(tuple(sorted(x for x, _ in c)), target) for c in _combinations(numbers))


def solve(numbers: Sequence, target: int = TARGET) -> Optional[str]:
    """One expression that makes `target` from `numbers` (each used once), or None if none does."""
    values = parse_numbers(numbers)
    expr = _search(tuple((x, format_number(x)) for x in values), Fraction(target))
    if expr is not None and len(values) > 1:
        expr = expr[1:-1]  # the outer parentheses
    return expr


def puzzles(n: Optional[int] = None, seed: int = 0, low: int = 1, high: int = 13) -> List[Tuple[int, ...]]:
    """Solvable puzzles: all multisets of four numbers in [low, high] that can make 24, shuffled
    by `seed` (the same list for the same seed), the first `n` of them (all when n is None)."""
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0 or None, got {n}")
    if low < 1 or high < low:
        raise ValueError(f"need 1 <= low <= high, got low={low}, high={high}")
    candidates = itertools.combinations_with_replacement(range(low, high + 1), 4)
    found = [c for c in candidates if _reachable(tuple(Fraction(x) for x in c), Fraction(TARGET))]
    random.Random(seed).shuffle(found)
    return found if n is None else found[:n]


def parse_step(text: str) -> Optional[Tuple[Fraction, str, Fraction, Fraction]]:
    """`(a, op, b, result)` from a step such as `4 + 8 = 12 (left: 6 12 13)`, or None when the
    text does not start with `a op b = c`. The arithmetic is not checked here."""
    match = _STEP.match(text)
    if match is None:
        return None
    a, op, b, result = match.groups()
    return Fraction(a), _OPERATORS[op], Fraction(b), Fraction(result)


def apply_steps(numbers: Sequence, steps: Sequence[str]) -> Optional[List[Tuple[Fraction, str]]]:
    """The numbers left after `steps`, each with the expression that made it, or None as soon as
    a step is malformed, uses a number that is not left, or has wrong arithmetic."""
    left = [(x, format_number(x)) for x in parse_numbers(numbers)]
    for step in steps:
        parsed = parse_step(step)
        if parsed is None:
            return None
        a, op, b, claimed = parsed
        value = _apply(a, op, b)
        if value is None or value != claimed:
            return None
        operands = []
        for wanted in (a, b):
            index = next((i for i, (x, _) in enumerate(left) if x == wanted), None)
            if index is None:
                return None
            operands.append(left.pop(index))
        left.append((value, f"({operands[0][1]} {op} {operands[1][1]})"))
    return left


def _left_text(left) -> str:
    return " ".join(format_number(x) for x in sorted(x for x, _ in left))


class Game24Task(ReasoningTask):
    """Game of 24 for `TreeOfThought`: the question is the puzzle (`"4 6 8 13"`), each step
    combines two numbers, the answer is an expression verified exactly (`verifies_answers`).

    `normalize_step` rewrites a valid step with the numbers left computed exactly (the model's
    own "(left: ...)" is not trusted) and rejects invalid ones; the value prompt asks whether the
    numbers left can still reach 24.
    """

    verifies_answers = True
    stop = ("\n",)

    def __init__(self, target: int = TARGET):
        self.target = target

    def _numbers(self, question: str) -> List[Fraction]:
        numbers = parse_numbers(question)
        if len(numbers) < 2:
            raise ValueError(f"a Game of 24 puzzle needs at least two numbers, got {question!r}")
        return numbers

    def propose_prompt(self, question, steps, experts, expert):
        left = apply_steps(self._numbers(question), steps)
        return PROPOSE_PROMPT.format(numbers=_left_text(left), expert=expert)

    def normalize_step(self, question, steps, text):
        first_line = text.strip().split("\n", 1)[0]
        parsed = parse_step(first_line)
        if parsed is None:
            return None
        a, op, b, result = parsed
        step = f"{format_number(a)} {op} {format_number(b)} = {format_number(result)}"
        left = apply_steps(self._numbers(question), list(steps) + [step])
        if left is None:
            return None
        return f"{step} (left: {_left_text(left)})"

    def final_answer(self, question, steps):
        numbers = self._numbers(question)
        if len(steps) != len(numbers) - 1:
            return None
        left = apply_steps(numbers, steps)
        if left is None or len(left) != 1 or left[0][0] != self.target:
            return None
        expression = left[0][1]
        if expression.startswith("("):
            expression = expression[1:-1]
        answer = f"{expression} = {self.target}"
        # The expression was built from checked steps; verifying it again keeps the promise exact.
        return answer if verify_expression(answer, numbers, self.target) else None

    def value_prompt(self, question, steps, experts):
        left = apply_steps(self._numbers(question), steps)
        return VALUE_PROMPT.format(numbers=_left_text(left))

    def single_prompt(self, question, n_experts):
        numbers = " ".join(format_number(x) for x in self._numbers(question))
        return experts_prompt(f"use each of the numbers {numbers} exactly once, with + - * / and parentheses, "
                              f"to make {self.target}.", n_experts)

    def check_answer(self, question, answer):
        answer = answer.strip()
        if not verify_expression(answer, self._numbers(question), self.target):
            return None
        return answer if "=" in answer else f"{answer} = {self.target}"
