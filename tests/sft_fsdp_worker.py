"""Spawned by tests/test_fsdp.py: the same QLoRA SFT run under DDP (SFTTrainer's own wrapping)
and under FSDP2 with the sharded 4-bit base, in the same 2 gloo processes."""
import os

import torch
import torch.distributed as dist
from fsdp_worker import CONFIG

from qlora_fast.data import load_instructions
from qlora_fast.models import LlamaConfig, LlamaForCausalLM
from qlora_fast.peft import LoraConfig, get_peft_model
from qlora_fast.tokenizer.base import ByteTokenizer
from qlora_fast.train.sft import SFTConfig, SFTTrainer


def qlora_model(seed):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**CONFIG, "vocab_size": ByteTokenizer().vocab_size, "max_seq_len": 96}))
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, quantize_base="nf4"))


def sft_fsdp_worker(rank, world_size, init_file, out_dir, seed):
    from qlora_fast.distributed import shard_qlora_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        config = SFTConfig(
            max_steps=2,
            batch_size=2,
            gradient_accumulation_steps=2,
            lr=1e-2,
            warmup_steps=0,
            max_seq_len=96,
            optimizer="torch_adamw",
            progress=False,
        )
        data = load_instructions("train")[:32]
        out = {}
        for mode in ("ddp", "fsdp"):
            model = qlora_model(seed)
            if mode == "fsdp":
                shard_qlora_model(model)
            trainer = SFTTrainer(model, ByteTokenizer(), data, config=config)
            assert (trainer._ddp is None) == (mode == "fsdp")
            history = trainer.train()
            adapters = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                        for n, p in model.named_parameters() if p.requires_grad}
            out[mode] = dict(losses=[h["loss"] for h in history], adapters=adapters)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def sft_fsdp_resume_worker(rank, world_size, init_file, out_dir, seed):
    """SFTTrainer on an FSDP2 model with checkpoint_every=2 for 4 steps; then a fresh sharded model
    and trainer resume from checkpoint-2 and train steps 3-4 again."""
    from qlora_fast.distributed import shard_qlora_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        config = SFTConfig(
            max_steps=4,
            batch_size=1,
            gradient_accumulation_steps=1,
            lr=1e-2,
            warmup_steps=1,
            max_seq_len=64,
            optimizer="paged_adamw_8bit",
            checkpoint_every=2,
            output_dir=os.path.join(out_dir, "run"),
            progress=False,
        )
        data = load_instructions("train")[:16]
        out = {}
        for mode in ("first", "resumed"):
            model = qlora_model(seed)
            if mode == "resumed":  # other adapter values: the load must overwrite them
                with torch.no_grad():
                    for p in model.parameters():
                        if p.requires_grad:
                            p.normal_()
            shard_qlora_model(model)
            trainer = SFTTrainer(model, ByteTokenizer(), data, config=config)
            if mode == "first":
                history = trainer.train()
                out["files"] = sorted(os.listdir(config.output_dir))
            else:
                history = trainer.train(resume_from=os.path.join(config.output_dir, "checkpoint-2"))
            adapters = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            out[mode] = dict(history=history, adapters=adapters, step=trainer.step)
        # a model with other adapters (another rank) is a different run: refused on every rank
        other = shard_qlora_model(get_peft_model(
            LlamaForCausalLM(LlamaConfig(**{**CONFIG, "vocab_size": ByteTokenizer().vocab_size, "max_seq_len": 96})),
            LoraConfig(r=2, alpha=8, quantize_base="nf4")))
        try:
            SFTTrainer(other, ByteTokenizer(), data, config=config).train(resume_from="latest")
            out["refused"] = None
        except ValueError as e:
            out["refused"] = str(e)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
