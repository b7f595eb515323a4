"""``QGaLoreAdamW8bit``: Q-GaLore as a ``torch.optim.Optimizer``.

GaLore parameters (the ``uint8`` weights of :class:`~qgalore_dist.core.Int8Linear` layers,
and any 2-D float parameter in a group marked ``galore=True`` or carrying the reference's
``rank`` key) are updated as

    R = project(G)                       # (m, r) or (r, n), P refreshed on the adaptive schedule
    direction = Adam(R)                  # moments in 8 bits (or 32)
    W = W - step_size * scale * back_project(direction);  W = W - lr * wd * W
    W = requantize_int8(W, stochastic rounding keyed by (seed, step, tensor id))

Every other trainable parameter gets AdamW with the same formula and 8-bit moments.  A step
whose gradients contain NaN/Inf is skipped as a whole (weights and state untouched) and
counted in ``skipped_steps``.  ``state_dict()`` holds only tensors and numbers.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import torch

from ..core import Projector, RefreshSchedule, adam_step_size, int8_layer_of, lowrank_adam_update
from ..quant import BlockwiseCodec, Moment, StreamKey
from .config import QGaLoreConfig

__all__ = ["QGaLoreAdamW8bit"]

logger = logging.getLogger(__name__)

_GROUP_GALORE_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")
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
        names: optional ``{param: name}`` used in error messages and ``refresh_plan``.
    """

    def __init__(self, params: Iterable, config: QGaLoreConfig | None = None, *,
                 names: dict[torch.Tensor, str] | None = None, **overrides: Any) -> None:
        cfg = config or QGaLoreConfig()
        if overrides:
            cfg = QGaLoreConfig.from_dict({**cfg.to_dict(), **overrides})
        self.config = cfg
        defaults = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        super().__init__(params, defaults)
        self.codec = BlockwiseCodec(bits=cfg.state_bits)
        self.skipped_steps = 0
        self.svds_last_step = 0
        self._names = names or {}
        self._tensor_ids = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for group in self.param_groups:
            for p in group["params"]:
                if self.is_galore(p, group):
                    self.state[p]["projector"] = self._build_projector(p, group)

    # ----------------------------------------------------------------- classification
    def is_galore(self, p: torch.Tensor, group: dict) -> bool:
        if int8_layer_of(p) is not None:
            return True
        return bool(group.get("galore") or "rank" in group) and p.dim() == 2

    def name_of(self, p: torch.Tensor) -> str:
        return self._names.get(p, f"param[{self._tensor_ids[p]}]")

    def _build_projector(self, p: torch.Tensor, group: dict) -> Projector:
        cfg = self.config
        if p.dim() != 2:
            raise ValueError(f"{self.name_of(p)}: GaLore parameters must be 2-D, got shape {tuple(p.shape)}")
        schedule = RefreshSchedule(
            gap=int(group.get("update_proj_gap", cfg.update_proj_gap)), adaptive=cfg.adaptive_gap,
            queue_size=cfg.queue_size, cos_threshold=cfg.cos_threshold, gamma=cfg.gamma_proj,
        )
        return Projector(
            tuple(p.shape), rank=int(group.get("rank", cfg.rank)), proj_type=group.get("proj_type", cfg.proj_type),
            scale=float(group.get("scale", cfg.scale)), bits=cfg.proj_bits, group_size=cfg.proj_group_size,
            schedule=schedule, name=self.name_of(p),
        )

    # ----------------------------------------------------------------- gradients
    @staticmethod
    def grad_of(p: torch.Tensor) -> torch.Tensor | None:
        layer = int8_layer_of(p)
        return layer.weight_grad if layer is not None else p.grad

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                layer = int8_layer_of(p)
                if layer is not None:
                    layer.weight_grad = None

    def _grads_finite(self) -> bool:
        flags = [torch.isfinite(g).all() for group in self.param_groups for p in group["params"]
                 if (g := self.grad_of(p)) is not None]
        return bool(torch.stack(flags).all()) if flags else True

    def refresh_plan(self) -> list[str]:
        """Names of the GaLore matrices whose projector refreshes in the next ``step()``."""
        due = []
        for group in self.param_groups:
            for p in group["params"]:
                proj = self.state[p].get("projector")
                if proj is not None and proj.schedule.is_due(self.state[p].get("step", 0), proj.has_matrix()):
                    due.append(self.name_of(p))
        return due

    @property
    def svd_count(self) -> int:
        return sum(s["projector"].schedule.svd_count for s in self.state.values() if "projector" in s)

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.svds_last_step = 0
        if not self._grads_finite():
            self.skipped_steps += 1
            logger.warning("QGaLoreAdamW8bit: non-finite gradient, step skipped (%d skipped so far)", self.skipped_steps)
            return loss
        for group in self.param_groups:
            for p in group["params"]:
                grad = self.grad_of(p)
                if grad is None:
                    continue
                if "projector" in self.state[p]:
                    self._galore_update(p, group, grad)
                else:
                    self._dense_update(p, group, grad)
        return loss

    def _adam(self, state: dict, grad: torch.Tensor, group: dict) -> tuple[torch.Tensor, float]:
        """Advance the moments in ``state`` with ``grad``; return (direction, step_size)."""
        if "exp_avg" not in state:
            state["step"] = state.get("step", 0)
            state["exp_avg"] = self.codec.zeros(grad.shape, grad.device, signed=True)
            state["exp_avg_sq"] = self.codec.zeros(grad.shape, grad.device, signed=False)
        direction, state["exp_avg"], state["exp_avg_sq"] = lowrank_adam_update(
            grad, state["exp_avg"], state["exp_avg_sq"], self.codec, betas=group["betas"], eps=group["eps"])
        state["step"] += 1
        return direction, adam_step_size(group["lr"], group["betas"], state["step"])

    def _galore_update(self, p: torch.Tensor, group: dict, grad: torch.Tensor) -> None:
        state = self.state[p]
        proj: Projector = state["projector"]
        step = state.get("step", 0)
        key = StreamKey(self.config.seed, step, self._tensor_ids[p])
        if proj.schedule.is_due(step, proj.has_matrix()):
            cfg = self.config
            proj.refresh(grad, step=step, method=cfg.svd_method, oversample=cfg.svd_oversample,
                         power_iters=cfg.svd_power_iters, key=key)
            self.svds_last_step += 1
        direction, step_size = self._adam(state, proj.project(grad), group)
        delta = proj.project_back(direction)
        layer = int8_layer_of(p)
        weight = layer.dequantized_weight() if layer is not None else p
        weight.add_(delta.to(weight.dtype), alpha=-step_size)
        if group["weight_decay"] > 0:
            weight.add_(weight, alpha=-group["lr"] * group["weight_decay"])
        if layer is not None:
            layer.set_weight(weight, stochastic_key=key if self.config.stochastic_round else None)

    def _dense_update(self, p: torch.Tensor, group: dict, grad: torch.Tensor) -> None:
        direction, step_size = self._adam(self.state[p], grad, group)
        p.add_(direction.to(p.dtype), alpha=-step_size)
        if group["weight_decay"] > 0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    # ----------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict:
        """Tensors, numbers, strings and lists only: loads with ``torch.load(weights_only=True)``."""
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
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
        params = [p for g in self.param_groups for p in g["params"]]
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
            group["betas"] = tuple(group["betas"])
        for i, p in enumerate(params):
            flat = state_dict["state"].get(i, state_dict["state"].get(str(i)))
            if flat is not None:
                self._load_param_state(p, flat)
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))

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
