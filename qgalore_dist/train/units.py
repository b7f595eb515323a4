"""Human-readable units for logs and plots (no torch, no matplotlib: imported by both)."""

from __future__ import annotations

__all__ = ["human_bytes"]


def human_bytes(n: float) -> str:
    """``n`` bytes in decimal units with one decimal: ``950B``, ``1.2kB``, ``3.4MB``, ``5.6GB``."""
    n = float(n)
    if abs(n) < 1000:
        return f"{n:.0f}B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000.0
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f}{unit}"
    raise AssertionError("unreachable")
