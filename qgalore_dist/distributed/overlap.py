"""Gradient reduces overlapped with backward (``QGaLoreConfig.overlap_comm``): the low-rank
gradients of INT8 layers, and the dense gradients when the optimizer manages them.

Plan (:meth:`OverlappedReduce.plan`, before each backward): the INT8 GaLore matrices
that do not refresh at the coming step, in reverse order of the optimizer's parameters --
roughly the order backward produces their gradients -- packed into ``bucket_cap_mb``
buckets by :func:`~qgalore_dist.distributed.pack_buckets`, the first one capped at 1 MiB as
DDP does, so that the first collective starts early in backward.  The plan depends only on shapes,
owners and the refresh schedule, so it is the same on every rank.

During backward, each layer's gradient sink projects the gradient into
``layer.lowrank_grad`` and calls :meth:`~OverlappedReduce.ready`.  Once every member of
the next bucket (in plan order) has reported, the bucket is reduce-scattered to its owners
asynchronously and every rank drops its local low-rank gradients of that bucket; the owner
adds the averaged result to its own sum when the collective completes.  So the exchange runs
while backward computes the earlier layers, and between backward and ``step()`` only owners
hold low-rank gradients: ZeRO-2's gradient partitioning applied to the low-rank tensors.

Row-sharded results (FSDP2's right-projected low-rank gradients, ``RowShardedLayout``): a
member's destination is then the row ranges of every rank instead of one owner, and rank ``k``'s
chunk carries rows ``ranges[k]`` of each member -- the reduce-scatter of
:func:`~qgalore_dist.distributed.exchange.reduce_rows_to_shards`, launched during backward; after
backward each rank holds its own rows only.  HSDP: the reduce-scatter runs inside the shard group
and the mean across the replicate group is one all-reduce per bucket of the kept rows in
:meth:`collect` (at ``step()``): FSDP2 issues its own all-reduces on that group during backward,
and a collective launched from :meth:`_reap`, whose timing is not the same on every rank, could
interleave with them in a different order on different ranks.

Dense parameters work the same way, reporting from a post-accumulate-grad hook: ``p.grad`` is
reduced to the parameter's owner and dropped on every rank (ZeRO-2 for the dense part).

Buckets launch strictly in plan order, so all ranks issue the same collectives in the same
order provided every rank's backward produces gradients for the same parameters in the same
order: the contract of DDP without ``find_unused_parameters``.  :meth:`flush` (first thing in
``step()``) launches what is still pending, in order; :meth:`collect` waits for everything and
returns the owner's sums.

Gradient accumulation: inside ``optimizer.no_sync()`` contributions accumulate locally and
nothing is launched (DDP's ``no_sync``); without it every micro-batch is reduced and the owner
sums the averages, as DeepSpeed ZeRO-2 does: the same result up to rounding, for one exchange
per micro-batch.

Completion (``passes_per_step`` and ``on_complete``): when the number of backward passes per
step is known, a reduce launched during the last one completes its owner's sum, and
``on_complete(p, sum)`` takes it at once (popped: the refresh step's owner runs its SVD and frees
the full gradient during backward instead of holding it until ``step()``).  A pass beyond
``passes_per_step`` raises ``ValueError`` on every rank at the same sink (each rank counts the same
passes), before anything of it is sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .comm import Collectives, TrafficKind
from .exchange import pack_buckets

__all__ = ["Destination", "OverlappedReduce"]

Destination = int | tuple[tuple[int, int], ...]
"""Where a member's reduced gradient goes: its owner rank, or rows ``[r0, r1)`` to every rank
(rank ``k`` of the group at index ``k``; contiguous, uneven or empty ranges allowed)."""

FIRST_BUCKET_BYTES = 2**20
"""Cap of the first bucket (DDP's ``_DEFAULT_FIRST_BUCKET_BYTES``)."""
MAX_IN_FLIGHT = 1
"""Launched buckets that may be incomplete at once: before a bucket's send buffers are built the
oldest is waited for until fewer remain.  Memory, not speed: a backend that does not progress
asynchronous collectives on its own (gloo, measured: nothing completes until waited) would
otherwise keep every bucket's send buffer -- on a refresh step, every full gradient -- alive until
``step()``."""


@dataclass(kw_only=True, slots=True)
class _Bucket:
    members: list[tuple[torch.Tensor, Destination, torch.Size]]
    """``(parameter, destination, gradient_shape)`` in plan order."""
    reported: set[torch.Tensor] = field(default_factory=set)
    """Members that reported a gradient since the bucket last launched (sync mode only)."""


@dataclass(kw_only=True, slots=True)
class _InFlight:
    mine: list[tuple[torch.Tensor, torch.Size]]
    """What this rank receives of the bucket (members it owns, its rows of row-reduced ones) with
    its shape, in the order of its output chunk."""
    out: torch.Tensor
    chunks: list[torch.Tensor]
    """The send buffers, kept alive until the collective completes."""
    handle: object
    final: bool
    """Launched during the step's last backward pass (or at ``step()``): completes its sums."""


class OverlappedReduce:
    """Bucketed, asynchronous reduce-scatter of gradients to their owners or row shards, launched from
    gradient sinks / hooks during backward (module doc).  ``local_grad(p)`` reads this rank's
    accumulated gradient of ``p`` (None: none yet) and ``drop_grad(p)`` releases it.
    ``replicate`` (HSDP, row destinations): the group across which :meth:`collect` averages the
    received rows."""

    def __init__(self, comm: Collectives, *, kind: TrafficKind, dtype: torch.dtype, bucket_bytes: int | None,
                 local_grad: Callable[[torch.Tensor], torch.Tensor | None],
                 drop_grad: Callable[[torch.Tensor], None], replicate: Collectives | None = None) -> None:
        self.comm, self.kind, self.dtype, self.bucket_bytes = comm, kind, dtype, bucket_bytes
        self.replicate = replicate if replicate is not None and replicate.world_size > 1 else None
        self.local_grad, self.drop_grad = local_grad, drop_grad
        self.buckets: list[_Bucket] = []
        self.bucket_of: dict[torch.Tensor, int] = {}
        self.sync = True
        """False inside ``no_sync()``: gradients accumulate locally, nothing is launched."""
        self.next_bucket = 0
        self.in_flight: list[_InFlight] = []
        self.owned_sum: dict[torch.Tensor, torch.Tensor] = {}
        self.reported: set[torch.Tensor] = set()
        """Matrices that received a gradient since the last step (presence, for the agreement)."""
        self._finite: list[torch.Tensor] = []
        """One flag per launched chunk (device tensors: no host sync during backward)."""
        self.launches_in_backward = 0
        self.launches_at_step = 0
        self.passes_per_step: int | None = None
        """Backward passes between steps when known (``gradient_accumulation_steps``), else None."""
        self.on_complete: Callable[[torch.Tensor, torch.Tensor], None] | None = None
        """Takes an owned sum that the last pass completed (module doc); None: ``collect`` returns it."""
        self.passes = 0
        """Backward passes completed since the last step (every member reported once)."""
        self._pass_reported: set[torch.Tensor] = set()

    @property
    def members(self) -> set[torch.Tensor]:
        return set(self.bucket_of)

    def plan(self, items: list[tuple[torch.Tensor, Destination, torch.Size]]) -> None:
        """Buckets for the coming backward; ``items`` are ``(parameter, destination,
        gradient_shape)`` in backward order.  Nothing may be in flight or pending."""
        assert not self.in_flight and not self.owned_sum, "re-planned with a reduce in progress"
        itemsize = self.dtype.itemsize
        buckets = pack_buckets(items, self.bucket_bytes, lambda shape: itemsize, first_bucket_bytes=FIRST_BUCKET_BYTES)
        self.buckets = [_Bucket(members=list(bucket)) for bucket in buckets]
        self.bucket_of = {p: i for i, b in enumerate(self.buckets) for p, _, _ in b.members}
        self.next_bucket = 0

    def ready(self, p: torch.Tensor) -> None:
        """``p``'s local gradient grew; launch every bucket that is complete, in order."""
        self._count_pass(p)
        self.reported.add(p)
        if self.sync:
            self._launch_complete_buckets(p)
        if len(self._pass_reported) == len(self.bucket_of):
            self.passes += 1
            self._pass_reported.clear()

    def _count_pass(self, p: torch.Tensor) -> None:
        if not self._pass_reported and self.passes_per_step is not None and self.passes >= self.passes_per_step:
            raise ValueError(f"backward pass {self.passes + 1} since the last optimizer step, but "
                             f"gradient_accumulation_steps is {self.passes_per_step}: call step() after that many "
                             "backward passes, or give the optimizer the real number (None: not known)")
        self._pass_reported.add(p)

    def _launch_complete_buckets(self, p: torch.Tensor) -> None:
        self.buckets[self.bucket_of[p]].reported.add(p)
        final = self.passes_per_step is not None and self.passes == self.passes_per_step - 1
        while self.next_bucket < len(self.buckets):
            bucket = self.buckets[self.next_bucket]
            if len(bucket.reported) < len(bucket.members):
                return
            self._launch(bucket, final=final)
            self.launches_in_backward += 1
            self.next_bucket += 1
        self.next_bucket = 0  # every bucket went: the next backward (micro-batch) starts over

    def flush(self) -> None:
        """Launch, in plan order, every bucket that still holds a local gradient."""
        for bucket in self.buckets:
            if any(self.local_grad(p) is not None for p, _, _ in bucket.members):
                self._launch(bucket, final=True)
                self.launches_at_step += 1
        self.next_bucket = 0

    def collect(self, params: list[torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
        """Wait for every launched reduce; ``{parameter: averaged gradient summed over
        micro-batches}`` for the ``params`` this rank owns or holds rows of (fp32).  With
        ``replicate``, ``params`` (the same list on every rank) names what is averaged across it."""
        self._reap(block=True)
        out, self.owned_sum = self.owned_sum, {}
        if self.replicate is not None:
            wanted = set(params)
            self._replicate_mean([p for b in self.buckets for p, _, _ in b.members if p in wanted], out)
        return {p: out[p] for p in params if p in out}

    def _replicate_mean(self, params: list[torch.Tensor], sums: dict[torch.Tensor, torch.Tensor]) -> None:
        """In place: ``sums[p]`` (this rank's rows, averaged inside ``comm``) becomes the mean
        across ``replicate`` too, one all-reduce of the payload dtype per bucket in plan order --
        the traffic and the rounding of :func:`~qgalore_dist.distributed.exchange.reduce_rows_to_shards`."""
        assert all(p in sums for p in params), "a reduced gradient is missing before the replicate mean"
        itemsize = self.dtype.itemsize
        for bucket in pack_buckets([(p, None, sums[p]) for p in params], self.bucket_bytes, lambda t: itemsize):
            flat = torch.cat([t.reshape(-1).to(self.dtype) for _, _, t in bucket])
            self.replicate.all_reduce_mean(flat, self.kind)
            offset = 0
            for p, _, t in bucket:
                sums[p] = flat[offset:offset + t.numel()].view(t.shape).to(torch.float32)
                offset += t.numel()

    def wait_all(self) -> None:
        """Complete every launched reduce now (``collect`` does it too)."""
        self._reap(block=True)

    def held_bytes(self) -> int:
        """Bytes this reduce holds: the owner's sums and the buffers of reduces in flight."""
        tensors = [*self.owned_sum.values()] + [t for f in self.in_flight for t in (f.out, *f.chunks)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def local_finite(self) -> bool:
        """Whether every gradient this rank sent since the last step was finite."""
        return all(bool(flag) for flag in self._finite)

    def reset(self) -> None:
        """Drop everything of this step (after ``step()``, a skipped step or ``zero_grad``)."""
        self._reap(block=True)
        self.owned_sum.clear()
        self.reported.clear()
        self._finite.clear()
        self.next_bucket = 0
        self.passes = 0
        self._pass_reported.clear()
        for bucket in self.buckets:
            bucket.reported.clear()

    def _launch(self, bucket: _Bucket, *, final: bool) -> None:
        # The oldest reduce completes before this one's send buffers exist: at most MAX_IN_FLIGHT
        # buckets' buffers plus the one being formed (a single-stream backend serializes them anyway).
        self._reap(block=True, keep=MAX_IN_FLIGHT - 1)
        chunks, mine = _bucket_chunks(bucket.members, self.comm.rank, self.comm.world_size, self.dtype,
                                      self.local_grad, self.drop_grad)
        self._finite += [torch.isfinite(chunk).all() for chunk in chunks]
        out, handle = self.comm.reduce_scatter_start(chunks, self.kind)
        self.in_flight.append(_InFlight(mine=mine, out=out, chunks=chunks, handle=handle, final=final))
        bucket.reported.clear()
        self._reap(block=False)

    def _reap(self, *, block: bool, keep: int = 0) -> None:
        """Complete launched reduces in launch order (when ``block``, until at most ``keep``
        remain; otherwise those already done), adding the averages into ``owned_sum`` and freeing
        the buffers."""
        while len(self.in_flight) > (keep if block else 0):
            first = self.in_flight[0]
            if not block and first.handle is not None and not first.handle.is_completed():
                return
            self.comm.wait(first.handle, "reduce_scatter(async)", self.kind)
            mean = first.out.to(torch.float32).div_(self.comm.world_size)
            offset = 0
            for p, shape in first.mine:
                piece = mean[offset:offset + shape.numel()].view(shape)
                offset += shape.numel()
                self.owned_sum[p] = piece if p not in self.owned_sum else self.owned_sum[p].add_(piece)
            self.in_flight.pop(0)
            if first.final and self.on_complete is not None:
                for p, _ in first.mine:
                    self.on_complete(p, self.owned_sum.pop(p))


def _bucket_chunks(members: list[tuple[torch.Tensor, Destination, torch.Size]], rank: int, world: int,
                   dtype: torch.dtype, local_grad, drop_grad) -> tuple[list[torch.Tensor], list]:
    """The reduce-scatter's send chunks of one bucket (chunk ``k``: what rank ``k`` receives, in
    plan order) and ``(parameter, shape)`` of this rank's part of each member that it receives.
    A member goes whole to its owner (an ``int``), or rows ``ranges[k]`` of it to every rank
    ``k`` (a tuple of row ranges).  Every local gradient is dropped here: once concatenated into
    the chunks, only the receivers keep it, as the reduced sum."""
    device = members[0][0].device
    parts: list[list[torch.Tensor]] = [[] for _ in range(world)]
    mine = []
    for p, dest, shape in members:
        grad = local_grad(p)
        grad = torch.zeros(shape, device=device) if grad is None else grad
        drop_grad(p)
        if isinstance(dest, int):
            parts[dest].append(grad)
            if dest == rank:
                mine.append((p, shape))
            continue
        assert len(dest) == world, f"{len(dest)} row ranges for {world} ranks"
        for k, (r0, r1) in enumerate(dest):
            parts[k].append(grad[r0:r1])
        r0, r1 = dest[rank]
        mine.append((p, torch.Size((r1 - r0, *shape[1:]))))
    grad = None
    chunks = []
    for k, group in enumerate(parts):  # each receiver's gradients freed once copied into its chunk
        chunks.append(torch.cat([t.reshape(-1).to(dtype) for t in group]) if group
                      else torch.empty(0, dtype=dtype, device=device))
        parts[k] = group = []
    return chunks, mine
