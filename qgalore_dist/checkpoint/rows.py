"""Checkpoint fields of row-sharded weights (ZeRO-3-partitioned INT8 weights under DeepSpeed):
whole tensors in ``model.safetensors``, and the Adam moments of row-reduced GaLore matrices,
which every rank holds for its own rows.

* Model tensors: a ``Shard(0)`` DTensor is gathered into the whole tensor on save (one tensor
  at a time, kept by rank 0 only, which writes the file) and each rank copies its rows back on
  load -- so the file is the replicated path's, and a checkpoint resumes at any world size, ZeRO
  stage and ``int8_partition`` setting.
* Row moments: each rank saves its rows' moments as stored under
  ``<name>::rows<r0>-<r1>.exp_avg.codes`` (...), i.e. keyed by the row range, never by rank.  A
  load with the same rows takes them as stored (bit-identical resume); otherwise the saved
  blocks are decoded to fp32, joined into the whole ``(m, r)`` moment and re-encoded for the
  rows (or, when the matrix is owner-reduced now, the whole moment) this rank holds.  Whole
  moments saved by an owner (replicated layout) are sliced the same way.
"""

from __future__ import annotations

import re

import torch

from ..optim import QGaLoreAdamW8bit
from ..quant import Moment

__all__ = ["load_moments", "row_moment_fields", "take_rows", "whole_tensor"]

_ROWS = re.compile(r"rows(\d+)-(\d+)\.(exp_avg(?:_sq)?\.\w+)$")
_MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def whole_tensor(t: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """Collective for a DTensor: the whole tensor (returned only when ``keep``); ``t`` itself
    otherwise."""
    if not _is_dtensor(t):
        return t
    full = t.full_tensor()
    return full if keep else None


def take_rows(t: torch.Tensor, value: torch.Tensor) -> None:
    """In place: ``t`` (a plain tensor, or a ``Shard(0)`` DTensor) takes ``value`` (the whole
    tensor) -- a DTensor only its own rows, split as DTensor splits them."""
    if not _is_dtensor(t):
        t.data.copy_(value.to(t.dtype))
        return
    from torch.distributed.tensor import distribute_tensor

    mine = distribute_tensor(value.to(t.dtype), t.device_mesh, t.placements, src_data_rank=None).to_local()
    t.to_local().copy_(mine)


def row_moment_fields(opt: QGaLoreAdamW8bit, p: torch.Tensor) -> dict[str, torch.Tensor]:
    """This rank's moments of row-reduced ``p``, keyed ``rows<r0>-<r1>.<field>``."""
    r0, r1 = opt.layout.rows(p)
    return {f"rows{r0}-{r1}.{field}": value for field, value in opt.param_state(p).items()
            if field.startswith("exp_avg")}


def _decode_whole(opt: QGaLoreAdamW8bit, fields: dict, blocks: dict, m: int) -> dict[str, torch.Tensor]:
    """fp32 whole moments from whole fields or from row blocks covering ``[0, m)``."""
    out = {}
    for moment, signed in _MOMENTS:
        if blocks:
            parts, end = [], 0
            for (r0, r1), flat in sorted(blocks.items()):
                if r0 != end:
                    raise ValueError(f"row blocks of the saved moments do not cover the matrix: {sorted(blocks)}")
                parts.append(opt.codec.decode(_moment(flat, moment), signed=signed))
                end = r1
            if end != m:
                raise ValueError(f"row blocks of the saved moments end at row {end}, the matrix has {m}")
            out[moment] = torch.cat(parts)
        elif any(k.startswith(moment + ".") for k in fields):
            out[moment] = opt.codec.decode(_moment(fields, moment), signed=signed)
    return out


def _moment(flat: dict, moment: str) -> Moment:
    return Moment(**{k.split(".", 1)[1]: v for k, v in flat.items() if k.split(".", 1)[0] == moment})


def load_moments(opt: QGaLoreAdamW8bit, p: torch.Tensor, fields: dict, owner: bool) -> dict:
    """``fields`` (one matrix's saved fields) with its moments in the form this rank holds them
    now: raw when saved for the same rows, else re-encoded (module doc).  Returns the fields
    :meth:`~QGaLoreAdamW8bit.load_param_state` takes (moments only where this rank keeps them)."""
    blocks: dict[tuple[int, int], dict] = {}
    rest = {}
    for key, value in fields.items():
        match = _ROWS.match(key)
        if match:
            blocks.setdefault((int(match[1]), int(match[2])), {})[match[3]] = value
        else:
            rest[key] = value
    row_reduced = p in set(opt.galore_params) and opt.row_reduced(p)
    if not blocks and not row_reduced:  # the replicated path, unchanged
        return rest if owner else {k: v for k, v in rest.items() if not k.startswith("exp_avg")}
    mine = opt.layout.rows(p) if row_reduced else None
    whole_fields = {k: v for k, v in rest.items() if k.startswith("exp_avg")}
    out = {k: v for k, v in rest.items() if not k.startswith("exp_avg")}
    if mine is not None and mine in blocks:  # same rows: as stored
        return {**out, **blocks[mine]}
    if not row_reduced and not owner:
        return out
    whole = _decode_whole(opt, whole_fields, blocks, p.shape[0])
    for (moment, signed) in _MOMENTS:
        if moment not in whole:
            continue
        if row_reduced:
            rows = whole[moment][mine[0]:mine[1]]
            codec = opt.layout.moment_codec(whole[moment].numel(), opt.codec)
        else:
            rows, codec = whole[moment], opt.codec
        encoded = codec.encode(rows.contiguous(), signed=signed)
        out.update({f"{moment}.{f}": getattr(encoded, f) for f in ("values", "codes", "absmax")
                    if getattr(encoded, f) is not None})
    return out
