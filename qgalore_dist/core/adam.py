"""The Adam update as a pure function (shared by low-rank GaLore states and dense parameters).

The formula is GaLore's ``AdamW.step`` (``galore_torch/adamw.py``), which the published
results use::

    m <- b1 m + (1 - b1) g
    v <- b2 v + (1 - b2) g^2
    direction  = m / (sqrt(v) + eps)
    step_size  = lr * sqrt(1 - b2^t) / (1 - b1^t)

The caller applies ``W <- W - step_size * back_project(direction)`` and then the decoupled
weight decay ``W <- W - lr * wd * W`` (after the update, as the reference does).  Moments may
live in 8 bits: they are decoded to fp32, updated, and re-encoded; the direction is computed
from the fp32 values before re-encoding, as bitsandbytes' fused 8-bit kernels do.
"""

from __future__ import annotations

import math

import torch

from ..quant import BlockwiseCodec, Moment

__all__ = ["adam_direction", "adam_step_size", "lowrank_adam_update"]


def adam_step_size(lr: float, betas: tuple[float, float], step: int) -> float:
    """``lr * sqrt(1 - b2^t) / (1 - b1^t)`` for the 1-based step ``t``."""
    assert step >= 1, f"Adam step is 1-based, got {step}"
    beta1, beta2 = betas
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def adam_direction(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    betas: tuple[float, float],
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure Adam moment update on fp32 tensors: returns ``(direction, exp_avg, exp_avg_sq)``."""
    beta1, beta2 = betas
    # The exact op sequence of galore_torch/adamw.py (mul_ then add_ with alpha, addcmul_,
    # sqrt then add_ eps): same rounding, so fp32 results are bit-identical to GaLoreAdamW.
    exp_avg = exp_avg.mul(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    return exp_avg / exp_avg_sq.sqrt().add_(eps), exp_avg, exp_avg_sq


def lowrank_adam_update(
    grad: torch.Tensor,
    exp_avg: Moment,
    exp_avg_sq: Moment,
    codec: BlockwiseCodec,
    *,
    betas: tuple[float, float],
    eps: float,
) -> tuple[torch.Tensor, Moment, Moment]:
    """Adam on a (low-rank or dense) fp32 gradient with moments stored by ``codec``.

    Returns ``(direction, new_exp_avg, new_exp_avg_sq)``; ``direction`` has ``grad``'s shape.
    """
    m = codec.decode(exp_avg, signed=True)
    v = codec.decode(exp_avg_sq, signed=False)
    direction, m, v = adam_direction(grad.to(torch.float32), m, v, betas=betas, eps=eps)
    return direction, codec.encode(m, signed=True), codec.encode(v, signed=False)
