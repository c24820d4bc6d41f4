"""Parameter-efficient fine-tuning: LoRA/QLoRA, prefix tuning and prompt tuning behind
`get_peft_model(model, config)`; adapters save and load as safetensors + JSON."""
from .config import LoraConfig, PrefixTuningConfig, PromptTuningConfig, config_from_dict
from .memory import base_weight_bytes
from .model import PeftModel, attention_geometry, get_peft_model, load_adapter, read_adapter_config, save_adapter

__all__ = [
    "LoraConfig", "PrefixTuningConfig", "PromptTuningConfig", "config_from_dict", "PeftModel", "get_peft_model",
    "load_adapter", "save_adapter", "read_adapter_config", "attention_geometry", "base_weight_bytes",
]
