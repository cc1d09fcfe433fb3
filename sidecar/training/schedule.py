"""The learning-rate schedule: warmup, then linear / cosine decay or constant."""

from __future__ import annotations

import math


def lr_multiplier(step: int, total_steps: int, warmup_ratio: float, scheduler: str) -> float:
    """Learning-rate factor for optimizer step ``step`` (0-based): linear warmup over
    ``ceil(warmup_ratio * total_steps)`` steps (never 0 at the first step), then linear / cosine
    decay towards 0 at ``total_steps``, or constant."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if scheduler == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if scheduler == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

