"""Bytes per step per rank moved by gradient synchronisation, by closed form: qgalore-dist on
torch.distributed and DeepSpeed ZeRO, against DDP, ZeRO-2/3 and torch's PowerSGD DDP hook.

Volumes are the ring-algorithm ones ``qgalore_dist.distributed.comm`` meters: an all-reduce of S
bytes costs ``2 (N-1)/N * S`` per rank, a reduce-scatter / all-gather / broadcast / reduce
``(N-1)/N * S``.  ``tensors`` is a list of ``(name, shape, is_galore)`` (``Shapes.as_tuples()``);
P = all parameters, G = GaLore matrices, D = dense parameters.

Baselines:

* DDP:    one all-reduce of every gradient, ``2 (N-1)/N * b * P`` (b = 2 for bf16 gradients).
* ZeRO-2: reduce-scatter of the gradients + all-gather of the updated parameters, ``(N-1)/N * b *
          P`` each: the same volume as DDP.
* ZeRO-3: the parameters all-gathered twice (forward, backward) + the gradients reduce-scattered,
          ``3 (N-1)/N * b * P``.  (Not metered: DeepSpeed's own schedule.)
* PowerSGD (``powerSGD_hook``, rank r): per DDP bucket the hook views every gradient as
  ``tensor.view(shape[0], -1)`` = (n, m) and compresses it when ``(n + m) * r' *
  min_compression_rate < n * m`` with ``r' = min(n, m, r)``; three all-reduces in the bucket's
  dtype: the uncompressed tensors, all P (n x r') and all Q (m x r'): ``2 (N-1)/N * b * (U + sum (n
  + m) r')`` per step.  Before ``start_powerSGD_iter`` it sends the DDP volume.

Ours, the steady-state step of ``QGaLoreAdamW8bit`` (L = sum_G max(m, n) * r low-rank elements):

* ``lowrank_reduce``  every low-rank gradient to its owner: reduce-scatter, ``(N-1)/N * L * b``;
* ``update_gather``   owners broadcast the low-rank Adam directions, ``(N-1)/N * L * b``;
* ``dense``           reduce-scatter of dense gradients to their owner + broadcast of the updated
                      dense parameters, ``(N-1)/N * D * (b_grad + b_param)``;
* ``control``         finite / has-gradient flags: an all-reduce of ``1 + 2 (#G + #D)`` fp32 values.

``compress`` (``compress_lowrank``): 8-bit codes + one fp32 absmax per 256 per owner,
``B_o = L_o + 4 ceil(L_o / 256)``; gradients by all-to-all (rank k sends ``sum_{o != k} B_o``, mean
over ranks ``(N-1)/N * sum_o B_o``), directions by per-owner broadcasts.  ``compress_dense``:
the dense kind the same way, with the optimizer's greedy dense placement.  A refresh step
(every matrix refreshing) replaces the low-rank reduce by ``full_grad_reduce`` (``(N-1)/N * m n
4``) and adds ``proj_broadcast`` (packed INT4 codes + fp32 scales/zeros + the fp64 schedule).
``tests/unit/test_bench_comm.py`` checks these against the meter of real gloo runs.
"""

from __future__ import annotations

from typing import Any, Sequence

from qgalore_dist.distributed.comm import KINDS
from qgalore_dist.distributed.plan import MatrixSpec, plan_ownership
from qgalore_dist.quant import packed_numel

from .states import int8_groups

__all__ = ["KINDS", "Tensors", "compressed_payload", "ddp_bytes", "numel", "ours_refresh_all", "ours_steady",
           "powersgd_bytes", "powersgd_elements", "ring", "zero2_bytes", "zero3_bytes"]

Tensors = Sequence[tuple[str, tuple[int, ...], bool]]
"""(name, shape, is_galore) of every parameter, in model order."""

PAYLOAD_BLOCK, CODE_BYTES, ABSMAX_BYTES = 256, 1, 4
"""``exchange._PAYLOAD_CODEC``: signed dynamic 8-bit codes, one fp32 absmax per 256 values."""
QUEUE = 5
"""``QGaLoreConfig().queue_size``: the schedule vector broadcast with a projector is 3 + queue fp64."""


def numel(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def ring(world: int) -> float:
    """The ring factor (N-1)/N; ``ValueError`` below 2 ranks (no communication volume)."""
    if world < 2:
        raise ValueError(f"world size must be >= 2 for a communication volume, got {world}")
    return (world - 1) / world


def ddp_bytes(params: int, world: int, *, b: int = 2) -> float:
    """All-reduce of every gradient, ``b`` bytes per element."""
    return 2 * ring(world) * b * params


def zero2_bytes(params: int, world: int, *, b: int = 2) -> float:
    """Reduce-scatter of the gradients + all-gather of the parameters, ``b`` bytes each."""
    return ring(world) * b * params + ring(world) * b * params


def zero3_bytes(params: int, world: int, *, b: int = 2) -> float:
    """Two parameter all-gathers (forward, backward) + one gradient reduce-scatter, ``b`` bytes each."""
    return 3 * ring(world) * b * params


def powersgd_elements(tensors: Tensors, *, rank: int = 4, min_compression_rate: float = 2.0) -> dict[str, int]:
    """Elements the hook all-reduces per step: ``uncompressed`` (concatenated), ``p`` and ``q``."""
    if rank < 1:
        raise ValueError(f"PowerSGD rank must be >= 1, got {rank}")
    out = {"uncompressed": 0, "p": 0, "q": 0, "compressed_tensors": 0, "uncompressed_tensors": 0}
    for _, shape, _ in tensors:
        n = shape[0]
        m = numel(shape) // n
        r = min(n, m, rank)
        if (n + m) * r * min_compression_rate < n * m:  # torch's _should_compress
            out["p"] += n * r
            out["q"] += m * r
            out["compressed_tensors"] += 1
        else:
            out["uncompressed"] += n * m
            out["uncompressed_tensors"] += 1
    return out


def powersgd_bytes(tensors: Tensors, world: int, *, b: int, rank: int = 4, min_compression_rate: float = 2.0) -> float:
    """Per-rank bytes of one compressed step (``iter >= start_powerSGD_iter``)."""
    el = powersgd_elements(tensors, rank=rank, min_compression_rate=min_compression_rate)
    return 2 * ring(world) * b * (el["uncompressed"] + el["p"] + el["q"])


# ----------------------------------------------------------------------------- ours (torch.distributed)
def lowrank_by_owner(tensors: Tensors, rank: int, world: int, placement: str = "balanced") -> list[int]:
    """Low-rank elements (max(m, n) * r per matrix) each rank owns under ``plan_ownership``."""
    specs = [MatrixSpec(name=n, shape=s, rank=rank) for n, s, g in tensors if g]
    plan = plan_ownership(specs, world, placement)
    out = [0] * world
    for spec in specs:
        out[plan.owner[spec.name]] += max(spec.shape) * rank
    return out


def dense_by_owner(tensors: Tensors, world: int) -> list[int]:
    """Dense elements each rank owns: the optimizer's placement (largest first, to the least
    loaded rank, ties to the lower index)."""
    dense = [(i, numel(s)) for i, (_, s, g) in enumerate(tensors) if not g]
    load = [0] * world
    for _, n in sorted(dense, key=lambda d: (-d[1], d[0])):
        load[min(range(world), key=lambda k: (load[k], k))] += n
    return load


def compressed_payload(elements: int) -> int:
    """Bytes of ``elements`` values as 8-bit codes + one fp32 absmax per block."""
    return CODE_BYTES * elements + ABSMAX_BYTES * -(-elements // PAYLOAD_BLOCK)


def _lowrank_kinds(tensors: Tensors, rank: int, world: int, b_lowrank: int, compress: bool,
                   at_rank: int | None) -> tuple[float, float]:
    """(lowrank_reduce, update_gather) bytes; ``at_rank`` None gives the mean over ranks."""
    f = ring(world)
    if not compress:
        lowrank = sum(max(s) * rank for _, s, g in tensors if g)
        return f * lowrank * b_lowrank, f * lowrank * b_lowrank
    per_owner = [compressed_payload(x) for x in lowrank_by_owner(tensors, rank, world)]
    gather = sum(f * b for b in per_owner)
    if at_rank is None:
        return gather, gather
    return float(sum(b for o, b in enumerate(per_owner) if o != at_rank)), gather  # all-to-all: no ring


def _dense_bytes(tensors: Tensors, world: int, b_dense_grad: int, b_dense_param: int, compress_dense: bool,
                 at_rank: int | None) -> float:
    """``dense`` kind: gradients to owners + parameters (or, compressed, directions) back."""
    f = ring(world)
    if not compress_dense:
        return f * sum(numel(s) for _, s, g in tensors if not g) * (b_dense_grad + b_dense_param)
    per_owner = [compressed_payload(x) for x in dense_by_owner(tensors, world)]
    gather = f * sum(per_owner)
    reduce = gather if at_rank is None else float(sum(b for o, b in enumerate(per_owner) if o != at_rank))
    return reduce + gather


def ours_steady(tensors: Tensors, rank: int, world: int, *, b_lowrank: int, b_dense_grad: int, b_dense_param: int,
                compress: bool = False, compress_dense: bool = False, at_rank: int | None = None) -> dict[str, float]:
    """Per-rank bytes of one steady-state step of QGaLoreAdamW8bit, by meter kind."""
    f = ring(world)
    n_galore = sum(1 for *_, g in tensors if g)
    dense = [s for _, s, g in tensors if not g]
    reduce, gather = _lowrank_kinds(tensors, rank, world, b_lowrank, compress, at_rank)
    return {
        "lowrank_reduce": reduce,
        "full_grad_reduce": 0.0,
        "proj_broadcast": 0.0,
        "update_gather": gather,
        "dense": _dense_bytes(tensors, world, b_dense_grad, b_dense_param, compress_dense, at_rank),
        "control": 2 * f * 4 * (1 + 2 * (n_galore + len(dense))),
    }


def projector_payload(elements: int, proj_bits: int = 4, proj_group: int = 256, queue_size: int = QUEUE) -> int:
    """One refresh's broadcast payload: packed codes, fp32 scales + zeros, fp64 schedule vector."""
    return packed_numel(elements, proj_bits) + 2 * 4 * (elements // proj_group) + 8 * (3 + queue_size)


def ours_refresh_all(tensors: Tensors, rank: int, world: int, *, proj_bits: int = 4, proj_group: int = 256,
                     queue_size: int = QUEUE, **steady_kw: Any) -> dict[str, float]:
    """Per-rank bytes of a step on which every GaLore matrix refreshes (e.g. step 0)."""
    f = ring(world)
    out = ours_steady(tensors, rank, world, **steady_kw)
    galore = [s for _, s, g in tensors if g]
    proj = sum(projector_payload(min(s) * rank, proj_bits, proj_group, queue_size) for s in galore)
    out["lowrank_reduce"] = 0.0  # refreshing matrices reduce their full gradient instead
    out["full_grad_reduce"] = f * sum(numel(s) for s in galore) * 4
    out["proj_broadcast"] = f * proj
    return out


def ours_zero(tensors: Tensors, rank: int, world: int, *, stage: int, refresh: bool = False, b_lowrank: int = 4,
              int8_partitioned: bool = False, weight_group: int = 256) -> dict[str, float]:
    """Ours under DeepSpeed ZeRO-2 / ZeRO-3 (closed form, not metered): the package's GaLore kinds
    (as ``ours_steady`` / ``ours_refresh_all``, no ``dense`` kind: the engine owns dense tensors),
    the engine's bf16 dense traffic (``zero2_bytes`` / ``zero3_bytes``) and, under ZeRO-3 with
    ``int8_partitioned``, two all-gathers per step of the INT8 codes + fp32 scales/zeros
    (``1 + 8 / weight_group`` B per weight: 1.03 B at groups of 256)."""
    galore_only = [t for t in tensors if t[2]]
    kw = dict(b_lowrank=b_lowrank, b_dense_grad=0, b_dense_param=0)
    out = (ours_refresh_all if refresh else ours_steady)(galore_only, rank, world, **kw)
    dense = sum(numel(s) for _, s, g in tensors if not g)
    out["dense"] = (zero2_bytes if stage == 2 else zero3_bytes)(dense, world)
    out["int8_all_gather"] = 0.0
    if stage == 3 and int8_partitioned:
        int8 = sum(numel(s) + 8 * int8_groups(s, weight_group) for _, s, g in galore_only)
        out["int8_all_gather"] = 2 * ring(world) * int8
    return out
