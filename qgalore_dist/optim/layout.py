"""Where the rows of each weight live on this rank, and how gradients and updates reach them.

:class:`QGaLoreAdamW8bit` is one optimizer for every engine; what differs between replicated
weights (one process, plain data parallel, DeepSpeed ZeRO 0-2, ZeRO-3 with ``int8_partition``
off) and row-sharded ones (FSDP2; ZeRO-3's row partitions,
:class:`qgalore_dist.integrations.zero3.ZeroRowLayout`, which composes FSDP2's layout) is this
object, which the optimizer is given:

* :class:`ReplicatedLayout` (default): every rank holds every row.  Each GaLore matrix and each
  dense parameter has one owner rank: gradients are reduced to it, it runs Adam and every rank
  applies the owner's direction (dense: receives the updated value).
* :class:`qgalore_dist.integrations.fsdp.RowShardedLayout`: rank ``k`` of the shard group holds
  the rows of its FSDP2 ``Shard(0)`` shard (``torch.chunk``: ``ceil(m / S)`` per rank, the
  last fewer); right-projected low-rank gradients are reduce-scattered by
  those row ranges and every rank updates its own rows (no owner); dense parameters arrive as
  local shards with gradients already averaged by ``fully_shard``.

The contract (:class:`WeightLayout`) is small: a row range per matrix, the local tensor of a
(possibly distributed) tensor, whether a matrix's low-rank rows are reduced by row range, the
row reduce itself, and the codec that stores moments of row-local tensors.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..core import Int8Linear, WeightStep
from ..distributed import Collectives
from ..quant import BlockwiseCodec

__all__ = ["ReplicatedLayout", "WeightLayout"]


class WeightLayout(Protocol):
    """What :class:`~qgalore_dist.optim.QGaLoreAdamW8bit` asks of a weight layout."""

    weights_sharded: bool
    """True when a rank holds only its own rows of each INT8 weight."""
    dense_local: bool
    """True when dense gradients arrive reduced and sharded (the engine averaged them): every
    rank updates its own shard, no owner exchange."""
    replicas: int
    """Ranks that hold the same rows (HSDP's replicate group; 1 otherwise)."""

    def rows(self, p: torch.Tensor) -> tuple[int, int]:
        """The rows ``[r0, r1)`` of ``p`` (global indices) this rank holds."""

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's local tensor of ``t`` (``t`` itself when not distributed)."""

    def row_reduced(self, side: str) -> bool:
        """Whether low-rank gradients of a matrix projected on ``side`` are reduced by row range."""

    def apply_int8(self, layer: Int8Linear, delta: torch.Tensor, how: WeightStep, *, stochastic_key) -> None:
        """Apply ``delta`` (this rank's rows of the back-projected update) to this rank's rows
        of ``layer``'s INT8 weight with the one rule (:func:`~qgalore_dist.core.adam.apply_direction_`)
        and requantize them (stochastic rounding keyed by ``stochastic_key`` at the rows' global
        element indices, so every layout writes the codes one process would)."""

    def reduce_rows(self, items: list, *, dtype: torch.dtype, bucket_bytes: int) -> dict:
        """``items``: ``(param, local (m, r) low-rank gradient)``; returns ``{param: mean rows}``."""

    def backward_row_groups(self) -> tuple[Collectives, Collectives | None] | None:
        """``(shard, replicate)`` groups when the row reduce may run during backward
        (``overlap_comm``: :class:`~qgalore_dist.distributed.OverlappedReduce` with row
        destinations), else None (rows are reduced in ``step()``)."""

    def row_ranges(self, p: torch.Tensor) -> list[tuple[int, int]]:
        """Every shard rank's rows ``[r0, r1)`` of ``p`` (rank ``k`` of the shard group at index
        ``k``); only asked when :meth:`backward_row_groups` is not None."""

    def moment_codec(self, numel_global: int, codec: BlockwiseCodec) -> BlockwiseCodec:
        """The codec of the moments of a row-local tensor whose whole tensor has ``numel_global``
        elements: ``codec``'s bits when ``codec`` would store the whole tensor in 8 bits (decided
        from the global size, as one process decides), else fp32."""

    def collectives(self) -> list[Collectives]:
        """Every process group the layout talks over (their meters end each step)."""


class ReplicatedLayout:
    """Every rank holds every row of every weight (see the module doc)."""

    weights_sharded = False
    dense_local = False
    replicas = 1

    def __init__(self, comm: Collectives) -> None:
        self.comm = comm

    def rows(self, p: torch.Tensor) -> tuple[int, int]:
        return 0, p.shape[0]

    def local(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def row_reduced(self, side: str) -> bool:
        return False

    def apply_int8(self, layer: Int8Linear, delta: torch.Tensor, how: WeightStep, *, stochastic_key) -> None:
        layer.apply_update_(delta, step_size=how.step_size, decay=how.decay, stochastic_key=stochastic_key)

    def reduce_rows(self, items: list, *, dtype: torch.dtype, bucket_bytes: int) -> dict:
        raise AssertionError("a replicated layout reduces every matrix to its owner")

    def backward_row_groups(self) -> None:
        return None

    def row_ranges(self, p: torch.Tensor) -> list[tuple[int, int]]:
        raise AssertionError("a replicated layout reduces every matrix to its owner")

    def moment_codec(self, numel_global: int, codec: BlockwiseCodec) -> BlockwiseCodec:
        raise AssertionError("a replicated layout keeps whole moments on their owner")

    def collectives(self) -> list[Collectives]:
        return [self.comm]
