"""Replica checks: start-up agreement of configs and shapes, and bit-identity of the
replicated Q-GaLore state (INT8 weights, projectors, schedules) across ranks."""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch

from .comm import Collectives

__all__ = ["ReplicaMismatchError", "agree_on_gradients", "check_replicas", "tensor_digest", "validate_agreement"]


class ReplicaMismatchError(RuntimeError):
    """Raised (on every rank) when replicas that must be identical differ."""


def tensor_digest(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu()
    if data.dtype == torch.bfloat16:
        data = data.view(torch.int16)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()[:16]


def check_replicas(comm: Collectives, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Compare digests of ``named_tensors`` across ranks; raise :class:`ReplicaMismatchError`
    naming the first tensor that differs (the same error on every rank).  Returns the number
    of tensors checked."""
    digests = [(name, tensor_digest(t)) for name, t in named_tensors]
    gathered = comm.all_gather_object(digests)
    reference = gathered[0]
    for rank, theirs in enumerate(gathered[1:], start=1):
        if len(theirs) != len(reference):
            raise ReplicaMismatchError(f"rank {rank} has {len(theirs)} replicated tensors, rank 0 has {len(reference)}")
        for (name, d0), (name_r, dr) in zip(reference, theirs):
            if name != name_r or d0 != dr:
                raise ReplicaMismatchError(f"replicas differ: {name!r} on rank {rank} does not match rank 0")
    return len(digests)


def validate_agreement(comm: Collectives, what: str, value) -> None:
    """Raise ``ValueError`` on every rank unless ``value`` (a picklable description such as a
    config dict or a list of parameter shapes) is identical on all ranks."""
    gathered = comm.all_gather_object(value)
    for rank, theirs in enumerate(gathered):
        if theirs != gathered[0]:
            detail = _first_difference(gathered[0], theirs)
            raise ValueError(f"{what} differs between rank 0 and rank {rank}: {detail}")


def _first_difference(a, b) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if a.get(key) != b.get(key):
                return f"{key!r}: {a.get(key)!r} vs {b.get(key)!r}"
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return f"entry {i}: {x!r} vs {y!r}"
    return f"{a!r} vs {b!r}"


def agree_on_gradients(comm: Collectives, names: list[str], present: list[bool],
                       finite: bool) -> tuple[bool, list[bool]]:
    """Collective, one all-reduce: whether ``finite`` holds on every rank, and which of the
    parameters ``names`` have a gradient (``present``, this rank's view).  Raises
    ``ValueError`` on every rank naming the parameters that have a gradient on some ranks
    and not on others (a model whose ranks took different branches)."""
    has = torch.tensor([1.0 if h else 0.0 for h in present])
    flags = torch.cat([torch.tensor([1.0 if finite else 0.0]), has, -has])
    comm.all_reduce_min(flags)
    lo, hi = flags[1:1 + len(names)], -flags[1 + len(names):]
    if not torch.equal(lo, hi):
        bad = [name for name, a, b in zip(names, lo, hi) if a != b]
        raise ValueError(f"parameters {bad[:5]} have a gradient on some ranks and not on others")
    return bool(flags[0] > 0), [bool(h > 0) for h in hi]
