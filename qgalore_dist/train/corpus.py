"""A built-in corpus of real English text that needs no network: the documentation that ships
with the Python interpreter.  Measured on CPython 3.11.7: 1,567,861 characters in 2,326
documents (``builtin_text()``: 1,572,511 characters with the blank lines between them), built
in about 0.4 s after ``import torch``.  Its sources, in corpus order:

1. every importable standard-library module (536k characters from the 251 top-level ones,
   188k from the 189 submodules of the packages, ``asyncio.*``, ``email.*``, ``xml.*``,
   ``unittest.*``, ... walked depth first, 69k from the 31 modules compiled into the
   interpreter, ``builtins``, ``sys``, ``_io``, ...): the module's docstring and those of the
   classes and functions it defines (Python or C, public or private).  An object counts in
   the module its ``__module__`` names, so a re-export, or a package attribute that an
   earlier import happened to set, never moves or repeats it;
2. the methods, properties and nested classes of those classes (393k): their own docstrings,
   never inherited ones, and none that another package patched in (transformers adds
   ``logging.Logger.warning_once``);
3. the Python reference manual's help topics, ``pydoc_data.topics`` (382k): cut at blank
   lines, preferably at section headings, into documents of at most ~4,000 characters (a
   longer paragraph, one table, stays whole); a paragraph an earlier topic already holds is
   left out (topics nest: ``compound`` holds ``if``, ``while``, ...).

Only docstrings longer than 200 characters count, each text once.  Skipped: the test suites,
IDLE, tkinter and turtle, lib2to3, ensurepip, venv, ``__main__`` modules, the ``encodings``
codecs (boilerplate), distutils (in a virtual environment setuptools' copy stands in for it),
and whatever fails to import.  Modules, members and topics are taken in sorted order, so the
corpus depends only on the Python build, not on what the process imported before.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import sys
import warnings
from types import ModuleType
from typing import Iterable, Iterator

import torch

__all__ = ["BUILTIN_VERSION", "builtin_documents", "builtin_text", "byte_batches"]

BUILTIN_VERSION = 2
"""Version of the corpus recipe; caches of the corpus key on it (and on the Python version)."""
MIN_DOC_CHARS = 200
"""Documents (docstrings, topic sections) of at most this many characters are left out."""
TOPIC_CHARS = 4000
"""Help topics are cut into documents of at most about this many characters."""

_SKIP_PREFIXES = ("test", "idlelib", "tkinter", "turtle", "antigravity", "this", "lib2to3", "ensurepip", "venv",
                  "distutils", "__")
_NO_SUBMODULES = ("encodings",)
_MARKS = "*=-~^#\"'`"
"""Title underlines of the help topics, from the top level down."""
_UNDERLINE = re.compile(r"[*=\-~^#\"'`]{3,}")


def builtin_text(max_chars: int = 2_000_000) -> str:
    """The documents of ``builtin_documents`` joined by blank lines, cut at ``max_chars``."""
    return "\n\n".join(builtin_documents(max_chars))[:max_chars]


def builtin_documents(max_chars: int = 2_000_000) -> Iterator[str]:
    """The corpus one document at a time, stopping once the documents hold ``max_chars``
    characters (so ``"\\n\\n".join(docs)[:max_chars] == builtin_text(max_chars)``).  Modules
    are imported as the corpus reaches them: a short prefix is quick."""
    seen: set[str] = set()
    size = 0
    for doc in _candidates():
        if doc and len(doc) > MIN_DOC_CHARS and doc not in seen:
            seen.add(doc)
            yield doc
            size += len(doc)
            if size >= max_chars:
                return


def _candidates() -> Iterator[str | None]:
    """Every candidate document in corpus order, duplicates and short ones included."""
    top: list[ModuleType] = []
    for module in _imported(_top_level_names()):  # lazily: builtin_text(20_000) imports a few
        top.append(module)
        yield from _module_docs(module)
    modules = top + [sub for module in top for sub in _submodules(module)]
    names = {module.__name__ for module in modules}
    compiled = sorted(n for n in sys.builtin_module_names if n not in names and not n.startswith(_SKIP_PREFIXES))
    modules += _imported(compiled)
    for module in modules[len(top):]:
        yield from _module_docs(module)
    for cls in (c for module in modules for c in _defined_in(module) if inspect.isclass(c)):
        yield from _member_docs(cls)
    yield from _topic_docs()


def _top_level_names() -> list[str]:
    names = {m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names}
    return sorted(name for name in names if not name.startswith(_SKIP_PREFIXES))


def _imported(names: Iterable[str]) -> Iterator[ModuleType]:
    """The modules of ``names`` that import (some need optional C libraries or another OS)."""
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:
            continue
        yield module


def _submodules(package: ModuleType) -> list[ModuleType]:
    """The importable submodules of ``package``, depth first, sorted by name (not
    ``pkgutil.walk_packages``: it imports every subpackage, test suites included, before one
    can skip it)."""
    path = getattr(package, "__path__", None)
    if path is None or package.__name__ in _NO_SUBMODULES:
        return []
    names = sorted({info.name for info in pkgutil.iter_modules(path)})
    found: list[ModuleType] = []
    for module in _imported(f"{package.__name__}.{n}" for n in names if not n.startswith(_SKIP_PREFIXES)):
        found += [module, *_submodules(module)]
    return found


def _own_doc(obj: object) -> str | None:
    """``obj``'s own docstring, cleaned (``inspect.getdoc`` would inherit a base class's)."""
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else None


def _defined_in(module: ModuleType) -> list[object]:
    """The classes and functions (Python or C) ``module`` defines itself, sorted by name: an
    object re-exported elsewhere counts where it says it is from (its ``__module__``), so what
    else was imported before (which sets package attributes) never moves or repeats it."""
    return [obj for _, obj in sorted(vars(module).items())
            if (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj))
            and getattr(obj, "__module__", None) == module.__name__]


def _module_docs(module: ModuleType) -> Iterator[str | None]:
    """The module's docstring and those of the classes and functions it defines."""
    yield _own_doc(module)
    for obj in _defined_in(module):
        yield _own_doc(obj)


def _member_docs(cls: type) -> Iterator[str | None]:
    """The class's own docstrings of methods, properties and nested classes (none that another
    package patched in, as transformers adds ``logging.Logger.warning_once``)."""
    for _, obj in sorted(vars(cls).items()):
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        origin = getattr(obj.fget if isinstance(obj, property) else obj, "__module__", None)
        if isinstance(origin, str) and origin.partition(".")[0] not in sys.stdlib_module_names:
            continue
        if inspect.isclass(obj) or inspect.isroutine(obj) or inspect.isdatadescriptor(obj):
            yield _own_doc(obj)


def _topic_docs() -> Iterator[str]:
    """The reference manual's help topics by name, cut by ``_pack``; a paragraph of more than
    100 characters that an earlier topic holds is left out."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return
    seen: set[str] = set()
    for name in sorted(topics):
        paragraphs = []
        for paragraph in re.split(r"\n[ \t]*\n+", topics[name].strip()):
            paragraph = paragraph.strip("\n").rstrip()
            if paragraph.strip() and not (len(paragraph) > 100 and paragraph in seen):
                seen.add(paragraph)
                paragraphs.append(paragraph)
        yield from _pack(paragraphs)


def _heading_level(paragraph: str) -> int | None:
    """0 for a title underlined with ``*``, 1 with ``=``, 2 with ``-``, ...; None for a
    paragraph that is not a title."""
    lines = paragraph.split("\n")
    if len(lines) == 2 and _UNDERLINE.fullmatch(lines[1]) and len(set(lines[1])) == 1:
        return _MARKS.index(lines[1][0])
    return None


def _drop_bare_headings(paragraphs: list[str]) -> list[str]:
    """Without the titles of empty sections (an earlier topic held their paragraphs): a title
    that nothing but a title of the same or a higher level, or the end, follows."""
    kept: list[str] = []  # reversed
    for paragraph in reversed(paragraphs):
        level = _heading_level(paragraph)
        if level is not None:
            following = _heading_level(kept[-1]) if kept else -1
            if following is not None and following <= level:
                continue
        kept.append(paragraph)
    return kept[::-1]


def _pack(paragraphs: list[str], limit: int = TOPIC_CHARS) -> list[str]:
    """Paragraphs joined by blank lines into documents of at most ``limit`` characters (a
    longer paragraph stays whole); a title starts a new document once the current one holds a
    quarter of ``limit``, and never ends one; a final document of at most ``MIN_DOC_CHARS``
    joins the one before."""
    docs: list[str] = []
    current: list[str] = []
    size = 0
    for paragraph in _drop_bare_headings(paragraphs):
        heading = _heading_level(paragraph) is not None
        if current and (size + len(paragraph) > limit or (heading and size >= limit // 4)):
            carried = [current.pop()] if _heading_level(current[-1]) is not None else []
            if current:
                docs.append("\n\n".join(current))
            current = carried
            size = sum(len(p) + 2 for p in current)
        current.append(paragraph)
        size += len(paragraph) + 2
    if current:
        tail = "\n\n".join(current)
        if docs and len(tail) <= MIN_DOC_CHARS:
            docs[-1] += "\n\n" + tail
        else:
            docs.append(tail)
    return docs


def byte_batches(text: str, *, seq_len: int, batch_size: int, seed: int) -> "torch.Generator":
    """Endless batches ``(batch_size, seq_len)`` of byte ids (vocabulary 256), random windows
    drawn with a seeded generator."""
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=gen)
        yield torch.stack([data[s:s + seq_len] for s in starts.tolist()])
