"""Shared test set-up.

Layout: ``tests/unit/`` runs in this process (numerics against references, configs, plans);
``tests/integration/`` starts processes (gloo ranks, ``torchrun``, the ``deepspeed`` launcher,
the training tool).  The harnesses both use live here, in ``tests/``:

* ``dist_harness.py``: ``run_distributed(fn, world_size, *args)`` (spawned gloo ranks) and
  ``free_port()``;
* ``helpers.py``: tiny models and tensors of awkward shapes;
* ``*_worker.py``: scripts the integration tests launch (DeepSpeed, FSDP2, checkpoints, HF).

This file puts ``tests/`` on ``sys.path`` so both folders import them by name.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))


@pytest.fixture
def repo_root() -> Path:
    """The repository's root directory."""
    return REPO_ROOT


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (one per test: distinct master ports)."""
    from dist_harness import free_port as pick

    return pick()
