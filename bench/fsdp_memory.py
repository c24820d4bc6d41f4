"""Memory per rank of a 70B-shaped QLoRA model under FSDP2 (simulated: computed, not measured).

The 4-bit sizes come from `unit_layout`, the same function `ShardableLinear4bit` uses to lay out
its sharded `units` parameter (tests/test_fsdp.py checks that layout against real modules): each
rank holds ceil(n_units / world) units of every projection. Shapes: Llama-3-70B (hidden 8192,
MLP 28672, 80 layers, 64 heads / 8 KV heads, vocab 128256, untied), NF4 with blocksize 64 and
double quantization; embeddings, lm_head and norms in bf16 (QLoRA keeps the lm_head 16-bit);
LoRA r=16 on all seven projections, fp32 with fp32 gradients and two AdamW states. Activations
are left out (they depend on batch and sequence length).
Usage: python bench/fsdp_memory.py  (prints the markdown table in bench/RESULTS.md)
"""
from qlora_fast.distributed.fsdp import unit_layout

HIDDEN, MLP, LAYERS, HEADS, KV_HEADS, VOCAB, RANK = 8192, 28672, 80, 64, 8, 128256, 16
KV = HIDDEN // HEADS * KV_HEADS
PROJ = {"q": (HIDDEN, HIDDEN), "k": (KV, HIDDEN), "v": (KV, HIDDEN), "o": (HIDDEN, HIDDEN),
        "gate": (MLP, HIDDEN), "up": (MLP, HIDDEN), "down": (HIDDEN, MLP)}
GB = 1e9


def shard(rows: int, row_bytes: int, world: int) -> int:
    return -(-rows // world) * row_bytes  # FSDP2 pads dim 0 to a multiple of the world size


def per_rank(world: int) -> dict:
    layer_4bit = sum(shard(*unit_layout(shape, 64, True), world) for shape in PROJ.values())
    layer_full = sum(n * b for n, b in (unit_layout(shape, 64, True) for shape in PROJ.values()))
    lora = sum(shard(RANK, i * 4, world) + shard(o, RANK * 4, world) for o, i in PROJ.values())
    return {
        "4-bit base": LAYERS * layer_4bit,
        "embed + lm_head (bf16)": 2 * shard(VOCAB, HIDDEN * 2, world),
        "norms (bf16)": (2 * LAYERS + 1) * shard(HIDDEN, 2, world),
        "LoRA params+grads+AdamW (fp32)": LAYERS * lora * 4,
        "gathered 4-bit, 2 layers (transient)": 2 * layer_full,
    }


def main():
    rows = {w: per_rank(w) for w in (1, 2, 4, 8)}
    keys = list(rows[1])
    print("| world | " + " | ".join(k + " (GB)" for k in keys) + " | total per rank (GB) |")
    print("|---" * (len(keys) + 2) + "|")
    for w, r in rows.items():
        print(f"| {w} | " + " | ".join(f"{r[k] / GB:.3f}" for k in keys) + f" | {sum(r.values()) / GB:.2f} |")
    n_4bit = LAYERS * sum(o * i for o, i in PROJ.values())
    print(f"\n4-bit bytes per weight element: {rows[1]['4-bit base'] / n_4bit:.4f} "
          f"({n_4bit / 1e9:.2f} B quantized elements)")


if __name__ == "__main__":
    main()
