"""``python -m qgalore_dist.train`` under the ``deepspeed`` launcher and ``torchrun``: the loss
falls, SIGTERM (SLURM preemption) checkpoints and exits cleanly, and the next run resumes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "ds", "tiny_zero2_bf16.json")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(log: str) -> dict[int, float]:
    return {int(m[1]): float(m[2]) for m in re.finditer(r"step\s+(\d+)\s+loss ([\d.]+)", log)}


def test_deepspeed_launcher_trains_and_resumes(tmp_path):
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(_port()), "--module", "qgalore_dist.train",
           "--deepspeed_config", CONFIG, "--steps", "8", "--log-every", "4", "--save-dir", str(tmp_path / "ck")]
    first = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    log = first.stdout + first.stderr
    assert first.returncode == 0, log[-3000:]
    assert "2 ranks, ZeRO stage 2" in log and "replicas identical" in log
    losses = _losses(log)
    assert sorted(losses) == [4, 8] and losses[8] < losses[4]
    assert json.load(open(tmp_path / "ck" / "step8" / "meta.json"))["client_state"] == {"next_step": 8}
    cmd[cmd.index("--steps") + 1] = "12"
    cmd[cmd.index("--master_port") + 1] = str(_port())
    second = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    log2 = second.stdout + second.stderr
    assert second.returncode == 0, log2[-3000:]
    assert "resumed at step 8" in log2 and sorted(_losses(log2)) == [12]


def test_sigterm_checkpoints_and_exits_zero(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
           "-m", "qgalore_dist.train", "--deepspeed_config", CONFIG, "--steps", "100000", "--log-every", "2",
           "--save-dir", str(tmp_path / "ck")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, deadline = [], time.time() + 240
    try:
        for line in proc.stdout:  # wait until training runs
            lines.append(line)
            if re.search(r"step\s+2\s+loss", line) or time.time() > deadline:
                break
        workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "qgalore_dist.train" in " ".join(c.cmdline())]
        assert len(workers) == 2, lines[-20:]
        for w in workers:  # what SLURM does on preemption: every task gets SIGTERM
            os.kill(w.pid, signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines) + rest
    assert proc.returncode == 0, log[-3000:]
    match = re.search(r"signal 15: checkpoint saved at step (\d+), exiting", log)
    assert match, log[-3000:]
    tag = open(tmp_path / "ck" / "latest").read().strip()
    assert tag == f"step{match[1]}"
    from qgalore_dist.checkpoint import verify_checkpoint

    verify_checkpoint(str(tmp_path / "ck" / tag))


