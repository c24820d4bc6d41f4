"""Spawned by tests/test_fsdp.py: GRPOTrainer on an FSDP2-sharded QLoRA model, 2 gloo processes,
each sampling its half of every step's prompts; the test repeats the run in one process."""
import os

import torch
import torch.distributed as dist
from fsdp_worker import CONFIG

from qlora_fast.models import LlamaConfig, LlamaForCausalLM
from qlora_fast.peft import LoraConfig, get_peft_model
from qlora_fast.tokenizer.base import ByteTokenizer
from qlora_fast.train.grpo import GRPOConfig, GRPOTrainer

PROMPTS = [{"prompt": f"add {a} {b}:"} for a, b in ((1, 2), (3, 4), (5, 6), (7, 8))]  # one token length


def distinct_characters(prompts, completions, **_):
    return [float(len(set(c))) for c in completions]


class PromptSeededGRPO(GRPOTrainer):
    """GRPO whose completions of a prompt are drawn with a generator seeded by (step, prompt), so
    a prompt gets the same samples on whichever rank (or in whichever batch) it is: a 2-rank run
    and a single-process run then train on one global batch. Completions are right-padded to
    max_new_tokens (the prompts share one length, so no left padding)."""

    def sample(self, prompts, n, greedy=False):
        parts = []
        for prompt in prompts:
            self.sample_generator.manual_seed(1000 * self.step + sum(map(ord, prompt)))
            parts.append(super().sample([prompt], n, greedy))
        width = self.config.max_new_tokens

        def pad(t, value):
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                torch.cat([pad(p[2], self.tokenizer.pad_id) for p in parts]), torch.cat([pad(p[3], 0) for p in parts]),
                sum((p[4] for p in parts), []), sum((p[5] for p in parts), []))


def grpo_config():
    return GRPOConfig(max_steps=2, group_size=2, prompts_per_step=4, max_new_tokens=4, beta=0.04, lr=1e-2,
                      optimizer="torch_adamw", gradient_accumulation_steps=2, progress=False, seed=3)


def grpo_model(seed):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**CONFIG, "vocab_size": ByteTokenizer().vocab_size, "max_seq_len": 32}))
    model = get_peft_model(model, LoraConfig(r=4, alpha=8, quantize_base="nf4"))
    with torch.no_grad():  # non-zero B: the policy differs from the reference from the start (KL term)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def run_grpo(model, adapter_dir=None):
    trainer = PromptSeededGRPO(model, ByteTokenizer(), distinct_characters, PROMPTS, grpo_config())
    history = trainer.train()
    if adapter_dir is not None:  # FSDP2: every rank calls it, rank 0 writes the gathered adapter
        trainer.save_adapter(adapter_dir)
    adapters = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                for n, p in model.named_parameters() if p.requires_grad}
    return history, adapters


def grpo_fsdp_worker(rank, world_size, init_file, out_dir, seed):
    from qlora_fast.distributed import shard_qlora_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = shard_qlora_model(grpo_model(seed))
        history, adapters = run_grpo(model, os.path.join(out_dir, "adapter"))
        errors = []
        for bad in (
            dict(prompts_per_step=3, gradient_accumulation_steps=1),
            dict(checkpoint_every=1, output_dir=out_dir),
        ):
            try:
                config = GRPOConfig(**{**vars(grpo_config()), **bad})
                GRPOTrainer(model, ByteTokenizer(), distinct_characters, PROMPTS, config)
                errors.append(None)
            except (ValueError, NotImplementedError) as e:
                errors.append(f"{type(e).__name__}: {e}")
        # an optimizer built before sharding (it would step tensors the model no longer uses); sharding twice
        plain = grpo_model(seed)
        stale = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad])
        shard_qlora_model(plain)
        for bad in (lambda: GRPOTrainer(plain, ByteTokenizer(), distinct_characters, PROMPTS, grpo_config(), stale),
                    lambda: shard_qlora_model(plain)):
            try:
                bad()
                errors.append(None)
            except ValueError as e:
                errors.append(str(e))
        torch.save(dict(history=history, adapters=adapters, errors=errors), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
