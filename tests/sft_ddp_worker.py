"""Run by tests/test_sft.py under torchrun (2 processes, gloo): LoRA SFT of a tiny model; each
rank saves its adapter, the losses it saw and its first batch to OUT_DIR/rank<r>.pt."""
import sys

import torch
import torch.distributed as dist

from qlora_fast.data import load_instructions
from qlora_fast.models import LlamaConfig, LlamaForCausalLM
from qlora_fast.peft import LoraConfig, get_peft_model
from qlora_fast.tokenizer.base import ByteTokenizer
from qlora_fast.train.sft import SFTConfig, SFTTrainer


def main(out_dir):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(1234)  # the same initial model on every rank
    model = LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2, num_kv_heads=1)
    )
    peft = get_peft_model(model, LoraConfig(r=2))
    initial = {n: p.detach().clone() for n, p in peft.adapter_parameters()}
    config = SFTConfig(
        max_steps=3, batch_size=2, lr=1e-2, warmup_steps=0, max_seq_len=96, optimizer="torch_adamw", progress=False
    )
    trainer = SFTTrainer(peft, ByteTokenizer(), load_instructions("train")[:64], config=config)
    first_batch = trainer._micro_batches(0)[0]
    history = trainer.train()
    torch.save(
        {
            "adapter": {n: p.detach().clone() for n, p in peft.adapter_parameters()},
            "initial": initial,
            "history": history,
            "first_batch": first_batch,
            "world": dist.get_world_size(),
        },
        f"{out_dir}/rank{rank}.pt",
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
