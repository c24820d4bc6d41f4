"""Multi-process training: FSDP2 sharding of the 4-bit base (see `fsdp`) and its checkpoints."""
from .checkpoint import (
                         load_adapter_checkpoint,
                         load_trainer_checkpoint,
                         resolve_sharded_resume,
                         save_adapter_checkpoint,
                         save_trainer_checkpoint,
                         sharded_checkpoint_path,
)
from .fsdp import (
                         ShardableLinear4bit,
                         check_optimizer_params,
                         four_bit_bytes,
                         prepare_4bit_for_fsdp,
                         shard_qlora_model,
                         unsharded,
)

__all__ = ["load_adapter_checkpoint", "save_adapter_checkpoint", "ShardableLinear4bit", "four_bit_bytes",
           "prepare_4bit_for_fsdp", "shard_qlora_model", "save_trainer_checkpoint", "load_trainer_checkpoint",
           "sharded_checkpoint_path", "resolve_sharded_resume", "unsharded", "check_optimizer_params"]
