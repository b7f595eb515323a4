"""Deprecated alias of :mod:`qgalore_dist.integrations.launch`; kept for one release."""

import warnings

from .integrations.launch import *  # noqa: F401,F403
from .integrations.launch import __all__  # noqa: F401

warnings.warn("qgalore_dist.launch_env is deprecated: use qgalore_dist.integrations.launch",
              DeprecationWarning, stacklevel=2)
