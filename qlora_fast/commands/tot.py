"""`qlora-fast tot`: Tree-of-Thought reasoning with a group of experts on a shipped task, printing
the solve rate, the model calls and the tokens spent.

Two tasks: Game of 24 (the paper's benchmark, for real models: `--model DIR`) and multi-step
arithmetic (`qlora_fast.reasoning.arithmetic`, the default on the built-in model, which can do
single sums of its corpus but no Game of 24). On arithmetic the command also runs, on the same
problems, one greedy chain and self-consistency at the group's budget (as many sampled chains as
the group's tokens buy, majority answer) and prints the three side by side: what the group of
experts and its judge buy. A run that solves nothing says that the model cannot do the task."""
import os
import sys

from qlora_fast.commands import (
    HelpFormatter,
    add_base_model_arguments,
    finite_float,
    nonnegative_float,
    positive_int,
    resolve_device,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tot",
        help="run Tree-of-Thought reasoning (a group of experts) on a task and report solve rate, calls, tokens",
        description="Tree-of-Thought search with a group of experts: every expert proposes a step per "
        "round (one batched generate call), the model judges each step through a value prompt, experts "
        "judged wrong leave. Prints the solve rate, model calls and tokens.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--task", choices=["arithmetic", "game24"], default=None,
                   help="'arithmetic': chains such as '12 plus 7 minus 5 plus 9' (the built-in model's corpus "
                   "teaches single sums); 'game24': reach 24 from four numbers (needs a real model). "
                   "Default: arithmetic on the built-in model, game24 on --model DIR")
    p.add_argument("--model", default="builtin",
                   help="'builtin' for the tiny built-in base model (pretrained and cached on first use), "
                   "or a local Hugging Face causal LM directory")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="an adapter saved by qlora_fast.peft (e.g. by `qlora-fast finetune`) to load on the "
                   "built-in model")
    add_base_model_arguments(p)
    p.add_argument("--puzzles", type=positive_int, default=None,
                   help="how many puzzles / problems to run (ignored with --puzzle; default 10, arithmetic 100)")
    p.add_argument("--puzzle", action="append", default=None, metavar='"A B C D"',
                   help="a puzzle to run, e.g. --puzzle '4 6 8 13' or --puzzle '12 plus 7 minus 5' "
                   "(repeatable; replaces --puzzles)")
    p.add_argument("--arithmetic-steps", type=positive_int, default=3,
                   help="operations in each generated arithmetic problem")
    p.add_argument("--seed", type=int, default=0, help="seed for the choice of puzzles and for sampling")
    p.add_argument("--prompting", choices=["search", "single"], default="search",
                   help="'search': the Tree-of-Thought search; 'single': the single-prompt 'imagine N experts' "
                   "variant (one generation per puzzle, no search, no judge) for comparison")
    p.add_argument("--search", choices=["bfs", "dfs"], default="bfs",
                   help="breadth-first with a beam, or depth-first with backtracking")
    p.add_argument("--n-experts", type=positive_int, default=None,
                   help="experts proposing a step for each line of reasoning (default 3; arithmetic 16)")
    p.add_argument("--checks", type=positive_int, default=24,
                   help="arithmetic: implied sums the judge asks about each step (1 = the inverse sum only, where "
                   "the corpus teaches it)")
    p.add_argument("--breadth", type=positive_int, default=None,
                   help="beam width (BFS) / most children explored per node (DFS) (default 3; arithmetic 1)")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="most steps on a line (default 3, what Game of 24 needs; arithmetic: the problem's operations)")
    p.add_argument("--threshold", type=finite_float, default=None,
                   help="steps judged below this value are wrong: their expert leaves "
                   "(default 0.5; arithmetic 0: the judge only ranks)")
    p.add_argument("--temperature", type=nonnegative_float, default=None,
                   help="sampling temperature of the proposals, 0 = greedy (default 0.7; arithmetic 1.0)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="most tokens of one proposed step (default 20; arithmetic 4), or of the whole discussion with "
                   "--prompting single (default 200)")
    p.add_argument("--value-max-new-tokens", type=positive_int, default=8, help="most tokens of one judgement")
    p.add_argument("--max-model-calls", type=positive_int, default=None,
                   help="give up a puzzle after this many model calls")
    p.add_argument("--device", default="auto", help="'auto' (cuda when present, else cpu), 'cpu', 'cuda', ...")
    p.add_argument("--show-tree", action="store_true", help="print each search tree as an indented outline")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run)


def load_llm(model: str, device, cache_dir=None, seed=None, adapter=None, tokenizer="bpe", progress=True):
    """The `llm` for `--model`: `BuiltinLM` on the built-in base model (with `adapter` loaded when
    given), or `HFCausalLM` on a local transformers directory (ValueError when it is neither)."""
    from qlora_fast.reasoning import BuiltinLM, HFCausalLM

    if model == "builtin":
        if adapter is not None and not os.path.isdir(adapter):
            raise ValueError(f"--adapter must be a directory written by qlora_fast.peft.save_adapter, got {adapter!r}")
        return BuiltinLM.from_pretrained(adapter=adapter, cache_dir=cache_dir, device=device, seed=seed,
                                         tokenizer=tokenizer, progress=progress)
    if adapter is not None:
        raise ValueError("--adapter applies to the built-in model only (--model builtin)")
    if not os.path.isdir(model):
        raise ValueError(f"--model must be 'builtin' or a local Hugging Face model directory, got {model!r}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if seed is not None:
        torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    hf_model = AutoModelForCausalLM.from_pretrained(model, local_files_only=True).to(device).eval()
    return HFCausalLM(hf_model, tokenizer)


# The arithmetic search's defaults (bench/RESULTS.md, "Tree-of-Thought on multi-step arithmetic").
ARITH_EXPERTS, ARITH_BREADTH, ARITH_THRESHOLD, ARITH_TEMPERATURE = 16, 1, 0.0, 1.0
_DEFAULTS = {  # task: n_experts, breadth, threshold, temperature, puzzles, step tokens
    "game24": (3, 3, 0.5, 0.7, 10, 20),
    "arithmetic": (ARITH_EXPERTS, ARITH_BREADTH, ARITH_THRESHOLD, ARITH_TEMPERATURE, 100, 4),
}


def _keep_every_step(question, steps):
    return 1.0


def _questions(args, task_name):
    from qlora_fast.reasoning import arithmetic, game24

    if task_name == "arithmetic":
        if args.puzzle:
            for q in args.puzzle:
                arithmetic.parse_question(q)
            return list(args.puzzle)
        return arithmetic.problems(args.puzzles, steps=args.arithmetic_steps, seed=args.seed)
    if args.puzzle:
        return [" ".join(str(x) for x in game24.parse_numbers(p)) for p in args.puzzle]
    return [" ".join(map(str, p)) for p in game24.puzzles(args.puzzles, seed=args.seed)]


class _Tally:
    """Totals of one way of solving over all questions."""

    def __init__(self):
        self.solved = self.calls = self.prompt_tokens = self.completion_tokens = self.steps = self.usable = 0
        self.chains = 0  # self-consistency: chains sampled, summed over questions

    def add(self, result, correct: bool):
        self.solved += correct
        self.calls += result.model_calls
        self.prompt_tokens += result.prompt_tokens or 0
        self.completion_tokens += result.completion_tokens or 0
        nodes = result.nodes()
        self.steps += len(nodes)
        self.usable += sum(n.status != "invalid" for n in nodes)


def run(args) -> int:
    from tqdm.auto import tqdm

    from qlora_fast.reasoning import TreeOfThought, arithmetic, ask_experts, game24, self_consistency

    task_name = args.task or ("arithmetic" if args.model == "builtin" else "game24")
    n_experts, breadth, threshold, temperature, n_puzzles, step_tokens = _DEFAULTS[task_name]
    n_experts = args.n_experts or n_experts
    breadth = args.breadth or breadth
    threshold = threshold if args.threshold is None else args.threshold
    temperature = temperature if args.temperature is None else args.temperature
    args.puzzles = args.puzzles or n_puzzles
    max_new_tokens = args.max_new_tokens or (200 if args.prompting == "single" else step_tokens)
    device = resolve_device(args.device)
    try:
        if task_name == "arithmetic" and args.prompting == "single":
            raise ValueError("--prompting single has no arithmetic variant: use --task game24, or the search")
        questions = _questions(args, task_name)
        task = arithmetic.ArithmeticTask(args.checks) if task_name == "arithmetic" else game24.Game24Task()
        max_steps = args.max_steps or 3
        if task_name == "arithmetic":  # every problem needs exactly its operations as steps
            max_steps = args.max_steps or max(len(arithmetic.parse_question(q)[1]) for q in questions)
        llm = load_llm(args.model, device, cache_dir=args.cache_dir, seed=args.seed, adapter=args.adapter,
                       tokenizer=args.tokenizer, progress=not args.no_progress)
        tot = TreeOfThought(
            llm, n_experts=n_experts, max_steps=max_steps, breadth=breadth, threshold=threshold,
            search=args.search, task=task, max_new_tokens=max_new_tokens,
            temperature=temperature, value_max_new_tokens=args.value_max_new_tokens,
            max_model_calls=args.max_model_calls,
        )
        # The baseline on arithmetic: one expert, greedy, every step kept (no judge): one chain.
        chain = TreeOfThought(llm, n_experts=1, max_steps=max_steps, breadth=1, evaluator=_keep_every_step,
                              task=task, max_new_tokens=max_new_tokens, temperature=0.0)
    except (ValueError, TypeError) as e:
        print(f"qlora-fast tot: error: {e}", file=sys.stderr)
        return 2

    def correct(question, result):
        if task_name == "arithmetic":
            return result.answer is not None and int(result.answer) == arithmetic.evaluate(question)
        return result.solved  # Game of 24 answers are verified exactly by the task

    def solve(question):
        if args.prompting == "single":
            return ask_experts(llm, question, n_experts=n_experts, task=task, max_new_tokens=max_new_tokens,
                               temperature=temperature)
        return tot.solve(question)
    group, one, voted = _Tally(), _Tally(), _Tally()
    unit = "puzzle" if task_name == "game24" else "problem"
    for question in tqdm(questions, desc=task_name, unit=unit, disable=args.no_progress):
        result = solve(question)
        ok = correct(question, result)
        group.add(result, ok)
        if task_name == "arithmetic":
            status = f"answer {result.answer} ({'right' if ok else f'wrong: {arithmetic.evaluate(question)}'})"
            baseline = chain.solve(question)
            one.add(baseline, correct(question, baseline))
            # Self-consistency at the group's budget: as many sampled chains as the group's tokens buy.
            n_chains = (
                max(1, round(result.tokens / baseline.tokens)) if result.tokens and baseline.tokens else n_experts
            )
            vote = self_consistency(llm, question, n_chains=n_chains, task=task, max_steps=max_steps,
                                    max_new_tokens=max_new_tokens, temperature=temperature)
            voted.add(vote, correct(question, vote))
            voted.chains += n_chains
            status += f" | one chain: {baseline.answer} | {n_chains} chains voting: {vote.answer}"
        else:
            status = f"solved: {result.answer}" if ok else "unsolved"
        tqdm.write(f"{question}: {status} | model calls {result.model_calls} | tokens {result.tokens}")
        if args.show_tree:
            tqdm.write(result.outline())
    n = len(questions)
    how = "single prompt" if args.prompting == "single" else f"search: {args.search} | breadth: {breadth}"
    print(f"task: {task_name} | model: {args.model} | {how} | experts: {n_experts}")
    print(f"solve rate: {group.solved}/{n} ({100.0 * group.solved / n:.1f}%)")
    print(f"model calls: {group.calls} ({group.calls / n:.1f} per {unit})")
    print(f"tokens: {group.prompt_tokens + group.completion_tokens} "
          f"(prompt {group.prompt_tokens}, completion {group.completion_tokens})")
    if task_name == "arithmetic":
        print(f"\n| {n} problems, {max_new_tokens} tokens a step | solved | model calls | tokens |\n|---|---|---|---|")
        rows = (
            ("one greedy chain", one),
            (f"self-consistency: {voted.chains / n:.0f} sampled chains (T={temperature:g}), majority answer", voted),
            (f"group of {n_experts} experts + judge of {args.checks} checks (T={temperature:g})", group),
        )
        for name, t in rows:
            print(f"| {name} | {t.solved}/{n} ({100.0 * t.solved / n:.1f}%) "
                  f"| {t.calls} ({t.calls / n:.1f} per problem) | {t.prompt_tokens + t.completion_tokens} |")
    if group.solved == 0 and (task_name == "game24" or one.solved == voted.solved == 0):
        hint = ("the built-in model is far too small for Game of 24: try --task arithmetic, or --model with a real LM"
                if task_name == "game24" and args.model == "builtin" else "try a larger model (--model DIR)")
        print(f"note: the model solved none of the {n} {unit}s ({group.usable} of {group.steps} proposed steps were "
              f"usable {unit} steps): it cannot do this task; {hint}.")
    return 0
