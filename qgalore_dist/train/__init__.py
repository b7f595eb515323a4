"""``qgalore-train``: Q-GaLore LLaMA training under deepspeed, torchrun, srun, mpirun or one process."""

from .loop import cli, main

__all__ = ["cli", "main"]
