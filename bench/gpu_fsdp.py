"""FSDP2 on one device (issue 15): the sharded QLoRA path at world size 1 (NCCL on CUDA; gloo with
--tiny on the CPU, as CI rehearses it).

A 2-layer Llama whose projections split into whole 4-bit units (hidden 256: every weight is a
multiple of 256 x 64 elements), QLoRA (NF4 + double quantization) on every projection, trained
3 steps with PagedAdamW8bit twice from the same seed and data: sharded by `shard_qlora_model`
(every 4-bit layer a ShardableLinear4bit, dequantized from its strided unit views) and unsharded.
Checks: every layer sharded, the losses of the two runs agree, the adapters agree, and a DCP
save/load of the adapters and 8-bit states restores them exactly. Prints one line per check and
exits non-zero on a failure.

    python bench/gpu_fsdp.py [--tiny]
"""
import argparse
import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist

from qlora_fast.distributed import load_adapter_checkpoint, save_adapter_checkpoint, shard_qlora_model
from qlora_fast.distributed.fsdp import ShardableLinear4bit
from qlora_fast.models import LlamaConfig, LlamaForCausalLM
from qlora_fast.optim import PagedAdamW8bit
from qlora_fast.peft import LoraConfig, get_peft_model

CONFIG = dict(vocab_size=64, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2,
              max_seq_len=32)
STEPS, BATCH, SEQ = 3, 4, 16


def build(device):
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(LlamaConfig(**CONFIG)), LoraConfig(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        r=4, lora_alpha=8, quantize_base="nf4"))
    with torch.no_grad():  # non-zero B: the first step already moves every adapter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.to(device)


def adapters(model):
    return {name.replace("_fsdp_wrapped_module.", ""): (p.full_tensor() if hasattr(p, "full_tensor") else p)
            .detach().float().cpu() for name, p in model.named_parameters() if p.requires_grad}


def train(model, batches):
    opt = PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, opt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the CPU rehearsal: gloo on the CPU")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo" if args.tiny else "nccl", rank=0, world_size=1)
    failed = []

    def check(what, ok, detail):
        print(f"{'PASS' if ok else 'FAIL'} {what}: {detail}")
        if not ok:
            failed.append(what)

    try:
        ids = torch.randint(0, CONFIG["vocab_size"], (STEPS, BATCH, SEQ), generator=torch.Generator().manual_seed(1))
        batches = ids.to(device)
        plain = build(device)
        plain_losses, _ = train(plain, batches)
        sharded = shard_qlora_model(build(device))
        n4 = sum(isinstance(m, ShardableLinear4bit) for m in sharded.modules())
        check("every 4-bit layer sharded", n4 == 7 * CONFIG["num_layers"], f"{n4} ShardableLinear4bit layers")
        losses, opt = train(sharded, batches)
        gap = max(abs(a - b) for a, b in zip(losses, plain_losses))
        check("sharded losses = unsharded", gap <= 1e-4 * max(map(abs, plain_losses)),
              f"{[round(v, 5) for v in losses]} vs {[round(v, 5) for v in plain_losses]}")
        ours, theirs = adapters(sharded), adapters(plain)
        diff = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
        check("sharded adapters = unsharded", ours.keys() == theirs.keys() and diff <= 1e-4, f"max |diff| {diff:.2e}")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "ckpt")
            save_adapter_checkpoint(sharded, opt, path)
            before = {k: v.clone() for k, v in adapters(sharded).items()}
            with torch.no_grad():
                for p in sharded.parameters():
                    if p.requires_grad:
                        p.add_(1.0)
            load_adapter_checkpoint(sharded, opt, path)
            after = adapters(sharded)
            check("DCP save/load restores the adapters", all(torch.equal(before[k], after[k]) for k in before),
                  f"{len(before)} adapter tensors")
        if device.type == "cuda":
            print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")
    finally:
        dist.destroy_process_group()
    print("RESULT:", "FAIL " + ", ".join(failed) if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
