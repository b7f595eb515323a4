"""Order and position of ``qgalore-train``'s training data: ``Data`` (what ``build_data`` in
``.data`` returns), ``TrainStream`` (packed data: a global cursor over seeded per-epoch
permutations, the same at every world size), ``StreamingTrainStream`` (streaming sources: per
rank) and ``val_batches``.  ``.data`` re-exports all of them.

This module does not import ``.data`` (``.data`` imports it): a streaming ``Data`` carries the
two functions ``StreamingTrainStream`` needs from there (``open_documents``, ``clean``).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from .tokenizer import Tokenizer

__all__ = ["Data", "StreamingTrainStream", "TrainStream", "val_batches"]


def _digest(*parts: Any) -> str:
    """A short stable hash of JSON-able ``parts``: the seed of each epoch's order here, and the
    cache keys of ``.data``."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Data:
    """What ``build_data`` returns to every rank.

    ``train``: ``(N, seq_len)`` int32 packed training sequences (a read-only memory map), or
    None for streaming sources.  ``val``: ``(V, seq_len)`` int32 validation sequences in a
    fixed order (all of them for finite sources, the first ``val_sequences`` when streaming).
    ``description``: one line for the log; ``stats``: the counts behind it.
    """

    config: Any
    """The ``DataConfig`` it was built from."""
    tokenizer: Tokenizer
    train: np.ndarray | None
    val: np.ndarray
    description: str
    rank: int
    world: int
    fingerprint: str
    stats: dict = field(default_factory=dict)
    source: Any = field(default=None, repr=False)
    """The resolved source (``.data``'s record of kind, files, text field)."""
    root: str = ""
    open_documents: Callable[..., Any] | None = field(default=None, repr=False)
    """Streaming sources: ``open_documents(rank=, world=)`` -> a fresh ``IterableDataset`` of this
    rank's training examples (None for packed data)."""
    clean: Callable[[Any], str | None] | None = field(default=None, repr=False)
    """Streaming sources: an example's text field -> the document, or None to skip it."""

    @property
    def streaming(self) -> bool:
        return self.train is None

    def train_stream(self, *, micro_batch: int, seed: int | None = None) -> "TrainStream":
        """``TrainStream(self, ...)`` at this rank."""
        return TrainStream(self, rank=self.rank, world=self.world, micro_batch=micro_batch, seed=seed)

    def val_batches(self, *, micro_batch: int) -> Iterator[torch.Tensor]:
        """``val_batches(self, ...)`` at this rank."""
        return val_batches(self, micro_batch=micro_batch)


def _check_placement(rank: int, world: int, micro_batch: int) -> None:
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world={world}), got {rank}")
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")


class TrainStream:
    """This rank's training micro-batches, LongTensors ``(micro_batch, seq_len)``.

    ``TrainStream(data, ...)`` of streaming ``Data`` is a ``StreamingTrainStream``.  For packed
    data (or a bare ``(N, seq_len)`` array): epoch ``e`` visits the ``N`` sequences in
    ``torch.randperm(N)`` order seeded by ``(seed, e)``, and global sample ``g`` is sequence
    ``perm_{g // N}[g % N]``.  Each ``next_batch`` is one micro-step ``k`` (counting every
    micro-batch of every optimizer step): rank ``r`` takes global samples
    ``(k*world + r)*micro_batch`` ... ``+ micro_batch - 1``.  The position (global samples
    consumed, the same on every rank) is all a checkpoint needs: resumed at another world size
    with the same global batch, a run sees no sample twice and skips none.
    """

    def __new__(cls, data: Any, **kwargs: Any) -> "TrainStream":
        if cls is TrainStream and isinstance(data, Data) and data.streaming:
            cls = StreamingTrainStream
        return super().__new__(cls)

    def __init__(self, data: Data | np.ndarray, *, rank: int, world: int, micro_batch: int,
                 seed: int | None = None) -> None:
        _check_placement(rank, world, micro_batch)
        if isinstance(data, Data):
            sequences, self.fingerprint = data.train, data.fingerprint
            seed = data.config.seed if seed is None else seed
        else:
            sequences, self.fingerprint = data, ""
        if seed is None:
            raise ValueError("seed is required for a bare array of sequences")
        assert sequences is not None and sequences.ndim == 2 and len(sequences) > 0, "(N >= 1, seq_len) rows"
        self.sequences, self.rank, self.world, self.micro_batch, self.seed = sequences, rank, world, micro_batch, seed
        self.position = 0
        self._perms: dict[int, np.ndarray] = {}
        self.last_sample_ids: list[int] = []
        self.last_rows: list[int] = []

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a batch rarely spans more than two epochs; keep memory flat
                self._perms.pop(min(self._perms))
            gen = torch.Generator().manual_seed(int(_digest("order", self.seed, epoch), 16) & (2**63 - 1))
            self._perms[epoch] = torch.randperm(len(self.sequences), generator=gen).numpy()
        return self._perms[epoch]

    def rows_of(self, sample_ids: Iterable[int]) -> np.ndarray:
        """The packed row of each global sample index."""
        epochs, offsets = np.divmod(np.asarray(list(sample_ids), dtype=np.int64), len(self.sequences))
        rows = np.empty_like(offsets)
        for epoch in np.unique(epochs).tolist():
            mask = epochs == epoch
            rows[mask] = self._perm(epoch)[offsets[mask]]
        return rows

    def next_batch(self) -> torch.Tensor:
        start = self.position + self.rank * self.micro_batch
        ids = range(start, start + self.micro_batch)
        rows = self.rows_of(ids)
        self.last_sample_ids, self.last_rows = list(ids), rows.tolist()
        self.position += self.world * self.micro_batch
        return torch.from_numpy(np.asarray(self.sequences[rows], dtype=np.int64))

    def sample_ids(self) -> list[int]:
        """Global sample indices of the last batch (``last_rows``: their packed rows)."""
        return self.last_sample_ids

    def state_dict(self) -> dict:
        """``{"kind": "packed", "version": 1, "position", "num_sequences", "seq_len", "seed",
        "fingerprint"}``: JSON-serializable, identical on every rank."""
        return {"kind": "packed", "version": 1, "position": self.position, "num_sequences": len(self.sequences),
                "seq_len": int(self.sequences.shape[1]), "seed": self.seed, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; ``ValueError`` if it is for other data or another order, or
        its position is not a whole number of micro-steps at this world size and micro batch."""
        if state.get("kind") != "packed":
            raise ValueError(f"a data position of kind {state.get('kind')!r} cannot resume packed (finite) data")
        mine = self.state_dict()
        for key in ("num_sequences", "seq_len", "seed", "fingerprint"):
            if state.get(key) != mine[key]:
                raise ValueError(f"the checkpoint's data position is for other data ({key}: {state.get(key)!r}, "
                                 f"this run: {mine[key]!r}); resuming would repeat or skip samples")
        if int(state["position"]) % (self.world * self.micro_batch):
            raise ValueError(f"the checkpoint's data position {state['position']} is not a multiple of world x "
                             f"micro_batch = {self.world} x {self.micro_batch}; resume with the same global batch")
        self.position = int(state["position"])


class StreamingTrainStream(TrainStream):
    """Micro-batches of a streaming source: this rank's documents (``split_dataset_by_node``)
    in source order, tokenized one by one into a token buffer; at the end of the source the
    next epoch starts from the beginning.  ``seed`` is unused (c4 comes shuffled).

    The position is per rank: the IterableDataset's ``state_dict()`` after the last document
    taken, plus the leftover tokens.  Save every rank's ``state_dict()`` and give each rank its
    own back; ``load_state_dict`` refuses another rank or world size.
    """

    def __init__(self, data: Data, *, rank: int, world: int, micro_batch: int, seed: int | None = None) -> None:
        _check_placement(rank, world, micro_batch)
        assert data.streaming and data.open_documents is not None and data.clean is not None
        self.tokenizer, self.src, self.seq_len = data.tokenizer, data.source, data.config.seq_len
        self._make = functools.partial(data.open_documents, rank=rank, world=world)
        self._clean = data.clean
        self.rank, self.world, self.micro_batch, self.fingerprint = rank, world, micro_batch, data.fingerprint
        self.epoch, self.sequences = 0, 0
        self._buffer: list[int] = []
        self._ds_state: dict | None = None  # None: the start of self.epoch
        self._ds = self._it = None
        self._docs_this_epoch = 0
        self.last_sample_ids: list[int] = []

    def _next_doc(self) -> str:
        while True:
            if self._it is None:
                # A fresh IterableDataset each time: one that loaded a state restarts from it.
                self._ds = self._make()
                if self._ds_state is not None:
                    self._ds.load_state_dict(self._ds_state)
                    self._docs_this_epoch = max(self._docs_this_epoch, 1)
                self._it = iter(self._ds)
            try:
                example = next(self._it)
            except StopIteration:
                if self._docs_this_epoch == 0:
                    raise ValueError(f"data.source: rank {self.rank} of {self.world} got no training document "
                                     f"from {self.src.label!r}") from None
                self.epoch, self._ds_state, self._it, self._docs_this_epoch = self.epoch + 1, None, None, 0
                continue
            self._ds_state = self._ds.state_dict()
            doc = self._clean(example[self.src.field])
            if doc is not None:
                self._docs_this_epoch += 1
                return doc

    def next_batch(self) -> torch.Tensor:
        need = self.micro_batch * self.seq_len
        while len(self._buffer) < need:
            self._buffer.extend(self.tokenizer.encode_batch([self._next_doc()])[0])
            self._buffer.append(self.tokenizer.eos_id)
        out, self._buffer = self._buffer[:need], self._buffer[need:]
        self.last_sample_ids = list(range(self.sequences, self.sequences + self.micro_batch))
        self.sequences += self.micro_batch
        return torch.tensor(out, dtype=torch.long).view(self.micro_batch, self.seq_len)

    def sample_ids(self) -> list[int]:
        """This rank's own sequence counters of the last batch (not global indices)."""
        return self.last_sample_ids

    def state_dict(self) -> dict:
        """``{"kind": "streaming", "version": 1, "rank", "world", "seq_len", "fingerprint",
        "epoch", "sequences", "dataset": IterableDataset.state_dict() or None, "buffer": [ids]}``
        (JSON-serializable; differs per rank)."""
        return {"kind": "streaming", "version": 1, "rank": self.rank, "world": self.world, "seq_len": self.seq_len,
                "fingerprint": self.fingerprint, "epoch": self.epoch, "sequences": self.sequences,
                "dataset": self._ds_state, "buffer": list(self._buffer)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "streaming":
            raise ValueError(f"a data position of kind {state.get('kind')!r} cannot resume streaming data")
        if state.get("world") != self.world or state.get("rank") != self.rank:
            raise ValueError(f"a streaming data position is per rank: it was saved by rank {state.get('rank')} of "
                             f"{state.get('world')}, this is rank {self.rank} of {self.world}; resume streaming "
                             f"data at the same world size")
        for key in ("seq_len", "fingerprint"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"the checkpoint's data position is for other data ({key}: {state.get(key)!r}, "
                                 f"this run: {getattr(self, key)!r})")
        self.epoch, self.sequences = int(state["epoch"]), int(state["sequences"])
        self._ds_state, self._buffer = state["dataset"], [int(i) for i in state["buffer"]]
        self._it, self._docs_this_epoch = None, 0


def val_batches(data: Data, *, rank: int | None = None, world: int | None = None,
                micro_batch: int) -> Iterator[torch.Tensor]:
    """This rank's share of the first ``data.config.val_sequences`` validation sequences
    (rounded down to a multiple of ``world``): LongTensors ``(<= micro_batch, seq_len)`` in
    the same fixed order on every run.  Rank ``r`` gets the ``r``-th of ``world`` equal
    contiguous slices, so every rank runs the same number of forward passes of the same sizes
    (ZeRO-3 needs every rank in every forward).  Sum token losses and counts locally and
    all-reduce the two sums once after the loop."""
    rank, world = (data.rank if rank is None else rank), (data.world if world is None else world)
    _check_placement(rank, world, micro_batch)
    per_rank = min(len(data.val), data.config.val_sequences) // world
    mine = data.val[rank * per_rank:(rank + 1) * per_rank]
    for i in range(0, per_rank, micro_batch):
        yield torch.from_numpy(np.asarray(mine[i:i + micro_batch], dtype=np.int64))
