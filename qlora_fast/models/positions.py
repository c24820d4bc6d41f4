"""Position ids from an attention mask: used by the model's forward (`llama`) and by decoding
(`generate`), which both import it from here."""
import torch


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token counting only unmasked tokens before it (left padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
