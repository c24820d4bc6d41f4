"""`qlora-fast quantize-report`: quantize a randomly initialised model to 4 bits and report, per
layer and in total, bits per parameter, bytes saved, relative error and quantize/dequantize time.

The model is the built-in Llama (`qlora_fast.models`) from a small config, or a plain stack of
`nn.Linear` layers in Llama shapes (`--model stack`). Nothing is downloaded.
"""
import time

from qlora_fast.commands import HelpFormatter, positive_int, resolve_device

QUANT_DTYPES = ("float32", "float16", "bfloat16")  # names of torch dtypes (torch loads only when run)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "quantize-report",
        help="quantize a random model to NF4/FP4 and print per-layer bits, bytes saved, error and timings",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", choices=("llama", "stack"), default="llama",
                        help="built-in Llama from a small config, or a plain stack of nn.Linear layers")
    parser.add_argument("--hidden-size", type=positive_int, default=256, help="model width")
    parser.add_argument("--intermediate-size", type=positive_int, default=688, help="MLP width")
    parser.add_argument("--layers", type=positive_int, default=2, help="number of decoder layers")
    parser.add_argument("--heads", type=positive_int, default=8, help="attention heads (Llama only)")
    parser.add_argument("--kv-heads", type=positive_int, default=4, help="key/value heads (Llama only)")
    parser.add_argument("--vocab-size", type=positive_int, default=512, help="vocabulary size (Llama only)")
    parser.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit code")
    parser.add_argument(
        "--blocksize", type=positive_int, default=64, help="elements per absmax block (power of two, 32..4096)"
    )
    parser.add_argument("--no-double-quant", action="store_true", help="keep absmax in fp32 (no double quantization)")
    parser.add_argument("--dtype", choices=QUANT_DTYPES, default="bfloat16", help="weight dtype before quantization")
    parser.add_argument("--device", default="auto", help="'auto' (cuda when present, else cpu), 'cpu', 'cuda', ...")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the model's initialisation")
    parser.set_defaults(func=run)


def build_model(args):
    """A randomly initialised model with Llama-shaped linear layers."""
    from torch import nn

    if args.model == "llama":
        from qlora_fast.models import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
            num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
        )
        return LlamaForCausalLM(config)
    h, f = args.hidden_size, args.intermediate_size
    layers = nn.ModuleDict()
    for i in range(args.layers):
        layers[f"layer{i}"] = nn.ModuleDict(
            {name: nn.Linear(i_, o_, bias=False) for name, (i_, o_) in
             {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
              "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}.items()}
        )
    return layers


def _timed(fn, device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024


def run(args) -> int:
    import torch
    from torch import nn
    from tqdm import tqdm

    from qlora_fast.functional import dequantize_4bit, quantize_4bit

    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    model = build_model(args).to(device=device, dtype=dtype)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    nested = not args.no_double_quant

    # warm-up so the first layer's time does not include one-off set-up (kernel compilation)
    warm = torch.randn(args.blocksize * 4, device=device, dtype=dtype)
    dequantize_4bit(*quantize_4bit(warm, args.blocksize, args.quant_type, nested))

    rows = []
    for name, layer in tqdm(linears, desc="quantizing", unit="layer"):
        weight = layer.weight.detach()
        (packed, state), t_q = _timed(lambda: quantize_4bit(weight, args.blocksize, args.quant_type, nested), device)
        restored, t_d = _timed(lambda: dequantize_4bit(packed, state), device)
        n = weight.numel()
        quant_bytes = packed.numel() * packed.element_size() + state.statistics_bytes()
        orig_bytes = n * weight.element_size()
        err = ((restored.double() - weight.double()).norm() / weight.double().norm()).item()
        rows.append((name, tuple(weight.shape), n, quant_bytes * 8 / n, orig_bytes, quant_bytes, err, t_q, t_d))

    header = (f"{'layer':<34} {'shape':>12} {'bits/param':>10} {'saved':>11} {'rel err':>8} {'quant ms':>9} "
              f"{'dequant ms':>10}")
    print(f"{args.quant_type.upper()} blocksize {args.blocksize}, double quantization {'on' if nested else 'off'}, "
          f"{args.dtype} weights, {len(rows)} linear layers on {device}")
    print(header)
    print("-" * len(header))
    for name, shape, n, bits, orig, quant, err, t_q, t_d in rows:
        shape_s = "x".join(str(s) for s in shape)
        print(
            f"{name:<34} {shape_s:>12} {bits:>10.3f} {_human(orig - quant):>11} {err:>8.4f} {t_q * 1e3:>9.2f} "
            f"{t_d * 1e3:>10.2f}"
        )
    total_n = sum(r[2] for r in rows)
    total_orig = sum(r[4] for r in rows)
    total_quant = sum(r[5] for r in rows)
    sq_err = sum((r[6] ** 2) * r[2] for r in rows) / total_n
    print("-" * len(header))
    print(f"{'total':<34} {total_n:>12,} {total_quant * 8 / total_n:>10.3f} {_human(total_orig - total_quant):>11} "
          f"{sq_err ** 0.5:>8.4f} {sum(r[7] for r in rows) * 1e3:>9.2f} {sum(r[8] for r in rows) * 1e3:>10.2f}")
    print(f"linear weights: {_human(total_orig)} in {args.dtype} -> {_human(total_quant)} in 4 bits "
          f"({total_orig / total_quant:.2f}x smaller); rel err is ||W - deq(q(W))|| / ||W|| "
          f"(total: parameter-weighted RMS)")
    return 0
