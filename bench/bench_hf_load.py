"""Peak memory of loading a transformers checkpoint in 4 bits: qlora_fast's layer-by-layer loader
against transformers + bitsandbytes (BitsAndBytesConfig nf4, double quant) and against the old
path (load the whole model, then quantize).

A Llama-style checkpoint of ~60M parameters is built from a config (random weights, saved in
bf16, sharded), nothing downloaded. Each provider runs in a fresh subprocess; it reports its
resident memory after imports and its peak during the load (VmHWM, reset after the imports:
`ru_maxrss` would report the imports' own higher peak), so "peak - baseline" is what the load
itself cost (file pages of the memory-mapped safetensors included, for every provider alike).
Every provider's logits are checked against the bitsandbytes model's.

    PYTHONPATH=. python bench/bench_hf_load.py [--hidden 512 --layers 8 --vocab 32000]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

PROVIDERS = ("qlora_fast", "transformers+bitsandbytes", "load-then-quantize")


def rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Reset the peak-RSS mark (VmHWM): imports pass through higher peaks than the load itself."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(provider: str, path: str) -> None:
    import torch
    import transformers  # noqa: F401  (imports before the baseline, for every provider alike)

    from qlora_fast.models.hf import load_hf_model
    from qlora_fast.nn import replace_linear

    torch.set_num_threads(1)
    import bitsandbytes  # noqa: F401

    baseline = rss_mb()
    reset_peak()
    if provider == "qlora_fast":
        model, _ = load_hf_model(path, quantize="nf4", tokenizer=False)
    elif provider == "transformers+bitsandbytes":
        config = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")
    else:
        model = replace_linear(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    peak = rss_mb("VmHWM")  # the peak since reset_peak (ru_maxrss cannot be reset)
    for m in model.modules():  # bitsandbytes' reference CPU path (its AVX512 repacking is not the oracle)
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    ids = torch.arange(16).view(1, 16) * 7 % 1000
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    torch.save(logits, os.path.join(path, f"logits-{provider}.pt"))
    print(json.dumps({"provider": provider, "baseline_mb": baseline, "peak_mb": peak, "after_mb": rss_mb()}))


def build(path: str, hidden: int, layers: int, vocab: int) -> int:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="50MB")
    return sum(p.numel() for p in model.parameters())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    import torch

    with tempfile.TemporaryDirectory() as path:
        params = build(path, args.hidden, args.layers, args.vocab)
        print(f"checkpoint: Llama-style, {params / 1e6:.1f}M parameters, bf16 ({params * 2 / 2**20:.0f} MiB), "
              f"{len([f for f in os.listdir(path) if f.endswith('.safetensors')])} shards")
        results = {}
        for provider in PROVIDERS:
            out = subprocess.run([sys.executable, __file__, "--child", provider, path], capture_output=True, text=True,
                                 env=dict(os.environ, OMP_NUM_THREADS="1"))
            if out.returncode:
                sys.exit(f"{provider} failed:\n{out.stderr[-3000:]}")
            results[provider] = json.loads(out.stdout.strip().splitlines()[-1])
        reference = torch.load(os.path.join(path, "logits-transformers+bitsandbytes.pt"))
        peer = results["transformers+bitsandbytes"]
        peer_cost = peer["peak_mb"] - peer["baseline_mb"]
        print(
            f"{'provider':28s} {'baseline MiB':>12s} {'peak MiB':>9s} {'load cost MiB':>13s} {'vs bnb':>7s} "
            f"{'max |logit diff| vs bnb':>24s}"
        )
        for provider, r in results.items():
            cost = r["peak_mb"] - r["baseline_mb"]
            diff = (torch.load(os.path.join(path, f"logits-{provider}.pt")) - reference).abs().max().item()
            print(
                f"{provider:28s} {r['baseline_mb']:12.0f} {r['peak_mb']:9.0f} {cost:13.0f} "
                f"{cost / peer_cost:6.2f}x {diff:24.3g}"
            )


if __name__ == "__main__":
    main()
