"""Diagnostic for `memory_rss.py` (not a benchmark table): after the backward of a streamed refresh step on
2 gloo ranks (RssSpec(): llama_60m widths, 8 layers), how many full-gradient buckets are still in flight
(`OverlappedReduce.in_flight`), whether gloo reports them completed, and the RSS before / after `wait_all()`.
Prints one JSON line per rank.  Run from the repository root:  python benchmarks/memory_rss_inflight.py
"""
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from benchmarks.memory_rss import RssSpec, _build, _proc_status, spawn_ranks  # noqa: E402


def measure(spec, rank):
    model, opt = _build(spec)
    gc.collect()
    base = _proc_status()["VmRSS"]
    tokens = torch.randint(0, spec.vocab, (1, spec.seq), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=tokens, labels=tokens, use_cache=False)
    out.loss.backward()
    del out
    gc.collect(1)
    full = opt.reduces.full
    res = {"rss_after_backward_MiB": (_proc_status()["VmRSS"] - base) / 2**20,
           "buckets": len(full.buckets), "in_flight": len(full.in_flight),
           "completed": [bool(f.handle.is_completed()) for f in full.in_flight],
           "held_MiB": full.held_bytes() / 2**20,
           "chunks_MiB": sum(t.numel() * t.element_size() for f in full.in_flight for t in f.chunks) / 2**20}
    time.sleep(5)
    res["completed_after_5s"] = [bool(f.handle.is_completed()) for f in full.in_flight]
    res["rss_after_5s_MiB"] = (_proc_status()["VmRSS"] - base) / 2**20
    full.wait_all()
    gc.collect(1)
    res["rss_after_wait_all_MiB"] = (_proc_status()["VmRSS"] - base) / 2**20
    res["held_after_wait_MiB"] = full.held_bytes() / 2**20
    return res


if __name__ == "__main__":
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    for r in spawn_ranks(measure, RssSpec(world=2), 2, 600):
        print(json.dumps(r))
