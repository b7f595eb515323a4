"""Training data of ``qgalore-train``: documents through HF ``datasets``, tokenized, packed into
fixed-length sequences, sharded by rank, in an order fixed by the seed, with a position that
checkpoints save so a resumed run sees no sample twice and skips none.

    data = build_data(cfg.data, rank=rank, world=world)     # every rank; rank 0 builds caches
    stream = TrainStream(data, rank=rank, world=world, micro_batch=8, seed=cfg.seed)
    batch = stream.next_batch()                             # LongTensor (8, seq_len)
    state = stream.state_dict()                             # JSON; put it in the checkpoint
    for batch in val_batches(data, rank=rank, world=world, micro_batch=8): ...

Sources (``data.source``): ``builtin`` (documentation shipped with Python, no network), ``c4``
(``allenai/c4`` ``en``, streamed), or local files: ``.txt`` (one document per blank-line
separated paragraph), ``.jsonl``/``.json``/``.parquet`` (one document per record, in
``data.text_field``); ``.txt``/``.json(l)`` may be compressed (``.gz``, ``.bz2``, ``.xz``).
A path may be one file, a directory (searched recursively) or a glob; all of one format.

Finite sources (the default) are tokenized once and cached as packed ``int32`` arrays: the
training order is then a global cursor over seeded per-epoch permutations (``TrainStream``),
the same at every world size.  Streaming sources (``data.streaming`` or ``c4``) are read
document by document, split by rank with ``datasets.distributed.split_dataset_by_node``
(``StreamingTrainStream``); their position is per rank.  ``Data``, the two streams and
``val_batches`` live in ``.stream`` and are re-exported here.

Held-out documents are chosen by a hash of their text (``is_validation``), so the same
documents are held out at every seed and world size, in finite and streaming mode alike.
"""

from __future__ import annotations

import datetime
import functools
import glob
import hashlib
import json
import os
import platform
import shutil
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from .corpus import BUILTIN_VERSION
from .corpus import builtin_documents as _builtin_documents
from .stream import Data, StreamingTrainStream, TrainStream, _check_placement, _digest, val_batches
from .tokenizer import Tokenizer, load_tokenizer

__all__ = ["DataConfig", "Data", "TrainStream", "StreamingTrainStream", "build_data", "builtin_documents",
           "cache_root", "is_validation", "val_batches"]

BUILTIN_MAX_CHARS = 2_000_000
"""The ``builtin`` corpus stops at this many characters (as ``qgalore_dist.data.builtin_text``;
all of it, ~1.6M characters on CPython 3.11)."""
BPE_TRAIN_CHARS = 4_000_000
"""The ``bpe`` tokenizer trains on at most this many characters of training text."""
BUILD_TIMEOUT = datetime.timedelta(hours=2)
"""How long ranks wait for rank 0 to build the caches (tokenizing a big corpus takes a while)."""
C4 = ("allenai/c4", "en")
_FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_COMPRESSION = (".gz", ".bz2", ".xz")  # datasets decompresses these on the fly (text and json)


@dataclass(kw_only=True)
class DataConfig:
    source: str = "builtin"
    """``builtin`` (documentation shipped with Python, ~1.6M characters of English: stdlib
    docstrings and the reference manual's help topics; no network; see ``qgalore_dist.data``), ``c4``
    (``allenai/c4`` ``en``, always streamed), or a local ``.txt`` (documents are blank-line
    separated paragraphs) / ``.jsonl`` / ``.json`` / ``.parquet`` file, a directory of such
    files (recursive) or a glob."""
    text_field: str = "text"
    """The field holding the document text in jsonl/json/parquet records."""
    streaming: bool = False
    """Read the source with ``datasets``' streaming mode instead of packing it once (always on
    for ``c4``).  The position is then per rank: resume at the same world size."""
    val_fraction: float = 0.02
    """Share of documents held out for validation (chosen by a hash of their text); ``c4`` uses
    its own validation split instead.  0 disables validation."""
    val_sequences: int = 64
    """Packed validation sequences evaluation uses, across all ranks (rounded down to a
    multiple of the world size so every rank runs the same number of forward passes)."""
    seq_len: int = 128
    """Tokens per packed sequence."""
    tokenizer: str = "bpe"
    """``bpe`` (byte-level BPE trained on the training documents with HF ``tokenizers``),
    ``byte`` (raw UTF-8 bytes, vocabulary 257), a path ending in ``.model`` (SentencePiece), or
    an HF tokenizer name or local directory (``AutoTokenizer``)."""
    vocab_size: int = 2048
    """Vocabulary size of the trained ``bpe`` tokenizer (at least 257: 256 bytes and EOS)."""
    cache_dir: str | None = None
    """Where built corpora, tokenizers and token arrays are cached (shared by all ranks);
    default ``$QGALORE_CACHE`` or ``~/.cache/qgalore_dist``."""
    seed: int = 0
    """Seed of the training order (per-epoch permutations of the packed sequences)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """``ValueError`` naming the field for a bad value; ``FileNotFoundError`` naming
        ``data.source`` (or ``data.tokenizer``) for a missing path."""
        for name in ("source", "text_field", "tokenizer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"data.{name} must be a non-empty string, got {value!r}")
        for name, low in (("seq_len", 2), ("val_sequences", 0), ("vocab_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"data.{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.val_fraction, (int, float)) or not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if not isinstance(self.streaming, bool):
            raise ValueError(f"data.streaming must be true or false, got {self.streaming!r}")
        if self.tokenizer == "bpe" and self.vocab_size < 257:
            raise ValueError(f"data.vocab_size must be >= 257 for the byte-level bpe tokenizer, got {self.vocab_size}")
        if self.tokenizer.endswith(".model") and not os.path.isfile(self.tokenizer):
            raise FileNotFoundError(f"data.tokenizer: SentencePiece model {self.tokenizer!r} does not exist")
        if self.cache_dir is not None and not isinstance(self.cache_dir, str):
            raise ValueError(f"data.cache_dir must be a path or null, got {self.cache_dir!r}")
        if self.source not in ("builtin", "c4"):
            resolve_files(self.source)


# ----------------------------------------------------------------------------- sources


def _format_of(path: str) -> str | None:
    """The ``datasets`` builder reading ``path`` (by extension), or None if unsupported."""
    name = os.path.basename(path).lower()
    for ext in _COMPRESSION:
        if name.endswith(ext) and not name.endswith(".parquet" + ext):
            name = name[: -len(ext)]
    return _FORMATS.get(os.path.splitext(name)[1])


def resolve_files(source: str) -> tuple[str, list[str]]:
    """``(builder, sorted absolute files)`` of a local ``data.source``; ``FileNotFoundError``
    or ``ValueError`` naming ``data.source`` when it names nothing usable."""
    path = os.path.expanduser(source)
    if any(c in path for c in "*?["):
        candidates = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    elif os.path.isdir(path):
        candidates = sorted(os.path.join(root, f) for root, dirs, files in os.walk(path)
                            for f in files if not f.startswith("."))
    elif os.path.isfile(path):
        candidates = [path]
    else:
        raise FileNotFoundError(f"data.source: no such file or directory: {source!r} (expected 'builtin', 'c4', "
                                f"or a .txt/.jsonl/.json/.parquet file, a directory or a glob of them)")
    files = [os.path.abspath(p) for p in candidates if _format_of(p)]
    if not files:
        raise FileNotFoundError(f"data.source: {source!r} holds no .txt/.jsonl/.json/.parquet file")
    builders = sorted({_format_of(p) for p in files})
    if len(builders) > 1:
        raise ValueError(f"data.source: {source!r} mixes formats {builders}; point it at files of one format")
    return builders[0], files


def builtin_documents(max_chars: int | None = None) -> Iterator[str]:
    """The documents of ``qgalore_dist.data.builtin_text`` one by one (default: up to
    ``BUILTIN_MAX_CHARS``): ``"\\n\\n".join(docs)[:max_chars]`` equals ``builtin_text(max_chars)``
    (docstrings themselves contain blank lines, so that string cannot be split back)."""
    return _builtin_documents(BUILTIN_MAX_CHARS if max_chars is None else max_chars)


@dataclass(frozen=True)
class _Source:
    """A resolved ``data.source``: ``kind`` is ``c4`` or ``files`` (``builtin`` becomes a
    cached jsonl file); ``strip`` strips blank-line-split paragraphs of ``.txt`` files."""

    kind: str
    label: str
    builder: str = ""
    files: tuple[str, ...] = ()
    field: str = "text"
    fingerprint: str = ""

    @property
    def strip(self) -> bool:
        return self.builder == "text"


def cache_root(cfg: DataConfig) -> str:
    """``data.cache_dir``, else ``$QGALORE_CACHE``, else ``~/.cache/qgalore_dist``."""
    return os.path.abspath(os.path.expanduser(
        cfg.cache_dir or os.environ.get("QGALORE_CACHE") or os.path.join("~", ".cache", "qgalore_dist")))


def _builtin_jsonl(root: str) -> str:
    """The builtin corpus as ``{"text": doc}`` lines, written once per Python version (and
    corpus recipe: ``BUILTIN_VERSION``)."""
    name = f"stdlib-docs-v{BUILTIN_VERSION}-{platform.python_version()}-{BUILTIN_MAX_CHARS}.jsonl"
    path = os.path.join(root, "builtin", name)
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in builtin_documents(BUILTIN_MAX_CHARS):
                f.write(json.dumps({"text": doc}) + "\n")
        os.replace(tmp, path)  # atomic: a concurrent reader sees no half-written corpus
    return path


def _resolve_source(cfg: DataConfig, root: str) -> _Source:
    if cfg.source == "c4":
        return _Source(kind="c4", label="c4 (allenai/c4 en)", fingerprint=_digest("c4-v1", *C4, cfg.text_field),
                       field=cfg.text_field)
    if cfg.source == "builtin":
        path = _builtin_jsonl(root)
        with open(path, "rb") as f:
            fingerprint = _digest("builtin", hashlib.sha256(f.read()).hexdigest())
        return _Source(kind="files", label="builtin corpus", builder="json", files=(path,), fingerprint=fingerprint)
    builder, files = resolve_files(cfg.source)
    # Size and modification time, like make: hashing gigabytes of text on every start is slow.
    stats = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in files]
    field_ = "text" if builder == "text" else cfg.text_field  # datasets' text builder has one column, "text"
    return _Source(kind="files", label=cfg.source, builder=builder, files=tuple(files), field=field_,
                   fingerprint=_digest("files-v1", builder, field_, stats))


def _load_dataset(src: _Source, root: str, *, streaming: bool, split: str = "train"):
    """The source as a ``datasets`` Dataset (or IterableDataset when ``streaming``)."""
    import datasets

    if src.kind == "c4":
        return datasets.load_dataset(C4[0], C4[1], split=split, streaming=True)
    kwargs = {"sample_by": "paragraph"} if src.builder == "text" else {}
    try:
        ds = datasets.load_dataset(src.builder, data_files=list(src.files), split="train", streaming=streaming,
                                   cache_dir=os.path.join(root, "hf_datasets"), **kwargs)
    except MemoryError:
        raise
    except Exception as exc:  # a corrupt file: say which source, keep the cause chained
        cause = exc.__cause__ or exc
        raise ValueError(f"data.source: cannot read {src.label!r} as {src.builder}: "
                         f"{type(cause).__name__}: {cause}") from exc
    columns = ds.column_names
    if columns is not None and src.field not in columns:
        raise ValueError(f"data.text_field: {src.field!r} is not a field of {src.label!r} (fields: {columns})")
    return ds


def _clean(text: Any, strip: bool) -> str | None:
    """The document, or None for an empty one (skipped everywhere)."""
    if not isinstance(text, str):
        if text is None:
            return None
        raise ValueError(f"data.text_field must name a text field, got a {type(text).__name__} value")
    if strip:
        text = text.strip()
    return text if text.strip() else None


def _doc_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def is_validation(text: str, val_fraction: float) -> bool:
    """Whether a document is held out: its 64-bit BLAKE2b hash, as a fraction of 2**64, is
    below ``val_fraction``.  Depends on the text alone (not on seed, order or world size), and
    duplicates land on the same side."""
    return is_validation_hash(_doc_hash(text), val_fraction)


def is_validation_hash(doc_hash: int, val_fraction: float) -> bool:
    """``is_validation`` given the document's ``_doc_hash``."""
    return val_fraction > 0 and doc_hash < int(val_fraction * 2**64)


def _batched(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


# ----------------------------------------------------------------------------- packing


class _Packer:
    """Concatenates ``doc0 EOS doc1 EOS ...`` and cuts the stream into ``seq_len`` rows."""

    def __init__(self, tokenizer: Tokenizer, seq_len: int) -> None:
        assert tokenizer.vocab_size < 2**31, "token ids are stored as int32"
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.chunks: list[np.ndarray] = []
        self.tokens = 0
        self.docs = 0

    def add(self, docs: list[str]) -> None:
        eos = self.tokenizer.eos_id
        for ids in self.tokenizer.encode_batch(docs):
            self.chunks.append(np.asarray([*ids, eos], dtype=np.int32))
            self.tokens += len(ids) + 1
        self.docs += len(docs)

    def rows(self, limit: int | None = None) -> np.ndarray:
        """``(n, seq_len)`` int32: the first ``n*seq_len`` tokens (the tail is dropped)."""
        flat = np.concatenate(self.chunks) if self.chunks else np.empty(0, np.int32)
        n = len(flat) // self.seq_len if limit is None else min(limit, len(flat) // self.seq_len)
        return flat[: n * self.seq_len].reshape(n, self.seq_len)


class _Corpus:
    """The documents of a finite source and their train/validation split (computed lazily:
    nothing is read when every cache is already there)."""

    def __init__(self, src: _Source, cfg: DataConfig, root: str) -> None:
        self.src, self.cfg, self.root = src, cfg, root

    @functools.cached_property
    def dataset(self):
        return _load_dataset(self.src, self.root, streaming=False)

    def documents(self) -> Iterator[str]:
        for batch in self.dataset.iter(batch_size=1000):
            for text in batch[self.src.field]:
                doc = _clean(text, self.src.strip)
                if doc is not None:
                    yield doc

    @functools.cached_property
    def split(self) -> tuple[np.ndarray, np.ndarray]:
        """``(is_val, chars)`` per document, bool and int64 arrays."""
        hashes, chars = [], []
        for doc in self.documents():
            hashes.append(_doc_hash(doc))
            chars.append(len(doc))
        if not hashes:
            raise ValueError(f"data.source: {self.src.label!r} holds no non-empty document")
        is_val = np.array([is_validation_hash(h, self.cfg.val_fraction) for h in hashes], dtype=bool)
        if self.cfg.val_fraction > 0 and not is_val.any() and len(hashes) > 1:
            is_val[int(np.argmin(np.array(hashes, dtype=np.uint64)))] = True  # tiny corpora: hold out one
        if is_val.all():
            raise ValueError(f"data.source: {self.src.label!r} has {len(hashes)} document(s), all held out by "
                             f"data.val_fraction={self.cfg.val_fraction}; use more documents or a smaller fraction")
        return is_val, np.array(chars, dtype=np.int64)

    def bpe_training_texts(self) -> Iterator[str]:
        """Training documents, every k-th one so that about ``BPE_TRAIN_CHARS`` remain."""
        is_val, chars = self.split
        stride = max(1, -(-int(chars[~is_val].sum()) // BPE_TRAIN_CHARS))
        k = 0
        for doc, val in zip(self.documents(), is_val):
            if not val:
                if k % stride == 0:
                    yield doc
                k += 1

    def pack(self, tokenizer: Tokenizer, seq_len: int) -> tuple[np.ndarray, np.ndarray, dict]:
        """``(train, val, stats)``: packed ``(N, seq_len)`` and ``(V, seq_len)`` int32 rows."""
        is_val, chars = self.split
        packers = {False: _Packer(tokenizer, seq_len), True: _Packer(tokenizer, seq_len)}
        pending: dict[bool, list[str]] = {False: [], True: []}
        for doc, val in zip(self.documents(), is_val.tolist()):
            pending[val].append(doc)
            if len(pending[val]) == 1000:
                packers[val].add(pending[val])
                pending[val] = []
        for val in (False, True):
            packers[val].add(pending[val])
        train, val = packers[False].rows(), packers[True].rows()
        if len(train) == 0:
            raise ValueError(f"data.source: {self.src.label!r} yields {packers[False].tokens} training tokens, "
                             f"fewer than one sequence of data.seq_len={seq_len}")
        stats = {"chars": int(chars.sum()), "docs": len(is_val), "val_docs": int(is_val.sum()),
                 "train_tokens": packers[False].tokens, "val_tokens": packers[True].tokens}
        return train, val, stats


# ----------------------------------------------------------------------------- builds (rank 0)


def _write_arrays(directory: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """``<name>.npy`` files and ``meta.json`` in ``directory``, written atomically: built in a
    temporary sibling and renamed into place (a concurrent identical build wins harmlessly)."""
    tmp = f"{directory}.tmp-{uuid.uuid4().hex}"
    os.makedirs(tmp)
    for name, array in arrays.items():
        np.save(os.path.join(tmp, f"{name}.npy"), array)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    try:
        os.replace(tmp, directory)
    except OSError:  # the directory appeared meanwhile (another builder)
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(os.path.join(directory, "meta.json")):
            raise


def _tokenizer(cfg: DataConfig, root: str, corpus_key: str,
               training_texts: Callable[[], Iterable[str]] | None = None) -> Tokenizer:
    return load_tokenizer(cfg.tokenizer, vocab_size=cfg.vocab_size, cache_dir=root, corpus_key=corpus_key,
                          training_texts=training_texts)


def _build_packed(cfg: DataConfig, src: _Source, root: str) -> tuple[dict, Tokenizer]:
    """Tokenizer and packed train/val arrays of a finite source, from the cache or built."""
    corpus = _Corpus(src, cfg, root)
    tok_key = _digest("corpus-v1", src.fingerprint, cfg.val_fraction, BPE_TRAIN_CHARS)
    tok = _tokenizer(cfg, root, tok_key, corpus.bpe_training_texts)
    key = _digest("packed-v1", src.fingerprint, tok.fingerprint, cfg.seq_len, cfg.val_fraction)
    directory = os.path.join(root, "packed", key)
    if not os.path.isfile(os.path.join(directory, "meta.json")):
        train, val, stats = corpus.pack(tok, cfg.seq_len)
        _write_arrays(directory, {"train": train, "val": val}, stats)
    return {"mode": "packed", "dir": directory, "tokenizer_key": tok_key, "fingerprint": key}, tok


def _iter_docs(ds, src: _Source) -> Iterator[str]:
    for example in ds:
        doc = _clean(example[src.field], src.strip)
        if doc is not None:
            yield doc


def _keep_for_training(text: Any, strip: bool, val_fraction: float) -> bool:
    doc = _clean(text, strip)
    return doc is not None and not is_validation(doc, val_fraction)


def _train_iterable(src: _Source, cfg: DataConfig, root: str, *, rank: int, world: int):
    """This rank's training documents as a ``datasets.IterableDataset`` (held-out documents
    of local sources filtered out; c4's train split is all training)."""
    from datasets.distributed import split_dataset_by_node

    ds = _load_dataset(src, root, streaming=True)
    if src.kind == "files" and cfg.val_fraction > 0:
        field_, strip, fraction = src.field, src.strip, cfg.val_fraction
        ds = ds.filter(lambda ex: _keep_for_training(ex[field_], strip, fraction))
    # Whole files per rank when their number divides the world size, else every world-th example.
    return split_dataset_by_node(ds, rank=rank, world_size=world) if world > 1 else ds


def _val_documents(src: _Source, cfg: DataConfig, root: str) -> Iterator[str]:
    if src.kind == "c4":
        yield from _iter_docs(_load_dataset(src, root, streaming=True, split="validation"), src)
    elif cfg.val_fraction > 0:
        for doc in _iter_docs(_load_dataset(src, root, streaming=True), src):
            if is_validation(doc, cfg.val_fraction):
                yield doc


def _build_streaming(cfg: DataConfig, src: _Source, root: str) -> tuple[dict, Tokenizer]:
    """Tokenizer (bpe: trained on the first ``BPE_TRAIN_CHARS`` of the training stream) and the
    first ``val_sequences`` packed validation sequences of a streaming source."""
    tok_key = _digest("stream-v1", src.fingerprint, cfg.val_fraction, BPE_TRAIN_CHARS)

    def training_texts() -> Iterator[str]:
        total = 0
        for doc in _iter_docs(_train_iterable(src, cfg, root, rank=0, world=1), src):
            yield doc
            total += len(doc)
            if total >= BPE_TRAIN_CHARS:
                return

    tok = _tokenizer(cfg, root, tok_key, training_texts)
    fingerprint = _digest("stream-v1", src.fingerprint, tok.fingerprint, cfg.seq_len, cfg.val_fraction)
    directory = os.path.join(root, "packed", _digest(fingerprint, cfg.val_sequences))
    if not os.path.isfile(os.path.join(directory, "meta.json")):
        packer, need = _Packer(tok, cfg.seq_len), cfg.val_sequences * cfg.seq_len
        for docs in _batched(_val_documents(src, cfg, root) if need else (), 64):
            packer.add(docs)
            if packer.tokens >= need:
                break
        _write_arrays(directory, {"val": packer.rows(cfg.val_sequences)},
                      {"val_docs": packer.docs, "val_tokens": min(packer.tokens, need)})
    manifest = {"mode": "streaming", "dir": directory, "tokenizer_key": tok_key, "fingerprint": fingerprint}
    return manifest, tok


def _build(cfg: DataConfig, root: str) -> tuple[dict, Tokenizer]:
    """Everything ranks load, built where missing; returns the manifest that names it."""
    src = _resolve_source(cfg, root)
    manifest, tok = (_build_streaming if cfg.streaming or src.kind == "c4" else _build_packed)(cfg, src, root)
    manifest["source"] = {"kind": src.kind, "label": src.label, "builder": src.builder, "files": list(src.files),
                          "field": src.field, "fingerprint": src.fingerprint}
    return manifest, tok


# ----------------------------------------------------------------------------- build_data


def _si(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}" if n < 10 * scale else f"{n / scale:.0f}{unit}"
    return str(n)


def _describe(cfg: DataConfig, src: _Source, stats: dict, tok: Tokenizer, train: np.ndarray | None,
              val: np.ndarray, world: int) -> str:
    used = min(len(val), cfg.val_sequences) // world * world
    tail = f"{tok.name} vocab {tok.vocab_size:,}; eval on {used} val sequences"
    if train is None:
        origin = "c4 validation" if src.kind == "c4" else "held-out documents"
        return (f"{src.label} (streaming, {world} rank(s)): {len(val):,} val sequences of {cfg.seq_len} "
                f"({stats['val_docs']:,} docs) from {origin}, {tail}")
    return (f"{src.label}: {_si(stats['chars'])} chars, {stats['docs']:,} docs ({stats['val_docs']:,} held out), "
            f"{_si(stats['train_tokens'])} train tokens / {_si(stats['val_tokens'])} val tokens, "
            f"{len(train):,} train sequences of {cfg.seq_len}, {tail}")


def _load_array(path: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:  # numpy cannot memory-map an empty array
        return np.load(path)


def _load(cfg: DataConfig, manifest: dict, root: str, *, rank: int, world: int,
          tokenizer: Tokenizer | None) -> Data:
    """Every rank: open what rank 0 built (the cache must be on a filesystem all ranks share)."""
    directory = manifest["dir"]
    try:
        tok = tokenizer or _tokenizer(cfg, root, manifest["tokenizer_key"])
        with open(os.path.join(directory, "meta.json")) as f:
            stats = json.load(f)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"rank {rank} cannot see the data cache rank 0 built under {root} ({exc}); "
                                f"set data.cache_dir to a directory every node shares") from exc
    src = _Source(**{**manifest["source"], "files": tuple(manifest["source"]["files"])})
    val = _load_array(os.path.join(directory, "val.npy"))
    train = _load_array(os.path.join(directory, "train.npy")) if manifest["mode"] == "packed" else None
    streaming = {} if train is not None else {
        "open_documents": functools.partial(_train_iterable, src, cfg, root),
        "clean": functools.partial(_clean, strip=src.strip)}
    return Data(config=cfg, tokenizer=tok, train=train, val=val, rank=rank, world=world, stats=stats,
                fingerprint=manifest["fingerprint"], source=src, root=root,
                description=_describe(cfg, src, stats, tok, train, val, world), **streaming)


def _gather_or_raise(error: Exception | None, value: Any, group) -> list[Any]:
    """Collective: every rank's ``value``, or, if any rank failed, an exception on every rank
    (the failing rank re-raises its own; the others a builtin exception of the same type, else
    RuntimeError, naming the failing rank)."""
    import builtins

    gathered: list[Any] = [None] * torch.distributed.get_world_size(group)
    mine = ("ok", value) if error is None else ("error", type(error).__name__, str(error))
    torch.distributed.all_gather_object(gathered, mine, group=group)
    if error is not None:
        raise error
    for r, item in enumerate(gathered):
        if item[0] == "error":
            exc_type = getattr(builtins, item[1], None)
            message = f"data build failed on rank {r}: {item[2]}"
            if not (isinstance(exc_type, type) and issubclass(exc_type, Exception)):
                exc_type, message = RuntimeError, f"data build failed on rank {r}: {item[1]}: {item[2]}"
            raise exc_type(message)
    return [item[1] for item in gathered]


def build_data(cfg: DataConfig, *, rank: int = 0, world: int = 1) -> Data:
    """The data of this rank: tokenizer, packed (or streamed) training sequences, validation
    sequences and a log line.  Call on every rank (after the process group is initialized).

    Rank 0 builds the caches under ``cache_root(cfg)`` while the others wait; a failure there
    (a bad file, an unreadable parquet) raises on every rank at the same point rather than
    leaving the others at a barrier.  Without an initialized process group every caller builds
    what is missing itself (cache writes are atomic, so concurrent builders are safe).
    """
    cfg.validate()
    _check_placement(rank, world, 1)
    root = cache_root(cfg)
    dist = torch.distributed
    if not (world > 1 and dist.is_available() and dist.is_initialized()):
        manifest, tok = _build(cfg, root)
        return _load(cfg, manifest, root, rank=rank, world=world, tokenizer=tok)
    if dist.get_world_size() != world:
        raise ValueError(f"world={world} but the process group has {dist.get_world_size()} ranks")
    # A gloo group with a long timeout: tokenizing a big corpus may outlast the default
    # group's (NCCL: 10 minutes), and object collectives on gloo need no CUDA device.
    group = dist.new_group(backend="gloo", timeout=BUILD_TIMEOUT)
    try:
        manifest, tok, error = None, None, None
        if rank == 0:
            try:
                manifest, tok = _build(cfg, root)
            except Exception as exc:
                error = exc
        manifest = _gather_or_raise(error, manifest, group)[0]
        data, error = None, None
        try:  # e.g. a node that does not see rank 0's cache: every rank must hear of it
            data = _load(cfg, manifest, root, rank=rank, world=world, tokenizer=tok)
        except Exception as exc:
            error = exc
        _gather_or_raise(error, None, group)
        return data
    finally:
        dist.destroy_process_group(group)
