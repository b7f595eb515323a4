"""The data-parallel layout of an ``--engine fsdp2`` run, after torchtitan's ``ParallelDims``:
``dp_replicate x dp_shard`` ranks, -1 meaning "the rest of the world size".

    dims = ParallelDims(dp_replicate=2, dp_shard=-1, world_size=8)    # -> 2 x 4 (HSDP)
    mesh = dims.build_mesh("cpu")          # 1-D ("dp_shard",) or 2-D ("dp_replicate", "dp_shard")
    group = dims.group("dp_shard")         # the ranks one replica is sharded over

``dp_replicate == 1`` is FSDP2 on a 1-D mesh over the whole world; ``dp_shard == 1`` would be
pure replication (HSDP with one shard each).  Every rank is a data-parallel rank either way:
the training data is split over the whole world.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ParallelDims"]


@dataclass(kw_only=True)
class ParallelDims:
    """Resolved and validated on construction (``ValueError`` naming the values and the world
    size); the device mesh is built once, on the first :meth:`build_mesh`."""

    dp_replicate: int = 1
    """Model replicas (HSDP's replicate dim), or -1: ``world_size // dp_shard``."""
    dp_shard: int = -1
    """Ranks each replica is sharded over (FSDP2's ``Shard(0)`` dim), or -1: ``world_size // dp_replicate``."""
    world_size: int
    """Ranks in the job."""
    mesh: Any = field(default=None, init=False, repr=False)
    """The ``DeviceMesh``, once :meth:`build_mesh` ran."""

    def __post_init__(self) -> None:
        given = f"parallel.dp_replicate {self.dp_replicate} x parallel.dp_shard {self.dp_shard}"
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"world size must be an integer >= 1, got {self.world_size!r}")
        for name in ("dp_replicate", "dp_shard"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not (value == -1 or value >= 1):
                raise ValueError(f"parallel.{name} must be an integer >= 1 or -1 (the rest), got {value!r}")
        if self.dp_replicate == -1 and self.dp_shard == -1:
            raise ValueError(f"{given}: at most one of them may be -1 (the rest of the world size {self.world_size})")
        if self.dp_shard == -1:
            self.dp_shard = self._rest(self.dp_replicate, "dp_replicate", given)
        elif self.dp_replicate == -1:
            self.dp_replicate = self._rest(self.dp_shard, "dp_shard", given)
        if self.dp_replicate * self.dp_shard != self.world_size:
            raise ValueError(f"{given} = {self.dp_replicate * self.dp_shard} ranks, but the world size is "
                             f"{self.world_size}: their product must equal it")

    def _rest(self, other: int, name: str, given: str) -> int:
        if self.world_size % other:
            raise ValueError(f"{given}: parallel.{name} {other} does not divide the world size {self.world_size}, "
                             "so -1 (the rest) has no value")
        return self.world_size // other

    @property
    def hsdp(self) -> bool:
        """Whether the mesh is 2-D (replicate x shard)."""
        return self.dp_replicate > 1

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        return (self.dp_replicate, self.dp_shard) if self.hsdp else (self.dp_shard,)

    @property
    def dim_names(self) -> tuple[str, ...]:
        return ("dp_replicate", "dp_shard") if self.hsdp else ("dp_shard",)

    def build_mesh(self, device_type: str):
        """Collective on first call: the ``DeviceMesh`` of :attr:`mesh_shape` with
        :attr:`dim_names` (every rank of the world takes part)."""
        if self.mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(device_type, self.mesh_shape, mesh_dim_names=self.dim_names)
        return self.mesh

    def group(self, name: str):
        """The process group of mesh dim ``name`` (``dp_shard``; ``dp_replicate`` under HSDP)."""
        assert self.mesh is not None, "build_mesh first"
        if name not in self.dim_names:
            raise ValueError(f"no mesh dim {name!r} in {self.dim_names} (dp_replicate is a dim only under HSDP)")
        return self.mesh.get_group(name)

    def describe(self) -> str:
        if self.hsdp:
            return f"HSDP mesh dp_replicate {self.dp_replicate} x dp_shard {self.dp_shard}"
        return f"FSDP2 mesh dp_shard {self.dp_shard}"
