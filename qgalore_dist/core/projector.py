"""GaLore projector: SVD basis, stored side, INT-quantized storage, layer-adaptive refresh.

For a weight gradient ``G`` of shape ``(m, n)`` (``nn.Linear`` layout, out x in) and rank
``r``, the projector ``P`` is either

* ``right``: ``P = Vh[:r]`` of shape ``(r, n)``; ``R = G @ P.T`` is ``(m, r)``;
  ``project_back(R) = scale * R @ P``;
* ``left``:  ``P = U[:, :r]`` of shape ``(m, r)``; ``R = P.T @ G`` is ``(r, n)``;
  ``project_back(R) = scale * P @ R``.

``proj_type='std'`` picks ``right`` when ``m >= n`` and ``left`` otherwise (the larger
dimension is kept, as in GaLore), ``reverse_std`` the opposite, ``left``/``right`` force a
side.  Unlike the reference, the side is chosen once from the weight's shape and stored, so
``project_back`` never guesses it from the low-rank tensor's shape (that guess fails when the
rank reaches the projected dimension).

The refresh schedule reproduces Q-GaLore's ``GaLoreProjector.project`` exactly: an SVD runs
when there is no projector yet or ``step % gap == 0``; from the second SVD on, the signed
cosine between the new and the previous first singular vector enters a queue of
``queue_size``; when the queue is full and its mean is at least ``cos_threshold`` the gap is
multiplied by ``gamma`` (``int``), the queue is not cleared, and the gap never shrinks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from .. import kernels
from ..quant import (
    StreamKey,
    check_group_layout,
    dequantize,
    key_to_u32,
    pack_codes,
    packed_numel,
    quantize,
    unpack_codes,
)

__all__ = ["PROJ_TYPES", "SVD_METHODS", "Projector", "RefreshSchedule", "choose_side", "svd_basis"]

Side = Literal["left", "right"]
PROJ_TYPES = ("std", "reverse_std", "left", "right")
SVD_METHODS = ("exact", "randomized")


def choose_side(shape: tuple[int, int], proj_type: str) -> Side:
    """The projection side for a ``(m, n)`` matrix under ``proj_type`` (see module doc)."""
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type  # type: ignore[return-value]


def svd_basis(
    grad: torch.Tensor,
    rank: int,
    side: Side,
    *,
    method: str = "exact",
    oversample: int = 8,
    power_iters: int = 2,
    seed: int = 0,
) -> torch.Tensor:
    """Top-``rank`` singular basis of ``grad`` (m, n) in fp32: ``Vh[:r]`` (r, n) or ``U[:, :r]`` (m, r).

    ``randomized`` is Halko et al.'s subspace iteration: a Gaussian sketch of
    ``rank + oversample`` columns (drawn from a generator seeded with ``seed``, never the global
    RNG), ``power_iters`` rounds of QR-orthonormalized power iteration, then an exact SVD of
    the small ``k x n`` matrix ``Q^T G``.  Its singular vectors are sign-normalized (the
    largest-magnitude entry of each right singular vector is positive), so the sign does not
    depend on ``seed`` and the schedule's signed cosine sees no spurious flips.  ``exact``
    keeps LAPACK's signs, as the reference does.
    """
    g = grad.detach().to(torch.float32)
    if method == "exact":
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
    elif method == "randomized":
        u, vh = _randomized_svd(g, rank, oversample, power_iters, seed)
    else:
        raise ValueError(f"svd method must be one of {SVD_METHODS}, got {method!r}")
    return vh[:rank].contiguous() if side == "right" else u[:, :rank].contiguous()


def _randomized_svd(g: torch.Tensor, rank: int, oversample: int, power_iters: int, seed: int):
    m, n = g.shape
    k = min(rank + oversample, m, n)
    gen = torch.Generator(device=g.device).manual_seed(seed)
    sketch = torch.randn(n, k, generator=gen, device=g.device, dtype=g.dtype)
    q, _ = torch.linalg.qr(g @ sketch)  # (m, k)
    for _ in range(power_iters):
        q, _ = torch.linalg.qr(g.T @ q)  # (n, k)
        q, _ = torch.linalg.qr(g @ q)  # (m, k)
    ub, _, vh = torch.linalg.svd(q.T @ g, full_matrices=False)  # (k, k), (k, n)
    # The signs of the singular vectors would otherwise depend on the sketch, i.e. on the
    # seed, which changes every refresh: the signed cosine of the adaptive schedule would then
    # see spurious -1s for an unchanged subspace.  Make each vector's largest entry positive.
    pivot = vh.gather(1, vh.abs().argmax(dim=1, keepdim=True))  # (k, 1)
    signs = torch.where(pivot < 0, -1.0, 1.0).to(vh.dtype)
    return (q @ ub) * signs.T, vh * signs


@dataclass(kw_only=True, slots=True)
class RefreshSchedule:
    """Layer-adaptive refresh state of one projector (Q-GaLore's lazy subspace updates)."""

    gap: int
    """Current refresh interval; refreshes happen at absolute steps that are multiples of it."""
    adaptive: bool = True
    """False gives GaLore's fixed schedule (the gap never changes)."""
    queue_size: int = 5
    """Number of recent cosine similarities averaged."""
    cos_threshold: float = 0.4
    """Mean similarity at or above which the gap grows."""
    gamma: int = 2
    """Gap multiplier (an int in the reference: ``int(gap * gamma)``)."""
    queue: list[float] = field(default_factory=list)
    """Recent signed cosines between consecutive first singular vectors."""
    past_vector: torch.Tensor | None = None
    """First singular vector of the previous SVD (unquantized, fp32)."""
    svd_count: int = 0
    """SVDs run so far for this matrix."""

    def is_due(self, step: int, has_projector: bool) -> bool:
        return not has_projector or step % self.gap == 0

    def record(self, first_vector: torch.Tensor) -> None:
        """Account one SVD whose first singular vector is ``first_vector``."""
        self.svd_count += 1
        if not self.adaptive:
            return
        if self.past_vector is not None:
            if len(self.queue) == self.queue_size:
                self.queue.pop(0)
            self.queue.append(F.cosine_similarity(self.past_vector, first_vector, dim=0).item())
            if len(self.queue) == self.queue_size and sum(self.queue) / len(self.queue) >= self.cos_threshold:
                self.gap = int(self.gap * self.gamma)
        self.past_vector = first_vector.detach().clone()


class Projector:
    """Per-matrix projector: side, rank, scale, stored ``P`` and its refresh schedule.

    ``P`` is kept in fp32, or when ``bits`` is set as packed group-wise codes
    (``proj_codes``: ``ceil(numel * bits / 8)`` uint8) with fp32 ``proj_scales``/``proj_zeros``.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        *,
        rank: int,
        proj_type: str = "std",
        scale: float = 1.0,
        bits: int | None = None,
        group_size: int = 256,
        schedule: RefreshSchedule,
        name: str = "matrix",
    ) -> None:
        m, n = shape
        if not isinstance(rank, int) or not 0 < rank < min(m, n):
            raise ValueError(f"{name}: rank must be an int in [1, min(m, n) = {min(m, n)}) for shape {tuple(shape)}, "
                             f"got {rank!r}")
        self.shape = (m, n)
        self.side: Side = choose_side(self.shape, proj_type)
        self.rank = rank
        self.scale = scale
        self.bits = bits
        self.group_size = group_size
        self.schedule = schedule
        self.proj_shape = (rank, n) if self.side == "right" else (m, rank)
        if bits is not None:
            check_group_layout(rank * (n if self.side == "right" else m), bits, group_size, name=f"{name} projector")
        self.proj: torch.Tensor | None = None
        self.proj_codes: torch.Tensor | None = None
        self.proj_scales: torch.Tensor | None = None
        self.proj_zeros: torch.Tensor | None = None

    @property
    def lowrank_shape(self) -> tuple[int, int]:
        m, n = self.shape
        return (m, self.rank) if self.side == "right" else (self.rank, n)

    def has_matrix(self) -> bool:
        return self.proj is not None or self.proj_codes is not None

    def matrix(self) -> torch.Tensor:
        """``P`` in fp32 (dequantized when stored in ``bits``), always column-major.

        The layout is fixed because it selects the matmul kernel and so the rounding: LAPACK
        returns column-major factors (what galore_torch multiplies with), while a broadcast
        or a checkpoint yields row-major copies; one layout keeps every rank and a resumed
        run on the same bits."""
        if self.bits is None:
            assert self.proj is not None, "projector used before its first refresh"
            p = self.proj
        else:
            assert self.proj_codes is not None, "projector used before its first refresh"
            numel = self.proj_shape[0] * self.proj_shape[1]
            codes = unpack_codes(self.proj_codes, self.bits, numel).view(self.proj_shape)
            p = dequantize(codes, self.proj_scales, self.proj_zeros, group_size=self.group_size)
        return p.t().contiguous().t()

    def set_matrix(self, proj: torch.Tensor) -> None:
        """Store a new fp32 ``P`` (quantized when ``bits`` is set)."""
        assert tuple(proj.shape) == self.proj_shape, f"P shape {tuple(proj.shape)} != {self.proj_shape}"
        if self.bits is None:
            self.proj = proj.to(torch.float32).contiguous()
            return
        codes, self.proj_scales, self.proj_zeros = quantize(proj, bits=self.bits, group_size=self.group_size)
        self.proj_codes = pack_codes(codes, self.bits)

    def refresh(self, grad: torch.Tensor, *, step: int, method: str, oversample: int, power_iters: int,
                key: StreamKey) -> None:
        """Recompute ``P`` from the full gradient ``grad`` (m, n) and advance the schedule."""
        proj = svd_basis(
            grad, self.rank, self.side, method=method, oversample=oversample,
            power_iters=power_iters, seed=key_to_u32(key),
        )
        first = proj[0, :] if self.side == "right" else proj[:, 0]
        self.schedule.record(first.flatten())
        self.set_matrix(proj)

    def _use_kernels(self, operand: torch.Tensor) -> bool:
        """Triton for a quantized P when :func:`qgalore_dist.kernels.use_triton` says so
        (CUDA tensors by default); otherwise the torch code below, unchanged."""
        return self.bits is not None and self.proj_codes is not None and kernels.use_triton(operand)

    def project(self, grad: torch.Tensor) -> torch.Tensor:
        """Full gradient (m, n) -> low-rank gradient ``lowrank_shape`` in fp32."""
        if self._use_kernels(grad):  # fused: P read from its packed codes, never materialized
            return kernels.project_packed(grad, self.proj_codes, self.proj_scales, self.proj_zeros,
                                          proj_shape=self.proj_shape, side=self.side, bits=self.bits,
                                          group_size=self.group_size)
        p = self.matrix()
        g = grad.to(torch.float32)
        return g @ p.T if self.side == "right" else p.T @ g

    def project_back(self, lowrank: torch.Tensor, *, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Low-rank tensor -> (m, n), multiplied by ``scale``.  ``rows = (r0, r1)`` (left side
        only) returns just those rows of the result, ``P[r0:r1] @ R`` (a row shard's part); a
        right-side shard passes its own rows of ``R`` instead."""
        if rows is not None:
            assert self.side == "left", "a right-projected shard back-projects its own rows of R"
            return (self.matrix()[rows[0]:rows[1]] @ lowrank) * self.scale
        if self._use_kernels(lowrank):
            return kernels.project_back_packed(lowrank, self.proj_codes, self.proj_scales, self.proj_zeros,
                                               proj_shape=self.proj_shape, side=self.side, bits=self.bits,
                                               group_size=self.group_size, scale=self.scale)
        p = self.matrix()
        full = lowrank @ p if self.side == "right" else p @ lowrank
        return full * self.scale

    # --- payload: what an owner broadcasts after a refresh
    def _schedule_tensor(self) -> torch.Tensor:
        s = self.schedule
        queue = s.queue + [0.0] * (s.queue_size - len(s.queue))
        return torch.tensor([s.gap, s.svd_count, len(s.queue), *queue], dtype=torch.float64)

    def to_payload(self) -> dict[str, torch.Tensor]:
        """The tensors an owner broadcasts after a refresh: the stored matrix (packed codes +
        fp32 scales and zeros, or the fp32 ``proj``) and ``schedule`` = ``[gap, svd_count,
        len(queue), queue...]`` (fp64, the queue padded to ``queue_size``).  The previous first
        singular vector stays on the owner: only the owner compares subspaces."""
        out = {"schedule": self._schedule_tensor()}
        if self.bits is None:
            out["proj"] = self.proj
        else:
            out.update(proj_codes=self.proj_codes, proj_scales=self.proj_scales, proj_zeros=self.proj_zeros)
        return out

    def payload_template(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """Empty tensors with :meth:`to_payload`'s shapes and dtypes (what non-owners receive into)."""
        numel = self.proj_shape[0] * self.proj_shape[1]
        out = {"schedule": torch.zeros(3 + self.schedule.queue_size, dtype=torch.float64)}
        if self.bits is None:
            out["proj"] = torch.empty(self.proj_shape, dtype=torch.float32, device=device)
        else:
            groups = numel // self.group_size
            out.update(
                proj_codes=torch.empty(packed_numel(numel, self.bits), dtype=torch.uint8, device=device),
                proj_scales=torch.empty(groups, 1, dtype=torch.float32, device=device),
                proj_zeros=torch.empty(groups, 1, dtype=torch.float32, device=device),
            )
        return out

    def load_payload(self, payload: dict[str, torch.Tensor]) -> None:
        """Install a received :meth:`to_payload` (on non-owners; a no-op copy on the owner)."""
        sched = payload["schedule"].tolist()
        s = self.schedule
        s.gap, s.svd_count = int(sched[0]), int(sched[1])
        s.queue = [float(v) for v in sched[3:3 + int(sched[2])]]
        for key in ("proj", "proj_codes", "proj_scales", "proj_zeros"):
            if key in payload:
                setattr(self, key, payload[key].clone())

    def state_dict(self) -> dict:
        """Plain tensors and numbers only (loads with ``torch.load(weights_only=True)``)."""
        s = self.schedule
        out = {
            "side": self.side, "gap": s.gap, "svd_count": s.svd_count,
            "queue": torch.tensor(s.queue, dtype=torch.float64),
        }
        if s.past_vector is not None:
            out["past_vector"] = s.past_vector
        for key in ("proj", "proj_codes", "proj_scales", "proj_zeros"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def load_state_dict(self, state: dict) -> None:
        if state["side"] != self.side:
            raise ValueError(f"projector side in checkpoint is {state['side']!r}, this model uses {self.side!r}")
        s = self.schedule
        s.gap, s.svd_count = int(state["gap"]), int(state["svd_count"])
        s.queue = [float(v) for v in state["queue"].tolist()]
        s.past_vector = state.get("past_vector")
        for key in ("proj", "proj_codes", "proj_scales", "proj_zeros"):
            setattr(self, key, state.get(key))
