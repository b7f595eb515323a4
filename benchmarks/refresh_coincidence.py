"""How often GaLore matrices refresh on the same step, from real runs (issue 16, item 2).

Inputs (real training runs, one process; a refresh is one matrix's SVD):
    * ``--metrics``: ``metrics.jsonl`` files written by ``qgalore-train`` (``svd_layers`` of every
      step; its ``step`` is the number of optimizer steps done, so the optimizer step that ran
      the SVDs is ``step - 1``);
    * ``--svd-json``: ``benchmarks/results/svd.json`` (``benchmarks/svd.py``'s count runs: the SVD
      steps of every matrix, adaptive and fixed schedules).

For every run: the refresh steps after step 0, how many of them refresh >= 2 matrices, how many
refresh every matrix, the histogram of matrices per refresh step, and the largest count on a step.

Analytically (reference rule, ``qgalore_dist.core.RefreshSchedule``): every gap is T * 2^j and a
matrix refreshes at the multiples of its gap on the absolute step, so every refresh step is a
multiple of T and a step that is a multiple of the largest gap refreshes every matrix.  A step
refreshes one matrix alone only when that matrix's gap is the only one dividing it.  With the
adaptive rule's best case (every cosine >= 0.4) all matrices run the same schedule
(``adaptive_refresh_steps``): every refresh step refreshes every matrix.

Run from the repository root:
    python benchmarks/refresh_coincidence.py --metrics RUN_DIR/metrics.jsonl --label "..."
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from benchmarks._common import RESULTS_DIR, environment, environment_md, write_outputs  # noqa: E402
from qgalore_dist.estimate.schedule import adaptive_refresh_steps  # noqa: E402


def summarise(per_step: dict[int, int], matrices: int, steps: int, label: str, source: str) -> dict[str, Any]:
    """``per_step``: optimizer step -> matrices refreshing on it."""
    after = {s: c for s, c in per_step.items() if s > 0}
    return {"label": label, "source": source, "matrices": matrices, "steps": steps,
            "refresh_steps_after_0": len(after),
            "at_least_2": sum(1 for c in after.values() if c >= 2),
            "all": sum(1 for c in after.values() if c == matrices),
            "single": sum(1 for c in after.values() if c == 1),
            "min_on_a_refresh_step": min(after.values(), default=0),
            "histogram": dict(sorted(collections.Counter(after.values()).items())),
            "per_step": dict(sorted(per_step.items()))}


def from_metrics(path: Path, label: str) -> dict[str, Any]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("kind") == "train"]
    names = {n for r in train for n in r["svd_layers"]}
    per_step = {int(r["step"]) - 1: len(r["svd_layers"]) for r in train if r["svd_layers"]}
    return summarise(per_step, len(names), len(train), label, f"metrics.jsonl ({path.name})")


def from_svd_json(path: Path) -> list[dict[str, Any]]:
    out = []
    for run in json.loads(path.read_text())["count"]["runs"]:
        events = run["events"]
        per_step = collections.Counter(s for e in events.values() for s in e["steps"])
        out.append(summarise(dict(per_step), len(events), run["steps_done"],
                             f"{run['spec']['model']} {run['spec']['label']}", "benchmarks/results/svd.json"))
    return out


def markdown(p: dict[str, Any]) -> str:
    lines = ["# Refresh coincidence: matrices refreshing on the same step (real runs)", "",
             environment_md(p["environment"]), "", "Method: the docstring of `benchmarks/refresh_coincidence.py`.",
             "", "| run | source | matrices | steps | refresh steps after 0 | with >= 2 matrices | with all matrices | "
             "with 1 | fewest on a refresh step | histogram (matrices: steps) |", "|---" * 10 + "|"]
    for r in p["runs"]:
        hist = ", ".join(f"{k}: {v}" for k, v in r["histogram"].items())
        lines.append(f"| {r['label']} | {r['source']} | {r['matrices']} | {r['steps']:,} | "
                     f"{r['refresh_steps_after_0']} | {r['at_least_2']} | {r['all']} | {r['single']} | "
                     f"{r['min_on_a_refresh_step']} | {hist} |")
    a = p["analytic"]
    lines += ["", f"Analytic, adaptive best case (T = {a['gap']}, {a['steps']:,} steps): every matrix runs "
              f"{a['refresh_steps']} (steps {a['schedule']}), all on the same steps: "
              f"{a['refresh_steps'] - 1} refresh steps after 0, every one refreshing every matrix.",
              "", "Training commands of the metrics runs: " + "; ".join(f"`{c}`" for c in p["train_commands"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--metrics", type=Path, nargs="*", default=[])
    ap.add_argument("--label", nargs="*", default=[])
    ap.add_argument("--train-command", nargs="*", default=[])
    ap.add_argument("--svd-json", type=Path, default=RESULTS_DIR / "svd.json")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    start = time.perf_counter()
    runs = [from_metrics(m, label) for m, label in zip(args.metrics, args.label or [str(m) for m in args.metrics])]
    if args.svd_json.exists():
        runs += from_svd_json(args.svd_json)
    schedule = adaptive_refresh_steps(150_000, 200)
    payload = {"environment": environment(), "description": __doc__, "runs": runs,
               "train_commands": args.train_command,
               "analytic": {"gap": 200, "steps": 150_000, "refresh_steps": len(schedule), "schedule": schedule},
               "loadavg": os.getloadavg()[0], "wall_s": time.perf_counter() - start}
    md = markdown(payload)
    write_outputs("refresh_coincidence", payload, md, args.out_dir)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
