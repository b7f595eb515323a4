"""Projector, INT8 linear layer and the Adam update as pure functions (no torch.distributed)."""

from .adam import adam_direction, adam_step_size, lowrank_adam_update
from .int8_linear import (
    DEFAULT_TARGET_MODULES,
    Int8Linear,
    accumulate_full_grad,
    export_model,
    int8_layer_of,
    lowrank_sink,
    prepare_model,
)
from .projector import PROJ_TYPES, SVD_METHODS, Projector, RefreshSchedule, choose_side, svd_basis

__all__ = [
    "DEFAULT_TARGET_MODULES", "PROJ_TYPES", "accumulate_full_grad", "lowrank_sink", "SVD_METHODS", "Int8Linear", "Projector", "RefreshSchedule",
    "adam_direction", "adam_step_size", "choose_side", "export_model", "int8_layer_of",
    "lowrank_adam_update", "prepare_model", "svd_basis",
]
