"""Tree-of-Thought search on scripted llms (known solutions, pruning, breadth and depth limits,
depth-first backtracking, exact call/token counts), bad input, the templates, and the llm adapters
for the built-in model and Hugging Face models checked against a plain greedy loop."""
import random
import re

import pytest
import torch

from qlora_fast.reasoning import (
    BuiltinLM,
    ExpertsTask,
    Game24Task,
    HFCausalLM,
    TreeOfThought,
    Usage,
    arithmetic,
    ask_experts,
    experts_prompt,
    format_tree,
    parse_value,
)
from qlora_fast.reasoning.arithmetic import ArithmeticTask

# ---- a scripted group of experts ----------------------------------------------------------------

_LINE = re.compile(r"^Expert (\d+): (.*)$")


def read_prompt(prompt):
    """(kind, path, expert) from an `ExpertsTask` prompt: the shared steps, and for a propose
    prompt the expert asked."""
    lines = prompt.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("Question: ")) + 1
    path = []
    for line in lines[start:]:
        match = _LINE.match(line)
        if match:
            path.append(match.group(2))
    if lines[-1].startswith("Judgement:"):
        return "value", tuple(path), None
    expert = int(re.match(r"^Expert (\d+):$", lines[-1]).group(1))
    return "propose", tuple(path), expert


class ScriptedLM:
    """Proposals from `script[path][expert - 1]`, judgements `values[path]` written as text
    (numbers, or the words sure/likely/impossible for 1/0.5/0). Records every call."""

    def __init__(self, script, values=None, words=False):
        self.script, self.values, self.words = script, values or {}, words
        self.calls = []
        self.last_usage = None

    def generate(self, prompts, max_new_tokens, temperature, stop):
        outputs = []
        for prompt in prompts:
            kind, path, expert = read_prompt(prompt)
            if kind == "propose":
                outputs.append(" " + self.script.get(path, [""] * 9)[expert - 1])
            else:
                value = self.values.get(path, 0.0)
                text = {1.0: "sure", 0.5: "likely", 0.0: "impossible"}[value] if self.words else f"{value:.3f}"
                outputs.append(f" {text} because")
        self.calls.append((list(prompts), outputs, max_new_tokens, temperature, list(stop)))
        self.last_usage = Usage(sum(len(p) for p in prompts), sum(len(o) for o in outputs))
        return outputs


class CountingProxy:
    """Counts what passes through to the wrapped llm: calls, prompts and the usage it reports."""

    def __init__(self, llm):
        self.llm = llm
        self.calls = self.prompts = self.prompt_tokens = self.completion_tokens = 0

    @property
    def last_usage(self):
        return self.llm.last_usage

    def generate(self, prompts, max_new_tokens, temperature, stop):
        out = self.llm.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, stop=stop)
        self.calls += 1
        self.prompts += len(prompts)
        self.prompt_tokens += self.llm.last_usage.prompt_tokens
        self.completion_tokens += self.llm.last_usage.completion_tokens
        return out


# A question with one right line of reasoning: 2 + 3 * 4 = 14.
ARITH_SCRIPT = {
    (): ["2 + 3 = 5", "3 * 4 = 12", "Multiply first"],
    ("3 * 4 = 12",): ["2 + 12 = 14", "12 + 2 = 14", "3 * 4 = 12 again"],
    ("Multiply first",): ["2 * 3 = 6", "3 * 4 = 12", "Add after"],
    ("3 * 4 = 12", "2 + 12 = 14"): ["Answer: 14", "Answer: 15", "Answer: 14"],
    ("3 * 4 = 12", "12 + 2 = 14"): ["Answer: 14", "Answer: 14", "Answer: 14"],
    ("Multiply first", "3 * 4 = 12"): ["Answer: 14", "Answer: 14", "Answer: 14"],
}
ARITH_VALUES = {
    ("2 + 3 = 5",): 0.0, ("3 * 4 = 12",): 1.0, ("Multiply first",): 0.5,
    ("3 * 4 = 12", "2 + 12 = 14"): 1.0, ("3 * 4 = 12", "12 + 2 = 14"): 0.5, ("3 * 4 = 12", "3 * 4 = 12 again"): 0.0,
    ("Multiply first", "2 * 3 = 6"): 0.0, ("Multiply first", "3 * 4 = 12"): 0.5, ("Multiply first", "Add after"): 0.5,
    ("3 * 4 = 12", "2 + 12 = 14", "Answer: 14"): 1.0, ("3 * 4 = 12", "2 + 12 = 14", "Answer: 15"): 0.0,
}


@pytest.mark.parametrize("words", [False, True])
def test_bfs_finds_the_known_solution_and_prunes_as_judged(words):
    llm = ScriptedLM(ARITH_SCRIPT, ARITH_VALUES, words=words)
    tot = TreeOfThought(llm, n_experts=3, max_steps=4, breadth=2, threshold=0.5, max_new_tokens=17, temperature=0.3)
    result = tot.solve("What is 2 + 3 * 4?")
    assert result.answer == "14" and result.solved
    assert [n.step for n in result.path] == ["3 * 4 = 12", "2 + 12 = 14", "Answer: 14"]
    assert [n.expert for n in result.path] == [2, 1, 1]
    # Round 1: 3 proposals, 3 judgements (2 survive); round 2: 2 lines x 3 experts, 6 judgements
    # (4 survive, breadth keeps 2); round 3: 6 proposals, of which 3 are repeats on their line and
    # are not judged.
    sizes = [len(prompts) for prompts, *_ in llm.calls]
    assert sizes == [3, 3, 6, 6, 6, 3]
    second = {tuple(n.steps()): n.status for n in result.tree.walk() if n.depth == 2}
    assert second[("3 * 4 = 12", "12 + 2 = 14")] == "kept" and second[("Multiply first", "Add after")] == "dropped"
    assert second[("Multiply first", "2 * 3 = 6")] == "pruned"
    proposals = [c for c in llm.calls if not c[0][0].endswith("Judgement:")]
    assert all(c[2] == 17 and c[3] == 0.3 and c[4] == ["\n"] for c in proposals)
    # The expert judged wrong left: its step never appears in a later prompt.
    first = {n.step: n for n in result.tree.children}
    assert first["2 + 3 = 5"].status == "pruned" and first["2 + 3 = 5"].children == []
    assert all("2 + 3 = 5" not in p for prompts, *_ in llm.calls[2:] for p in prompts)
    assert result.model_calls == len(llm.calls) == 6
    assert result.prompt_tokens == sum(len(p) for c in llm.calls for p in c[0])
    assert result.completion_tokens == sum(len(o) for c in llm.calls for o in c[1])


def test_search_ends_when_every_expert_leaves():
    llm = ScriptedLM({(): ["a", "b", "c"]}, {})  # every step judged 0
    result = TreeOfThought(llm, n_experts=3).solve("q")
    assert result.answer is None and result.path == [] and result.model_calls == 2
    assert [n.status for n in result.tree.children] == ["pruned"] * 3


def test_invalid_and_duplicate_steps_leave_without_a_judgement():
    llm = ScriptedLM({(): ["same", "  ", "same"]}, {("same",): 1.0})
    result = TreeOfThought(llm, n_experts=3, max_steps=1).solve("q")
    assert [n.status for n in result.tree.children] == ["kept", "invalid", "duplicate"]
    assert len(llm.calls[1][0]) == 1  # one judgement: the only usable step
    assert result.answer is None and [n.step for n in result.path] == ["same"]


def test_user_evaluator_and_threshold():
    seen = []

    def judge(question, steps):
        seen.append(tuple(steps))
        values = {"good": 0.9, "fine": 0.6, "bad": 0.2, "nan": float("nan"), "none": None}
        return values.get(steps[-1], False) if steps[-1] != "Answer: 1" else True

    script = {(): ["good", "fine", "bad", "nan", "none"], ("good",): ["Answer: 1", "x", "y", "z", "w"],
              ("fine",): ["Answer: 1"] * 5}
    result = TreeOfThought(ScriptedLM(script), n_experts=5, breadth=3, threshold=0.7, evaluator=judge).solve("q")
    statuses = {n.step: n.status for n in result.tree.children}
    assert statuses == {"good": "kept", "fine": "pruned", "bad": "pruned", "nan": "pruned", "none": "pruned"}
    assert result.answer == "1" and result.model_calls == 2  # no value calls with a user evaluator
    assert seen[:5] == [("good",), ("fine",), ("bad",), ("nan",), ("none",)]


def _random_script(rng, n_experts, depth):
    """A random tree of proposals: some blank, some repeated, some answers; random values."""
    script, values = {}, {}
    frontier = [()]
    for _ in range(depth):
        nxt = []
        for path in frontier:
            steps = []
            for _ in range(n_experts):
                r = rng.random()
                if r < 0.1:
                    steps.append("")
                elif r < 0.2 and steps:
                    steps.append(rng.choice(steps))
                elif r < 0.3:
                    steps.append(f"Answer: {rng.randint(0, 99)}")
                else:
                    steps.append(f"s{rng.randint(0, 10**6)}")
            script[path] = steps
            for s in steps:
                if s.strip():
                    values[path + (s,)] = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0])
                    if not s.startswith("Answer"):
                        nxt.append(path + (s,))
        frontier = nxt
    return script, values


def reference_search(script, values, n_experts, breadth, max_steps, threshold, search):
    """The search written out plainly: returns (answer, path, proposal calls, value calls)."""
    counts = {"propose": 0, "value": 0}

    def children(paths):
        counts["propose"] += 1
        out, votes = [], {}  # votes: experts who proposed the same step on the same line
        for path in paths:
            for e in range(n_experts):
                step = script.get(path, [""] * n_experts)[e].strip()
                if step and path + (step,) in votes:
                    votes[path + (step,)] += 1
                elif step:
                    votes[path + (step,)] = 1
                    out.append(path + (step,))
        if out:
            counts["value"] += 1
        judged = [(c, values.get(c, 0.0)) for c in out]
        good = [(c, v) for c, v in judged if v >= threshold]
        # Lines are ranked by the mean value of their steps (every step on a kept line was judged).
        good = [(c, sum(values.get(c[:k], 0.0) for k in range(1, len(c) + 1)) / len(c)) for c, _ in good]
        finals = [(c, v) for c, v in good if c[-1].startswith("Answer: ")]
        if finals:  # the best value; ties go to more votes, then to the first proposed
            best = max((v, votes[c]) for c, v in finals)
            return next(c for c, v in finals if (v, votes[c]) == best), []
        good.sort(key=lambda cv: (-cv[1], -votes[cv[0]]))
        return None, [c for c, _ in good[:breadth]]

    if search == "bfs":
        beam = [()]
        for _ in range(max_steps):
            final, beam = children(beam)
            if final or not beam:
                return final, counts
        return None, counts

    def dfs(path):
        if len(path) >= max_steps:
            return None
        final, kept = children([path])
        if final:
            return final
        for child in kept:
            found = dfs(child)
            if found:
                return found
        return None

    return dfs(()), counts


@pytest.mark.parametrize("search", ["bfs", "dfs"])
def test_random_trees_match_the_plain_search(seed, search):
    rng = random.Random(seed)
    for _ in range(25):
        n_experts, breadth, max_steps = rng.randint(1, 4), rng.randint(1, 3), rng.randint(1, 4)
        script, values = _random_script(rng, n_experts, max_steps)
        llm = CountingProxy(ScriptedLM(script, values))
        tot = TreeOfThought(
            llm, n_experts=n_experts, breadth=breadth, max_steps=max_steps, threshold=0.5, search=search
        )
        result = tot.solve("q")
        final, counts = reference_search(script, values, n_experts, breadth, max_steps, 0.5, search)
        assert result.answer == (final[-1][len("Answer: "):] if final else None)
        if final:
            assert tuple(n.step for n in result.path) == final
        assert result.model_calls == llm.calls == counts["propose"] + counts["value"]
        assert (result.prompt_tokens, result.completion_tokens) == (llm.prompt_tokens, llm.completion_tokens)
        # Limits: no line longer than max_steps; in BFS no round extends more than `breadth` lines.
        assert all(n.depth <= max_steps for n in result.nodes())
        if search == "bfs":
            proposals = [c for c in llm.llm.calls if not c[0][0].endswith("Judgement:")]
            assert all(len(c[0]) <= breadth * n_experts for c in proposals)
            assert len(proposals) <= max_steps


def test_dfs_backtracks_from_a_dead_line():
    script = {
        (): ["a", "b", "c"],
        ("a",): ["a1", "a2", "a3"],          # all judged wrong: a dead line
        ("b",): ["b1", "b2", "b3"],
        ("b", "b1"): ["b1x", "b1y", "b1z"],  # reaches max_steps=3 without an answer
        ("b", "b2"): ["Answer: found", "q", "r"],
    }
    values = {("a",): 0.9, ("b",): 0.8, ("c",): 0.1, ("b", "b1"): 0.9, ("b", "b2"): 0.6, ("b", "b1", "b1x"): 0.7,
              ("b", "b2", "Answer: found"): 1.0}
    llm = ScriptedLM(script, values)
    result = TreeOfThought(llm, n_experts=3, breadth=2, max_steps=3, search="dfs").solve("q")
    assert result.answer == "found"
    assert [n.step for n in result.path] == ["b", "b2", "Answer: found"]
    expanded = sorted((n for n in result.tree.walk() if n.order is not None), key=lambda n: n.order)
    assert [tuple(n.steps()) for n in expanded] == [(), ("a",), ("b",), ("b", "b1"), ("b", "b2")]
    assert result.model_calls == 10  # 5 expansions, each one propose + one judge call
    # The same tree breadth first: the beam holds both lines, no backtracking needed.
    bfs = TreeOfThought(ScriptedLM(script, values), n_experts=3, breadth=2, max_steps=3).solve("q")
    assert bfs.answer == "found" and bfs.model_calls == 6


def test_max_model_calls_stops_the_search():
    llm = ScriptedLM(ARITH_SCRIPT, ARITH_VALUES)
    result = TreeOfThought(llm, n_experts=3, breadth=2, max_model_calls=3).solve("What is 2 + 3 * 4?")
    assert result.answer is None and result.model_calls == len(llm.calls) == 3


def test_outline_and_transcript_are_well_formed():
    result = TreeOfThought(ScriptedLM(ARITH_SCRIPT, ARITH_VALUES), n_experts=3, breadth=2).solve("What is 2 + 3 * 4?")
    lines = result.outline().split("\n")
    assert lines[0] == "Question: What is 2 + 3 * 4?"
    nodes = result.nodes()
    assert len(lines) == 1 + len(nodes)
    pattern = re.compile(
        r"^( *)- Expert ([1-3]): (.*) "
        r"\[(kept|final|pruned|invalid|duplicate|dropped|unjudged)( value=\d\.\d\d)?( answer=.*)?\]$"
    )
    for line, node in zip(lines[1:], nodes):
        match = pattern.match(line)
        assert match, line
        assert len(match.group(1)) == 2 * node.depth and int(match.group(2)) == node.expert
    assert str(result) == format_tree(result.tree)
    assert result.transcript().split("\n") == [
        "Question: What is 2 + 3 * 4?",
        "Expert 2: 3 * 4 = 12",
        "Expert 1: 2 + 12 = 14",
        "Expert 1: Answer: 14",
        "Answer: 14",
    ]


def test_llm_without_usage_gives_no_token_counts():
    class Plain:
        def generate(self, prompts, max_new_tokens, temperature, stop):
            return ["Answer: 1"] * len(prompts)

    result = TreeOfThought(Plain(), evaluator=lambda q, s: 1.0).solve("q")
    assert result.answer == "1" and result.model_calls == 1
    assert result.prompt_tokens is None and result.tokens is None


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n_experts", [0, -2, 1.5, True, "3"])
def test_n_experts_must_be_a_positive_int(n_experts):
    with pytest.raises(ValueError, match="n_experts"):
        TreeOfThought(ScriptedLM({}), n_experts=n_experts)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_steps=0), "max_steps"), (dict(breadth=0), "breadth"), (dict(search="astar"), "search"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
    (dict(max_model_calls=-1), "max_model_calls"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TreeOfThought(ScriptedLM({}), **kwargs)


def test_bad_llm_evaluator_task_question():
    with pytest.raises(TypeError, match="generate"):
        TreeOfThought(object())
    with pytest.raises(TypeError, match="evaluator"):
        TreeOfThought(ScriptedLM({}), evaluator=0.5)
    with pytest.raises(TypeError, match="task"):
        TreeOfThought(ScriptedLM({}), task="game24")
    with pytest.raises(TypeError, match="question"):
        TreeOfThought(ScriptedLM({})).solve(["q"])


@pytest.mark.parametrize("delta", [-1, 1])
def test_llm_returning_the_wrong_number_of_strings(delta):
    class Wrong:
        def generate(self, prompts, max_new_tokens, temperature, stop):
            return ["Answer: 1"] * (len(prompts) + delta)

    with pytest.raises(ValueError, match=r"one string per prompt: 3 prompts, got %d outputs" % (3 + delta)):
        TreeOfThought(Wrong(), n_experts=3).solve("q")


def test_llm_returning_non_strings():
    class NotText:
        def generate(self, prompts, max_new_tokens, temperature, stop):
            return [None] * len(prompts)

    with pytest.raises(TypeError, match="strings"):
        TreeOfThought(NotText()).solve("q")
    with pytest.raises(ValueError, match="one string per prompt"):
        TreeOfThought(type("S", (), {"generate": lambda self, p, **k: "Answer: 1"})()).solve("q")


# ---- templates and value parsing -----------------------------------------------------------------


def test_single_prompt_experts_template():
    question = f"What is {random.randint(10, 99)} + {random.randint(10, 99)}?"
    text = experts_prompt(question)
    assert text.startswith("Imagine three different experts") and question in text and "leave" in text
    assert "Imagine five different experts" in experts_prompt(question, n_experts=5)
    assert "Imagine 12 different experts" in experts_prompt(question, n_experts=12)
    with pytest.raises(ValueError, match="n_experts"):
        experts_prompt(question, n_experts=0)
    with pytest.raises(TypeError, match="question"):
        experts_prompt(None)


def test_step_prompts_share_the_transcript():
    task = ExpertsTask(n_experts=4)
    prompt = task.propose_prompt("Why?", ["first", "second"], [3, 1], 2)
    assert prompt.endswith("Question: Why?\nExpert 3: first\nExpert 1: second\nExpert 2:")
    assert prompt.startswith("4 experts")
    judge = task.value_prompt("Why?", ["first"], [3])
    assert judge.startswith("Question: Why?\nExpert 3: first\n") and judge.endswith("Judgement:")
    assert "sure, likely or impossible" in judge and parse_value(" likely") == 0.5
    assert task.final_answer("Why?", ["x", "  Final answer: because "]) == "because"
    assert task.final_answer("Why?", ["the answer is near"]) is None


def test_parse_value():
    assert parse_value(" Sure, because") == 1.0
    assert parse_value("likely") == 0.5 and parse_value("IMPOSSIBLE!") == 0.0
    assert parse_value("0.25") == 0.25 and parse_value("7") == 0.7 and parse_value("85%") == 0.85
    assert parse_value("3/4") == 0.75 and parse_value("value 1000") is None and parse_value("hmm") is None
    x = random.random()
    assert abs(parse_value(f"{x:.6f}") - x) < 1e-6
    with pytest.raises(TypeError):
        parse_value(3)


# ---- llm adapters against a plain greedy loop ---------------------------------------------------


def greedy_reference(logits_fn, prompt_ids, max_new_tokens, decode, stop, end_ids):
    """One prompt, no padding, no cache: argmax token by token; stops at an end token or when the
    text holds a stop string. Returns (text before the stop, tokens spent)."""
    ids = list(prompt_ids)
    new = []
    for _ in range(max_new_tokens):
        token = int(logits_fn(torch.tensor([ids]))[0, -1].argmax())
        ids.append(token)
        new.append(token)
        if token in end_ids:
            return decode(new[:-1]), len(new)
        text = decode(new)
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            return text[: min(hits)], len(new)
    return decode(new), len(new)


@pytest.fixture(scope="module")
def builtin_model():
    from qlora_fast.models import LlamaConfig, LlamaForCausalLM
    from qlora_fast.tokenizer import ByteTokenizer

    config = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_seq_len=256)
    model = LlamaForCausalLM(config).double().eval()
    return model, ByteTokenizer()


def _pick_stop(texts):
    """A stop string the outputs actually contain (so the cut is exercised), from the outputs."""
    for text in texts:
        if len(text) >= 3:
            return text[2]
    return "\n"


def test_builtin_lm_matches_a_greedy_loop(builtin_model):
    model, tok = builtin_model
    prompts = [f"Numbers: {random.randint(1, 13)} {random.randint(1, 13)}\nExpert {k}:" for k in range(1, 4)] + ["x"]
    lm = BuiltinLM(model, tok)
    free = lm.generate(prompts, max_new_tokens=9, temperature=0.0, stop=[])
    for stop in ([], [_pick_stop(free)], ["zz", _pick_stop(free[::-1])]):
        texts = lm.generate(prompts, max_new_tokens=9, temperature=0.0, stop=stop)
        expected = [greedy_reference(lambda ids: model(input_ids=ids).logits, tok.encode(p, add_bos=True), 9,
                                     tok.decode, stop, {tok.eos_id}) for p in prompts]
        assert texts == [t for t, _ in expected]
        assert lm.last_usage == Usage(sum(len(p) + 1 for p in prompts), sum(n for _, n in expected))


def test_builtin_lm_sampling_is_seeded_and_prompts_fit_the_context(builtin_model):
    model, tok = builtin_model
    prompts = ["a" * 300, "Question: why?"]  # the first is cut from the left to fit 256 - 8
    a = BuiltinLM(model, tok, seed=7).generate(prompts, max_new_tokens=8, temperature=1.0, stop=["\n"])
    b_lm = BuiltinLM(model, tok, seed=7)
    b = b_lm.generate(prompts, max_new_tokens=8, temperature=1.0, stop=["\n"])
    assert a == b and len(a) == 2 and all(isinstance(t, str) for t in a)
    assert b_lm.last_usage.prompt_tokens == 248 + len(prompts[1]) + 1
    assert b_lm.last_usage.completion_tokens <= 16
    with pytest.raises(ValueError, match="max_new_tokens"):
        b_lm.generate(prompts, max_new_tokens=256, temperature=0.0, stop=[])
    with pytest.raises(TypeError, match="prompts"):
        b_lm.generate("one prompt", max_new_tokens=4, temperature=0.0, stop=[])
    with pytest.raises(ValueError, match="temperature"):
        b_lm.generate(["p"], max_new_tokens=4, temperature=-1, stop=[])


@pytest.mark.parametrize("method", ["lora", "qlora", "prompt"])
def test_builtin_lm_with_an_adapter_loaded(method, tmp_path, monkeypatch):
    """Through a `qlora_fast.peft` adapter (random, so it changes the logits) the adapted model is
    what generates; `BuiltinLM.from_pretrained(adapter=...)` loads a saved one the same way."""
    import qlora_fast.models
    from qlora_fast.models import LlamaConfig, LlamaForCausalLM
    from qlora_fast.peft import LoraConfig, PromptTuningConfig, get_peft_model, save_adapter
    from qlora_fast.tokenizer import ByteTokenizer

    config = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_seq_len=64)
    peft_config = {"lora": LoraConfig(r=4), "qlora": LoraConfig(r=4, quantize_base="nf4"),
                   "prompt": PromptTuningConfig(num_virtual_tokens=5)}[method]
    base_state = LlamaForCausalLM(config).state_dict()

    def fresh_base():
        model = LlamaForCausalLM(config)
        model.load_state_dict(base_state)
        return model.eval() if method == "qlora" else model.double().eval()  # NF4 takes float32

    model = get_peft_model(fresh_base(), peft_config)
    with torch.no_grad():
        for _, p in model.adapter_parameters():
            p.normal_(0.0, 0.5)
    tok = ByteTokenizer()
    ids = torch.tensor([tok.encode("Expert 1: 4 + 8 = 12", add_bos=True)])
    assert (model(input_ids=ids).logits - fresh_base()(input_ids=ids).logits).abs().max() > 1e-3
    prompts = [f"Numbers: {random.randint(1, 13)} {random.randint(1, 13)}", "Expert 2:", "z" * 70]
    lm = BuiltinLM(model.eval(), tok)
    texts = lm.generate(prompts, max_new_tokens=5, temperature=0.0, stop=[])
    room = 64 - 5 - (5 if method == "prompt" else 0)  # context minus new and virtual tokens
    expected = [greedy_reference(lambda ids: model(input_ids=ids).logits, tok.encode(p, add_bos=True)[-room:], 5,
                                 tok.decode, [], {tok.eos_id}) for p in prompts]
    assert texts == [t for t, _ in expected]
    assert lm.last_usage.prompt_tokens == sum(min(len(p) + 1, room) for p in prompts)

    save_adapter(model, str(tmp_path / "adapter"))
    asked = []
    monkeypatch.setattr(
        qlora_fast.models,
        "load_base_model",
        lambda cache_dir=None, progress=True, tokenizer="bpe": asked.append(tokenizer) or (fresh_base(), tok),
    )
    loaded = BuiltinLM.from_pretrained(adapter=str(tmp_path / "adapter"), tokenizer="byte")
    assert asked == ["byte"]
    assert loaded.generate(prompts, max_new_tokens=5, temperature=0.0, stop=[]) == texts


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def hf_model(request):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<pad>", "<eos>"], show_progress=False)
    text = ["Question: what is 4 + 8? Expert 1: 4 + 8 = 12 (left: 6 12 13)\nAnswer: twelve"] * 10
    tok.train_from_iterator(text, trainer=trainer)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(random.randint(0, 2**31))
    if request.param == "llama":
        config = transformers.LlamaConfig(
            vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=hf_tok.pad_token_id,
            eos_token_id=hf_tok.eos_token_id, bos_token_id=None)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=len(hf_tok), n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                         pad_token_id=hf_tok.pad_token_id, eos_token_id=hf_tok.eos_token_id,
                                         bos_token_id=hf_tok.eos_token_id)
        model = transformers.GPT2LMHeadModel(config)
    model = model.double().eval()
    return model, hf_tok


def test_hf_causal_lm_matches_a_greedy_loop(hf_model):
    model, tok = hf_model
    # The last prompt is longer than the 128 positions: it is cut from the left to 128 - 7 tokens.
    prompts = [f"Question: what is {random.randint(1, 99)} + {random.randint(1, 9)}?", "Expert 1:", "Answer",
               "Expert 2: 4 + 8 = 12 " * 20]
    assert len(tok(prompts[-1])["input_ids"]) > 128
    lm = HFCausalLM(model, tok)
    free = lm.generate(prompts, max_new_tokens=7, temperature=0.0, stop=[])
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    for stop in ([], [_pick_stop(free)]):
        texts = lm.generate(prompts, max_new_tokens=7, temperature=0.0, stop=stop)
        expected = [greedy_reference(lambda ids: model(input_ids=ids).logits, tok(p)["input_ids"][-121:], 7, decode,
                                     stop, {tok.eos_token_id}) for p in prompts]
        assert texts == [t for t, _ in expected]
        prompt_tokens = sum(min(len(tok(p)["input_ids"]), 121) for p in prompts)
        assert lm.last_usage == Usage(prompt_tokens, sum(n for _, n in expected))
    torch.manual_seed(0)
    sampled = lm.generate(prompts, max_new_tokens=5, temperature=1.0, stop=["\n"])
    assert len(sampled) == 4 and all(isinstance(t, str) for t in sampled)
    with pytest.raises(ValueError, match="max_new_tokens"):
        lm.generate(prompts, max_new_tokens=128, temperature=0.0, stop=[])


# ---- end to end on the built-in model --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("search", ["bfs", "dfs"])
def test_end_to_end_on_the_builtin_model(builtin_model, search):
    model, tok = builtin_model
    lm = CountingProxy(BuiltinLM(model, tok, seed=random.randint(0, 2**31)))
    # The model judges (a random model rarely says "sure"); every step is kept by a user evaluator.
    for evaluator, task in ((None, Game24Task()), (lambda q, s: 1.0, ExpertsTask(3)), (None, ExpertsTask(3))):
        lm.calls = lm.prompts = lm.prompt_tokens = lm.completion_tokens = 0
        tot = TreeOfThought(lm, n_experts=3, breadth=2, max_steps=2, task=task, evaluator=evaluator,
                            max_new_tokens=6, value_max_new_tokens=3, search=search)
        result = tot.solve("4 6 8 13" if isinstance(task, Game24Task) else "What is 2 + 2?")
        assert result.model_calls == lm.calls >= 1
        assert (result.prompt_tokens, result.completion_tokens) == (lm.prompt_tokens, lm.completion_tokens)
        assert result.completion_tokens <= 6 * lm.prompts
        # One prompt per proposal, plus one per judgement when the model judges.
        judged = sum(n.judgement is not None for n in result.nodes())
        assert judged == 0 or evaluator is None
        assert lm.prompts == len(result.nodes()) + judged
        lines = result.outline().split("\n")
        assert len(lines) == 1 + len(result.nodes()) and all(
            re.match(r"^ *- Expert [1-3]: .* \[\w+.*\]$", x) for x in lines[1:]
        )
        assert result.transcript().startswith("Question: ")
        if evaluator is not None:
            assert all(n.status == "kept" for n in result.path) and len(result.path) in (0, 1, 2)


def test_cli_on_a_local_hugging_face_model(hf_model, tmp_path, capsys):
    """`qlora-fast tot --model DIR` loads a saved transformers model and reports the same totals
    as a direct run of the search on it."""
    import argparse

    from qlora_fast.commands import tot as tot_command

    model, tok = hf_model
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    parser = argparse.ArgumentParser(prog="qlora-fast")
    tot_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tot", "--model", str(tmp_path), "--puzzle", "4 6 8 13", "--temperature", "0",
                              "--max-new-tokens", "5", "--n-experts", "2", "--device", "cpu"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    result = TreeOfThought(HFCausalLM(model, tok), task=Game24Task(), n_experts=2, max_steps=3, breadth=3,
                           temperature=0.0, max_new_tokens=5).solve("4 6 8 13")
    assert f"solve rate: {int(result.solved)}/1" in out
    assert f"model calls: {result.model_calls} (" in out
    assert f"tokens: {result.tokens} (prompt {result.prompt_tokens}, completion {result.completion_tokens})" in out


# ---- the single-prompt variant -----------------------------------------------------------------------


class OneText:
    """Returns the same text for every prompt and records what it was asked."""

    def __init__(self, text):
        self.text, self.asked, self.last_usage = text, [], None

    def generate(self, prompts, max_new_tokens, temperature, stop):
        self.asked.append((list(prompts), max_new_tokens, temperature, list(stop)))
        self.last_usage = Usage(len(prompts[0]), len(self.text))
        return [self.text] * len(prompts)


def test_ask_experts_reads_the_discussion():
    discussion = ("Expert 1: 3 * 4 = 12\nExpert 2: 2 + 3 = 5\nsome chatter\nExpert 3: multiply first\n"
                  "Expert 2: I was wrong, I leave.\nExpert 1: 2 + 12 = 14\nExpert 1: Answer: 14\nExpert 3: Answer: 15")
    llm = OneText(discussion)
    question = f"What is 2 + 3 * 4? ({random.randint(0, 999)})"
    result = ask_experts(llm, question, n_experts=3, max_new_tokens=99, temperature=0.2)
    assert llm.asked == [([experts_prompt(question, 3)], 99, 0.2, [])]
    assert result.answer == "14" and result.model_calls == 1 and result.search == "single-prompt"
    assert [n.step for n in result.path] == ["3 * 4 = 12", "2 + 12 = 14", "Answer: 14"]
    assert [n.expert for n in result.tree.children] == [1, 2, 3]
    assert [n.step for n in result.tree.children[1].walk()] == ["2 + 3 = 5", "I was wrong, I leave."]
    assert result.tree.raw == discussion
    assert (result.prompt_tokens, result.completion_tokens) == (len(experts_prompt(question, 3)), len(discussion))


def test_ask_experts_on_game24_accepts_only_verified_answers():
    text = "Expert 1: 4 * 6 = 24\nExpert 1: Answer: 4 * 6\nExpert 2: 13 - 6 = 7\nExpert 2: Answer: (13 - 6 - 4) * 8"
    result = ask_experts(OneText(text), "4 6 8 13", task=Game24Task())
    assert result.answer == "(13 - 6 - 4) * 8 = 24" and [n.expert for n in result.path] == [2, 2]
    assert [n.status for n in result.nodes()] == ["kept", "kept", "kept", "final"]
    unsolved = ask_experts(OneText("Expert 3: 8 + 4 = 12\nExpert 3: 12 * 2 = 24\nExpert 1: hmm"), "4 6 8 13",
                           task=Game24Task())
    assert unsolved.answer is None and [n.step for n in unsolved.path] == ["8 + 4 = 12", "12 * 2 = 24"]
    assert ask_experts(OneText("no experts here"), "4 6 8 13", task=Game24Task()).path == []


def test_ask_experts_defaults_fit_the_builtin_context(builtin_model):
    # the README's call, defaults only: the discussion must leave room for the prompt in max_seq_len=256
    model, tok = builtin_model
    result = ask_experts(BuiltinLM(model, tok), "4 6 8 13", task=Game24Task())
    assert result.model_calls == 1 and result.tokens > 0


def test_ask_experts_bad_input():
    with pytest.raises(ValueError, match="n_experts"):
        ask_experts(OneText(""), "q", n_experts=0)
    with pytest.raises(TypeError, match="question"):
        ask_experts(OneText(""), 7)

    class Two:
        def generate(self, prompts, max_new_tokens, temperature, stop):
            return ["a", "b"]

    with pytest.raises(ValueError, match="one string per prompt: 1 prompts, got 2 outputs"):
        ask_experts(Two(), "q")


# ---- multi-step arithmetic (the task the built-in model can partly do) -----------------------------


def _python_value(question):
    """The chain's value computed independently: Python's own left-to-right + and -."""
    return eval(question.replace("plus", "+").replace("minus", "-"), {"__builtins__": {}})


def test_arithmetic_problems_and_values_match_python(seed):
    steps = random.Random(seed).randint(1, 6)
    qs = arithmetic.problems(50, steps=steps, seed=seed)
    assert len(set(qs)) == 50 and qs == arithmetic.problems(50, steps=steps, seed=seed)
    for q in qs:
        start, terms = arithmetic.parse_question(q)
        assert len(terms) == steps and arithmetic.evaluate(q) == _python_value(q)
        value = start
        for op, b in terms:  # every operand and running value inside the corpus' range
            assert 2 <= b <= 29
            value = value + b if op == "plus" else value - b
            assert 0 <= value <= 29


@pytest.mark.parametrize("bad", ["", "12", "12 plus", "12 times 3", "plus 3", "12 plus -3", "1.5 plus 2"])
def test_arithmetic_bad_questions(bad):
    with pytest.raises(ValueError, match="question must look like"):
        arithmetic.parse_question(bad)
    with pytest.raises(TypeError, match="question must be a str"):
        arithmetic.parse_question(12)
    with pytest.raises(ValueError, match="n must be"):
        arithmetic.problems(0)
    with pytest.raises(ValueError, match="steps must be"):
        arithmetic.problems(3, steps=0)


def test_arithmetic_step_parser_and_judge_against_exact_sums(seed):
    """Walk random problems with random proposals: the prompt is the corpus sentence of the running
    value, a step reads the first integer of the text, the answer appears exactly after the last
    operation, and the judge's inverse prompt and verdict agree with exact arithmetic."""
    rng, task = random.Random(seed), ArithmeticTask()
    for q in arithmetic.problems(20, steps=rng.randint(1, 5), seed=seed):
        start, terms = arithmetic.parse_question(q)
        steps, current = [], start
        for i, (op, b) in enumerate(terms):
            assert task.propose_prompt(q, steps, [1] * i, 1) == f"{current} {op} {b} is"
            proposed = current + b if op == "plus" else current - b
            if rng.random() < 0.5:
                proposed += rng.choice([-11, -1, 1, 3])
            text = rng.choice([" {}.", " {} and more", "{}", "  {}\n7"]).format(proposed)
            step = task.normalize_step(q, steps, text)
            assert step == f"{current} {op} {b} is {proposed}"
            inverse = task.value_prompt(q, steps + [step], [1] * (i + 1))
            assert inverse == f"{proposed} {'minus' if op == 'plus' else 'plus'} {b} is"
            undone = proposed - b if op == "plus" else proposed + b  # what a correct inverse sum says
            assert task.judge(q, steps + [step], f" {undone}.") == float(undone == current)
            assert task.judge(q, steps + [step], f" {current}.") == 1.0 and task.judge(q, steps + [step], " no") == 0.0
            assert task.final_answer(q, steps + [step]) == (str(proposed) if i == len(terms) - 1 else None)
            assert task.normalize_step(q, steps, " none") is None
            steps.append(step)
            current = proposed
        assert task.normalize_step(q, steps, " 5") is None  # nothing is left to do
        if current == _python_value(q):
            assert int(task.final_answer(q, steps)) == arithmetic.evaluate(q)


class SumsLM:
    """Answers a sentence "a plus b is" / "a minus b is" exactly, except that the first prompt of
    every batch (expert 1, and so a chain of one expert) is off by one."""

    def __init__(self):
        self.last_usage = None

    def generate(self, prompts, max_new_tokens, temperature, stop):
        out = []
        for i, p in enumerate(prompts):
            a, op, b, _ = p.split(" ")
            value = int(a) + int(b) if op == "plus" else int(a) - int(b)
            out.append(f" {value + (i == 0)}.")
        self.last_usage = Usage(len(prompts), len(prompts))
        return out


def test_arithmetic_group_and_judge_recover_what_one_chain_gets_wrong():
    """Deterministic: the first expert (and greedy decoding) is always off by one; the judge's
    exact inverse sums prune its steps, so the group answers right where the chain cannot."""
    class Judged(SumsLM):
        def generate(self, prompts, max_new_tokens, temperature, stop):
            if max_new_tokens == 8:  # the judge's calls: exact
                self.last_usage = Usage(len(prompts), len(prompts))
                return [f" {int(a) + int(b) if op == 'plus' else int(a) - int(b)}."
                        for a, op, b, _ in (p.split(" ") for p in prompts)]
            return super().generate(prompts, max_new_tokens, temperature, stop)

    task = ArithmeticTask()
    for q in arithmetic.problems(5, steps=3, seed=0):
        chain = TreeOfThought(Judged(), n_experts=1, breadth=1, max_steps=3, task=task, temperature=0.0,
                              evaluator=lambda q, s: 1.0, max_new_tokens=4).solve(q)
        assert int(chain.answer) != arithmetic.evaluate(q) and chain.model_calls == 3
        group = TreeOfThought(Judged(), n_experts=3, breadth=1, max_steps=3, task=task, temperature=0.7, threshold=0.5,
                              max_new_tokens=4).solve(q)
        assert int(group.answer) == arithmetic.evaluate(q) and group.model_calls == 6
        assert all(n.status in ("pruned", "duplicate") for n in group.nodes() if n.expert == 1)


def test_votes_break_ties_of_value():
    """Two experts proposing the same step outrank one expert with another step of equal value."""
    script = {(): ["a", "b", "b"], ("a",): ["Answer: A"] * 3, ("b",): ["Answer: B"] * 3}
    llm = ScriptedLM(script, values={("a",): 1.0, ("b",): 1.0, ("a", "Answer: A"): 1.0, ("b", "Answer: B"): 1.0})
    result = TreeOfThought(llm, n_experts=3, breadth=1, max_steps=2, max_new_tokens=5).solve("q")
    first = result.tree.children
    assert [c.votes for c in first] == [1, 2, 1] and result.answer == "B"


def test_cli_arithmetic_compares_with_one_chain_and_says_when_the_model_cannot(monkeypatch, capsys):
    """`qlora-fast tot` defaults to arithmetic on the built-in model (a tiny random one here) and
    prints the group's totals beside one greedy chain's and self-consistency's at the group's token
    budget, each equal to a direct run; a model that solves nothing is told so."""
    import argparse

    import qlora_fast.models
    from qlora_fast.commands import tot as tot_command
    from qlora_fast.models import LlamaConfig, LlamaForCausalLM
    from qlora_fast.tokenizer import ByteTokenizer

    config = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                         num_kv_heads=1, max_seq_len=256)
    model = LlamaForCausalLM(config).eval()
    monkeypatch.setattr(qlora_fast.models, "load_base_model",
                        lambda cache_dir=None, progress=True, tokenizer="bpe": (model, ByteTokenizer()))
    parser = argparse.ArgumentParser(prog="qlora-fast")
    tot_command.register(parser.add_subparsers(dest="command"))

    def run(argv):
        args = parser.parse_args(argv)
        return args.func(args)

    qs = arithmetic.problems(2, steps=2, seed=5)
    assert run(["tot", "--puzzles", "2", "--arithmetic-steps", "2", "--seed", "5", "--n-experts", "2",
                "--temperature", "0", "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    lm = BuiltinLM(model, ByteTokenizer(), seed=5)
    group = TreeOfThought(lm, n_experts=2, breadth=1, max_steps=2, task=ArithmeticTask(), threshold=0.0,
                          temperature=0.0, max_new_tokens=4)
    chain = TreeOfThought(lm, n_experts=1, breadth=1, max_steps=2, task=ArithmeticTask(), temperature=0.0,
                          max_new_tokens=4, evaluator=lambda q, s: 1.0)
    from qlora_fast.reasoning import self_consistency

    groups, chains = [group.solve(q) for q in qs], [chain.solve(q) for q in qs]
    n_chains = [max(1, round(g.tokens / c.tokens)) for g, c in zip(groups, chains)]  # the group's token budget
    votes = [self_consistency(lm, q, n_chains=n, task=ArithmeticTask(), max_steps=2, max_new_tokens=4, temperature=0.0)
             for q, n in zip(qs, n_chains)]
    total = 0
    for name, results in (("group of 2 experts + judge of 24 checks (T=0)", groups), ("one greedy chain", chains),
                          (f"self-consistency: {sum(n_chains) / 2:.0f} sampled chains (T=0), majority answer", votes)):
        solved = sum(r.answer is not None and int(r.answer) == _python_value(q) for r, q in zip(results, qs))
        calls = sum(r.model_calls for r in results)
        tokens = sum(r.tokens for r in results)
        assert (
            f"| {name} | {solved}/2 ({50.0 * solved:.1f}%) | {calls} ({calls / 2:.1f} per problem) | {tokens} |" in out
        )
        total += solved
    assert "task: arithmetic | model: builtin" in out
    assert ("note: the model solved none of the 2 problems" in out) == (total == 0)

    assert run(["tot", "--task", "game24", "--puzzle", "1 1 1 1", "--max-new-tokens", "3", "--temperature", "0",
                "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "solve rate: 0/1" in out and "cannot do this task" in out and "try --task arithmetic" in out

    assert run(["tot", "--puzzle", "4 6 8 13", "--device", "cpu"]) == 2  # arithmetic by default on builtin
    assert "question must look like" in capsys.readouterr().err
    assert run(["tot", "--prompting", "single", "--device", "cpu"]) == 2
    assert "no arithmetic variant" in capsys.readouterr().err


def test_implied_sums_hold_exactly_when_the_step_does(seed):
    """Every implied sentence is a sum the corpus teaches, distinct, the inverse sum first; each is
    true (in Python's arithmetic) when the step is right and false when it is wrong."""
    rng = random.Random(seed)
    for _ in range(200):
        a = rng.randint(0, 29)
        op = rng.choice(["plus", "minus"])
        b = rng.randint(0, 29) if op == "plus" else rng.randint(0, a)
        right = a + b if op == "plus" else a - b
        result = right + rng.choice([0, 0, -2, -1, 1, 3, 17])
        n = rng.randint(1, 40)
        checks = arithmetic.implied_sums(a, op, b, result, n)
        assert len(checks) <= n and len({p for p, _ in checks}) == len(checks)
        inverse = f"{result} minus {b} is" if op == "plus" else f"{result} plus {b} is"
        if 0 <= result <= 29 and (op == "minus" or result >= b):  # the inverse is a sentence of the corpus
            assert checks[0] == (inverse, a)
        for prompt, answer in checks:
            x, word, y, _ = prompt.split(" ")
            x, y = int(x), int(y)
            assert 0 <= x <= 29 and 0 <= y <= 29 and (word == "plus" or x >= y)
            assert ((x + y if word == "plus" else x - y) == answer) == (result == right), (a, op, b, result, prompt)
        if result == right and 1 <= a <= 28 and 1 <= b <= 28:
            assert len(checks) == n  # enough neighbours of an inner sum for any n <= 40
    with pytest.raises(ValueError, match="op must be"):
        arithmetic.implied_sums(1, "times", 2, 2, 3)


class ExactSumsLM:
    """Answers every sentence "x plus y is" / "x minus y is" exactly, except the prompts in
    `answers`, answered as given there; records the prompts."""

    def __init__(self, answers=None):
        self.answers, self.prompts, self.last_usage = answers or {}, [], None

    def generate(self, prompts, max_new_tokens, temperature, stop):
        self.prompts.append(list(prompts))
        out = []
        for p in prompts:
            x, word, y, _ = p.split(" ")
            value = int(x) + int(y) if word == "plus" else int(x) - int(y)
            out.append(f" {self.answers.get(p, value)}.")
        self.last_usage = Usage(len(prompts), len(prompts))
        return out


def test_arithmetic_judge_values_a_step_by_the_implied_sums_the_model_confirms(seed):
    """The judge asks exactly the step's implied sums in one call and values the step by the
    fraction the model answered as implied: a model that answers some of them as implied and the
    others not, for a right and a wrong step."""
    rng = random.Random(seed)
    q = arithmetic.problems(1, steps=1, seed=seed)[0]
    start, [(op, b)] = arithmetic.parse_question(q)
    right = start + b if op == "plus" else start - b
    checks = rng.randint(1, 30)
    task = ArithmeticTask(checks=checks)
    for proposed in (right, right + rng.choice([d for d in (-2, -1, 1, 2) if 0 <= right + d <= 29])):
        implied = arithmetic.implied_sums(start, op, b, proposed, checks)
        agree = {p: rng.random() < 0.5 for p, _ in implied}  # answered as the step implies, or 100 off
        llm = ExactSumsLM({p: answer if agree[p] else answer + 100 for p, answer in implied})
        calls = [0]

        class Proposer:  # every expert proposes `proposed`; the judge's calls go to the exact model
            last_usage = None

            def generate(self, prompts, max_new_tokens, temperature, stop):
                calls[0] += 1
                if calls[0] == 1:
                    self.last_usage = Usage(1, 1)
                    return [f" {proposed}."] * len(prompts)
                out = llm.generate(prompts, max_new_tokens, temperature, stop)
                self.last_usage = llm.last_usage
                return out

        result = TreeOfThought(Proposer(), n_experts=3, breadth=1, max_steps=1, task=task, threshold=0.0,
                               max_new_tokens=4).solve(q)
        assert llm.prompts == [[p for p, _ in implied]] and result.model_calls == 2
        node = result.tree.children[0]
        assert node.value == pytest.approx(sum(agree.values()) / len(implied)) and node.votes == 3
        exact = ExactSumsLM()  # a model that knows every sum: 1 for the right step, 0 for a wrong one
        assert task.judge_replies(q, [node.step], exact.generate([p for p, _ in implied], 8, 0.0, ".")) == float(
            proposed == right)
        assert len(node.judgement.split(" | ")) == len(implied)


def test_a_task_may_value_a_step_without_asking():
    """A step that implies no sum the corpus teaches (its numbers are all past 29) is valued 0
    without a judge call; a task whose value_prompts is not a list is refused."""
    task = ArithmeticTask()
    llm = ExactSumsLM()

    class Proposer:
        last_usage = None

        def generate(self, prompts, max_new_tokens, temperature, stop):
            self.last_usage = Usage(1, 1)
            return [" 95."] * len(prompts) if max_new_tokens == 4 else llm.generate(prompts, 8, 0.0, stop)

    result = TreeOfThought(Proposer(), n_experts=2, breadth=1, max_steps=1, task=task, threshold=0.0,
                           max_new_tokens=4).solve("31 plus 40")
    assert result.model_calls == 1 and result.tree.children[0].value == 0.0 and llm.prompts == []

    class BadTask(ArithmeticTask):
        def value_prompts(self, question, steps, experts):
            return "3 plus 4 is"

    with pytest.raises(TypeError, match="value_prompts must return a list"):
        TreeOfThought(ExactSumsLM(), n_experts=1, max_steps=1, task=BadTask(), max_new_tokens=4).solve("3 plus 4")


def test_lines_are_ranked_by_the_mean_value_of_their_steps(seed):
    """In a beam of two, the line with the better mean value wins even when the other line's last
    step is judged higher (a last step can look right on a line that went wrong earlier)."""
    rng = random.Random(seed)
    for _ in range(20):
        first = sorted(rng.sample([0.5, 0.625, 0.75, 0.875, 1.0], 2), reverse=True)  # line a starts better
        last_a = rng.choice([0.5, 0.625, 0.75])
        last_b = rng.choice([v for v in (0.625, 0.75, 0.875, 1.0) if v > last_a])  # ... and ends worse
        script = {(): ["a", "b"], ("a",): ["Answer: A"] * 2, ("b",): ["Answer: B"] * 2}
        values = {("a",): first[0], ("b",): first[1], ("a", "Answer: A"): last_a, ("b", "Answer: B"): last_b}
        result = TreeOfThought(ScriptedLM(script, values), n_experts=2, breadth=2, max_steps=2, threshold=0.5,
                               max_new_tokens=5).solve("q")
        mean_a, mean_b = (first[0] + last_a) / 2, (first[1] + last_b) / 2
        if mean_a != mean_b:
            assert result.answer == ("A" if mean_a > mean_b else "B"), (first, last_a, last_b)


class ChainPlanLM:
    """Self-consistency's chains from a plan: `plans[c][k]` is what chain c writes at its step k.
    Every call answers the chains still going, in chain order (the test tracks them itself)."""

    def __init__(self, plans, valid):
        self.plans, self.valid, self.call, self.last_usage = plans, valid, 0, None

    def generate(self, prompts, max_new_tokens, temperature, stop):
        going = [c for c, plan in enumerate(self.plans) if all(self.valid(t) for t in plan[: self.call])]
        assert len(prompts) == len(going)
        out = [self.plans[c][self.call] for c in going]
        self.call += 1
        self.last_usage = Usage(3 * len(prompts), 2 * len(prompts))
        return out


def test_self_consistency_votes_over_sampled_chains(seed):
    """Random plans of chains (some ending on an unusable step): one call per step while any chain
    goes on, the answer most chains reached (ties: the first chain's), exact token counts."""
    rng = random.Random(seed)
    for _ in range(20):
        steps, n_chains = rng.randint(1, 4), rng.randint(1, 9)
        q = arithmetic.problems(1, steps=steps, seed=rng.randint(0, 10**6))[0]
        plans = [[rng.choice([" 7.", " 8.", " 9.", " none"]) for _ in range(steps)] for _ in range(n_chains)]
        valid = lambda text: "none" not in text  # noqa: E731
        result = arithmetic_self_consistency(ChainPlanLM(plans, valid), q, n_chains, steps)
        finished = [plan[-1].strip(" .") for plan in plans if all(valid(t) for t in plan)]
        if finished:
            top = max(finished.count(a) for a in finished)
            assert result.answer == next(a for a in finished if finished.count(a) == top)
            assert [n.step.rsplit(" ", 1)[1] for n in result.path][-1] == result.answer
        else:
            assert result.answer is None and result.path == []
        calls = sum(any(all(valid(t) for t in plan[:k]) for plan in plans) for k in range(steps))
        prompts = sum(all(valid(t) for t in plan[:k]) for plan in plans for k in range(steps))
        assert result.model_calls == calls and result.tokens == 5 * prompts
        assert len(result.tree.children) == n_chains and result.search == "self-consistency"


def arithmetic_self_consistency(llm, q, n_chains, steps):
    from qlora_fast.reasoning import self_consistency

    return self_consistency(llm, q, n_chains=n_chains, task=ArithmeticTask(), max_steps=steps, max_new_tokens=4)


@pytest.mark.parametrize("n_chains", [0, -1, True, 2.0, "3"])
def test_self_consistency_bad_input(n_chains):
    from qlora_fast.reasoning import self_consistency

    with pytest.raises(ValueError, match="n_chains must be an int >= 1"):
        self_consistency(ExactSumsLM(), "3 plus 4", n_chains=n_chains, task=ArithmeticTask())
    with pytest.raises(TypeError, match="question must be a str"):
        self_consistency(ExactSumsLM(), 34, task=ArithmeticTask())
    with pytest.raises(TypeError, match="llm must have a generate"):
        self_consistency(object(), "3 plus 4", task=ArithmeticTask())
    with pytest.raises(ValueError, match="checks must be an int >= 1"):
        ArithmeticTask(checks=0)


class QueuedLM:
    """Answers call k with `outputs[k]` (one string per prompt, checked)."""

    def __init__(self, outputs):
        self.outputs, self.calls, self.last_usage = list(outputs), 0, None

    def generate(self, prompts, max_new_tokens, temperature, stop):
        out = self.outputs[self.calls]
        assert len(out) == len(prompts)
        self.calls += 1
        self.last_usage = Usage(len(prompts), len(prompts))
        return out


def test_self_consistency_ties_go_to_the_answer_reached_first():
    """Chains ending at different depths: with every answer reached once, the one reached in the
    earliest call wins, not the first chain's; chains that answered stop being asked."""
    from qlora_fast.reasoning import self_consistency

    llm = QueuedLM([["step one", "Answer: A", "step one"], ["Answer: B", "step two"], ["Answer: C"]])
    result = self_consistency(llm, "q", n_chains=3, task=ExpertsTask(1), max_steps=3, max_new_tokens=8)
    assert result.answer == "A" and result.model_calls == 3 and [n.expert for n in result.path] == [2]
    assert [n.answer for n in result.nodes() if n.status == "final"] == ["B", "A", "C"]  # depth-first, chain order


def test_default_judge_values_a_step_asked_nothing_as_wrong():
    """A task that asks no judge prompt for a step and keeps the default `judge_replies`: the step
    is judged None (wrong), without a call; prompts that are not strings are refused."""

    class Silent(ExpertsTask):
        def value_prompts(self, question, steps, experts):
            return []

    llm = QueuedLM([["a step", "Answer: 3"]])
    result = TreeOfThought(llm, n_experts=2, max_steps=1, task=Silent(2), max_new_tokens=8).solve("q")
    assert llm.calls == 1 and result.answer is None
    assert all(n.status == "pruned" and n.value is None and n.judgement is None for n in result.nodes())

    class NotStrings(ExpertsTask):
        def value_prompts(self, question, steps, experts):
            return [3]

    with pytest.raises(TypeError, match="list of str prompts"):
        TreeOfThought(QueuedLM([["x"]]), n_experts=1, max_steps=1, task=NotStrings(1), max_new_tokens=8).solve("q")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(n=0), ValueError, "n must be >= 1"), (dict(n=-3), ValueError, "n must be >= 1"),
    (dict(n=2.0), TypeError, "n must be an int"), (dict(a=3.0), TypeError, "a must be an int"),
    (dict(b=True), TypeError, "b must be an int"), (dict(result="7"), TypeError, "result must be an int"),
])
def test_implied_sums_bad_input(kwargs, error, match):
    args = dict(a=3, op="plus", b=4, result=7, n=5)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        arithmetic.implied_sums(**args)
