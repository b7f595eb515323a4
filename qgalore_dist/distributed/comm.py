"""Every collective of the package, behind one metered layer that also works without a
process group (world size 1: every exchange is the identity and nothing is metered).

Bytes are metered per rank with the ring-algorithm volumes that NCCL's bus-bandwidth figures
use: an all-reduce of S bytes moves ``2 (N-1)/N * S`` per rank, a reduce-scatter, all-gather or
broadcast ``(N-1)/N * S``, a reduce to one rank ``(N-1)/N * S``.  Per-owner broadcasts that
together cover S bytes therefore cost the same ``(N-1)/N * S`` as one all-gather.
"""

from __future__ import annotations

import pickle
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.distributed as dist

from .watchdog import watch

__all__ = ["ALL_KINDS", "KINDS", "CommMeter", "Collectives", "TrafficKind"]

TrafficKind = Literal["lowrank_reduce", "full_grad_reduce", "proj_broadcast", "update_gather", "dense", "control",
                      "int8_all_gather"]
"""What a collective carries, the key of the byte meter: low-rank gradients to owners or row shards,
full gradients of refreshing matrices to their owners, INT4 projectors from owners, Adam directions
from owners, dense gradients / parameters / directions, control flags and digests, and the gathers
of ZeRO-3-partitioned INT8 weights before each forward and backward (:mod:`qgalore_dist.integrations.zero3`;
estimated by ``ours_zero(int8_partitioned=True)``)."""
ALL_KINDS: tuple[str, ...] = get_args(TrafficKind)
KINDS: tuple[str, ...] = ALL_KINDS[:6]
"""The optimizer's kinds (the closed forms of :mod:`qgalore_dist.estimate.comm` cover exactly these)."""


@dataclass(kw_only=True, slots=True)
class CommMeter:
    """Bytes and calls per kind for the current step, and totals over the run."""

    step_bytes: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    step_calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    total_bytes: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    last_step: dict[str, dict[str, float]] = field(default_factory=dict)
    """Bytes and calls per kind of the last finished step (``{kind: {"bytes", "calls"}}``)."""

    def record(self, kind: TrafficKind, nbytes: float) -> None:
        assert kind in ALL_KINDS, f"unknown collective kind {kind!r}"
        self.step_bytes[kind] += nbytes
        self.step_calls[kind] += 1
        self.total_bytes[kind] += nbytes

    def end_step(self) -> dict[str, dict[str, float]]:
        self.last_step = {k: {"bytes": self.step_bytes[k], "calls": self.step_calls[k]} for k in ALL_KINDS}
        self.step_bytes.clear()
        self.step_calls.clear()
        return self.last_step

    def as_dict(self) -> dict[str, float]:
        """Flat ``{"comm/<kind>_bytes": ...}`` of the last step, for logs."""
        out = {f"comm/{k}_bytes": v["bytes"] for k, v in self.last_step.items()}
        out["comm/total_bytes"] = sum(v["bytes"] for v in self.last_step.values())
        return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Collectives:
    """Metered collectives over ``group`` (default: the world), identity when world size is 1."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.enabled = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(group) if self.enabled else 1
        self.rank = dist.get_rank(group) if self.enabled else 0
        self.meter = CommMeter()
        self.step_index = 0
        """Optimizer step being executed; named in errors so a failure says where it happened."""

    def _run(self, what: str, kind: TrafficKind, fn, *args, **kwargs):
        """Run one collective; a failure (a peer that died, the process group's timeout) is
        re-raised naming the operation, its kind and the step, instead of an opaque gloo error."""
        try:
            with watch(self._describe(what, kind)):
                return fn(*args, group=self.group, **kwargs)
        except RuntimeError as exc:
            raise RuntimeError(f"{self._describe(what, kind)}: {exc}") from exc

    def _describe(self, what: str, kind: TrafficKind) -> str:
        return (f"qgalore-dist: {what} ({kind}) failed at optimizer step {self.step_index} "
                f"on rank {self.rank} of {self.world_size}")

    @property
    def ring_factor(self) -> float:
        return (self.world_size - 1) / self.world_size

    def _global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank) if self.group is not None else group_rank

    def all_reduce_mean(self, tensor: torch.Tensor, kind: TrafficKind) -> torch.Tensor:
        """In place: ``tensor`` becomes the mean over ranks."""
        if self.world_size == 1:
            return tensor
        self.meter.record(kind, 2 * self.ring_factor * _nbytes(tensor))
        self._run("all_reduce", kind, dist.all_reduce, tensor)
        return tensor.div_(self.world_size)

    def all_reduce_sum(self, tensor: torch.Tensor, kind: TrafficKind) -> torch.Tensor:
        """In place: ``tensor`` becomes the sum over ranks."""
        if self.world_size == 1:
            return tensor
        self.meter.record(kind, 2 * self.ring_factor * _nbytes(tensor))
        self._run("all_reduce(sum)", kind, dist.all_reduce, tensor)
        return tensor

    def all_reduce_min(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place minimum over ranks (control traffic, e.g. the finite-gradient flag)."""
        if self.world_size == 1:
            return tensor
        self.meter.record("control", 2 * self.ring_factor * _nbytes(tensor))
        self._run("all_reduce(min)", "control", dist.all_reduce, tensor, op=dist.ReduceOp.MIN)
        return tensor

    def reduce_scatter_mean(self, chunks: list[torch.Tensor], kind: TrafficKind) -> torch.Tensor:
        """``chunks[r]`` (1-D, sizes may differ) is summed over ranks onto rank ``r``; returns
        this rank's chunk divided by the world size."""
        assert len(chunks) == self.world_size, f"{len(chunks)} chunks for world size {self.world_size}"
        if self.world_size == 1:
            return chunks[0]
        self.meter.record(kind, self.ring_factor * sum(_nbytes(c) for c in chunks))
        out = torch.empty_like(chunks[self.rank])
        self._run("reduce_scatter", kind, dist.reduce_scatter, out, [c.contiguous() for c in chunks])
        return out.div_(self.world_size)

    def reduce_scatter_start(self, chunks: list[torch.Tensor], kind: TrafficKind):
        """Start an asynchronous reduce-scatter (sum) of ``chunks`` as :meth:`reduce_scatter_mean`
        does; returns ``(out, handle)``.  ``out`` (this rank's chunk) holds the *sum* only after
        :meth:`wait` on the handle; ``chunks`` must stay alive until then.  At world size 1,
        ``out`` is ``chunks[0]`` and the handle is None."""
        assert len(chunks) == self.world_size, f"{len(chunks)} chunks for world size {self.world_size}"
        if self.world_size == 1:
            return chunks[0], None
        self.meter.record(kind, self.ring_factor * sum(_nbytes(c) for c in chunks))
        out = torch.empty_like(chunks[self.rank])
        handle = self._run("reduce_scatter(async)", kind, dist.reduce_scatter, out, chunks, async_op=True)
        return out, handle

    def wait(self, handle, what: str, kind: TrafficKind) -> None:
        """Complete an asynchronous collective; a failure names it like :meth:`_run` does."""
        if handle is None:
            return
        try:
            with watch(self._describe(what, kind)):
                handle.wait()
        except RuntimeError as exc:
            raise RuntimeError(f"{self._describe(what, kind)}: {exc}") from exc

    def reduce_mean_to(self, tensor: torch.Tensor, owner: int, kind: TrafficKind) -> torch.Tensor:
        """Sum ``tensor`` onto ``owner`` (in place); on the owner it is divided by the world size."""
        if self.world_size == 1:
            return tensor
        self.meter.record(kind, self.ring_factor * _nbytes(tensor))
        self._run("reduce", kind, dist.reduce, tensor, dst=self._global_rank(owner))
        return tensor.div_(self.world_size) if self.rank == owner else tensor

    def broadcast_from(self, tensor: torch.Tensor, owner: int, kind: TrafficKind) -> torch.Tensor:
        """In place: every rank receives ``owner``'s ``tensor``."""
        if self.world_size == 1:
            return tensor
        self.meter.record(kind, self.ring_factor * _nbytes(tensor))
        self._run("broadcast", kind, dist.broadcast, tensor, src=self._global_rank(owner))
        return tensor

    def all_to_all(self, send: torch.Tensor, send_sizes: list[int], recv_sizes: list[int],
                   kind: TrafficKind) -> torch.Tensor:
        """Rank ``r`` receives ``send_sizes[r]`` elements from every rank; returns the
        concatenation over source ranks (``sum(recv_sizes)`` elements)."""
        if self.world_size == 1:
            return send
        own = send_sizes[self.rank]
        self.meter.record(kind, (send.numel() - own) * send.element_size())
        out = send.new_empty(sum(recv_sizes))
        self._run("all_to_all", kind, dist.all_to_all_single, out, send.contiguous(),
                  output_split_sizes=recv_sizes, input_split_sizes=send_sizes)
        return out

    def all_gather_into(self, out: torch.Tensor, local: torch.Tensor, kind: str) -> torch.Tensor:
        """``out`` (1-D, ``world * local.numel()`` elements) receives every rank's ``local``
        in rank order; returns ``out``.  At world size 1 ``local`` is copied into ``out``."""
        assert out.numel() == self.world_size * local.numel(), f"{out.numel()} != {self.world_size} x {local.numel()}"
        if self.world_size == 1:
            return out.copy_(local.reshape(-1))
        self.meter.record(kind, self.ring_factor * _nbytes(out))
        self._run("all_gather", kind, dist.all_gather_into_tensor, out, local.reshape(-1).contiguous())
        return out

    def barrier(self) -> None:
        """Wait until every rank of the group arrives (control; nothing is metered)."""
        if self.world_size > 1:
            self._run("barrier", "control", dist.barrier)

    def all_gather_object(self, obj) -> list:
        """Small control data (configs, digests) from every rank."""
        if self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        # all_gather_object pickles; meter the pickled size like an all-gather of it.
        self.meter.record("control", (self.world_size - 1) * len(pickle.dumps(obj)))
        self._run("all_gather_object", "control", dist.all_gather_object, out, obj)
        return out
