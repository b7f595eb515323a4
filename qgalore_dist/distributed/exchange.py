"""Owner-grouped exchanges built on :class:`Collectives`: gradients to their owners, results
from their owners back to every rank.  Each call coalesces all tensors of one owner into one
flat buffer, so a step issues at most one collective per (kind, owner)."""

from __future__ import annotations

from typing import Hashable, Sequence

import torch

from .comm import Collectives

__all__ = ["reduce_to_owners", "broadcast_from_owners"]


def _flat(tensors: Sequence[torch.Tensor], dtype: torch.dtype, device) -> torch.Tensor:
    if not tensors:
        return torch.empty(0, dtype=dtype, device=device)
    return torch.cat([t.reshape(-1).to(dtype) for t in tensors])


def reduce_to_owners(
    coll: Collectives,
    items: Sequence[tuple[Hashable, int, torch.Tensor]],
    kind: str,
    *,
    dtype: torch.dtype = torch.float32,
) -> dict[Hashable, torch.Tensor]:
    """``items``: ``(key, owner, local_tensor)`` in the same order on every rank.

    Returns ``{key: mean over ranks}`` for the keys this rank owns (a reduce-scatter whose
    chunk ``r`` holds all of rank ``r``'s tensors).
    """
    if not items:
        return {}
    device = items[0][2].device
    by_owner: list[list[tuple[Hashable, torch.Tensor]]] = [[] for _ in range(coll.world_size)]
    for key, owner, tensor in items:
        by_owner[owner].append((key, tensor))
    chunks = [_flat([t for _, t in group], dtype, device) for group in by_owner]
    mine = coll.reduce_scatter_mean(chunks, kind)
    out, offset = {}, 0
    for key, tensor in by_owner[coll.rank]:
        out[key] = mine[offset:offset + tensor.numel()].view(tensor.shape)
        offset += tensor.numel()
    return out


def broadcast_from_owners(
    coll: Collectives,
    items: Sequence[tuple[Hashable, int, torch.Tensor]],
    kind: str,
) -> dict[Hashable, torch.Tensor]:
    """``items``: ``(key, owner, tensor)`` in the same order on every rank; the owner's tensor
    holds the value, other ranks' tensors give shape and dtype (their content is ignored).

    Returns ``{key: owner's tensor}`` on every rank; one broadcast per (owner, dtype).
    """
    out: dict[Hashable, torch.Tensor] = {}
    groups: dict[tuple[int, torch.dtype], list[tuple[Hashable, torch.Tensor]]] = {}
    for key, owner, tensor in items:
        groups.setdefault((owner, tensor.dtype), []).append((key, tensor))
    for (owner, dtype), group in groups.items():
        if coll.world_size == 1:
            out.update(group)
            continue
        flat = _flat([t for _, t in group], dtype, group[0][1].device)
        coll.broadcast_from(flat, owner, kind)
        offset = 0
        for key, tensor in group:
            out[key] = flat[offset:offset + tensor.numel()].view(tensor.shape)
            offset += tensor.numel()
    return out
