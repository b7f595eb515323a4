"""Gradient-sync bytes per step per rank for LLaMA 60M-7B: qgalore-dist with and without payload
compression against DDP (bf16), ZeRO-2 (bf16) and torch's PowerSGD DDP hook (rank 4); and the SVD
makespan of a refresh step on 4 ranks, rank0 vs balanced ownership.

What is computed
    Closed forms per rank, ring-algorithm volumes as ``qgalore_dist.distributed.comm`` meters them:
    ``qgalore_dist/estimate/comm.py`` (its docstring has every formula).  Baselines: ``ddp_bf16``,
    ``zero2_bf16`` (the same volume), ``powersgd_r4`` (torch's ``powerSGD_hook``, rank 4, bf16;
    ``powersgd_r4_fp32`` in the JSON).  Ours, steady step, by meter kind, per payload variant
    (``VARIANTS``): ``ours_fp32`` (the default ``payload_dtype="float32"``), ``ours_bf16``,
    ``ours_int8`` (``compress_lowrank=True`` + bf16 payloads), ``ours_int8_fp32_dense``
    (``compress_lowrank`` alone) and ``ours_int8_all`` (+ ``compress_dense``).  Refresh steps
    (every matrix refreshing) are reported as the extra over a steady step.

Validation (metered / counted, not closed form), one launch of 2 gloo ranks on CPU
    ``tests/comm_harness.py`` (``validate``; the same harness ``tests/unit/test_bench_comm.py``
    uses): ours on a small LlamaForCausalLM (hidden 64, intermediate 160, 2 layers, vocab 128),
    rank 8, step 0 refreshing every projector and step 1 steady, per payload case (``CASES``):
    ``optimizer.comm.meter.last_step`` equals the closed form kind by kind, rank by rank (==);
    torch's PowerSGD hook under DDP: the counted ``all_reduce`` bytes equal the DDP closed form
    before ``start_powerSGD_iter`` and the PowerSGD one after, in fp32 and bf16.

SVD makespan (measured on this CPU, 1 torch thread)
    ``torch.linalg.svd(full_matrices=False)`` (the ``exact`` method of ``svd_basis``) timed on a
    random fp32 matrix of every distinct GaLore shape of llama_60m and llama_130m (median of
    ``--svd-repeats``).  With every projector refreshing on the same step, a rank's SVD time is the
    sum over the matrices it owns; the makespan is the largest over ranks.  ``rank0`` puts every
    matrix on rank 0; ``balanced`` is ``plan_ownership``'s LPT plan.  For larger models only the
    cost-model ratio (``plan.svd_cost``, m*n*min(m, n)) is given.

Run from the repository root:  python benchmarks/comm.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from comm_harness import validate  # noqa: E402  (tests/, on sys.path through _common)

from benchmarks._common import RESULTS_DIR, environment, environment_md, write_outputs  # noqa: E402
from qgalore_dist.distributed.comm import KINDS  # noqa: E402
from qgalore_dist.distributed.plan import MatrixSpec, plan_ownership  # noqa: E402
from qgalore_dist.estimate.comm import (  # noqa: E402
    Tensors,
    compressed_payload,
    ddp_bytes,
    lowrank_by_owner,
    numel,
    ours_refresh_all,
    ours_steady,
    powersgd_bytes,
    zero2_bytes,
)
from qgalore_dist.estimate.model import model_shapes  # noqa: E402
from qgalore_dist.estimate.schedule import adaptive_refresh_steps, fixed_refresh_steps, run_average  # noqa: E402

MiB = 2**20
MODELS = ("llama_60m", "llama_130m", "llama_350m", "llama_1b", "llama_7b")
RANKS = (128, 256, 512, 1024)
PAPER_RANK = {"llama_60m": 128, "llama_130m": 256, "llama_350m": 256, "llama_1b": 512, "llama_7b": 1024}
"""The GaLore / Q-GaLore pre-training rank of each size (the plot's configuration)."""
TARGET = {"model": "llama_7b", "rank": 1024, "ratio": 3.5, "compressed_ratio": 7.0}
RUN_STEPS = {"llama_60m": 10_000, "llama_130m": 20_000, "llama_350m": 60_000, "llama_1b": 100_000,
             "llama_7b": 150_000}
"""Training steps of the reference's C4 pre-training scripts (reference/qgalore-algorithm.md 3.3)."""
INITIAL_GAP = 200
"""The initial refresh gap T of the schedules (the reference's 7B script uses 500: an extra row)."""
SCHEDULE_VARIANTS = (("ours_bf16", "bf16, no compression"), ("ours_int8_all", "compress_lowrank + compress_dense"))
VARIANTS = {  # name: (b_lowrank, b_dense_grad, compress_lowrank, compress_dense); dense parameters 2 B (bf16)
    "ours_fp32": (4, 4, False, False), "ours_bf16": (2, 2, False, False),
    "ours_int8": (1, 2, True, False), "ours_int8_fp32_dense": (1, 4, True, False),
    "ours_int8_all": (1, 1, True, True),
}


# ----------------------------------------------------------------------------- tables
def meta_tensors(name: str) -> Tensors:
    """(name, shape, is_galore) of every parameter of a built-in model (from its config)."""
    return model_shapes(name, 1).as_tuples()


def _world_row(tensors: Tensors, rank: int, world: int, params: int) -> dict[str, Any]:
    row: dict[str, Any] = {"ddp_bf16": ddp_bytes(params, world, b=2), "zero2_bf16": zero2_bytes(params, world, b=2),
                           "powersgd_r4": powersgd_bytes(tensors, world, b=2, rank=4),
                           "powersgd_r4_fp32": powersgd_bytes(tensors, world, b=4, rank=4)}
    for name, (b_lowrank, b_grad, compress, compress_dense) in VARIANTS.items():
        kw = dict(b_lowrank=b_lowrank, b_dense_grad=b_grad, b_dense_param=2, compress=compress,
                  compress_dense=compress_dense)
        steady = ours_steady(tensors, rank, world, **kw)
        refresh = ours_refresh_all(tensors, rank, world, **kw)
        row[name] = sum(steady.values())
        row[f"{name}_by_kind"] = steady
        row[f"{name}_refresh_extra"] = sum(refresh.values()) - row[name]
        row[f"{name}_refresh"] = sum(refresh.values())
        row[f"{name}_refresh_by_kind"] = refresh
        if compress:  # all-to-all: the rank that owns the fewest bytes sends the most
            per_owner = [compressed_payload(x) for x in lowrank_by_owner(tensors, rank, world)]
            row[f"{name}_lowrank_reduce_max_rank"] = float(sum(per_owner) - min(per_owner))
    for name in (*VARIANTS, "powersgd_r4", "powersgd_r4_fp32", "zero2_bf16"):
        row[f"ratio_ddp_over_{name}"] = row["ddp_bf16"] / row[name]
    # GaLore matrices alone, equal payload widths: m*n / (max(m, n) * r) summed.
    row["galore_only_ratio"] = (sum(numel(s) for _, s, g in tensors if g)
                                / sum(max(s) * rank for _, s, g in tensors if g))
    return row


def model_table(name: str, worlds=(8, 64)) -> dict[str, Any]:
    tensors = meta_tensors(name)
    params = sum(numel(s) for _, s, _ in tensors)
    galore = sum(numel(s) for _, s, g in tensors if g)
    min_dim = min(min(s) for _, s, g in tensors if g)
    out: dict[str, Any] = {"params": params, "galore_params": galore, "dense_params": params - galore,
                           "min_galore_dim": min_dim, "ranks": {}}
    for r in RANKS:
        if r < min_dim:
            out["ranks"][str(r)] = {f"N{n}": _world_row(tensors, r, n, params) for n in worlds}
    return out


# ----------------------------------------------------------------------------- run averages
def schedules(steps: int, gap: int) -> dict[str, list[int]]:
    """Refresh steps of the two bounds (``qgalore_dist/estimate/schedule.py``): the fixed gap (every
    cosine below the threshold, or GaLore) and the adaptive best case (every cosine above it)."""
    return {"fixed": fixed_refresh_steps(steps, gap), "adaptive": adaptive_refresh_steps(steps, gap)}


def run_averages(models: dict[str, Any], world: int = 8) -> dict[str, Any]:
    """Per model at its paper rank: bytes per rank on a steady step, on a refresh step (every matrix
    refreshing) and averaged over the reference's run length under both schedules, against DDP-bf16."""
    out: dict[str, Any] = {}
    cases = [(name, r, INITIAL_GAP) for name, r in PAPER_RANK.items()] + [("llama_7b", 1024, 500)]
    for name, r, gap in cases:
        row = models[name]["ranks"][str(r)][f"N{world}"]
        steps = RUN_STEPS[name]
        entry: dict[str, Any] = {"model": name, "rank": r, "world_size": world, "steps": steps, "initial_gap": gap,
                                 "ddp_bf16": row["ddp_bf16"], "schedules": {}}
        for sched, refresh_steps in schedules(steps, gap).items():
            s_row: dict[str, Any] = {"refresh_steps": len(refresh_steps)}
            for key in VARIANTS:
                avg = run_average(row[key], row[f"{key}_refresh"], refresh_steps, steps)
                s_row[key] = {"steady": avg.steady, "refresh": avg.refresh, "average": avg.average,
                              "ratio_steady": row["ddp_bf16"] / avg.steady,
                              "ratio_refresh": row["ddp_bf16"] / avg.refresh,
                              "ratio_average": row["ddp_bf16"] / avg.average}
            entry["schedules"][sched] = s_row
        out[f"{name}_r{r}_T{gap}"] = entry
    return out


# ----------------------------------------------------------------------------- SVD makespan
def llama_specs(name: str, rank: int) -> list[MatrixSpec]:
    return [MatrixSpec(name=n, shape=s, rank=rank) for n, s, g in meta_tensors(name) if g]


def time_svd(shape: tuple[int, int], repeats: int) -> dict[str, float]:
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    torch.linalg.svd(g, full_matrices=False)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.linalg.svd(g, full_matrices=False)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": repeats}


def makespan(world: int, repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {"world_size": world, "measured": {}, "cost_model": {}}
    timings: dict[str, dict[str, float]] = {}
    for name, rank in (("llama_60m", 128), ("llama_130m", 256)):
        specs = llama_specs(name, rank)
        for s in specs:
            key = f"{s.shape[0]}x{s.shape[1]}"
            if key not in timings:
                timings[key] = time_svd(s.shape, repeats)
        sec = {s.name: timings[f"{s.shape[0]}x{s.shape[1]}"]["median_s"] for s in specs}
        row = {}
        for placement in ("rank0", "balanced"):
            plan = plan_ownership(specs, world, placement)
            per_rank = [sum(sec[n] for n in plan.owned_by(r)) for r in range(world)]
            row[placement] = {"per_rank_s": per_rank, "makespan_s": max(per_rank),
                              "svd_cost": list(plan.svd_cost), "imbalance": plan.imbalance()}
        row["speedup"] = row["rank0"]["makespan_s"] / row["balanced"]["makespan_s"]
        row["matrices"] = len(specs)
        out["measured"][name] = row
    out["svd_times"] = timings
    for name in MODELS:
        rank = 128 if name == "llama_60m" else 256 if name in ("llama_130m", "llama_350m") else 1024
        specs = llama_specs(name, rank)
        plans = {p: plan_ownership(specs, world, p) for p in ("rank0", "balanced")}
        out["cost_model"][name] = {
            "rank": rank, "matrices": len(specs),
            "rank0_max_cost": max(plans["rank0"].svd_cost), "balanced_max_cost": max(plans["balanced"].svd_cost),
            "speedup": max(plans["rank0"].svd_cost) / max(plans["balanced"].svd_cost),
            "balanced_imbalance": plans["balanced"].imbalance(),
        }
    return out



# ----------------------------------------------------------------------------- output
COLUMNS = (("ddp_bf16", "DDP-bf16"), ("zero2_bf16", "ZeRO-2"), ("powersgd_r4", "PowerSGD r=4"),
           ("ours_fp32", "ours fp32"), ("ours_bf16", "ours bf16"), ("ours_int8", "ours int8"),
           ("ours_int8_all", "ours int8 all"))
RATIOS = (("ours_fp32", "fp32"), ("ours_bf16", "bf16"), ("ours_int8", "int8"), ("ours_int8_all", "int8 all"),
          ("powersgd_r4", "PowerSGD"))


def mib(x: float) -> str:
    return f"{x / MiB:,.1f}"


def _md_header(p: dict[str, Any]) -> list[str]:
    return [
        "# Gradient-sync bytes per step per rank, and SVD makespan", "",
        environment_md(p["environment"]),
        f"- load average (1 min) before / after: {p['loadavg_before']:.1f} / {p['loadavg_after']:.1f} "
        f"(2 cores shared with other jobs); wall time {p['wall_s']:.0f} s", "",
        "Sections 1-3 are **closed form** (meta-device shapes of `configs/models/*.json`); section 4 is "
        "**metered** (the package's `CommMeter`, and counted `all_reduce` bytes of torch's PowerSGD hook, on a "
        "real 2-rank gloo run) and checks the closed forms; section 5 is **measured** SVD time on this CPU. "
        "Formulas: the docstring of `qgalore_dist/estimate/comm.py`. MiB = 2^20 bytes; "
        "exact bytes in `comm.json`; plot `comm.png`.", "",
        "- DDP-bf16: all-reduce of bf16 gradients, 2(N-1)/N * 2 * params. ZeRO-2: bf16 reduce-scatter + bf16 "
        "parameter all-gather, the same volume.",
        "- PowerSGD r=4: torch's `powerSGD_hook` (`matrix_approximation_rank=4`, default "
        "`min_compression_rate=2`) after `start_powerSGD_iter`: all-reduce of P (n x 4) and Q (m x 4) of every "
        "2-D gradient (embeddings and lm_head included), the norms uncompressed; bf16 gradients (fp32 doubles it, "
        "`powersgd_r4_fp32` in the JSON). Before `start_powerSGD_iter` (torch's default 1000) it sends the DDP "
        "volume.",
        "- ours: low-rank gradient to its owner + low-rank update from its owner, max(m,n) * r elements each per "
        "GaLore matrix, plus dense gradient reduce-scatter + bf16 dense parameter broadcast and the control "
        "flags. **fp32** = the default `payload_dtype=\"float32\"` (4 B low-rank, 4 B dense gradients); **bf16** "
        "= `payload_dtype=\"bfloat16\"` (2 B everywhere); **int8** = `compress_lowrank=True` + "
        "`payload_dtype=\"bfloat16\"`: 8-bit codes + one fp32 absmax per 256 values for both low-rank halves "
        "(gradients by all-to-all, mean over ranks shown), dense gradients 2 B.", "",
    ]


def _md_table(p: dict[str, Any], world: int) -> list[str]:
    key = f"N{world}"
    head = " | ".join(label for _, label in COLUMNS)
    ratios = " | ".join(f"DDP / {label}" for _, label in RATIOS)
    lines = [f"## {'1' if world == p['worlds'][0] else '1b'}. Steady-state step, N = {world} ranks "
             "(MiB per rank per step)", "",
             f"| model | params | r | {head} | {ratios} |", "|---" * (3 + len(COLUMNS) + len(RATIOS)) + "|"]
    for name, m in p["models"].items():
        for r, rows in m["ranks"].items():
            row = rows[key]
            cells = " | ".join(mib(row[c]) for c, _ in COLUMNS)
            ratio = " | ".join(f"{row[f'ratio_ddp_over_{c}']:.2f}x" for c, _ in RATIOS)
            lines.append(f"| {name} | {m['params'] / 1e6:,.1f}M | {r} | {cells} | {ratio} |")
    return lines + [""]


def _md_target(t: dict[str, Any]) -> list[str]:
    return [
        "## 2. The target: LLaMA-7B, r = 1024, N = 8", "",
        f"- bf16 payloads, no compression: DDP-bf16 / ours = **{t['ratio_bf16']:.3f}x** (target >= "
        f"{t['target_ratio']}x: **{'met' if t['meets_target_bf16'] else 'NOT met'}**). GaLore matrices alone: "
        f"{t['galore_only_ratio']:.2f}x (= min(m,n)/r); the {t['dense_params'] / 1e6:.0f}M dense parameters "
        f"({100 * t['dense_fraction']:.1f}% of the model) move as many bytes as under DDP.",
        f"- default fp32 payloads: {t['ratio_fp32']:.3f}x; int8 low-rank payloads (`compress_lowrank`) + bf16 "
        f"dense: **{t['ratio_int8']:.3f}x**, of which the dense parameters are "
        f"{100 * t['int8_dense_share']:.0f}% of the bytes; `compress_lowrank` with fp32 dense gradients: "
        f"{t['ratio_int8_fp32_dense']:.3f}x.",
        f"- everything 8-bit (`compress_lowrank` + `compress_dense`: dense gradients and dense Adam directions "
        f"as 8-bit codes too): **{t['ratio_int8_all']:.3f}x** (target >= {TARGET['compressed_ratio']}x with "
        f"compression, steady step: **{'met' if t['ratio_int8_all'] >= TARGET['compressed_ratio'] else 'NOT met'}**).",
        *_md_claim(t),
        f"- PowerSGD r=4 sends {mib(t['powersgd_r4'])} MiB ({t['ratio_powersgd']:.0f}x less than DDP-bf16, "
        f"{t['ours_int8'] / t['powersgd_r4']:.0f}x less than ours int8): it compresses every gradient, the "
        "embeddings and head included, to rank 4 each step (lossy, with error feedback), while GaLore keeps a "
        "rank-1024 subspace and exchanges it exactly or 8-bit.",
        f"- per rank per step: DDP-bf16 {mib(t['ddp_bf16'])} MiB, ours fp32 {mib(t['ours_fp32'])}, bf16 "
        f"{mib(t['ours_bf16'])}, int8 {mib(t['ours_int8'])} MiB.", "",
    ]


def _md_refresh(p: dict[str, Any]) -> list[str]:
    lines = ["## 3. Refresh steps and run averages (N = 8)", "",
             "A step on which every matrix refreshes reduces each fp32 full gradient to its owner (streamed during "
             "backward, `full_grad_reduce`, (N-1)/N * m*n*4 B, never compressed) instead of its low-rank image and "
             "broadcasts the INT4 projectors (`proj_broadcast`); the low-rank update, dense and control traffic are "
             "as on a steady step. The run average is ((S - k) * steady + k * refresh) / S over the reference's run "
             f"length S with k refresh steps (`qgalore_dist/estimate/schedule.py`), initial gap T = {INITIAL_GAP} "
             "(and T = 500, the reference's 7B script): **fixed** = an SVD every T steps (GaLore, or Q-GaLore "
             "whenever the cosine similarity stays below 0.4: the most refreshes the adaptive rule can run); "
             "**adaptive** = the reference's rule with every similarity >= 0.4 (the gap doubles at every SVD from "
             "the 6th on, at absolute-step multiples: the fewest). Every matrix is assumed to refresh on the same "
             "steps; the average depends only on how many refreshes each matrix runs, not on whether they "
             "coincide (that only moves the per-step peak, which is the refresh column).", "",
             "| model | r | T | steps S | schedule | refresh steps k | variant | steady MiB | refresh MiB | "
             "run average MiB | DDP-bf16 MiB | DDP / steady | DDP / refresh | **DDP / run average** |",
             "|---" * 14 + "|"]
    for entry in p["run_average"].values():
        for sched, s_row in entry["schedules"].items():
            for key, label in SCHEDULE_VARIANTS:
                c = s_row[key]
                lines.append(f"| {entry['model']} | {entry['rank']} | {entry['initial_gap']} | {entry['steps']:,} | "
                             f"{sched} | {s_row['refresh_steps']} | {label} | {mib(c['steady'])} | "
                             f"{mib(c['refresh'])} | {mib(c['average'])} | {mib(entry['ddp_bf16'])} | "
                             f"{c['ratio_steady']:.2f}x | {c['ratio_refresh']:.2f}x | **{c['ratio_average']:.2f}x** |")
    lines += ["", "The other payload variants (fp32, int8 low-rank only, ...) are in `comm.json` "
              "(`run_average`).", ""]
    return lines


def _md_claim(t: dict[str, Any]) -> list[str]:
    """The 7x claim over a whole run (section 3), with the refresh step beside it."""
    out = []
    for sched, c in t["run_average"].items():
        verdict = "met" if c["ratio_average"] >= TARGET["compressed_ratio"] else "NOT met"
        out.append(f"- **run average, {sched} gap (T = {INITIAL_GAP}, {c['refresh_steps']} refresh steps in "
                   f"{c['steps']:,})**, everything 8-bit: DDP-bf16 / ours = **{c['ratio_average']:.3f}x** "
                   f"(>= {TARGET['compressed_ratio']}x: **{verdict}**); beside it, a refresh step (every matrix "
                   f"refreshing) moves {mib(c['refresh'])} MiB per rank against DDP-bf16's {mib(t['ddp_bf16'])} MiB: "
                   f"DDP / ours = {c['ratio_refresh']:.2f}x on that step ({1 / c['ratio_refresh']:.2f}x DDP's bytes).")
    return out


def _cell(values: list[float]) -> str:
    return f"{values[0]:,.1f}" if len(set(values)) == 1 else " / ".join(f"{v:,.1f}" for v in values)


def _md_validation(v: dict[str, Any]) -> list[str]:
    if v.get("skipped"):
        return ["## 4. Validation: skipped (--skip-validation)", ""]
    lines = [f"## 4. Validation against the meter ({v['world_size']} gloo ranks)", "",
             "Ours: the tiny LlamaForCausalLM (hidden 64, intermediate 160, 2 layers, vocab 128, rank 8) converted "
             "with `prepare_model`; `optimizer.comm.meter.last_step` after step 0 (every projector refreshes) and "
             "step 1 (steady) against the closed form on the same shapes and ownership plan, kind by kind, rank by "
             "rank (a / b: rank 0 / rank 1 where they differ: the int8 all-to-all).", "",
             "| case | step | " + " | ".join(KINDS) + " | metered total | closed form total | exact |",
             "|---" * (5 + len(KINDS)) + "|"]
    for case, run in v["runs"].items():
        for s in run["steps"]:
            cells = " | ".join(_cell(s["kinds"][k]["metered"]) for k in KINDS)
            lines.append(f"| {case} | {s['step']} ({s['kind']}) | {cells} | {_cell(s['metered_total'])} | "
                         f"{_cell(s['closed_form_total'])} | {s['exact_match']} |")
    first = " / ".join(f"{sum(c.values()):,.0f}" for c in next(iter(v["runs"].values()))["construction_bytes"])
    lines += ["", "Not in any step: the optimizer's constructor checks that the config and the parameter shapes agree "
              f"on every rank (two `all_gather_object`s, metered as `control`: {first} B on rank 0 / 1 in the first "
              "case); the benchmark closes that meter step before step 0, a one-time cost.", "",
              "PowerSGD: the same model (not converted) in `DistributedDataParallel` with `powerSGD_hook` "
              "(rank 4, `start_powerSGD_iter=2`, error feedback and warm start on); ring bytes (2(N-1)/N * S) of "
              "every `torch.distributed.all_reduce` the hook issued per backward.", "",
              "| grad dtype | step | phase | all-reduces | counted (rank 0 / 1) | closed form | exact |",
              "|---|---|---|---|---|---|---|"]
    for dtype, run in v["powersgd"].items():
        for s in run["steps"]:
            lines.append(f"| {dtype} | {s['step']} | {s['phase']} | {s['all_reduce_calls']} | {_cell(s['counted'])} "
                         f"| {s['closed_form']:,.1f} | {s['exact_match']} |")
    lines += ["", f"Ours all exact: **{v['ours_exact']}**; PowerSGD all exact: **{v['powersgd_exact']}**.", ""]
    return lines


def _md_makespan(p: dict[str, Any]) -> list[str]:
    ms = p["makespan"]
    lines = [
        f"## 5. SVD makespan of a refresh step on {ms['world_size']} ranks", "",
        "Measured: `torch.linalg.svd(full_matrices=False)` of a random fp32 matrix per distinct shape, this CPU, "
        f"1 torch thread, median of {p['args']['svd_repeats']} (after one warm-up); a rank's time is the sum over "
        "the matrices it owns when all refresh on the same step (step 0, and multiples of the gap while the "
        "schedules agree).", "",
        "| shape | median s | min s | max s |", "|---|---|---|---|",
    ]
    for shape, tm in ms["svd_times"].items():
        lines.append(f"| {shape} | {tm['median_s']:.4f} | {tm['min_s']:.4f} | {tm['max_s']:.4f} |")
    lines += ["", "| model (r) | matrices | rank0 makespan s | balanced makespan s | balanced per-rank s | speedup "
              "| imbalance (cost model) |", "|---|---|---|---|---|---|---|"]
    for name, row in ms["measured"].items():
        lines.append(f"| {name} | {row['matrices']} | {row['rank0']['makespan_s']:.3f} | "
                     f"{row['balanced']['makespan_s']:.3f} | "
                     f"{', '.join(f'{x:.3f}' for x in row['balanced']['per_rank_s'])} | **{row['speedup']:.2f}x** | "
                     f"{row['balanced']['imbalance']:.3f} |")
    times = {k: v["median_s"] for k, v in ms["svd_times"].items()}
    pairs = [(f"{a}x{b}", f"{b}x{a}") for a, b in (k.split("x") for k in times) if int(a) > int(b)]
    skew = ", ".join(f"{w} / {t} = {times[w] / times[t]:.2f}" for t, w in pairs if w in times)
    lines += ["", "The balanced plan gives every rank the same mix of shapes here (LPT over equal costs goes round "
              "the ranks in name order), so the measured speedup equals the cost model's 4x. The cost model "
              "m*n*min(m,n) treats a wide matrix and its transpose alike, but on this CPU a wide SVD is slower "
              f"than the tall one (median wide / tall: {skew}); a plan over mixed shapes could be off by that "
              "much, and computing a wide matrix's SVD through its transpose would remove the difference."]
    lines += ["", "Cost model only (`plan.svd_cost`, m*n*min(m,n); no timing):", "",
              "| model | r | matrices | rank0 max cost | balanced max cost | speedup | balanced imbalance |",
              "|---|---|---|---|---|---|---|"]
    for name, row in ms["cost_model"].items():
        lines.append(f"| {name} | {row['rank']} | {row['matrices']} | {row['rank0_max_cost']:.3e} | "
                     f"{row['balanced_max_cost']:.3e} | {row['speedup']:.2f}x | {row['balanced_imbalance']:.3f} |")
    lines += ["", "CPU timings on a machine shared with other jobs: read the ratios, not the absolute seconds; "
              "GPU SVD times scale differently with shape."]
    return lines


def markdown(p: dict[str, Any]) -> str:
    lines = _md_header(p)
    for world in p["worlds"]:
        lines += _md_table(p, world)
    lines += _md_target(p["target"]) + _md_refresh(p) + _md_validation(p["validation"]) + _md_makespan(p)
    return "\n".join(lines)


def plot(p: dict[str, Any], path: Path) -> None:
    """Grouped bars (log scale): bytes per rank per step at N = 8, each model at its paper rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.8))
    width = 0.8 / len(COLUMNS)
    for i, (key, label) in enumerate(COLUMNS):
        values = [p["models"][m]["ranks"][str(r)]["N8"][key] / MiB for m, r in PAPER_RANK.items()]
        ax.bar([x + (i - (len(COLUMNS) - 1) / 2) * width for x in range(len(PAPER_RANK))], values, width, label=label)
    ax.set_xticks(range(len(PAPER_RANK)), [f"{m.removeprefix('llama_')}\nr={r}" for m, r in PAPER_RANK.items()])
    ax.set_yscale("log")
    ax.set_ylabel("MiB per rank per step (closed form)")
    ax.set_title("Gradient-sync bytes, steady-state step, N = 8 ranks")
    ax.legend(ncol=3, fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--svd-repeats", type=int, default=5)
    ap.add_argument("--makespan-ranks", type=int, default=4)
    ap.add_argument("--skip-validation", action="store_true", help="closed forms only (no gloo run)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    if args.svd_repeats < 1 or args.makespan_ranks < 1:
        raise ValueError("--svd-repeats and --makespan-ranks must be >= 1")
    return args


def target_summary(models: dict[str, Any], averages: dict[str, Any]) -> dict[str, Any]:
    seven = models[TARGET["model"]]["ranks"][str(TARGET["rank"])]["N8"]
    out = {"model": TARGET["model"], "rank": TARGET["rank"], "world_size": 8, "target_ratio": TARGET["ratio"],
           "galore_only_ratio": seven["galore_only_ratio"], "dense_params": models[TARGET["model"]]["dense_params"],
           "dense_fraction": models[TARGET["model"]]["dense_params"] / models[TARGET["model"]]["params"],
           "int8_dense_share": seven["ours_int8_by_kind"]["dense"] / seven["ours_int8"],
           "ratio_powersgd": seven["ratio_ddp_over_powersgd_r4"]}
    for key in ("ddp_bf16", "powersgd_r4", *VARIANTS):
        out[key] = seven[key]
    for key in VARIANTS:
        out[f"ratio_{key.removeprefix('ours_')}"] = seven[f"ratio_ddp_over_{key}"]
        out[f"meets_target_{key.removeprefix('ours_')}"] = seven[f"ratio_ddp_over_{key}"] >= TARGET["ratio"]
    entry = averages[f"{TARGET['model']}_r{TARGET['rank']}_T{INITIAL_GAP}"]
    out["run_average"] = {sched: {"steps": entry["steps"], "refresh_steps": s_row["refresh_steps"],
                                  **s_row["ours_int8_all"],
                                  "meets_compressed_target": s_row["ours_int8_all"]["ratio_average"]
                                  >= TARGET["compressed_ratio"]}
                          for sched, s_row in entry["schedules"].items()}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    worlds = (8, 64)
    models = {name: model_table(name, worlds) for name in MODELS}
    validation = ({"skipped": True, "all_exact": None, "runs": {}, "powersgd": {}, "world_size": 2}
                  if args.skip_validation else validate(2))
    payload = {
        "environment": environment(),
        "description": __doc__,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "loadavg_before": load_before,
        "worlds": list(worlds),
        "models": models,
        "run_average": run_averages(models),
        "validation": validation,
        "makespan": makespan(args.makespan_ranks, args.svd_repeats),
    }
    payload["target"] = target_summary(models, payload["run_average"])
    payload["loadavg_after"] = os.getloadavg()[0]
    payload["wall_s"] = time.perf_counter() - start
    json_path, md_path = write_outputs("comm", payload, markdown(payload), args.out_dir)
    plot(payload, args.out_dir / "comm.png")
    print(markdown(payload))
    print(f"\nwrote {json_path}, {md_path} and comm.png ({payload['wall_s']:.0f} s)")
    return 0 if (args.skip_validation or validation["all_exact"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
