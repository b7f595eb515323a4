"""DeepSpeed integration: ``qgalore_dist.initialize`` is ``deepspeed.initialize`` that also
understands the ds_config entry

    "optimizer": {"type": "QGaLoreAdamW8bit", "params": {"lr": ..., "rank": ..., ...,
                  "target_modules": [...], "weight_bits": 8}}

Division of labour (DESIGN.md, "Layers"):

* The package owns the GaLore matrices: the ``target_modules`` linears become
  :class:`~qgalore_dist.core.Int8Linear` (frozen ``uint8`` weights, which ZeRO never flattens,
  reduces or partitions), and a :class:`~qgalore_dist.optim.QGaLoreAdamW8bit` exchanges their
  low-rank gradients, projectors and updates itself.  Under ZeRO-3 the package partitions the
  INT8 weights by rows itself (:mod:`.zero3`; ``"int8_partition": false`` keeps them replicated).
* DeepSpeed owns everything else (embeddings, norms, head, biases) at any ZeRO stage: it
  receives :class:`EngineOptimizer`, an AdamW with the same update formula and 8-bit moments,
  which runs the GaLore step inside its ``step()``.

DeepSpeed has no optimizer registry (``optimizer.type`` must name a DeepSpeed or ``torch.optim``
class), so the entry is removed from the config DeepSpeed sees and the optimizer is handed over
as a client optimizer with ``zero_allow_untested_optimizer``.  ``gradient_clipping`` is also
taken away from DeepSpeed, whose norm would cover only the dense gradients: the package clips
the joint norm (``QGaLoreConfig.max_grad_norm``).  Any other ``optimizer.type`` passes straight
through to ``deepspeed.initialize``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn as nn

from ..core import Int8Linear, prepare_model
from ..core.adam import advance_moments, apply_direction_, weight_step
from ..core.int8_linear import DEFAULT_TARGET_MODULES, find_targets
from ..distributed import Collectives
from ..optim import QGaLoreAdamW8bit, QGaLoreConfig

__all__ = ["OPTIMIZER_TYPE", "EngineOptimizer", "QGaLoreEntry", "galore_params", "initialize", "load_ds_config",
           "matrix_ranks", "parse_optimizer_entry"]

logger = logging.getLogger(__name__)

OPTIMIZER_TYPE = "QGaLoreAdamW8bit"


@dataclass(kw_only=True, frozen=True)
class QGaLoreEntry:
    """The validated ``optimizer`` entry of a ds_config whose type is ``QGaLoreAdamW8bit``."""

    config: QGaLoreConfig
    """Optimizer hyperparameters (``max_grad_norm`` comes from the top-level ``gradient_clipping``)."""
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    """Leaf names (or full-name regexes) of the nn.Linear layers converted to INT8 GaLore layers."""
    weight_bits: int = 8
    """Bits of the stored GaLore weights; only 8 is implemented (as in the reference)."""
    weight_group_size: int = 256
    """Group size of the INT8 weight quantization (the reference's 256)."""
    rank_overrides: dict[str, int] = dataclasses.field(default_factory=dict)
    """``{regex: rank}``: a GaLore matrix whose full module name the regex finds (``re.search``,
    first match in order wins) gets this rank instead of ``rank``, e.g. ``{"k_proj|v_proj": 256}``.
    Every regex must select at least one target module."""
    int8_partition: bool | None = None
    """ZeRO-3: each rank stores 1/N of every INT8 weight's rows, gathered around each layer's
    forward and backward (:mod:`.zero3`).  None: on under stage 3; False keeps them replicated;
    True below stage 3 is refused (ZeRO < 3 does not partition parameters)."""


_ENTRY_KEYS = ("target_modules", "weight_bits", "weight_group_size", "rank_overrides", "int8_partition")


def allowed_params() -> list[str]:
    """Every key ``optimizer.params`` accepts."""
    return sorted([f.name for f in fields(QGaLoreConfig) if f.name != "max_grad_norm"] + list(_ENTRY_KEYS))


def load_ds_config(config: dict | str | os.PathLike | None, args: Any = None) -> dict:
    """A deep copy of the ds_config given as a dict, a JSON file path, or (like DeepSpeed)
    ``args.deepspeed_config``."""
    if config is None and args is not None:
        config = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    if config is None:
        raise ValueError("no DeepSpeed config: pass config= (a dict or a JSON path) or args.deepspeed_config")
    if isinstance(config, dict):
        return copy.deepcopy(config)
    path = os.fspath(config)
    if not os.path.isfile(path):
        raise ValueError(f"DeepSpeed config file {path!r} does not exist")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"DeepSpeed config file {path!r} is not valid JSON: {exc}") from exc


def parse_optimizer_entry(ds_config: dict) -> QGaLoreEntry | None:
    """The validated Q-GaLore entry, or None when ``optimizer.type`` is something else.

    Raises ``ValueError`` naming the key for an unknown key or a bad value."""
    entry = ds_config.get("optimizer")
    if not isinstance(entry, dict) or entry.get("type") != OPTIMIZER_TYPE:
        return None
    unknown_top = sorted(set(entry) - {"type", "params"})
    if unknown_top:
        raise ValueError(f"ds_config optimizer: unknown key(s) {unknown_top}; allowed: ['params', 'type']")
    params = dict(entry.get("params") or {})
    if "max_grad_norm" in params:
        raise ValueError("ds_config optimizer.params.max_grad_norm: use the top-level 'gradient_clipping' "
                         "(it clips dense and GaLore gradients together)")
    unknown = sorted(set(params) - set(allowed_params()))
    if unknown:
        raise ValueError(f"ds_config optimizer.params: unknown key(s) {unknown}; allowed: {allowed_params()}")
    extra = {k: params.pop(k) for k in _ENTRY_KEYS if k in params}
    if extra.get("weight_bits", 8) != 8:
        raise ValueError(f"ds_config optimizer.params.weight_bits must be 8 (the only INT8 weight format "
                         f"implemented, as in the reference), got {extra['weight_bits']!r}")
    targets = extra.get("target_modules", DEFAULT_TARGET_MODULES)
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"ds_config optimizer.params.target_modules must be a non-empty list of module "
                         f"names, got {targets!r}")
    overrides = _parse_rank_overrides(extra.get("rank_overrides", {}))
    partition = extra.get("int8_partition")
    if partition is not None and not isinstance(partition, bool):
        raise ValueError(f"ds_config optimizer.params.int8_partition must be true or false, got {partition!r}")
    params = _inherit_overlap_comm(params, ds_config)
    clip = ds_config.get("gradient_clipping", 0.0) or 0.0
    try:
        config = QGaLoreConfig.from_dict({**params, "max_grad_norm": float(clip)})
    except ValueError as exc:
        raise ValueError(f"ds_config optimizer.params: {exc}") from exc
    except TypeError as exc:  # e.g. betas not a pair
        raise ValueError(f"ds_config optimizer.params: {exc}; allowed: {allowed_params()}") from exc
    return QGaLoreEntry(config=config, target_modules=tuple(targets), weight_bits=8,
                        weight_group_size=int(extra.get("weight_group_size", 256)), rank_overrides=overrides,
                        int8_partition=partition)


def _inherit_overlap_comm(params: dict, ds_config: dict) -> dict:
    """Unless the entry sets ``overlap_comm`` (or asks for payload compression, which it does not
    combine with yet), follow ZeRO's own ``zero_optimization.overlap_comm`` with DeepSpeed's
    default (on at stage 3, off below): a user who asked ZeRO to overlap its reduces with backward
    expects the low-rank exchange to overlap too, and only owners then keep low-rank gradients."""
    zero = ds_config.get("zero_optimization")
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    if "overlap_comm" in params or not isinstance(stage, int) or stage < 1:  # DeepSpeed checks the stage
        return params
    if params.get("compress_lowrank") or params.get("compress_dense"):
        return params
    return {**params, "overlap_comm": bool(zero.get("overlap_comm", stage == 3))}


def _parse_rank_overrides(value: Any) -> dict[str, int]:
    where = "ds_config optimizer.params.rank_overrides"
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping of module-name regex to rank, got {value!r}")
    for pattern, rank in value.items():
        if not isinstance(pattern, str) or isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"{where}: {pattern!r}: {rank!r} must map a regex (string) to an int >= 1")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{where}: {pattern!r} is not a valid regex: {exc}") from exc
    return dict(value)


def matrix_ranks(model: nn.Module, entry: QGaLoreEntry) -> dict[str, int]:
    """``{module name: GaLore rank}`` of every target module, checked from the model alone (so
    every rank raises the same ``ValueError`` before any collective): the targets (see
    :func:`~qgalore_dist.core.int8_linear.find_targets`), every ``rank_overrides`` regex
    selecting some target, and every rank below the smaller side of its matrix."""
    targets = find_targets(model, entry.target_modules)
    ranks = {}
    for name, module in targets:
        pattern = next((p for p in entry.rank_overrides if re.search(p, name)), None)
        ranks[name] = entry.config.rank if pattern is None else entry.rank_overrides[pattern]
        side = min(module.out_features, module.in_features)
        if ranks[name] >= side:
            key = f"rank_overrides[{pattern!r}]" if pattern is not None else "rank"
            flag = "" if pattern is not None else f" (qgalore-train: --optim.rank {max(1, side // 4)})"
            example = f"{{{name.rsplit('.', 1)[-1]!r}: {max(1, side // 4)}}}"
            raise ValueError(
                f"ds_config optimizer.params.{key} = {ranks[name]} is too large for {name} "
                f"({module.out_features}x{module.in_features}; a GaLore rank must be < {side}): lower it{flag}, "
                f"or give such layers their own rank with rank_overrides, e.g. {example}")
    for pattern in entry.rank_overrides:
        if not any(re.search(pattern, name) for name, _ in targets):
            raise ValueError(f"ds_config optimizer.params.rank_overrides: {pattern!r} selects none of the target "
                             f"modules (e.g. {targets[0][0]!r}); it is a regex searched in full module names")
    return ranks


def galore_params(model: nn.Module, entry: QGaLoreEntry, ranks: dict[str, int]) -> list:
    """The INT8 weights of a prepared model for :class:`QGaLoreAdamW8bit`, in module order: a
    plain list, or (with ``rank_overrides``) param groups that carry their ``rank``."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, Int8Linear)]
    if not entry.rank_overrides:
        return [m.weight for _, m in layers]
    groups: dict[int, list] = {}
    for name, module in layers:
        groups.setdefault(ranks.get(name, entry.config.rank), []).append(module.weight)
    return [{"params": params, "rank": rank} for rank, params in groups.items()]


class EngineOptimizer(torch.optim.Optimizer):
    """The client optimizer DeepSpeed wraps: AdamW (galore_torch's formula, 8-bit moments) on
    whatever dense tensors DeepSpeed puts in ``param_groups`` (the model's parameters at stage
    0, this rank's flat fp32 partition at stages 1-3), plus the GaLore step of ``galore``.

    ``step()``: the dense gradients' share of the squared global norm and their finiteness go
    into ``galore.step``, which reduces the low-rank gradients, computes the joint clipping
    factor and updates the INT8 layers; then the dense tensors are updated with the same factor.
    A step in which no INT8 layer received a gradient (DeepSpeed's bf16 stage-0 wrapper calls
    ``step()`` once at start-up with zero gradients) changes nothing.
    """

    def __init__(self, params, galore: QGaLoreAdamW8bit, *, grads_partitioned: bool) -> None:
        cfg = galore.config
        super().__init__(params, dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay))
        self.galore = galore
        self.grads_partitioned = grads_partitioned
        self._galore_base_lr = [g["lr"] for g in galore.param_groups]
        self._base_lr = self.param_groups[0]["lr"] if self.param_groups else cfg.lr
        self.engine = None
        """The DeepSpeed engine, once :meth:`attach` ran (``initialize`` does it)."""
        self.zero = None
        """DeepSpeed's ZeRO wrapper around this optimizer (None at stage 0)."""
        self._galore_done_at: int | None = None
        self._applied, self._coef = False, 1.0

    def attach(self, engine) -> None:
        """ZeRO calls ``step()`` once per param group (stage 3: once per sub-group, with only
        that sub-group's flat tensor in ``param_groups``); the engine's step counter tells
        the first call of an engine step, which runs the GaLore step, from the others."""
        self.engine = engine
        self.zero = engine.optimizer if engine.zero_optimization() else None
        # DeepSpeed runs exactly this many backward passes per step: a refresh step's owners can
        # run their SVDs as the last one completes each full gradient.
        self.galore.set_gradient_accumulation_steps(engine.gradient_accumulation_steps())

    def _sync_lr(self) -> None:
        """DeepSpeed's (or the user's) scheduler sets the dense groups' lr: GaLore follows it."""
        if not self.param_groups:
            return
        lr = self.param_groups[0]["lr"]
        for group, base in zip(self.galore.param_groups, self._galore_base_lr):
            group["lr"] = base * lr / self._base_lr if self._base_lr > 0 else lr

    def _dense_grad_stats(self) -> tuple[torch.Tensor, bool]:
        """This rank's share of the dense gradients' squared norm (summed over ranks by the
        GaLore step) and whether they are finite.  Under ZeRO the wrapper has already
        computed the global norm over all partitions before its first ``step()`` call."""
        world = self.galore.comm.world_size
        if self.zero is not None:
            norm = getattr(self.zero, "_global_grad_norm", None)
            if norm is None:
                if self.galore.config.max_grad_norm > 0:
                    raise ValueError("gradient_clipping needs DeepSpeed's dense gradient norm: "
                                     "remove zero_optimization.compute_grad_norm=false")
                return torch.zeros((), dtype=torch.float64), True
            norm = torch.as_tensor(float(norm), dtype=torch.float64)
            return norm.square() / world, bool(torch.isfinite(norm))
        sq = torch.zeros((), dtype=torch.float64)
        for p in self._tensors():
            if p.grad is not None:
                sq += p.grad.double().square().sum()
        # Stage 0: every rank holds the same reduced gradients; the sum over ranks counts them once.
        return sq / world, bool(torch.isfinite(sq))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        engine_step = self.engine.global_steps if self.engine is not None else None
        if engine_step is None or engine_step != self._galore_done_at:
            self._sync_lr()
            sq, finite = self._dense_grad_stats()
            self.galore.step(extra_grad_sq=sq, extra_finite=finite)
            self._applied, self._coef = self.galore.last_step_applied, self.galore.last_clip_coef
            self._galore_done_at = engine_step
            self.galore.zero_grad()
        if self._applied:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self._dense_update(p, p.grad if self._coef == 1.0 else p.grad * self._coef, group)
        return loss

    # ------------------------------------------------------------- checkpoint support
    def _tensors(self) -> list[torch.Tensor]:
        """Every dense tensor this optimizer updates (ZeRO-3 lists them in ``param_groups``
        only during its own ``step()`` calls)."""
        if self.zero is not None and hasattr(self.zero, "fp32_partitioned_groups_flat"):
            return list(self.zero.fp32_partitioned_groups_flat)
        return [p for g in self.param_groups for p in g["params"]]

    def has_moments(self) -> bool:
        return any("exp_avg" in self.state[t] for t in self._tensors())

    def dense_steps(self) -> dict[str, int]:
        """``{"step": n}``: every dense tensor has taken the same number of steps."""
        steps = {int(self.state[t].get("step", 0)) for t in self._tensors()}
        assert len(steps) <= 1, f"dense tensors disagree on their step count: {steps}"
        return {"step": steps.pop() if steps else 0}

    def ensure_moments(self, with_moments: bool, steps: dict) -> None:
        """Before loading into a fresh optimizer: create (zero) moments and the step count."""
        for t in self._tensors():
            state = self.state[t]
            if with_moments and "exp_avg" not in state:
                state["exp_avg"] = self.galore.codec.zeros(t.shape, t.device, signed=True)
                state["exp_avg_sq"] = self.galore.codec.zeros(t.shape, t.device, signed=False)
            if with_moments:
                state["step"] = int(steps.get("step", 0))

    def raw_state(self) -> dict[str, torch.Tensor]:
        """This rank's moments exactly as stored (codes and absmax of its partition), keyed
        ``dense{i}::exp_avg.codes``...: restores bit-identically on the same partitioning."""
        out = {}
        for i, t in enumerate(self._tensors()):
            for key in ("exp_avg", "exp_avg_sq"):
                moment = self.state[t].get(key)
                for field in ("values", "codes", "absmax"):
                    value = getattr(moment, field, None)
                    if value is not None:
                        out[f"dense{i}::{key}.{field}"] = value
        return out

    def load_raw_state(self, tensors: dict[str, torch.Tensor], steps: dict) -> None:
        from ..quant import Moment

        for i, t in enumerate(self._tensors()):
            for key in ("exp_avg", "exp_avg_sq"):
                fields = {f: tensors[f"dense{i}::{key}.{f}"].to(t.device) for f in ("values", "codes", "absmax")
                          if f"dense{i}::{key}.{f}" in tensors}
                if fields:
                    self.state[t][key] = Moment(**fields)
                    self.state[t]["step"] = int(steps.get("step", 0))

    @contextlib.contextmanager
    def fp32_moments(self, *, write_back: bool):
        """Temporarily expose each tensor's moments as fp32 tensors of its own shape under
        ``exp_avg.fp32`` / ``exp_avg_sq.fp32`` -- the per-element form DeepSpeed's fragment
        API (``safe_get_full_optimizer_state``) maps onto model parameters.  With
        ``write_back`` they are re-encoded afterwards (same partitioning: the same codes)."""
        codec = self.galore.codec
        for t in self._tensors():
            state = self.state[t]
            if "exp_avg" in state:
                state["exp_avg.fp32"] = codec.decode(state["exp_avg"], signed=True).view_as(t)
                state["exp_avg_sq.fp32"] = codec.decode(state["exp_avg_sq"], signed=False).view_as(t)
        try:
            yield
        finally:
            for t in self._tensors():
                state = self.state[t]
                if "exp_avg.fp32" in state:
                    m, v = state.pop("exp_avg.fp32"), state.pop("exp_avg_sq.fp32")
                    if write_back:
                        state["exp_avg"] = codec.encode(m, signed=True)
                        state["exp_avg_sq"] = codec.encode(v, signed=False)

    def _dense_update(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "exp_avg" not in state:  # fresh moments start a fresh step count
            state["step"] = 0
        state["step"] += 1
        direction = advance_moments(state, grad, self.galore.codec, betas=group["betas"], eps=group["eps"])
        apply_direction_(p, direction, weight_step(group, state["step"]))


def _hide_int8_weights(model: nn.Module) -> None:
    """ZeRO-3 partitions every ``nn.Parameter`` of the module, frozen ones included; the INT8
    codes are the package's (replicated, or partitioned by :mod:`.zero3`, updated in place by
    the shared stochastic-rounding stream), so they become persistent buffers of their layer:
    same ``layer.weight`` object, same ``state_dict`` key, invisible to ZeRO."""
    for layer in model.modules():
        if isinstance(layer, Int8Linear) and "weight" in layer._parameters:
            weight = layer._parameters.pop("weight")
            layer.register_buffer("weight", weight, persistent=True)


def _broadcast_int8_layers(model: nn.Module, comm: Collectives) -> None:
    """DeepSpeed broadcasts parameters from rank 0 at start-up, but not buffers: send the
    INT8 codes with their scales and zero points too, so all replicas start identical."""
    for layer in model.modules():
        if isinstance(layer, Int8Linear):
            for t in (layer.weight.data, layer.weight_scales, layer.weight_zeros):
                comm.broadcast_from(t, 0, "control")


def int8_partitioned(entry: QGaLoreEntry, stage: int) -> bool:
    """Whether the INT8 weights are partitioned (see ``QGaLoreEntry.int8_partition``)."""
    if entry.int8_partition and stage != 3:
        raise ValueError(f"ds_config optimizer.params.int8_partition=true needs zero_optimization.stage 3 "
                         f"(ZeRO stage {stage} does not partition parameters)")
    return stage == 3 and entry.int8_partition is not False


def place_int8_weights(model: nn.Module, comm: Collectives, ds_config: dict, partition: bool):
    """Partition the INT8 layers' rows over ``comm`` when ``partition`` (:mod:`.zero3`); returns
    ``(layout or None, a line saying where the INT8 weights live)`` for the optimizer and the log."""
    if not partition:
        return None, f"INT8 weights: replicated on each of the {comm.world_size} ranks"
    from .zero3 import ZeroRowLayout, partition_int8_layers, row_mesh

    zero = ds_config.get("zero_optimization") or {}
    threshold = int(zero.get("stage3_param_persistence_threshold", 0))  # only when set: see .zero3
    layout = ZeroRowLayout(row_mesh(comm), comm)
    decisions = partition_int8_layers(model, layout, threshold=threshold)
    kept = sorted(n for n, d in decisions.items() if d != "partitioned")
    line = (f"INT8 weights: partitioned by rows over {comm.world_size} ranks (ZeRO-3), "
            f"{len(decisions) - len(kept)} of {len(decisions)} matrices")
    return layout, line + (f"; kept replicated: {kept} {decisions[kept[0]].split(' ', 1)[1]}" if kept else "")


def int8_names(model: nn.Module) -> dict[torch.Tensor, str]:
    """``{tensor: name}`` of the model's parameters and INT8 weights (buffers once hidden or
    partitioned): the names the optimizer keys its random streams and checkpoints by."""
    names = {p: n for n, p in model.named_parameters()}
    names.update({m.weight: f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Int8Linear)})
    return names


def galore_optimizer(model: nn.Module, entry: QGaLoreEntry, comm: Collectives, layout,
                     names: dict[torch.Tensor, str], ranks: dict[str, int]) -> QGaLoreAdamW8bit:
    """The optimizer of the INT8 layers (:class:`~.zero3.ZeroQGaLoreAdamW8bit` on a partitioned
    ``layout``); ``ranks`` from :func:`matrix_ranks` (``rank_overrides`` become param groups)."""
    weights = galore_params(model, entry, ranks)
    if layout is None:
        return QGaLoreAdamW8bit(weights, entry.config, names=names, collectives=comm, manage_dense=False)
    from .zero3 import ZeroQGaLoreAdamW8bit

    return ZeroQGaLoreAdamW8bit(weights, entry.config, names=names, collectives=comm, manage_dense=False,
                                layout=layout)


def _ensure_distributed(distributed_port: int, dist_init_required: bool | None) -> None:
    import torch.distributed as dist

    if dist.is_initialized() or dist_init_required is False:
        return
    from .launch import init_distributed

    init_distributed()


def _engine_config(ds_config: dict, entry: QGaLoreEntry) -> dict:
    """The config DeepSpeed sees: no optimizer entry, no gradient clipping (ours is joint)."""
    if (ds_config.get("fp16") or {}).get("enabled"):
        raise ValueError("ds_config fp16.enabled: QGaLoreAdamW8bit supports bf16 and fp32 (DeepSpeed's fp16 loss "
                         "scaling and overflow skipping do not cover the INT8 layers' gradients); use \"bf16\"")
    if ((ds_config.get("data_types") or {}).get("buffer_dtype")) is not None:
        raise ValueError("ds_config data_types.buffer_dtype: INT8 layers keep their scales and zero points in "
                         "fp32 buffers; remove buffer_dtype")
    cfg = {k: v for k, v in ds_config.items() if k != "optimizer"}
    # Explicitly 0: DeepSpeed clips dense gradients to 1.0 when the key is absent
    # (GRADIENT_CLIPPING_DEFAULT), which would clip them a second time.
    cfg["gradient_clipping"] = 0.0
    cfg["zero_allow_untested_optimizer"] = True
    return cfg


def _trainable_params(model: nn.Module, model_parameters) -> list:
    """Float trainables (or the user's groups of them); INT8 codes are never handed over."""
    source = model.parameters() if model_parameters is None else model_parameters
    out = []
    for item in source:
        if isinstance(item, dict):
            params = [p for p in item["params"] if p.requires_grad and p.is_floating_point()]
            if params:
                out.append({**item, "params": params})
        elif item.requires_grad and item.is_floating_point():
            out.append(item)
    return out


def initialize(args=None, model: nn.Module | None = None, optimizer=None, model_parameters=None,
               training_data=None, lr_scheduler=None, distributed_port: int = 29500, mpu=None,
               dist_init_required: bool | None = None, collate_fn=None, config=None, mesh_param=None,
               config_params=None):
    """``deepspeed.initialize`` with the ``QGaLoreAdamW8bit`` ds_config entry understood.

    Returns ``(engine, optimizer, training_dataloader, lr_scheduler)`` like DeepSpeed; with the
    Q-GaLore entry, ``engine.qgalore`` is the :class:`QGaLoreAdamW8bit` of the INT8 layers (for
    ``check_replicas()``, ``svd_count``, the communication meter) and ``engine.qgalore_entry``
    the parsed entry.  The model is converted in place (``target_modules`` -> ``Int8Linear``).
    """
    import deepspeed

    config = config if config is not None else config_params
    ds_config = load_ds_config(config, args)
    entry = parse_optimizer_entry(ds_config)
    passthrough = dict(args=args, model=model, model_parameters=model_parameters, training_data=training_data,
                       lr_scheduler=lr_scheduler, distributed_port=distributed_port, mpu=mpu,
                       dist_init_required=dist_init_required, collate_fn=collate_fn, mesh_param=mesh_param)
    if entry is None:
        return deepspeed.initialize(optimizer=optimizer, config=ds_config, **passthrough)
    if optimizer is not None:
        raise ValueError(f"optimizer= and a ds_config optimizer of type {OPTIMIZER_TYPE!r} were both given; "
                         "pass one of them")
    if model is None:
        raise ValueError("initialize: model is required")
    if mpu is not None:
        raise ValueError("initialize: model parallelism (mpu) is not supported with QGaLoreAdamW8bit yet")
    engine_config = _engine_config(ds_config, entry)
    # Config, then model checks, before any collective: every rank raises alike.
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    partition = int8_partitioned(entry, stage)
    ranks = matrix_ranks(model, entry)
    _ensure_distributed(distributed_port, dist_init_required)
    prepare_model(model, target_modules=entry.target_modules, group_size=entry.weight_group_size)
    comm = Collectives()
    _broadcast_int8_layers(model, comm)
    layout, int8_line = place_int8_weights(model, comm, ds_config, partition)
    galore = galore_optimizer(model, entry, comm, layout, int8_names(model), ranks)
    if stage == 3:
        _hide_int8_weights(model)
    dense = _trainable_params(model, model_parameters)
    passthrough["model_parameters"] = dense

    def build(params):
        return EngineOptimizer(params, galore, grads_partitioned=stage >= 1)

    engine, ds_optimizer, loader, scheduler = deepspeed.initialize(optimizer=build, config=engine_config, **passthrough)
    engine.basic_optimizer.attach(engine)
    engine.qgalore = galore
    engine.qgalore_entry = entry
    engine.qgalore_int8_partitioned = partition
    logger.info("qgalore-dist: %d INT8 GaLore matrices owned by the package, %d dense tensors by ZeRO stage %d\n%s\n%s",
                len(galore.galore_params), len(dense), stage, int8_line, galore.plan.describe())
    return engine, ds_optimizer, loader, scheduler
