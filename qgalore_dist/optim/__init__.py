"""The Q-GaLore optimizer."""

from .config import QGaLoreConfig
from .qgalore_adamw import QGaLoreAdamW8bit

__all__ = ["QGaLoreAdamW8bit", "QGaLoreConfig"]
