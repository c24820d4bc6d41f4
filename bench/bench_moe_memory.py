"""Bytes held by a Mixtral-shaped model loaded in NF4: qlora_fast's loader (linear layers as
Linear4bit, the fused 3-D experts as Experts4bit) against transformers + bitsandbytes
(BitsAndBytesConfig nf4, double quant), whose experts stay in 16 bits.

The checkpoint is built from a config (random weights, bf16), nothing downloaded. Reported:
transformers' `get_memory_footprint()` (parameters and buffers) for both, and ours again with the
block statistics that live outside parameters.

    PYTHONPATH=. python bench/bench_moe_memory.py [--hidden 512 --intermediate 1792 --layers 4 --experts 8]
"""
import argparse
import tempfile
import warnings

import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1792)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    args = parser.parse_args()
    import transformers

    from qlora_fast.models.hf import load_hf_model
    from qlora_fast.nn import Experts4bit

    config = transformers.MixtralConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                                        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                                        num_local_experts=args.experts, num_experts_per_tok=2, vocab_size=1024)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    mib = 2 ** 20
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        print(f"Mixtral-shaped, {sum(p.numel() for p in model.parameters()):,} parameters; "
              f"bf16 footprint {model.get_memory_footprint() / mib:.1f} MiB")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peer = transformers.AutoModelForCausalLM.from_pretrained(
                directory, dtype=torch.bfloat16, device_map="cpu", quantization_config=transformers.BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=torch.bfloat16))
            ours, _ = load_hf_model(directory, quantize="nf4", tokenizer=False, dtype=torch.bfloat16)
    experts = type(peer.model.layers[0].mlp.experts).__name__
    statistics = sum(s.statistics_bytes() for m in ours.modules() if isinstance(m, Experts4bit)
                     for s in m.quant_states.values())
    print(f"transformers + bitsandbytes: {peer.get_memory_footprint() / mib:.1f} MiB (experts: {experts})")
    print(f"qlora_fast load_hf_model:    {ours.get_memory_footprint() / mib:.1f} MiB "
          f"(+{statistics / mib:.2f} MiB of experts' block statistics outside parameters)")
    print(f"ratio: {peer.get_memory_footprint() / ours.get_memory_footprint():.2f}x less")


if __name__ == "__main__":
    main()
