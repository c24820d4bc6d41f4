"""Trainers: SFT (instruction tuning), GRPO and PPO (with a critic)."""
from qlora_fast.utils import lazy_getattr

_LAZY = {
    "SFTTrainer": "qlora_fast.train.sft",
    "SFTConfig": "qlora_fast.train.sft",
    "GRPOTrainer": "qlora_fast.train.grpo",
    "GRPOConfig": "qlora_fast.train.grpo",
    "PPOTrainer": "qlora_fast.train.ppo",
    "PPOConfig": "qlora_fast.train.ppo",
    "gae_advantages": "qlora_fast.train.policy_gradient",
    "value_loss": "qlora_fast.train.policy_gradient",
    "grpo_loss": "qlora_fast.train.policy_gradient",
    "group_advantages": "qlora_fast.train.policy_gradient",
    "sequence_logprobs": "qlora_fast.train.policy_gradient",
    "reinforce_loss": "qlora_fast.train.policy_gradient",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = sorted(_LAZY)
