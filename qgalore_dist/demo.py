"""Deprecated alias: ``python -m qgalore_dist.demo`` runs :mod:`qgalore_dist.train.demo`."""

import warnings

from .train.demo import main

__all__ = ["main"]

if __name__ == "__main__":
    warnings.warn("python -m qgalore_dist.demo is deprecated: use python -m qgalore_dist.train.demo",
                  DeprecationWarning, stacklevel=1)
    raise SystemExit(main())
