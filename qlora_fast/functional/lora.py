"""Fused NF4 matmul and LoRA ops (dispatch + autograd)."""
__all__ = []
