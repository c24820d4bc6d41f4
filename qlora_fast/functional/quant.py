"""4-bit quantization ops (dispatch + torch.library registration)."""
__all__ = []
