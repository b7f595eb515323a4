"""One estimate: per-rank memory (steady and refresh steps, the worst of them), activations, and
bytes per step (steady, refresh, averaged over a run) for qgalore-dist on one engine, beside the
engine's AdamW / 8-bit AdamW baselines and FSDP2 + torchao AdamW8bit.

``estimate(EstimateRequest(model="llama_7b", world=8, engine="fsdp2"))`` is the whole API; the
``qgalore-estimate`` console script prints its result as text or JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .activations import Activations, activation_bytes
from .comm import ddp_bytes, ours_refresh_all, ours_steady, ours_zero, zero2_bytes, zero3_bytes
from .comm_fsdp import baseline_step, ours_step
from .fsdp import fsdp2_baseline_bytes, fsdp_rank_bytes, not_shardable
from .model import Layout, Shapes, load_model_config, model_shapes, param_counts
from .ranks import (
    ZERO3_DEFAULT,
    Unsupported,
    ZeroBuckets,
    ddp_adamw,
    ddp_adamw8bit,
    ours_rank_bytes,
    zero2_adamw,
    zero2_adamw8bit,
    zero3_adamw,
)
from .schedule import adaptive_refresh_steps, fixed_refresh_steps, run_average

__all__ = ["ENGINES", "Estimate", "EstimateRequest", "MemoryRow", "TrafficRow", "estimate"]

ENGINES = ("ddp", "zero2", "zero3", "fsdp2")
"""``ddp``: plain torch.distributed data parallel; ``zero2`` / ``zero3``: DeepSpeed ZeRO;
``fsdp2``: PyTorch FSDP2 (``qgalore_dist.integrations.fsdp``)."""
DEFAULT_RANKS = {"llama_60m": 128, "llama_130m": 256, "llama_350m": 256}
"""The GaLore / Q-GaLore C4 scripts' ranks where they are not 1024."""


@dataclass(frozen=True, kw_only=True)
class EstimateRequest:
    """What to estimate."""

    model: str
    """A built-in model name, an HF config JSON file, or a directory holding a config.json."""
    world: int
    """Data-parallel ranks N (FSDP2: shard ranks)."""
    engine: str = "fsdp2"
    """One of ``ENGINES``."""
    rank: int | None = None
    """GaLore rank r; None: the C4 scripts' rank for the size (1024 from 1B up, capped at the
    smallest GaLore dimension)."""
    micro_batch: int = 1
    """Sequences per micro-batch per rank (activations)."""
    seq: int | None = None
    """Tokens per sequence; None: no activation figures."""
    activation_checkpointing: bool = False
    """Per-decoder-layer activation checkpointing (activations)."""
    fused_attention: bool = True
    """SDPA / FlashAttention (no s^2 attention probabilities kept; activations)."""
    streamed_refresh: bool = True
    """``QGaLoreConfig.stream_refresh`` (the default): refresh steps reduce full gradients to
    their owner during backward, bucket by bucket; False: every rank holds every refreshing full
    gradient until ``step()`` (the old path)."""
    payload_dtype: str = "float32"
    """``QGaLoreConfig.payload_dtype`` of the low-rank (and, ddp, dense-gradient) exchanges: bytes
    per step; memory figures keep fp32 payload buffers (an upper bound)."""
    svd_at_completion: bool = True
    """With ``streamed_refresh``: the owners' SVDs run in backward as the last pass completes each
    averaged full gradient (the optimizer knows its passes per step: DeepSpeed and ``qgalore-train``
    tell it, plain users pass ``gradient_accumulation_steps=``); False: at ``step()``, every owned
    full gradient held until then."""
    int8_partitioned: bool | None = None
    """ZeRO-3 only: INT8 codes + scales partitioned 1/N and gathered around each layer's forward
    and backward; False: replicated (the ds_config entry's ``"int8_partition": false``).  None:
    what ``qgalore_dist.initialize`` does, partitioned under ZeRO-3 (:attr:`partitioned`)."""

    @property
    def partitioned(self) -> bool:
        """Whether the INT8 weights are partitioned in this estimate (``int8_partitioned`` resolved)."""
        return self.engine == "zero3" if self.int8_partitioned is None else self.int8_partitioned
    overlap_comm: bool = False
    """``QGaLoreConfig.overlap_comm`` (steady steps; fsdp2: rows reduce-scattered during backward)."""
    update_proj_gap: int = 200
    """Initial refresh gap T."""
    train_steps: int = 150_000
    """Run length for the run-average bytes (the 7B C4 runs' 150k steps)."""


@dataclass(frozen=True, kw_only=True)
class MemoryRow:
    """Bytes on the most loaded rank for one approach and step kind (None fields: not supported)."""

    key: str
    """Row identifier."""
    label: str
    """Human-readable description."""
    rank: int | None = None
    """The most loaded rank."""
    bytes: dict[str, int] | None = None
    """weights, gradients, optimizer, projectors, comm_buffers, temporary, model_states, peak."""
    unsupported: str | None = None
    """Why the approach cannot run these shapes, or None."""


@dataclass(frozen=True, kw_only=True)
class TrafficRow:
    """Bytes one rank sends per step (ring volumes) for one approach."""

    key: str
    """Row identifier."""
    label: str
    """Human-readable description."""
    steady: float | None
    """A steady step."""
    refresh: float | None
    """A step on which every GaLore matrix refreshes (= steady for the baselines)."""
    average_fixed: float | None
    """Mean over ``train_steps`` with a refresh every ``update_proj_gap`` steps."""
    average_adaptive: float | None
    """Mean over ``train_steps`` with the adaptive gap doubling at every chance (best case)."""
    by_kind: dict[str, float] = field(default_factory=dict)
    """Steady-step bytes by meter kind / collective (ours)."""


@dataclass(frozen=True, kw_only=True)
class Estimate:
    """Everything ``qgalore-estimate`` prints."""

    request: EstimateRequest
    """The request, with ``rank`` resolved."""
    model: str
    """Model label."""
    params: dict[str, int]
    """total, galore, embed_head parameter counts."""
    galore_matrices: int
    """Number of GaLore matrices."""
    ours: list[MemoryRow]
    """ours on a steady step and on a refresh step."""
    worst_step: str
    """``steady`` or ``refresh``: the step with the larger peak."""
    worst_reason: str
    """Why that step is the worst."""
    baselines: list[MemoryRow]
    """Baseline rows on the same engine (+ FSDP2 + torchao AdamW8bit)."""
    activations: Activations | None
    """Activation bytes (when ``seq`` is given)."""
    refresh_steps: dict[str, int]
    """Refresh steps in ``train_steps``: fixed and adaptive (best case) schedules."""
    traffic: list[TrafficRow]
    """Bytes per rank per step, ours first."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _memory(key: str, label: str, fn, shapes: Shapes, world: int) -> MemoryRow:
    """The most loaded rank of ``fn(shapes, world, rank)`` (largest peak, then model states)."""
    try:
        per_rank = [fn(shapes, world, r) for r in range(world)]
    except Unsupported as exc:
        return MemoryRow(key=key, label=label, unsupported=str(exc))
    rank = max(range(world), key=lambda r: (per_rank[r].peak, per_rank[r].model_states))
    return MemoryRow(key=key, label=label, rank=rank, bytes=per_rank[rank].as_dict())


def _ours_fn(req: EstimateRequest, steady: bool):
    """f(shapes, world, rank) -> RankBytes of ours on ``req.engine``."""
    if req.engine == "fsdp2":
        return lambda s, n, r: fsdp_rank_bytes(s, n, r, steady=steady, streamed_refresh=req.streamed_refresh,
                                               overlap=req.overlap_comm)
    zero = {"ddp": None, "zero2": ZeroBuckets(), "zero3": ZERO3_DEFAULT}[req.engine]
    kw = dict(steady=steady, zero=zero, overlap=req.overlap_comm, streamed_refresh=req.streamed_refresh,
              zero_stage=3 if req.engine == "zero3" else 2, int8_partitioned=req.partitioned,
              svd_at_completion=req.svd_at_completion)
    return lambda s, n, r: ours_rank_bytes(s, n, r, **kw)


def _baselines(engine: str) -> list[tuple[str, str, Any]]:
    """(key, label, f(shapes, world, rank)) of the engine's baselines + FSDP2 + torchao AdamW8bit."""
    z2, z3 = ZeroBuckets(), ZERO3_DEFAULT
    rows = {
        "ddp": [("ddp_adamw", "DDP + AdamW", ddp_adamw), ("ddp_adamw8bit", "DDP + bnb AdamW8bit", ddp_adamw8bit)],
        "zero2": [("zero2_adamw", "ZeRO-2 + AdamW", lambda s, n, r: zero2_adamw(s, n, r, z2)),
                  ("zero2_adamw8bit", "ZeRO-2 + bnb AdamW8bit", lambda s, n, r: zero2_adamw8bit(s, n, r, z2))],
        "zero3": [("zero3_adamw", "ZeRO-3 + AdamW", lambda s, n, r: zero3_adamw(s, n, r, z3)),
                  ("zero3_adamw8bit", "ZeRO-3 + bnb AdamW8bit",
                   lambda s, n, r: zero3_adamw(s, n, r, z3, eight_bit=True))],
        "fsdp2": [("fsdp2_adamw", "FSDP2 + AdamW", lambda s, n, r: fsdp2_baseline_bytes(s, n, r, eight_bit=False))],
    }[engine]
    return rows + [("fsdp2_torchao_adamw8bit", "FSDP2 + torchao AdamW8bit",
                    lambda s, n, r: fsdp2_baseline_bytes(s, n, r, eight_bit=True))]


def _ours_traffic(req: EstimateRequest, shapes: Shapes) -> tuple[dict[str, float], dict[str, float]]:
    """(steady, refresh) bytes of ours by kind; zeros at one rank."""
    tensors, n, r = shapes.as_tuples(), req.world, shapes.lay.rank
    b = {"float32": 4, "bfloat16": 2}[req.payload_dtype]
    if n == 1:
        return {}, {}
    if req.engine == "fsdp2":
        if not_shardable(shapes, n):
            raise Unsupported(not_shardable(shapes, n))
        kw = dict(rank=r, projection="sharded", payload=b)
        steady, refresh = ours_step(tensors, 1, n, **kw), ours_step(tensors, 1, n, refresh=True, **kw)
        return ({**steady["fsdp2"], **steady["package"]}, {**refresh["fsdp2"], **refresh["package"]})
    if req.engine == "ddp":
        kw = dict(b_lowrank=b, b_dense_grad=b, b_dense_param=2)  # payloads as configured, bf16 model
        return ours_steady(tensors, r, n, **kw), ours_refresh_all(tensors, r, n, **kw)
    stage = 3 if req.engine == "zero3" else 2
    kw = dict(stage=stage, int8_partitioned=req.partitioned, b_lowrank=b)
    return ours_zero(tensors, r, n, **kw), ours_zero(tensors, r, n, refresh=True, **kw)


def _traffic(req: EstimateRequest, shapes: Shapes, schedules: dict[str, list[int]]) -> list[TrafficRow]:
    """Bytes per rank per step: ours (steady, refresh, run averages) and the baselines."""
    def row(key: str, label: str, steady: float | None, refresh: float | None, kinds=None) -> TrafficRow:
        avg = {k: None if steady is None else run_average(steady, refresh, s, req.train_steps).average
               for k, s in schedules.items()}
        return TrafficRow(key=key, label=label, steady=steady, refresh=refresh, average_fixed=avg["fixed"],
                          average_adaptive=avg["adaptive"], by_kind=kinds or {})

    try:
        steady, refresh = _ours_traffic(req, shapes)
        ours = row("ours", f"ours ({req.engine})", sum(steady.values()), sum(refresh.values()), steady)
    except Unsupported:
        ours = row("ours", f"ours ({req.engine}): n/a", None, None)
    p, n = shapes.total, req.world
    tensors = shapes.as_tuples()
    engine = {"ddp": lambda: ddp_bytes(p, n), "zero2": lambda: zero2_bytes(p, n),
              "zero3": lambda: zero3_bytes(p, n), "fsdp2": lambda: baseline_step(tensors, 1, n)["total"]}
    base = 0.0 if n == 1 else engine[req.engine]()
    fsdp2 = 0.0 if n == 1 else baseline_step(tensors, 1, n)["total"]
    rows = [ours] + [row(key, label, base, base) for key, label, _ in _baselines(req.engine)[:-1]]
    return rows + [row("fsdp2_torchao_adamw8bit", "FSDP2 + torchao AdamW8bit (= FSDP2 + AdamW)", fsdp2, fsdp2)]


def resolve_rank(req: EstimateRequest, label: str, shapes_at_1: Shapes) -> int:
    """``req.rank`` validated, or the default for the model."""
    min_dim = min(min(t.shape) for t in shapes_at_1.galore)
    rank = req.rank if req.rank is not None else min(DEFAULT_RANKS.get(label, 1024), min_dim)
    if not 1 <= rank <= min_dim:
        raise ValueError(f"--rank: {rank} must be between 1 and the smallest GaLore matrix dimension {min_dim}")
    return rank


def _check(req: EstimateRequest) -> None:
    if req.engine not in ENGINES:
        raise ValueError(f"--engine: {req.engine!r} is not one of {', '.join(ENGINES)}")
    if req.world < 1:
        raise ValueError(f"--world: must be >= 1, got {req.world}")
    if req.int8_partitioned and req.engine != "zero3":
        raise ValueError("--int8-partitioned: applies to --engine zero3 only")
    if req.update_proj_gap < 1 or req.train_steps < 1:
        raise ValueError("--update-proj-gap and --train-steps: must be >= 1")
    if req.payload_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--payload-dtype: {req.payload_dtype!r} is not float32 or bfloat16")


def estimate(req: EstimateRequest) -> Estimate:
    """The figures for ``req`` (module doc); ``ValueError`` naming the argument on bad input."""
    _check(req)
    label, config = load_model_config(req.model)
    shapes = model_shapes(config, 1)
    rank = resolve_rank(req, label, shapes)
    shapes = Shapes(name=label, tensors=shapes.tensors, lay=Layout(rank=rank))
    req = EstimateRequest(**{**asdict(req), "rank": rank})
    ours = [_memory(f"ours_{kind}", f"ours ({req.engine}), {kind} step", _ours_fn(req, kind == "steady"), shapes,
                    req.world) for kind in ("steady", "refresh")]
    worst, reason = _worst(req, ours)
    baselines = [_memory(k, label_, fn, shapes, req.world) for k, label_, fn in _baselines(req.engine)]
    schedules = {"fixed": fixed_refresh_steps(req.train_steps, req.update_proj_gap),
                 "adaptive": adaptive_refresh_steps(req.train_steps, req.update_proj_gap)}
    acts = None if req.seq is None else activation_bytes(
        config, micro_batch=req.micro_batch, seq=req.seq, checkpointing=req.activation_checkpointing,
        fused_attention=req.fused_attention)
    return Estimate(request=req, model=label, params=param_counts(list(shapes.tensors)),
                    galore_matrices=len(shapes.galore), ours=ours, worst_step=worst, worst_reason=reason,
                    baselines=baselines, activations=acts, refresh_steps={k: len(v) for k, v in schedules.items()},
                    traffic=_traffic(req, shapes, schedules))


def _worst(req: EstimateRequest, ours: list[MemoryRow]) -> tuple[str, str]:
    """Which of ours' steps peaks higher, and why."""
    steady, refresh = ours
    if steady.bytes is None:
        return "n/a", steady.unsupported or ""
    grow = refresh.bytes["gradients"] - steady.bytes["gradients"]
    worst = "refresh" if refresh.bytes["peak"] > steady.bytes["peak"] else "steady"
    if req.streamed_refresh and req.svd_at_completion:
        held = ("the low-rank results of the matrices this rank owns, one full fp32 gradient and the SVD "
                "workspace of the matrix being refreshed + three buckets (streamed refresh, SVDs in backward)")
    elif req.streamed_refresh:
        held = ("the full fp32 gradients of the matrices this rank owns + three buckets (streamed refresh, "
                "SVDs at step())")
    else:
        held = "the full fp32 gradient of every refreshing matrix on every rank (stream_refresh=False)"
    if worst == "refresh":
        return worst, f"a refresh step holds {held} instead of the low-rank gradients ({grow / 2**30:+.2f} GiB)"
    return worst, f"the low-rank gradients and buffers of a steady step outweigh a refresh step's {held}"
