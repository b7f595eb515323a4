"""A built-in corpus of real English text that needs no network: the documentation strings of
the Python standard library that ships with the interpreter (about 2 MB of prose)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
import warnings

import torch

__all__ = ["builtin_text", "byte_batches"]

_SKIP_PREFIXES = ("test", "idlelib", "tkinter", "turtle", "antigravity", "this", "lib2to3", "ensurepip", "venv", "__")


def builtin_text(max_chars: int = 2_000_000) -> str:
    """Concatenated docstrings of stdlib modules and their public members, in sorted order."""
    parts: list[str] = []
    size = 0
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names)
    for name in names:
        if name.startswith(_SKIP_PREFIXES):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # some stdlib modules need optional C libraries; skip them
            continue
        for obj in [module, *(v for k, v in sorted(vars(module).items()) if not k.startswith("_"))]:
            doc = inspect.getdoc(obj) if inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj) else None
            if doc and len(doc) > 200 and doc not in parts:
                parts.append(doc)
                size += len(doc)
        if size >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars]


def byte_batches(text: str, *, seq_len: int, batch_size: int, seed: int) -> "torch.Generator":
    """Endless batches ``(batch_size, seq_len)`` of byte ids (vocabulary 256), random windows
    drawn with a seeded generator."""
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=gen)
        yield torch.stack([data[s:s + seq_len] for s in starts.tolist()])
