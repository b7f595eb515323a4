"""``python -m qgalore_dist.estimate``: the ``qgalore-estimate`` console script."""

from .cli import main

raise SystemExit(main())
