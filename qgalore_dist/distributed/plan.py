"""Ownership planning: which rank keeps each GaLore matrix's Adam state and runs its SVD.

Pure functions of the matrices' names, shapes and ranks, so every rank computes the same plan
without communicating.  ``balanced`` is longest-processing-time-first (LPT) scheduling by SVD
cost ``m * n * min(m, n)``, ties broken by the owner's state bytes and then by rank;
``rank0`` puts every matrix on rank 0 (the original single-owner design).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PLACEMENTS", "MatrixSpec", "OwnershipPlan", "plan_ownership"]

PLACEMENTS = ("balanced", "rank0")


@dataclass(frozen=True, kw_only=True, slots=True)
class MatrixSpec:
    """One GaLore matrix as the planner sees it."""

    name: str
    """Parameter name (unique, identical on every rank)."""
    shape: tuple[int, int]
    """(m, n) = (out_features, in_features)."""
    rank: int
    """Projection rank r."""

    @property
    def svd_cost(self) -> int:
        m, n = self.shape
        return m * n * min(m, n)

    @property
    def state_bytes(self) -> int:
        """Two 8-bit moments of the (max(m, n), r) low-rank gradient."""
        return 2 * max(self.shape) * self.rank


@dataclass(frozen=True, kw_only=True, slots=True)
class OwnershipPlan:
    """``owner[name]`` for every matrix, plus the load it puts on each rank."""

    world_size: int
    placement: str
    owner: dict[str, int]
    svd_cost: tuple[int, ...]
    """Summed SVD cost per rank."""
    state_bytes: tuple[int, ...]
    """Summed 8-bit state bytes per rank."""

    def owned_by(self, rank: int) -> list[str]:
        return [name for name, r in self.owner.items() if r == rank]

    def imbalance(self) -> float:
        """max / mean SVD cost over ranks (1.0 is perfect)."""
        mean = sum(self.svd_cost) / self.world_size
        return max(self.svd_cost) / mean if mean else 1.0

    def describe(self) -> str:
        lines = [f"ownership plan ({self.placement}, {self.world_size} ranks, imbalance {self.imbalance():.3f})"]
        for r in range(self.world_size):
            lines.append(f"  rank {r}: {len(self.owned_by(r))} matrices, SVD cost {self.svd_cost[r]:.3e}, "
                         f"state {self.state_bytes[r] / 2**20:.2f} MiB")
        return "\n".join(lines)


def plan_ownership(specs: list[MatrixSpec], world_size: int, placement: str = "balanced") -> OwnershipPlan:
    """Assign an owner rank to every matrix (see module doc)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"matrix names must be unique, got duplicates {dupes[:5]}")
    cost = [0] * world_size
    state = [0] * world_size
    owner: dict[str, int] = {}
    order = sorted(specs, key=lambda s: (-s.svd_cost, -s.state_bytes, s.name))
    for spec in order:
        r = 0 if placement == "rank0" else min(range(world_size), key=lambda k: (cost[k], state[k], k))
        owner[spec.name] = r
        cost[r] += spec.svd_cost
        state[r] += spec.state_bytes
    owner = {name: owner[name] for name in names}  # keep the model's order
    return OwnershipPlan(world_size=world_size, placement=placement, owner=owner,
                         svd_cost=tuple(cost), state_bytes=tuple(state))
