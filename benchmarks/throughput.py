"""Training throughput (tokens/s) on 2 CPU ranks: qgalore-dist against DDP + AdamW and ZeRO-2 +
bitsandbytes AdamW8bit, over an unshaped link and over an emulated two-node link.

What is measured
    One LLaMA (``--config``, default ``llama_20m`` with vocab ``--vocab`` 1024), fp32 compute
    (bf16 is ~9x slower on this CPU: results/cpu_bf16.md), micro-batch ``--batch`` x ``--seq``
    tokens per rank, 2 ranks x 1 torch thread, gloo.  All contenders live in the same two
    processes, start from the same seed and are stepped in turn (one step of each per iteration,
    so all see the same background load); no gradient clipping; fp32 payloads everywhere:

    * ``ours``            ``prepare_model`` + ``QGaLoreAdamW8bit`` and its own exchange, no DeepSpeed
                          (GaLore matrices, rank ``--rank``: low-rank reduce-scatter + update
                          broadcast; dense tensors: reduce-scatter to an owner + broadcast back);
    * ``ours_overlap``    the same with ``overlap_comm=True``: the low-rank reduce-scatter runs
                          asynchronously during backward, a 25 MiB bucket at a time;
    * ``ours_zero2``      ``qgalore_dist.initialize``, ZeRO-2 + the QGaLoreAdamW8bit entry (GaLore
                          matrices as above, dense tensors by DeepSpeed ZeRO-2);
    * ``ddp_adamw``       ``DistributedDataParallel`` + ``torch.optim.AdamW``;
    * ``zero2_adamw8bit`` DeepSpeed ZeRO-2 + ``bnb.optim.AdamW8bit`` as client optimizer.

    A step (forward + backward + optimizer step) is timed between two barriers on each rank; its
    time is the slower rank's.  tokens/s = 2 * batch * seq / median step time of a phase's timed
    steps (after ``--warmup`` steps per contender and phase).  Bytes per step and rank: metered
    (ours: ``optimizer.comm.meter``, ring volumes) or closed form (DDP all-reduce 2 (N-1)/N * 4P,
    ZeRO-2 reduce-scatter + all-gather, the same), and on the emulated link counted on the wire
    (veth ``tx_bytes``, headers included), with a probe of what gloo sends per collective.

Link phases (``benchmarks/netns.py``: namespaces ``qg_thr_a`` / ``qg_thr_b``, one rank in each,
veth 10.77.0.1 <-> 10.77.0.2, the same egress shaping on both ends)
    ``unlimited`` (no qdisc), ``1G`` (``--plain-gbits``, not scaled) and ``scaled XG`` for each
    ``--real-gbits`` X: the rate at which compute / transfer per step equals an H100's with an
    X Gbit/s link.  Per step, compute = 6 P T / F (T tokens per rank, F training FLOP/s) and
    transfer = c P b / B (b bytes per parameter, B the link), so the ratio is kept when
    B_emulated = B_real * (F_cpu / F_gpu) * (T_real / T_here).  F_cpu is measured in the run
    (fwd+bwd of the same model and batch on both ranks at once, 6 N + 12 L d s FLOPs per token),
    F_gpu = ``--gpu-tflops``, T_real = ``--real-tokens-per-gpu``.  ``--delay-ms`` is added with
    netem where the kernel has it (else tbf, rate only, and the report says so).

Validation (exit 1 on failure): losses finite; ours' timed steps ran no projector refresh; on the
emulated link each contender's wire bytes >= 90 % of its metered / closed-form bytes (nothing
bypassed the link) and no shaped phase moved bytes faster than 1.1 x its rate.  Without root or
namespaces (or with ``--no-netns``) only ``unlimited`` runs, over loopback, and the report says why.
Every wait is bounded (``--timeout-s``); namespaces, workers and temporary files go on exit.

Across the emulated 2-node cluster (``--cluster``; root)
    ``scripts/cluster.sh``'s nodes node1 / node2 (network namespaces sharing this filesystem, joined
    by a veth pair with ``tc tbf`` on both ends), one rank per node started by the deepspeed launcher
    through ``launch/deepspeed.sh`` with a hostfile (``deepspeed --hostfile``, pdsh over ssh), running
    the same worker and contenders as above: ``ours_overlap``, ``ddp_adamw``, ``zero2_adamw8bit``.
    Phases: unshaped (with the warm-up), then each ``--rates`` class (default 1gbit,10gbit,100gbit)
    scaled as above, set with ``scripts/cluster.sh rate`` between phases; ``--repeats`` (>= 3) timed
    steps per contender and phase, interleaved A B C A B C; tokens/s mean +- std and ratios.
    T_real defaults to 65536 tokens per GPU per optimizer step there (the report says why).  The
    cluster is brought up if it is down, and down again afterwards, also on failure (a cluster
    found up is left up with its rate restored).  Writes ``results/throughput_cluster.{md,json,png}``.

Run from the repository root:  python benchmarks/throughput.py   (``--quick``: smoke test;
``--cluster``: across the emulated cluster, about 10 min)
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from benchmarks import netns  # noqa: E402

CONTENDERS = ("ours", "ours_overlap", "ours_zero2", "ddp_adamw", "zero2_adamw8bit")
WORLD = 2
RING = (WORLD - 1) / WORLD
_POLL_S = 0.2
CLUSTER_CONTENDERS = ("ours_overlap", "ddp_adamw", "zero2_adamw8bit")
_SETTLE_NUMEL = 1 << 18  # 1 MiB all-reduced after a rate change (--cluster): TCP adapts before timing
_ADAM = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)


# ============================================================================ worker side
@dataclass(frozen=True)
class Contender:
    """One training set-up on this rank."""

    name: str
    step: Callable[[Any], float]
    """Forward + backward + optimizer step on a batch; returns the loss."""
    meter: Callable[[], tuple[float, int]] | None
    """(bytes, collective calls) of the last step as metered; None: use ``closed_form_bytes``."""
    closed_form_bytes: float = float("nan")
    refreshed: Callable[[], bool] = lambda: False
    """Whether the last step refreshed GaLore projectors."""


def _model(args: argparse.Namespace):
    import torch
    from transformers import LlamaForCausalLM

    from benchmarks._common import load_config

    torch.manual_seed(args.seed)  # same initial weights on both ranks and for every contender
    return LlamaForCausalLM(load_config(args.config, vocab_size=args.vocab, use_cache=False))


def _numel(params) -> int:
    return sum(p.numel() for p in params if p.requires_grad)


def _zero2_config(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    # gradient_clipping 0: DeepSpeed clips to 1.0 when the key is absent; nobody clips here.
    return {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0, "bf16": {"enabled": False}, "steps_per_print": 10**9,
            "zero_optimization": {"stage": 2, "reduce_scatter": True, "contiguous_gradients": True,
                                  "overlap_comm": True, "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8},
            "wall_clock_breakdown": False, **extra}


def _metered(optimizer) -> tuple[float, int]:
    last = optimizer.comm.meter.last_step
    return sum(v["bytes"] for v in last.values()), int(sum(v["calls"] for v in last.values()))


def _plain_step(model, opt) -> Callable[[Any], float]:
    def step(x) -> float:
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def _engine_step(engine) -> Callable[[Any], float]:
    def step(x) -> float:
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        return loss.item()
    return step


def build_contender(name: str, args: argparse.Namespace) -> Contender:
    """The contender ``name`` (model, optimizer, engine) on this rank."""
    import torch

    import qgalore_dist
    from qgalore_dist import QGaLoreAdamW8bit, QGaLoreConfig, prepare_model

    model = _model(args)
    qgalore = {**_ADAM, "betas": list(_ADAM["betas"]), "rank": args.rank, "update_proj_gap": args.gap,
               "seed": args.seed}
    if name in ("ours", "ours_overlap"):  # ours_overlap: the low-rank reduce runs during backward
        prepare_model(model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or p.dtype == torch.uint8]
        opt = QGaLoreAdamW8bit([p for _, p in named], QGaLoreConfig(**qgalore, overlap_comm=name == "ours_overlap"),
                               names={p: n for n, p in named})
        return Contender(name, _plain_step(model, opt), lambda: _metered(opt),
                         refreshed=lambda: opt.svds_last_step > 0)
    if name == "ours_zero2":
        config = _zero2_config(args, optimizer={"type": "QGaLoreAdamW8bit", "params": qgalore})
        engine, *_ = qgalore_dist.initialize(model=model, config=config)
        dense_bytes = 2 * RING * 4 * _numel(engine.module.parameters())  # ZeRO-2 reduce-scatter + all-gather

        def meter() -> tuple[float, int]:
            galore_bytes, calls = _metered(engine.qgalore)
            return galore_bytes + dense_bytes, calls
        return Contender(name, _engine_step(engine), meter, refreshed=lambda: engine.qgalore.svds_last_step > 0)
    closed_form = 2 * RING * 4 * _numel(model.parameters())  # all-reduce, or reduce-scatter + all-gather
    if name == "ddp_adamw":
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        return Contender(name, _plain_step(ddp, torch.optim.AdamW(ddp.parameters(), **_ADAM)), None, closed_form)
    if name == "zero2_adamw8bit":
        import bitsandbytes as bnb
        import deepspeed

        engine, *_ = deepspeed.initialize(model=model, optimizer=bnb.optim.AdamW8bit(model.parameters(), **_ADAM),
                                          config=_zero2_config(args, zero_allow_untested_optimizer=True))
        return Contender(name, _engine_step(engine), None, closed_form)
    raise ValueError(f"unknown contender {name!r}; choose from {CONTENDERS}")


def calibrate(args: argparse.Namespace, x) -> dict[str, float]:
    """Training FLOP/s of this rank: fwd+bwd of the plain fp32 model (no communication), both
    ranks at once (a barrier first), median of ``--calib-reps`` after one warm-up."""
    import torch.distributed as dist

    model = _model(args)
    cfg = model.config
    non_embedding = sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()
    flops_per_token = 6 * non_embedding + 12 * cfg.num_hidden_layers * cfg.hidden_size * args.seq
    dist.barrier()
    times = []
    for _ in range(1 + args.calib_reps):
        start = time.perf_counter()
        model(input_ids=x, labels=x).loss.backward()
        times.append(time.perf_counter() - start)
    median_s = statistics.median(times[1:])
    return {"fwd_bwd_s": median_s, "flops_per_token": flops_per_token,
            "flop_s": flops_per_token * x.numel() / median_s}


def probe_collectives(dev: str, numel: int) -> dict[str, float]:
    """Bytes this rank sends per gloo collective of an fp32 tensor of S = 4 * numel bytes, in units
    of S (a ring at N = 2: all-reduce 1, the others 0.5): explains wire vs metered bytes."""
    import torch
    import torch.distributed as dist

    full, half = torch.ones(numel), torch.ones(numel // 2)
    ops = {"all_reduce": lambda: [dist.all_reduce(full)],
           "reduce_scatter": lambda: [dist.reduce_scatter(half, list(full.chunk(WORLD)))],
           "reduce": lambda: [dist.reduce(full, dst=r) for r in range(WORLD)],  # averaged over both roots
           "broadcast": lambda: [dist.broadcast(full, src=r) for r in range(WORLD)],
           "all_gather": lambda: [dist.all_gather(list(full.chunk(WORLD)), half)],
           "all_to_all": lambda: [dist.all_to_all_single(torch.empty(numel), full)]}
    out = {}
    for name, op in ops.items():
        dist.barrier()
        before = netns.tx_bytes(dev)
        calls = len(op())
        dist.barrier()
        out[name] = (netns.tx_bytes(dev) - before) / (4 * numel) / calls
    return out


def timed_step(contender: Contender, x, dev: str | None) -> dict[str, Any]:
    """One step between barriers: seconds, wire bytes sent by this rank, loss, metered bytes."""
    import torch.distributed as dist

    dist.barrier()
    tx0 = netns.tx_bytes(dev) if dev else 0
    start = time.perf_counter()
    loss = contender.step(x)
    seconds = time.perf_counter() - start
    dist.barrier()  # gloo keeps one ordered connection per peer: the step's bytes are out by now
    wire = netns.tx_bytes(dev) - tx0 if dev else None
    nbytes, calls = contender.meter() if contender.meter else (contender.closed_form_bytes, None)
    return {"s": seconds, "wire": wire, "loss": loss, "bytes": nbytes, "calls": calls,
            "refresh": contender.refreshed()}


def run_phase(contenders: list[Contender], args: argparse.Namespace, x, dev: str | None,
              warmup: int | None = None, settle_numel: int = 0) -> dict[str, list]:
    """Warm-up + timed steps of every contender, interleaved (A B C A B C ...); stops early (but
    after ``--min-steps``) once ``--phase-budget-s`` is spent, as rank 0 decides for both.
    ``warmup`` overrides ``--warmup``; ``settle_numel`` > 0 first all-reduces that many fp32
    values, untimed, so that TCP has adapted to a new link rate before the first timed step."""
    import torch
    import torch.distributed as dist

    warmup = args.warmup if warmup is None else warmup
    if settle_numel:
        dist.all_reduce(torch.ones(settle_numel))
    records: dict[str, list] = {c.name: [] for c in contenders}
    start = time.perf_counter()
    for it in range(warmup + args.steps):
        over = torch.tensor([float(time.perf_counter() - start > args.phase_budget_s)])
        dist.broadcast(over, src=0)
        if it >= warmup + args.min_steps and over.item():
            break
        for c in contenders:
            records[c.name].append({**timed_step(c, x, dev), "warmup": it < warmup})
    return records


def _publish(path: Path, data: dict) -> None:
    """Write JSON atomically: a reader polling for ``path`` never sees half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.rename(path)


def _ask_parent(control: Path, index: int, payload: dict, deadline: float) -> dict:
    """Rank 0 asks the parent for phase ``index`` and waits (bounded) for the link to be set."""
    _publish(control / f"request_{index}.json", payload)
    answer = control / f"ready_{index}.json"
    while not answer.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no answer from the parent for phase {index}")
        time.sleep(_POLL_S)
    return json.loads(answer.read_text())


def _gather(obj: Any) -> list:
    import torch.distributed as dist

    out: list = [None] * WORLD
    dist.all_gather_object(out, obj)
    return out


def _link_device() -> str | None:
    """The interface whose ``tx_bytes`` a rank counts: ``QG_THR_DEV`` (set per rank by
    ``netns.launch_rank``), or with ``QG_THR_DEV=auto`` (the emulated cluster, where one
    ``.deepspeed_env`` serves both nodes) the node's one ``qgc-veth*`` end."""
    dev = os.environ.get("QG_THR_DEV") or None
    if dev == "auto":
        ends = sorted(p.name for p in Path("/sys/class/net").glob("qgc-veth*"))
        if len(ends) != 1:
            raise RuntimeError(f"QG_THR_DEV=auto: expected one qgc-veth* interface in this namespace, found {ends}")
        dev = ends[0]
    return dev


def worker_main(args: argparse.Namespace) -> int:
    """One rank: calibrate, build the contenders, then run the phases the parent sets up."""
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    deadline = time.monotonic() + args.timeout_s
    faulthandler.dump_traceback_later(max(1.0, args.timeout_s - 20), exit=False)  # a hang leaves a trace
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=min(args.timeout_s, 600)))
    rank, control, dev = dist.get_rank(), Path(args.control_dir), _link_device()
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own data, as in data parallelism
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    calibration = _gather(calibrate(args, x))
    contenders = [build_contender(name, args) for name in args.contenders]
    probes = _gather(probe_collectives(dev, 1 << 20) if dev else {})
    hosts = _gather(socket.gethostname())
    print(f"[rank {rank}] on {hosts[rank]}: calibrated {calibration[rank]}, built {args.contenders}", flush=True)
    phases, records = [], []  # records[phase][rank][contender] = list of step records
    for index in range(16):  # the parent ends the list with {"done": true}; 16 bounds it
        box = [_ask_parent(control, index, {"calibration": calibration}, deadline) if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        if box[0].get("done"):
            break
        print(f"[rank {rank}] phase {index}: {box[0]['name']}", flush=True)
        phases.append(box[0])
        records.append(_gather(run_phase(contenders, args, x, dev, box[0].get("warmup"),
                                         box[0].get("settle_numel", 0))))
    if rank == 0:
        _publish(control / "result.json", {
            "calibration": calibration, "phases": phases, "records": records,
            "params": _numel(_model(args).parameters()), "hosts": hosts,
            "collective_wire": {k: statistics.fmean(p[k] for p in probes) for k in probes[0]}})
    return 0


# ============================================================================ parent side
def link_rates(args: argparse.Namespace, calibration: list[dict]) -> tuple[list[dict], dict]:
    """The phases after ``unlimited`` and the arithmetic that scales real links to this CPU."""
    flop_s = statistics.fmean(c["flop_s"] for c in calibration)
    scale, tokens_here = flop_s / (args.gpu_tflops * 1e12), args.batch * args.seq
    token_factor = args.real_tokens_per_gpu / tokens_here
    phases = [{"name": f"{g:g}G", "rate_bit_s": g * 1e9, "real_gbit_s": g, "scaled": False} for g in args.plain_gbits]
    phases += [{"name": f"scaled {g:g}G", "rate_bit_s": g * 1e9 * scale * token_factor, "real_gbit_s": g,
                "scaled": True} for g in args.real_gbits]
    return phases, {"cpu_flop_s": flop_s, "gpu_flop_s": args.gpu_tflops * 1e12, "flop_scale": scale,
                    "tokens_per_rank_step": tokens_here, "real_tokens_per_gpu_step": args.real_tokens_per_gpu,
                    "token_factor": token_factor}


def serve_phases(args: argparse.Namespace, link: netns.EmulatedLink | None, control: Path,
                 procs: list[subprocess.Popen], deadline: float) -> dict:
    """Answer rank 0's phase requests in order, shaping the link first; returns the arithmetic."""
    netns.wait_for_file(control / "request_0.json", procs, deadline)
    planned, arithmetic = [{"name": "unlimited", "rate_bit_s": None, "real_gbit_s": None, "scaled": False}], {}
    if link is not None:
        extra, arithmetic = link_rates(args, json.loads((control / "request_0.json").read_text())["calibration"])
        planned += extra
    for index, phase in enumerate([*planned, {"done": True}]):
        netns.wait_for_file(control / f"request_{index}.json", procs, deadline)
        if not phase.get("done") and link is not None:
            shaping = link.shape(phase["rate_bit_s"], args.delay_ms if phase["rate_bit_s"] else 0.0)
            phase = {**phase, "shaping": vars(shaping)}
        if not phase.get("done"):
            phase["loadavg_1m"] = os.getloadavg()[0]
            if index and args.phase_warmup is not None:  # the first phase always warms up (refresh, caches)
                phase["warmup"] = args.phase_warmup
            if index and args.cluster:
                phase["settle_numel"] = _SETTLE_NUMEL
        print(f"[throughput] phase {index}: {phase.get('name', 'done')}", flush=True)
        _publish(control / f"ready_{index}.json", phase)
    return arithmetic


def drive(args: argparse.Namespace, cli: list[str], link: netns.EmulatedLink | None,
          control: Path) -> dict[str, Any]:
    """Launch both workers (each in its namespace, with this run's ``cli`` flags), serve the phases,
    collect the result."""
    deadline = time.monotonic() + args.timeout_s
    port = args.port or random.randint(29600, 29999)
    argv = [sys.executable, str(Path(__file__).resolve()), *cli, "--worker", "--control-dir", str(control)]
    logs = [open(control / f"rank{r}.log", "w") for r in range(WORLD)]
    procs = [netns.launch_rank(argv, r, WORLD, port, logs[r], in_netns=link is not None, cwd=_REPO)
             for r in range(WORLD)]
    try:
        arithmetic = serve_phases(args, link, control, procs, deadline)
        netns.wait_for_file(control / "result.json", procs, deadline)
        for p in procs:  # run_main avoids DeepSpeed's exit-time abort; the wait is bounded anyway
            p.wait(timeout=max(5.0, deadline - time.monotonic()))
    finally:
        netns.stop(procs)
        for f in logs:
            f.close()
    return {**json.loads((control / "result.json").read_text()), "arithmetic": arithmetic,
            "worker_rc": [p.returncode for p in procs]}


def _log_tails(control: Path) -> str:
    logs = [*(f"rank{r}" for r in range(WORLD)), "launcher"]  # launcher: --cluster, both ranks via pdsh
    tails = [f"--- {name} (last 40 lines) ---\n" + "\n".join(path.read_text().splitlines()[-40:])
             for name in logs if (path := control / f"{name}.log").exists()]
    return "\n".join(tails)


# ============================================================================ --cluster: the emulated 2-node cluster
# scripts/cluster.sh's nodes node1 / node2 (network namespaces sharing this filesystem, one veth pair
# shaped by tc tbf); both ranks are started by the deepspeed launcher through launch/deepspeed.sh
# with a hostfile (pdsh over ssh), one rank per node, and run the same worker_main as above.
_NODES = ("node1", "node2")


def _cluster_harness():
    """tests/cluster/cluster_harness.py: the cluster script's path and the rank environment the
    cluster tests forward to the nodes (one definition for tests and benchmark)."""
    path = str(_REPO / "tests" / "cluster")
    if path not in sys.path:
        sys.path.insert(0, path)
    import cluster_harness

    return cluster_harness


def _cluster_sh(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", _cluster_harness().CLUSTER_SH, *cmd], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False)


def _qdisc_rate(node: str = "node1") -> str:
    """The rate on ``node``'s veth end as ``scripts/cluster.sh rate`` takes it back (``none`` unshaped)."""
    end = {"node1": "qgc-veth1", "node2": "qgc-veth2"}[node]
    out = _cluster_sh("exec", node, "tc", "qdisc", "show", "dev", end, timeout=30).stdout
    for line in out.splitlines():
        words = line.split()
        if line.startswith("qdisc tbf") and "rate" in words:
            return words[words.index("rate") + 1].lower()
    return "none"


class ClusterLink:
    """The cluster's veth pair as ``serve_phases`` shapes it: ``scripts/cluster.sh rate`` (tbf on
    both ends, re-shaped in place; the kernel has no netem here, so no delay)."""

    netem_error = None

    def shape(self, rate_bit_s: float | None, delay_ms: float) -> netns.Shaping:
        rate = "none" if rate_bit_s is None else f"{int(rate_bit_s)}bit"
        proc = _cluster_sh("rate", rate)
        if proc.returncode != 0:
            raise RuntimeError(f"scripts/cluster.sh rate {rate} failed (rc {proc.returncode}): {proc.stdout.strip()}")
        return netns.Shaping(rate_bit_s=rate_bit_s, delay_ms=0.0, qdisc="none" if rate_bit_s is None else "tbf",
                             delay_emulated=False,
                             commands=[f"scripts/cluster.sh rate {rate}", *proc.stdout.strip().splitlines()])


def _node_pids_with(marker: str) -> list[int]:
    """Processes on the emulated nodes whose command line contains ``marker`` (this run's control
    directory: its launchers and ranks, nothing else)."""
    pids = []
    for node in _NODES:
        out = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True, timeout=10).stdout
        for pid in map(int, out.split()):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline and pid != os.getpid():
                pids.append(pid)
    return pids


def _kill_leftovers(marker: str) -> list[int]:
    """TERM, then KILL after 10 s, what this run left on the nodes; returns the pids found."""
    found = _node_pids_with(marker)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _node_pids_with(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        for _ in range(50):
            if not _node_pids_with(marker):
                return found
            time.sleep(0.2)
    return found


def drive_cluster(args: argparse.Namespace, cli: list[str], link: ClusterLink, control: Path) -> dict[str, Any]:
    """``launch/deepspeed.sh`` on node1 with a 2-host hostfile (``deepspeed --hostfile``, pdsh):
    one worker rank per node with this run's ``cli`` flags; serve the phases; collect the result."""
    harness = _cluster_harness()
    deadline = time.monotonic() + args.timeout_s
    env = {**harness.rank_env(), "NUM_GPUS": "1", "HOSTFILE": str(control / "hostfile"),
           "MASTER_PORT": str(args.port or harness.free_port()), "QG_THR_DEV": "auto",
           "DEEPSPEED_TIMEOUT": str(max(1, int(args.timeout_s // 60))),
           "TRAIN": f"{sys.executable} {Path(__file__).resolve()} --worker --control-dir {control}"}
    (control / "hostfile").write_text("".join(f"{node} slots=1\n" for node in _NODES))
    # pdsh's remote shells start bare: the deepspeed runner exports these lines on each node.
    (control / ".deepspeed_env").write_text("".join(f"{k}={env[k]}\n" for k in (*harness.FORWARDED, "QG_THR_DEV")))
    with open(control / "launcher.log", "w") as log:
        proc = subprocess.Popen(["bash", harness.CLUSTER_SH, "exec", "node1", str(_REPO / "launch" / "deepspeed.sh"),
                                 *cli], env=env, cwd=control, stdout=log, stderr=subprocess.STDOUT)
        try:
            arithmetic = serve_phases(args, link, control, [proc], deadline)
            netns.wait_for_file(control / "result.json", [proc], deadline)
            proc.wait(timeout=max(5.0, deadline - time.monotonic()))
        finally:
            netns.stop([proc])
    return {**json.loads((control / "result.json").read_text()), "arithmetic": arithmetic,
            "worker_rc": [proc.returncode]}


def cluster_main(args: argparse.Namespace, cli: list[str]) -> int:
    """--cluster: needs root; brings the cluster up unless it is (and down again after, also on
    failure; a cluster found up is left up, its rate restored)."""
    if os.geteuid() != 0:
        print("throughput.py --cluster needs root: it runs scripts/cluster.sh (network namespaces, sshd, tc). "
              "Run it as root, e.g. sudo .venv/bin/python benchmarks/throughput.py --cluster", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(1)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # unwind through the finally: ranks and cluster go
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    control = Path(tempfile.mkdtemp(prefix="qg_thr_cluster_"))  # /tmp: the nodes share this filesystem
    load_before, start = os.getloadavg()[0], time.perf_counter()
    was_up = _cluster_sh("status").returncode == 0
    restore = _qdisc_rate() if was_up else None
    print(f"[throughput] cluster {'already up: using it, leaving it up' if was_up else 'down: bringing it up'}",
          flush=True)
    try:
        if not was_up:
            up = _cluster_sh("up", timeout=1500)  # the first use installs Debian packages
            if up.returncode != 0:
                raise RuntimeError(f"scripts/cluster.sh up failed:\n{up.stdout[-3000:]}")
        result = drive_cluster(args, cli, ClusterLink(), control)
    except BaseException:
        print(_log_tails(control), file=sys.stderr)
        raise
    finally:
        left = _kill_leftovers(str(control))
        if left:
            print(f"[throughput] stopped leftover processes on the nodes: {left}", file=sys.stderr)
        teardown = _cluster_sh("rate", restore) if was_up else _cluster_sh("down", timeout=180)
        print(f"[throughput] {'rate restored to ' + restore if was_up else 'cluster down'}: rc {teardown.returncode}",
              flush=True)
        shutil.rmtree(control, ignore_errors=True)
    payload = cluster_payload(args, result, found_up=was_up, load_before=load_before,
                              wall_s=time.perf_counter() - start)
    json_path, md_path = write_cluster_outputs(payload, args.out_dir)
    print(markdown_cluster(payload))
    print(f"\nwrote {json_path}, {md_path} and {_stem(True)}.png ({payload['wall_s']:.0f} s)")
    return 1 if payload["failures"] else 0


def cluster_payload(args: argparse.Namespace, result: dict, *, found_up: bool, load_before: float,
                    wall_s: float) -> dict:
    """What throughput_cluster.json holds: the run's environment, its records, rows and checks."""
    import importlib.metadata

    from benchmarks._common import environment

    rows = summarize(result["records"], result["phases"], args)
    failures = validate(rows, result["phases"])
    if result["hosts"] != list(_NODES):
        failures.append(f"ranks ran on {result['hosts']}, not rank0=node1 rank1=node2")
    return {"environment": environment(), "description": __doc__,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("worker", "control_dir")},
            "cluster": {"launcher": "launch/deepspeed.sh with HOSTFILE (deepspeed --hostfile, pdsh), NUM_GPUS=1",
                        "nodes": list(_NODES), "found_up": found_up,
                        "deepspeed": importlib.metadata.version("deepspeed")},
            "loadavg_before": load_before, "loadavg_after": os.getloadavg()[0], "wall_s": wall_s,
            "netns_blocked": None, "netem_error": None, **result, "rows": rows, "failures": failures}


def write_cluster_outputs(payload: dict, out_dir: Path) -> tuple[Path, Path]:
    """throughput_cluster.{json,md,png} under ``out_dir``."""
    from benchmarks._common import write_outputs

    paths = write_outputs(_stem(True), payload, markdown_cluster(payload), out_dir)
    plot(payload, out_dir / f"{_stem(True)}.png")
    return paths


# ============================================================================ summary and report
def _mean(values: list) -> float | None:
    return statistics.fmean(values) if values and all(v is not None for v in values) else None


def summarize(records: list, phases: list[dict], args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per (phase, contender): median step time (max over ranks), tokens/s, bytes."""
    rows = []
    for phase, ranks in zip(phases, records):
        for name in args.contenders:
            steps = list(zip(*[rank[name] for rank in ranks]))  # per step: one record per rank
            timed = [s for s in steps if not s[0]["warmup"]]
            step_s = [max(r["s"] for r in s) for s in timed]
            each = [WORLD * args.batch * args.seq / t for t in step_s]  # one value per repeat
            rows.append({
                "phase": phase["name"], "contender": name, "n": len(timed), "step_s": step_s,
                "median_step_s": statistics.median(step_s),
                "tokens_per_s": WORLD * args.batch * args.seq / statistics.median(step_s),
                "tokens_per_s_each": each, "tokens_per_s_mean": statistics.fmean(each),
                "tokens_per_s_std": statistics.stdev(each) if len(each) > 1 else 0.0,
                "bytes_per_rank": _mean([r["bytes"] for s in timed for r in s]),
                "wire_bytes_per_rank": _mean([r["wire"] for s in timed for r in s]),
                "wire_bytes_total": [sum(s[k]["wire"] or 0 for s in timed) for k in range(WORLD)],
                "calls": _mean([r["calls"] for s in timed for r in s]),
                "refresh_in_timed": any(r["refresh"] for s in timed for r in s),
                "losses_finite": all(abs(r["loss"]) < float("inf") for s in steps for r in s),  # False for NaN too
                "first_step": {"s": max(r["s"] for r in steps[0]), "bytes": _mean([r["bytes"] for r in steps[0]]),
                               "refresh": any(r["refresh"] for r in steps[0])}})
    return rows


def validate(rows: list[dict], phases: list[dict]) -> list[str]:
    """Failures (empty when every check passed); see the module docstring."""
    failures, rate_of = [], {p["name"]: p["rate_bit_s"] for p in phases}
    for row in rows:
        tag = f"{row['contender']} @ {row['phase']}"
        wire, expected = row["wire_bytes_per_rank"], row["bytes_per_rank"]
        if not row["losses_finite"]:
            failures.append(f"{tag}: non-finite loss")
        if row["refresh_in_timed"]:
            failures.append(f"{tag}: a timed step refreshed projectors (raise --gap)")
        if wire is not None and expected and wire < 0.9 * expected:
            failures.append(f"{tag}: {wire:.3g} B on the wire < 90% of the {expected:.3g} B expected")
        rate, sent, seconds = rate_of[row["phase"]], max(row["wire_bytes_total"]), sum(row["step_s"])
        if wire is not None and rate and sent > 1.1 * rate / 8 * seconds + 2 * netns.MIN_BURST_BYTES:
            failures.append(f"{tag}: sent {sent:.3g} B in {seconds:.3g} s, faster than the {rate:.3g} bit/s limit")
    return failures


def _fmt_rate(bit_s: float | None) -> str:
    if bit_s is None:
        return "no shaping"
    return f"{bit_s / 1e9:.3g} Gbit/s" if bit_s >= 1e9 else f"{bit_s / 1e6:.3g} Mbit/s"


def _link_lines(payload: dict) -> list[str]:
    ar, a, cal = payload["arithmetic"], payload["args"], payload["calibration"]
    if not ar:
        return [f"Emulated link not run: {payload['netns_blocked'] or 'disabled (--no-netns)'}; loopback only."]
    lines = [f"Rate arithmetic: F_cpu = {ar['cpu_flop_s'] / 1e9:.2f} GFLOP/s measured "
             f"({cal[0]['flops_per_token'] / 1e6:.1f} MFLOP per token = 6 N + 12 L d s; fwd+bwd "
             f"{statistics.fmean(c['fwd_bwd_s'] for c in cal):.3f} s for "
             f"{ar['tokens_per_rank_step']} tokens, both cores busy); F_gpu = {a['gpu_tflops']:g} TFLOP/s (an H100's "
             f"effective bf16 rate, ~40% of its 989 dense peak); s = F_cpu / F_gpu = {ar['flop_scale']:.3g}. Compute / "
             f"transfer per step = (6 P T / F) / (c P b / B), so B_emulated = B_real x s x T_real / T_here, with "
             f"T_real = {ar['real_tokens_per_gpu_step']} tokens per GPU per optimizer step and T_here = "
             f"{ar['tokens_per_rank_step']} (factor {ar['token_factor']:.3g}).", "",
             "| phase | real link | emulated rate | qdisc | delay applied |", "|---|---|---|---|---|"]
    for p in payload["phases"]:
        sh = p.get("shaping") or {}
        real = "-" if not p["real_gbit_s"] else f"{p['real_gbit_s']:g} Gbit/s" + (
            " per GPU, scaled" if p["scaled"] else ", as is")
        delay = "-" if not p["rate_bit_s"] else (f"{sh['delay_ms']:g} ms" if sh["delay_emulated"] else "no")
        lines.append(f"| {p['name']} | {real} | {_fmt_rate(p['rate_bit_s'])} | {sh.get('qdisc', '-')} | {delay} |")
    if payload.get("netem_error"):
        lines += ["", f"`tc qdisc ... netem` failed here with `{payload['netem_error']}` (the kernel lacks "
                  "netem), so the links are rate-limited by tbf only, without the requested delay."]
    return lines


def _bytes_lines(payload: dict) -> list[str]:
    lines = ["Bytes per step and rank (MB = 1e6 B): metered (ours: `optimizer.comm.meter`; ours_zero2 adds ZeRO-2's "
             "closed form for the dense tensors) or closed form (baselines); wire = veth tx_bytes (headers "
             "included), mean over the timed steps of all phases; calls = ours' metered collectives per step.", "",
             "| contender | metered / closed form MB | wire MB | wire / metered | calls |", "|---|---|---|---|---|"]
    for name in payload["args"]["contenders"]:
        mine = [r for r in payload["rows"] if r["contender"] == name]
        wire, metered, calls = _mean([r["wire_bytes_per_rank"] for r in mine]), mine[0]["bytes_per_rank"], \
            mine[0]["calls"]
        lines.append(f"| {name} | {metered / 1e6:.2f} | {'-' if wire is None else f'{wire / 1e6:.2f}'} | "
                     f"{'-' if wire is None else f'{wire / metered:.2f}'} | "
                     f"{'-' if calls is None else f'{calls:.0f}'} |")
    if payload["collective_wire"]:
        lines += ["", "Bytes one rank sends per gloo collective of S bytes on this link, in units of S (a ring sends 1 "
                  "for all-reduce and 0.5 for the others at N = 2): " + ", ".join(
                      f"{k} {v:.2f}" for k, v in payload["collective_wire"].items()) + "."]
    return lines


def _refresh_lines(payload: dict, by: dict) -> list[str]:
    first, gap, out = payload["phases"][0]["name"], payload["args"]["gap"], []
    for name in [c for c in payload["args"]["contenders"] if c.startswith("ours")]:
        row = by[first, name]
        f = row["first_step"]
        if f["refresh"]:
            extra_b, extra_s = f["bytes"] - row["bytes_per_rank"], f["s"] - row["median_step_s"]
            per_rate = ", ".join(f"{p['name']} {extra_b * 8 / p['rate_bit_s'] / gap * 1e3:.1f} ms"
                                 for p in payload["phases"] if p["rate_bit_s"])
            out.append(f"- `{name}`: first step (warm-up of `{first}`, every projector refreshed: SVD + INT4) "
                       f"{f['s']:.2f} s ({extra_s:+.2f} s), {f['bytes'] / 1e6:.2f} MB metered "
                       f"({extra_b / 1e6:+.2f} MB) "
                       f"vs a steady step. Over a gap of {gap} steps that adds {extra_s / gap * 1e3:.1f} ms of compute "
                       f"and, for the bytes, {per_rate or '-'} per step.")
    return ["Projector refreshes (warm-up steps, not timed):", "", *out, ""] if out else []


def markdown(payload: dict) -> str:
    from benchmarks._common import environment_md

    a, rows = payload["args"], payload["rows"]
    phases = [p["name"] for p in payload["phases"]]
    by = {(r["phase"], r["contender"]): r for r in rows}
    header = ["| " + " | ".join(phases) + " |", "|---" * (len(phases) + 1) + "|"]
    lines = ["# Training throughput on 2 CPU ranks: qgalore-dist vs DDP + AdamW vs ZeRO-2 + AdamW8bit", "",
             environment_md(payload["environment"]),
             f"- load average (1 min) before / after: {payload['loadavg_before']:.2f} / {payload['loadavg_after']:.2f};"
             f" wall {payload['wall_s']:.0f} s", "",
             f"Model `{a['config']}` (vocab {a['vocab']}, {payload['params']:,} parameters, fp32), {a['batch']} x "
             f"{a['seq']} tokens per rank and step, 2 ranks x 1 thread, gloo; Q-GaLore rank {a['rank']}, "
             f"gap {a['gap']};"
             f" {a['warmup']} warm-up + {a['min_steps']}..{a['steps']} timed steps per contender and phase (phase "
             f"budget {a['phase_budget_s']:g} s). Cells: tokens/s (median step s, n steps); a step = forward + "
             "backward "
             "+ optimizer step, the slower rank's time.", "", "| contender " + header[0], header[1]]
    for name in a["contenders"]:
        lines.append(f"| {name} | " + " | ".join(
            f"{by[p, name]['tokens_per_s']:.0f} ({by[p, name]['median_step_s']:.2f} s, n={by[p, name]['n']})"
            for p in phases) + " |")
    lines += ["", "Speed-up, tokens/s of ours / baseline:", "", "| ours / baseline " + header[0], header[1]]
    for ours in [c for c in a["contenders"] if c.startswith("ours")]:
        for base in [c for c in a["contenders"] if not c.startswith("ours")]:
            lines.append(f"| {ours} / {base} | " + " | ".join(
                f"{by[p, ours]['tokens_per_s'] / by[p, base]['tokens_per_s']:.2f}x" for p in phases) + " |")
    lines += ["", *_bytes_lines(payload), "", *_link_lines(payload), "", *_refresh_lines(payload, by),
              "Validation: " + ("passed" if not payload["failures"] else "FAILED: " + "; ".join(payload["failures"])),
              "", "Per-step, per-rank records are in `throughput.json`."]
    return "\n".join(lines)


def _stem(cluster: bool) -> str:
    return "throughput_cluster" if cluster else "throughput"


def markdown_cluster(payload: dict) -> str:
    """The --cluster report: tokens/s mean +- std over the repeats, ratios, scaling, load."""
    from benchmarks._common import environment_md

    a, rows, ar = payload["args"], payload["rows"], payload["arithmetic"]
    phases = [p["name"] for p in payload["phases"]]
    by = {(r["phase"], r["contender"]): r for r in rows}
    header = ["| " + " | ".join(phases) + " |", "|---" * (len(phases) + 1) + "|"]
    loads = ", ".join(f"{p['name']} {p['loadavg_1m']:.2f}" for p in payload["phases"])
    tokens = WORLD * a["batch"] * a["seq"]
    lines = ["# Training throughput across the emulated 2-node cluster: qgalore-dist vs DDP + AdamW vs ZeRO-2 + "
             "bnb AdamW8bit", "", environment_md(payload["environment"]),
             f"- deepspeed {payload['cluster']['deepspeed']}; launcher: {payload['cluster']['launcher']}, one rank "
             f"on each of {' and '.join(payload['cluster']['nodes'])} (hosts seen by the ranks: "
             f"{', '.join(f'rank{r}={h}' for r, h in enumerate(payload['hosts']))}); cluster "
             + ("found up (left up, rate restored)" if payload["cluster"]["found_up"]
                else "brought up and down by the run"),
             f"- load average (1 min) before / after: {payload['loadavg_before']:.2f} / {payload['loadavg_after']:.2f};"
             f" at the start of each phase: {loads}; wall {payload['wall_s']:.0f} s", "",
             f"Model `{a['config']}` (vocab {a['vocab']}, {payload['params']:,} parameters, fp32), {a['batch']} x "
             f"{a['seq']} tokens per rank and step, 2 nodes x 1 rank x 1 thread, gloo over the veth pair "
             f"(`scripts/cluster.sh`, tc tbf on both ends, re-shaped between phases by `scripts/cluster.sh rate`); "
             f"Q-GaLore rank {a['rank']}, gap {a['gap']}. The same worker and contenders as the single-node "
             f"benchmark (`{', '.join(a['contenders'])}`), {a['warmup']} warm-up step each in the first phase, "
             f"then n = {a['steps']} repeats per contender and phase, interleaved (one step of each contender in "
             "the order listed, then again: A B C A B C ...), so load drift hits all alike; after each rate "
             "change an untimed 1 MiB all-reduce lets TCP adapt. A repeat = forward + backward + optimizer step, "
             f"the slower rank's time; tokens/s = {tokens} / step time. Cells: tokens/s mean ± sample std over "
             "the n repeats.", "", "| contender " + header[0], header[1]]
    for name in a["contenders"]:
        lines.append(f"| {name} | " + " | ".join(
            f"{by[p, name]['tokens_per_s_mean']:.0f} ± {by[p, name]['tokens_per_s_std']:.0f} (n={by[p, name]['n']})"
            for p in phases) + " |")
    lines += ["", "Ratios, ours / baseline: ratio of the means (in brackets: mean ± std of the per-repeat ratios, "
              "each repeat's steps adjacent in time):", "", "| ours / baseline " + header[0], header[1]]
    for ours in [c for c in a["contenders"] if c.startswith("ours")]:
        for base in [c for c in a["contenders"] if not c.startswith("ours")]:
            cells = []
            for p in phases:
                o, b = by[p, ours], by[p, base]
                paired = [x / y for x, y in zip(o["tokens_per_s_each"], b["tokens_per_s_each"])]
                spread = statistics.stdev(paired) if len(paired) > 1 else 0.0
                cells.append(f"{o['tokens_per_s_mean'] / b['tokens_per_s_mean']:.2f}x "
                             f"({statistics.fmean(paired):.2f} ± {spread:.2f})")
            lines.append(f"| {ours} / {base} | " + " | ".join(cells) + " |")
    lines += ["", *_bytes_lines(payload), "", *_link_lines(payload)]
    if ar:
        # What the single-node benchmark's T_real would give for the slowest class here.
        slowest = min(a["real_gbits"])
        rate_2048 = slowest * 1e9 * ar["flop_scale"] * 2048 / ar["tokens_per_rank_step"]
        ddp = next((r for r in rows if r["contender"] == "ddp_adamw"), rows[0])
        lines += ["", f"Why T_real = {ar['real_tokens_per_gpu_step']} here (the single-node benchmark uses 2048): the "
                  "comm / compute ratio per step is c b F_gpu / (6 B_real T_real), so with 2048 tokens per GPU per "
                  f"optimizer step the {slowest:g} Gbit/s class would be emulated at "
                  f"{_fmt_rate(rate_2048)}, where one {ddp['contender']} step "
                  f"({ddp['bytes_per_rank'] / 1e6:.1f} MB per rank) alone takes "
                  f"{ddp['bytes_per_rank'] * 8 / rate_2048:.0f} s (at the default model and batch: about 18 "
                  "minutes), and no one trains over 1-10 Gbit/s links syncing every 2k tokens per GPU. "
                  f"{ar['real_tokens_per_gpu_step']} tokens per GPU per step is, e.g., LLaMA's 4M-token batch "
                  f"over {4 * 2**20 // ar['real_tokens_per_gpu_step']} GPUs (gradient accumulation, one sync per "
                  "optimizer step); `--real-tokens-per-gpu` changes it. No added delay (tbf only; this kernel has "
                  "no netem)."]
    lines += ["", *_refresh_lines(payload, by),
              "Validation: " + ("passed" if not payload["failures"] else "FAILED: " + "; ".join(payload["failures"])),
              "", f"Per-step, per-rank records are in `{_stem(True)}.json`."]
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, phases, names = payload["args"], [p["name"] for p in payload["phases"]], payload["args"]["contenders"]
    by = {(r["phase"], r["contender"]): r["tokens_per_s"] for r in payload["rows"]}
    fig, ax = plt.subplots(figsize=(2.2 * len(phases) + 2, 4.2))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(phases))]
        ax.bar_label(ax.bar(xs, [by[p, name] for p in phases], width, label=name), fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(phases)), [f"{p['name']}\n{_fmt_rate(p['rate_bit_s'])}" for p in payload["phases"]])
    ax.set_ylabel("tokens / s (2 ranks)")
    ax.set_title(f"{a['config']} (vocab {a['vocab']}), 2 CPU ranks, {a['batch']}x{a['seq']} tokens/rank/step",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ============================================================================ entry point
def parse_rates(text: str) -> list[float]:
    """``"1gbit,10gbit,100gbit"`` (tc rate syntax: bit, kbit, mbit, gbit, tbit) -> [1.0, 10.0, 100.0] Gbit/s."""
    units = {"bit": 1e-9, "kbit": 1e-6, "mbit": 1e-3, "gbit": 1.0, "tbit": 1e3}
    out = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?bit)\s*", item.lower())
        if not match or float(match[1]) <= 0:
            raise ValueError(f"bad rate {item!r} in --rates {text!r}: use tc syntax, e.g. 1gbit,10gbit,100gbit")
        out.append(float(match[1]) * units[match[2]])
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="llama_20m")
    p.add_argument("--vocab", type=int, default=1024, help="small: a dense share closer to large models'")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=64, help="hidden / 4, like 7B at rank 1024")
    p.add_argument("--gap", type=int, default=200, help="projector refresh gap (timed steps must not refresh)")
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="timed steps per contender and phase, at most")
    p.add_argument("--min-steps", type=int, default=2, help="timed steps even past the phase budget")
    p.add_argument("--phase-budget-s", type=float, default=150.0)
    p.add_argument("--calib-reps", type=int, default=3)
    p.add_argument("--real-gbits", type=float, nargs="*", default=[400.0, 100.0], help="real links, scaled")
    p.add_argument("--plain-gbits", type=float, nargs="*", default=[1.0], help="links used as they are")
    p.add_argument("--gpu-tflops", type=float, default=400.0, help="effective training FLOP/s of one GPU")
    p.add_argument("--real-tokens-per-gpu", type=int, default=2048, help="tokens per GPU per optimizer step")
    p.add_argument("--delay-ms", type=float, default=0.1, help="one-way delay of shaped links (netem only)")
    p.add_argument("--no-netns", action="store_true", help="loopback only, no emulated link")
    p.add_argument("--timeout-s", type=float, default=900.0, help="bound on the whole run")
    p.add_argument("--port", type=int, default=0, help="MASTER_PORT (default: random in 29600-29999)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="smoke test (llama_9m, tiny batch); writes to /tmp")
    p.add_argument("--cluster", action="store_true",
                   help="run across scripts/cluster.sh's 2 emulated nodes (deepspeed --hostfile, 1 rank per node; "
                        "root): ours_overlap, ddp_adamw, zero2_adamw8bit at the --rates classes, scaled; writes "
                        "throughput_cluster.{md,json}")
    p.add_argument("--rates", default=None,
                   help="--cluster: real link classes, comma-separated tc rates (default 1gbit,10gbit,100gbit), "
                        "each scaled like --real-gbits")
    p.add_argument("--repeats", type=int, default=3, help="--cluster: timed steps per contender and phase (>= 3)")
    p.add_argument("--phase-warmup", type=int, default=None,
                   help="warm-up steps in phases after the first (default --warmup; --cluster: 0)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--control-dir", help=argparse.SUPPRESS)
    known = p.parse_known_args(argv)[0]
    if known.quick:  # quick changes defaults only: explicit flags still win
        p.set_defaults(config="llama_9m", vocab=256, batch=2, seq=64, rank=16, steps=2, min_steps=1,
                       phase_budget_s=20.0, calib_reps=1, timeout_s=400.0)
    if known.cluster:  # every repeat runs (no phase budget); the slowest class dominates the wall time
        p.set_defaults(contenders=list(CLUSTER_CONTENDERS), plain_gbits=[], real_tokens_per_gpu=65536,
                       delay_ms=0.0, phase_warmup=0, phase_budget_s=1e9, timeout_s=600.0 if known.quick else 1500.0)
    args = p.parse_args(argv)
    if args.rates is not None and not args.cluster:
        raise ValueError("--rates and --repeats are for --cluster (use --real-gbits / --steps otherwise)")
    if args.cluster:
        args.real_gbits = parse_rates(args.rates or "1gbit,10gbit,100gbit")
        args.steps = args.min_steps = args.repeats
    if args.out_dir is None:
        from benchmarks._common import RESULTS_DIR
        args.out_dir = Path(tempfile.gettempdir()) / "qg_throughput_quick" if args.quick else RESULTS_DIR
    ours_steps = (1 + len(args.real_gbits) + len(args.plain_gbits)) * (args.warmup + args.steps)
    checks = {"batch >= 1": args.batch >= 1, "seq >= 2": args.seq >= 2, "rank >= 1": args.rank >= 1,
              "warmup >= 1": args.warmup >= 1, "1 <= min_steps <= steps": 1 <= args.min_steps <= args.steps,
              "gpu_tflops > 0": args.gpu_tflops > 0, "real_tokens_per_gpu >= 1": args.real_tokens_per_gpu >= 1,
              "delay_ms >= 0": args.delay_ms >= 0, "timeout_s > 0": args.timeout_s > 0,
              "--cluster: repeats >= 3": not args.cluster or args.repeats >= 3,
              "phase_warmup >= 0": args.phase_warmup is None or args.phase_warmup >= 0,
              f"gap > {ours_steps} (all of ours' steps)": args.gap > ours_steps,
              "rates > 0": all(g > 0 for g in args.real_gbits + args.plain_gbits)}
    if not all(checks.values()):
        raise ValueError(f"bad arguments, need: {[k for k, ok in checks.items() if not ok]}")
    return args


def _open_link(args: argparse.Namespace) -> tuple[netns.EmulatedLink | None, str | None]:
    """The emulated link, or (None, why not)."""
    if args.no_netns:
        return None, None
    if os.geteuid() != 0:
        return None, "network namespaces need root (euid is not 0)"
    link = netns.EmulatedLink()
    try:
        link.open()
    except netns.NetnsUnavailable as exc:
        return None, str(exc)
    return link, None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        from qgalore_dist.integrations.launch import run_main
        run_main(lambda: worker_main(args))  # exits the process, avoiding DeepSpeed's exit-time abort
    if args.cluster:
        return cluster_main(args, sys.argv[1:] if argv is None else list(argv))
    import torch

    from benchmarks._common import environment, write_outputs

    torch.set_num_threads(1)  # the parent computes nothing; recorded as the workers run
    for sig in (signal.SIGTERM, signal.SIGHUP):  # unwind through the finally: workers and namespaces go
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    control, link, blocked = Path(tempfile.mkdtemp(prefix="qg_thr_")), None, None
    load_before, start = os.getloadavg()[0], time.perf_counter()
    try:
        link, blocked = _open_link(args)
        result = drive(args, sys.argv[1:] if argv is None else list(argv), link, control)
    except BaseException:
        print(_log_tails(control), file=sys.stderr)
        raise
    finally:
        netem_error = link.netem_error if link else None
        if link is not None:
            link.close()
        shutil.rmtree(control, ignore_errors=True)
    rows = summarize(result["records"], result["phases"], args)
    payload = {"environment": environment(), "description": __doc__,
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                        if k not in ("worker", "control_dir")},
               "loadavg_before": load_before, "loadavg_after": os.getloadavg()[0],
               "wall_s": time.perf_counter() - start, "netns_blocked": blocked, "netem_error": netem_error,
               **result, "rows": rows, "failures": validate(rows, result["phases"])}
    json_path, md_path = write_outputs("throughput", payload, markdown(payload), args.out_dir)
    plot(payload, args.out_dir / "throughput.png")
    print(markdown(payload))
    print(f"\nwrote {json_path}, {md_path} and throughput.png ({payload['wall_s']:.0f} s)")
    return 1 if payload["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
