"""Reference 4-bit quantization (bitsandbytes-compatible)."""
__all__ = []
