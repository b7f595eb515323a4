"""The Q-GaLore optimizer."""

from .config import QGaLoreConfig
from .qgalore_adamw import QGaLoreAdamW8bit
from .refresh import RefreshError

__all__ = ["QGaLoreAdamW8bit", "QGaLoreConfig", "RefreshError"]
