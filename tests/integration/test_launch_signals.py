"""launch/deepspeed.sh forwards SIGTERM to the ranks, which save and exit 0, and the script exits 0
(issue 18 item 8).  Before: `exec deepspeed` -- SIGTERM killed the runner only, the ranks ran on."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PATH = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])

CHILD = r'''
import os, signal, sys, time
out = os.environ["SIG_OUT"]
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
rank = os.environ["RANK"]
open(os.path.join(out, f"ready{rank}"), "w").close()
deadline = time.time() + 90
while not got and time.time() < deadline:
    time.sleep(0.1)
if got:
    open(os.path.join(out, f"saved{rank}"), "w").close()   # what qgalore-train's checkpoint is
    sys.exit(0)
sys.exit(3)
'''


@pytest.mark.skipif(shutil.which("deepspeed", path=PATH) is None, reason="deepspeed launcher not on PATH")
def test_sigterm_to_deepspeed_sh_reaches_the_ranks_and_exits_0(tmp_path):
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    names = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in names and not k.startswith("SLURM_")}
    env.update(PATH=PATH, NUM_GPUS="2", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", SIG_OUT=str(tmp_path),
               TRAIN=f"{sys.executable} {child}")
    proc = subprocess.Popen(["bash", str(REPO / "launch" / "deepspeed.sh")], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)) and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert (tmp_path / "saved0").exists() and (tmp_path / "saved1").exists(), out[-3000:]
