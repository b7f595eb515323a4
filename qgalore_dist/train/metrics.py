"""What the user sees during and after a ``qgalore-train`` run: a progress bar, plain log lines,
``metrics.jsonl``, TensorBoard scalars and an end-of-run summary.

Only rank 0 writes; :class:`RunLogger` on any other rank turns every method into a no-op, so
the training loop can call it unconditionally.

Files in ``run_dir``:

* ``metrics.jsonl`` -- one JSON object per line, ``{"kind": "train" | "eval", **record}``,
  flushed per line (``qgalore-plot`` reads it).  A resumed run (``start_step > 0``) appends,
  after dropping the lines of a previous attempt with ``step > start_step`` (that attempt crashed
  after those steps without a checkpoint, so they are about to be trained again); a run that
  starts at step 0 starts the file afresh for the same reason.
* ``tb/`` -- TensorBoard event files (x axis = optimizer step); on resume the same steps are
  purged from the TensorBoard view via ``SummaryWriter(purge_step=...)``.
* ``summary.json`` -- what :meth:`RunLogger.close` returns.

Plain log lines (stdout, every ``log_every`` steps and at the final step, whether or not a bar
is shown; tests parse ``step\\s+(\\d+)\\s+loss ([\\d.]+)`` from them)::

    step     10  loss 5.4321  lr 1.00e-03  tok/s 12,345  step 0.12s  svd 2  comm 1.2MB
    eval step     10  val_loss 5.1234  val_ppl 167.901
"""

from __future__ import annotations

import collections
import json
import math
import os
import resource
import sys
import time
import warnings
from typing import Any

from tqdm import tqdm

from .units import human_bytes

TRAIN_KEYS = ("step", "tokens", "loss", "lr", "step_time_s", "tokens_per_s", "svd_count", "svd_layers",
              "comm_bytes", "mem_bytes")
EVAL_KEYS = ("step", "tokens", "val_loss", "val_ppl", "val_tokens")

_tensorboard_warned = False


def peak_memory_bytes() -> int:
    """Peak memory of this process so far: ``torch.cuda.max_memory_allocated()`` on the current
    device when CUDA is available, else the peak resident set size of the process."""
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.max_memory_allocated())
    except Exception:  # torch missing or CUDA broken: the host number is still meaningful
        pass
    try:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is KiB on Linux and bytes on macOS.
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except Exception:
        import psutil

        return int(psutil.Process().memory_info().rss)


def peak_memory_kind() -> str:
    """What :func:`peak_memory_bytes` measures here, for labels."""
    try:
        import torch

        if torch.cuda.is_available():
            return "CUDA max allocated"
    except Exception:
        pass
    return "host peak RSS"


def _jsonable(value: Any) -> Any:
    """``json.dumps`` fallback: 0-d tensors / numpy scalars become numbers, arrays lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _read_kept_lines(path: str, start_step: int) -> list[str]:
    """Lines of an existing ``metrics.jsonl`` that a run resuming at ``start_step`` keeps:
    those with ``step <= start_step``.  Unparseable lines (a write cut short by a crash) go too."""
    if start_step <= 0 or not os.path.exists(path):
        return []
    kept = []
    with open(path) as f:
        for line in f:
            try:
                obj = json.loads(line)
                step = int(obj["step"])
            except (ValueError, KeyError, TypeError):
                continue
            if step <= start_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    return kept


def _rewrite(path: str, lines: list[str]) -> None:
    """Replace ``path`` with ``lines`` atomically, so a crash here never loses the kept history."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _open_tensorboard(log_dir: str, start_step: int) -> Any:
    """A ``SummaryWriter`` on ``log_dir``, or None (warning once per process) when TensorBoard
    is unavailable.  ``purge_step`` hides steps > ``start_step`` left by a previous attempt
    (everything, for a run starting at 0), matching what ``metrics.jsonl`` keeps."""
    global _tensorboard_warned
    try:
        from torch.utils.tensorboard import SummaryWriter

        purge = start_step + 1 if start_step > 0 else 0
        return SummaryWriter(log_dir=log_dir, purge_step=purge, flush_secs=30)
    except Exception as exc:  # ImportError without tensorboard; keep training regardless
        if not _tensorboard_warned:
            warnings.warn(f"TensorBoard logging disabled ({type(exc).__name__}: {exc})", stacklevel=3)
            _tensorboard_warned = True
        return None


class _Totals:
    """Running aggregates of the train records this process logged (constant memory)."""

    def __init__(self, window: int) -> None:
        self.steps = 0
        self.last_step: int | None = None
        self.last_tokens: int | None = None
        self.losses: collections.deque[float] = collections.deque(maxlen=max(1, window))
        self.first_tok_s: float | None = None
        self.tokens_after_first = 0.0  # tokens trained in steps 2.. (tokens_per_s * step_time_s)
        self.time_after_first = 0.0
        self.tok_s_after_first: list[float] = []
        self.svds = 0
        self.svds_since_line = 0  # SVDs since the last printed log line
        self.comm: dict[str, float] = collections.defaultdict(float)
        self.peak_mem = 0
        self.last_eval: dict | None = None

    def add(self, r: dict) -> None:
        if self.steps == 0:
            self.first_tok_s = float(r["tokens_per_s"])
        else:  # the first step of a process includes warm-up (compilation, first SVDs, allocator)
            self.tokens_after_first += float(r["tokens_per_s"]) * float(r["step_time_s"])
            self.time_after_first += float(r["step_time_s"])
            self.tok_s_after_first.append(float(r["tokens_per_s"]))
        self.steps += 1
        self.last_step, self.last_tokens = int(r["step"]), int(r["tokens"])
        self.losses.append(float(r["loss"]))
        self.svds += int(r["svd_count"])
        self.svds_since_line += int(r["svd_count"])
        for kind, sent in (r["comm_bytes"] or {}).items():
            self.comm[kind] += float(sent)
        self.peak_mem = max(self.peak_mem, int(r["mem_bytes"]))

    def mean_tokens_per_s(self) -> float | None:
        """Tokens over time for steps 2.. (so slow SVD steps weigh by their duration); the
        plain mean of ``tokens_per_s`` when the times are all zero; step 1 alone for 1 step."""
        if self.time_after_first > 0:
            return self.tokens_after_first / self.time_after_first
        if self.tok_s_after_first:
            return sum(self.tok_s_after_first) / len(self.tok_s_after_first)
        return self.first_tok_s


class RunLogger:
    """Progress bar, log lines, ``metrics.jsonl``, TensorBoard and the run summary.

    Rank 0 writes; on other ranks every method is a no-op (``close()`` returns ``{}``).
    ``summary_extra`` (every rank) holds fields the loop adds to the summary before ``close()``,
    e.g. ``logger.summary_extra["checkpoint"] = path``.  The averages in the summary cover the
    steps this process trained (a resumed run counts from its resume point); ``steps`` and
    ``tokens`` are the run's cumulative counts from the last record.
    """

    def __init__(self, run_dir: str, *, rank: int, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True, log_every: int = 10) -> None:
        self.run_dir = run_dir
        self.enabled = rank == 0
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self.log_every = max(1, int(log_every))
        self.summary_extra: dict[str, Any] = {}
        self._summary: dict[str, Any] | None = None
        if not self.enabled:
            return
        self._t0 = time.time()
        self._totals = _Totals(self.log_every)
        os.makedirs(run_dir, exist_ok=True)
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        _rewrite(self.metrics_path, _read_kept_lines(self.metrics_path, self.start_step))
        self._file = open(self.metrics_path, "a")
        if self.start_step > 0:  # plots mark where a run resumed (memory restarts from zero there)
            self._write("resume", {"step": self.start_step})
        self.tb_dir = os.path.join(run_dir, "tb") if tensorboard else None
        self._tb = _open_tensorboard(self.tb_dir, self.start_step) if self.tb_dir else None
        # A bar only on a terminal: redrawn bars in CI logs / pipes are noise.  Plain lines are
        # printed either way, so the log is the same with and without a bar.
        tty = bool(getattr(sys.stdout, "isatty", lambda: False)())
        self._bar = tqdm(total=self.total_steps, initial=self.start_step, disable=not (progress and tty),
                         file=sys.stdout, unit="step", dynamic_ncols=True, mininterval=0.5)

    # ------------------------------------------------------------------ records
    def log_step(self, record: dict) -> None:
        """Log one optimizer step; ``record`` has every key of ``TRAIN_KEYS`` (``grad_norm``
        optional).  Raises ValueError naming the missing keys otherwise."""
        if not self.enabled:
            return
        _require(record, TRAIN_KEYS, "train")
        self._write("train", record)
        self._totals.add(record)
        step = int(record["step"])
        self._tensorboard_step(record, step)
        loss, lr, tok_s, secs = (float(record[k]) for k in ("loss", "lr", "tokens_per_s", "step_time_s"))
        # svd: SVDs since the previous log line (a per-step count is 0 on almost every printed step)
        svd, comm = self._totals.svds_since_line, human_bytes(sum((record["comm_bytes"] or {}).values()))
        if not self._bar.disable:
            self._bar.update(max(0, step - self._bar.n))
            self._bar.set_postfix_str(f"loss {loss:.4f} tok/s {tok_s:,.0f} lr {lr:.2e} step {secs:.2f}s "
                                      f"svd {svd} comm {comm}", refresh=False)
        if step % self.log_every == 0 or step >= self.total_steps:
            self._print(f"step {step:6d}  loss {loss:.4f}  lr {lr:.2e}  tok/s {tok_s:,.0f}  "
                        f"step {secs:.2f}s  svd {svd}  comm {comm}")
            self._totals.svds_since_line = 0

    def log_eval(self, record: dict) -> None:
        """Log one evaluation; ``record`` has every key of ``EVAL_KEYS``."""
        if not self.enabled:
            return
        _require(record, EVAL_KEYS, "eval")
        self._write("eval", record)
        self._totals.last_eval = dict(record)
        if self._tb is not None:
            self._tb.add_scalar("val/loss", float(record["val_loss"]), int(record["step"]))
            self._tb.add_scalar("val/ppl", float(record["val_ppl"]), int(record["step"]))
        self._print(f"eval step {int(record['step']):6d}  val_loss {float(record['val_loss']):.4f}  "
                    f"val_ppl {float(record['val_ppl']):.3f}")

    def info(self, message: str) -> None:
        """Print ``message`` on its own line above the progress bar, flushed."""
        if self.enabled:
            self._print(message)

    def _write(self, kind: str, record: dict) -> None:
        line = {"kind": kind}
        line.update((k, v) for k, v in record.items() if k != "kind")
        # One write per line and a flush: a crash leaves whole lines that the next attempt reads.
        self._file.write(json.dumps(line, default=_jsonable) + "\n")
        self._file.flush()

    def _tensorboard_step(self, r: dict, step: int) -> None:
        if self._tb is None:
            return
        scalars = {"train/loss": r["loss"], "train/lr": r["lr"], "train/tokens_per_s": r["tokens_per_s"],
                   "train/step_time_s": r["step_time_s"], "train/svd_count": r["svd_count"],
                   "mem/bytes": r["mem_bytes"]}
        if r.get("grad_norm") is not None:
            scalars["train/grad_norm"] = r["grad_norm"]
        comm = r["comm_bytes"] or {}
        for kind, sent in comm.items():
            scalars[f"comm/{kind}_bytes"] = sent
        scalars["comm/total_bytes"] = sum(comm.values())
        for tag, value in scalars.items():
            self._tb.add_scalar(tag, float(value), step)

    def _print(self, line: str) -> None:
        # tqdm.write clears and redraws the bar around the line; without a bar it is a print.
        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()

    # ------------------------------------------------------------------ end of run
    def close(self) -> dict:
        """Close the bar and files, print the summary block, write ``summary.json`` and return
        the summary (``{}`` on ranks other than 0).  Idempotent: a second call returns the same
        summary without printing it again."""
        if not self.enabled:
            return {}
        if self._summary is not None:
            return self._summary
        self._bar.close()
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        self._summary = self._build_summary()
        _rewrite(os.path.join(self.run_dir, "summary.json"),
                 [json.dumps(self._summary, indent=2, default=_jsonable) + "\n"])
        self._print(_format_summary(self._summary))
        return self._summary

    def _build_summary(self) -> dict[str, Any]:
        t = self._totals
        last_eval = t.last_eval or {}
        per_step = {k: v / t.steps for k, v in sorted(t.comm.items())} if t.steps else {}
        summary: dict[str, Any] = {
            "steps": t.last_step if t.last_step is not None else self.start_step,
            "tokens": t.last_tokens,
            "steps_this_run": t.steps,
            "final_val_ppl": last_eval.get("val_ppl"),
            "final_val_loss": last_eval.get("val_loss"),
            "final_train_loss": sum(t.losses) / len(t.losses) if t.losses else None,
            "final_train_loss_window": len(t.losses),
            "mean_tokens_per_s": t.mean_tokens_per_s(),
            "peak_mem_bytes": t.peak_mem or peak_memory_bytes(),
            "peak_mem_kind": peak_memory_kind(),
            "total_svds": t.svds,
            "mean_comm_bytes_per_step": sum(per_step.values()) if t.steps else None,
            "mean_comm_bytes_per_step_by_kind": per_step,
            "wall_time_s": time.time() - self._t0,
            "run_dir": self.run_dir,
            "metrics": self.metrics_path,
            "tensorboard": self.tb_dir if self._tb is not None else None,
        }
        summary.update(self.summary_extra)
        return summary

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _require(record: dict, keys: tuple[str, ...], kind: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(f"{kind} record lacks {missing} (has {sorted(record)})")


def _fmt(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def _format_summary(s: dict[str, Any]) -> str:
    """The end-of-run block.  No line may read like a step log line (tests grep those)."""
    kinds = s["mean_comm_bytes_per_step_by_kind"]
    ours = {k: v for k, v in kinds.items() if v and k != "deepspeed_dense"}
    by_kind = ", ".join(f"{k} {human_bytes(v)}" for k, v in ours.items())
    comm = "n/a" if s["mean_comm_bytes_per_step"] is None else human_bytes(s["mean_comm_bytes_per_step"])
    if kinds.get("deepspeed_dense"):  # both parts, labelled: the package's metered bytes + DeepSpeed's
        by_kind = (f"Q-GaLore exchanges {human_bytes(sum(ours.values()))}" + (f": {by_kind}" if by_kind else "")
                   + f"; DeepSpeed dense parameters {human_bytes(kinds['deepspeed_dense'])}, closed form")
    whole = s.get("svds_whole_run")
    svds = f"{s['total_svds']} this run"
    if whole not in (None, s["total_svds"]):
        svds += f", {whole} whole run (resumed)"
    lines = [
        f"[qgalore] run summary ({s['run_dir']})",
        f"  steps done        {s['steps']}  (this run {s['steps_this_run']}), tokens {_fmt(s['tokens'], ',')}",
        f"  train loss        {_fmt(s['final_train_loss'], '.4f')}  (mean of the last "
        f"{s.get('final_train_loss_window', '?')} steps)   final val ppl {_fmt(s['final_val_ppl'], '.3f')}",
        f"  mean tok/s        {_fmt(s['mean_tokens_per_s'], ',.0f')}  (excluding the first step)",
        f"  peak memory       {human_bytes(s['peak_mem_bytes'])}  ({s.get('peak_mem_kind', 'n/a')}, rank 0)",
        f"  SVDs              {svds}",
        f"  sent per step     {comm}" + (f"  ({by_kind})" if by_kind else ""),
        f"  wall time         {s['wall_time_s']:.1f}s",
        f"  metrics           {s['metrics']}",
    ]
    if s.get("tensorboard"):
        lines.append(f"  tensorboard       {s['tensorboard']}")
    known = {"steps", "tokens", "steps_this_run", "final_val_ppl", "final_val_loss", "final_train_loss",
             "final_train_loss_window", "peak_mem_kind", "svds_whole_run",
             "mean_tokens_per_s", "peak_mem_bytes", "total_svds", "mean_comm_bytes_per_step",
             "mean_comm_bytes_per_step_by_kind", "wall_time_s", "run_dir", "metrics", "tensorboard"}
    lines += [f"  {k:<17} {v}" for k, v in s.items() if k not in known]
    return "\n".join(lines)
