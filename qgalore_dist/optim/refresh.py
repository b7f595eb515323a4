"""The refresh phase of a step: owners' SVDs on averaged full gradients, the INT4 projectors
to every rank, and (row-sharded layouts) the new low-rank rows to their ranks.

All-or-nothing across ranks: a failed SVD travels in the projector broadcast as a schedule of
NaNs, so every rank learns of it from the same collective (no extra one, no hang), the owners
restore their projectors and every rank raises :class:`RefreshError` at the same step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch

from ..core import Projector
from ..distributed import Collectives, OwnedTensor, broadcast_from_owners
from ..quant import StreamKey
from .config import QGaLoreConfig

__all__ = ["EarlyRefreshes", "RefreshError", "refresh_owned", "share_projectors", "share_row_lowrank"]

logger = logging.getLogger(__name__)


class RefreshError(RuntimeError):
    """A projector refresh (SVD) failed on some rank; raised on every rank at the same step,
    which is skipped everywhere with weights, projectors and optimizer state unchanged."""

    @classmethod
    def naming(cls, matrices: list[str], step: int) -> "RefreshError":
        return cls(f"qgalore-dist: projector refresh (SVD) failed at optimizer step {step} for "
                   f"{', '.join(matrices)}; the step was skipped on every rank, weights, projectors and optimizer "
                   f"state are unchanged (the owner's log has the cause)")


def refresh_owned(projectors: dict[Hashable, Projector], full: dict[Hashable, torch.Tensor],
                  keys: dict[Hashable, StreamKey], cfg: QGaLoreConfig, *,
                  names: dict[Hashable, str]) -> tuple[dict, dict, dict]:
    """The owner's SVDs: refresh ``projectors[k]`` from ``full[k]`` (the averaged (m, n)
    gradient, popped -- freed -- once projected) with the random stream ``keys[k]``.

    Returns ``(lowrank, snapshots, failed)``: ``{k: project(full[k])}`` under the new
    projector, ``{k: projector state before}`` (to restore if any rank failed), and
    ``{k: message}`` of the SVDs that raised (their projectors are already restored)."""
    lowrank, snapshots, failed = {}, {}, {}
    for k in list(full):
        proj = projectors[k]
        snapshots[k] = {name: v.clone() if torch.is_tensor(v) else v for name, v in proj.state_dict().items()}
        try:
            proj.refresh(full[k], step=keys[k][1], method=cfg.svd_method, oversample=cfg.svd_oversample,
                         power_iters=cfg.svd_power_iters, key=keys[k])
        except (RuntimeError, ValueError) as exc:  # torch.linalg.LinAlgError is a RuntimeError
            failed[k] = f"{type(exc).__name__}: {exc}"
            logger.error("%s: projector refresh failed: %s", names.get(k, k), exc)
            proj.load_state_dict(snapshots[k])
            continue
        lowrank[k] = proj.project(full.pop(k))
    return lowrank, snapshots, failed


@dataclass(kw_only=True, slots=True)
class EarlyRefreshes:
    """:func:`refresh_owned` results an owner produced during backward, each as soon as the step's
    last backward pass completed a matrix's averaged full gradient (its full gradient is freed
    then, not held until ``step()``).  Kept until ``step()`` shares them, or undone when the step
    is skipped or its gradients are dropped: nothing of a step that did not happen survives."""

    lowrank: dict = field(default_factory=dict)
    snapshots: dict = field(default_factory=dict)
    failed: dict = field(default_factory=dict)

    def __contains__(self, k: Hashable) -> bool:
        return k in self.snapshots

    def add(self, results: tuple[dict, dict, dict]) -> None:
        """Add one :func:`refresh_owned` result ``(lowrank, snapshots, failed)``."""
        for mine, new in zip((self.lowrank, self.snapshots, self.failed), results):
            mine.update(new)

    def take(self) -> tuple[dict, dict, dict]:
        """``(lowrank, snapshots, failed)`` so far; afterwards empty."""
        out = (self.lowrank, self.snapshots, self.failed)
        self.lowrank, self.snapshots, self.failed = {}, {}, {}
        return out

    def undo(self, projector_of: Callable[[Hashable], Projector]) -> None:
        """Restore every projector refreshed early and forget the results."""
        for k, snapshot in self.snapshots.items():
            projector_of(k).load_state_dict(snapshot)
        self.take()


def share_projectors(comm: Collectives, items: list[tuple[Hashable, int, Projector, torch.device]], failed: dict, *,
                     bucket_bytes: int | None) -> list[Hashable]:
    """``items``: ``(key, owner_rank, projector, device)`` in the same order on every rank.  Every rank
    installs the owners' new projectors and schedules (one broadcast per owner and bucket);
    returns the keys whose refresh failed on their owner (then nothing is installed)."""
    payloads = []
    for k, owner, proj, device in items:
        if owner == comm.rank and k not in failed:
            payload = proj.to_payload()
        else:
            payload = proj.payload_template(device)
            if k in failed:
                payload["schedule"].fill_(float("nan"))
        payloads += [OwnedTensor((k, name), owner, t) for name, t in payload.items()]
    received = broadcast_from_owners(comm, payloads, "proj_broadcast", bucket_bytes=bucket_bytes)
    bad = [k for k, _, _, _ in items if not bool(torch.isfinite(received[(k, "schedule")]).all())]
    if not bad:
        for k, _, proj, _ in items:
            proj.load_payload({name: t for (q, name), t in received.items() if q is k})
    return bad


def share_row_lowrank(comm: Collectives, items: list[tuple[Hashable, int, tuple[int, int], tuple[int, int]]],
                      lowrank: dict, *, device: torch.device, bucket_bytes: int | None) -> dict[Hashable, torch.Tensor]:
    """Row-sharded layouts: ``items`` are ``(key, owner_rank, (m, r) shape, (r0, r1) rows of
    this rank)`` (receive buffers on ``device``).  The owner's ``lowrank[key]`` (popped) reaches
    every rank, which keeps its rows: only the owner still holds the averaged full gradient it
    was projected from."""
    sends = [OwnedTensor(k, owner, lowrank.pop(k) if owner == comm.rank else torch.empty(shape, device=device))
             for k, owner, shape, _ in items]
    received = broadcast_from_owners(comm, sends, "lowrank_reduce", bucket_bytes=bucket_bytes)
    return {k: received[k][r0:r1].clone() for k, _, _, (r0, r1) in items}
