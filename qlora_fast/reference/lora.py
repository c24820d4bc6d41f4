"""Reference NF4 matmul and LoRA math."""
__all__ = []
