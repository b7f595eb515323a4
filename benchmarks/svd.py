"""SVD cost of Q-GaLore: how many SVDs the adaptive schedule runs, and what one refresh costs.

What is measured
    1. ``count``: SVDs over real training runs of ``configs/models/llama_9m.json`` (4 layers of
       width 128, 28 GaLore matrices, vocabulary = the 2048-token BPE of the corpus), fp32, one
       process, on ``build_data(DataConfig(source="builtin"))`` (documentation shipped with
       Python: real text, no network), with ``QGaLoreAdamW8bit`` (INT8 weights, INT4 projectors,
       8-bit Adam) and GaLore's warmup + cosine LR.  Per initial gap T in ``--gaps``, two runs
       differ only in the schedule: Q-GaLore's adaptive one (cos_threshold 0.4, gamma 2, queue
       5) and GaLore's fixed one (``adaptive_gap=False``: one SVD per matrix every T steps);
       same seed, initial weights and batches.  ``--randomized-gaps`` adds adaptive runs with the
       sign-normalized randomized SVD.  Recorded per matrix: the steps of its SVDs (from
       ``schedule.svd_count``), the gap after each and the signed cosine the schedule queued.
       The adaptive rule's best case (every cosine >= 0.4) is
       ``qgalore_dist.estimate.schedule.adaptive_refresh_steps`` (checked against ``RefreshSchedule``
       by ``tests/unit/test_bench_svd.py``).  Training loss (mean of the last 100 steps) and validation loss (held-out
       sequences) show what skipped SVDs cost.  After training, the first run takes the full
       gradient of every matrix over the held-out sequences and compares exact and randomized
       bases of the largest ones at the run's rank ("real gradients").
    2. ``timing``: one refresh's SVD at 4096 x 11008 (llama_7b's MLP shape) on ``G = U diag(s)
       V^T``, U and V random orthonormal (QR of seeded Gaussians), ``s_i = i^-alpha`` (gradients
       have decaying spectra; a Gaussian matrix's flat one is randomized SVD's worst case).
       ``exact`` = ``torch.linalg.svd(G, full_matrices=False)``, what ``svd_basis("exact")`` runs
       (timed directly to keep both factors); ``randomized`` = ``svd_basis("randomized",
       oversample=8, power_iters=2)`` on the side ``proj_type="std"`` projects, seeds 0, 1, ...
       Agreement per rank r: cosines of the principal angles between the exact and randomized
       top-r left and right subspaces (mean, min), and ||G - P P^T G||_F / ||G||_F of both bases
       next to the Eckart-Young optimum.
    The per-step SVD makespan of ``rank0`` vs ``balanced`` placement on 4 ranks is measured by
    ``benchmarks/comm.py`` (``results/comm.md``), not here.

Training runs go to ``--jobs`` worker processes (1 torch thread each; results do not depend on
it).  Timings run in a fresh process with ``--timing-threads`` threads and the 1-minute load
average is recorded at every timed call.  Exit code 1 when a validation fails (schedule
invariants, finite losses, Eckart-Young sanity of the bases).

Run from the repository root:  python benchmarks/svd.py  [--quick] [--only count|timing]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

import torch

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from svd_harness import (  # noqa: E402
    LOSS_TAIL,
    RunSpec,
    compare_bases,
    random_orthonormal_factors,
    synthetic_gradient,
    timed_repeats,
    train_run,
    validate_count,
    validate_timing,
)

from benchmarks._common import RESULTS_DIR, environment, environment_md, write_outputs  # noqa: E402
from qgalore_dist.estimate.schedule import adaptive_refresh_steps  # noqa: E402
from qgalore_dist.train.data import DataConfig, build_data  # noqa: E402

PAPER_SVD_FRACTION_130M = 0.3620
"""Q-GaLore paper, Fig. 7 (LLaMA-130M): parity with GaLore at 36.20% of its SVD calls."""


# ----------------------------------------------------------------------------- timing part
def timing_part(args: argparse.Namespace) -> dict[str, Any]:
    """Exact vs randomized at ``--shape`` for every alpha and rank (one exact SVD per alpha)."""
    torch.set_num_threads(args.timing_threads)
    m, n = args.shape
    setup_start = time.perf_counter()
    factors = random_orthonormal_factors(m, n, args.seed)
    rows, setup_s = [], time.perf_counter() - setup_start
    for alpha in args.alphas:
        grad = synthetic_gradient(m, n, alpha, factors)
        exact = timed_repeats(lambda _: torch.linalg.svd(grad, full_matrices=False), args.repeats, args.timing_budget_s)
        for rank in args.ranks:
            print(f"[svd] timing alpha={alpha} r={rank} (exact {exact[0]} s)", flush=True)
            rows.append({"alpha": alpha, **compare_bases(grad, rank, repeats=args.repeats,
                                                          budget_s=args.timing_budget_s, exact=exact)})
    return {"shape": [m, n], "threads": args.timing_threads, "setup_s": setup_s, "rows": rows,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")}


def timing_isolated(args: argparse.Namespace) -> dict[str, Any]:
    """``timing_part`` in a fresh process, because libgomp reads ``OMP_WAIT_POLICY`` only when
    torch loads.  PASSIVE (the default here) stops idle OpenMP threads from spinning: on the
    shared 2-core machine a 512 x 1376 SVD took ~20 s with 2 spinning threads, 0.4 s with passive
    ones and 2 s with one thread."""
    saved = dict(os.environ)
    if args.omp_wait_policy != "default":
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            return pool.submit(timing_part, args).result()
    finally:
        os.environ.clear()
        os.environ.update(saved)


# ----------------------------------------------------------------------------- count part
def run_specs(args: argparse.Namespace) -> list[RunSpec]:
    """Adaptive and fixed run per gap, adaptive with randomized SVD per ``--randomized-gaps``;
    the first run (adaptive, first gap) also probes real gradients."""
    common = dict(steps=args.steps, micro_batch=args.micro_batch, seq_len=args.seq_len, rank=args.rank, lr=args.lr,
                  warmup=args.warmup, seed=args.seed, model=args.model, max_minutes=args.max_run_minutes)
    specs = [RunSpec(gap=gap, adaptive=adaptive, **common) for gap in args.gaps for adaptive in (True, False)]
    specs[0] = RunSpec(gap=args.gaps[0], adaptive=True, probe=True, **common)
    return specs + [RunSpec(gap=gap, adaptive=True, svd_method="randomized", **common) for gap in args.randomized_gaps]


def count_part(args: argparse.Namespace) -> dict[str, Any]:
    """Every training run, ``--jobs`` at a time in worker processes."""
    specs = run_specs(args)
    build_data(DataConfig(source="builtin", seq_len=args.seq_len))  # build the cache before the workers race for it
    load_before = os.getloadavg()[0]
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        runs = list(pool.map(train_run, specs))
    return {"runs": runs, "loadavg_before": load_before, "loadavg_after": os.getloadavg()[0]}


def compare_runs(runs: list[dict[str, Any]], steps: int) -> list[dict[str, Any]]:
    """Each adaptive run against the fixed run of the same initial gap."""
    comparisons = []
    for adaptive in (r for r in runs if r["spec"]["adaptive"]):
        gap = adaptive["spec"]["gap"]
        fixed = next(r for r in runs if r["spec"]["gap"] == gap and not r["spec"]["adaptive"])
        comparisons.append(compare_schedules(adaptive, fixed, steps, gap))
    return comparisons


def compare_schedules(adaptive: dict[str, Any], fixed: dict[str, Any], steps: int, gap: int) -> dict[str, Any]:
    """SVD counts of an adaptive/fixed pair against the fixed schedule and the adaptive best case."""
    matrices = len(adaptive["events"])
    cosines = [c for e in adaptive["events"].values() for c in e["cosines"]]
    per_matrix = [len(e["steps"]) for e in adaptive["events"].values()]
    best = len(adaptive_refresh_steps(steps, gap)) * matrices
    return {
        "label": adaptive["spec"]["label"], "gap": gap, "matrices": matrices, "svd_adaptive": adaptive["svd_total"],
        "svd_fixed": fixed["svd_total"], "svd_adaptive_best_case": best,
        "adaptive_over_fixed": adaptive["svd_total"] / fixed["svd_total"],
        "best_case_over_fixed": best / fixed["svd_total"],
        "per_matrix_adaptive": {"min": min(per_matrix), "median": statistics.median(per_matrix),
                                "max": max(per_matrix)},
        "matrices_whose_gap_grew": sum(1 for e in adaptive["events"].values() if e["gap_after"][-1] > gap),
        "cosines": {"n": len(cosines), "negative": sum(c < 0 for c in cosines),
                    "at_least_0.4": sum(c >= 0.4 for c in cosines),
                    "abs_at_least_0.4": sum(abs(c) >= 0.4 for c in cosines),
                    "mean": statistics.fmean(cosines) if cosines else math.nan,
                    "mean_abs": statistics.fmean(abs(c) for c in cosines) if cosines else math.nan},
        "final_train_loss": {"adaptive": adaptive["final_train_loss"], "fixed": fixed["final_train_loss"]},
        "val_loss": {"adaptive": adaptive["val_loss"], "fixed": fixed["val_loss"]},
    }


# ----------------------------------------------------------------------------- report
def _short(name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``L3.up_proj``."""
    parts = name.split(".")
    return f"L{parts[2]}.{parts[-2]}" if len(parts) > 3 and parts[1] == "layers" else name


def _table(header: list[str]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]


def count_markdown(part: dict[str, Any]) -> list[str]:
    a, runs = part["args"], part["runs"]
    lines = ["## 1. SVDs over a training run: adaptive (Q-GaLore) vs fixed (GaLore)", "",
             environment_md(part["environment"]),
             f"- load average (1 min) before / after: {part['loadavg_before']:.2f} / {part['loadavg_after']:.2f}", "",
             f"`{a['model']}` fp32, {a['steps']} steps, batch {a['micro_batch']} x {a['seq_len']} tokens, one process "
             f"and 1 torch thread per run ({a['jobs']} runs at a time), {runs[0]['data']}; QGaLoreAdamW8bit rank "
             f"{a['rank']}, lr {a['lr']} (warmup {a['warmup']}, cosine to 10%), clip 1.0, exact SVD unless the run "
             "says randomized; adaptive: cos_threshold 0.4, gamma 2, queue 5.", "",
             *_table(["adaptive run", "matrices", "SVDs fixed", "SVDs adaptive", "adaptive / fixed",
                      "best case / fixed", "per matrix (min/med/max)", "gap grew", "train loss fixed / adaptive",
                      "val loss fixed / adaptive"])]
    for c in part["comparisons"]:
        p, tl, vl = c["per_matrix_adaptive"], c["final_train_loss"], c["val_loss"]
        lines.append(f"| {c['label']} | {c['matrices']} | {c['svd_fixed']} | {c['svd_adaptive']} | "
                     f"**{c['adaptive_over_fixed']:.1%}** | {c['best_case_over_fixed']:.1%} | "
                     f"{p['min']}/{p['median']:g}/{p['max']} | {c['matrices_whose_gap_grew']}/{c['matrices']} | "
                     f"{tl['fixed']:.4f} / {tl['adaptive']:.4f} | {vl['fixed']:.4f} / {vl['adaptive']:.4f} |")
    lines += ["", f"Train loss: mean of the last {LOSS_TAIL} steps. Best case: the adaptive rule with every cosine "
              ">= 0.4 (`qgalore_dist.estimate.schedule.adaptive_refresh_steps`), the fewest SVDs it can run in "
              "this many steps. The paper "
              f"reports parity at {PAPER_SVD_FRACTION_130M:.1%} of GaLore's SVDs on LLaMA-130M (a full run; 7B: "
              "'over 60% reduction').", "",
              "Signed cosines the adaptive schedule queued (first singular vector, consecutive SVDs):", ""]
    for c in part["comparisons"]:
        k = c["cosines"]
        lines.append(f"- {c['label']}: {k['n']} cosines, mean {k['mean']:.3f}, mean |cos| {k['mean_abs']:.3f}; "
                     f">= 0.4: {k['at_least_0.4']}, negative (sign flips): {k['negative']}, "
                     f"|cos| >= 0.4: {k['abs_at_least_0.4']}")
    for run in (r for r in runs if r["spec"]["adaptive"]):
        lines += ["", f"Refresh steps per matrix, {run['spec']['label']} (same steps grouped):", ""]
        groups: dict[tuple, list[str]] = {}
        for name, e in run["events"].items():
            groups.setdefault(tuple(e["steps"]), []).append(_short(name))
        lines += [f"- {len(steps)} SVDs at {list(steps)}: {', '.join(names)}"
                  for steps, names in sorted(groups.items(), key=lambda kv: len(kv[0]))]
    return lines


def agreement_table(rows: list[dict[str, Any]], header: str, label: Callable[[dict], str]) -> list[str]:
    lines = _table([header, "r", "exact s", "randomized s", "speed-up", "left cos mean / min",
                    "right cos mean / min", "error exact (= optimum)", "error randomized", "s_r / s_r+1"])
    for row in rows:
        left, right, std = row["agreement"]["left"], row["agreement"]["right"], row["agreement"][row["std_side"]]
        exact_s, rand_s = statistics.median(row["exact_s"]), statistics.median(row["randomized_s"])
        lines.append(f"| {label(row)} | {row['rank']} | {exact_s:.2f} (n={len(row['exact_s'])}) | "
                     f"{rand_s:.2f} (n={len(row['randomized_s'])}) | {exact_s / rand_s:.1f}x | "
                     f"{left['mean_cos']:.4f} / {left['min_cos']:.4f} | {right['mean_cos']:.4f} / "
                     f"{right['min_cos']:.4f} | {std['error_exact']:.4f} | {std['error_randomized']:.4f} | "
                     f"{row['gap_ratio_s_r_over_s_r1']:.4f} |")
    return lines


def timing_markdown(part: dict[str, Any]) -> list[str]:
    rows, (m, n) = part["rows"], part["shape"]
    loads = [x for r in rows for x in r["exact_loadavg"] + r["randomized_loadavg"]]
    return [f"## 2. Time per refresh at {m} x {n}: exact vs randomized SVD", "", environment_md(part["environment"]),
            f"- load average (1 min) at the timed calls: {min(loads):.2f} - {max(loads):.2f}; torch threads "
            f"{part['threads']}, OMP_WAIT_POLICY {part['omp_wait_policy']}", "",
            "`G = U diag(s) V^T`, random orthonormal U, V, s_i = i^-alpha (unit Frobenius norm). Exact: "
            "`torch.linalg.svd(G, full_matrices=False)` (= `svd_basis('exact')`; one SVD serves every r); "
            "randomized: `svd_basis('randomized', oversample=8, power_iters=2)` on the `std` side "
            f"({rows[0]['std_side']}), a new seed per call. Seconds are medians of n calls. Cosines of the principal "
            "angles between the exact and randomized top-r subspaces; errors are ||G - P P^T G||_F / ||G||_F on "
            "the `std` side.", "",
            *agreement_table(rows, "alpha", lambda row: f"{row['alpha']:g}"), "",
            "A min cosine well below 1 with an error close to the optimum means the randomized basis mixes "
            "directions around s_r whose singular values are nearly equal (s_r / s_r+1 close to 1): the top-r "
            "subspace is then ill-defined, and the projection error is the measure that matters for the update."]


def real_gradient_markdown(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    alphas = [r["spectrum_alpha_fit"] for r in rows]
    return ["", "### Real gradients of the trained model (adaptive run, first T)", "",
            f"Full gradient over the held-out sequences of the largest matrices {rows[0]['shape']} after training; "
            f"fitted spectrum exponent alpha (first half of the spectrum) {min(alphas):.2f} - {max(alphas):.2f}.", "",
            *agreement_table(rows, "matrix", lambda row: _short(row["matrix"]))]


def markdown(payload: dict[str, Any]) -> str:
    lines = ["# SVD cost of Q-GaLore: number of SVDs and time per refresh", "",
             "Per-step SVD makespan of `rank0` vs `balanced` placement on 4 ranks: see `comm.md` "
             "(benchmarks/comm.py).", ""]
    if "count" in payload:
        lines += count_markdown(payload["count"])
        lines += real_gradient_markdown(payload["count"]["runs"][0].get("real_gradient", []))
        lines += ["", "Plot: `svd.png` (SVD events per matrix over the steps, and the loss curves).", ""]
    if "timing" in payload:
        lines += timing_markdown(payload["timing"])
    return "\n".join(lines)


def plot(part: dict[str, Any], path: Path) -> None:
    """One panel per gap (SVD events per matrix: fixed ticks, adaptive dots) and the loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gaps = sorted({r["spec"]["gap"] for r in part["runs"]}, reverse=True)
    fig, axes = plt.subplots(len(gaps) + 1, 1, figsize=(11, 4.2 * len(gaps) + 3.5))
    for ax, gap in zip(axes, gaps):
        for run in (r for r in part["runs"] if r["spec"]["gap"] == gap):
            kind = "fixed" if not run["spec"]["adaptive"] else run["spec"]["svd_method"]
            offset, color, marker = {"fixed": (-0.25, "0.5", "|"), "exact": (0.0, "tab:red", "o"),
                                     "randomized": (0.25, "tab:blue", "o")}[kind]
            for y, e in enumerate(run["events"].values()):
                ax.scatter(e["steps"], [y + offset] * len(e["steps"]), s=30 if kind == "fixed" else 12,
                           marker=marker, color=color,
                           label=f"{run['spec']['label']}: {run['svd_total']} SVDs" if y == 0 else None)
        names = [_short(n) for n in part["runs"][0]["events"]]
        ax.set_yticks(range(len(names)), names, fontsize=6)
        ax.set_xlim(-0.02 * part["args"]["steps"], part["args"]["steps"])
        ax.set_title(f"SVD events per matrix, initial gap T = {gap}", loc="left", pad=18)
        ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=3, fontsize=8, frameon=False)
    ax, window = axes[-1], 50
    for run in part["runs"]:
        losses = run["losses"]
        smooth = [statistics.fmean(losses[max(0, i - window + 1): i + 1]) for i in range(len(losses))]
        ax.plot(smooth, label=f"{run['spec']['label']} (val {run['val_loss']:.3f})", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss ({window}-step mean)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="smoke test: 40 steps, T = 10, a 512 x 1376 timing; output to a temp dir")
    add("--only", choices=("count", "timing", "report"),
        help="run one part, keeping the other from an existing svd.json; report: only re-render svd.{md,png}")
    add("--steps", type=int, default=2000)
    add("--gaps", type=int, nargs="+", default=[200, 50], help="initial gaps T (200: the reference's)")
    add("--randomized-gaps", type=int, nargs="*", default=[50],
        help="extra adaptive runs with the (sign-normalized) randomized SVD; each must be in --gaps")
    add("--model", default="llama_9m")
    add("--micro-batch", type=int, default=4)
    add("--seq-len", type=int, default=128)
    add("--rank", type=int, default=32)
    add("--lr", type=float, default=0.01)
    add("--warmup", type=int, default=200)
    add("--jobs", type=int, default=2, help="training runs in parallel (1 torch thread each)")
    add("--max-run-minutes", type=float, default=180.0, help="a training run stops (and fails validation) after this")
    add("--shape", type=int, nargs=2, default=[4096, 11008], metavar=("M", "N"))
    add("--ranks", type=int, nargs="+", default=[512, 1024])
    add("--alphas", type=float, nargs="+", default=[0.5, 1.0], help="power-law exponents of the synthetic spectrum")
    add("--repeats", type=int, default=3)
    add("--timing-budget-s", type=float, default=240.0, help="stop repeating a timed call once this much time is spent")
    add("--timing-threads", type=int, default=2)
    add("--omp-wait-policy", choices=("passive", "active", "default"), default="passive",
        help="OMP_WAIT_POLICY of the timing process (default: passive; see timing_isolated)")
    add("--seed", type=int, default=0)
    add("--out-dir", type=Path, default=None,
        help=f"default {RESULTS_DIR} ({{tmp}}/qgalore_bench_svd_quick with --quick)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.gaps, args.warmup, args.shape, args.ranks = 40, [10], 4, [512, 1376], [64, 128]
        args.alphas, args.repeats, args.randomized_gaps = [1.0], 1, [10]
    if args.out_dir is None:
        args.out_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "qgalore_bench_svd_quick" if args.quick else RESULTS_DIR
    positive = {"--steps": [args.steps], "--gaps": args.gaps, "--micro-batch": [args.micro_batch],
                "--jobs": [args.jobs], "--rank": [args.rank], "--ranks": args.ranks, "--repeats": [args.repeats],
                "--shape": args.shape}
    for flag, values in positive.items():
        if any(v < 1 for v in values):
            parser.error(f"{flag} must be >= 1, got {values}")
    if not set(args.randomized_gaps) <= set(args.gaps):
        parser.error(f"--randomized-gaps {args.randomized_gaps} must be among --gaps {args.gaps} "
                     "(each is compared with the fixed run of its gap)")
    if max(args.ranks) >= min(args.shape):
        parser.error(f"--ranks must be < min(--shape) = {min(args.shape)}")
    return args


def summarise(payload: dict[str, Any]) -> list[str]:
    """(Re)derive the comparisons and validations of the stored measurements; returns the failures."""
    if "count" in payload:
        count, steps = payload["count"], payload["count"]["args"]["steps"]
        count["comparisons"] = compare_runs(count["runs"], steps)
        count["validation_failures"] = (validate_count(count, steps)
                                        + validate_timing(count["runs"][0].get("real_gradient", [])))
    if "timing" in payload:
        payload["timing"]["validation_failures"] = validate_timing(payload["timing"]["rows"])
    return [f for part in ("count", "timing") for f in payload.get(part, {}).get("validation_failures", [])]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    json_path = args.out_dir / "svd.json"
    if args.only == "report" and not json_path.exists():
        raise SystemExit(f"--only report re-renders {json_path}, which does not exist")
    payload = json.loads(json_path.read_text()) if args.only and json_path.exists() else {}
    arg_record = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if args.only in (None, "count"):
        payload["count"] = {**count_part(args), "environment": environment(), "args": arg_record}
    if args.only in (None, "timing"):
        payload["timing"] = {**timing_isolated(args), "environment": environment(), "args": arg_record}
    payload["description"] = __doc__
    failures = summarise(payload)
    text = markdown(payload)
    if failures:
        text += "\n\n**Validation failures:**\n\n" + "\n".join(f"- {f}" for f in failures)
    json_path, md_path = write_outputs("svd", payload, text, args.out_dir)
    if "count" in payload:
        plot(payload["count"], args.out_dir / "svd.png")
    print(text)
    print(f"\nwrote {json_path}, {md_path}" + (", svd.png" if "count" in payload else ""))
    for failure in failures:
        print(f"VALIDATION FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
