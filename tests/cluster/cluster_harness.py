"""Helpers of the cluster tests (imported by name: conftest.py puts this folder on sys.path)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = str(REPO / "scripts" / "cluster.sh")
HOW_TO_RUN = ("cluster tests need root and the emulated 2-node cluster; run them with "
              "`sudo QGALORE_CLUSTER=1 python -m pytest -m cluster tests/cluster` (or .ci/run)")
STEPS = 60
"""Optimizer steps of the compared runs (checkpoints every 10)."""


def run(cmd: list[str], *, timeout: float, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run ``cmd``; stdout and stderr together in ``.stdout``."""
    return subprocess.run(cmd, env=env, cwd=cwd, timeout=timeout, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, check=False)


def on_node(node: str, cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """``cmd`` on an emulated node (its namespace, hostname and /etc/hosts)."""
    return run([CLUSTER_SH, "exec", node, *cmd], **kw)


def free_port() -> int:
    """A port free on this machine a moment ago; the nodes' ports are their own, but a port per
    run keeps a run from meeting the previous one's TIME_WAIT sockets."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env() -> dict:
    """What every rank needs, whichever launcher starts it: this venv, this checkout, CPU."""
    venv_bin = os.path.dirname(sys.executable)
    return {**os.environ,
            "PATH": f"{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu",
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_ext")),
            "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            # Same thread count under every launcher: runs compare bit for bit.
            "OMP_NUM_THREADS": "1",
            # Process-group timeout in minutes: a rank whose peer vanished silently gives up in 60 s.
            "DEEPSPEED_TIMEOUT": "1",
            "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


FORWARDED = ("PATH", "PYTHONPATH", "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE",
             "PYTHONUNBUFFERED", "OMP_NUM_THREADS", "DEEPSPEED_TIMEOUT")
"""Variables the remote ranks need: ``.deepspeed_env`` lines for pdsh, ``-x`` for mpirun
(Slurm copies the submitter's environment)."""


def train_args(work: Path, run_dir: Path, *, steps: int = STEPS, every: int = 10) -> list[str]:
    return ["--ds_config", str(work / "ds.json"), "--run_dir", str(run_dir), "--model.name", str(work / "model.json"),
            "--data.source", str(work / "corpus.jsonl"), "--data.seq_len", "64", "--data.vocab_size", "300",
            "--data.val_sequences", "16", "--data.cache_dir", str(work / "cache"), "--schedule.steps", str(steps),
            "--schedule.warmup_steps", "3", "--eval.every", "0", "--checkpoint.every", str(every),
            "--logging.every", "1", "--logging.plots", "false", "--logging.tensorboard", "false",
            "--logging.progress", "false"]


def deepspeed_cmd(work: Path, run_dir: Path, *, hostfile: bool, num_gpus: int, extra=()) -> tuple[list, dict]:
    """``launch/deepspeed.sh`` started on node1, and its environment."""
    env = {**rank_env(), "NUM_GPUS": str(num_gpus), "MASTER_PORT": str(free_port())}
    if hostfile:
        env["HOSTFILE"] = str(work / "hostfile")
    return [CLUSTER_SH, "exec", "node1", str(REPO / "launch" / "deepspeed.sh"),
            *train_args(work, run_dir), *extra], env


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss per step from metrics.jsonl (a resumed run's record wins)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train":
            out[rec["step"]] = rec["loss"]
    return out


def last_step(run_dir: Path) -> int:
    try:
        return max(losses(run_dir), default=0)
    except (OSError, json.JSONDecodeError):  # not written yet, or a line half-way
        return 0


def wait_until(what: str, predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def sbatch(work: Path, script: str, args: list[str], *, env_extra=None, tag: str) -> str:
    """Submit ``launch/<script>`` from node1 with the emulated nodes' sizes; returns the job id."""
    env = {**rank_env(), **(env_extra or {})}
    proc = on_node("node1", ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0",
                             "--cpus-per-task=1", "--time=10", f"--chdir={work}",
                             f"--output={work}/{tag}-%j.out", str(REPO / "launch" / script), *args],
                   env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout
    return re.findall(r"^(\d+)", proc.stdout, re.MULTILINE)[-1]


def job_state(job: str) -> str:
    out = on_node("node1", ["scontrol", "show", "job", job], timeout=30).stdout
    match = re.search(r"JobState=(\S+)", out)
    return match[1] if match else f"unknown ({out.strip()[-200:]})"


def wait_job(job: str, timeout: float = 300) -> str:
    """Poll until the job leaves the queue; its final state."""
    active = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING")
    return wait_until(f"Slurm job {job} to end", lambda: (s := job_state(job)) not in active and s, timeout, 1.0)

