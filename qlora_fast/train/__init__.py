"""Trainers: SFT (instruction tuning) and GRPO."""
import importlib

_LAZY = {
    "SFTTrainer": "qlora_fast.train.sft",
    "SFTConfig": "qlora_fast.train.sft",
    "GRPOTrainer": "qlora_fast.train.grpo",
    "GRPOConfig": "qlora_fast.train.grpo",
    "grpo_loss": "qlora_fast.train.policy_gradient",
    "group_advantages": "qlora_fast.train.policy_gradient",
    "sequence_logprobs": "qlora_fast.train.policy_gradient",
    "reinforce_loss": "qlora_fast.train.policy_gradient",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qlora_fast.train' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_LAZY)
