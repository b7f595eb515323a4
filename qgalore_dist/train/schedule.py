"""GaLore's learning-rate schedule: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math

__all__ = ["warmup_cosine"]


def warmup_cosine(step: int, *, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier (of the peak LR) for 0-based optimizer step ``step``: ``step / warmup_steps``
    during warmup, then ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * progress)) / 2``
    reaching ``min_lr_ratio`` at ``total_steps`` and staying there.  This is GaLore's
    ``get_scheculer(scheduler_type="cosine", min_lr_ratio=0.1)`` (torchrun_main.py) term by term,
    so step 0 trains with LR 0 as it does there."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
