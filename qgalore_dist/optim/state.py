"""The optimizer's per-parameter state as flat ``{field: tensor or number}`` records, the form
``state_dict()`` and the checkpoints store (``torch.load(weights_only=True)`` loads them).

Fields: ``step``; ``exp_avg.values|codes|absmax`` and ``exp_avg_sq.values|codes|absmax`` (a
:class:`~qgalore_dist.quant.Moment`: fp32 ``values``, or 8-bit ``codes`` with ``absmax``);
``projector.<key>`` (:meth:`~qgalore_dist.core.Projector.state_dict`).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from ..core import Projector, int8_layer_of
from ..quant import Moment
from .layout import WeightLayout

__all__ = ["MOMENT_FIELDS", "flatten_param_state", "load_param_state", "replicated_tensors"]

MOMENT_FIELDS = ("values", "codes", "absmax")


def flatten_param_state(state: dict) -> dict[str, Any]:
    """One parameter's optimizer state as flat fields (module doc)."""
    out: dict[str, Any] = {}
    if "step" in state:
        out["step"] = state["step"]
    for name in ("exp_avg", "exp_avg_sq"):
        if name in state:
            for f in MOMENT_FIELDS:
                if getattr(state[name], f) is not None:
                    out[f"{name}.{f}"] = getattr(state[name], f)
    if "projector" in state:
        out.update({f"projector.{k}": v for k, v in state["projector"].state_dict().items()})
    return out


def load_param_state(state: dict, flat: dict, *, device: torch.device, name: str) -> None:
    """In place: set the fields of ``flat`` (any subset of :func:`flatten_param_state`'s) in
    ``state``; moments move to ``device``.  ``ValueError`` naming ``name`` when ``flat`` has a
    projector and ``state`` none (the parameter is not a GaLore matrix here)."""
    if "step" in flat:
        state["step"] = int(flat["step"])
    for moment in ("exp_avg", "exp_avg_sq"):
        fields = {f: flat[f"{moment}.{f}"].to(device) for f in MOMENT_FIELDS if f"{moment}.{f}" in flat}
        if fields:
            state[moment] = Moment(**fields)
    proj_state = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("projector.")}
    if proj_state:
        if "projector" not in state:
            raise ValueError(f"{name}: checkpoint has a projector but this parameter is not a GaLore matrix")
        state["projector"].load_state_dict(proj_state)


def replicated_tensors(galore: list[tuple[str, torch.Tensor, Projector]], dense: list[tuple[str, torch.Tensor]],
                       layout: WeightLayout) -> Iterable[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every tensor that must be bit-identical on all ranks: INT8 codes,
    scales and zeros (or plain GaLore weights) and dense parameters where ``layout`` replicates
    them, and every projector's payload.  ``galore``: ``(name, weight, projector)``."""
    for name, p, proj in galore:
        layer = int8_layer_of(p)
        if not layout.weights_sharded:
            if layer is not None:
                yield f"{name}.codes", layer.weight
                yield f"{name}.scales", layer.weight_scales
                yield f"{name}.zeros", layer.weight_zeros
            else:
                yield name, p
        if proj.has_matrix():
            for key, t in proj.to_payload().items():
                yield f"{name}.{key}", t
    if not layout.dense_local:
        yield from dense
