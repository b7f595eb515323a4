"""Measurements the per-rank memory accounting rests on, beside ``memory_rss.py``:

1. gloo's reduce-scatter scratch: the VmHWM growth of 2 and 4 gloo ranks while one asynchronous
   reduce-scatter of a 25 MiB-per-rank list runs (``estimate/ranks.py:streamed_buffers`` counts it);
2. the RSS plateau of one process over 40 steps (llama_60m widths, 4 layers, refresh every 4
   steps): whether the persistent probes' excess in ``memory_rss.py`` is warm-up or a leak;
3. ``memory_fsdp.validate_fsdp`` with ``overlap_comm`` at 2 and 3 ranks (uneven rows): the FSDP2
   rows of the estimator byte for byte against real tensors.

Run from the repository root:  python benchmarks/memory_checks.py   (about 3 min on 2 idle cores)
"""

from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from benchmarks.memory_rss import RssSpec, _build, _proc_status, _reset_peak, spawn_ranks  # noqa: E402

CHUNK_MIB = 25


@dataclass(frozen=True)
class ScratchSpec:
    timeout_s: float = 120.0


def _scratch(spec: ScratchSpec, rank: int) -> dict[str, Any]:
    """One rank: peak RSS growth while a reduce-scatter of ``world`` chunks of CHUNK_MIB runs."""
    import torch.distributed as dist

    world = dist.get_world_size()
    chunks = [torch.ones(CHUNK_MIB * 2**18) for _ in range(world)]
    out = torch.zeros_like(chunks[0])
    dist.barrier()
    gc.collect()
    _reset_peak()
    before = _proc_status()["VmRSS"]
    dist.reduce_scatter(out, chunks, async_op=True).wait()
    return {"bucket_mib": world * CHUNK_MIB, "scratch_mib": (_proc_status()["VmHWM"] - before) / 2**20}


def _plateau(steps: int = 40) -> list[tuple[int, float]]:
    """``(step, VmRSS MiB)`` every 4th step of one process (``memory_rss``'s model, 4 layers)."""
    spec = RssSpec(world=1, layers=4, update_proj_gap=4)
    model, opt = _build(spec)
    gen, out = torch.Generator().manual_seed(0), []
    for step in range(steps):
        tokens = torch.randint(0, spec.vocab, (1, spec.seq), generator=gen)
        model(input_ids=tokens, labels=tokens, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad()
        gc.collect()
        if step % 4 == 3:
            out.append((step + 1, _proc_status()["VmRSS"] / 2**20))
    return out


def main() -> int:
    from benchmarks._common import environment, environment_md, write_outputs
    from benchmarks.memory_fsdp import FsdpSpec, validate_fsdp

    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # as memory_rss: freed tensors leave RSS (children read it)
    scratch = {world: spawn_ranks(_scratch, ScratchSpec(), world, 120.0) for world in (2, 4)}
    fsdp = {f"{w} ranks, overlap_comm": validate_fsdp(FsdpSpec(world=w, overlap=True)) for w in (2, 3)}
    plateau = _plateau()
    payload = {"environment": environment(), "description": __doc__, "reduce_scatter_scratch": scratch,
               "rss_plateau_one_process": plateau, "fsdp_overlap_validation": fsdp}
    lines = ["# Memory checks behind the per-rank accounting", "", environment_md(payload["environment"]), "",
             "## gloo reduce-scatter scratch (VmHWM growth while one runs; MiB per rank)", "",
             "| ranks | bucket (all chunks) | scratch per rank |", "|---|---|---|"]
    for world, ranks in scratch.items():
        lines += [f"| {world} | {r['bucket_mib']} | {r['scratch_mib']:.1f} |" for r in ranks]
    lines += ["", "## RSS of one process every 4th step (MiB)", "",
              ", ".join(f"step {s}: {m:.1f}" for s, m in plateau), "",
              "## FSDP2 rows with overlap_comm vs real tensors", ""]
    lines += [f"- {name}: all components equal: **{v['ok']}**" for name, v in fsdp.items()]
    write_outputs("memory_checks", payload, "\n".join(lines))
    print("\n".join(lines))
    return 0 if all(v["ok"] for v in fsdp.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
