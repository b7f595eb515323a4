"""Tokenizers of ``qgalore-train``: one small interface over four kinds.

``data.tokenizer`` picks the kind:

* ``"bpe"``: a byte-level BPE trained with HF ``tokenizers`` on the training documents
  (``<|endoftext|>`` is the EOS), cached by (corpus fingerprint, vocab size).  The default for
  tiny models, whose embeddings a 32k vocabulary would dominate.
* ``"byte"``: raw UTF-8 bytes, ids 0..255, EOS 256 (vocabulary 257).
* a path ending in ``.model``: a SentencePiece model (needs the ``sentencepiece`` package).
* anything else: an HF tokenizer name or local directory, loaded with ``AutoTokenizer``.

Every kind encodes documents without adding special tokens (the packer appends EOS itself),
and saves itself as a directory that ``transformers.AutoTokenizer.from_pretrained`` loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from typing import Callable, Iterable, Sequence

__all__ = ["EOS_TOKEN", "BPETokenizer", "ByteTokenizer", "HFTokenizer", "SentencePieceTokenizer",
           "Tokenizer", "load_tokenizer"]

EOS_TOKEN = "<|endoftext|>"
"""The EOS (document separator) token of the ``bpe`` and ``byte`` tokenizers, as in GPT-2."""


class Tokenizer:
    """The interface the data pipeline uses.

    ``name``: short human name (``"bpe"``, ``"byte"``, a path or an HF name).
    ``eos_id``: id appended after every document.  ``vocab_size``: ids are in ``[0, vocab_size)``.
    ``fingerprint``: a string that changes whenever the id mapping may change (cache keys).
    """

    name: str
    eos_id: int
    vocab_size: int
    fingerprint: str

    @property
    def bos_id(self) -> int:
        """The id a model's config should name as ``bos_token_id``: documents are joined with
        EOS only, so it is the EOS id unless the tokenizer defines its own BOS."""
        return self.eos_id

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (``decode(encode(x)) == x`` for ``bpe`` and ``byte``)."""
        raise NotImplementedError

    def save(self, directory: str) -> None:
        """Write a directory that ``AutoTokenizer.from_pretrained(directory)`` loads."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _save_fast(tok, directory: str) -> None:
    """Save a ``tokenizers.Tokenizer`` whose EOS is ``EOS_TOKEN`` as a PreTrainedTokenizerFast dir."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN)
    fast.save_pretrained(directory)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, EOS 256."""

    name = "byte"
    eos_id = 256
    vocab_size = 257
    fingerprint = "byte-v1"

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, directory: str) -> None:
        # The same mapping as a merge-free byte-level BPE, so HF code can load it.
        from tokenizers import Tokenizer as HFTok
        from tokenizers import decoders, models, pre_tokenizers
        from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's byte alphabet

        vocab = {ch: b for b, ch in bytes_to_unicode().items()}
        tok = HFTok(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([EOS_TOKEN])
        assert tok.token_to_id(EOS_TOKEN) == self.eos_id
        _save_fast(tok, directory)


class BPETokenizer(Tokenizer):
    """A byte-level BPE (``tokenizers``), EOS ``<|endoftext|>``; round-trips any text exactly."""

    name = "bpe"

    def __init__(self, tok) -> None:
        self._tok = tok
        # A literal "<|endoftext|>" inside a document is text, not a document boundary.
        self._tok.encode_special_tokens = True
        self.eos_id = tok.token_to_id(EOS_TOKEN)
        assert self.eos_id is not None, "a bpe tokenizer must hold the EOS token"
        self.vocab_size = tok.get_vocab_size()
        self.fingerprint = "bpe-" + hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]

    @classmethod
    def train(cls, texts: Iterable[str], *, vocab_size: int) -> "BPETokenizer":
        """Train on ``texts`` (the caller caps their total size)."""
        from tokenizers import Tokenizer as HFTok
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTok(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTok

        return cls(HFTok.from_file(path))

    def to_file(self, path: str) -> None:
        """Write ``tokenizer.json`` atomically (concurrent writers leave one whole file)."""
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        self._tok.save(tmp)
        os.replace(tmp, path)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: str) -> None:
        _save_fast(self._tok, directory)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` (e.g. LLaMA's), encoded with the ``sentencepiece`` package."""

    def __init__(self, path: str) -> None:
        try:
            import sentencepiece as spm
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(f"data.tokenizer={path!r} is a SentencePiece model: pip install sentencepiece") from exc
        self.path = os.path.abspath(path)
        self._sp = spm.SentencePieceProcessor(model_file=self.path)
        self.name = path
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"data.tokenizer: SentencePiece model {path!r} defines no EOS piece")
        self.vocab_size = self._sp.get_piece_size()
        with open(self.path, "rb") as f:
            self.fingerprint = "sp-" + hashlib.sha256(f.read()).hexdigest()[:16]

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id() if self._sp.bos_id() >= 0 else self.eos_id

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    def save(self, directory: str) -> None:
        # The model file itself (exact), plus a config naming the HF class that reads it.
        # HF converts it to a fast tokenizer on load, which may split runs of spaces differently.
        os.makedirs(directory, exist_ok=True)
        shutil.copyfile(self.path, os.path.join(directory, "tokenizer.model"))
        sp = self._sp
        config = {"tokenizer_class": "LlamaTokenizer", "eos_token": sp.id_to_piece(self.eos_id),
                  "add_bos_token": False, "add_eos_token": False}
        if sp.bos_id() >= 0:
            config["bos_token"] = sp.id_to_piece(sp.bos_id())
        if sp.unk_id() >= 0:
            config["unk_token"] = sp.id_to_piece(sp.unk_id())
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=2)


class HFTokenizer(Tokenizer):
    """Any tokenizer ``AutoTokenizer.from_pretrained`` loads (a hub name or a local directory)."""

    def __init__(self, name_or_path: str) -> None:
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"data.tokenizer: cannot load {name_or_path!r} with AutoTokenizer "
                             f"(expected 'bpe', 'byte', a .model path, or an HF tokenizer): {exc}") from exc
        self.name = name_or_path
        if self._tok.eos_token_id is None:
            raise ValueError(f"data.tokenizer: {name_or_path!r} has no EOS token to separate documents")
        self.eos_id = int(self._tok.eos_token_id)
        self.vocab_size = len(self._tok)
        self.fingerprint = "hf-" + _path_digest(name_or_path)

    @property
    def bos_id(self) -> int:
        return self.eos_id if self._tok.bos_token_id is None else int(self._tok.bos_token_id)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._tok(list(texts), add_special_tokens=False, verbose=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))

    def save(self, directory: str) -> None:
        self._tok.save_pretrained(directory)


def _path_digest(name_or_path: str) -> str:
    """Digest of a local tokenizer directory's files (contents), or of a hub name."""
    h = hashlib.sha256(name_or_path.encode())
    if os.path.isdir(name_or_path):
        for entry in sorted(os.listdir(name_or_path)):
            path = os.path.join(name_or_path, entry)
            if os.path.isfile(path):
                h.update(entry.encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()[:16]


def load_tokenizer(spec: str, *, vocab_size: int, cache_dir: str, corpus_key: str,
                   training_texts: Callable[[], Iterable[str]] | None = None) -> Tokenizer:
    """The tokenizer ``spec`` names (see the module docstring).

    For ``"bpe"``: loaded from ``<cache_dir>/tokenizers/bpe-<vocab_size>-<corpus_key>`` when
    there, else trained on ``training_texts()`` and cached there.  With ``training_texts=None``
    a missing cache raises ``FileNotFoundError`` (ranks other than 0 only load).
    """
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        directory = os.path.join(cache_dir, "tokenizers", f"bpe-{vocab_size}-{corpus_key}")
        path = os.path.join(directory, "tokenizer.json")
        if os.path.isfile(path):
            return BPETokenizer.from_file(path)
        if training_texts is None:
            raise FileNotFoundError(f"no cached bpe tokenizer at {path}")
        tok = BPETokenizer.train(training_texts(), vocab_size=vocab_size)
        os.makedirs(directory, exist_ok=True)
        tok.to_file(path)
        return tok
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec)
    return HFTokenizer(spec)
