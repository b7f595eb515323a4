"""Projector and schedule state as flat tensors, so an owner can broadcast a refresh.

The payload of one projector is its stored matrix (packed INT codes + fp32 scales and zeros,
or the fp32 matrix) and its schedule ``[gap, svd_count, len(queue), queue...]`` (fp64, the
queue padded to ``queue_size``).  The previous first singular vector stays on the owner: only
the owner compares subspaces.
"""

from __future__ import annotations

import torch

from ..core import Projector
from ..quant import packed_numel

__all__ = ["projector_payload", "projector_payload_template", "load_projector_payload"]


def _schedule_tensor(proj: Projector) -> torch.Tensor:
    s = proj.schedule
    queue = s.queue + [0.0] * (s.queue_size - len(s.queue))
    return torch.tensor([s.gap, s.svd_count, len(s.queue), *queue], dtype=torch.float64)


def projector_payload(proj: Projector) -> dict[str, torch.Tensor]:
    """The owner's tensors to broadcast after a refresh."""
    out = {"schedule": _schedule_tensor(proj)}
    if proj.bits is None:
        out["proj"] = proj.proj
    else:
        out.update(proj_codes=proj.proj_codes, proj_scales=proj.proj_scales, proj_zeros=proj.proj_zeros)
    return out


def projector_payload_template(proj: Projector, device: torch.device) -> dict[str, torch.Tensor]:
    """Empty tensors with the payload's shapes and dtypes (what non-owners receive into)."""
    numel = proj.proj_shape[0] * proj.proj_shape[1]
    out = {"schedule": torch.zeros(3 + proj.schedule.queue_size, dtype=torch.float64)}
    if proj.bits is None:
        out["proj"] = torch.empty(proj.proj_shape, dtype=torch.float32, device=device)
    else:
        groups = numel // proj.group_size
        out.update(
            proj_codes=torch.empty(packed_numel(numel, proj.bits), dtype=torch.uint8, device=device),
            proj_scales=torch.empty(groups, 1, dtype=torch.float32, device=device),
            proj_zeros=torch.empty(groups, 1, dtype=torch.float32, device=device),
        )
    return out


def load_projector_payload(proj: Projector, payload: dict[str, torch.Tensor]) -> None:
    """Install a received payload (on non-owners; a no-op copy on the owner)."""
    sched = payload["schedule"].tolist()
    s = proj.schedule
    s.gap, s.svd_count = int(sched[0]), int(sched[1])
    s.queue = [float(v) for v in sched[3:3 + int(sched[2])]]
    for key in ("proj", "proj_codes", "proj_scales", "proj_zeros"):
        if key in payload:
            setattr(proj, key, payload[key].clone())
