"""Row shards of a matrix as FSDP2 / DTensor ``Shard(0)`` lays them out, and whether an INT8
weight's quantization groups survive them.

Pure functions of shapes and the world size, so a plan (or a memory estimate) needs no process
group.  FSDP2 splits dim 0 with ``torch.chunk`` semantics: ``ceil(m / N)`` rows per rank, the
last ranks fewer or none (it pads the local storage, the DTensor's rows are these).
"""

from __future__ import annotations

from ..quant import weight_row_length

__all__ = ["chunk_rows", "row_shard_problem"]


def chunk_rows(rows: int, world: int) -> list[tuple[int, int]]:
    """``[(r0, r1)]`` per rank ``0..world-1``: rank ``k`` holds rows ``[k c, min((k + 1) c, rows))``
    with ``c = ceil(rows / world)`` (empty ranges at the end when ``c (world - 1) >= rows``)."""
    if world <= 0:
        raise ValueError(f"world size must be positive, got {world}")
    chunk = -(-rows // world)
    return [(min(rows, k * chunk), min(rows, (k + 1) * chunk)) for k in range(world)]


def row_shard_problem(m: int, n: int, group_size: int, world: int) -> str | None:
    """Why an INT8 ``(m, n)`` weight with ``group_size`` cannot be row-sharded over ``world``
    ranks, with the nearest setting that can; None when it can.

    Row-aligned group layouts (``group_size <= n``, :func:`~qgalore_dist.quant.weight_row_length`)
    never put a group across a shard boundary, whatever the row split (ranks left without rows
    included).  Refused: a flat layout (``group_size > n``: groups span rows) whose shard
    boundaries are not group boundaries (``ceil(m/N) n != ceil(G/N) g`` for its ``G`` groups:
    FSDP2 chunks the codes by rows and the ``(G, 1)`` scales by groups), and a group size that
    fits no layout."""
    try:
        row_length = weight_row_length(m, n, group_size)
    except ValueError as exc:
        return str(exc)
    # Flat groups: the codes' chunks (ceil(m/N) rows) and the (G, 1) scales' chunks (ceil(G/N)
    # groups) must cover the same elements, then every boundary is a group boundary.
    rows, groups = -(-m // world), -(-(m * n // group_size) // world)
    if row_length is None and rows * n != groups * group_size:
        return (f"its {group_size}-element groups span rows (group_size > in_features = {n}) and FSDP2's row "
                f"shards of ceil({m}/{world}) = {rows} rows would cut one; use group_size <= {n} (row-aligned "
                f"groups, e.g. group_size={n})")
    return None
