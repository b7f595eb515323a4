"""Closed-form memory and communication figures of qgalore-dist and its baselines.

Per-tensor accounting (``states``), per-rank model states, buffers, temporaries and peaks
(``ranks``, ``fsdp``), bytes per steady and refresh step (``comm``, ``comm_fsdp``), refresh
schedules and run averages (``schedule``), activations (``activations``), and one estimate for a
model / world / engine (``report.estimate``, the ``qgalore-estimate`` console script).

Pure functions of parameter shapes; nothing here allocates model memory.  Layering: this package
sits beside ``train`` -- it imports ``core``, ``quant``, ``distributed`` (the ownership plan) and
``optim`` (``QGaLoreConfig`` defaults); only train-level code, benchmarks and tests import it.
"""

from .activations import Activations, activation_bytes
from .model import Layout, Shapes, Tensor, builtin_models, load_model_config, model_shapes
from .ranks import RankBytes, Unsupported, ZeroBuckets
from .report import ENGINES, Estimate, EstimateRequest, MemoryRow, TrafficRow, estimate
from .schedule import adaptive_refresh_steps, fixed_refresh_steps, run_average

__all__ = ["ENGINES", "Activations", "Estimate", "EstimateRequest", "Layout", "MemoryRow", "RankBytes", "Shapes",
           "Tensor", "TrafficRow", "Unsupported", "ZeroBuckets", "activation_bytes", "adaptive_refresh_steps",
           "builtin_models", "estimate", "fixed_refresh_steps", "load_model_config", "model_shapes", "run_average"]
