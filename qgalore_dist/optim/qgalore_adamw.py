"""``QGaLoreAdamW8bit``: Q-GaLore as a ``torch.optim.Optimizer``, single process or data parallel.

GaLore parameters (the ``uint8`` weights of :class:`~qgalore_dist.core.Int8Linear` layers,
and any 2-D float parameter in a group marked ``galore=True`` or carrying the reference's
``rank`` key) are updated as

    R = project(G)                       # (m, r) or (r, n); P refreshed on the adaptive schedule
    direction = Adam(R)                  # moments in 8 bits (or 32), on the owner rank only
    W = W - step_size * scale * back_project(direction);  W = W - lr * wd * W
    W = requantize_int8(W, stochastic rounding keyed by (seed, step, parameter name))

Communication (world size N; all of it is the identity when N = 1, which is the single-process
optimizer, not a separate code path): INT8 layers project their gradient during backward and
keep only ``R``; at ``step()`` every ``R`` is reduce-scattered to its owner; a layer that
refreshes this step instead reduces its full gradient to the owner, which runs the SVD and
broadcasts the packed INT4 projector and schedule; owners run Adam and broadcast the low-rank
``direction``; every rank applies it and requantizes with the shared stochastic-rounding
stream, so INT8 weights are never sent.  Dense parameters (embeddings, norms, head) get AdamW
with the same formula, ZeRO-1 style: gradients reduce-scattered to an owner, which keeps the
8-bit moments and broadcasts the updated parameter.

A step whose gradients contain NaN/Inf on any rank is skipped on all ranks (weights and state
untouched) and counted in ``skipped_steps``.  ``state_dict()`` holds only tensors and numbers.
"""

from __future__ import annotations

import contextlib
import logging
import zlib
from typing import Any, Iterable

import torch

from ..core import Projector, RefreshSchedule, accumulate_full_grad, adam_step_size, int8_layer_of, lowrank_sink
from ..core.adam import lowrank_adam_update
from ..distributed import (
    Collectives,
    MatrixSpec,
    OverlappedReduce,
    broadcast_from_owners,
    broadcast_from_owners_compressed,
    pack_buckets,
    plan_ownership,
    reduce_to_owners,
    reduce_to_owners_compressed,
)
from ..distributed.replicas import check_replicas, validate_agreement
from ..quant import BlockwiseCodec, Moment, StreamKey
from .config import QGaLoreConfig

__all__ = ["QGaLoreAdamW8bit"]

logger = logging.getLogger(__name__)

_MOMENT_FIELDS = ("values", "codes", "absmax")


class QGaLoreAdamW8bit(torch.optim.Optimizer):
    """Q-GaLore: low-rank projected 8-bit Adam with INT4 projectors and INT8 weights.

    Args:
        params: parameters or param groups.  A group with ``galore=True`` (or a ``rank`` key, as
            in galore_torch) marks its 2-D float parameters as GaLore matrices; ``uint8`` weights
            of ``Int8Linear`` layers are always GaLore matrices.  Groups may override ``lr``,
            ``weight_decay``, ``betas``, ``eps`` and (GaLore groups) ``rank``,
            ``update_proj_gap``, ``scale``, ``proj_type``.
        config: :class:`QGaLoreConfig`; keyword overrides are applied on top of it.
        names: optional ``{param: name}`` used in messages, plans and checkpoints.
        collectives: the data-parallel group (default: the initialized world, or none).
        manage_dense: False when an engine (DeepSpeed, FSDP2) owns the dense parameters.
    """

    weights_sharded = False
    """Whether this rank holds only a shard of each INT8 weight's rows (FSDP2)."""

    def __init__(self, params: Iterable, config: QGaLoreConfig | None = None, *,
                 names: dict[torch.Tensor, str] | None = None, collectives: Collectives | None = None,
                 manage_dense: bool = True, **overrides: Any) -> None:
        cfg = config or QGaLoreConfig()
        if overrides:
            cfg = QGaLoreConfig.from_dict({**cfg.to_dict(), **overrides})
        self.config = cfg
        super().__init__(params, dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay))
        self.comm = collectives or Collectives()
        self.codec = BlockwiseCodec(bits=cfg.state_bits)
        self.manage_dense = manage_dense
        if cfg.compress_dense and not manage_dense:
            raise ValueError("QGaLoreConfig.compress_dense compresses the dense gradients the optimizer exchanges "
                             "itself; here an engine (DeepSpeed, FSDP2) reduces them: leave it False (DeepSpeed's "
                             "own quantized gradients are ZeRO++'s zero_quantized_gradients)")
        self.skipped_steps = 0
        self.steps_taken = 0
        self._payload_dtype = getattr(torch, cfg.payload_dtype)
        self._bucket_bytes = int(cfg.bucket_cap_mb * 2**20)
        self.comm_residuals: dict[torch.Tensor, torch.Tensor] = {}
        """Per-rank error feedback of compressed low-rank gradients (``compress_lowrank``)."""
        self.update_residuals: dict[torch.Tensor, torch.Tensor] = {}
        """Owner-side error feedback of compressed low-rank updates (``compress_lowrank``)."""
        self.svds_last_step = 0
        self.last_grad_norm: float | None = None
        """Global gradient norm of the last step (only computed when clipping is on)."""
        self.last_clip_coef = 1.0
        """Factor applied to every gradient at the last step (1.0: not clipped)."""
        self.last_step_applied = False
        """Whether the last step changed anything (False: skipped, or no gradient at all)."""
        all_params = [p for g in self.param_groups for p in g["params"]]
        self._tensor_ids = {p: i for i, p in enumerate(all_params)}
        self._names = {p: (names or {}).get(p, f"param[{i}]") for p, i in self._tensor_ids.items()}
        # Random streams (stochastic rounding, randomized SVD) are keyed by the parameter's
        # name when it has one, so the same model draws the same bits whichever parameters
        # the optimizer was given (plain, DeepSpeed, another param order).
        self._stream_ids = {p: zlib.crc32(self._names[p].encode()) if names and p in names else i
                            for p, i in self._tensor_ids.items()}
        if len(set(self._stream_ids.values())) < len(self._stream_ids):  # a crc32 collision
            self._stream_ids = dict(self._tensor_ids)
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}
        self.galore_params = [p for p in all_params if self.is_galore(p, self._group_of[p])]
        self.dense_params = [p for p in all_params if p not in set(self.galore_params)]
        for p in self.galore_params:
            self.state[p]["projector"] = self._build_projector(p, self._group_of[p])
        validate_agreement(self.comm, "Q-GaLore config", self.config.to_dict())
        validate_agreement(self.comm, "GaLore/dense parameter shapes",
                           [(self.name_of(p), tuple(p.shape), str(p.dtype)) for p in all_params])
        self._plan_owners()
        self._overlap, self._overlap_dense = self._build_overlap() if cfg.overlap_comm else (None, None)
        self._arm_grad_sinks()

    # ----------------------------------------------------------------- construction
    def is_galore(self, p: torch.Tensor, group: dict) -> bool:
        if int8_layer_of(p) is not None:
            return True
        return bool(group.get("galore") or "rank" in group) and p.dim() == 2

    def name_of(self, p: torch.Tensor) -> str:
        return self._names[p]

    def _build_projector(self, p: torch.Tensor, group: dict) -> Projector:
        cfg = self.config
        schedule = RefreshSchedule(
            gap=int(group.get("update_proj_gap", cfg.update_proj_gap)), adaptive=cfg.adaptive_gap,
            queue_size=cfg.queue_size, cos_threshold=cfg.cos_threshold, gamma=cfg.gamma_proj,
        )
        return Projector(
            tuple(p.shape), rank=int(group.get("rank", cfg.rank)), proj_type=group.get("proj_type", cfg.proj_type),
            scale=float(group.get("scale", cfg.scale)), bits=cfg.proj_bits, group_size=cfg.proj_group_size,
            schedule=schedule, name=self.name_of(p),
        )

    def _plan_owners(self) -> None:
        specs = [MatrixSpec(name=self.name_of(p), shape=tuple(p.shape), rank=self.state[p]["projector"].rank)
                 for p in self.galore_params]
        self.plan = plan_ownership(specs, self.comm.world_size, self.config.placement)
        self.owner = {p: self.plan.owner[self.name_of(p)] for p in self.galore_params}
        # Dense parameters: greedy by size, ZeRO-1 style (each one's moments live on one rank).
        load = [0] * self.comm.world_size
        for p in sorted(self.dense_params, key=lambda q: (-q.numel(), self._tensor_ids[q])):
            r = min(range(self.comm.world_size), key=lambda k: (load[k], k))
            self.owner[p] = r
            load[r] += p.numel()

    def _build_overlap(self) -> tuple[OverlappedReduce, OverlappedReduce | None]:
        """``overlap_comm``: the low-rank reduce (planned before each backward, in
        ``_arm_grad_sinks``) and, when this optimizer manages them, the dense one: planned once,
        each dense parameter reporting from a post-accumulate-grad hook."""
        def set_lowrank_none(p):
            int8_layer_of(p).lowrank_grad = None

        def set_grad_none(p):
            p.grad = None

        common = dict(dtype=self._payload_dtype, bucket_bytes=self._bucket_bytes)
        lowrank = OverlappedReduce(self.comm, kind="lowrank_reduce", local_grad=lambda p: int8_layer_of(p).lowrank_grad,
                                   drop_grad=set_lowrank_none, **common)
        if not self.manage_dense:
            return lowrank, None
        dense = OverlappedReduce(self.comm, kind="dense", local_grad=lambda p: p.grad, drop_grad=set_grad_none,
                                 **common)
        hooked = [p for p in self.dense_params if p.requires_grad]
        dense.plan([(p, self.owner[p], p.shape) for p in hooked[::-1]])
        for p in hooked:
            p.register_post_accumulate_grad_hook(dense.ready)
        return lowrank, dense

    def _arm_grad_sinks(self) -> None:
        """Before each backward: INT8 layers whose projector refreshes at the coming step keep
        the full gradient, all others project at once (low-rank accumulation) -- and, with
        ``overlap_comm``, report to the overlapped reduce, planned here for the coming step."""
        steady = []
        for p in self.galore_params:
            layer = int8_layer_of(p)
            if layer is None:
                continue
            proj = self.state[p]["projector"]
            if proj.schedule.is_due(self.state[p].get("step", 0), proj.has_matrix()):
                layer.grad_sink = accumulate_full_grad
            elif self._overlap is None:
                layer.grad_sink = lowrank_sink(proj.project)
            else:
                layer.grad_sink = self._reporting_sink(p, lowrank_sink(proj.project))
                steady.append((p, self.owner[p], torch.Size(proj.lowrank_shape)))
        if self._overlap is not None:
            self._overlap.plan(steady[::-1])  # backward meets the last layers first

    def _reporting_sink(self, p: torch.Tensor, accumulate):
        overlap = self._overlap

        def sink(layer, weight_grad: torch.Tensor) -> None:
            accumulate(layer, weight_grad)
            overlap.ready(p)
        return sink

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside accumulate gradients locally without any exchange (DDP's
        ``no_sync``): use it on all but the last micro-batch with ``overlap_comm``.  Without
        ``overlap_comm`` nothing is exchanged before ``step()`` anyway, and this does nothing."""
        reducers = self._reducers()
        for reducer in reducers:
            reducer.sync = False
        try:
            yield
        finally:
            for reducer in reducers:
                reducer.sync = True

    def _reducers(self) -> list[OverlappedReduce]:
        return [r for r in (self._overlap, self._overlap_dense) if r is not None]

    # ----------------------------------------------------------------- gradients
    @staticmethod
    def _local_grad(p: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """("lowrank" | "full", tensor) of this rank's accumulated gradient, or None."""
        layer = int8_layer_of(p)
        if layer is None:
            return None if p.grad is None else ("full", p.grad)
        if layer.lowrank_grad is not None:
            return "lowrank", layer.lowrank_grad
        return None if layer.weight_grad is None else ("full", layer.weight_grad)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for reducer in self._reducers():
            reducer.reset()
        for p in self.galore_params:
            layer = int8_layer_of(p)
            if layer is not None:
                layer.weight_grad = None
                layer.lowrank_grad = None

    def _agree_on_gradients(self, params: list[torch.Tensor], extra_finite: bool = True) -> tuple[bool, list[torch.Tensor]]:
        """(all ranks finite, params that have a gradient) -- identical on every rank."""
        grads = [self._local_grad(p) for p in params]
        finite = extra_finite and all(bool(torch.isfinite(g[1]).all()) for g in grads if g is not None)
        reported = set()
        for reducer in self._reducers():  # those gradients already left (see _begin_step)
            finite = finite and reducer.local_finite()
            reported |= reducer.reported
        has = torch.tensor([1.0 if g is not None or p in reported else 0.0 for p, g in zip(params, grads)])
        flags = torch.cat([torch.tensor([1.0 if finite else 0.0]), has, -has])
        self.comm.all_reduce_min(flags)
        lo, hi = flags[1:1 + len(params)], -flags[1 + len(params):]
        if not torch.equal(lo, hi):
            bad = [self.name_of(p) for p, a, b in zip(params, lo, hi) if a != b]
            raise ValueError(f"parameters {bad[:5]} have a gradient on some ranks and not on others")
        return bool(flags[0] > 0), [p for p, h in zip(params, hi) if h > 0]

    def refresh_plan(self) -> list[str]:
        """Names of the GaLore matrices whose projector refreshes in the next ``step()``."""
        return [self.name_of(p) for p in self.galore_params
                if self.state[p]["projector"].schedule.is_due(self.state[p].get("step", 0),
                                                              self.state[p]["projector"].has_matrix())]

    def replicated_tensors(self) -> Iterable[tuple[str, torch.Tensor]]:
        """Every tensor that must be bit-identical on all ranks (DESIGN invariant I1)."""
        for p in self.galore_params:
            name, layer = self.name_of(p), int8_layer_of(p)
            if layer is not None:
                yield f"{name}.codes", layer.weight
                yield f"{name}.scales", layer.weight_scales
                yield f"{name}.zeros", layer.weight_zeros
            else:
                yield name, p
            proj = self.state[p]["projector"]
            if proj.has_matrix():
                for key, t in proj.to_payload().items():
                    yield f"{name}.{key}", t
        for p in self.dense_params:
            yield self.name_of(p), p

    def check_replicas(self) -> int:
        """Raise ``ReplicaMismatchError`` (on every rank) naming the first replicated tensor
        that differs between ranks; returns the number of tensors checked."""
        return check_replicas(self.comm, self.replicated_tensors())

    @property
    def comm_residual_bytes(self) -> int:
        """Memory held by the error-feedback residuals of payload compression on this rank."""
        residuals = [*self.comm_residuals.values(), *self.update_residuals.values()]
        return sum(t.numel() * t.element_size() for t in residuals)

    @property
    def overlap(self) -> OverlappedReduce | None:
        """The low-rank reduce overlapped with backward (``overlap_comm``), or None."""
        return self._overlap

    @property
    def dense_overlap(self) -> OverlappedReduce | None:
        """The dense-gradient reduce overlapped with backward (``overlap_comm`` where this
        optimizer manages dense parameters), or None."""
        return self._overlap_dense

    def lowrank_grad_bytes(self) -> int:
        """Bytes of low-rank gradients this rank holds now: the layers' local accumulators plus,
        with ``overlap_comm``, the owned reduced sums and the buffers still in flight."""
        local = [layer.lowrank_grad for layer in map(int8_layer_of, self.galore_params)
                 if layer is not None and layer.lowrank_grad is not None]
        held = self._overlap.held_bytes() if self._overlap is not None else 0
        return sum(t.numel() * t.element_size() for t in local) + held

    @property
    def svd_count(self) -> int:
        return sum(self.state[p]["projector"].schedule.svd_count for p in self.galore_params)

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None, *, extra_grad_sq: float | torch.Tensor = 0.0, extra_finite: bool = True):
        """One optimizer step.  An engine that owns other gradients (DeepSpeed's dense
        partitions) passes this rank's share of their squared norm (``extra_grad_sq``, summed
        over ranks into the clipped global norm) and whether they are finite on this rank;
        it then applies its own update only if ``last_step_applied``, scaled by
        ``last_clip_coef``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        present = self._begin_step(extra_finite)
        if present is not None:
            self._update(*present, extra_grad_sq=extra_grad_sq)
        for reducer in self._reducers():
            reducer.reset()
        self._arm_grad_sinks()
        self._end_step()
        self.steps_taken += 1
        return loss

    def _begin_step(self, extra_finite: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """Collective.  Every rank agrees whether all gradients are finite; returns the GaLore
        and dense parameters that have gradients, or None when the step is skipped."""
        self.svds_last_step = 0
        self.comm.step_index = self.steps_taken
        managed = self.galore_params + (self.dense_params if self.manage_dense else [])
        for reducer in self._reducers():  # the rest of the overlapped reduces, before any other collective
            reducer.flush()
        finite, with_grad = self._agree_on_gradients(managed, extra_finite)
        self.last_clip_coef = 1.0
        self.last_step_applied = finite and bool(with_grad)
        if not finite:
            self.skipped_steps += 1
            logger.warning("%s: non-finite gradient, step skipped (%d skipped so far)",
                           type(self).__name__, self.skipped_steps)
            return None
        has = set(with_grad)
        return [p for p in self.galore_params if p in has], [p for p in self.dense_params if p in has]

    def _update(self, galore: list[torch.Tensor], dense: list[torch.Tensor], *, extra_grad_sq=0.0) -> None:
        """Exchange, clip and apply one step's gradients (the data-parallel layout)."""
        lowrank_avg = self._reduce_galore(galore)
        dense_avg = self._reduce_dense(dense)
        coef = self._clip_coef({**lowrank_avg, **dense_avg}, extra_grad_sq)
        self._update_galore(galore, lowrank_avg, coef)
        self._update_dense(dense, dense_avg, coef)

    def _end_step(self) -> None:
        traffic = self.comm.meter.end_step()
        if self.comm.world_size > 1:
            logger.debug("step %d: %d SVDs, comm bytes %s", self.steps_taken, self.svds_last_step,
                         {k: v["bytes"] for k, v in traffic.items() if v["calls"]})

    def _clip_coef(self, owned_grads: dict[torch.Tensor, torch.Tensor], extra_grad_sq) -> float:
        """Global gradient norm (see ``QGaLoreConfig.max_grad_norm``) from the averaged
        gradients each owner holds; returns the factor every rank applies (1.0: no clipping)."""
        self.last_grad_norm = None
        if self.config.max_grad_norm <= 0:
            return 1.0
        total = torch.zeros(1, dtype=torch.float64)
        for p, grad in owned_grads.items():
            if self.owner[p] == self.comm.rank:
                total += grad.double().square().sum()
        total += torch.as_tensor(extra_grad_sq, dtype=torch.float64).reshape(1)
        self.comm.all_reduce_sum(total, "control")
        self.last_grad_norm = float(total.sqrt())
        # torch.nn.utils.clip_grad_norm_'s rule (eps 1e-6), so an engine's dense clipping agrees.
        self.last_clip_coef = min(1.0, self.config.max_grad_norm / (self.last_grad_norm + 1e-6))
        return self.last_clip_coef

    def _is_refreshing(self, p: torch.Tensor) -> bool:
        proj = self.state[p]["projector"]
        return proj.schedule.is_due(self.state[p].get("step", 0), proj.has_matrix())

    def _reduce_galore(self, params: list[torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
        """Averaged low-rank gradients on their owners (refreshing layers: after the SVD)."""
        refreshing = [p for p in params if self._is_refreshing(p)]
        not_steady = set(refreshing) | (self._overlap.members if self._overlap is not None else set())
        steady = [p for p in params if p not in not_steady]
        lowrank_items = []
        for p in steady:
            kind, grad = self._local_grad(p)
            lowrank_items.append((p, self.owner[p], grad if kind == "lowrank" else self.state[p]["projector"].project(grad)))
        if self.config.compress_lowrank and self.comm.world_size > 1:
            lowrank_avg = reduce_to_owners_compressed(self.comm, lowrank_items, "lowrank_reduce", self.comm_residuals,
                                                      bucket_bytes=self._bucket_bytes)
        else:
            lowrank_avg = reduce_to_owners(self.comm, lowrank_items, "lowrank_reduce", dtype=self._payload_dtype,
                                           bucket_bytes=self._bucket_bytes)
        if self._overlap is not None:
            lowrank_avg.update(self._overlap.collect(params))
        lowrank_avg.update(self._refresh(refreshing))
        return lowrank_avg

    def _update_galore(self, params: list[torch.Tensor], lowrank_avg: dict, coef: float) -> None:
        """Owners run Adam on their averaged low-rank gradients; the directions reach every rank
        one bucket (``bucket_cap_mb``) at a time and are applied as they arrive, so at most one
        bucket of directions is alive -- not one low-rank tensor per matrix on every rank."""
        compressed = self.config.compress_lowrank and self.comm.world_size > 1
        itemsize = 4 if compressed else self._payload_dtype.itemsize
        sized = [(p, self.owner[p], torch.Size(self.state[p]["projector"].lowrank_shape)) for p in params]
        for bucket in pack_buckets(sized, self._bucket_bytes, lambda shape: itemsize):
            directions = [(p, owner, self._direction(p, lowrank_avg, coef)) for p, owner, _ in bucket]
            if compressed:
                received = broadcast_from_owners_compressed(self.comm, directions, "update_gather", self.update_residuals)
            else:
                received = broadcast_from_owners(self.comm, directions, "update_gather")
            for p, direction in received.items():
                self._apply_galore(p, direction.to(torch.float32))

    def _direction(self, p: torch.Tensor, lowrank_avg: dict, coef: float) -> torch.Tensor:
        """Advance ``p``'s step; on its owner, the Adam direction in the payload dtype (every
        rank, the owner included, applies that value, so replicas stay equal); elsewhere an
        empty receive buffer of the same shape."""
        state = self.state[p]
        state["step"] = state.get("step", 0) + 1
        if self.owner[p] != self.comm.rank:
            return torch.empty(state["projector"].lowrank_shape, device=p.device, dtype=self._payload_dtype)
        grad = lowrank_avg[p] if coef == 1.0 else lowrank_avg[p] * coef
        return self._adam(state, grad, self._group_of[p]).to(self._payload_dtype)

    def _refresh(self, params: list[torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
        """Owners run the SVD on the averaged full gradient and broadcast the new projector
        and schedule; returns the owner's averaged low-rank gradients."""
        cfg, rank, lowrank = self.config, self.comm.rank, {}
        payloads = []
        for p in params:
            state, owner = self.state[p], self.owner[p]
            proj: Projector = state["projector"]
            grad = self.comm.reduce_mean_to(self._local_grad(p)[1].clone(), owner, "full_grad_reduce")
            if owner == rank:
                key = StreamKey(cfg.seed, state.get("step", 0), self._stream_ids[p])
                proj.refresh(grad, step=key[1], method=cfg.svd_method, oversample=cfg.svd_oversample,
                             power_iters=cfg.svd_power_iters, key=key)
                lowrank[p] = proj.project(grad)
                payload = proj.to_payload()
            else:
                payload = proj.payload_template(p.device)
            payloads += [((p, k), owner, t) for k, t in payload.items()]
        received = broadcast_from_owners(self.comm, payloads, "proj_broadcast", bucket_bytes=self._bucket_bytes)
        for p in params:
            self.state[p]["projector"].load_payload({k: t for (q, k), t in received.items() if q is p})
        self.svds_last_step = len(params)
        return lowrank

    def _adam(self, state: dict, grad: torch.Tensor, group: dict) -> torch.Tensor:
        """Advance the moments in ``state`` with ``grad``; returns the Adam direction."""
        if "exp_avg" not in state:
            state["exp_avg"] = self.codec.zeros(grad.shape, grad.device, signed=True)
            state["exp_avg_sq"] = self.codec.zeros(grad.shape, grad.device, signed=False)
        direction, state["exp_avg"], state["exp_avg_sq"] = lowrank_adam_update(
            grad, state["exp_avg"], state["exp_avg_sq"], self.codec, betas=group["betas"], eps=group["eps"])
        return direction

    def _apply_galore(self, p: torch.Tensor, direction: torch.Tensor) -> None:
        state, group = self.state[p], self._group_of[p]
        step = state["step"]
        step_size = adam_step_size(group["lr"], group["betas"], step)
        delta = state["projector"].project_back(direction)
        layer = int8_layer_of(p)
        if layer is not None:  # dequantize, update, decay, requantize: one fused pass on GPU
            key = StreamKey(self.config.seed, step - 1, self._stream_ids[p])
            decay = group["lr"] * group["weight_decay"] if group["weight_decay"] > 0 else 0.0
            layer.apply_update_(delta, step_size=step_size, decay=decay,
                                stochastic_key=key if self.config.stochastic_round else None)
            return
        p.add_(delta.to(p.dtype), alpha=-step_size)
        if group["weight_decay"] > 0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    def _reduce_dense(self, params: list[torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
        """Averaged dense gradients on their owners (ZeRO-1 style)."""
        if self._overlap_dense is not None:  # reduced during backward
            return self._overlap_dense.collect(params)
        if self.config.compress_dense and self.comm.world_size > 1:
            return reduce_to_owners_compressed(self.comm, [(p, self.owner[p], p.grad) for p in params], "dense",
                                               self.comm_residuals, bucket_bytes=self._bucket_bytes)
        return reduce_to_owners(self.comm, [(p, self.owner[p], p.grad) for p in params], "dense",
                                dtype=self._payload_dtype, bucket_bytes=self._bucket_bytes)

    def _update_dense(self, params: list[torch.Tensor], grads: dict, coef: float) -> None:
        if self.config.compress_dense and self.comm.world_size > 1:
            self._update_dense_compressed(params, grads, coef)
            return
        rank = self.comm.rank
        for p in params:
            state, group = self.state[p], self._group_of[p]
            state["step"] = state.get("step", 0) + 1
            if self.owner[p] != rank:
                continue
            grad = grads[p] if coef == 1.0 else grads[p] * coef
            direction = self._adam(state, grad, group)
            p.add_(direction.to(p.dtype), alpha=-adam_step_size(group["lr"], group["betas"], state["step"]))
            if group["weight_decay"] > 0:
                p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        if self.comm.world_size > 1:
            for p, value in broadcast_from_owners(self.comm, [(p, self.owner[p], p.data) for p in params], "dense",
                                                  bucket_bytes=self._bucket_bytes).items():
                p.data.copy_(value)

    def _update_dense_compressed(self, params: list[torch.Tensor], grads: dict, coef: float) -> None:
        """``compress_dense``: owners' Adam directions reach every rank as 8-bit codes with the
        owner's error feedback, one bucket at a time; every rank applies the decoded direction
        and the decay itself (no parameter broadcast, replicas stay bit-identical)."""
        rank = self.comm.rank
        sized = [(p, self.owner[p], p) for p in params]
        for bucket in pack_buckets(sized, self._bucket_bytes, lambda t: 4):
            directions = []
            for p, owner, _ in bucket:
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                if owner == rank:
                    grad = grads[p] if coef == 1.0 else grads[p] * coef
                    directions.append((p, owner, self._adam(state, grad, self._group_of[p])))
                else:
                    directions.append((p, owner, torch.empty(p.shape, dtype=torch.float32, device=p.device)))
            received = broadcast_from_owners_compressed(self.comm, directions, "dense", self.update_residuals)
            for p, direction in received.items():
                group = self._group_of[p]
                p.add_(direction.to(p.dtype), alpha=-adam_step_size(group["lr"], group["betas"], self.state[p]["step"]))
                if group["weight_decay"] > 0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    # ----------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict:
        """Tensors, numbers, strings and lists only: loads with ``torch.load(weights_only=True)``."""
        index = self._tensor_ids
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[p] for p in g["params"]]}
                  for g in self.param_groups]
        state = {index[p]: self._flatten_state(s) for p, s in self.state.items() if s}
        return {"state": state, "param_groups": groups, "skipped_steps": self.skipped_steps,
                "config": self.config.to_dict()}

    @staticmethod
    def _flatten_state(s: dict) -> dict:
        out: dict[str, Any] = {}
        if "step" in s:
            out["step"] = s["step"]
        for name in ("exp_avg", "exp_avg_sq"):
            if name in s:
                for f in _MOMENT_FIELDS:
                    if getattr(s[name], f) is not None:
                        out[f"{name}.{f}"] = getattr(s[name], f)
        if "projector" in s:
            out.update({f"projector.{k}": v for k, v in s["projector"].state_dict().items()})
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(saved_groups, self.param_groups)):
            raise ValueError("optimizer state_dict does not match this optimizer's parameter groups")
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
            group["betas"] = tuple(group["betas"])
        for p, i in self._tensor_ids.items():
            flat = state_dict["state"].get(i, state_dict["state"].get(str(i)))
            if flat is not None:
                self._load_param_state(p, flat)
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self._arm_grad_sinks()

    def _load_param_state(self, p: torch.Tensor, flat: dict) -> None:
        state = self.state[p]
        if "step" in flat:
            state["step"] = int(flat["step"])
        for name in ("exp_avg", "exp_avg_sq"):
            fields = {f: flat[f"{name}.{f}"].to(p.device) for f in _MOMENT_FIELDS if f"{name}.{f}" in flat}
            if fields:
                state[name] = Moment(**fields)
        proj_state = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("projector.")}
        if proj_state:
            if "projector" not in state:
                raise ValueError(f"{self.name_of(p)}: checkpoint has a projector but this parameter is not a GaLore matrix")
            state["projector"].load_state_dict(proj_state)
