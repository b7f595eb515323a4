"""RunLogger (metrics.jsonl, log lines, TensorBoard, summary, resume) and qgalore-plot."""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys

import pytest

from qgalore_dist.train import metrics, plot
from qgalore_dist.train.metrics import RunLogger

STEP_LINE = re.compile(r"step\s+(\d+)\s+loss ([\d.]+)")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train(step: int, *, loss: float | None = None, tok_s: float = 1000.0, secs: float = 0.5,
           layers: tuple[str, ...] = (), comm: dict | None = None, mem: int = 1000) -> dict:
    return {"step": step, "tokens": 512 * step, "loss": 5.0 - 0.1 * step if loss is None else loss,
            "lr": 1e-3, "step_time_s": secs, "tokens_per_s": tok_s, "svd_count": len(layers),
            "svd_layers": list(layers), "comm_bytes": comm if comm is not None else {"lowrank_reduce": 1000.0},
            "mem_bytes": mem, "grad_norm": 1.0}


def _eval(step: int, val_loss: float = 3.0) -> dict:
    return {"step": step, "tokens": 512 * step, "val_loss": val_loss, "val_ppl": math.exp(val_loss),
            "val_tokens": 4096}


def _lines(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _scalars(tb_dir: str, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir)
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


# ---------------------------------------------------------------------------- RunLogger
def test_jsonl_and_plain_log_lines_without_tty(tmp_path, capsys):
    run = tmp_path / "run"
    log = RunLogger(str(run), rank=0, total_steps=5, log_every=2, tensorboard=False)
    for s in range(1, 6):
        log.log_step(_train(s, layers=("layers.0.q_proj",) if s == 3 else ()))
        if s == 4:
            log.log_eval(_eval(4, 2.5))
    log.info("hello from the loop")
    log.close()
    out = capsys.readouterr().out

    lines = _lines(run)
    assert [(r["kind"], r["step"]) for r in lines] == [("train", 1), ("train", 2), ("train", 3), ("train", 4),
                                                       ("eval", 4), ("train", 5)]
    assert set(lines[0]) == {"kind", *metrics.TRAIN_KEYS, "grad_norm"}
    assert lines[2]["svd_layers"] == ["layers.0.q_proj"] and lines[2]["svd_count"] == 1
    assert set(lines[4]) == {"kind", *metrics.EVAL_KEYS}
    # Every log_every steps and the final step, and nothing else (summary included) reads as one.
    assert {int(m[1]): float(m[2]) for m in STEP_LINE.finditer(out)} == {2: 4.8, 4: 4.6, 5: 4.5}
    assert "step      2  loss 4.8000  lr 1.00e-03  tok/s 1,000  step 0.50s  svd 0  comm 1.0kB\n" in out
    assert "eval step      4  val_loss 2.5000  val_ppl 12.182\n" in out
    assert "hello from the loop\n" in out
    assert "%|" not in out and "\r" not in out  # no progress bar in a pipe


def test_bar_on_a_tty_still_prints_log_lines(tmp_path, monkeypatch):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    monkeypatch.setattr(sys, "stdout", tty)
    log = RunLogger(str(tmp_path), rank=0, total_steps=4, log_every=2, tensorboard=False)
    for s in range(1, 5):
        log.log_step(_train(s))
    log.close()
    out = tty.getvalue()
    assert sorted(int(m[1]) for m in STEP_LINE.finditer(out)) == [2, 4]
    assert "4/4" in out  # the bar reached the end


def test_summary_values(tmp_path, capsys):
    log = RunLogger(str(tmp_path), rank=0, total_steps=4, log_every=2, tensorboard=False)
    log.log_step(_train(1, loss=9.0, tok_s=10.0, secs=50.0, layers=("a", "b"), mem=5000,
                        comm={"lowrank_reduce": 100.0, "projector_broadcast": 900.0}))
    log.log_step(_train(2, loss=4.0, tok_s=1000.0, secs=1.0, comm={"lowrank_reduce": 100.0}, mem=7000))
    log.log_step(_train(3, loss=3.0, tok_s=3000.0, secs=1.0, layers=("c",), comm={"lowrank_reduce": 100.0}))
    log.log_step(_train(4, loss=2.0, tok_s=2000.0, secs=2.0, comm={"lowrank_reduce": 500.0}))
    log.log_eval(_eval(4, 2.0))
    log.summary_extra["checkpoint"] = "/ck/step4"
    summary = log.close()

    # Steps 2..4 trained 1000 + 3000 + 4000 tokens in 4 s; step 1 (warm-up) is left out.
    assert summary["mean_tokens_per_s"] == pytest.approx(2000.0)
    assert summary["total_svds"] == 3
    assert summary["mean_comm_bytes_per_step"] == pytest.approx(1700.0 / 4)
    assert summary["mean_comm_bytes_per_step_by_kind"] == pytest.approx(
        {"lowrank_reduce": 200.0, "projector_broadcast": 225.0})
    assert summary["final_train_loss"] == pytest.approx(2.5)  # last window of log_every = 2 steps
    assert summary["final_val_ppl"] == pytest.approx(math.exp(2.0))
    assert summary["peak_mem_bytes"] == 7000
    assert (summary["steps"], summary["tokens"], summary["steps_this_run"]) == (4, 2048, 4)
    assert summary["checkpoint"] == "/ck/step4" and summary["run_dir"] == str(tmp_path)
    assert summary["wall_time_s"] >= 0
    assert json.load(open(tmp_path / "summary.json")) == json.loads(json.dumps(summary))
    out = capsys.readouterr().out
    assert "run summary" in out and "/ck/step4" in out and "2,000" in out
    assert log.close() is summary  # idempotent, no second block
    assert capsys.readouterr().out == ""


def test_other_ranks_write_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    log = RunLogger(str(run), rank=1, total_steps=2, log_every=1)
    log.log_step(_train(1))
    log.log_eval(_eval(1))
    log.info("rank 1 speaking")
    log.summary_extra["checkpoint"] = "x"
    assert log.close() == {}
    assert not run.exists()
    assert capsys.readouterr() == ("", "")


def test_missing_key_is_named(tmp_path):
    log = RunLogger(str(tmp_path), rank=0, total_steps=2, tensorboard=False)
    record = _train(1)
    del record["svd_layers"]
    with pytest.raises(ValueError, match="svd_layers"):
        log.log_step(record)
    log.close()


def test_resume_drops_later_steps_of_a_crashed_attempt(tmp_path, capsys):
    run = str(tmp_path)
    first = RunLogger(run, rank=0, total_steps=10, log_every=1)
    for s in range(1, 7):  # checkpoint at 4, crash after step 6
        first.log_step(_train(s, loss=float(s)))
        if s in (4, 6):
            first.log_eval(_eval(s))
    first.close()
    second = RunLogger(run, rank=0, total_steps=7, start_step=4, log_every=1)
    for s in range(5, 8):
        second.log_step(_train(s, loss=10.0 * s))
    second.close()

    lines = _lines(run)
    assert [r["step"] for r in lines if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["step"] for r in lines if r["kind"] == "eval"] == [4]
    assert [r["loss"] for r in lines if r["kind"] == "train"] == [1, 2, 3, 4, 50, 60, 70]
    # TensorBoard hides the crashed attempt's steps 5, 6 (and its eval at 6) the same way.
    assert _scalars(os.path.join(run, "tb"), "train/loss") == {1: 1, 2: 2, 3: 3, 4: 4, 5: 50, 6: 60, 7: 70}
    assert sorted(_scalars(os.path.join(run, "tb"), "val/ppl")) == [4]


def test_fresh_start_replaces_old_metrics(tmp_path):
    for attempt in (1, 2):
        log = RunLogger(str(tmp_path), rank=0, total_steps=3, tensorboard=False)
        for s in range(1, 3 + attempt):
            log.log_step(_train(s, loss=float(attempt)))
        log.close()
    assert [(r["step"], r["loss"]) for r in _lines(tmp_path)] == [(1, 2.0), (2, 2.0), (3, 2.0), (4, 2.0)]


def test_tensorboard_scalar_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLogger(str(tmp_path), rank=0, total_steps=2)
    log.log_step(_train(1, comm={"lowrank_reduce": 10.0, "update_gather": 5.0}))
    log.log_step(_train(2, comm={"lowrank_reduce": 10.0, "update_gather": 5.0}))
    log.log_eval(_eval(2))
    assert log.close()["tensorboard"] == str(tmp_path / "tb")
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/svd_count", "comm/lowrank_reduce_bytes",
            "comm/update_gather_bytes", "mem/bytes", "val/loss", "val/ppl"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    assert acc.Scalars("comm/update_gather_bytes")[0].value == 5.0


def test_missing_tensorboard_warns_once_and_logs_on(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    monkeypatch.setattr(metrics, "_tensorboard_warned", False)
    with pytest.warns(UserWarning, match="TensorBoard logging disabled"):
        log = RunLogger(str(tmp_path / "a"), rank=0, total_steps=1)
    log.log_step(_train(1))
    assert log.close()["tensorboard"] is None
    assert len(_lines(tmp_path / "a")) == 1
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second logger stays quiet
        RunLogger(str(tmp_path / "b"), rank=0, total_steps=1).close()


def test_human_bytes_and_peak_memory():
    assert [metrics.human_bytes(n) for n in (0, 999, 1000, 1.2e6, 3.45e9, 2e15)] == [
        "0B", "999B", "1.0kB", "1.2MB", "3.5GB", "2000.0TB"]
    assert plot.human_bytes is metrics.human_bytes  # one definition (qgalore_dist.train.units)
    assert metrics.peak_memory_bytes() > 10 * 2**20  # a Python process with torch loaded


# ---------------------------------------------------------------------------- qgalore-plot
def _is_png(path: str) -> bool:
    from matplotlib.image import imread

    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return False
    image = imread(path)
    return image.shape[0] > 50 and image.shape[1] > 50


def _logged_run(run_dir: str, *, with_svds: bool) -> None:
    log = RunLogger(run_dir, rank=0, total_steps=20, log_every=5, tensorboard=False, progress=False)
    for s in range(1, 21):
        layers = (f"layers.{s % 3}.mlp.up_proj", "layers.0.self_attn.q_proj") if with_svds and s % 4 == 1 else ()
        log.log_step(_train(s, layers=layers, mem=1000 * s,
                            comm={"lowrank_reduce": 2e5, "projector_broadcast": 5e4 * len(layers), "dense": 0}))
        if s % 10 == 0:
            log.log_eval(_eval(s, 4.0 - 0.1 * s))
    log.close()


@pytest.mark.parametrize("with_svds", [True, False])
def test_plot_writes_valid_pngs(tmp_path, capsys, with_svds):
    _logged_run(str(tmp_path), with_svds=with_svds)
    capsys.readouterr()
    assert plot.main([str(tmp_path)]) == 0
    names = ["loss.png", "comm.png", "svd_events.png", "memory.png"]
    expected = [str(tmp_path / "plots" / n) for n in names]
    assert capsys.readouterr().out.split() == expected
    assert all(_is_png(p) for p in expected)


def test_plot_of_a_run_without_evals_or_comm(tmp_path):
    log = RunLogger(str(tmp_path), rank=0, total_steps=3, tensorboard=False)
    for s in range(1, 4):
        log.log_step(_train(s, comm={}))
    log.close()
    assert all(_is_png(p) for p in plot.plot_run(str(tmp_path)))


def test_load_metrics_keeps_the_last_line_per_step(tmp_path):
    rows = [{"kind": "train", "step": 2, "loss": 1.0}, {"kind": "train", "step": 1, "loss": 2.0},
            {"kind": "train", "step": 2, "loss": 3.0}, {"kind": "future", "step": 1}, {"kind": "eval", "step": 2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    train, evals = plot.load_metrics(str(tmp_path))
    assert [(r["step"], r["loss"]) for r in train] == [(1, 2.0), (2, 3.0)] and len(evals) == 1


@pytest.mark.parametrize("case", ["missing_dir", "missing_file", "empty_file", "not_json", "no_step"])
def test_plot_errors_name_the_path(tmp_path, capsys, case):
    run = tmp_path / "run"
    if case != "missing_dir":
        run.mkdir()
    good = json.dumps({"kind": "train", **_train(1)}) + "\n"
    content = {"empty_file": "", "not_json": good + '{"kind": "train", "step": 2, "loss": \n',
               "no_step": good + '{"kind": "eval"}\n'}.get(case)
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    assert plot.main([str(run)]) == 2
    err = capsys.readouterr().err
    expected = {"missing_dir": str(run), "missing_file": str(run / "metrics.jsonl"),
                "empty_file": str(run / "metrics.jsonl"), "not_json": f"{run / 'metrics.jsonl'}:2",
                "no_step": f"{run / 'metrics.jsonl'}:2"}[case]
    assert expected in err and "expected" in err, err
    assert not (run / "plots").exists()


def test_python_dash_m_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qgalore_dist.train.plot", str(tmp_path / "nope")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and str(tmp_path / "nope") in proc.stderr, proc.stderr
