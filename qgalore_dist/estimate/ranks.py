"""Memory per data-parallel rank, by closed form: ``QGaLoreAdamW8bit`` on torch.distributed and under
DeepSpeed ZeRO-2 / ZeRO-3, against DDP / ZeRO-2 / ZeRO-3 baselines (FSDP2 rows: ``fsdp.py``).

Every rank can be evaluated (``ours_rank_bytes(shapes, world, rank, ...)``); ours uses the
package's own ``plan_ownership`` and a replica of the optimizer's dense-owner rule, so uneven
ownership shows.  ``model states`` = weights + gradients + optimizer + projectors; ``peak`` =
model states + communication buffers + temporary.  Activations (``activations.py``) and library
scratch (NCCL/gloo, LAPACK, CUDA context) are not counted here.

* ``ddp_adamw``        DDP + AdamW, mixed precision as in the ZeRO paper (sec. 3.1): bf16 weights
                       and gradients, fp32 master + m + v (16 B/param) on every rank; DDP's
                       gradient buckets (``gradient_as_bucket_view=False``) are a second copy.
* ``ddp_adamw8bit``    the same with bitsandbytes AdamW8bit: fp32 master + 8-bit m, v.
* ``zero2_adamw``      DeepSpeed ZeRO-2 + AdamW, DeepSpeed's own convention
                       (``estimate_zero2_model_states_mem_needs``: 2 B/param bf16 weights + 18
                       B/param / N = bf16 + fp32 gradient partitions, fp32 master, m, v), plus the
                       reduce buckets.
* ``zero2_adamw8bit``  the same with bnb AdamW8bit: m, v of the fp32 partition in 8 bits.
* ``zero3_adamw``      ZeRO-3 + AdamW, DeepSpeed's ``estimate_zero3_model_states_mem_needs``
                       convention: 18 B/param / N (2 bf16 weights + 4 fp32 gradients + 12 fp32
                       master, m, v) + its "largest layer" term 4 B x the largest module's
                       parameters (gathered bf16 weights and gradients), counted as a buffer with
                       the reduce and prefetch buckets.
* ``zero3_adamw8bit``  the same with bnb AdamW8bit.
* ``ddp_galore8bit``   galore_torch GaLoreAdamW8bit under DDP (pure bf16).
* ours                 INT8 weights, packed INT4 projectors (replicated); each GaLore matrix's 8-bit
                       low-rank moments and previous singular vector on its owner only; dense
                       tensors: 8-bit moments on their owner (torch.distributed, ZeRO-1 style) or
                       the engine's partitions (ZeRO-2: 2 + 4 B/param gradients, ZeRO-3: weights
                       too, 2 + 4 B/param, fp32 master + 8-bit moments).  Gradients on a steady step:
                       the fp32 low-rank gradient of every GaLore matrix (``overlap``: only the owned
                       sums + one bucket being filled).  On a refresh step (every matrix
                       refreshing: step 0, and while adaptive schedules coincide):

                       - ``streamed_refresh=False`` (the code today): every rank holds every
                         refreshing matrix's full fp32 gradient;
                       - ``streamed_refresh=True`` (DESIGN step 3): full gradients are reduced to
                         their owner bucket by bucket during backward and freed on the other
                         ranks at once: a rank holds the full gradients of the matrices it owns,
                         one bucket in flight and one transient full gradient.

                       ZeRO-3 ``int8_partitioned``: ``False`` (``"int8_partition": false``)
                       replicates INT8 codes + scales; ``True`` (the default of
                       ``qgalore_dist.initialize`` under stage 3) keeps 1/N of them per rank and
                       gathers one whole matrix at a time into a buffer (no prefetch).
                       Buffers: the exchange's coalesced payloads (``_exchange_buffers``), one
                       ``bucket_cap_mb`` bucket at a time, plus the engine's buckets.

Temporaries: ours counts the fp32 back-projected update of the largest matrix (what the fused
CUDA INT8 update reads), or on refresh steps the owner's SVD inputs/outputs when larger than the
exchange buffers then alive.  Baselines count none (this favours the baselines).

``benchmarks/memory_rss.py`` checks the torch.distributed rows against the RSS of real gloo ranks.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from qgalore_dist.distributed import MatrixSpec, plan_ownership
from qgalore_dist.optim import QGaLoreConfig

from .model import Shapes, Tensor
from .states import galore8bit, lowrank_numel, moment_8bit_bytes, qgalore_dist_components

__all__ = ["RankBytes", "Unsupported", "ZeroBuckets", "dense_owners", "galore_owners", "ours_rank_bytes",
           "worst_rank"]


@dataclass(frozen=True)
class RankBytes:
    """Bytes held by one rank."""

    weights: int
    """INT8 codes + scales and dense weights (their shards where the engine shards them)."""
    gradients: int
    """GaLore gradients (low-rank or full fp32) + dense gradients."""
    optimizer: int
    """Adam moments (8-bit low-rank, dense) and fp32 master partitions."""
    projectors: int
    """Packed INT4 projectors + scales/zeros, and owned previous singular vectors."""
    comm_buffers: int
    """Largest set of communication buffers alive at once."""
    temporary: int
    """Largest temporary outside the buffers (update back-projection, SVD workspace)."""

    @property
    def model_states(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.projectors

    @property
    def peak(self) -> int:
        return self.model_states + self.comm_buffers + self.temporary

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "model_states": self.model_states, "peak": self.peak}


@dataclass(frozen=True)
class ZeroBuckets:
    """DeepSpeed ZeRO's gradient staging buckets (``stage_1_and_2.setup_buckets``): one bucket of
    ``reduce_bucket_size`` elements in the reduction dtype (bf16), two with ``overlap_comm``;
    ZeRO-3 adds its parameter prefetch bucket.  Defaults: ``configs/ds/zero2_bf16.json``."""

    reduce_bucket_size: int = 200_000_000
    """Elements per reduce bucket."""
    overlap_comm: bool = True
    """Two reduce buckets (one reducing while the next fills)."""
    element_bytes: int = 2
    """Bytes per bucket element (bf16)."""
    prefetch_bucket_size: int = 0
    """ZeRO-3 ``stage3_prefetch_bucket_size`` (elements of gathered parameters in flight)."""

    @property
    def nbytes(self) -> int:
        return self.reduce_bucket_size * (2 if self.overlap_comm else 1) * self.element_bytes

    @property
    def prefetch_nbytes(self) -> int:
        return self.prefetch_bucket_size * self.element_bytes

    @classmethod
    def from_ds_config(cls, path: str | Path, stage: int = 2) -> "ZeroBuckets":
        """The buckets of a ds_config file of ZeRO stage ``stage``."""
        zero = json.loads(Path(path).read_text())["zero_optimization"]
        if zero.get("stage") != stage:
            raise ValueError(f"{path}: expected a ZeRO stage-{stage} config, got stage {zero.get('stage')!r}")
        return cls(reduce_bucket_size=int(zero["reduce_bucket_size"]), overlap_comm=bool(zero["overlap_comm"]),
                   prefetch_bucket_size=int(zero.get("stage3_prefetch_bucket_size", 0)) if stage == 3 else 0)


ZERO3_DEFAULT = ZeroBuckets(reduce_bucket_size=50_000_000, overlap_comm=True, prefetch_bucket_size=50_000_000)
"""ZeRO-3 buckets of ``configs/ds/zero3_bf16.json``."""


class Unsupported(Exception):
    """Raised by a row's function for a (model, N) the approach cannot run (e.g. FSDP2 row shards)."""


# ----------------------------------------------------------------------------- ownership
@lru_cache(maxsize=64)  # every rank of a world size asks for the same plan
def galore_owners(shapes: Shapes, world: int) -> dict[str, int]:
    """Owner rank of every GaLore matrix: the package's own plan (``QGaLoreConfig().placement``)."""
    specs = [MatrixSpec(name=t.name, shape=t.shape, rank=shapes.lay.rank) for t in shapes.galore]
    return plan_ownership(specs, world, QGaLoreConfig().placement).owner


@lru_cache(maxsize=64)
def dense_owners(shapes: Shapes, world: int) -> dict[str, int]:
    """Owner of every dense tensor: the rule of ``QGaLoreAdamW8bit``'s dense placement (largest
    first, ties by parameter order, onto the least loaded rank)."""
    index = {t.name: i for i, t in enumerate(shapes.tensors)}
    load, owner = [0] * world, {}
    for t in sorted(shapes.dense, key=lambda d: (-d.numel, index[d.name])):
        r = min(range(world), key=lambda k: (load[k], k))
        owner[t.name] = r
        load[r] += t.numel
    return owner


# ----------------------------------------------------------------------------- buffers
def payload_bytes() -> int:
    """Bytes per element of the exchange's payloads (``QGaLoreConfig().payload_dtype``)."""
    return {"float32": 4, "bfloat16": 2}[QGaLoreConfig().payload_dtype]


def bucket_cap() -> int:
    """``QGaLoreConfig().bucket_cap_mb`` in bytes."""
    return int(QGaLoreConfig().bucket_cap_mb * 2**20)


def bucket(total_bytes: int, largest_bytes: int, cap: int) -> int:
    """Largest flat buffer ``pack_buckets`` builds from a stream of tensors: the cap, or one
    tensor alone when it is larger; the whole stream when there is no cap or it fits."""
    return total_bytes if not cap else min(total_bytes, max(cap, largest_bytes))


def _exchange_buffers(lowrank: tuple[int, int, int], dense: tuple[int, int, int], world: int, dense_bytes: int,
                      *, steady: bool, receive_slots: bool, cap: int, overlap: bool = False) -> int:
    """Largest set of exchange buffers alive at once during ``QGaLoreAdamW8bit.step``.
    ``lowrank`` and ``dense`` are element counts ``(all, owned by this rank, largest tensor)``;
    bytes out, payloads in ``payload_dtype``, flat buffers cut into ``cap``-byte buckets.
    Phases, in the order ``step`` runs them:

    1. low-rank reduce (steady steps only): one bucket of low-rank gradients concatenated into
       per-owner chunks, plus this rank's reduce-scatter outputs so far (N > 1);
    2. dense reduce: low-rank results + one bucket of dense gradients + dense outputs (N > 1);
    3. low-rank update, a bucket at a time: both results + the bucket's directions (the owner's
       Adam output or an empty receive slot) + ``broadcast_from_owners``' copy of them (N > 1);
    4. dense update: both results + one bucket of concatenated dense parameters (N > 1).

    ``receive_slots=False`` leaves out never-written ``torch.empty`` receive slots (no resident
    memory on CPU; a CUDA allocator does reserve them).  ``overlap``: phase 2 (and on steady
    steps phase 1) happens during backward with one bucket in flight; the owned sums count as
    gradients.
    ``dense=(0, 0, 0)`` (the engine owns them) leaves the dense phases empty."""
    b, multi = payload_bytes(), world > 1
    (lr_all, lr_own, lr_max), (d_all, d_own, d_max) = lowrank, dense
    lr_bucket, d_bucket = bucket(b * lr_all, b * lr_max, cap), bucket(b * d_all, b * d_max, cap)
    lr_overlap = overlap and steady  # refreshing layers' low-rank gradients come from the refresh
    results = (0 if lr_overlap else b * lr_own) + (0 if overlap else b * d_own)
    slots = lr_bucket if receive_slots or not multi else min(lr_bucket, b * lr_own)
    phases = [
        (lr_bucket if lr_overlap else lr_bucket + multi * b * lr_own) if steady else 0,
        0 if overlap else b * lr_own + d_bucket + multi * b * d_own,  # overlapped: done in backward
        results + slots + multi * lr_bucket,
        results + multi * bucket(dense_bytes * d_all, dense_bytes * d_max, cap),
    ]
    return max(phases)


def svd_temporary(t: Tensor, k_bytes: int = 4) -> int:
    """Owner's refresh of one matrix: the cloned full fp32 gradient + U, S, Vh of the exact SVD."""
    m, n = t.shape
    k = min(m, n)
    return k_bytes * (m * n + m * k + k + k * n)


def streamed_buffers(shapes: Shapes, world: int) -> int:
    """Full-gradient buffers of a streamed refresh in backward besides the owner's sums: the bucket
    being formed from the layers' gradients, and the one in flight -- its per-owner send chunks and
    the collective's own scratch with this rank's output, (N-1)/N of a bucket on gloo (measured:
    2.5 buckets in all at 2 ranks, 2.75 at 4; NCCL flattens a list input, up to one bucket).
    ``OverlappedReduce`` waits for the bucket in flight before it builds the next one's chunks, so
    no more are alive at once."""
    full = [t.numel for t in shapes.galore]
    return int((3 - 1 / world) * bucket(4 * sum(full), 4 * max(full), bucket_cap()))


STREAM_PHASES = ("backward", "svd", "update")
"""Phases of a streamed refresh step (:func:`streamed_full_grads`)."""


def streamed_full_grads(shapes: Shapes, world: int, owned: list[Tensor], *, svd_at_completion: bool = True,
                        phase: str = "backward") -> int:
    """GaLore gradient bytes a rank holds on a streamed refresh step (every matrix refreshing).

    ``"backward"``: the owned averaged sums + :func:`streamed_buffers`; with ``svd_at_completion``
    (the optimizer knows its backward passes per step: DeepSpeed, ``qgalore-train``) each owned sum
    is refreshed, projected and freed as the last pass completes it, so the owner holds low-rank
    results and one full gradient.  ``"svd"`` (the start of ``step()``): the owned full sums when
    the SVDs run there, else the low-rank results and the last bucket's one full gradient.
    ``"update"``: none left (the low-rank results are the exchange's buffers).  One process
    streams (through its own buckets) only with ``svd_at_completion``."""
    owned_lowrank = 4 * sum(lowrank_numel(t.shape, shapes.lay.rank) for t in owned)
    owned_full = [4 * t.numel for t in owned]
    one = owned_lowrank + max(owned_full, default=0) if svd_at_completion else sum(owned_full)
    if phase == "update":
        return 0
    if phase == "svd" or (world == 1 and not svd_at_completion):  # one process streams only to run SVDs early
        return one
    assert phase == "backward", phase
    return one + streamed_buffers(shapes, world)


# ----------------------------------------------------------------------------- ours
def _galore_part(shapes: Shapes, world: int, rank: int, *, steady: bool, overlap: bool,
                 streamed_refresh: bool, svd_at_completion: bool = True, phase: str = "update") -> dict[str, Any]:
    """The GaLore matrices' bytes on ``rank`` (replicated INT8), and the low-rank element counts."""
    lay, g_owner = shapes.lay, galore_owners(shapes, world)
    mine = [t for t in shapes.galore if g_owner[t.name] == rank]
    comps = [qgalore_dist_components(t, lay) for t in shapes.galore]
    lr = [lowrank_numel(t.shape, lay.rank) for t in shapes.galore]
    lowrank = (sum(lr), sum(lowrank_numel(t.shape, lay.rank) for t in mine), max(lr))
    if steady:
        grads = 4 * lowrank[0]
        if overlap:
            grads = 4 * lowrank[1] + bucket(4 * lowrank[0], 4 * lowrank[2], bucket_cap())
    else:
        grads = (streamed_full_grads(shapes, world, mine, svd_at_completion=svd_at_completion, phase=phase)
                 if streamed_refresh else 4 * sum(t.numel for t in shapes.galore))
    return {"int8": sum(c["int8_codes"] + c["int8_scales_zeros"] for c in comps),
            "projectors": sum(c["proj_codes"] + c["proj_scales_zeros"] for c in comps)
            + sum(qgalore_dist_components(t, lay)["proj_past_vector"] for t in mine),  # past vector: owner only
            "grads": grads, "state": sum(qgalore_dist_components(t, lay)["lowrank_state"] for t in mine),
            "lowrank": lowrank}


def _dense_own(shapes: Shapes, world: int, rank: int, *, steady: bool, overlap: bool, receive_slots: bool,
               lowrank: tuple[int, int, int]) -> dict[str, int]:
    """Dense tensors owned by the optimizer (torch.distributed): replicated weights and gradients,
    8-bit moments on their owner, and the exchange's buffers."""
    lay, d_owner = shapes.lay, dense_owners(shapes, world)
    dense_all = sum(t.numel for t in shapes.dense)
    dense_max = max(t.numel for t in shapes.dense)
    dense_own = sum(t.numel for t in shapes.dense if d_owner[t.name] == rank)
    grads = lay.dense_bytes * dense_all
    if overlap:  # dense gradients reduce during every backward (refresh steps too)
        grads = payload_bytes() * dense_own + bucket(lay.dense_bytes * dense_all, lay.dense_bytes * dense_max,
                                                     bucket_cap())
    buffers = _exchange_buffers(lowrank, (dense_all, dense_own, dense_max), world, lay.dense_bytes, steady=steady,
                                receive_slots=receive_slots, cap=bucket_cap(), overlap=overlap)
    return {"weights": lay.dense_bytes * dense_all, "grads": grads,
            "state": sum(2 * moment_8bit_bytes(t.numel, lay) for t in shapes.dense if d_owner[t.name] == rank),
            "buffers": buffers}


def _dense_zero(shapes: Shapes, world: int, *, steady: bool, overlap: bool, receive_slots: bool,
                lowrank: tuple[int, int, int], zero: ZeroBuckets, stage: int) -> dict[str, int]:
    """Dense tensors under DeepSpeed ZeRO-2 (gradients, master and moments partitioned) or ZeRO-3
    (weights too); the GaLore exchange's buffers + the engine's buckets."""
    lay = shapes.lay
    dense_all = sum(t.numel for t in shapes.dense)
    part = -(-dense_all // world)  # DeepSpeed pads the flat group to equal partitions
    buffers = zero.nbytes + _exchange_buffers(lowrank, (0, 0, 0), world, lay.dense_bytes, steady=steady,
                                              receive_slots=receive_slots, cap=bucket_cap(), overlap=overlap)
    state = 4 * part + 2 * moment_8bit_bytes(part, lay)
    if stage == 2:  # DeepSpeed's 2 + 4 B/param gradient partitions, weights replicated
        return {"weights": lay.dense_bytes * dense_all, "grads": 6 * part, "state": state, "buffers": buffers}
    largest_dense = max(t.numel for t in shapes.dense)
    return {"weights": lay.dense_bytes * part, "grads": 4 * part, "state": state,
            "buffers": buffers + zero.prefetch_nbytes + 4 * largest_dense}


def ours_rank_bytes(shapes: Shapes, world: int, rank: int, *, steady: bool, zero: ZeroBuckets | None = None,
                    receive_slots: bool = True, update_temporary: int | None = None, overlap: bool = False,
                    streamed_refresh: bool = True, zero_stage: int = 2, int8_partitioned: bool = False,
                    svd_at_completion: bool = True, phase: str | None = None,
                    svd_workspace: int | None = None) -> RankBytes:
    """``QGaLoreAdamW8bit`` on rank ``rank`` of ``world`` (module doc); ``zero`` given: dense tensors
    under DeepSpeed ZeRO stage ``zero_stage`` (2 or 3) instead of the optimizer's own owners.

    ``update_temporary`` defaults to the fp32 back-projected update of the largest matrix; the
    CPU RSS validation passes its measured torch-path value.  ``int8_partitioned`` (ZeRO-3
    only): 1/N of the INT8 codes + scales per rank and one gathered matrix as a buffer.  A streamed
    refresh step has phases (:data:`STREAM_PHASES`: backward, the owners' SVDs, the update
    exchange); ``phase=None`` gives the one with the larger peak.  ``svd_workspace`` replaces the exact SVD's temporary
    of the largest matrix (:func:`svd_temporary`; the RSS validation measures its own)."""
    if zero_stage not in (2, 3):
        raise ValueError(f"zero_stage must be 2 or 3, got {zero_stage}")
    if int8_partitioned and (zero is None or zero_stage != 3):
        raise ValueError("int8_partitioned applies to ZeRO-3 only")
    kw = dict(zero=zero, receive_slots=receive_slots, update_temporary=update_temporary, overlap=overlap,
              streamed_refresh=streamed_refresh, zero_stage=zero_stage, int8_partitioned=int8_partitioned,
              svd_at_completion=svd_at_completion, svd_workspace=svd_workspace)
    if steady or not streamed_refresh:
        return _ours_phase(shapes, world, rank, steady=steady, phase="update", **kw)
    if phase is not None:
        return _ours_phase(shapes, world, rank, steady=False, phase=phase, **kw)
    return max((_ours_phase(shapes, world, rank, steady=False, phase=ph, **kw) for ph in STREAM_PHASES),
               key=lambda b: b.peak)


def _ours_phase(shapes: Shapes, world: int, rank: int, *, steady: bool, zero: ZeroBuckets | None,
                receive_slots: bool, update_temporary: int | None, overlap: bool, streamed_refresh: bool,
                zero_stage: int, int8_partitioned: bool, svd_at_completion: bool, phase: str,
                svd_workspace: int | None) -> RankBytes:
    """:func:`ours_rank_bytes` of one phase (``"update"`` but for a streamed refresh step)."""
    g = _galore_part(shapes, world, rank, steady=steady, overlap=overlap, streamed_refresh=streamed_refresh,
                     svd_at_completion=svd_at_completion, phase=phase)
    kw = dict(steady=steady, overlap=overlap, receive_slots=receive_slots, lowrank=g["lowrank"])
    d = _dense_own(shapes, world, rank, **kw) if zero is None else _dense_zero(
        shapes, world, zero=zero, stage=zero_stage, **kw)
    largest = max(shapes.galore, key=lambda t: t.numel)
    int8, buffers = g["int8"], d["buffers"]
    if phase != "update":  # the step's exchange has not started: only the engine's buckets
        buffers = zero.nbytes + (zero.prefetch_nbytes if zero_stage == 3 else 0) if zero is not None else 0
    if int8_partitioned:
        c = qgalore_dist_components(largest, shapes.lay)
        int8 = -(-int8 // world)
        # integrations/zero3: one matrix gathered at a time (forward, then again in backward), no prefetch
        buffers += c["int8_codes"] + c["int8_scales_zeros"]
    temporary = 4 * largest.numel if update_temporary is None else update_temporary
    svd = svd_temporary(largest) if svd_workspace is None else svd_workspace
    owns = any(galore_owners(shapes, world)[t.name] == rank for t in shapes.galore)
    if phase == "backward":  # the owner's SVDs as its sums complete (else nothing beyond the buckets)
        temporary = svd if svd_at_completion and owns else 0
    elif phase == "svd":
        temporary = svd if owns else 0
    elif not steady and not streamed_refresh:  # the SVD runs before the update exchange
        temporary = max(temporary, svd - buffers)
    return RankBytes(weights=int8 + d["weights"], gradients=g["grads"] + d["grads"],
                     optimizer=g["state"] + d["state"], projectors=g["projectors"], comm_buffers=buffers,
                     temporary=temporary)


# ----------------------------------------------------------------------------- baselines
def ddp_adamw(shapes: Shapes, world: int, rank: int) -> RankBytes:
    psi = shapes.total
    return RankBytes(weights=2 * psi, gradients=2 * psi, optimizer=12 * psi, projectors=0, comm_buffers=2 * psi,
                     temporary=0)


def ddp_adamw8bit(shapes: Shapes, world: int, rank: int) -> RankBytes:
    psi = shapes.total
    state = sum(4 * t.numel + 2 * moment_8bit_bytes(t.numel, shapes.lay) for t in shapes.tensors)
    return RankBytes(weights=2 * psi, gradients=2 * psi, optimizer=state, projectors=0, comm_buffers=2 * psi,
                     temporary=0)


def zero2_adamw(shapes: Shapes, world: int, rank: int, zero: ZeroBuckets) -> RankBytes:
    part = -(-shapes.total // world)  # DeepSpeed pads the flat group to equal partitions
    return RankBytes(weights=2 * shapes.total, gradients=6 * part, optimizer=12 * part, projectors=0,
                     comm_buffers=zero.nbytes, temporary=0)


def zero2_adamw8bit(shapes: Shapes, world: int, rank: int, zero: ZeroBuckets) -> RankBytes:
    part = -(-shapes.total // world)
    return RankBytes(weights=2 * shapes.total, gradients=6 * part,
                     optimizer=4 * part + 2 * moment_8bit_bytes(part, shapes.lay), projectors=0,
                     comm_buffers=zero.nbytes, temporary=0)


def zero3_adamw(shapes: Shapes, world: int, rank: int, zero: ZeroBuckets, *, eight_bit: bool = False) -> RankBytes:
    """ZeRO-3 (module doc): DeepSpeed's 18 B/param / N + its largest-layer term as a buffer."""
    part = -(-shapes.total // world)
    state = 4 * part + 2 * moment_8bit_bytes(part, shapes.lay) if eight_bit else 12 * part
    largest = max(t.numel for t in shapes.tensors)
    return RankBytes(weights=2 * part, gradients=4 * part, optimizer=state, projectors=0,
                     comm_buffers=zero.nbytes + zero.prefetch_nbytes + 4 * largest, temporary=0)


def ddp_galore8bit(shapes: Shapes, world: int, rank: int) -> RankBytes:
    parts = [galore8bit(t, shapes.lay) for t in shapes.tensors]
    psi = shapes.total
    return RankBytes(weights=2 * psi, gradients=2 * psi, optimizer=sum(p["state"] for p in parts),
                     projectors=sum(p.get("projector", 0) for p in parts), comm_buffers=2 * psi, temporary=0)


RankFn = Callable[[Shapes, int, int], RankBytes]


def worst_rank(fn: RankFn, shapes: Shapes, world: int) -> dict[str, Any]:
    """The rank with the largest peak (every rank evaluated), with its components."""
    try:
        per_rank = [fn(shapes, world, r) for r in range(world)]
    except Unsupported as exc:  # shown as n/a
        return {"supported": False, "reason": str(exc)}
    rank = max(range(world), key=lambda r: (per_rank[r].peak, per_rank[r].model_states))
    return {"rank": rank, **per_rank[rank].as_dict(),
            "max_model_states": max(b.model_states for b in per_rank),
            "sum_optimizer_over_ranks": sum(b.optimizer for b in per_rank)}


def deepspeed_zero3_largest_layer(shapes: Shapes) -> int:
    """DeepSpeed's ``largest_layer_params`` for these shapes: the largest module's own parameters
    (one weight per LLaMA module, no biases: the largest tensor)."""
    return max(math.prod(t.shape) for t in shapes.tensors)
