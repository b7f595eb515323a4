"""Data-parallel Q-GaLore: ownership plan, metered collectives and owner-grouped exchanges.
Everything here degenerates to the identity at world size 1."""

from .comm import KINDS, Collectives, CommMeter, TrafficKind
from .exchange import (
    OwnedTensor,
    broadcast_from_owners,
    broadcast_from_owners_compressed,
    pack_buckets,
    reduce_rows_to_shards,
    reduce_to_owners,
    reduce_to_owners_compressed,
)
from .overlap import OverlappedReduce
from .plan import PLACEMENTS, MatrixSpec, OwnershipPlan, plan_ownership
from .rows import chunk_rows, row_shard_problem
from .watchdog import set_watchdog_timeout

__all__ = [
    "KINDS", "PLACEMENTS", "Collectives", "CommMeter", "MatrixSpec", "OverlappedReduce", "OwnedTensor",
    "OwnershipPlan", "TrafficKind", "broadcast_from_owners", "broadcast_from_owners_compressed", "chunk_rows",
    "pack_buckets", "plan_ownership", "reduce_rows_to_shards", "reduce_to_owners", "reduce_to_owners_compressed",
    "row_shard_problem", "set_watchdog_timeout",
]
