"""Engine integrations: DeepSpeed (``initialize``, the ds_config entry, checkpoints)."""

from .deepspeed import OPTIMIZER_TYPE, EngineOptimizer, QGaLoreEntry, initialize, load_ds_config, parse_optimizer_entry

__all__ = ["OPTIMIZER_TYPE", "EngineOptimizer", "QGaLoreEntry", "initialize", "load_ds_config", "parse_optimizer_entry"]
