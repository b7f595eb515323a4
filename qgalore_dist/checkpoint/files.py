"""Checkpoint files: atomic directories, the SHA-256 manifest, safetensors/JSON I/O and
:class:`CheckpointError`.  Shared by the engine checkpoints (:mod:`.engine`) and the FSDP2 DCP
checkpoints (:mod:`.dcp`); one :data:`FORMAT_VERSION` for both.

A save writes into ``<tag>.tmp``, fsyncs every file, renames the directory to ``<tag>``
(:func:`publish_dir`) and then atomically replaces ``latest`` (:func:`publish_latest`): a crash at
any point leaves the previous checkpoint and ``latest`` intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

import torch

__all__ = [
    "FORMAT_VERSION", "CheckpointError", "fsync_dir", "latest_tag", "publish_dir", "publish_latest", "read_json",
    "read_tensors", "verify_checkpoint", "write_bytes", "write_json", "write_manifest", "write_tensors",
]

FORMAT_VERSION = 1
"""Version of every checkpoint layout this package writes (engine and DCP)."""
SEP = "::"
"""Separator of ``<parameter name>::<field>`` keys in optimizer-state files."""

class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupted or incompatible."""


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(tmp: str, final: str) -> None:
    """Rename the finished directory ``tmp`` to ``final``; an existing ``final`` (re-saving a
    tag) is swapped aside first and dropped after, so ``final`` is always complete or absent."""
    if os.path.exists(final):
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_bytes(path: str, data: bytes) -> dict:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_tensors(path: str, tensors: dict[str, torch.Tensor]) -> dict:
    from safetensors.torch import save

    clean = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    return write_bytes(path, save(clean))


def write_json(path: str, obj: Any) -> dict:
    try:
        data = json.dumps(obj, indent=1, sort_keys=True).encode()
    except TypeError as exc:
        raise ValueError(f"checkpoint {os.path.basename(path)}: only JSON-serializable values can be saved "
                         f"(client_state, scheduler state): {exc}") from exc
    return write_bytes(path, data)


def _sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: str) -> None:
    """Write ``manifest.json`` (size and SHA-256 of every other file under ``directory``, the
    format version) for files written by someone else (DCP's ``.distcp`` and ``.metadata``), so
    :func:`verify_checkpoint` checks such a directory like any other."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if rel != "manifest.json":
                files[rel] = {"bytes": os.path.getsize(path), "sha256": _sha256_of(path)}
    write_json(os.path.join(directory, "manifest.json"), {"format_version": FORMAT_VERSION, "files": files})


def latest_tag(save_dir: str) -> str | None:
    """The tag ``latest`` points to, or None when there is no checkpoint yet."""
    path = os.path.join(save_dir, "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def verify_checkpoint(path: str) -> dict:
    """Check every file against ``manifest.json``; returns the manifest or raises
    :class:`CheckpointError` naming the first bad file."""
    manifest_path = os.path.join(path, "manifest.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not os.path.exists(manifest_path):
        raise CheckpointError(f"checkpoint {path} is incomplete: {manifest_path} is missing")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint manifest {manifest_path} is unreadable: {exc}") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{manifest_path}: format_version {manifest.get('format_version')!r}, "
                              f"this qgalore-dist reads {FORMAT_VERSION}")
    for name, expect in sorted(files.items()):
        file = os.path.join(path, name)
        if not os.path.exists(file):
            raise CheckpointError(f"checkpoint file {file} is missing (listed in the manifest)")
        size = os.path.getsize(file)
        if size != expect["bytes"]:
            raise CheckpointError(f"checkpoint file {file} is {size} bytes, the manifest says {expect['bytes']} "
                                  "(truncated or altered)")
        if _sha256_of(file) != expect["sha256"]:
            raise CheckpointError(f"checkpoint file {file} fails its SHA-256 check (altered or corrupted)")
    return manifest


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def publish_latest(save_dir: str, tag: str) -> None:
    """Atomically point ``<save_dir>/latest`` at ``tag`` (write, fsync, rename, fsync the dir)."""
    latest_tmp = os.path.join(save_dir, "latest.tmp")
    write_bytes(latest_tmp, tag.encode())
    os.replace(latest_tmp, os.path.join(save_dir, "latest"))
    fsync_dir(save_dir)
