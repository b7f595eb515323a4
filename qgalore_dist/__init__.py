"""qgalore-dist: Q-GaLore (low-rank gradient projection with INT4 projectors, 8-bit Adam
states and INT8 weights) for single-process and distributed training."""

from .core import Int8Linear, export_model, prepare_model
from .optim import QGaLoreAdamW8bit, QGaLoreConfig

__version__ = "0.1.0"
__all__ = ["Int8Linear", "QGaLoreAdamW8bit", "QGaLoreConfig", "export_model", "prepare_model"]
