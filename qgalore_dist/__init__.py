"""qgalore-dist: Q-GaLore (low-rank gradient projection with INT4 projectors, 8-bit Adam
states and INT8 weights) for single-process and distributed training.

``qgalore_dist.initialize`` is ``deepspeed.initialize`` that understands the
``{"optimizer": {"type": "QGaLoreAdamW8bit", ...}}`` ds_config entry (DeepSpeed itself is
imported only when it is called)."""

from .core import Int8Linear, export_model, prepare_model
from .integrations import initialize
from .optim import QGaLoreAdamW8bit, QGaLoreConfig

__version__ = "0.1.0"
__all__ = ["Int8Linear", "QGaLoreAdamW8bit", "QGaLoreConfig", "export_model", "initialize", "prepare_model"]
