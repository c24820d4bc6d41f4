"""Multi-process training: FSDP2 sharding of the 4-bit base (see `fsdp`)."""
from .fsdp import ShardableLinear4bit, four_bit_bytes, prepare_4bit_for_fsdp, shard_qlora_model

__all__ = ["ShardableLinear4bit", "four_bit_bytes", "prepare_4bit_for_fsdp", "shard_qlora_model"]
