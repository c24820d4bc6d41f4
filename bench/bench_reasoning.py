"""Tree-of-Thought on the CPU: one batched `generate` call per round (what `BuiltinLM` does) vs
one call per expert's prompt (what a naive loop over experts does), on the built-in model's
architecture (`BASE_CONFIG`, random weights: speed does not depend on them).

- one round: 3 experts x a beam of 3 Game-of-24 propose prompts, 16 new tokens each, greedy;
- one whole search: `TreeOfThought` (3 experts, breadth 3, 3 steps, greedy) on a question, with
  every step kept by a user evaluator so that it runs all 3 rounds (3 + 9 + 9 proposals; a random
  model's Game-of-24 steps would all be rejected in the first round).

`pytest bench/bench_reasoning.py --benchmark-only` for pytest-benchmark tables;
`python bench/bench_reasoning.py` for a summary with ratios (used for RESULTS.md);
`python bench/bench_reasoning.py --solve N [--seed S] [--steps K]` for solve rates on multi-step
arithmetic with the pretrained built-in model (`solve_rates`): one greedy chain, self-consistency at
the judged group's token budget, a group of experts that only votes, and the group with the model's
own judge, on the same N problems of K steps (seed 1, 3 steps by default), calls and tokens side by
side; `--steps 1` gives per-step figures.
The summary also says whether both providers generated the same greedy text (left padding in
float32 may flip a near-tie).
"""
import time

import pytest
import torch

from qlora_fast.models import BASE_CONFIG, LlamaForCausalLM
from qlora_fast.reasoning import BuiltinLM, ExpertsTask, TreeOfThought, Usage
from qlora_fast.reasoning.game24 import Game24Task
from qlora_fast.tokenizer import ByteTokenizer

PUZZLE = "4 6 8 13"
ROUND_NEW_TOKENS = 16


class OnePromptAtATime:
    """The peer: the same model, one `generate` call per prompt."""

    def __init__(self, llm):
        self.llm = llm
        self.last_usage = None

    def generate(self, prompts, max_new_tokens, temperature, stop):
        outputs, prompt_tokens, completion_tokens = [], 0, 0
        for prompt in prompts:
            outputs += self.llm.generate([prompt], max_new_tokens=max_new_tokens, temperature=temperature, stop=stop)
            prompt_tokens += self.llm.last_usage.prompt_tokens
            completion_tokens += self.llm.last_usage.completion_tokens
        self.last_usage = Usage(prompt_tokens, completion_tokens)
        return outputs


def make_llm(provider):
    torch.manual_seed(0)
    llm = BuiltinLM(LlamaForCausalLM(BASE_CONFIG).eval(), ByteTokenizer())
    return llm if provider == "batched" else OnePromptAtATime(llm)


def round_prompts():
    task = Game24Task()
    lines = [[], ["4 + 6 = 10 (left: 8 10 13)"], ["13 - 8 = 5 (left: 4 5 6)"]]
    return [task.propose_prompt(PUZZLE, steps, [1] * len(steps), e) for steps in lines for e in (1, 2, 3)]


def one_round(llm):
    # stop=[] so every prompt decodes all ROUND_NEW_TOKENS tokens: equal work for both providers.
    return llm.generate(round_prompts(), max_new_tokens=ROUND_NEW_TOKENS, temperature=0.0, stop=[])


def whole_search(llm):
    tot = TreeOfThought(llm, task=ExpertsTask(3), n_experts=3, breadth=3, max_steps=3, temperature=0.0,
                        max_new_tokens=ROUND_NEW_TOKENS, evaluator=lambda q, steps: 1.0)
    return tot.solve("What is 12 times 3, plus 7?")


@pytest.mark.parametrize("provider", ["batched", "one_prompt_at_a_time"])
def test_round(benchmark, provider):
    llm = make_llm(provider)
    benchmark.group = "tot round (9 prompts x 16 tokens)"
    out = benchmark(one_round, llm)
    assert len(out) == 9


@pytest.mark.parametrize("provider", ["batched", "one_prompt_at_a_time"])
def test_search(benchmark, provider):
    llm = make_llm(provider)
    benchmark.group = "tot search (game24, 3 experts, breadth 3)"
    result = benchmark.pedantic(whole_search, args=(llm,), rounds=2, iterations=1)
    assert result.model_calls == 3


def _time(fn, *args, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - start)
    return best, out


def solve_rates(n: int, steps: int = 3, n_experts: int = 16, temperature: float = 1.0, seed: int = 1):
    """Correct answers, model calls and tokens of several ways of solving the same problems: one
    greedy chain, self-consistency at the judged group's token budget (per problem, as
    `qlora-fast tot` does), the group voting without a judge, with one check as judge (the inverse
    sum where the corpus teaches it), with the default judge (24 implied sums) at breadth 1 (the
    default) and 2. With steps=1 the
    rows are per-step figures: how often the line keeps the right sum (pass@k: any expert had it)."""
    from qlora_fast.models import load_base_model
    from qlora_fast.reasoning import ArithmeticTask, arithmetic, self_consistency

    model, tok = load_base_model(progress=False)
    llm, questions = BuiltinLM(model, tok, seed=seed), arithmetic.problems(n, steps, seed)
    keep = lambda q, s: 1.0  # noqa: E731
    sampled = dict(n_experts=n_experts, temperature=temperature, threshold=0.0)
    ways = {
        "one greedy chain": dict(n_experts=1, temperature=0.0, evaluator=keep),
        "self-consistency at the judged group's tokens": None,
        f"{n_experts} experts, majority vote per step, no judge": dict(sampled, evaluator=keep),
        f"{n_experts} experts + judge: the inverse sum only (checks=1)": dict(sampled, task=ArithmeticTask(1)),
        f"{n_experts} experts + judge: 24 implied sums (the `tot` default)": dict(sampled),
        f"{n_experts} experts + judge: 24 implied sums, breadth 2": dict(sampled, breadth=2),
    }
    default = next(k for k in ways if "default" in k)
    chain_tokens, group_tokens = {}, {}
    print(f"| {n} problems of {steps} steps, seed {seed}, built-in model | solved | model calls | tokens "
          f"| wall s |" + (" pass@k |" if steps == 1 else ""))
    print("|---|---|---|---|---|" + ("---|" if steps == 1 else ""))
    for name in sorted(ways, key=lambda k: k.startswith("self-")):  # self-consistency last: it needs both budgets
        kwargs = None if ways[name] is None else {"breadth": 1, "task": ArithmeticTask(), **ways[name]}
        tot = None if kwargs is None else TreeOfThought(llm, max_steps=steps, max_new_tokens=4, **kwargs)
        start, solved, calls, tokens, any_right = time.perf_counter(), 0, 0, 0, 0
        for q in questions:
            if tot is None:
                n_chains = max(1, round(group_tokens[q] / chain_tokens[q]))
                r = self_consistency(llm, q, n_chains=n_chains, task=ArithmeticTask(), max_steps=steps,
                                     max_new_tokens=4, temperature=temperature)
            else:
                r = tot.solve(q)
            right = arithmetic.evaluate(q)
            solved += r.answer is not None and int(r.answer) == right
            any_right += any(node.answer is not None and int(node.answer) == right for node in r.nodes())
            calls, tokens = calls + r.model_calls, tokens + r.tokens
            if name == "one greedy chain":
                chain_tokens[q] = r.tokens
            elif name == default:
                group_tokens[q] = r.tokens
        print(f"| {name} | {solved}/{n} ({100 * solved / n:.1f}%) | {calls / n:.1f} per problem "
              f"| {tokens / n:.0f} per problem | {time.perf_counter() - start:.0f} |"
              + (f" {100 * any_right / n:.1f}% |" if steps == 1 else ""), flush=True)


if __name__ == "__main__":
    import sys

    if "--solve" in sys.argv:
        seed = int(sys.argv[sys.argv.index("--seed") + 1]) if "--seed" in sys.argv else 1
        steps = int(sys.argv[sys.argv.index("--steps") + 1]) if "--steps" in sys.argv else 3
        solve_rates(int(sys.argv[sys.argv.index("--solve") + 1]), steps=steps, seed=seed)
        sys.exit(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    batched, naive = make_llm("batched"), make_llm("one_prompt_at_a_time")
    t_b, out_b = _time(one_round, batched)
    t_n, out_n = _time(one_round, naive)
    tokens = batched.last_usage.completion_tokens
    print(f"one round, 9 prompts x {ROUND_NEW_TOKENS} tokens: batched {t_b * 1e3:.0f} ms ({tokens / t_b:.0f} tok/s), "
          f"one prompt at a time {t_n * 1e3:.0f} ms ({tokens / t_n:.0f} tok/s), speed-up x{t_n / t_b:.2f}; "
          f"same text: {out_b == out_n}")
    s_b, r_b = _time(whole_search, batched, repeat=1)
    s_n, r_n = _time(whole_search, naive, repeat=1)
    print(f"whole search ({len(r_b.nodes())} proposals in {r_b.model_calls} batched calls, "
          f"{r_b.tokens} tokens): batched {s_b:.2f} s, one prompt at a time {s_n:.2f} s, speed-up x{s_n / s_b:.2f}")
