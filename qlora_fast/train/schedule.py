"""Learning-rate schedules."""
import math

import torch


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr at `step`: linear warmup from 1/warmup to 1 over `warmup_steps`,
    then cosine decay to `min_ratio` at `total_steps` (and `min_ratio` after)."""
    if warmup_steps < 0 or total_steps <= 0 or not 0.0 <= min_ratio <= 1.0:
        raise ValueError(
            f"need warmup_steps >= 0, total_steps > 0, 0 <= min_ratio <= 1; got {warmup_steps}, {total_steps}, "
            f"{min_ratio}"
        )
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_schedule(optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """A `LambdaLR` following `warmup_cosine` (its state_dict saves and resumes the step)."""
    warmup_cosine(0, warmup_steps, total_steps, min_ratio)  # validate now, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup_steps, total_steps, min_ratio)
    )
