"""Owner-grouped exchanges built on :class:`Collectives`: gradients to their owners, results
from their owners back to every rank.  Tensors are coalesced into flat buffers, packed in
order into buckets of at most ``bucket_bytes`` (``None``/0: one bucket), so a step issues one
collective per bucket and kind -- few calls, bounded temporary memory, the same bytes."""

from __future__ import annotations

from typing import Hashable, NamedTuple, Sequence

import torch

from ..quant import BlockwiseCodec, Moment
from .comm import Collectives, TrafficKind

__all__ = [
    "OwnedTensor", "broadcast_from_owners", "broadcast_from_owners_compressed", "pack_buckets", "reduce_rows_to_shards",
    "reduce_to_owners", "reduce_to_owners_compressed",
]

class OwnedTensor(NamedTuple):
    """One tensor of an owner-grouped exchange, in the same order on every rank."""

    key: Hashable
    """What the tensor belongs to (a parameter, or ``(parameter, field)``); keys the result."""
    owner_rank: int
    """The rank (in the exchange's group) that receives the reduced tensor / sends the value."""
    tensor: torch.Tensor
    """This rank's contribution (reduces), or the owner's value / a receive buffer of the same
    shape and dtype (broadcasts); a ``torch.Size`` where only the shape matters (bucket plans)."""


# Payload compression: bitsandbytes' signed dynamic 8-bit map, one fp32 absmax per 256 values.
_PAYLOAD_CODEC = BlockwiseCodec(bits=8, block_size=256, min_8bit_size=0)


def _flat(tensors: Sequence[torch.Tensor], dtype: torch.dtype, device) -> torch.Tensor:
    if not tensors:
        return torch.empty(0, dtype=dtype, device=device)
    return torch.cat([t.reshape(-1).to(dtype) for t in tensors])


def _group_by_owner(items, world_size: int) -> list[list[tuple[Hashable, torch.Tensor]]]:
    by_owner: list[list[tuple[Hashable, torch.Tensor]]] = [[] for _ in range(world_size)]
    for key, owner, tensor in items:
        by_owner[owner].append((key, tensor))
    return by_owner


def pack_buckets(items: Sequence[tuple], bucket_bytes: int | None, elem_size, *,
                 first_bucket_bytes: int | None = None) -> list[list[tuple]]:
    """Consecutive runs of ``items`` (``(key, owner, tensor)``; a ``torch.Size`` works as well
    as a tensor) whose payload, ``numel x elem_size(tensor)`` bytes, stays within
    ``bucket_bytes`` -- the first run within ``first_bucket_bytes`` when given (DDP's small
    first bucket); a larger tensor gets a bucket of its own.  The split depends only on shapes
    and order, so every rank cuts alike."""
    if not bucket_bytes:
        return [list(items)] if items else []
    buckets: list[list[tuple]] = []
    size = 0
    for item in items:
        nbytes = item[2].numel() * elem_size(item[2])
        cap = min(first_bucket_bytes, bucket_bytes) if len(buckets) == 1 and first_bucket_bytes else bucket_bytes
        if not buckets or size + nbytes > cap:
            buckets.append([])
            size = 0
        buckets[-1].append(item)
        size += nbytes
    return buckets


def _split(flat: torch.Tensor, group: Sequence[tuple[Hashable, torch.Tensor]]) -> dict[Hashable, torch.Tensor]:
    """Views of ``flat`` shaped like the tensors of ``group``, in order."""
    out, offset = {}, 0
    for key, tensor in group:
        out[key] = flat[offset:offset + tensor.numel()].view(tensor.shape)
        offset += tensor.numel()
    return out


def reduce_to_owners(
    coll: Collectives,
    items: Sequence[OwnedTensor],
    kind: TrafficKind,
    *,
    dtype: torch.dtype = torch.float32,
    bucket_bytes: int | None = None,
    residuals: dict[Hashable, torch.Tensor] | None = None,
) -> dict[Hashable, torch.Tensor]:
    """``items``: ``(key, owner, local_tensor)`` in the same order on every rank.

    Returns ``{key: mean over ranks}`` for the keys this rank owns: one reduce-scatter per
    bucket, whose chunk ``r`` holds the bucket's tensors owned by rank ``r``.  With
    ``residuals`` (a per-rank error-feedback store, keyed like ``items``) the payloads travel
    as 8-bit block-wise codes (:func:`reduce_to_owners_compressed`); at world size 1 nothing
    is compressed, since nothing travels.
    """
    if residuals is not None and coll.world_size > 1:
        return reduce_to_owners_compressed(coll, items, kind, residuals, bucket_bytes=bucket_bytes)
    out: dict[Hashable, torch.Tensor] = {}
    itemsize = torch.empty(0, dtype=dtype).element_size()
    for bucket in pack_buckets(items, bucket_bytes, lambda t: itemsize):
        by_owner = _group_by_owner(bucket, coll.world_size)
        chunks = [_flat([t for _, t in group], dtype, bucket[0][2].device) for group in by_owner]
        out.update(_split(coll.reduce_scatter_mean(chunks, kind), by_owner[coll.rank]))
    return out


def reduce_rows_to_shards(
    shard_comm: Collectives,
    items: Sequence[tuple[Hashable, tuple[int, int], torch.Tensor]],
    kind: TrafficKind,
    *,
    replicate_comm: Collectives | None = None,
    dtype: torch.dtype = torch.float32,
    bucket_bytes: int | None = None,
) -> dict[Hashable, torch.Tensor]:
    """``items``: ``(key, ranges, local_tensor)`` in the same order on every rank, where
    ``local_tensor`` is this rank's whole ``(m, k)`` tensor and ``ranges[j] = (r0, r1)`` the rows
    rank ``j`` of ``shard_comm`` keeps (contiguous, covering ``[0, m)``; uneven and empty ranges
    are fine, e.g. FSDP2's ``torch.chunk`` split, :func:`~qgalore_dist.distributed.rows.chunk_rows`).

    Returns ``{key: (r1 - r0, k) mean rows}``: one reduce-scatter per bucket inside
    ``shard_comm``, then (HSDP) an all-reduce of the kept rows across ``replicate_comm`` -- the
    only tensors that cross it.  The mean is over every rank of both groups."""
    out: dict[Hashable, torch.Tensor] = {}
    itemsize = torch.empty(0, dtype=dtype).element_size()
    for bucket in pack_buckets(items, bucket_bytes, lambda t: itemsize):
        out.update(_reduce_rows_bucket(shard_comm, replicate_comm, bucket, kind, dtype))
    return out


def _reduce_rows_bucket(shard_comm, replicate_comm, bucket, kind: TrafficKind, dtype) -> dict[Hashable, torch.Tensor]:
    world = shard_comm.world_size
    chunks = []
    for k in range(world):
        parts = [t[ranges[k][0]:ranges[k][1]].reshape(-1) for _, ranges, t in bucket]
        chunks.append(torch.cat(parts).to(dtype))
    mine = shard_comm.reduce_scatter_mean(chunks, kind)
    if replicate_comm is not None:
        replicate_comm.all_reduce_mean(mine, kind)
    out, offset = {}, 0
    for key, ranges, t in bucket:
        r0, r1 = ranges[shard_comm.rank]
        shape = (r1 - r0, t.shape[1])
        out[key] = mine[offset:offset + shape[0] * shape[1]].view(shape).to(torch.float32)
        offset += shape[0] * shape[1]
    return out


def broadcast_from_owners(
    coll: Collectives,
    items: Sequence[OwnedTensor],
    kind: TrafficKind,
    *,
    bucket_bytes: int | None = None,
    residuals: dict[Hashable, torch.Tensor] | None = None,
) -> dict[Hashable, torch.Tensor]:
    """``items``: ``(key, owner, tensor)`` in the same order on every rank; the owner's tensor
    holds the value, other ranks' tensors give shape and dtype (their content is ignored).

    Returns ``{key: owner's tensor}`` on every rank; one broadcast per (owner, dtype, bucket).
    With ``residuals`` (the owner's error-feedback store) fp32 values travel as 8-bit codes and
    every rank returns the decoded values (:func:`broadcast_from_owners_compressed`).
    """
    if residuals is not None and coll.world_size > 1:
        return broadcast_from_owners_compressed(coll, items, kind, residuals, bucket_bytes=bucket_bytes)
    if coll.world_size == 1:
        return {key: tensor for key, _, tensor in items}
    out: dict[Hashable, torch.Tensor] = {}
    groups: dict[tuple[int, torch.dtype], list[tuple[Hashable, int, torch.Tensor]]] = {}
    for item in items:
        groups.setdefault((item[1], item[2].dtype), []).append(item)
    for (owner, dtype), group in groups.items():
        for bucket in pack_buckets(group, bucket_bytes, lambda t: t.element_size()):
            pairs = [(key, t) for key, _, t in bucket]
            flat = _flat([t for _, t in pairs], dtype, pairs[0][1].device)
            out.update(_split(coll.broadcast_from(flat, owner, kind), pairs))
    return out


def reduce_to_owners_compressed(
    coll: Collectives,
    items: Sequence[OwnedTensor],
    kind: TrafficKind,
    residuals: dict[Hashable, torch.Tensor],
    *,
    bucket_bytes: int | None = None,
) -> dict[Hashable, torch.Tensor]:
    """As :func:`reduce_to_owners`, with 8-bit payloads and per-rank error feedback (the
    scheme of ZeRO++ qgZ / 1-bit Adam): each rank adds its residual, quantizes its chunk for
    every owner to 8-bit block-wise codes, keeps ``x - dequant(q)`` as the new residual (in
    ``residuals``, keyed like ``items``), and an all-to-all delivers the codes to the owners,
    which dequantize and average.  Codes cannot be summed in transit, hence all-to-all.
    Buckets are cut on the fp32 staging size (4 B per value)."""
    out: dict[Hashable, torch.Tensor] = {}
    for bucket in pack_buckets(items, bucket_bytes, lambda t: 4):
        out.update(_reduce_bucket_compressed(coll, bucket, kind, residuals))
    return out


def _encode_with_feedback(group: Sequence[tuple[Hashable, torch.Tensor]], residuals: dict, device) -> Moment:
    """8-bit codes of ``group``'s values plus their residuals; the new residuals (``x -
    dequant(codes)``) replace the old ones in ``residuals``.  An empty group gives empty codes."""
    x = _flat([t + residuals[k] if k in residuals else t for k, t in group], torch.float32, device)
    if not x.numel():
        return Moment(codes=x.to(torch.uint8), absmax=x)
    moment = _PAYLOAD_CODEC.encode(x, signed=True)
    residuals.update(_split(x - _PAYLOAD_CODEC.decode(moment, signed=True), group))
    return moment


def _reduce_bucket_compressed(coll: Collectives, items, kind: TrafficKind, residuals) -> dict[Hashable, torch.Tensor]:
    device = items[0][2].device
    by_owner = _group_by_owner(items, coll.world_size)
    codes, absmaxes = [], []
    for group in by_owner:
        moment = _encode_with_feedback(group, residuals, device)
        codes.append(moment.codes.reshape(-1))
        absmaxes.append(moment.absmax.reshape(-1))
    mine_numel = codes[coll.rank].numel()
    mine_blocks = absmaxes[coll.rank].numel()
    got_codes = coll.all_to_all(torch.cat(codes), [c.numel() for c in codes], [mine_numel] * coll.world_size, kind)
    got_absmax = coll.all_to_all(torch.cat(absmaxes), [a.numel() for a in absmaxes], [mine_blocks] * coll.world_size,
                                 kind)
    total = torch.zeros(mine_numel, dtype=torch.float32, device=device)
    for src in range(coll.world_size):
        piece = Moment(codes=got_codes[src * mine_numel:(src + 1) * mine_numel],
                       absmax=got_absmax[src * mine_blocks:(src + 1) * mine_blocks])
        if mine_numel:
            total += _PAYLOAD_CODEC.decode(piece, signed=True)
    return _split(total / coll.world_size, by_owner[coll.rank])


def broadcast_from_owners_compressed(
    coll: Collectives,
    items: Sequence[OwnedTensor],
    kind: TrafficKind,
    residuals: dict[Hashable, torch.Tensor],
    *,
    bucket_bytes: int | None = None,
) -> dict[Hashable, torch.Tensor]:
    """As :func:`broadcast_from_owners` for fp32 values, sent as 8-bit block-wise codes.

    Each owner adds its error-feedback residual to the values it owns, encodes them, keeps
    ``x - dequant(q)`` as the new residual and broadcasts codes + absmax; every rank, the
    owner included, returns the *decoded* values, so replicas stay bit-identical.  Buckets are
    cut on the fp32 size (4 B per value)."""
    out: dict[Hashable, torch.Tensor] = {}
    for bucket in pack_buckets(items, bucket_bytes, lambda t: 4):
        out.update(_broadcast_bucket_compressed(coll, bucket, kind, residuals))
    return out


def _broadcast_bucket_compressed(coll: Collectives, items, kind: TrafficKind,
                                 residuals) -> dict[Hashable, torch.Tensor]:
    device = items[0][2].device
    payload = []
    by_owner = _group_by_owner(items, coll.world_size)
    for owner, group in enumerate(by_owner):
        numel = sum(t.numel() for _, t in group)
        if not numel:
            continue
        blocks = -(-numel // _PAYLOAD_CODEC.block_size)
        if owner == coll.rank:
            moment = _encode_with_feedback(group, residuals, device)
            codes, absmax = moment.codes.reshape(-1), moment.absmax.reshape(-1)
        else:
            codes = torch.empty(numel, dtype=torch.uint8, device=device)
            absmax = torch.empty(blocks, dtype=torch.float32, device=device)
        payload += [((owner, "codes"), owner, codes), ((owner, "absmax"), owner, absmax)]
    received = broadcast_from_owners(coll, payload, kind)
    out: dict[Hashable, torch.Tensor] = {}
    for owner, group in enumerate(by_owner):
        if group:
            moment = Moment(codes=received[(owner, "codes")], absmax=received[(owner, "absmax")])
            out.update(_split(_PAYLOAD_CODEC.decode(moment, signed=True), group))
    return out
