"""The Adam update as pure functions: one rule for every parameter and every path.

The formula is GaLore's ``AdamW.step`` (``galore_torch/adamw.py``), which the published
results use::

    m <- b1 m + (1 - b1) g
    v <- b2 v + (1 - b2) g^2
    direction  = m / (sqrt(v) + eps)
    step_size  = lr * sqrt(1 - b2^t) / (1 - b1^t)
    W <- W - step_size * direction;  W <- W - lr * wd * W      (decoupled decay after the update)

For a GaLore matrix ``direction`` is low-rank and is back-projected (times the GaLore scale)
before it is applied; for an INT8 weight the apply runs on the dequantized weight and is
followed by requantization (``core.int8_linear.update_int8_codes_``, fused on GPU).  Every path
(single process, data parallel, DeepSpeed's dense partitions, FSDP2 shards) calls
:func:`advance_moments` for the direction, :func:`weight_step` for the step size and decay, and
:func:`apply_direction_` (or the INT8 equivalent) for the apply -- nowhere else is the rule
written.  Moments may live in 8 bits: they are decoded to fp32, updated, and re-encoded; the
direction is computed from the fp32 values before re-encoding, as bitsandbytes' fused 8-bit
kernels do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from ..quant import BlockwiseCodec, Moment

__all__ = [
    "WeightStep", "adam_direction", "adam_step_size", "advance_moments", "apply_direction_", "lowrank_adam_update",
    "weight_step",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class WeightStep:
    """How one step's direction is applied to a weight:
    ``W <- W - step_size * direction``, then ``W <- W - decay * W``."""

    step_size: float
    """``lr * sqrt(1 - b2^t) / (1 - b1^t)`` (bias-corrected Adam step)."""
    decay: float
    """``lr * weight_decay`` (0.0: no decay), applied after the update as the reference does."""


def adam_step_size(lr: float, betas: tuple[float, float], step: int) -> float:
    """``lr * sqrt(1 - b2^t) / (1 - b1^t)`` for the 1-based step ``t``."""
    assert step >= 1, f"Adam step is 1-based, got {step}"
    beta1, beta2 = betas
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def weight_step(group: Mapping, step: int) -> WeightStep:
    """The :class:`WeightStep` of a param group (``lr``, ``betas``, ``weight_decay``) at ``step``."""
    decay = group["lr"] * group["weight_decay"] if group["weight_decay"] > 0 else 0.0
    return WeightStep(step_size=adam_step_size(group["lr"], group["betas"], step), decay=decay)


def apply_direction_(weight: torch.Tensor, direction: torch.Tensor, how: WeightStep) -> None:
    """In place: ``weight -= how.step_size * direction``, then ``weight -= how.decay * weight``.
    ``direction`` has ``weight``'s shape (any dtype; cast to the weight's)."""
    weight.add_(direction.to(weight.dtype), alpha=-how.step_size)
    if how.decay > 0:
        weight.add_(weight, alpha=-how.decay)


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


def advance_moments(state: dict, grad: torch.Tensor, codec: BlockwiseCodec, *, betas: tuple[float, float],
                    eps: float) -> torch.Tensor:
    """Advance ``state["exp_avg"]`` / ``state["exp_avg_sq"]`` (created as zeros on first use,
    stored by ``codec``) with ``grad``; returns the fp32 Adam direction of ``grad``'s shape."""
    if "exp_avg" not in state:
        state["exp_avg"] = codec.zeros(grad.shape, grad.device, signed=True)
        state["exp_avg_sq"] = codec.zeros(grad.shape, grad.device, signed=False)
    direction, state["exp_avg"], state["exp_avg_sq"] = lowrank_adam_update(
        grad, state["exp_avg"], state["exp_avg_sq"], codec, betas=betas, eps=eps)
    return direction
