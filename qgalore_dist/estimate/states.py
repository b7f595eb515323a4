"""Bytes of weights + optimizer state (+ GaLore projectors) per tensor, one process, by closed form.

Approaches (``APPROACHES``; each a function ``(Tensor, Layout) -> {"weights", "state", "projector"}``):

* ``adamw``            bf16 weights, fp32 m and v (10 B/param).
* ``adamw_bf16``       bf16 weights, bf16 m and v (6 B/param): the convention closest to GaLore's
                       Table 2 "Full-Rank" estimates (exact at 350M).
* ``adamw8bit``        bitsandbytes AdamW8bit: bf16 weights; m, v 8-bit block-wise (1 B each + one
                       fp32 absmax per 256-element block); tensors under 4096 elements keep fp32
                       m, v (bnb's ``min_8bit_size``).
* ``galore_bf16``      GaLore AdamW (the GaLore paper's estimate): bf16 weights, bf16 low-rank m, v
                       (max(m,n)*r each), bf16 projector min(m,n)*r, bf16 dense m, v.
* ``galore8bit``       galore_torch GaLoreAdamW8bit: bf16 weights, bnb 8-bit low-rank m, v, bf16
                       projector, bnb 8-bit dense m, v.
* ``qgalore_ref``      the Q-GaLore reference code as it stores things: INT8 codes + bf16
                       scales/zeros per 256, projector codes one per byte (not packed) + bf16
                       scales/zeros per 256, bf16 first singular vector, bnb 8-bit m, v.
* ``qgalore_dist``     this package's ``QGaLoreAdamW8bit``: INT8 codes + fp32 scales/zeros per 256,
                       bf16 other weights, INT4 projector packed two per byte + fp32 scales/zeros
                       per 256, fp32 first singular vector (adaptive schedule), 8-bit low-rank and
                       dense m, v (+ fp32 absmax per 256; fp32 m, v under 4096 elements).

Not included: gradients, activations, temporaries, the 2 x 256 fp32 quantile maps shared by all
8-bit states, and the model's RoPE buffers.  ``benchmarks/memory.py`` checks ``qgalore_dist``
component by component against the tensors a real optimizer step holds.
"""

from __future__ import annotations

import math
from typing import Callable

from qgalore_dist.quant import num_groups, packed_numel, weight_row_length

from .model import Layout, Tensor

__all__ = ["APPROACHES", "account", "int8_groups", "lowrank_numel", "moment_8bit_bytes", "proj_numel", "qgalore_dist",
           "qgalore_dist_components", "sum_dicts"]

GiB = 2**30
MiB = 2**20


def moment_8bit_bytes(numel: int, lay: Layout) -> int:
    """One block-wise 8-bit moment: codes + fp32 absmax per block; fp32 under ``min_8bit_size``."""
    if numel < lay.min_8bit_size:
        return 4 * numel
    return numel + 4 * math.ceil(numel / lay.state_block)


def lowrank_numel(shape: tuple[int, ...], rank: int) -> int:
    """Elements of the low-rank gradient / moments: max(m, n) * r (proj_type std)."""
    return max(shape) * rank


def proj_numel(shape: tuple[int, ...], rank: int) -> int:
    """Elements of the projector: min(m, n) * r (proj_type std)."""
    return min(shape) * rank


def adamw(t: Tensor, lay: Layout) -> dict[str, int]:
    return {"weights": 2 * t.numel, "state": 8 * t.numel}


def adamw_bf16(t: Tensor, lay: Layout) -> dict[str, int]:
    return {"weights": 2 * t.numel, "state": 4 * t.numel}


def adamw8bit(t: Tensor, lay: Layout) -> dict[str, int]:
    return {"weights": 2 * t.numel, "state": 2 * moment_8bit_bytes(t.numel, lay)}


def galore_bf16(t: Tensor, lay: Layout) -> dict[str, int]:
    if not t.galore:
        return adamw_bf16(t, lay)
    return {"weights": 2 * t.numel, "state": 4 * lowrank_numel(t.shape, lay.rank),
            "projector": 2 * proj_numel(t.shape, lay.rank)}


def galore8bit(t: Tensor, lay: Layout) -> dict[str, int]:
    if not t.galore:
        return adamw8bit(t, lay)
    return {"weights": 2 * t.numel, "state": 2 * moment_8bit_bytes(lowrank_numel(t.shape, lay.rank), lay),
            "projector": 2 * proj_numel(t.shape, lay.rank)}


def qgalore_ref(t: Tensor, lay: Layout) -> dict[str, int]:
    if not t.galore:
        return adamw8bit(t, lay)
    pn = proj_numel(t.shape, lay.rank)
    return {
        "weights": t.numel + 2 * 2 * (t.numel // lay.weight_group),
        "state": 2 * moment_8bit_bytes(lowrank_numel(t.shape, lay.rank), lay),
        "projector": pn + 2 * 2 * (pn // lay.proj_group) + 2 * min(t.shape),
    }


def int8_groups(shape: tuple[int, ...], group_size: int) -> int:
    """Scale / zero-point pairs of an INT8 ``(m, n)`` weight in ``Int8Linear``'s group layout
    (row-aligned: ``m ceil(n / g)`` when ``g <= n``; flat ``m n / g`` otherwise)."""
    m, n = shape
    return num_groups(m * n, group_size, weight_row_length(m, n, group_size))


def qgalore_dist_components(t: Tensor, lay: Layout) -> dict[str, int]:
    """qgalore_dist, broken down exactly as ``benchmarks/memory.py`` measures the real objects."""
    if not t.galore:
        return {"dense_weights": lay.dense_bytes * t.numel, "dense_state": 2 * moment_8bit_bytes(t.numel, lay)}
    pn = proj_numel(t.shape, lay.rank)
    return {
        "int8_codes": t.numel,
        "int8_scales_zeros": 2 * 4 * int8_groups(t.shape, lay.weight_group),
        "lowrank_state": 2 * moment_8bit_bytes(lowrank_numel(t.shape, lay.rank), lay),
        "proj_codes": packed_numel(pn, lay.proj_bits),
        "proj_scales_zeros": 2 * 4 * (pn // lay.proj_group),
        "proj_past_vector": 4 * min(t.shape) if lay.adaptive else 0,
    }


_QGD_GROUPS = {"weights": ("dense_weights", "int8_codes", "int8_scales_zeros"),
               "state": ("dense_state", "lowrank_state"),
               "projector": ("proj_codes", "proj_scales_zeros", "proj_past_vector")}


def qgalore_dist(t: Tensor, lay: Layout) -> dict[str, int]:
    comp = qgalore_dist_components(t, lay)
    return {k: sum(comp.get(c, 0) for c in cs) for k, cs in _QGD_GROUPS.items()}


APPROACHES: dict[str, tuple[str, Callable[[Tensor, Layout], dict[str, int]]]] = {
    "adamw": ("AdamW: bf16 weights, fp32 m+v", adamw),
    "adamw_bf16": ("AdamW: bf16 weights, bf16 m+v (GaLore-paper convention)", adamw_bf16),
    "adamw8bit": ("bnb AdamW8bit: bf16 weights, 8-bit m+v", adamw8bit),
    "galore_bf16": ("GaLore AdamW: bf16 weights, bf16 low-rank m+v, bf16 P", galore_bf16),
    "galore8bit": ("GaLore AdamW8bit: bf16 weights, 8-bit low-rank m+v, bf16 P", galore8bit),
    "qgalore_ref": ("Q-GaLore reference as stored: INT8 W (bf16 scales), INT4 P one code/byte", qgalore_ref),
    "qgalore_dist": ("qgalore-dist QGaLoreAdamW8bit: INT8 W (fp32 scales), INT4 P packed, 8-bit m+v", qgalore_dist),
}


def sum_dicts(parts: list[dict[str, int]]) -> dict[str, int]:
    """Key-wise sum."""
    out: dict[str, int] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0) + v
    return out


def account(tensors: list[Tensor], lay: Layout, fn: Callable[[Tensor, Layout], dict[str, int]]) -> dict[str, int]:
    """Sum a per-tensor closed form over the model; adds ``total``."""
    out = {"weights": 0, "state": 0, "projector": 0, **sum_dicts([fn(t, lay) for t in tensors])}
    out["total"] = sum(v for k, v in out.items())
    return out
