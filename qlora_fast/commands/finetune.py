"""`qlora-fast finetune`: the end-to-end job (`make demo`).

Loads the tiny built-in base model (pretrained on the shipped corpus on first use and cached) or
a local Hugging Face model directory (`--model DIR`), wraps it with the chosen PEFT method (QLoRA:
NF4 base with double quantization + LoRA adapters), instruction-tunes it on the shipped
instruction set with the paged 8-bit AdamW, and prints a report: trainable/total parameters,
bytes of the 4-bit base vs bf16, peak memory, held-out perplexity and exact-match accuracy
before and after tuning, and where the adapter was saved. Under `torchrun --nproc_per_node N`
it trains with DDP (gloo on the CPU); rank 0 reports and saves. With `--fsdp` (under torchrun,
LoRA/QLoRA) the model is sharded with FSDP2 instead (`qlora_fast.distributed.shard_qlora_model`:
4-bit weights that cannot be split on block boundaries stay whole on every rank); the final
adapter is gathered and saved once by rank 0 in the usual PEFT format; --checkpoint-every writes
sharded checkpoint folders (`--output/checkpoint-<step>`, torch.distributed.checkpoint) that
--resume continues on the same number of ranks.
"""
import contextlib
import os
import resource
import sys
import time

from qlora_fast.commands import (
    DeprecatedAliases,
    HelpFormatter,
    add_base_model_arguments,
    add_resume_arguments,
    add_training_arguments,
    check_fresh_start,
    check_output,
    finite_float,
    nonnegative_float,
    nonnegative_int,
    note_resume_at_end,
    positive_float,
    positive_int,
    remove_checkpoints,
    resolve_device,
    resume_mode,
)

METHODS = ("lora", "qlora", "prefix", "prompt")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="instruction-tune a model with LoRA/QLoRA/prefix/prompt tuning and report before/after quality",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--method", choices=METHODS, default="qlora", help="PEFT method")
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="local Hugging Face causal LM directory; default: the built-in tiny base model")
    add_base_model_arguments(parser)
    parser.add_argument(
        "--pretrain-steps",
        type=positive_int,
        default=None,
        help="pretraining steps of the built-in base model (default: its recipe's; a new value trains and caches a "
        "new base)",
    )
    parser.add_argument("--max-steps", "--steps", dest="steps", action=DeprecatedAliases, type=positive_int,
                        metavar="N", default=200, help="optimizer steps")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="examples per micro-batch")
    parser.add_argument("--gradient-accumulation-steps", "--grad-accum", dest="grad_accum", action=DeprecatedAliases,
                        metavar="N", type=positive_int, default=1, help="micro-batches per optimizer step")
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help="peak learning rate (default: 5e-3 for LoRA/QLoRA, 1e-2 for prefix/prompt)",
    )
    parser.add_argument(
        "--warmup-steps", type=nonnegative_int, default=15, help="linear warmup steps before the cosine decay"
    )
    parser.add_argument("--r", type=positive_int, default=8, help="LoRA rank")
    parser.add_argument("--lora-alpha", "--alpha", dest="alpha", action=DeprecatedAliases, type=finite_float,
                        default=16.0, help="LoRA alpha (scaling alpha / r; --alpha is its deprecated spelling)")
    parser.add_argument("--lora-dropout", type=nonnegative_float, default=0.0, help="LoRA dropout")
    parser.add_argument("--rslora", action="store_true", help="rank-stabilised LoRA scaling alpha / sqrt(r)")
    parser.add_argument(
        "--target-modules",
        default=None,
        help="comma-separated module names for LoRA, a regex when it starts with 're:', or 'all-linear' "
        "(default: the architecture's attention and MLP projections, e.g. q/k/v/o/gate/up/down_proj "
        "on Llama, c_attn/c_proj/c_fc on GPT-2)",
    )
    parser.add_argument("--num-virtual-tokens", type=positive_int, default=16, help="prefix / soft prompt length")
    parser.add_argument("--prefix-projection", action="store_true", help="prefix tuning through an MLP (Li & Liang)")
    parser.add_argument(
        "--max-seq-len", type=positive_int, default=96, help="tokens per training example (longer ones are cut)"
    )
    parser.add_argument("--packing", action="store_true", help="pack several examples per row")
    parser.add_argument(
        "--eval-pairs", type=positive_int, default=160, help="held-out pairs used for perplexity and exact match"
    )
    parser.add_argument(
        "--eval-every",
        type=nonnegative_int,
        default=0,
        help="evaluate held-out perplexity every N steps (0: only before/after)",
    )
    add_resume_arguments(parser, "--output")
    parser.add_argument("--max-new-tokens", type=positive_int, default=12, help="generation length for exact match")
    parser.add_argument("--output", default="qlora_fast_output", help="directory for the adapter and checkpoints")
    parser.add_argument("--fsdp", action="store_true",
                        help="with --nproc N or under torchrun: shard the model with FSDP2 instead of DDP "
                             "(lora/qlora; sharded checkpoints)")
    parser.add_argument("--nproc", type=positive_int, default=None, metavar="N",
                        help="launch N processes on this machine with torchrun (torch.distributed.run --standalone) "
                             "running this same command: DDP, or FSDP2 with --fsdp")
    add_training_arguments(parser)
    parser.set_defaults(func=run, parser=parser)


def _init_distributed(device, fsdp: bool = False) -> int:
    """Under torchrun (WORLD_SIZE > 1, or any WORLD_SIZE with --fsdp) join the process group (gloo
    on the CPU, nccl on CUDA) so SFTTrainer trains with DDP / FSDP2; returns this process's rank
    (0 without torchrun)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not fsdp:
        return 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank()


def _peak_memory(device) -> str:
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    text = f"peak process RSS {rss / 2**20:.0f} MiB"
    if device.type == "cuda":
        text += f", peak CUDA allocated {torch.cuda.max_memory_allocated(device) / 2**20:.1f} MiB"
    return text


def _four_bit_weight_bytes(model):
    """(bytes, weights) of the 4-bit layers' weights alone: packed codes + per-block statistics,
    biases left out, so bytes * 8 / weights is the bits per weight."""
    from qlora_fast.peft.memory import four_bit_weights

    nbytes = n = 0
    for weight, state in four_bit_weights(model):
        nbytes += weight.numel() * weight.element_size() + state.statistics_bytes()
        n += state.numel
    return nbytes, n


def _dense_dtype(model) -> str:
    """The dtype of the frozen floating-point weights (the model was loaded in it: float32 here)."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            return str(p.dtype).replace("torch.", "")
    return "float32"


def _peft_config(args):
    from qlora_fast.peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig

    if args.method in ("lora", "qlora"):
        targets = args.target_modules  # None: the architecture's usual targets (peft.default_lora_targets)
        if targets is not None and targets != "all-linear":
            targets = targets[3:] if targets.startswith("re:") else [t.strip() for t in targets.split(",") if t.strip()]
        return LoraConfig(target_modules=targets, r=args.r, lora_alpha=args.alpha, lora_dropout=args.lora_dropout,
                          use_rslora=args.rslora, quantize_base="nf4" if args.method == "qlora" else None)
    if args.method == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=args.num_virtual_tokens, prefix_projection=args.prefix_projection)
    return PromptTuningConfig(num_virtual_tokens=args.num_virtual_tokens, init="text",
                              init_text="Answer the instruction with a short exact response.")


def _check_fsdp_args(args) -> None:
    if args.method not in ("lora", "qlora"):
        raise ValueError(f"--fsdp shards LoRA/QLoRA models only, got --method {args.method} (use DDP: drop --fsdp)")
    if "WORLD_SIZE" not in os.environ and args.nproc is None:
        raise ValueError("--fsdp needs several processes: add --nproc N, or run "
                         "`torchrun --nproc-per-node N -m qlora_fast.cli finetune --fsdp ...`")


def _context_limit(model):
    """(positions, "config.<name>") of a Hugging Face model with a hard position limit (a learned
    position table: GPT-2, OPT, ...), or None. Rotary models (Llama, Mistral, GPT-NeoX, ...) compute
    their positions and run past max_position_embeddings (trained or not, that is the user's call)."""
    config = getattr(model, "config", None)
    rotary = any(getattr(config, name, None) is not None for name in ("rope_theta", "rope_parameters", "rope_scaling"))
    if rotary or any("rotary" in name for name, _ in model.named_modules()):
        return None
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value, f"config.{name}"
    return None


def _check_context(args, model, tokenizer, train_pairs, eval_pairs, template) -> None:
    """ValueError naming the flag when a sequence this run feeds the model (virtual tokens + the
    training rows, the evaluation rows, or a prompt + --max-new-tokens) is longer than its
    context: `max_position_embeddings` / `n_positions` of a Hugging Face model."""
    from qlora_fast.train.sft import encode_example

    limit = _context_limit(model)
    if limit is None:
        return
    limit, field = limit
    virtual = args.num_virtual_tokens if args.method in ("prefix", "prompt") else 0
    context = f"the model's context of {limit} positions ({field})"
    if virtual >= limit:
        raise ValueError(f"--num-virtual-tokens {virtual} leaves no room for any token in {context}")
    room = limit - virtual
    plus = f" + --num-virtual-tokens {virtual}" if virtual else ""
    if args.packing and args.max_seq_len > room:
        raise ValueError(f"--max-seq-len {args.max_seq_len}{plus} exceeds {context} (--packing fills every row to "
                         f"--max-seq-len): use --max-seq-len {room} or less")
    encoded = [encode_example(tokenizer, p["instruction"], p["output"], template) for p in train_pairs + eval_pairs]
    longest = min(max(len(ids) for ids, _ in encoded), args.max_seq_len)  # rows are cut to --max-seq-len
    # exact match generates after each held-out prompt, whole
    prompt = max(sum(t == -100 for t in labels) for _, labels in encoded[len(train_pairs):])
    if longest > room:
        fewer = f" or --num-virtual-tokens {limit - longest} or less" if virtual and limit > longest else ""
        raise ValueError(f"examples of up to {longest} tokens (at --max-seq-len {args.max_seq_len}){plus} exceed "
                         f"{context}: use --max-seq-len {room} or less{fewer}")
    if prompt + args.max_new_tokens > room:
        raise ValueError(f"the longest prompt ({prompt} tokens) + --max-new-tokens {args.max_new_tokens}{plus} "
                         f"exceeds {context}: use --max-new-tokens {max(room - prompt, 0)} or less")


def _report_history(args, history, rank) -> None:
    """Print the held-out evaluations of --eval-every (one line each) and write the per-step history
    (train loss, lr, grad norm, and eval loss / perplexity at the evaluation steps) to
    --output/history.json, atomically (rank 0)."""
    import json

    from qlora_fast.utils import atomic_write_bytes

    evaluations = [h for h in history if "eval_perplexity" in h]
    if evaluations:
        print("held-out perplexity during training (--eval-every):")
        for h in evaluations:
            print(f"  step {h['step']:>5}: train loss {h['loss']:.4f}, lr {h['lr']:.3g}, held-out loss "
                  f"{h['eval_loss']:.4f}, perplexity {h['eval_perplexity']:.3f}")
    if rank == 0:
        path = os.path.join(args.output, "history.json")
        atomic_write_bytes(path, (json.dumps({"history": history}, indent=1) + "\n").encode())
        print(f"training history written to {os.path.abspath(path)}")


def _full_adapter(model) -> dict:
    """The adapter's full tensors on every rank (collective under FSDP2: every rank calls it),
    gathered from their DTensor shards; the frozen base stays sharded."""
    import torch
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().contiguous()
                for name, p in model.adapter_parameters()}


def _launch(args) -> int:
    """`--nproc N`: run this command (without --nproc) as `torchrun --standalone --nproc-per-node N`
    would (torch.distributed.run, in this process: a free local port, N workers) and return 0, or
    1 when a worker failed (its error is printed by torchrun)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if "WORLD_SIZE" in os.environ:
        raise ValueError("--nproc launches torchrun itself: drop --nproc when running under torchrun")
    if resolve_device(args.device).type == "cuda":
        import torch

        if args.nproc > torch.cuda.device_count():
            raise ValueError(f"--nproc {args.nproc} needs one CUDA device per process; {torch.cuda.device_count()} "
                             "visible (or use --device cpu: gloo)")
    command = ["--debug"] if args.debug else []
    command.append("finetune")
    for action in args.parser._actions:  # the parsed options, spelled out again
        value = getattr(args, action.dest, None)
        if not action.option_strings or action.dest in ("help", "nproc") or value is None or value is False:
            continue
        name = next(o for o in action.option_strings if o.startswith("--"))  # the long one, never a deprecated alias
        command.append(name if value is True else f"{name}={value}")
    launch = torchrun.get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={args.nproc}", "-m", "qlora_fast.cli"])
    launch.training_script_args = command  # set here: torchrun's own parser would take --r=8 for --rdzv-*
    sys.stdout.flush()
    try:
        torchrun.run(launch)
    except ChildFailedError:
        return 1
    return 0


def run(args) -> int:
    import torch  # here, not at import: `qlora-fast --help` should not load torch

    if args.model and not os.path.isdir(args.model):
        raise FileNotFoundError(
            f"--model must be a local Hugging Face model directory, got {args.model!r} (no such directory)"
        )
    if args.fsdp:
        _check_fsdp_args(args)
    if args.fsdp and (args.resume or args.resume_if_exists):  # sharded checkpoint folders, checked now
        from qlora_fast.distributed import resolve_sharded_resume

        resolve_sharded_resume("latest", args.output, allow_fresh=bool(args.resume_if_exists))
        resume_from, allow_fresh = "latest", bool(args.resume_if_exists)
    else:
        resume_from, allow_fresh = resume_mode(args, args.output)
    check_fresh_start(args)  # a fresh start never mixes its checkpoints with an earlier run's
    if args.nproc is not None:  # the checks above ran once, before any process starts
        return _launch(args)
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # torchrun: one GPU per local rank
        torch.cuda.set_device(device)
    rank = _init_distributed(device, args.fsdp)
    # Before any work: --output must be writable, and no other run may be writing it (rank 0 writes).
    with (check_output(args.output) if rank == 0 else contextlib.nullcontext()):
        if rank == 0:
            remove_checkpoints(args)  # --overwrite-output: the earlier run's, before any work
        return _run(args, device, rank, resume_from, allow_fresh)


def _run(args, device, rank, resume_from, allow_fresh) -> int:
    import torch

    from qlora_fast.data import load_instructions
    from qlora_fast.peft import base_weight_bytes, get_peft_model
    from qlora_fast.train.sft import SFTConfig, SFTTrainer, evaluate_loss, exact_match, scored_pairs
    from qlora_fast.utils import check_finite_state

    if rank:  # under torchrun only rank 0 reports, shows bars and writes files
        sys.stdout = open(os.devnull, "w")
    progress = not args.no_progress and rank == 0
    started = time.time()
    # The configs first: a bad value fails before the model is loaded (or pretrained).
    peft_config = _peft_config(args)
    lr = args.lr if args.lr is not None else (5e-3 if args.method in ("lora", "qlora") else 1e-2)
    # Kept as given (a run stopped early and resumed with a larger --max-steps keeps its schedule),
    # but said: this run alone never reaches --lr.
    warmup = args.warmup_steps
    if warmup > args.steps:
        print(f"note: --warmup-steps {warmup} is more than --max-steps {args.steps}: the learning rate stays below "
              f"--lr in this run")
    config = SFTConfig(
        max_steps=args.steps, batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum, lr=lr,
        warmup_steps=warmup,
        max_seq_len=args.max_seq_len, packing=args.packing, gradient_checkpointing=args.gradient_checkpointing,
        optimizer=args.optimizer, eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
        output_dir=args.output, seed=args.seed, progress=progress,
    )
    if args.model:
        from qlora_fast.models.hf import load_hf_model

        # QLoRA: 4-bit layer by layer as the checkpoint is read (never the whole fp32 model)
        model, tokenizer = load_hf_model(
            args.model, dtype=torch.float32, quantize="nf4" if args.method == "qlora" else None
        )
        source = args.model
    else:
        from qlora_fast.models import PretrainRecipe, load_base_model

        recipe = PretrainRecipe() if args.pretrain_steps is None else PretrainRecipe(steps=args.pretrain_steps)
        model, tokenizer = load_base_model(cache_dir=args.cache_dir, progress=progress, recipe=recipe,
                                           tokenizer=args.tokenizer)
        source = f"built-in tiny Llama (pretrained on the shipped corpus, {args.tokenizer} tokenizer)"
    print(f"base model: {source}; {sum(p.numel() for p in model.parameters()):,} parameters; device {device}")

    train_pairs = load_instructions("train")
    eval_pairs = load_instructions("heldout")[:args.eval_pairs]
    if args.model:  # before any evaluation or training: a learned position table ends in an IndexError
        _check_context(args, model, tokenizer, train_pairs, eval_pairs, config.prompt_template)
    if not scored_pairs(tokenizer, eval_pairs, config.prompt_template, args.max_seq_len):
        raise ValueError(f"--max-seq-len {args.max_seq_len} cuts all {len(eval_pairs)} held-out pairs before their "
                         "answer: the held-out perplexity would measure nothing; raise --max-seq-len")
    peft = get_peft_model(model, peft_config, tokenizer=tokenizer).to(device)
    # sizes of the whole model, measured before FSDP2 leaves each rank its shards
    trainable, total = peft.parameter_counts()
    sizes = base_weight_bytes(peft)
    four_bit, n_weights = _four_bit_weight_bytes(peft)
    if args.fsdp:
        from qlora_fast.distributed import shard_qlora_model

        shard_qlora_model(peft, unsplittable="replicate")  # a weight not on block boundaries stays whole

    def measure(tag):
        ppl = evaluate_loss(peft, tokenizer, eval_pairs, config.prompt_template, config.max_seq_len)["perplexity"]
        em, predictions = exact_match(
            peft,
            tokenizer,
            eval_pairs,
            config.prompt_template,
            max_new_tokens=args.max_new_tokens,
            return_predictions=True,
        )
        per_task = {}
        for pair, pred in zip(eval_pairs, predictions):
            hits, n = per_task.get(pair.get("task", "all"), (0, 0))
            per_task[pair.get("task", "all")] = (hits + (pred == pair["output"].strip()), n + 1)
        tasks = ", ".join(f"{t} {h}/{n}" for t, (h, n) in sorted(per_task.items()))
        print(
            f"{tag:>6}: held-out perplexity {ppl:.3f}, exact match {100 * em:.1f}% ({len(eval_pairs)} pairs: {tasks})"
        )
        return ppl, em

    with peft.disable_adapter():
        before = measure("before")
    trainer = SFTTrainer(peft, tokenizer, train_pairs, eval_pairs, config)
    note_resume_at_end(args, args.steps)
    trainer.train(resume_from_checkpoint=resume_from, allow_fresh=allow_fresh)
    _report_history(args, trainer.history, rank)
    after = measure("after")

    adapter_dir = os.path.join(args.output, f"adapter-{args.method}")
    state = _full_adapter(peft) if args.fsdp else peft.adapter_state_dict()
    if rank == 0:
        check_finite_state(state, f"the adapter {adapter_dir}")  # never write a NaN adapter
        peft.save_adapter(adapter_dir, state)
    print("\n=== qlora-fast finetune report ===")
    print(f"method                 {args.method} ({type(trainer.optimizer).__name__})")
    if args.fsdp:
        from qlora_fast.distributed import ShardableLinear4bit
        from qlora_fast.nn.linear4bit import Linear4bit

        four = [m for m in peft.modules() if isinstance(m, Linear4bit)]
        sharded = sum(isinstance(m, ShardableLinear4bit) for m in four)
        print(
            f"FSDP2                  {torch.distributed.get_world_size()} ranks; {sharded} of {len(four)} 4-bit layers "
            "sharded (the rest cannot be split on quantization-block boundaries: whole on every rank)"
        )
    print(f"parameters             trainable {trainable:,} / total {total:,} ({100 * trainable / total:.2f}%)")
    if n_weights:
        print(f"4-bit linear layers    {four_bit:,} bytes (codes + block statistics) for {n_weights:,} weights vs "
              f"{2 * n_weights:,} in bf16 ({8 * four_bit / n_weights:.3f} bits/weight; biases not counted)")
    print(
        f"base model in memory   {sizes['stored']:,} bytes (4-bit layers, everything else in {_dense_dtype(peft)}) vs "
        f"{sizes['bf16']:,} if all of it were bf16; adapter {sizes['adapter']:,} bytes"
    )
    print(f"peak memory            {_peak_memory(device)}")
    print(f"held-out perplexity    {before[0]:.3f} -> {after[0]:.3f}")
    print(f"held-out exact match   {100 * before[1]:.1f}% -> {100 * after[1]:.1f}%")
    print(f"adapter saved to       {os.path.abspath(adapter_dir)}")
    print(f"wall time              {time.time() - started:.0f} s")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0
