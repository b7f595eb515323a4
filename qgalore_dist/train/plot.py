"""``qgalore-plot RUN_DIR``: PNG plots of a ``qgalore-train`` run from ``RUN_DIR/metrics.jsonl``.

Writes into ``RUN_DIR/plots/``:

* ``loss.png`` -- train loss (and validation loss) vs tokens; validation perplexity vs tokens.
* ``comm.png`` -- bytes rank 0 sent per step, stacked by kind (low-rank reduce, projector
  broadcast, ...).
* ``svd_events.png`` -- one dot per projector refresh (SVD): x = step, y = layer.
* ``memory.png`` -- peak memory vs step.

Exit status 0 on success, 2 when the run directory or ``metrics.jsonl`` is missing or empty or
a line is malformed (the message names the path, and the line number).  The training loop calls
:func:`plot_run` directly.  Rendering uses matplotlib's Agg canvas through ``Figure`` objects,
never pyplot, so it neither needs a display nor touches a backend the caller chose.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from .units import human_bytes


class PlotError(ValueError):
    """The run directory or its metrics cannot be plotted; the message says which path and why."""


def load_metrics(run_dir: str) -> tuple[list[dict], list[dict]]:
    """``(train, eval)`` records of ``run_dir/metrics.jsonl``, each sorted by step with one
    record per step (the last line wins, in case an older writer left duplicates).

    Raises :class:`PlotError` for a missing directory or file, a file with no records, or a
    line that is not a JSON object with an integer ``step`` (naming ``file:line``).  Lines of
    an unknown ``kind`` are skipped, so newer writers stay readable.
    """
    if not os.path.isdir(run_dir):
        raise PlotError(f"run directory {run_dir!r} does not exist (expected a qgalore-train run "
                        "directory containing metrics.jsonl)")
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise PlotError(f"{path!r} not found (expected the metrics.jsonl that qgalore-train writes "
                        "into its run directory)")
    by_kind: dict[str, dict[int, dict]] = {"train": {}, "eval": {}}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = _parse_line(line, path, lineno)
            if record["kind"] in by_kind:
                by_kind[record["kind"]][int(record["step"])] = record
    if not by_kind["train"] and not by_kind["eval"]:
        raise PlotError(f"{path!r} has no train or eval records (expected one JSON object per line, "
                        "as written by qgalore-train)")
    return tuple([r[s] for s in sorted(r)] for r in (by_kind["train"], by_kind["eval"]))  # type: ignore


def _parse_line(line: str, path: str, lineno: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PlotError(f"{path}:{lineno}: malformed line, not JSON ({exc.msg}); expected one "
                        "JSON object per line") from None
    if not isinstance(record, dict) or "kind" not in record:
        raise PlotError(f"{path}:{lineno}: malformed line, expected a JSON object with a \"kind\"")
    if not isinstance(record.get("step"), int) or isinstance(record.get("step"), bool):
        raise PlotError(f"{path}:{lineno}: malformed line, expected an integer \"step\"")
    return record


def _count(v: float) -> str:
    """Axis label for a token count: ``800k``, ``1.5M``, ``2G``."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:g}{suffix}"
    return f"{v:g}"


def _numbers(records: list[dict], x_key: str, y_key: str) -> tuple[list[float], list[float]]:
    """(x, y) pairs of the records that have both keys as finite numbers."""
    xs, ys = [], []
    for r in records:
        x, y = r.get(x_key), r.get(y_key)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(y):
            xs.append(float(x))
            ys.append(float(y))
    return xs, ys


def _note(ax: Any, text: str) -> None:
    """Centered text on an axis that has nothing to draw, so an empty plot explains itself."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _save(fig: Figure, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_loss(train: list[dict], evals: list[dict], path: str) -> str:
    """Two panels sharing the tokens axis: train (and validation) loss; validation perplexity."""
    fig = Figure(figsize=(8, 6.5))
    top, bottom = fig.subplots(2, 1, sharex=True)
    xs, ys = _numbers(train, "tokens", "loss")
    if xs:
        top.plot(xs, ys, lw=1.2, label="train loss")
    vx, vy = _numbers(evals, "tokens", "val_loss")
    if vx:
        top.plot(vx, vy, "o-", ms=4, label="val loss")
    if xs or vx:
        top.legend()
    else:
        _note(top, "no loss records")
    top.set_ylabel("loss (nats/token)")
    top.grid(alpha=0.3)
    px, py = _numbers(evals, "tokens", "val_ppl")
    if px:
        bottom.plot(px, py, "o-", ms=4, color="C1")
        if min(py) > 0 and max(py) / min(py) > 20:  # early perplexities dwarf late ones
            bottom.set_yscale("log")
    else:
        _note(bottom, "no evaluation records")
    bottom.set_ylabel("validation perplexity")
    bottom.set_xlabel("tokens trained")
    bottom.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _count(v)))
    bottom.grid(alpha=0.3)
    return _save(fig, path)


def plot_comm(train: list[dict], path: str) -> str:
    """Bytes rank 0 sent per step, stacked by kind; kinds that stayed zero are left out."""
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    steps = [r["step"] for r in train]
    kinds = sorted({k for r in train for k, v in (r.get("comm_bytes") or {}).items() if v})
    if kinds:
        series = [[float((r.get("comm_bytes") or {}).get(k, 0.0)) for r in train] for k in kinds]
        ax.stackplot(steps, series, labels=kinds, step="post", alpha=0.85)
        # Outside the axes: the stack fills the plot, a legend inside would hide steps.
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: human_bytes(v)))
    else:
        _note(ax, "no communication recorded")
    ax.set_xlabel("step")
    ax.set_ylabel("bytes sent per step (rank 0)")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_svd_events(train: list[dict], path: str) -> str:
    """One dot per SVD (projector refresh): x = step, y = layer in order of first refresh."""
    layers: dict[str, int] = {}
    xs, ys = [], []
    for r in train:
        for name in r.get("svd_layers") or []:
            xs.append(r["step"])
            ys.append(layers.setdefault(str(name), len(layers)))
    fig = Figure(figsize=(9, min(14.0, 2.5 + 0.22 * len(layers))))
    ax = fig.subplots()
    if xs:
        ax.scatter(xs, ys, s=10, marker="|" if len(xs) > 2000 else "o")
        if len(layers) <= 60:  # beyond that the names overlap; the index axis stays readable
            ax.set_yticks(range(len(layers)), list(layers), fontsize="x-small")
        ax.set_ylim(-1, len(layers))
        ax.invert_yaxis()
        ax.set_title(f"{len(xs)} SVDs over {len(layers)} layers")
    else:
        _note(ax, f"no SVD events in {len(train)} logged steps")
    if train:
        ax.set_xlim(min(r["step"] for r in train) - 1, max(r["step"] for r in train) + 1)
    ax.set_xlabel("step")
    ax.set_ylabel("layer (order of first refresh)")
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def load_resumes(run_dir: str) -> list[int]:
    """Steps at which the run in ``run_dir`` resumed (``{"kind": "resume"}`` lines)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    steps = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                record = _parse_line(line, path, lineno)
                if record["kind"] == "resume":
                    steps.append(int(record["step"]))
    return sorted(set(steps))


def plot_memory(train: list[dict], path: str, resumes: list[int] = ()) -> str:
    """Peak memory vs step, labelled with what was measured (``mem_kind``: CUDA max allocated
    or host peak RSS); a dashed line marks each resume (a new process: its peak starts over)."""
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    xs, ys = _numbers(train, "step", "mem_bytes")
    kind = next((r["mem_kind"] for r in reversed(train) if r.get("mem_kind")), None)
    for i, step in enumerate(resumes):
        ax.axvline(step, color="gray", linestyle="--", linewidth=1, label="resumed" if i == 0 else None)
    if xs:
        ax.plot(xs, ys, drawstyle="steps-post")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: human_bytes(v)))
        ax.set_ylim(0, max(ys) * 1.08 or 1.0)  # from 0: growth is read against the total
    else:
        _note(ax, "no memory records")
    ax.set_xlabel("step")
    ax.set_ylabel("peak memory so far" + (f" ({kind}, rank 0)" if kind else ""))
    if resumes:
        ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_run(run_dir: str) -> list[str]:
    """Write the four PNGs into ``run_dir/plots/`` and return their paths (loss, comm,
    svd_events, memory).  Raises :class:`PlotError` as :func:`load_metrics` does."""
    train, evals = load_metrics(run_dir)
    out = os.path.join(run_dir, "plots")
    os.makedirs(out, exist_ok=True)
    return [
        plot_loss(train, evals, os.path.join(out, "loss.png")),
        plot_comm(train, os.path.join(out, "comm.png")),
        plot_svd_events(train, os.path.join(out, "svd_events.png")),
        plot_memory(train, os.path.join(out, "memory.png"), load_resumes(run_dir)),
    ]


def main(argv: list[str] | None = None) -> int:
    """``qgalore-plot RUN_DIR``: print the paths written; 2 (message on stderr) on bad input."""
    parser = argparse.ArgumentParser(prog="qgalore-plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a qgalore-train run directory (holds metrics.jsonl)")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir)
    except PlotError as exc:
        print(f"qgalore-plot: error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


def cli() -> int:
    """Console-script entry point (``qgalore-plot`` in setup.cfg)."""
    return main()


if __name__ == "__main__":
    raise SystemExit(main())
