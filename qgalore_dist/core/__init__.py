"""Projector, INT8 linear layer and the Adam update as pure functions (no torch.distributed)."""

from .adam import (
    WeightStep,
    adam_direction,
    adam_step_size,
    advance_moments,
    apply_direction_,
    lowrank_adam_update,
    weight_step,
)
from .int8_linear import (
    DEFAULT_TARGET_MODULES,
    Int8Linear,
    accumulate_full_grad,
    export_model,
    int8_layer_of,
    lowrank_sink,
    prepare_model,
    update_int8_codes_,
)
from .projector import PROJ_TYPES, SVD_METHODS, Projector, RefreshSchedule, choose_side, svd_basis

__all__ = [
    "DEFAULT_TARGET_MODULES", "PROJ_TYPES", "WeightStep", "advance_moments", "apply_direction_", "weight_step",
    "accumulate_full_grad", "lowrank_sink", "SVD_METHODS", "Int8Linear", "Projector", "RefreshSchedule",
    "adam_direction", "adam_step_size", "choose_side", "export_model", "int8_layer_of",
    "lowrank_adam_update", "prepare_model", "svd_basis", "update_int8_codes_",
]
