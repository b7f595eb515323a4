"""The emulated 2-node cluster (``scripts/cluster.sh``) and what the cluster tests share.

These tests start real daemons (sshd, munge, slurmctld, two slurmd) in network namespaces, so
they need root and run only when asked:

    sudo QGALORE_CLUSTER=1 python -m pytest -m cluster tests/cluster     # (or .ci/run)

The session fixture ``cluster`` brings the cluster up (installing its Debian packages on first
use) and takes it down again at the end, also after a failure; a cluster that was already up
when the session started is left up.  Every run goes through the unchanged ``launch/`` scripts.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = str(REPO / "scripts" / "cluster.sh")
HOW_TO_RUN = ("cluster tests need root and the emulated 2-node cluster; run them with "
              "`sudo QGALORE_CLUSTER=1 python -m pytest -m cluster tests/cluster` (or .ci/run)")
STEPS = 40
"""Optimizer steps of the compared runs (checkpoints every 10)."""


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason=HOW_TO_RUN)
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.cluster)
            if os.environ.get("QGALORE_CLUSTER") != "1":
                item.add_marker(skip)


def run(cmd: list[str], *, timeout: float, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run ``cmd``; stdout and stderr together in ``.stdout``."""
    return subprocess.run(cmd, env=env, cwd=cwd, timeout=timeout, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def on_node(node: str, cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """``cmd`` on an emulated node (its namespace, hostname and /etc/hosts)."""
    return run([CLUSTER_SH, "exec", node, *cmd], **kw)


def free_port() -> int:
    """A port free on this machine a moment ago; the nodes' ports are their own, but a port per
    run keeps a run from meeting the previous one's TIME_WAIT sockets."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def cluster():
    if os.geteuid() != 0:
        pytest.fail("QGALORE_CLUSTER=1 but not root: " + HOW_TO_RUN)
    was_up = run([CLUSTER_SH, "status"], timeout=60).returncode == 0
    try:
        up = run([CLUSTER_SH, "up"], timeout=1500)  # first use installs Debian packages
        assert up.returncode == 0, f"scripts/cluster.sh up failed:\n{up.stdout[-4000:]}"
        yield
    finally:
        if not was_up:
            down = run([CLUSTER_SH, "down"], timeout=120)
            print(down.stdout)


def _env() -> dict:
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


@pytest.fixture(scope="session")
def work(cluster, tmp_path_factory):
    """A directory both nodes see (one filesystem): fixture corpus, a 2-layer LLaMA, a bf16 ZeRO-2
    ds_config, the hostfiles and ``.deepspeed_env``."""
    from qgalore_dist.train.corpus import builtin_text

    root = tmp_path_factory.mktemp("cluster")
    docs = [d for d in builtin_text(max_chars=150_000).split("\n\n") if len(d) > 80]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (root / "model.json").write_text(json.dumps(dict(hidden_size=64, intermediate_size=176, num_attention_heads=4,
                                                     num_hidden_layers=2, max_position_embeddings=64)))
    (root / "ds.json").write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}, "steps_per_print": 10**9,
        "optimizer": {"type": "QGaLoreAdamW8bit", "params": {"lr": 0.01, "rank": 16, "update_proj_gap": 5,
                                                              "scale": 0.25}}}))
    (root / "hostfile").write_text("node1 slots=1\nnode2 slots=1\n")
    env = _env()
    # pdsh's remote shells start with a bare environment: DeepSpeed exports these lines there.
    (root / ".deepspeed_env").write_text("".join(f"{k}={env[k]}\n" for k in FORWARDED))
    return root


def train_args(work: Path, run_dir: Path, *, steps: int = STEPS, every: int = 10) -> list[str]:
    return ["--ds_config", str(work / "ds.json"), "--run_dir", str(run_dir), "--model.name", str(work / "model.json"),
            "--data.source", str(work / "corpus.jsonl"), "--data.seq_len", "64", "--data.vocab_size", "300",
            "--data.val_sequences", "16", "--data.cache_dir", str(work / "cache"), "--schedule.steps", str(steps),
            "--schedule.warmup_steps", "3", "--eval.every", "0", "--checkpoint.every", str(every),
            "--logging.every", "1", "--logging.plots", "false", "--logging.tensorboard", "false",
            "--logging.progress", "false"]


def deepspeed_cmd(work: Path, run_dir: Path, *, hostfile: bool, num_gpus: int, extra=()) -> tuple[list, dict]:
    """``launch/deepspeed.sh`` started on node1, and its environment."""
    env = {**_env(), "NUM_GPUS": str(num_gpus), "MASTER_PORT": str(free_port())}
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
    env = {**_env(), **(env_extra or {})}
    proc = on_node("node1", ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0",
                             "--cpus-per-task=1", "--time=10", f"--chdir={work}",
                             f"--output={work}/{tag}-%j.out", str(REPO / "launch" / script), *args],
                   env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout
    return re.findall(r"^(\d+)", proc.stdout, re.M)[-1]


def job_state(job: str) -> str:
    out = on_node("node1", ["scontrol", "show", "job", job], timeout=30).stdout
    match = re.search(r"JobState=(\S+)", out)
    return match[1] if match else f"unknown ({out.strip()[-200:]})"


def wait_job(job: str, timeout: float = 300) -> str:
    """Poll until the job leaves the queue; its final state."""
    active = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING")
    return wait_until(f"Slurm job {job} to end", lambda: (s := job_state(job)) not in active and s, timeout, 1.0)
