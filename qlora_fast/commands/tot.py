"""`qlora-fast tot`: Tree-of-Thought reasoning with a group of experts on a shipped task
(Game of 24), printing the solve rate, the model calls and the tokens spent."""
import os
import sys

from qlora_fast.commands import (HelpFormatter, add_base_model_arguments, finite_float, nonnegative_float, positive_int,
                                 resolve_device)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tot",
        help="run Tree-of-Thought reasoning (a group of experts) on a task and report solve rate, calls, tokens",
        description="Tree-of-Thought search with a group of experts: every expert proposes a step per "
        "round (one batched generate call), the model judges each step through a value prompt, experts "
        "judged wrong leave. Prints the solve rate, model calls and tokens.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--task", choices=["game24"], default="game24", help="the task to solve (Game of 24: reach 24 from four numbers)")
    p.add_argument("--model", default="builtin",
                   help="'builtin' for the tiny built-in base model (pretrained and cached on first use), "
                   "or a local Hugging Face causal LM directory")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="an adapter saved by qlora_fast.peft (e.g. by `qlora-fast finetune`) to load on the built-in model")
    add_base_model_arguments(p)
    p.add_argument("--puzzles", type=positive_int, default=10, help="how many shipped puzzles to run (ignored with --puzzle)")
    p.add_argument("--puzzle", action="append", default=None, metavar='"A B C D"',
                   help="a puzzle to run, e.g. --puzzle '4 6 8 13' (repeatable; replaces --puzzles)")
    p.add_argument("--seed", type=int, default=0, help="seed for the choice of puzzles and for sampling")
    p.add_argument("--prompting", choices=["search", "single"], default="search",
                   help="'search': the Tree-of-Thought search; 'single': the single-prompt 'imagine N experts' "
                   "variant (one generation per puzzle, no search, no judge) for comparison")
    p.add_argument("--search", choices=["bfs", "dfs"], default="bfs", help="breadth-first with a beam, or depth-first with backtracking")
    p.add_argument("--n-experts", type=positive_int, default=3, help="experts proposing a step for each line of reasoning")
    p.add_argument("--breadth", type=positive_int, default=3, help="beam width (BFS) / most children explored per node (DFS)")
    p.add_argument("--max-steps", type=positive_int, default=3, help="most steps on a line (Game of 24 needs 3)")
    p.add_argument("--threshold", type=finite_float, default=0.5, help="steps judged below this value are wrong: their expert leaves")
    p.add_argument("--temperature", type=nonnegative_float, default=0.7, help="sampling temperature of the proposals (0 = greedy)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="most tokens of one proposed step (default 20), or of the whole discussion with --prompting single (default 200)")
    p.add_argument("--value-max-new-tokens", type=positive_int, default=8, help="most tokens of one judgement")
    p.add_argument("--max-model-calls", type=positive_int, default=None, help="give up a puzzle after this many model calls")
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
        return BuiltinLM.from_pretrained(adapter=adapter, cache_dir=cache_dir, device=device, seed=seed, tokenizer=tokenizer,
                                         progress=progress)
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


def run(args) -> int:
    from tqdm.auto import tqdm

    from qlora_fast.reasoning import TreeOfThought, ask_experts
    from qlora_fast.reasoning import game24

    if args.puzzle:
        puzzles = [" ".join(str(x) for x in game24.parse_numbers(p)) for p in args.puzzle]
    else:
        puzzles = [" ".join(map(str, p)) for p in game24.puzzles(args.puzzles, seed=args.seed)]
    device = resolve_device(args.device)
    task = game24.Game24Task()
    max_new_tokens = args.max_new_tokens or (200 if args.prompting == "single" else 20)
    try:
        llm = load_llm(args.model, device, cache_dir=args.cache_dir, seed=args.seed, adapter=args.adapter,
                       tokenizer=args.tokenizer, progress=not args.no_progress)
        tot = TreeOfThought(
            llm, n_experts=args.n_experts, max_steps=args.max_steps, breadth=args.breadth, threshold=args.threshold,
            search=args.search, task=task, max_new_tokens=max_new_tokens,
            temperature=args.temperature, value_max_new_tokens=args.value_max_new_tokens,
            max_model_calls=args.max_model_calls,
        )
    except (ValueError, TypeError) as e:
        print(f"qlora-fast tot: error: {e}", file=sys.stderr)
        return 2

    def solve(puzzle):
        if args.prompting == "single":
            return ask_experts(llm, puzzle, n_experts=args.n_experts, task=task, max_new_tokens=max_new_tokens,
                               temperature=args.temperature)
        return tot.solve(puzzle)
    solved = calls = prompt_tokens = completion_tokens = 0
    for puzzle in tqdm(puzzles, desc="game24", unit="puzzle", disable=args.no_progress):
        result = solve(puzzle)
        solved += result.solved
        calls += result.model_calls
        prompt_tokens += result.prompt_tokens or 0
        completion_tokens += result.completion_tokens or 0
        status = f"solved: {result.answer}" if result.solved else "unsolved"
        tqdm.write(f"{puzzle}: {status} | model calls {result.model_calls} | tokens {result.tokens}")
        if args.show_tree:
            tqdm.write(result.outline())
    n = len(puzzles)
    how = "single prompt" if args.prompting == "single" else f"search: {args.search} | breadth: {args.breadth}"
    print(f"task: game24 | model: {args.model} | {how} | experts: {args.n_experts}")
    print(f"solve rate: {solved}/{n} ({100.0 * solved / n:.1f}%)")
    print(f"model calls: {calls} ({calls / n:.1f} per puzzle)")
    print(f"tokens: {prompt_tokens + completion_tokens} (prompt {prompt_tokens}, completion {completion_tokens})")
    return 0
