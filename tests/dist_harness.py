"""A small multi-process harness for gloo-on-CPU tests (in the spirit of DeepSpeed's
``tests/unit/common.py::DistributedTest``): ``run_distributed(fn, world_size, *args)`` runs
``fn(rank, world_size, *args)`` in ``world_size`` spawned processes with an initialized gloo
process group, re-raises the first child failure, and returns each rank's return value."""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, outdir, fn, args, timeout_s):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = {"ok": fn(rank, world_size, *args)}
    except BaseException as exc:  # reported to the parent, which re-raises
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    try:
        dist.destroy_process_group()
    except Exception:
        pass


def run_distributed(fn, world_size: int, *args, timeout_s: float = 120) -> list:
    """Run ``fn`` on ``world_size`` gloo ranks; returns the list of per-rank results.  If any
    rank raised, raises ``RuntimeError`` with every failing rank's message."""
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.get_context("spawn")
        port = free_port_cache(world_size)
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, outdir, fn, args, timeout_s))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=timeout_s * 3)
            if p.is_alive():
                p.kill()
        results = []
        for r in range(world_size):
            path = os.path.join(outdir, f"rank{r}.pt")
            missing = {"error": "no result (crashed or timed out)"}
            results.append(torch.load(path, weights_only=False) if os.path.exists(path) else missing)
    _PORTS.clear()
    run_distributed.last_results = [res.get("ok", res.get("error")) for res in results]
    errors = [f"rank {r}: {res['error']}\n{res.get('traceback', '')[-2000:]}" for r, res in enumerate(results)
              if "error" in res]
    if errors:
        raise RuntimeError("\n".join(errors))
    return [res["ok"] for res in results]


_PORTS: dict[int, int] = {}


def free_port_cache(world_size: int) -> int:
    """One port per launch (every rank of the launch gets the same one)."""
    if world_size not in _PORTS:
        _PORTS[world_size] = free_port()
    return _PORTS[world_size]
