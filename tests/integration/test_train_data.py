"""The training data pipeline (``qgalore_dist.train.data``): sources, tokenizers, packing,
held-out split, seeded order, rank sharding, checkpointable position, caches, and the
rank-0 build of a 2-process gloo group.  Tiny fixtures in ``tmp_path``; never the network."""

from __future__ import annotations

import gzip
import json
import os
import random

import numpy as np
import pytest
import torch

from qgalore_dist.train import data as D
from qgalore_dist.train.tokenizer import BPETokenizer, ByteTokenizer, HFTokenizer, load_tokenizer

pytestmark = pytest.mark.timeout(180)

WORDS = ("the a of to and in is that for it with as was on be by this are from or at which an have not "
         "optimizer gradient projection rank matrix quantized weight adam moment sequence token layer "
         "model batch memory").split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct documents without leading/trailing whitespace or blank lines (so a .txt of
    them joined by blank lines splits back into the same documents)."""
    rng = random.Random(seed)
    docs = [f"Document {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) + "."
            for i in range(n)]
    docs[3] += " Ünïcödé — 日本語 ✓"
    docs[5] += "\nwith a second line"
    return docs


DOCS = make_docs(120)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every cache of this file lives in tmp_path (never ~/.cache)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("QGALORE_CACHE", str(path))
    return path


def write_jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({field: doc, "id": 0}) + "\n")
    return str(path)


def write_txt(path, docs):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("\n\n".join(docs) + "\n")
    return str(path)


def write_parquet(path, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), str(path))
    return str(path)


def config(source, extra=None, **kw) -> D.DataConfig:
    kw.update(extra or {})
    kw.setdefault("tokenizer", "byte")
    kw.setdefault("seq_len", 32)
    kw.setdefault("val_fraction", 0.1)
    return D.DataConfig(source=str(source), **kw)


def pack(docs, tok, seq_len) -> np.ndarray:
    """The reference: concatenate ``doc EOS`` and cut into rows, dropping the tail."""
    flat = [t for ids in tok.encode_batch(docs) for t in [*ids, tok.eos_id]]
    n = len(flat) // seq_len
    return np.array(flat[: n * seq_len], dtype=np.int32).reshape(n, seq_len)


def split(docs, fraction):
    val = [d for d in docs if D.is_validation(d, fraction)]
    return [d for d in docs if not D.is_validation(d, fraction)], val


# ----------------------------------------------------------------------------- config


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"data\.seq_len must be an integer >= 2, got 0"):
        D.DataConfig(seq_len=0)
    with pytest.raises(ValueError, match=r"data\.seq_len"):
        D.DataConfig(seq_len=True)
    with pytest.raises(ValueError, match=r"data\.val_fraction"):
        D.DataConfig(val_fraction=1.0)
    with pytest.raises(ValueError, match=r"data\.vocab_size"):
        D.DataConfig(vocab_size=100)
    missing = tmp_path / "nope" / "corpus.jsonl"
    with pytest.raises(FileNotFoundError, match=r"data\.source.*nope/corpus\.jsonl"):
        D.DataConfig(source=str(missing))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"data\.source.*empty"):
        D.DataConfig(source=str(tmp_path / "empty"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_jsonl(mixed / "a.jsonl", DOCS[:2])
    write_txt(mixed / "b.txt", DOCS[:2])
    with pytest.raises(ValueError, match=r"data\.source.*mixes formats"):
        D.DataConfig(source=str(mixed))
    with pytest.raises(FileNotFoundError, match=r"data\.tokenizer"):
        D.DataConfig(tokenizer=str(tmp_path / "missing.model"))
    cfg = D.DataConfig()
    cfg.seq_len = 1  # as the CLI sets fields after construction
    with pytest.raises(ValueError, match=r"data\.seq_len"):
        D.build_data(cfg)


def test_missing_text_field_is_named(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", DOCS[:10], field="content")
    with pytest.raises(ValueError, match=r"data\.text_field.*'text'.*content"):
        D.build_data(config(path))


# ----------------------------------------------------------------------------- sources, packing, split


def test_packing_equals_concatenation_and_split_is_disjoint(tmp_path):
    data = D.build_data(config(write_jsonl(tmp_path / "c.jsonl", DOCS), seq_len=24))
    train_docs, val_docs = split(DOCS, 0.1)
    assert 0 < len(val_docs) < 30 and len(train_docs) + len(val_docs) == len(DOCS)
    tok = ByteTokenizer()
    np.testing.assert_array_equal(np.asarray(data.train), pack(train_docs, tok, 24))
    np.testing.assert_array_equal(np.asarray(data.val), pack(val_docs, tok, 24))
    train_text = tok.decode(np.asarray(data.train).ravel().tolist())
    assert not any(doc in train_text for doc in val_docs)  # no held-out document leaks into training
    assert data.train.dtype == np.int32 and data.tokenizer.vocab_size == 257
    assert f"{len(DOCS)} docs ({len(val_docs)} held out)" in data.description
    stream = D.TrainStream(data, rank=1, world=2, micro_batch=3, seed=0)
    batch = stream.next_batch()
    assert type(stream) is D.TrainStream and stream.sample_ids() == [3, 4, 5]
    np.testing.assert_array_equal(batch.numpy(), np.asarray(data.train)[stream.last_rows])


def test_formats_load_the_same_documents(tmp_path):
    (tmp_path / "dir").mkdir()
    sources = {
        "jsonl": write_jsonl(tmp_path / "c.jsonl", DOCS),
        "txt": write_txt(tmp_path / "c.txt", DOCS),
        "txt.gz": write_txt(tmp_path / "c.txt.gz", DOCS),
        "txt, text_field ignored": (write_txt(tmp_path / "d.txt", DOCS), {"text_field": "body"}),
        "parquet": write_parquet(tmp_path / "c.parquet", DOCS),
        "dir": (write_jsonl(tmp_path / "dir" / "a.jsonl", DOCS[:50]),
                write_jsonl(tmp_path / "dir" / "b.jsonl", DOCS[50:]), str(tmp_path / "dir"))[-1],
        "glob": str(tmp_path / "dir" / "*.jsonl"),
    }
    arrays = {name: D.build_data(config(*src) if isinstance(src, tuple) else config(src))
              for name, src in sources.items()}
    reference = arrays.pop("jsonl")
    for name, data in arrays.items():
        np.testing.assert_array_equal(np.asarray(data.train), np.asarray(reference.train), err_msg=name)
        np.testing.assert_array_equal(np.asarray(data.val), np.asarray(reference.val), err_msg=name)


def test_builtin_documents_split_builtin_text(monkeypatch):
    from qgalore_dist.train.corpus import builtin_text

    docs = list(D.builtin_documents(20_000))
    assert len(docs) > 5 and all(len(d) > 200 for d in docs)
    assert "\n\n".join(docs)[:20_000] == builtin_text(20_000)
    monkeypatch.setattr(D, "BUILTIN_MAX_CHARS", 20_000)
    data = D.build_data(D.DataConfig(tokenizer="byte", seq_len=64))
    assert data.description.startswith("builtin corpus:") and len(data.train) > 100


def test_builtin_corpus_sources_size_and_determinism():
    import email.message
    import hashlib
    import importlib
    import inspect
    import json.decoder
    import logging
    import subprocess
    import sys

    from qgalore_dist.train.corpus import builtin_documents

    importlib.import_module("transformers.utils.logging")
    assert hasattr(logging.Logger, "warning_once")  # transformers patches the stdlib: that must not reach the corpus
    docs = list(builtin_documents())
    assert sum(map(len, docs)) >= 1_500_000 and len(docs) > 2000
    assert all(len(d) > 200 for d in docs) and len(set(docs)) == len(docs)
    assert inspect.cleandoc(json.decoder.JSONDecoder.__doc__) in docs  # a submodule's class
    assert inspect.cleandoc(email.message.Message.get_param.__doc__) in docs  # a method
    assert any(d.startswith('The "assert" statement\n****') for d in docs)  # a help topic
    assert not any("warning_once" in d or "same message only once" in d for d in docs)
    # A fresh interpreter (importing .stream before .data) builds the same corpus.
    code = ("import hashlib, qgalore_dist.train.stream; from qgalore_dist.train.data import TrainStream, "
            "builtin_documents; print(hashlib.sha256('\\0'.join(builtin_documents()).encode()).hexdigest())")
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert fresh.stdout.strip() == hashlib.sha256("\0".join(docs).encode()).hexdigest()


def test_help_topics_are_cut_at_headings():
    from qgalore_dist.train.corpus import _pack

    def head(title):
        return f"{title}\n{'=' * len(title)}"

    x = "x" * 300
    paragraphs = [head("Title"), x, head("Alpha"), "y" * 500, "z" * 400, head("Beta"), "w" * 100,
                  head("Gone"), head("Gamma"), x]
    docs = _pack(paragraphs, limit=1000)
    assert docs[0] == f"{head('Title')}\n\n{x}"
    assert docs[1].startswith(head("Alpha")) and docs[2].startswith(head("Beta"))
    assert "\n\n".join(docs) == "\n\n".join(p for p in paragraphs if p != head("Gone"))  # a bare heading goes
    assert all(len(d) <= 1000 for d in docs)
    assert _pack(["a" * 100, head("Delta"), "b" * 950], limit=1000) == ["a" * 100, f"{head('Delta')}\n\n{'b' * 950}"]
    assert _pack(["c" * 1500, "d" * 300], limit=1000) == ["c" * 1500, "d" * 300]  # a long paragraph stays whole
    assert _pack(["e" * 900, "f" * 150], limit=1000) == [f"{'e' * 900}\n\n{'f' * 150}"]  # a short tail joins
    top = "Top\n***"  # a title over a subsection title stays; an empty section's title goes
    assert _pack([top, head("Inner"), x, head("Empty")]) == [f"{top}\n\n{head('Inner')}\n\n{x}"]


# ----------------------------------------------------------------------------- tokenizers


def test_tokenizers_round_trip_and_save_as_hf(tmp_path):
    from transformers import AutoTokenizer

    samples = [DOCS[3], DOCS[5], "  leading spaces, tabs\tand <|endoftext|> inside text\n", "ünïcode ✓ 日本"]
    bpe = BPETokenizer.train(DOCS, vocab_size=300)
    assert bpe.vocab_size == 300
    for tok in (bpe, ByteTokenizer()):
        ids = tok.encode_batch(samples)
        assert [tok.decode(i) for i in ids] == samples
        assert tok.eos_id not in ids[2]  # a literal "<|endoftext|>" is text, not a boundary
        tok.save(str(tmp_path / tok.name))
        hf = AutoTokenizer.from_pretrained(str(tmp_path / tok.name))
        assert [hf(s, add_special_tokens=False)["input_ids"] for s in samples[:2]] == ids[:2]
        assert hf.eos_token_id == tok.eos_id
    loaded = load_tokenizer(str(tmp_path / "bpe"), vocab_size=0, cache_dir=str(tmp_path), corpus_key="")
    assert isinstance(loaded, HFTokenizer) and loaded.encode_batch(samples[:2]) == bpe.encode_batch(samples[:2])
    data = D.build_data(config(write_jsonl(tmp_path / "c.jsonl", DOCS), tokenizer=str(tmp_path / "bpe")))
    np.testing.assert_array_equal(np.asarray(data.train), pack(split(DOCS, 0.1)[0], loaded, 32))


def _tiny_sentencepiece(path) -> str:
    """A 100-piece SentencePiece model trained on DOCS (unk 0, bos 1, eos 2 as in LLaMA's)."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(DOCS * 4), model_prefix=str(path), vocab_size=100,
                                   model_type="unigram", character_coverage=1.0,
                                   num_threads=1, minloglevel=2)
    return f"{path}.model"


def test_sentencepiece_model(tmp_path):
    pytest.importorskip("sentencepiece")
    model = _tiny_sentencepiece(tmp_path / "tiny_sp")
    data = D.build_data(config(write_jsonl(tmp_path / "c.jsonl", DOCS), tokenizer=model))
    tok = data.tokenizer
    assert (tok.vocab_size, tok.eos_id, tok.bos_id) == (100, 2, 1)
    assert tok.decode(tok.encode_batch([DOCS[3]])[0]) == DOCS[3]
    np.testing.assert_array_equal(np.asarray(data.train), pack(split(DOCS, 0.1)[0], tok, 32))
    tok.save(str(tmp_path / "sp"))
    assert sorted(os.listdir(tmp_path / "sp")) == ["tokenizer.model", "tokenizer_config.json"]


def test_cache_is_reused(tmp_path, monkeypatch):
    trained = []
    original = BPETokenizer.train.__func__

    def counting_train(cls, texts, *, vocab_size):
        trained.append(vocab_size)
        return original(cls, texts, vocab_size=vocab_size)

    monkeypatch.setattr(BPETokenizer, "train", classmethod(counting_train))
    path = write_jsonl(tmp_path / "c.jsonl", DOCS)
    first = D.build_data(config(path, tokenizer="bpe", vocab_size=300))
    train_file = first.train.filename
    mtime = os.stat(train_file).st_mtime_ns
    second = D.build_data(config(path, tokenizer="bpe", vocab_size=300))
    assert trained == [300] and second.train.filename == train_file and os.stat(train_file).st_mtime_ns == mtime
    np.testing.assert_array_equal(np.asarray(first.train), np.asarray(second.train))
    D.build_data(config(path, tokenizer="bpe", vocab_size=300, seq_len=16))  # repacks, same tokenizer
    assert trained == [300]
    write_jsonl(path, DOCS[:-1])  # the source changed: retrain and repack
    third = D.build_data(config(path, tokenizer="bpe", vocab_size=300))
    assert trained == [300, 300] and third.train.filename != train_file


# ----------------------------------------------------------------------------- order, sharding, position


def rows(n=37, seq_len=4):
    return np.arange(n * seq_len, dtype=np.int32).reshape(n, seq_len)


def test_order_is_fixed_by_the_seed():
    def order(seed, batches=10):
        s = D.TrainStream(rows(), rank=0, world=1, micro_batch=8, seed=seed)
        return [r for _ in range(batches) for r in (s.next_batch(), s.last_rows)[1]]

    assert order(0) == order(0) and order(0) != order(1)
    first = order(0)
    assert sorted(first[:37]) == list(range(37)) and sorted(first[37:74]) == list(range(37))  # epochs
    assert first[:37] != first[37:74]  # each epoch its own permutation
    s = D.TrainStream(rows(), rank=0, world=1, micro_batch=3, seed=0)
    batch = s.next_batch()
    assert batch.dtype == torch.long and batch.shape == (3, 4)
    np.testing.assert_array_equal(batch.numpy(), rows()[s.last_rows])


def test_union_over_ranks_is_the_global_batch():
    world, micro = 3, 2
    streams = [D.TrainStream(rows(), rank=r, world=world, micro_batch=micro, seed=5) for r in range(world)]
    single = D.TrainStream(rows(), rank=0, world=1, micro_batch=world * micro, seed=5)
    for step in range(15):
        batches = [s.next_batch() for s in streams]
        ids = [i for s in streams for i in s.sample_ids()]
        assert ids == list(range(step * world * micro, (step + 1) * world * micro))
        torch.testing.assert_close(torch.cat(batches), single.next_batch())
        assert len({json.dumps(s.state_dict()) for s in streams}) == 1  # the same position on every rank


def run_steps(streams, steps, accum):
    """``steps`` optimizer steps of ``accum`` micro-steps on every rank; returns the packed
    rows each step trained on (all ranks), and the streams."""
    out = []
    for _ in range(steps):
        step_rows = []
        for _ in range(accum):
            for s in streams:
                s.next_batch()
                step_rows += s.last_rows
        out.append(sorted(step_rows))
    return out


def test_resume_is_exact_even_at_another_world_size():
    def streams(world, micro):
        return [D.TrainStream(rows(), rank=r, world=world, micro_batch=micro, seed=3)
                for r in range(world)]

    full = run_steps(streams(2, 2), 10, accum=2)  # global batch 8, 80 samples: > 2 epochs of 37
    first = streams(2, 2)
    head = run_steps(first, 4, accum=2)
    state = json.loads(json.dumps(first[0].state_dict()))
    assert state["position"] == 32
    for world, micro, accum in ((2, 2, 2), (4, 1, 2), (1, 4, 2), (1, 8, 1)):
        resumed = streams(world, micro)
        for s in resumed:
            s.load_state_dict(state)
        assert head + run_steps(resumed, 6, accum) == full, (world, micro, accum)
    epoch_rows = [r for step in full for r in step][:32]
    assert len(set(epoch_rows)) == 32  # within an epoch no row twice
    bad = streams(1, 3)[0]
    with pytest.raises(ValueError, match="multiple of world x micro_batch"):
        bad.load_state_dict(state)
    with pytest.raises(ValueError, match="other data"):
        D.TrainStream(rows(), rank=0, world=1, micro_batch=8, seed=4).load_state_dict(state)


def test_val_batches_split_the_first_sequences_evenly(tmp_path):
    data = D.build_data(config(write_jsonl(tmp_path / "c.jsonl", DOCS), seq_len=8, val_sequences=7))
    assert len(data.val) >= 7
    per_rank = [list(D.val_batches(data, rank=r, world=2, micro_batch=2)) for r in range(2)]
    assert [[b.shape[0] for b in bs] for bs in per_rank] == [[2, 1], [2, 1]]  # same passes on every rank
    joined = torch.cat([b for bs in per_rank for b in bs])
    torch.testing.assert_close(joined, torch.from_numpy(np.asarray(data.val[:6], dtype=np.int64)))
    again = torch.cat(list(data.val_batches(micro_batch=4)))
    torch.testing.assert_close(again, torch.from_numpy(np.asarray(data.val[:7], dtype=np.int64)))


# ----------------------------------------------------------------------------- streaming


def collect(stream, n):
    return [stream.next_batch() for _ in range(n)]


def test_streaming_local_jsonl_matches_packing_and_resumes(tmp_path):
    docs = DOCS[:25]
    path = write_jsonl(tmp_path / "s.jsonl", docs)
    cfg = config(path, streaming=True, seq_len=16, val_fraction=0.2, val_sequences=4)
    data = D.build_data(cfg)
    assert data.streaming and data.train is None and "streaming" in data.description
    train_docs, val_docs = split(docs, 0.2)
    assert val_docs and train_docs
    tok = ByteTokenizer()
    np.testing.assert_array_equal(np.asarray(data.val), pack(val_docs, tok, 16)[:4])
    epoch_tokens = sum(len(d.encode()) + 1 for d in train_docs)
    n = epoch_tokens // 64 + 8  # beyond one epoch of micro-batches (4 x 16 tokens)
    stream = D.TrainStream(data, rank=0, world=1, micro_batch=4, seed=0)  # as the training loop builds it
    assert isinstance(stream, D.StreamingTrainStream)
    full = collect(stream, n)
    flat = torch.cat(full).ravel()
    expected = pack(train_docs, tok, 1).ravel()
    np.testing.assert_array_equal(flat[: len(expected)].numpy(), expected)  # held-out docs filtered out
    np.testing.assert_array_equal(flat[len(expected):].numpy(), expected[: len(flat) - len(expected)])  # epoch 2
    for cut in (3, n - 4):  # mid-epoch and after the epoch rollover
        first = data.train_stream(micro_batch=4)
        head = collect(first, cut)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = D.build_data(cfg).train_stream(micro_batch=4)
        resumed.load_state_dict(state)
        torch.testing.assert_close(torch.cat(head + collect(resumed, n - cut)), torch.cat(full))
    assert state["epoch"] == 1
    rank1 = D.build_data(cfg, rank=1, world=2).train_stream(micro_batch=2)
    flat1 = torch.cat(collect(rank1, 5)).ravel().numpy()
    np.testing.assert_array_equal(flat1, pack(train_docs[1::2], tok, 1).ravel()[: len(flat1)])
    with pytest.raises(ValueError, match="per rank.*same world size"):
        rank1.load_state_dict(state)
    with pytest.raises(ValueError, match="streaming"):
        D.build_data(config(path, seq_len=16, val_fraction=0.2)).train_stream(micro_batch=4).load_state_dict(state)


# ----------------------------------------------------------------------------- 2 processes


def _two_rank_worker(rank, world, tmp, good, bad):
    """One rank: a good build (rank 0 only builds), then a build of a broken file."""
    os.environ["QGALORE_CACHE"] = os.path.join(tmp, "cache")
    builds = []
    original = D._build
    D._build = lambda *a, **k: (builds.append(1), original(*a, **k))[1]
    data = D.build_data(config(good, tokenizer="bpe", vocab_size=300), rank=rank, world=world)
    stream = data.train_stream(micro_batch=2)
    stream.next_batch()
    good_result = (len(builds), np.asarray(data.train).tobytes(), data.tokenizer.fingerprint, stream.last_rows)
    try:
        D.build_data(config(bad), rank=rank, world=world)
        bad_result = None
    except Exception as exc:
        bad_result = (type(exc).__name__, str(exc))
    return good_result, bad_result


def test_two_ranks_rank0_builds_and_errors_reach_every_rank(tmp_path):
    from dist_harness import run_distributed

    good = write_jsonl(tmp_path / "good.jsonl", DOCS)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not a parquet file" * 10)
    (g0, b0), (g1, b1) = run_distributed(_two_rank_worker, 2, str(tmp_path), good, str(bad), timeout_s=60)
    assert (g0[0], g1[0]) == (1, 0)  # rank 0 built, rank 1 only loaded
    assert g0[1] == g1[1] and g0[2] == g1[2] and len(g0[1]) > 0
    assert set(g0[3]).isdisjoint(g1[3])  # different samples per rank
    assert b0 is not None and b1 is not None, "a broken file must raise on every rank"
    assert b0[0] == b1[0] == "ValueError" and "rank 0" in b1[1]
    assert all("data.source" in b[1] and "bad.parquet" in b[1] for b in (b0, b1))
