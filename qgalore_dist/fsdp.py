"""Deprecated alias of :mod:`qgalore_dist.integrations.fsdp` (and, for checkpoints,
:mod:`qgalore_dist.checkpoint`); kept for one release."""

import warnings

from .checkpoint.dcp import load_dcp as load_checkpoint
from .checkpoint.dcp import load_optimizer_state_dict, optimizer_state_dict
from .checkpoint.dcp import save_dcp as save_checkpoint
from .integrations.fsdp import *  # noqa: F401,F403
from .integrations.fsdp import __all__ as _fsdp_all

warnings.warn("qgalore_dist.fsdp is deprecated: use qgalore_dist.integrations.fsdp, and "
              "qgalore_dist.checkpoint.save_checkpoint / load_checkpoint for checkpoints",
              DeprecationWarning, stacklevel=2)

__all__ = [*_fsdp_all, "load_checkpoint", "load_optimizer_state_dict", "optimizer_state_dict", "save_checkpoint"]
