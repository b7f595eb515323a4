"""Torch specifications of the fused kernels: each function here is what the matching Triton
kernel must equal, written with exactly the ops the unfused code path runs
(:class:`~qgalore_dist.core.Projector`, :meth:`~qgalore_dist.core.Int8Linear.apply_update_`).

Shapes: ``P`` is ``proj_shape`` = (r, n) for ``side='right'`` or (m, r) for ``'left'``,
stored as packed group-wise codes (:func:`~qgalore_dist.quant.pack_codes`, ``bits`` per code)
with fp32 ``scales`` / ``zeros`` of shape (numel(P) / group_size, 1).
"""

from __future__ import annotations

import torch

from ..quant import StreamKey, dequantize, quantize, unpack_codes

__all__ = ["dequantize_packed", "int8_update_torch", "project_back_torch", "project_torch"]


def dequantize_packed(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *,
                      proj_shape: tuple[int, int], bits: int, group_size: int) -> torch.Tensor:
    """fp32 ``P`` of ``proj_shape`` from its packed codes (a materialized copy: the cost the
    kernels avoid)."""
    numel = proj_shape[0] * proj_shape[1]
    q = unpack_codes(codes, bits, numel).view(proj_shape)
    return dequantize(q, scales, zeros, group_size=group_size)


def project_torch(grad: torch.Tensor, p: torch.Tensor, side: str) -> torch.Tensor:
    """``G @ P.T`` (right, -> (m, r)) or ``P.T @ G`` (left, -> (r, n)), fp32."""
    g = grad.to(torch.float32)
    return g @ p.T if side == "right" else p.T @ g


def project_back_torch(lowrank: torch.Tensor, p: torch.Tensor, side: str, scale: float) -> torch.Tensor:
    """``scale * (R @ P)`` (right) or ``scale * (P @ R)`` (left) -> (m, n) fp32."""
    full = lowrank @ p if side == "right" else p @ lowrank
    return full * scale


def int8_update_torch(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, delta: torch.Tensor, *,
                      group_size: int, step_size: float, decay: float, key: StreamKey | None,
                      offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """New ``(codes, scales, zeros)`` of ``W <- SR(dequant(W) - step_size * delta - decay * W')``.

    The op order of ``QGaLoreAdamW8bit._apply_galore``: dequantize, ``add_(delta,
    alpha=-step_size)``, then (if ``decay > 0``) ``add_(w, alpha=-decay)`` (decoupled weight
    decay ``lr * wd`` after the update), then :func:`~qgalore_dist.quant.quantize` at 8 bits
    with stochastic rounding keyed by ``key`` (nearest when None), the stream starting at flat
    element ``offset`` (a row shard of a larger weight).  Inputs are not modified.
    """
    w = dequantize(codes, scales, zeros, group_size=group_size)
    w.add_(delta.to(w.dtype), alpha=-step_size)
    if decay > 0:
        w.add_(w, alpha=-decay)
    return quantize(w, bits=8, group_size=group_size, stochastic_key=key, offset=offset)
