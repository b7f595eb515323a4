"""Checkpoints that resume anywhere, for every engine, behind one pair of calls::

    save_checkpoint(engine, "ckpt", client_state={"next_step": 100})   # DeepSpeed engine
    save_checkpoint((model, optimizer), "ckpt")                        # plain or FSDP2 optimizer
    client_state = load_checkpoint(engine, "ckpt")                     # newest (``latest``)

Both are collective (every rank calls them) and write ``<save_dir>/<tag>`` atomically, then point
``<save_dir>/latest`` at it.  What is written depends on the target:

* a DeepSpeed engine from :func:`qgalore_dist.initialize`, or ``(model, QGaLoreAdamW8bit)`` with
  replicated weights: safetensors + JSON with a SHA-256 manifest (:mod:`.engine`);
* ``(model, optimizer)`` whose INT8 rows are sharded by FSDP2 (:mod:`qgalore_dist.integrations.fsdp`):
  a ``torch.distributed.checkpoint`` directory (:mod:`.dcp`).

Both carry ``manifest.json`` (size and SHA-256 of every file): :func:`verify_checkpoint` checks
either kind, and a load verifies on every rank first (:class:`CheckpointError` naming the file).

Either resumes bit-identically at the same world size and re-plans ownership at another one.
"""

from __future__ import annotations

import os
from typing import Any

from .files import FORMAT_VERSION, CheckpointError, latest_tag, publish_latest, verify_checkpoint

__all__ = ["FORMAT_VERSION", "CheckpointError", "latest_tag", "load_checkpoint", "save_checkpoint", "verify_checkpoint"]


def _sharded_pair(target: Any):
    """``(model, optimizer)`` when ``target`` is a pair whose optimizer holds FSDP2 row shards."""
    if isinstance(target, tuple) and len(target) == 2 and getattr(target[1], "weights_sharded", False):
        return target
    return None


def save_checkpoint(target, save_dir: str, *, tag: str | None = None, client_state: dict | None = None) -> str:
    """Collective.  Save ``target`` (a DeepSpeed engine or ``(model, optimizer)``) into
    ``<save_dir>/<tag>`` (``tag`` defaults to ``step<N>``, N the steps taken) and point
    ``latest`` at it; ``client_state`` must be JSON-serializable.  Returns the path."""
    pair = _sharded_pair(target)
    if pair is None:
        from .engine import save_engine_checkpoint

        return save_engine_checkpoint(target, save_dir, tag=tag, client_state=client_state)
    from .dcp import save_dcp

    model, optimizer = pair
    tag = tag or f"step{optimizer.steps_taken}"
    _check_tag(tag)
    path = save_dcp(model, optimizer, os.path.join(save_dir, tag), client_state=client_state)
    if optimizer.comm.rank == 0:
        publish_latest(save_dir, tag)
    optimizer.comm.barrier()
    return path


def load_checkpoint(target, load_dir: str, *, tag: str | None = None, missing_ok: bool = False) -> dict | None:
    """Collective.  Load ``<load_dir>/<tag>`` (default: the one ``latest`` names) into
    ``target`` after verifying it; returns the saved ``client_state``.  When there is no such
    checkpoint (``load_dir`` missing, no ``latest`` in it, or no ``<tag>``) raises
    ``FileNotFoundError`` naming the path, or returns None with ``missing_ok=True`` (resume if
    present)."""
    missing = _missing(load_dir, tag)
    if missing is not None:
        if missing_ok:
            return None
        raise FileNotFoundError(missing)
    pair = _sharded_pair(target)
    if pair is None:
        from .engine import load_engine_checkpoint

        return load_engine_checkpoint(target, load_dir, tag=tag)
    from .dcp import load_dcp
    from .engine import verify_everywhere

    tag = tag or latest_tag(load_dir)
    if tag is None:
        return None
    path = os.path.join(load_dir, tag)
    if os.path.exists(os.path.join(path, "manifest.json")) or not os.path.exists(os.path.join(path, ".metadata")):
        verify_everywhere(pair[1].comm, path)  # DCP directories written before manifests: .metadata only
    meta = load_dcp(*pair, path)
    return meta.get("client_state")


def _missing(load_dir: str, tag: str | None) -> str | None:
    """Why there is no checkpoint to load (a message naming the path), or None."""
    if not os.path.isdir(load_dir):
        return f"checkpoint directory {load_dir!r} does not exist"
    if tag is None and latest_tag(load_dir) is None:
        return (f"no checkpoint in {load_dir!r} (it has no 'latest' file): pass tag=, or missing_ok=True "
                "to start fresh")
    if tag is not None and not os.path.isdir(os.path.join(load_dir, tag)):
        return f"checkpoint {os.path.join(load_dir, tag)!r} does not exist"
    return None


def _check_tag(tag: str) -> None:
    if "/" in tag or tag in ("", ".", "..", "latest") or tag.endswith(".tmp"):
        raise ValueError(f"checkpoint tag {tag!r} must be a plain directory name")
