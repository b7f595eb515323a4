"""``QGaLoreAdamW8bit``: Q-GaLore as a ``torch.optim.Optimizer``, single process or data parallel.

GaLore parameters (the ``uint8`` weights of :class:`~qgalore_dist.core.Int8Linear` layers, and
any 2-D float parameter in a group marked ``galore=True`` or carrying the reference's ``rank``
key) are updated with :mod:`qgalore_dist.core.adam`'s one rule on the projected gradient
``R = project(G)``; dense parameters with the same AdamW formula.  ``step()`` reads as its
phases (agree, refresh, reduce, clip, update, apply); the collectives are in
:mod:`qgalore_dist.distributed` (at world size 1 each is the identity: single process is not a
separate path), and where each weight's rows live is the :mod:`.layout` the optimizer is given.
docs/architecture.md walks through one step with the names used here.

A step whose gradients contain NaN/Inf on any rank is skipped on all ranks (weights and state
untouched) and counted in ``skipped_steps``.  ``state_dict()`` holds only tensors and numbers.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any, Iterable

import torch

from ..core import (
    Projector,
    RefreshSchedule,
    advance_moments,
    apply_direction_,
    int8_layer_of,
    weight_step,
)
from ..distributed import (
    Collectives,
    MatrixSpec,
    OverlappedReduce,
    OwnedTensor,
    broadcast_from_owners,
    pack_buckets,
    plan_ownership,
    reduce_to_owners,
)
from ..distributed.replicas import agree_on_gradients, check_replicas, validate_agreement
from ..quant import BlockwiseCodec, StreamKey
from .backward import BackwardReduces
from .config import QGaLoreConfig, _is_int
from .layout import ReplicatedLayout, WeightLayout
from .refresh import EarlyRefreshes, RefreshError, refresh_owned, share_projectors, share_row_lowrank
from .state import flatten_param_state, load_param_state, replicated_tensors

__all__ = ["QGaLoreAdamW8bit", "RefreshError"]

logger = logging.getLogger(__name__)


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
        manage_dense: False when an engine (DeepSpeed) owns and updates the dense parameters.
        layout: where each weight's rows live (:mod:`.layout`); default every rank holds all
            of them (:class:`~.layout.ReplicatedLayout`); FSDP2 passes its row-sharded layout.
        gradient_accumulation_steps: backward passes per ``step()`` when known (see
            :meth:`set_gradient_accumulation_steps`).
    """

    def __init__(self, params: Iterable, config: QGaLoreConfig | None = None, *,
                 names: dict[torch.Tensor, str] | None = None, collectives: Collectives | None = None,
                 manage_dense: bool = True, layout: WeightLayout | None = None,
                 gradient_accumulation_steps: int | None = None, **overrides: Any) -> None:
        cfg = config or QGaLoreConfig()
        if overrides:
            cfg = QGaLoreConfig.from_dict({**cfg.to_dict(), **overrides})
        self.config = cfg
        super().__init__(params, dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay))
        self.comm = collectives or Collectives()
        self.layout: WeightLayout = layout or ReplicatedLayout(self.comm)
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
        self.reduces = BackwardReduces.build(
            self.comm, overlap_comm=cfg.overlap_comm, stream_refresh=cfg.stream_refresh, dtype=self._payload_dtype,
            bucket_bytes=self._bucket_bytes, row_groups=self.layout.backward_row_groups(),
            # dense_local: the engine (fully_shard) reduces dense gradients itself
            dense_owned=[(p, self.owner[p]) for p in self.dense_params]
            if manage_dense and not self.layout.dense_local else None)
        self.early = EarlyRefreshes()
        self.set_gradient_accumulation_steps(gradient_accumulation_steps)  # arms the gradient sinks

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
            dp_rank = min(range(self.comm.world_size), key=lambda k: (load[k], k))
            self.owner[p] = dp_rank
            load[dp_rank] += p.numel()

    def arm_grad_sinks(self) -> None:
        """Before each backward (and after loading state): every INT8 layer's gradient sink and
        the backward reduces' plans for the coming step (:meth:`.backward.BackwardReduces.arm`)."""
        self.reduces.arm(self.galore_params, refresh_due=self._refresh_due, owner=self.owner,
                         projector=lambda p: self.state[p]["projector"], row_reduced=self.row_reduced,
                         row_ranges=self.layout.row_ranges if self.reduces.rows is not None else None)

    def set_gradient_accumulation_steps(self, steps: int | None) -> None:
        """Backward passes per ``step()`` (None: not known, the default).  When known, a refresh
        step's owner runs each streamed matrix's SVD as soon as the last pass completes its averaged
        full gradient and frees it then, not at ``step()`` (one process too); a further pass raises
        ``ValueError``.  Call it before a backward, not between a backward and its ``step()``."""
        if steps is not None and (not _is_int(steps) or steps < 1):
            raise ValueError(f"gradient_accumulation_steps must be None or an int >= 1, got {steps!r}")
        if self.reduces.full is not None:
            self.reduces.full.passes_per_step = steps
            self.reduces.full.on_complete = self._refresh_completed
        self.arm_grad_sinks()  # one process streams its refreshing gradients only when this is known

    def _refresh_completed(self, p: torch.Tensor, full: torch.Tensor) -> None:  # owner, during backward
        self.early.add(refresh_owned({p: self.state[p]["projector"]}, {p: full}, {p: self._stream_key(p)},
                                     self.config, names=self._names))

    def no_sync(self):
        """Context manager: backward passes inside accumulate gradients locally without any
        exchange (DDP's ``no_sync``): use it on all but the last micro-batch with
        ``overlap_comm`` or ``stream_refresh``; otherwise nothing is exchanged before ``step()``."""
        return self.reduces.no_sync()

    def _reducers(self) -> list[OverlappedReduce]:
        return self.reduces.all()

    # ----------------------------------------------------------------- gradients
    def _local_grad(self, p: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """("lowrank" | "full", tensor) of this rank's accumulated gradient, or None."""
        layer = int8_layer_of(p)
        if layer is None:
            return None if p.grad is None else ("full", self.layout.local(p.grad))
        if layer.lowrank_grad is not None:
            return "lowrank", layer.lowrank_grad
        return None if layer.weight_grad is None else ("full", layer.weight_grad)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self.early.undo(lambda p: self.state[p]["projector"])
        for reducer in self._reducers():
            reducer.reset()
        for p in self.galore_params:
            layer = int8_layer_of(p)
            if layer is not None:
                layer.weight_grad = None
                layer.lowrank_grad = None

    def _agree_on_gradients(self, params: list[torch.Tensor],
                            extra_finite: bool = True) -> tuple[bool, list[torch.Tensor]]:
        """(all ranks finite, params that have a gradient) -- identical on every rank."""
        grads = [self._local_grad(p) for p in params]
        finite = extra_finite and all(bool(torch.isfinite(g[1]).all()) for g in grads if g is not None)
        reported = set()
        for reducer in self._reducers():  # those gradients already left (see _agree)
            finite = finite and reducer.local_finite()
            reported |= reducer.reported
        finite, has = agree_on_gradients(self.comm, [self.name_of(p) for p in params],
                                         [g is not None or p in reported for p, g in zip(params, grads)], finite)
        return finite, [p for p, h in zip(params, has) if h]

    def _refresh_due(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s projector refreshes at its coming step (the one place that asks)."""
        proj = self.state[p]["projector"]
        return proj.schedule.is_due(self.state[p].get("step", 0), proj.has_matrix())

    def refresh_plan(self) -> list[str]:
        """Names of the GaLore matrices whose projector refreshes in the next ``step()``."""
        return [self.name_of(p) for p in self.galore_params if self._refresh_due(p)]

    def replicated_tensors(self) -> Iterable[tuple[str, torch.Tensor]]:
        """Every tensor that must be bit-identical on all ranks (DESIGN invariant I1): INT8
        weights and dense parameters where they are replicated, and every projector."""
        galore = [(self.name_of(p), p, self.state[p]["projector"]) for p in self.galore_params]
        dense = [(self.name_of(p), p) for p in self.dense_params]
        return replicated_tensors(galore, dense, self.layout)

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
        return self.reduces.lowrank

    @property
    def dense_overlap(self) -> OverlappedReduce | None:
        """The dense-gradient reduce overlapped with backward (``overlap_comm``), or None."""
        return self.reduces.dense

    def lowrank_grad_bytes(self) -> int:
        """Bytes of low-rank gradients this rank holds now: the layers' local accumulators plus,
        with ``overlap_comm``, the owned reduced sums (and received rows) and the buffers still in flight."""
        local = [layer.lowrank_grad for layer in map(int8_layer_of, self.galore_params)
                 if layer is not None and layer.lowrank_grad is not None]
        held = sum(r.held_bytes() for r in (self.reduces.lowrank, self.reduces.rows) if r is not None)
        return sum(t.numel() * t.element_size() for t in local) + held

    @property
    def svd_count(self) -> int:
        return sum(self.state[p]["projector"].schedule.svd_count for p in self.galore_params)

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None, *, extra_grad_sq: float | torch.Tensor = 0.0, extra_finite: bool = True):
        """One optimizer step, in phases: agree (finite? which gradients?), refresh (owners'
        SVDs, INT4 projectors to every rank), reduce (low-rank and dense gradients to their
        owners or row shards), clip (one global norm), update (Adam on owners / shards) and
        apply (every rank writes its rows).  An engine that owns other gradients (DeepSpeed's
        dense partitions) passes this rank's share of their squared norm (``extra_grad_sq``,
        summed over ranks into the clipped global norm) and whether they are finite on this
        rank; it then applies its own update only if ``last_step_applied``, scaled by
        ``last_clip_coef``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        present = self._agree(extra_finite)
        if present is not None:
            galore, dense = present
            assert not extra_grad_sq or not self.layout.dense_local, "FSDP2 owns no gradients outside this optimizer"
            refreshing = [p for p in galore if p in self.early or self._refresh_due(p)]
            lowrank = self._refresh(refreshing)
            lowrank.update(self._reduce_lowrank(galore, refreshing=set(refreshing)))
            dense_grads = self._reduce_dense(dense)
            coef = self._clip(lowrank, dense_grads, extra_grad_sq)
            self._update(galore, lowrank, coef)
            self._update_dense(dense, dense_grads, coef)
        self._finish_step()
        return loss

    def _agree(self, extra_finite: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """Collective.  Every rank agrees whether all gradients are finite; returns the GaLore
        and dense parameters that have gradients, or None when the step is skipped."""
        self.svds_last_step = 0
        for comm in self._collectives():
            comm.step_index = self.steps_taken
        managed = self.galore_params + (self.dense_params if self.manage_dense else [])
        for reducer in self._reducers():  # the rest of the overlapped reduces, before any other collective
            reducer.flush()
        finite, with_grad = self._agree_on_gradients(managed, extra_finite)
        self.last_clip_coef = 1.0
        self.last_step_applied = finite and bool(with_grad)
        if not finite:
            self.early.undo(lambda p: self.state[p]["projector"])
            self.skipped_steps += 1
            logger.warning("%s: non-finite gradient, step skipped (%d skipped so far)",
                           type(self).__name__, self.skipped_steps)
            return None
        has = set(with_grad)
        return [p for p in self.galore_params if p in has], [p for p in self.dense_params if p in has]

    def _finish_step(self) -> None:
        for reducer in self._reducers():
            reducer.reset()
        self.arm_grad_sinks()
        for comm in self._collectives():
            comm.meter.end_step()
        if self.comm.world_size > 1:
            logger.debug("step %d: %d SVDs, comm bytes %s", self.steps_taken, self.svds_last_step,
                         {k: v["bytes"] for k, v in self.comm.meter.last_step.items() if v["calls"]})
        self.steps_taken += 1

    def _collectives(self) -> list[Collectives]:
        """This optimizer's process groups, each once (the world, and the layout's)."""
        return list({id(c): c for c in (self.comm, *self.layout.collectives())}.values())

    def last_step_bytes(self) -> dict[str, float]:
        """Bytes this rank sent in the last step by kind, over all its groups (HSDP's meter apart)."""
        out: dict[str, float] = {}
        for comm in self._collectives():
            for kind, v in comm.meter.last_step.items():
                out[kind] = out.get(kind, 0.0) + float(v["bytes"])
        return out

    # --- refresh
    def _refresh(self, params: list[torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
        """Owners run the SVD on the averaged full gradient of each refreshing matrix; every
        rank receives the new INT4 projectors and schedules.  Returns averaged low-rank
        gradients under the new projectors: on owners, for owner-reduced matrices; with
        ``stream_refresh``, also this rank's rows of row-reduced ones (the owner projects the
        averaged gradient and every rank takes its rows).  If an SVD fails anywhere, every rank
        raises :class:`RefreshError` here, with every projector as before the step."""
        full = self._averaged_full_grads(params)
        keys = {p: self._stream_key(p) for p in full}
        lowrank, snapshots, failed = refresh_owned({p: self.state[p]["projector"] for p in full}, full, keys,
                                                   self.config, names=self._names)
        for mine, early in zip((lowrank, snapshots, failed), self.early.take()):  # refreshed during backward
            mine.update(early)
        bad = share_projectors(self.comm, [(p, self.owner[p], self.state[p]["projector"], p.device) for p in params],
                               failed, bucket_bytes=self._bucket_bytes)
        if bad:
            for p, snapshot in snapshots.items():
                self.state[p]["projector"].load_state_dict(snapshot)
            self.skipped_steps += 1
            self._finish_step()
            raise RefreshError.naming([f"{self.name_of(p)} (owner rank {self.owner[p]})" for p in bad],
                                      self.steps_taken - 1)
        if self.reduces.full is not None and params:
            rows = [(p, self.owner[p], self.state[p]["projector"].lowrank_shape, self.layout.rows(p))
                    for p in params if self.row_reduced(p) and p in self.reduces.streamed]
            lowrank.update(share_row_lowrank(self.comm, rows, lowrank, device=params[0].device,
                                             bucket_bytes=self._bucket_bytes))
        self.svds_last_step = len(params)
        return lowrank

    def _stream_key(self, p: torch.Tensor, step: int | None = None) -> StreamKey:
        """Key of ``p``'s random streams at ``step`` (default: its coming step); the same on every rank."""
        return StreamKey(self.config.seed, self.state[p].get("step", 0) if step is None else step, self._stream_ids[p])

    def _averaged_full_grads(self, params: list[torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
        """``{p: full gradient averaged over ranks}`` for the refreshing ``params`` this rank
        owns: streamed ones were reduced during backward; the rest are reduced now, one by one."""
        streamed = self.reduces.streamed
        out = self.reduces.full.collect(params) if self.reduces.full is not None else {}
        for p in params:
            if p not in streamed:
                grad = self.comm.reduce_mean_to(self._local_grad(p)[1].clone(), self.owner[p], "full_grad_reduce")
                if self.owner[p] == self.comm.rank:
                    out[p] = grad
        return out

    # --- reduce
    def row_reduced(self, p: torch.Tensor) -> bool:
        """Whether GaLore matrix ``p``'s low-rank gradient, moments and update live as this
        rank's rows (row-sharded layouts, right projection) rather than on its owner."""
        return self.layout.row_reduced(self.state[p]["projector"].side)

    def _lowrank_local(self, p: torch.Tensor) -> torch.Tensor:
        """This rank's low-rank gradient of ``p`` (projected now if backward kept it full)."""
        kind, grad = self._local_grad(p)
        return grad if kind == "lowrank" else self.state[p]["projector"].project(grad)

    def _reduce_lowrank(self, params: list[torch.Tensor], *, refreshing: set) -> dict[torch.Tensor, torch.Tensor]:
        """Averaged low-rank gradients: row ranges on every rank (row-sharded layouts), the
        rest on their owners.  Owner-reduced ``refreshing`` matrices, and streamed row-reduced
        ones, have theirs from the refresh; other row-reduced refreshing ones project their
        own full gradient with the new P.  ``overlap_comm`` ones were reduced during backward."""
        rows = [p for p in params if self.row_reduced(p) and p not in self.reduces.streamed
                and p not in self.reduces.overlapped]
        skip = set(rows) | refreshing | self.reduces.overlapped
        owned = [p for p in params if p not in skip]
        out = {}
        if rows:
            out.update(self.layout.reduce_rows([(p, self._lowrank_local(p)) for p in rows],
                                               dtype=self._payload_dtype, bucket_bytes=self._bucket_bytes))
        residuals = self.comm_residuals if self.config.compress_lowrank else None
        out.update(reduce_to_owners(self.comm, [OwnedTensor(p, self.owner[p], self._lowrank_local(p)) for p in owned],
                                    "lowrank_reduce", dtype=self._payload_dtype, bucket_bytes=self._bucket_bytes,
                                    residuals=residuals))
        for reducer in (self.reduces.lowrank, self.reduces.rows):
            if reducer is not None:
                out.update(reducer.collect(params))
        return out

    def _reduce_dense(self, params: list[torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
        """Averaged dense gradients on their owners (ZeRO-1 style), or the engine's local shards."""
        if self.layout.dense_local:  # fully_shard already averaged them
            return {p: self.layout.local(p.grad) for p in params}
        if self.reduces.dense is not None:  # reduced during backward
            return self.reduces.dense.collect(params)
        residuals = self.comm_residuals if self.config.compress_dense else None
        return reduce_to_owners(self.comm, [OwnedTensor(p, self.owner[p], p.grad) for p in params], "dense",
                                dtype=self._payload_dtype, bucket_bytes=self._bucket_bytes, residuals=residuals)

    # --- clip
    def _clip(self, lowrank: dict, dense: dict, extra_grad_sq) -> float:
        """Global gradient norm (see ``QGaLoreConfig.max_grad_norm``) from the averaged
        gradients each rank holds: an owner counts what it owns, a row shard its rows (once
        over its replicas); returns the factor every rank applies (1.0: no clipping)."""
        self.last_grad_norm = None
        if self.config.max_grad_norm <= 0:
            return 1.0
        total = torch.zeros(1, dtype=torch.float64)
        for p, grad in [*lowrank.items(), *dense.items()]:
            shared = self.row_reduced(p) if p in lowrank else self.layout.dense_local
            if shared:
                total += grad.double().square().sum() / self.layout.replicas
            elif self.owner[p] == self.comm.rank:
                total += grad.double().square().sum()
        total += torch.as_tensor(extra_grad_sq, dtype=torch.float64).reshape(1)
        self.comm.all_reduce_sum(total, "control")
        self.last_grad_norm = float(total.sqrt())
        # torch.nn.utils.clip_grad_norm_'s rule (eps 1e-6), so an engine's dense clipping agrees.
        self.last_clip_coef = min(1.0, self.config.max_grad_norm / (self.last_grad_norm + 1e-6))
        return self.last_clip_coef

    # --- update and apply
    def _update(self, params: list[torch.Tensor], lowrank: dict, coef: float) -> None:
        """Adam on the averaged low-rank gradients, then the apply: row shards update their own
        rows; owners' directions reach every rank one bucket (``bucket_cap_mb``) at a time and
        are applied as they arrive, so at most one bucket of directions is alive."""
        rows = [p for p in params if self.row_reduced(p)]
        for p in rows:
            state = self.state[p]
            state["step"] = state.get("step", 0) + 1
            codec = self.layout.moment_codec(p.shape[0] * state["projector"].rank, self.codec)
            grad = lowrank[p] if coef == 1.0 else lowrank[p] * coef
            group = self._group_of[p]
            self._apply_galore(p, advance_moments(state, grad, codec, betas=group["betas"], eps=group["eps"]))
        owned = [p for p in params if p not in set(rows)]
        compressed = self.config.compress_lowrank and self.comm.world_size > 1
        itemsize = 4 if compressed else self._payload_dtype.itemsize
        residuals = self.update_residuals if self.config.compress_lowrank else None
        sized = [OwnedTensor(p, self.owner[p], torch.Size(self.state[p]["projector"].lowrank_shape)) for p in owned]
        for bucket in pack_buckets(sized, self._bucket_bytes, lambda shape: itemsize):
            directions = [OwnedTensor(p, owner, self._direction(p, lowrank, coef)) for p, owner, _ in bucket]
            received = broadcast_from_owners(self.comm, directions, "update_gather", residuals=residuals)
            for p, direction in received.items():
                self._apply_galore(p, direction.to(torch.float32))

    def _direction(self, p: torch.Tensor, lowrank: dict, coef: float) -> torch.Tensor:
        """Advance ``p``'s step; on its owner, the Adam direction in the payload dtype (every
        rank, the owner included, applies that value, so replicas stay equal); elsewhere an
        empty receive buffer of the same shape."""
        state = self.state[p]
        state["step"] = state.get("step", 0) + 1
        if self.owner[p] != self.comm.rank:
            return torch.empty(state["projector"].lowrank_shape, device=p.device, dtype=self._payload_dtype)
        grad = lowrank[p] if coef == 1.0 else lowrank[p] * coef
        group = self._group_of[p]
        return advance_moments(state, grad, self.codec, betas=group["betas"], eps=group["eps"]).to(self._payload_dtype)

    @property
    def weights_sharded(self) -> bool:
        """Whether this rank holds only its rows of each INT8 weight (FSDP2)."""
        return self.layout.weights_sharded

    def _apply_galore(self, p: torch.Tensor, direction: torch.Tensor) -> None:
        """Write this rank's rows of ``p``: back-project ``direction`` (the whole low-rank
        update, or this rank's rows of a row-reduced one) and apply it with the one rule;
        INT8 weights are requantized with the shared stochastic-rounding stream (fused on GPU)."""
        state = self.state[p]
        how = weight_step(self._group_of[p], state["step"])
        proj: Projector = state["projector"]
        r0, r1 = self.layout.rows(p)
        row_local = self.row_reduced(p)  # direction already holds only this rank's rows
        delta = proj.project_back(direction, rows=None if row_local or (r0, r1) == (0, p.shape[0]) else (r0, r1))
        layer = int8_layer_of(p)
        if layer is None:
            apply_direction_(p, delta, how)
            return
        key = self._stream_key(p, state["step"] - 1) if self.config.stochastic_round else None
        self.layout.apply_int8(layer, delta, how, stochastic_key=key)

    def _update_dense(self, params: list[torch.Tensor], grads: dict, coef: float) -> None:
        """AdamW on dense parameters: local shards where the engine shards them, else on the
        owner, whose result reaches every rank (its updated value; with ``compress_dense``,
        its 8-bit direction, which every rank applies)."""
        if self.layout.dense_local or self.config.compress_dense:
            self._update_dense_everywhere(params, grads, coef)
            return
        for p in params:
            state, group = self.state[p], self._group_of[p]
            state["step"] = state.get("step", 0) + 1
            if self.owner[p] == self.comm.rank:
                grad = grads[p] if coef == 1.0 else grads[p] * coef
                direction = advance_moments(state, grad, self.codec, betas=group["betas"], eps=group["eps"])
                apply_direction_(p, direction, weight_step(group, state["step"]))
        values = [OwnedTensor(p, self.owner[p], p.data) for p in params]
        for p, value in broadcast_from_owners(self.comm, values, "dense", bucket_bytes=self._bucket_bytes).items():
            if value.data_ptr() != p.data_ptr():  # world size 1: the value is p itself
                p.data.copy_(value)

    def _update_dense_everywhere(self, params: list[torch.Tensor], grads: dict, coef: float) -> None:
        """Every rank applies a direction itself: its own shard's (``dense_local``), or the
        owners' directions received as 8-bit codes with the owner's error feedback, one bucket
        at a time (``compress_dense``: replicas stay bit-identical without an fp32 master)."""
        local = self.layout.dense_local
        items = [(p, 0 if local else self.owner[p], p) for p in params]
        for bucket in pack_buckets(items, self._bucket_bytes, lambda t: 4):
            directions = []
            for p, owner, _ in bucket:
                state, group = self.state[p], self._group_of[p]
                state["step"] = state.get("step", 0) + 1
                if local or owner == self.comm.rank:
                    grad = grads[p] if coef == 1.0 else grads[p] * coef
                    codec = self.layout.moment_codec(p.numel(), self.codec) if local else self.codec
                    directions.append(OwnedTensor(p, owner, advance_moments(state, grad, codec, betas=group["betas"],
                                                                 eps=group["eps"])))
                else:
                    directions.append(OwnedTensor(p, owner, torch.empty(p.shape, dtype=torch.float32, device=p.device)))
            received = ({p: d for p, _, d in directions} if local else
                        broadcast_from_owners(self.comm, directions, "dense", residuals=self.update_residuals))
            for p, direction in received.items():
                how = weight_step(self._group_of[p], self.state[p]["step"])
                apply_direction_(self.layout.local(p.data), direction, how)

    # ----------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict:
        """Tensors, numbers, strings and lists only: loads with ``torch.load(weights_only=True)``."""
        index = self._tensor_ids
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[p] for p in g["params"]]}
                  for g in self.param_groups]
        state = {index[p]: flatten_param_state(s) for p, s in self.state.items() if s}
        return {"state": state, "param_groups": groups, "skipped_steps": self.skipped_steps,
                "config": self.config.to_dict()}

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
                self.load_param_state(p, flat)
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.arm_grad_sinks()

    def param_state(self, p: torch.Tensor) -> dict[str, Any]:
        """``p``'s state as flat ``{field: tensor or number}`` (:func:`.state.flatten_param_state`)."""
        return flatten_param_state(self.state[p])

    def load_param_state(self, p: torch.Tensor, flat: dict) -> None:
        """Load fields of :meth:`param_state` into ``p``'s state (any subset of them).  Call
        :meth:`arm_grad_sinks` after the last one: the next step's refreshes may have changed."""
        load_param_state(self.state[p], flat, device=p.device, name=self.name_of(p))
