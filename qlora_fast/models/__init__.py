"""The built-in Llama-style model, `generate()`, and the tiny pretrained base model."""
from .generate import generate
from .llama import CausalLMOutput, LlamaConfig, LlamaForCausalLM, LlamaModel, causal_lm_loss, positions_from_mask
from .pretrained import BASE_CONFIG, PretrainRecipe, default_cache_dir, load_base_model, load_model, save_model

__all__ = [
    "LlamaConfig", "LlamaForCausalLM", "LlamaModel", "CausalLMOutput", "causal_lm_loss", "generate",
    "positions_from_mask", "load_base_model", "load_model", "save_model", "default_cache_dir",
    "BASE_CONFIG", "PretrainRecipe",
]
