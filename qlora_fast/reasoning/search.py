"""Tree-of-Thought search with a group of experts (Yao et al. 2023, "Tree of Thoughts", with the
"experts share each step and leave when wrong" framing of the single-prompt variant).

A node of the tree is a line of reasoning: the steps so far, each written by one expert. To
extend a node, every one of the `n_experts` experts proposes its next step given the shared
transcript of that line (all of a round's proposals go through ONE batched `llm.generate` call).
Each proposal is read by the task (`normalize_step`: unusable text is rejected on the spot),
then scored by the evaluator: the model itself through the task's value prompt (all of a
round's judgements in one more batched call) or a user function. An expert whose step is judged
wrong (value below `threshold`) leaves that line. The search ends as soon as an expert reaches a
final answer, or when no expert is left, or after `max_steps` steps.

- Breadth-first (`search="bfs"`, the default): a beam of at most `breadth` lines; each round
  every line in the beam is extended by every expert and the best `breadth` surviving children
  form the next beam, lines ranked by the mean value of their steps. At most 2 model calls per
  round.
- Depth-first (`search="dfs"`): extend one line, go into its best surviving child first (at most
  `breadth` of them, best value first) and backtrack to the next one when a line dies out or
  reaches `max_steps` without an answer.

`self_consistency` is the chain-of-thought baseline to compare with at equal budget: sampled
chains without a judge, the majority answer.

Model calls and tokens are counted exactly: a call is one `llm.generate`; tokens come from the
llm's `last_usage` (the adapters in `llm.py` report it) and are None when the llm reports none.
"""
import collections
import itertools
import re
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Union

from qlora_fast.reasoning.tasks import ExpertsTask, ReasoningTask

# Node states: what happened to each proposal.
ROOT = "root"          # the question
KEPT = "kept"          # judged good enough; the line goes on (or could have)
FINAL = "final"        # reached the answer
PRUNED = "pruned"      # judged wrong or below the threshold: the expert left
INVALID = "invalid"    # not a usable step (rejected by the task without a judgement)
DUPLICATE = "duplicate"  # the same step as an earlier expert's on the same line
DROPPED = "dropped"    # good enough but outside the beam (breadth)
UNJUDGED = "unjudged"  # proposed in the round that found the answer, never judged


@dataclass(eq=False)
class Node:
    """One step of one expert (the root holds the question). `depth` is the number of steps on
    the line; `value` the evaluator's score (None when not judged or unreadable); `judgement` the
    model's own words when the model judged it; `raw` the proposal as generated; `order` the
    position in which the search expanded this node (None when never expanded); `votes` the
    number of experts who proposed the same step on the line (ties of value go to more votes)."""

    step: str
    expert: Optional[int] = None
    depth: int = 0
    parent: Optional["Node"] = None
    children: List["Node"] = field(default_factory=list)
    value: Optional[float] = None
    status: str = ROOT
    answer: Optional[str] = None
    raw: str = ""
    judgement: Optional[str] = None
    order: Optional[int] = None
    votes: int = 1  # experts who proposed this same step on this line (it and its duplicates)

    def path(self) -> List["Node"]:
        """The nodes from the first step down to this one (the root excluded)."""
        nodes = []
        node = self
        while node.parent is not None:
            nodes.append(node)
            node = node.parent
        return nodes[::-1]

    def steps(self) -> List[str]:
        return [n.step for n in self.path()]

    def experts(self) -> List[int]:
        return [n.expert for n in self.path()]

    @property
    def line_value(self) -> float:
        """The mean value of the steps on this line: how the search ranks lines against each other
        (a step's own value says how good it is given its line, not whether the line is good)."""
        values = [n.value if n.value is not None else 0.0 for n in self.path()]
        return sum(values) / len(values) if values else 0.0

    def walk(self):
        """This node and all below it, depth first, in proposal order."""
        yield self
        for child in self.children:
            yield from child.walk()


def format_tree(root: Node) -> str:
    """The tree as an indented outline: one line per node, two spaces per level, with the
    expert, the step, the value and what happened to it."""
    lines = []

    def visit(node: Node, indent: int):
        if node.parent is None:
            lines.append(f"Question: {node.step}")
        else:
            text = node.step if node.status != INVALID else repr(node.raw)
            value = "" if node.value is None else f" value={node.value:.2f}"
            answer = "" if node.answer is None or node.status != FINAL else f" answer={node.answer}"
            lines.append(f"{'  ' * indent}- Expert {node.expert}: {text} [{node.status}{value}{answer}]")
        for child in node.children:
            visit(child, indent + 1)

    visit(root, 0)
    return "\n".join(lines)


@dataclass
class ToTResult:
    """What a search found. `answer` is None when no expert reached one; `path` is the line that
    reached it (or the best surviving line otherwise); `tree` the root of every proposal made.
    `model_calls` counts `llm.generate` calls; the token counts are None when the llm does not
    report usage."""

    question: str
    answer: Optional[str]
    path: List[Node]
    tree: Node
    model_calls: int
    prompt_tokens: Optional[int]
    completion_tokens: Optional[int]
    search: str

    @property
    def solved(self) -> bool:
        return self.answer is not None

    @property
    def tokens(self) -> Optional[int]:
        if self.prompt_tokens is None or self.completion_tokens is None:
            return None
        return self.prompt_tokens + self.completion_tokens

    def nodes(self) -> List[Node]:
        """Every proposal (the root excluded), depth first."""
        return list(self.tree.walk())[1:]

    def transcript(self) -> str:
        """The surviving line as `Expert k: step` lines, then `Answer: ...` when solved."""
        lines = [f"Question: {self.question}"] + [f"Expert {n.expert}: {n.step}" for n in self.path]
        if self.answer is not None:
            lines.append(f"Answer: {self.answer}")
        return "\n".join(lines)

    def outline(self) -> str:
        return format_tree(self.tree)

    def __str__(self) -> str:
        return self.outline()


class _BudgetExhausted(Exception):
    pass


class _CountedLLM:
    """Calls `llm.generate`, checks that it returns one string per prompt, and counts calls and
    tokens (tokens from the llm's `last_usage`; None once a call reports none)."""

    def __init__(self, llm, max_calls: Optional[int] = None):
        self.llm = llm
        self.max_calls = max_calls
        self.calls = 0
        self.prompt_tokens: Optional[int] = 0
        self.completion_tokens: Optional[int] = 0

    def generate(self, prompts: List[str], max_new_tokens: int, temperature: float, stop: List[str]) -> List[str]:
        if self.max_calls is not None and self.calls >= self.max_calls:
            raise _BudgetExhausted
        outputs = self.llm.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, stop=stop)
        self.calls += 1
        if not isinstance(outputs, (list, tuple)) or len(outputs) != len(prompts):
            got = f"{len(outputs)} outputs" if isinstance(outputs, (list, tuple)) else type(outputs).__name__
            raise ValueError(f"llm.generate must return one string per prompt: {len(prompts)} prompts, got {got}")
        bad = [type(o).__name__ for o in outputs if not isinstance(o, str)]
        if bad:
            raise TypeError(f"llm.generate must return strings, got {bad[0]}")
        usage = getattr(self.llm, "last_usage", None)
        if usage is None or self.prompt_tokens is None:
            self.prompt_tokens = self.completion_tokens = None
        else:
            self.prompt_tokens += int(usage.prompt_tokens)
            self.completion_tokens += int(usage.completion_tokens)
        return list(outputs)


Evaluator = Callable[[str, List[str]], Union[float, bool, None]]


class TreeOfThought:
    """Tree-of-Thought reasoning with a group of `n_experts` experts (see the module docstring).

    Args:
        llm: anything with `generate(prompts, max_new_tokens, temperature, stop) -> list[str]`
            returning one string per prompt (`BuiltinLM`, `HFCausalLM`, or your own).
        n_experts: experts proposing a step for each line, >= 1.
        max_steps: most steps on a line (the depth limit), >= 1.
        breadth: beam width in BFS; in DFS the most children of a node that are explored.
        evaluator: None (or "model") to let the model judge each step through the task's value
            prompt, or a function `(question, steps) -> float | bool | None` judging the last of
            `steps`; True/False count as 1/0 and None as wrong.
        threshold: a step whose value is below it is judged wrong and its expert leaves.
        search: "bfs" (default) or "dfs" (depth first with backtracking).
        task: a `ReasoningTask` (default `ExpertsTask`: any question, answers as `Answer: ...`).
        max_new_tokens, temperature: for the proposals; `value_max_new_tokens`,
            `value_temperature` for the model's judgements.
        max_model_calls: stop (unsolved) instead of making more calls than this; None: no limit.

    Raises ValueError / TypeError on bad arguments, and when the llm returns anything but one
    string per prompt.
    """

    def __init__(
        self,
        llm,
        n_experts: int = 3,
        max_steps: int = 4,
        breadth: int = 3,
        evaluator: Union[None, str, Evaluator] = None,
        threshold: float = 0.5,
        search: str = "bfs",
        task: Optional[ReasoningTask] = None,
        max_new_tokens: int = 64,
        temperature: float = 0.7,
        value_max_new_tokens: int = 8,
        value_temperature: float = 0.0,
        max_model_calls: Optional[int] = None,
    ):
        if not callable(getattr(llm, "generate", None)):
            raise TypeError(
                f"llm must have a generate(prompts, max_new_tokens, temperature, stop) method, got {type(llm).__name__}"
            )
        for name, value in (("n_experts", n_experts), ("max_steps", max_steps), ("breadth", breadth),
                            ("max_new_tokens", max_new_tokens), ("value_max_new_tokens", value_max_new_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if max_model_calls is not None and (
            isinstance(max_model_calls, bool) or not isinstance(max_model_calls, int) or max_model_calls < 0
        ):
            raise ValueError(f"max_model_calls must be an int >= 0 or None, got {max_model_calls!r}")
        if search not in ("bfs", "dfs"):
            raise ValueError(f"search must be 'bfs' or 'dfs', got {search!r}")
        if evaluator == "model":
            evaluator = None
        if evaluator is not None and not callable(evaluator):
            raise TypeError(
                f"evaluator must be None, 'model' or a function (question, steps) -> value, got {evaluator!r}"
            )
        for name, value in (
            ("threshold", threshold),
            ("temperature", temperature),
            ("value_temperature", value_temperature),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {value!r}")
        if temperature < 0 or value_temperature < 0:
            raise ValueError(f"temperatures must be >= 0, got {temperature} and {value_temperature}")
        if task is None:
            task = ExpertsTask(n_experts)
        elif not isinstance(task, ReasoningTask):
            raise TypeError(f"task must be a ReasoningTask, got {type(task).__name__}")
        self.llm = llm
        self.n_experts = n_experts
        self.max_steps = max_steps
        self.breadth = breadth
        self.evaluator = evaluator
        self.threshold = float(threshold)
        self.search = search
        self.task = task
        self.max_new_tokens = max_new_tokens
        self.temperature = float(temperature)
        self.value_max_new_tokens = value_max_new_tokens
        self.value_temperature = float(value_temperature)
        self.max_model_calls = max_model_calls

    # -- one search -------------------------------------------------------------------------

    def solve(self, question: str) -> ToTResult:
        """Search for an answer to `question`; see `ToTResult`."""
        if not isinstance(question, str):
            raise TypeError(f"question must be a str, got {type(question).__name__}")
        self._question = question
        self._llm = _CountedLLM(self.llm, self.max_model_calls)
        self._order = itertools.count()
        root = Node(step=question)
        final = None
        try:
            final = self._bfs(root) if self.search == "bfs" else self._dfs(root)
        except _BudgetExhausted:
            pass
        if final is not None:
            path, answer = final.path(), final.answer
        else:
            path, answer = self._best_line(root), None
        return ToTResult(
            question=question, answer=answer, path=path, tree=root, model_calls=self._llm.calls,
            prompt_tokens=self._llm.prompt_tokens, completion_tokens=self._llm.completion_tokens, search=self.search,
        )

    def _bfs(self, root: Node) -> Optional[Node]:
        beam = [root]
        for _ in range(self.max_steps):
            children = self._expand(beam)
            final = self._judge(children)
            if final is not None:
                return final
            beam = self._select(children)
            if not beam:
                return None
        return None

    def _dfs(self, node: Node) -> Optional[Node]:
        if node.depth >= self.max_steps:
            return None
        children = self._expand([node])
        final = self._judge(children)
        if final is not None:
            return final
        for child in self._select(children):
            final = self._dfs(child)
            if final is not None:
                return final
        return None

    # -- the steps of a round ---------------------------------------------------------------

    def _generate(self, prompts: List[str], max_new_tokens: int, temperature: float) -> List[str]:
        return self._llm.generate(prompts, max_new_tokens, temperature, list(self.task.stop))

    def _expand(self, nodes: List[Node]) -> List[Node]:
        """Every expert proposes a step for every node in one batched call; the task reads each
        proposal (INVALID when unusable, DUPLICATE when an earlier expert on the same line said
        the same) and spots final answers."""
        prompts, steps_of = [], []
        for node in nodes:
            node.order = next(self._order)
            steps, experts = node.steps(), node.experts()
            steps_of.append(steps)
            for expert in range(1, self.n_experts + 1):
                prompts.append(self.task.propose_prompt(self._question, steps, experts, expert))
        outputs = iter(self._generate(prompts, self.max_new_tokens, self.temperature))
        children = []
        for node, steps in zip(nodes, steps_of):
            seen = {}
            for expert in range(1, self.n_experts + 1):
                raw = next(outputs)
                step = self.task.normalize_step(self._question, steps, raw)
                child = Node(
                    step=step if step is not None else "", expert=expert, depth=node.depth + 1, parent=node, raw=raw
                )
                node.children.append(child)
                if step is None:
                    child.status = INVALID
                    continue
                if step in seen:
                    child.status = DUPLICATE
                    seen[step].votes += 1
                    continue
                seen[step] = child
                child.status = KEPT  # provisional until judged
                child.answer = self.task.final_answer(self._question, steps + [step])
                children.append(child)
        return children

    def _judge(self, children: List[Node]) -> Optional[Node]:
        """Score the usable children; experts below the threshold leave (PRUNED). Returns the
        final node when an expert reached an answer (the best judged one), else None."""
        if self.task.verifies_answers:
            finals = [c for c in children if c.answer is not None]
            if finals:
                for child in children:
                    child.status = UNJUDGED
                finals[0].status = FINAL
                return finals[0]
        if not children:
            return None
        if self.evaluator is None:
            asked = [self.task.value_prompts(self._question, c.steps(), c.experts()) for c in children]
            bad = [p for p in asked if not isinstance(p, list) or not all(isinstance(x, str) for x in p)]
            if bad:
                raise TypeError(f"task.value_prompts must return a list of str prompts, got {bad[0]!r}")
            flat = [p for ps in asked for p in ps]  # a task may value a step without asking (an empty list)
            outputs = iter(self._generate(flat, self.value_max_new_tokens, self.value_temperature) if flat else [])
            values = []
            for child, prompts in zip(children, asked):
                replies = [next(outputs) for _ in prompts]
                child.judgement = " | ".join(replies) if replies else None
                values.append(self.task.judge_replies(self._question, child.steps(), replies))
        else:
            values = [self.evaluator(self._question, c.steps()) for c in children]
        for child, value in zip(children, values):
            child.value = None if value is None else float(value)
            # `not >=` so that NaN, like None, counts as judged wrong.
            if child.value is None or not child.value >= self.threshold:
                child.status = PRUNED
        finals = [c for c in children if c.status == KEPT and c.answer is not None]
        if not finals:
            return None
        best = max(finals, key=lambda c: (c.line_value, c.votes))  # max keeps the first of equal keys
        best.status = FINAL
        return best

    def _select(self, children: List[Node]) -> List[Node]:
        """The best `breadth` surviving children, best line value first (ties: more votes, then
        proposal order); the other survivors are DROPPED."""
        survivors = sorted((c for c in children if c.status == KEPT), key=lambda c: (-c.line_value, -c.votes))
        for child in survivors[self.breadth:]:
            child.status = DROPPED
        return survivors[: self.breadth]

    @staticmethod
    def _best_line(root: Node) -> List[Node]:
        """Without an answer: the deepest line still standing, highest line value first."""
        standing = [n for n in root.walk() if n.status == KEPT]
        if not standing:
            return []
        best = max(standing, key=lambda n: (n.depth, n.line_value))
        return best.path()


_EXPERT_LINE = re.compile(r"^\s*Expert\s+(\d+)\s*:\s*(.*?)\s*$", re.IGNORECASE)
_ANSWER = re.compile(r"answer\s*:\s*(.+?)\s*$", re.IGNORECASE)


def ask_experts(llm, question: str, n_experts: int = 3, task: Optional[ReasoningTask] = None,
                max_new_tokens: int = 128, temperature: float = 0.0) -> ToTResult:
    """The single-prompt variant: one `generate` call on `task.single_prompt` (the "imagine
    n experts" template), no search and no evaluator.

    The generated `Expert k: step` lines become the tree (each expert's lines a chain under the
    root, whose `raw` holds the whole generation); the first `Answer: X` line whose answer the
    task accepts (`check_answer`) is the answer, and the path is the chain of the expert who gave
    it (or of the expert with the most steps). Raises as `TreeOfThought` does on bad input.
    """
    # The same argument checks as the search.
    task = TreeOfThought(
        llm, n_experts=n_experts, task=task, max_new_tokens=max_new_tokens, temperature=temperature
    ).task
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    counted = _CountedLLM(llm)
    text = counted.generate([task.single_prompt(question, n_experts)], max_new_tokens, temperature, stop=[])[0]
    root = Node(step=question, raw=text)
    last = {}  # expert -> its latest node
    answer_node = None
    for line in text.split("\n"):
        match = _EXPERT_LINE.match(line)
        if match is None:
            continue
        expert, step = int(match.group(1)), match.group(2)
        parent = last.get(expert, root)
        node = Node(step=step, expert=expert, depth=parent.depth + 1, parent=parent, raw=line, status=KEPT)
        parent.children.append(node)
        last[expert] = node
        found = _ANSWER.search(step)
        if answer_node is None and found is not None:
            node.answer = task.check_answer(question, found.group(1))
            if node.answer is not None:
                node.status = FINAL
                answer_node = node
    if answer_node is not None:
        path = answer_node.path()
    else:
        path = max(last.values(), key=lambda n: n.depth).path() if last else []
    return ToTResult(
        question=question, answer=answer_node.answer if answer_node else None, path=path, tree=root,
        model_calls=counted.calls, prompt_tokens=counted.prompt_tokens, completion_tokens=counted.completion_tokens,
        search="single-prompt",
    )


def self_consistency(llm, question: str, n_chains: int = 16, task: Optional[ReasoningTask] = None,
                     max_steps: int = 4, max_new_tokens: int = 64, temperature: float = 0.7) -> ToTResult:
    """Self-consistency (Wang et al. 2022), the chain-of-thought baseline a search is measured
    against at equal budget: `n_chains` independent chains sampled step by step (every live
    chain's next step in ONE batched call per step, no judge), and the answer most chains reach
    (ties: the one reached first). A chain ends at its final answer, at an unusable step, or
    after `max_steps`. The tree holds the chains under the root (each node's `expert` is its chain's
    number; every chain is prompted as expert 1); the path is the first chain that
    reached the answer. Raises as `TreeOfThought` does on bad input."""
    if isinstance(n_chains, bool) or not isinstance(n_chains, int) or n_chains < 1:
        raise ValueError(f"n_chains must be an int >= 1, got {n_chains!r}")
    # The same argument checks as the search.
    task = TreeOfThought(llm, n_experts=1, max_steps=max_steps, task=task, max_new_tokens=max_new_tokens,
                         temperature=temperature).task
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    counted = _CountedLLM(llm)
    root = Node(step=question)
    live = [root] * n_chains  # the last node of every chain still going
    finals: List[Node] = []
    for _ in range(max_steps):
        if not live:
            break
        prompts = [task.propose_prompt(question, node.steps(), node.experts(), 1) for node in live]
        outputs = counted.generate(prompts, max_new_tokens, temperature, list(task.stop))
        going = []
        for chain, (node, raw) in enumerate(zip(live, outputs), 1):
            step = task.normalize_step(question, node.steps(), raw)
            child = Node(step=step or "", expert=chain, depth=node.depth + 1, parent=node, raw=raw,
                         status=KEPT if step is not None else INVALID)
            node.children.append(child)
            if step is None:
                continue
            child.answer = task.final_answer(question, child.steps())
            if child.answer is not None:
                child.status = FINAL
                finals.append(child)
            else:
                going.append(child)
        live = going
    answer, path = None, []
    if finals:
        answer = collections.Counter(n.answer for n in finals).most_common(1)[0][0]  # ties: first reached
        path = next(n for n in finals if n.answer == answer).path()
    return ToTResult(
        question=question, answer=answer, path=path, tree=root, model_calls=counted.calls,
        prompt_tokens=counted.prompt_tokens, completion_tokens=counted.completion_tokens, search="self-consistency",
    )
