"""Memory per rank of Q-GaLore on FSDP2 (``qgalore_dist.integrations.fsdp``, ``projection="sharded"``:
right projection ``R = G Q`` for every matrix) and of FSDP2 + AdamW / torchao AdamW8bit, by closed
form; the most loaded of N ranks, columns as in ``ranks.py``.

* weights      this rank's ``Shard(0)`` rows of every INT8 weight and of every dense parameter:
               FSDP2 pads dim 0 to a multiple of N, so every rank stores ``ceil(d0 / N)`` rows
               (INT8: ``ceil(m / N) n`` codes + fp32 scales/zeros of ``ceil(m / N)`` rows'
               ``ceil(n / g)`` groups each -- the row-aligned layout, sharded as ``(m, ceil(n/g))``).
* gradients    steady step: the sink's fp32 ``(m, r)`` low-rank gradient of *every* matrix (each
               rank projects its own full gradient, all m rows, before the row reduce-scatter);
               with ``overlap_comm`` the rows leave during backward: this rank's fp32 rows
               ``(r1 - r0, r)`` of every matrix + one bucket of ``(m, r)`` gradients being filled;
               refresh step: the full fp32 ``(m, n)`` gradient of every matrix (today), or with
               ``streamed_refresh`` the ones this rank owns + one bucket + one transient full
               gradient; plus the dense gradient shards (``dense_bytes`` per element).
* optimizer    8-bit moments of this rank's rows (``torch.chunk``'s split, uneven allowed) x r of
               every matrix (8 bits chosen from
               the global ``m r``, as one process does) and of its dense shards.
* projectors   the packed INT4 ``r x n`` projector of every matrix + fp32 scales/zeros
               (replicated), and the fp32 first singular vector (``n`` floats) of the matrices
               this rank owns (``plan_ownership``).
* comm buffers the larger of (a) the step's row reduce-scatter: one ``bucket_cap_mb`` bucket of
               concatenated ``(m, r)`` rows + this rank's ``1/N`` outputs of all matrices; on
               refresh steps also the ``(m, r)`` projections of the new full gradients and the
               owner's low-rank results; and (b) FSDP2's backward: the root group (embeddings,
               head, final norm) unsharded, its unsharded gradients and their reduce-scatter
               copy, and two decoder layers all-gathered (current + prefetched).  With
               ``overlap_comm`` a steady step's row reduce-scatter runs inside (b): one bucket
               in flight on top of it, nothing at ``step()``.
* temporary    refresh: the owner's clone of the largest full gradient + its SVD factors (when
               larger than the buffers then alive); otherwise the torch row update of the
               largest matrix: fp32 ``P`` (r x n) + five fp32 ``ceil(m/N) x n`` row tensors; at least
               the sink's transient full fp32 gradient of the largest matrix.

Uneven row splits are costed per rank (``chunk_rows``); shapes ``check_shardable`` still refuses
(``row_shard_problem``: a rank without rows, flat groups spanning rows cut by a shard) raise
``Unsupported``.  ``benchmarks/memory_fsdp.py``
checks the persistent components byte for byte against a real 2-rank gloo FSDP2 run.
"""

from __future__ import annotations

import math
from typing import Any

from qgalore_dist.distributed.rows import chunk_rows, row_shard_problem
from qgalore_dist.quant import packed_numel

from .model import Layout, Shapes, Tensor
from .ranks import (
    RankBytes,
    Unsupported,
    bucket,
    bucket_cap,
    galore_owners,
    payload_bytes,
    streamed_full_grads,
    svd_temporary,
)
from .states import int8_groups, moment_8bit_bytes

__all__ = ["approaches", "components", "fsdp2_baseline_bytes", "fsdp_rank_bytes", "not_shardable"]


def not_shardable(shapes: Shapes, world: int) -> str | None:
    """Why ``qgalore_dist.integrations.fsdp.check_shardable`` rejects these shapes at ``world`` ranks, or None."""
    g = shapes.lay.weight_group
    for t in shapes.galore:
        m, n = t.shape
        problem = row_shard_problem(m, n, g, world)
        if problem is not None:
            return f"{t.name} ({m}x{n}) cannot be row-sharded over {world} ranks: {problem}"
    return None


def _dense_rows(d0: int, world: int) -> int:
    """Rows of a dense tensor FSDP2 allocates on every rank (dim 0 padded to a multiple of N)."""
    return -(-d0 // world)


def moment_local(local: int, global_numel: int, lay: Layout) -> int:
    """One moment of a local shard: 8-bit (with ``min_8bit_size=0``) iff the global tensor is 8-bit."""
    return moment_8bit_bytes(local, Layout(rank=lay.rank, min_8bit_size=0)) if global_numel >= lay.min_8bit_size \
        else 4 * local


def _stored_groups(t: Tensor, group_size: int, world: int) -> int:
    """Scale (or zero) elements one rank stores: ``ceil(m/N)`` rows of ``ceil(n/g)`` groups
    (row-aligned, sharded as ``(m, ceil(n/g))``), or ``ceil(G/N)`` of the flat ``(G, 1)``."""
    (m, n), groups = t.shape, int8_groups(t.shape, group_size)
    return _dense_rows(m, world) * (groups // m) if group_size <= n else _dense_rows(groups, world)


def galore_components(t: Tensor, lay: Layout, world: int, rank: int, owner: bool) -> dict[str, int]:
    """One INT8 GaLore matrix on ``rank`` (right projection), in ``measure_rank``'s keys: codes and
    scales/zeros stored padded to ``ceil(m/N)`` rows (FSDP2), moments of the rows ``rank`` holds."""
    (m, n), r = t.shape, lay.rank
    stored = _dense_rows(m, world)
    r0, r1 = chunk_rows(m, world)[rank]
    return {
        "int8_codes": stored * n,
        "int8_scales_zeros": 2 * 4 * _stored_groups(t, lay.weight_group, world),
        "lowrank_state": 2 * moment_local((r1 - r0) * r, m * r, lay),
        "proj_codes": packed_numel(r * n, lay.proj_bits),
        "proj_scales_zeros": 2 * 4 * (r * n // lay.proj_group),
        "proj_past_vector": 4 * n if owner and lay.adaptive else 0,
        "grad_steady": 4 * m * r,
        "grad_steady_rows": 4 * (r1 - r0) * r,     # overlap_comm: this rank's reduced rows
        "grad_refresh": 4 * m * n,
        "grad_refresh_owned": 4 * m * n if owner else 0,  # stream_refresh: the owner's reduced sum
    }


def dense_components(t: Tensor, lay: Layout, world: int, rank: int) -> dict[str, int]:
    """One dense parameter's FSDP2 shard on ``rank``: parameter and gradient storages are padded
    to ``ceil(d0/N)`` rows on every rank; the moments follow the unpadded local gradient
    (``torch.chunk`` rows: ``ceil(d0/N)`` on the first ranks, fewer or none on the last)."""
    rows, row_numel = _dense_rows(t.shape[0], world), math.prod(t.shape[1:])
    own_rows = max(0, min(rows, t.shape[0] - rank * rows))
    return {"dense_weights": lay.dense_bytes * rows * row_numel,
            "dense_state": 2 * moment_local(own_rows * row_numel, t.numel, lay),
            "dense_grads": lay.dense_bytes * rows * row_numel}


def components(shapes: Shapes, world: int, rank: int) -> dict[str, int]:
    """Every persistent component and both gradient kinds of ``rank``, summed over tensors."""
    owners, out = galore_owners(shapes, world), {}
    parts = [galore_components(t, shapes.lay, world, rank, owners[t.name] == rank) for t in shapes.galore]
    parts += [dense_components(t, shapes.lay, world, rank) for t in shapes.dense]
    for part in parts:
        for key, value in part.items():
            out[key] = out.get(key, 0) + value
    return out


def layer_groups(shapes: Shapes) -> tuple[int, int]:
    """Unsharded bytes of (the root FSDP group, the largest decoder-layer group) under ``shard_model``."""
    lay, layers, root = shapes.lay, {}, 0
    for t in shapes.tensors:
        size = t.numel + 8 * int8_groups(t.shape, lay.weight_group) if t.galore else lay.dense_bytes * t.numel
        if ".layers." in t.name:
            key = t.name.split(".layers.")[1].split(".")[0]
            layers[key] = layers.get(key, 0) + size
        else:
            root += size
    return root, max(layers.values())


def _rows_bucket(shapes: Shapes, elem_bytes: int) -> int:
    """One ``bucket_cap_mb`` bucket of ``(m, r)`` low-rank gradients, ``elem_bytes`` per element."""
    rows = [t.shape[0] * shapes.lay.rank for t in shapes.galore]
    return bucket(elem_bytes * sum(rows), elem_bytes * max(rows), bucket_cap())


def _step_buffers(shapes: Shapes, world: int, rank: int, steady: bool, streamed_refresh: bool = True) -> int:
    """The step's row reduce-scatter buffers (and, refreshing, the projections and owner results)."""
    lay, b, owners = shapes.lay, payload_bytes(), galore_owners(shapes, world)
    rows_all = sum(t.shape[0] * lay.rank for t in shapes.galore)      # sum of m r over matrices
    rows_mine = sum((r1 - r0) * lay.rank for t in shapes.galore for r0, r1 in [chunk_rows(t.shape[0], world)[rank]])
    rows_owned = sum(t.shape[0] * lay.rank for t in shapes.galore if owners[t.name] == rank)
    rows_max = max(t.shape[0] * lay.rank for t in shapes.galore)
    out = bucket(b * rows_all, b * rows_max, bucket_cap()) + b * rows_mine
    if not steady and streamed_refresh:  # owner's R of its matrices + one bucket of R broadcast
        out += 4 * rows_owned + bucket(4 * rows_all, 4 * rows_max, bucket_cap())
    elif not steady:  # _refresh's owner results + _reduce_rows' projections of the new full gradients
        out += 4 * rows_owned + 4 * rows_all
    return out


def fsdp_rank_bytes(shapes: Shapes, world: int, rank: int, *, steady: bool,
                    streamed_refresh: bool = True, overlap: bool = False) -> RankBytes:
    """``FSDPQGaLoreAdamW8bit`` (``projection="sharded"``) on ``rank`` of ``world`` (module doc);
    ``overlap``: ``QGaLoreConfig.overlap_comm`` (changes steady steps only: a refresh step's
    refreshing layers keep full gradients, which are not overlapped this way)."""
    reason = not_shardable(shapes, world)
    if reason:
        raise Unsupported(reason)
    c, lay, owners = components(shapes, world, rank), shapes.lay, galore_owners(shapes, world)
    root, layer = layer_groups(shapes)
    root_grads = lay.dense_bytes * sum(t.numel for t in shapes.dense if ".layers." not in t.name)
    overlap = overlap and steady
    backward = root + 2 * root_grads + 2 * layer
    if overlap:  # the rows' reduce-scatter runs during backward, one bucket in flight; nothing at step()
        buffers = backward + _rows_bucket(shapes, payload_bytes())
    else:
        buffers = max(_step_buffers(shapes, world, rank, steady, streamed_refresh), backward)
    largest = max(shapes.galore, key=lambda t: t.numel)
    (m, n), r = largest.shape, lay.rank
    temporary = max(4 * (r * n + 5 * _dense_rows(m, world) * n), 4 * m * n)
    if not steady and owners[largest.name] == rank:
        temporary = max(temporary, svd_temporary(largest) - buffers)
    if overlap:  # own rows of every matrix + one bucket of local (m, r) gradients being filled
        galore_grads = c["grad_steady_rows"] + _rows_bucket(shapes, 4)
    elif steady:
        galore_grads = c["grad_steady"]
    elif streamed_refresh:
        galore_grads = streamed_full_grads(shapes, world, [t for t in shapes.galore if owners[t.name] == rank])
    else:
        galore_grads = c["grad_refresh"]
    return RankBytes(weights=c["int8_codes"] + c["int8_scales_zeros"] + c["dense_weights"],
                     gradients=galore_grads + c["dense_grads"],
                     optimizer=c["lowrank_state"] + c["dense_state"],
                     projectors=c["proj_codes"] + c["proj_scales_zeros"] + c["proj_past_vector"],
                     comm_buffers=buffers, temporary=temporary)


def fsdp2_baseline_bytes(shapes: Shapes, world: int, rank: int, *, eight_bit: bool) -> RankBytes:
    """FSDP2 + AdamW with bf16 mixed precision (``MixedPrecisionPolicy(param_dtype=bf16,
    reduce_dtype=bf16)``, ``fully_shard`` per decoder layer + root): fp32 ``Shard(0)``
    parameters and gradients (padded rows), fp32 m and v of the local rows -- or, ``eight_bit``,
    torchao ``AdamW8bit``'s block-wise 8-bit m and v (the same 256-block rule as ours, fp32 under
    4096 elements).  Buffers: the bf16 root unsharded with its unsharded bf16 gradients and their
    reduce-scatter copy, and two bf16 decoder layers gathered (as for ours)."""
    state = weights = 0
    for t in shapes.tensors:
        row_numel = math.prod(t.shape[1:])
        rows = _dense_rows(t.shape[0], world)
        local = max(0, min(rows, t.shape[0] - rank * rows)) * row_numel
        weights += 4 * rows * row_numel
        state += 2 * (moment_local(local, t.numel, shapes.lay) if eight_bit else 4 * local)
    root = 2 * sum(t.numel for t in shapes.tensors if ".layers." not in t.name)
    layers: dict[str, int] = {}
    for t in shapes.tensors:
        if ".layers." in t.name:
            key = t.name.split(".layers.")[1].split(".")[0]
            layers[key] = layers.get(key, 0) + 2 * t.numel
    return RankBytes(weights=weights, gradients=weights, optimizer=state, projectors=0,
                     comm_buffers=3 * root + 2 * max(layers.values()), temporary=0)


def approaches() -> dict[str, tuple[str, Any]]:
    """The FSDP2 rows of the per-rank table: key -> (description, f(shapes, world, rank))."""
    return {
        "fsdp2_adamw": ("FSDP2 + AdamW (bf16 mixed precision, fp32 sharded params/grads/m/v)",
                        lambda s, n, r: fsdp2_baseline_bytes(s, n, r, eight_bit=False)),
        "fsdp2_torchao_adamw8bit": ("FSDP2 + torchao AdamW8bit (8-bit sharded m/v)",
                                    lambda s, n, r: fsdp2_baseline_bytes(s, n, r, eight_bit=True)),
        "ours_fsdp2_steady": ("ours on FSDP2 (qgalore_dist.integrations.fsdp, sharded rows), steady step",
                              lambda s, n, r: fsdp_rank_bytes(s, n, r, steady=True)),
        "ours_fsdp2_steady_overlap": ("ours on FSDP2 with overlap_comm, steady step (rows reduce-scattered "
                                      "during backward)",
                                      lambda s, n, r: fsdp_rank_bytes(s, n, r, steady=True, overlap=True)),
        "ours_fsdp2_refresh": ("ours on FSDP2, refresh step (all matrices; full gradients streamed to owners)",
                               lambda s, n, r: fsdp_rank_bytes(s, n, r, steady=False)),
        "ours_fsdp2_refresh_kept": ("ours on FSDP2, refresh step with stream_refresh=False (every rank keeps "
                                    "every full fp32 gradient)",
                                    lambda s, n, r: fsdp_rank_bytes(s, n, r, steady=False, streamed_refresh=False)),
    }
