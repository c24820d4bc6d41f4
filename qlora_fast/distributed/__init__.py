"""Multi-process training: FSDP2 sharding of the 4-bit base (see `fsdp`)."""
from .checkpoint import load_adapter_checkpoint, save_adapter_checkpoint
from .fsdp import ShardableLinear4bit, four_bit_bytes, prepare_4bit_for_fsdp, shard_qlora_model

__all__ = ["load_adapter_checkpoint", "save_adapter_checkpoint", "ShardableLinear4bit", "four_bit_bytes", "prepare_4bit_for_fsdp", "shard_qlora_model"]
