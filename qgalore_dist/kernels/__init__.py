"""Fused Triton kernels of the Q-GaLore hot path, each beside the torch function it must equal.

=============================  ==========================================  =============================
kernel (:mod:`.ops`)           specification (:mod:`.reference`)           equality
=============================  ==========================================  =============================
:func:`project_packed`         :func:`.reference.project_torch`            fp32 summation order
:func:`project_back_packed`    :func:`.reference.project_back_torch`       fp32 summation order
:func:`int8_update_`           :func:`.reference.int8_update_torch`        bit-exact codes/scales/zeros
=============================  ==========================================  =============================

The projections read the packed INT2/4/8 projector and its group scales directly (no fp copy
of P); the update reads INT8 W and the back-projected update once and writes W once,
requantizing with the counter-based stochastic-rounding stream of :mod:`qgalore_dist.quant`.
The 8-bit low-rank Adam step stays on the torch / bitsandbytes-style codec path (it acts on
the small ``max(m, n) x r`` state; whether a fused kernel pays has to be measured on a GPU).

Dispatch is decided per call by :func:`use_triton` (``QGALORE_KERNELS=auto|triton|torch``,
see :mod:`.ops`).  This package imports only :mod:`qgalore_dist.quant` and torch; triton is
imported lazily, on the first launch.
"""

from __future__ import annotations

from .ops import (
    KERNEL_MODES,
    int8_update_,
    kernel_mode,
    project_back_packed,
    project_packed,
    triton_available,
    use_triton,
)
from .reference import dequantize_packed, int8_update_torch, project_back_torch, project_torch

__all__ = [
    "KERNEL_MODES", "dequantize_packed", "int8_update_", "int8_update_torch", "kernel_mode",
    "project_back_packed", "project_back_torch", "project_packed", "project_torch", "triton_available",
    "use_triton",
]
