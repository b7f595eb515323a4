"""What runs during backward: each INT8 layer's gradient sink, and the reduces that send
gradients to their owners as soon as backward produces them (:class:`OverlappedReduce`).

* ``lowrank`` (``overlap_comm``): steady layers' low-rank gradients, to their owners.
* ``rows`` (``overlap_comm`` on a layout that reduces by rows during backward, FSDP2): steady
  row-reduced layers' low-rank gradients, each rank's row range to it.
* ``dense`` (``overlap_comm`` where the optimizer manages dense parameters): ``p.grad`` from
  post-accumulate-grad hooks.
* ``full`` (``stream_refresh``, world size > 1): refreshing layers' full fp32 gradients, so no
  rank holds more full gradients than the refreshing matrices it owns plus one bucket.

:meth:`BackwardReduces.arm` (before each backward) gives every INT8 layer its sink for the
coming step and plans the ``lowrank`` and ``full`` reduces; plans depend only on shapes, owners
and the refresh schedule, so they are the same on every rank.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..core import Int8Linear, Projector, accumulate_full_grad, int8_layer_of, lowrank_sink
from ..distributed import Collectives, OverlappedReduce

__all__ = ["BackwardReduces"]


@dataclass(kw_only=True, slots=True)
class BackwardReduces:
    """The reduces overlapped with backward (module doc); each None when off."""

    lowrank: OverlappedReduce | None = None
    rows: OverlappedReduce | None = None
    dense: OverlappedReduce | None = None
    full: OverlappedReduce | None = None
    layers: dict[torch.Tensor, Int8Linear] = field(default_factory=dict)
    """The INT8 layer of each GaLore weight, resolved in :meth:`arm`: during FSDP2's backward the
    layer's ``weight`` is the unsharded tensor, so ``int8_layer_of(p)`` would not find it."""

    @classmethod
    def build(cls, comm: Collectives, *, overlap_comm: bool, stream_refresh: bool, dtype: torch.dtype,
              bucket_bytes: int | None, dense_owned: list[tuple[torch.Tensor, int]] | None,
              row_groups: tuple[Collectives, Collectives | None] | None = None) -> "BackwardReduces":
        """``dense_owned``: ``(parameter, owner_rank)`` of the dense parameters the optimizer
        reduces itself (None: an engine does), hooked in reverse order (backward's).
        ``row_groups``: ``(shard, replicate)`` groups of a layout whose row reduce may run
        during backward (None: row-reduced matrices wait for ``step()``)."""
        common = dict(dtype=dtype, bucket_bytes=bucket_bytes)
        out = cls()
        layers = out.layers
        if overlap_comm:
            out.lowrank = OverlappedReduce(comm, kind="lowrank_reduce", local_grad=lambda p: layers[p].lowrank_grad,
                                           drop_grad=lambda p: setattr(layers[p], "lowrank_grad", None), **common)
        if overlap_comm and row_groups is not None:
            out.rows = OverlappedReduce(row_groups[0], kind="lowrank_reduce", replicate=row_groups[1],
                                        local_grad=lambda p: layers[p].lowrank_grad,
                                        drop_grad=lambda p: setattr(layers[p], "lowrank_grad", None), **common)
        if overlap_comm and dense_owned is not None:
            out.dense = OverlappedReduce(comm, kind="dense", local_grad=lambda p: p.grad,
                                         drop_grad=lambda p: setattr(p, "grad", None), **common)
            hooked = [(p, owner) for p, owner in dense_owned if p.requires_grad]
            out.dense.plan([(p, owner, p.shape) for p, owner in hooked[::-1]])
            for p, _ in hooked:
                p.register_post_accumulate_grad_hook(out.dense.ready)
        # One process owns every matrix: streaming is worth it there only when its SVDs can run
        # during backward (passes per step known; see ``full_active``).
        if stream_refresh:
            out.full = OverlappedReduce(comm, kind="full_grad_reduce", dtype=torch.float32, bucket_bytes=bucket_bytes,
                                        local_grad=lambda p: layers[p].weight_grad,
                                        drop_grad=lambda p: setattr(layers[p], "weight_grad", None))
        return out

    @property
    def full_active(self) -> bool:
        """Whether refreshing layers stream their full gradients this step: at world size > 1,
        or in one process when the passes per step are known (each SVD then runs as its
        gradient completes, so one process never holds every refreshing full gradient)."""
        return self.full is not None and (self.full.comm.world_size > 1 or self.full.passes_per_step is not None)

    @property
    def streamed(self) -> set[torch.Tensor]:
        """The refreshing matrices whose full gradients ``full`` reduces this step (empty when off)."""
        return self.full.members if self.full is not None else set()

    @property
    def overlapped(self) -> set[torch.Tensor]:
        """The matrices whose low-rank gradients ``lowrank`` or ``rows`` reduce this step (empty when off)."""
        return set().union(*(r.members for r in (self.lowrank, self.rows) if r is not None))

    def all(self) -> list[OverlappedReduce]:
        return [r for r in (self.lowrank, self.dense, self.full, self.rows) if r is not None]

    def arm(self, galore_params: list[torch.Tensor], *, refresh_due: Callable[[torch.Tensor], bool],
            owner: dict[torch.Tensor, int], projector: Callable[[torch.Tensor], Projector],
            row_reduced: Callable[[torch.Tensor], bool],
            row_ranges: Callable[[torch.Tensor], list[tuple[int, int]]] | None = None) -> None:
        """Give each INT8 layer its sink for the coming backward: refreshing layers keep the
        full gradient (with ``full``: until it leaves for its owner), the others project at
        once (with ``lowrank``: and report; ``row_reduced`` ones report to ``rows``, with every
        rank's ``row_ranges``, or without it are reduce-scattered by rows in ``step()``); then
        plan the reduces."""
        steady, refreshing, by_rows = [], [], []
        for p in galore_params:
            layer = int8_layer_of(p)
            if layer is None:
                continue
            self.layers[p] = layer
            proj = projector(p)
            if refresh_due(p):
                full_shape = torch.Size((layer.out_features, layer.in_features))
                layer.grad_sink = (_reporting(p, accumulate_full_grad, self.full) if self.full_active
                                   else accumulate_full_grad)
                refreshing.append((p, owner[p], full_shape))
            elif self.lowrank is None or (row_reduced(p) and self.rows is None):
                layer.grad_sink = lowrank_sink(proj.project)
            elif row_reduced(p):
                layer.grad_sink = _reporting(p, lowrank_sink(proj.project), self.rows)
                by_rows.append((p, tuple(row_ranges(p)), torch.Size(proj.lowrank_shape)))
            else:
                layer.grad_sink = _reporting(p, lowrank_sink(proj.project), self.lowrank)
                steady.append((p, owner[p], torch.Size(proj.lowrank_shape)))
        if self.lowrank is not None:  # backward meets the last layers first
            self.lowrank.plan(steady[::-1])
        if self.rows is not None:
            self.rows.plan(by_rows[::-1])
        if self.full is not None:
            self.full.plan(refreshing[::-1] if self.full_active else [])

    @contextlib.contextmanager
    def no_sync(self):
        """Gradients accumulate locally, nothing is launched (DDP's ``no_sync``)."""
        reducers = self.all()
        for reducer in reducers:
            reducer.sync = False
        try:
            yield
        finally:
            for reducer in reducers:
                reducer.sync = True


def _reporting(p: torch.Tensor, accumulate, reducer: OverlappedReduce):
    """A sink that accumulates like ``accumulate`` and then tells ``reducer`` that ``p`` grew."""
    def sink(layer, weight_grad: torch.Tensor) -> None:
        accumulate(layer, weight_grad)
        reducer.ready(p)
    return sink
