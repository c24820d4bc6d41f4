"""Game of 24: the exact verifier against a brute-force solver written here, the step checker,
the solver and puzzle list, and the search on the task with a scripted (perfect) llm."""
import itertools
import random
import re
from fractions import Fraction

import pytest

from qlora_fast.reasoning import TreeOfThought, Usage, ask_experts, game24
from qlora_fast.reasoning.game24 import Game24Task, verify_expression

# ---- an independent brute force: every expression over the numbers, by string and eval --------

_SHAPES = [  # the five ways to parenthesise four operands, as text and as arithmetic
    ("(({a} {o1} {b}) {o2} {c}) {o3} {d}", lambda a, b, c, d, f, g, h: h(g(f(a, b), c), d)),
    ("({a} {o1} ({b} {o2} {c})) {o3} {d}", lambda a, b, c, d, f, g, h: h(f(a, g(b, c)), d)),
    ("({a} {o1} {b}) {o2} ({c} {o3} {d})", lambda a, b, c, d, f, g, h: g(f(a, b), h(c, d))),
    ("{a} {o1} (({b} {o2} {c}) {o3} {d})", lambda a, b, c, d, f, g, h: f(a, h(g(b, c), d))),
    ("{a} {o1} ({b} {o2} ({c} {o3} {d}))", lambda a, b, c, d, f, g, h: f(a, g(b, h(c, d)))),
]


def _div(x, y):
    if x is None or y is None or y == 0:
        return None
    return x / y


_OPS = {
    "+": lambda x, y: None if x is None or y is None else x + y,
    "-": lambda x, y: None if x is None or y is None else x - y,
    "*": lambda x, y: None if x is None or y is None else x * y,
    "/": _div,
}


def _value(expression):
    """Exact value by Python's own evaluator on Fractions (None on division by zero)."""
    code = re.sub(r"\d+", lambda m: f"Fraction({m.group(0)})", expression)
    try:
        return eval(code, {"Fraction": Fraction})
    except ZeroDivisionError:
        return None


def all_expressions(numbers, keep=lambda value: True):
    """(expression, exact value) for every ordering, operator choice and parenthesisation whose
    value passes `keep` (text is only built for those)."""
    out = []
    for order in set(itertools.permutations(numbers)):
        a, b, c, d = (Fraction(x) for x in order)
        for o1, o2, o3 in itertools.product("+-*/", repeat=3):
            f, g, h = _OPS[o1], _OPS[o2], _OPS[o3]
            for text, arithmetic in _SHAPES:
                value = arithmetic(a, b, c, d, f, g, h)
                if keep(value):
                    out.append(
                        (text.format(a=order[0], b=order[1], c=order[2], d=order[3], o1=o1, o2=o2, o3=o3), value)
                    )
    return out


def brute_force_solutions(numbers):
    return [e for e, _ in all_expressions(numbers, keep=lambda v: v == 24)]


SMALL = list(itertools.combinations_with_replacement(range(1, 6), 4))  # all 70 puzzles of 1..5


@pytest.fixture(scope="module")
def small_solutions():
    return {p: brute_force_solutions(p) for p in SMALL}


def test_verifier_accepts_every_solution_of_small_puzzles(small_solutions):
    n = 0
    for puzzle, solutions in small_solutions.items():
        for e in solutions:
            assert verify_expression(e, puzzle), (puzzle, e)
            n += 1
    assert n > 500  # the exhaustive set is not empty by accident


def test_verifier_rejects_wrong_values_and_wrong_numbers(small_solutions):
    rng = random.Random()
    for puzzle in rng.sample(SMALL, 12):
        wrong = [e for e, v in all_expressions(puzzle, keep=lambda v: v != 24)]
        for e in rng.sample(wrong, 40):
            assert not verify_expression(e, puzzle), (puzzle, e)
        for e in small_solutions[puzzle][:20]:
            # The right value from the wrong numbers: one number swapped, dropped or added.
            other = [x for x in range(1, 14) if x not in puzzle]
            changed = list(puzzle)
            changed[rng.randrange(4)] = rng.choice(other)
            assert not verify_expression(e, changed)
            assert not verify_expression(e, list(puzzle) + [rng.randint(1, 13)])
            assert not verify_expression(e, list(puzzle)[:3])


def test_verifier_forms_and_malformed_text():
    assert verify_expression("Answer: (6 - 4) * (4 + 8) = 24", [4, 4, 6, 8])
    assert verify_expression("(6 − 4) × (4 + 8)", [8, 6, 4, 4])
    assert verify_expression("8 / (3 - 8 / 3)", [3, 3, 8, 8])  # needs exact fractions
    assert not verify_expression("(6 - 4) * (4 + 8) = 25", [4, 4, 6, 8])
    for bad in ["", "24", "4 * 6 * 1", "(6 - 4) * (4 + 8", "6 ** 2 - 4 - 8", "-(4 - 6) * (4 + 8)",
                "2.0 * 12", "__import__('os')", "(6 - 4) * (4 + 8) = x", "4 / (4 - 4) + 6 * 8"]:
        assert not verify_expression(bad, [4, 4, 6, 8]), bad
    with pytest.raises(TypeError, match="expression"):
        verify_expression(24, [4, 4, 6, 8])


def test_solver_and_puzzles_match_brute_force(small_solutions):
    solvable = {p for p, s in small_solutions.items() if s}
    for puzzle in SMALL:
        expr = game24.solve(puzzle)
        assert (expr is not None) == (puzzle in solvable), puzzle
        if expr is not None:
            assert _value(expr) == 24 and sorted(map(int, re.findall(r"\d+", expr))) == sorted(puzzle)
    listed = game24.puzzles(low=1, high=5, seed=3)
    assert sorted(listed) == sorted(solvable) and len(set(listed)) == len(listed)
    assert game24.puzzles(5, low=1, high=5, seed=3) == listed[:5]
    # Harder ones from the full range, checked the same way.
    for puzzle in random.Random().sample(list(itertools.combinations_with_replacement(range(1, 14), 4)), 6):
        assert (game24.solve(puzzle) is not None) == bool(brute_force_solutions(puzzle)), puzzle


def test_steps_are_checked_exactly():
    task = Game24Task()
    q = "4 6 8 13"
    assert task.normalize_step(q, [], " 4+8=12 (left: 1 2 3)\nmore") == "4 + 8 = 12 (left: 6 12 13)"
    assert task.normalize_step(q, [], "13 / 4 = 13/4") == "13 / 4 = 13/4 (left: 13/4 6 8)"
    for bad in ["4 + 8 = 13", "4 + 4 = 8", "5 + 8 = 13", "8 / 0 = 0", "four plus eight", "", "= 12"]:
        assert task.normalize_step(q, [], bad) is None, bad
    steps = ["13 - 6 = 7 (left: 4 7 8)"]
    assert task.normalize_step(q, steps, "13 - 4 = 9") is None  # 13 is used up
    assert task.normalize_step(q, steps, "7 - 4 = 3") == "7 - 4 = 3 (left: 3 8)"
    assert task.final_answer(q, steps + ["7 - 4 = 3 (left: 3 8)"]) is None
    answer = task.final_answer(q, steps + ["7 - 4 = 3 (left: 3 8)", "3 * 8 = 24"])
    assert verify_expression(answer, [4, 6, 8, 13]) and answer.endswith("= 24")
    with pytest.raises(ValueError, match="puzzle"):
        task.propose_prompt("four six", [], [], 1)


def test_random_step_walks_track_the_numbers_left(seed):
    rng = random.Random(seed)
    task = Game24Task()
    for _ in range(40):
        numbers = [Fraction(rng.randint(1, 13)) for _ in range(4)]
        question = " ".join(str(x) for x in numbers)
        left, steps = list(numbers), []
        while len(left) > 1:
            a, b = rng.sample(range(len(left)), 2)
            op = rng.choice("+-*/" if left[b] != 0 else "+-*")
            x, y = left[a], left[b]
            value = {"+": x + y, "-": x - y, "*": x * y, "/": x / y if y else None}[op]
            text = f"{game24.format_number(x)} {op} {game24.format_number(y)} = {game24.format_number(value)}"
            left = [v for i, v in enumerate(left) if i not in (a, b)] + [value]
            step = task.normalize_step(question, steps, text)
            assert step is not None, (question, steps, text)
            shown = [Fraction(t) for t in step.split("(left: ")[1].rstrip(")").split()]
            assert sorted(shown) == sorted(left)
            steps.append(step)
        answer = task.final_answer(question, steps)
        assert (answer is not None) == (left[0] == 24)
        if answer is not None:
            assert verify_expression(answer, numbers)


class PerfectExperts:
    """A scripted llm: expert k proposes the k-th step (in a fixed order) that keeps the puzzle
    solvable, or a step that does not when there is none; judges by brute force."""

    def __init__(self):
        self.calls = 0
        self.last_usage = None

    @staticmethod
    def _numbers(prompt):
        return [Fraction(t) for t in prompt.rstrip().split("\n")[-2].split(":", 1)[1].split()]

    def generate(self, prompts, max_new_tokens, temperature, stop):
        self.calls += 1
        outputs = []
        for prompt in prompts:
            numbers = self._numbers(prompt)
            if prompt.endswith("Judgement:"):
                solvable = game24.solve(numbers) is not None
                outputs.append(" sure" if solvable else " impossible")
                continue
            expert = int(prompt.rstrip().split("\n")[-1].split()[1].rstrip(":"))
            good, bad = [], []
            for i, j in itertools.permutations(range(len(numbers)), 2):
                x, y = numbers[i], numbers[j]
                for op in "+-*/":
                    if op == "/" and y == 0:
                        continue
                    value = {"+": x + y, "-": x - y, "*": x * y, "/": x / y if y else None}[op]
                    rest = [v for k, v in enumerate(numbers) if k not in (i, j)] + [value]
                    text = f" {game24.format_number(x)} {op} {game24.format_number(y)} = {game24.format_number(value)}"
                    (good if game24.solve(rest) is not None else bad).append(text)
            outputs.append(good[expert - 1] if expert <= len(good) else bad[0])
        self.last_usage = Usage(sum(map(len, prompts)), sum(map(len, outputs)))
        return outputs


@pytest.mark.parametrize("search", ["bfs", "dfs"])
def test_search_solves_puzzles_with_perfect_experts(search):
    for puzzle in random.Random().sample(game24.puzzles(low=1, high=8), 3):
        llm = PerfectExperts()
        result = TreeOfThought(llm, task=Game24Task(), n_experts=3, max_steps=3, breadth=2, search=search).solve(
            " ".join(map(str, puzzle)))
        assert result.solved and verify_expression(result.answer, puzzle), result.outline()
        assert len(result.path) == 3 and result.path[-1].status == "final"
        # Expand + judge per level, except that the final level's answer is verified, not judged.
        assert result.model_calls == llm.calls == 5


# ---- the command line ----------------------------------------------------------------------------


def run_cli(argv):
    import argparse

    from qlora_fast.commands import tot

    parser = argparse.ArgumentParser(prog="qlora-fast")
    tot.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_reports_solve_rate_calls_and_tokens(monkeypatch, capsys):
    """`qlora-fast tot` on the built-in model (a small random one instead of the pretrained base,
    which would take a minute to train): its totals equal a direct run of the same search."""
    import qlora_fast.models
    from qlora_fast.models import LlamaConfig, LlamaForCausalLM
    from qlora_fast.reasoning import BuiltinLM
    from qlora_fast.tokenizer import ByteTokenizer

    config = LlamaConfig(
        vocab_size=259, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, max_seq_len=256
    )
    model = LlamaForCausalLM(config).eval()
    asked = []
    monkeypatch.setattr(
        qlora_fast.models,
        "load_base_model",
        lambda cache_dir=None, progress=True, tokenizer="bpe": asked.append(tokenizer) or (model, ByteTokenizer()),
    )
    puzzles = [" ".join(map(str, p)) for p in random.Random().sample(game24.puzzles(low=1, high=5), 2)]
    argv = ["tot", "--task", "game24", "--model", "builtin", "--temperature", "0", "--max-new-tokens", "6",
            "--breadth", "2", "--device", "cpu", "--show-tree", "--tokenizer", "byte"]
    for p in puzzles:
        argv += ["--puzzle", p]
    assert run_cli(argv) == 0
    assert asked == ["byte"]  # --tokenizer reaches the built-in model
    out = capsys.readouterr().out
    tot = TreeOfThought(BuiltinLM(model, ByteTokenizer()), task=Game24Task(), n_experts=3, max_steps=3, breadth=2,
                        temperature=0.0, max_new_tokens=6)
    results = [tot.solve(p) for p in puzzles]
    solved = sum(r.solved for r in results)
    calls = sum(r.model_calls for r in results)
    prompt, completion = sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
    assert f"solve rate: {solved}/2 ({50.0 * solved:.1f}%)" in out
    assert f"model calls: {calls} ({calls / 2:.1f} per puzzle)" in out
    assert f"tokens: {prompt + completion} (prompt {prompt}, completion {completion})" in out
    assert out.count("Question: ") == 2 and calls >= 2

    # The single-prompt variant: one call per puzzle.
    assert (
        run_cli(
            [
                "tot",
                "--task",
                "game24",
                "--prompting",
                "single",
                "--puzzle",
                puzzles[0],
                "--temperature",
                "0",
                "--max-new-tokens",
                "12",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    single = ask_experts(BuiltinLM(model, ByteTokenizer()), puzzles[0], task=Game24Task(), max_new_tokens=12)
    assert "single prompt" in out and "model calls: 1 (1.0 per puzzle)" in out
    assert f"tokens: {single.tokens} (prompt {single.prompt_tokens}, completion {single.completion_tokens})" in out


def test_cli_rejects_a_missing_model_dir(tmp_path, capsys):
    assert run_cli(["tot", "--model", str(tmp_path / "nope"), "--puzzle", "1 2 3 4"]) == 2
    assert "--model must be 'builtin' or a local Hugging Face model directory" in capsys.readouterr().err
    assert run_cli(["tot", "--task", "game24", "--adapter", str(tmp_path / "nope"), "--puzzle", "1 2 3 4"]) == 2
    assert "--adapter must be a directory" in capsys.readouterr().err
    assert run_cli(["tot", "--model", str(tmp_path), "--adapter", str(tmp_path), "--puzzle", "1 2 3 4"]) == 2
    assert "--adapter applies to the built-in model only" in capsys.readouterr().err
