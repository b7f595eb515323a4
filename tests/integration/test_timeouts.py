"""dist.timeout_s reaches every process group, DeepSpeed's included: a stopped peer makes the other
rank fail within the timeout, naming the operation (issue 18 item 7)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_stopped_peer_fails_a_later_group_within_the_timeout(free_port, tmp_path):
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, os.path.join(TESTS, "timeout_worker.py"), "10"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        out, _ = procs[0].communicate(timeout=120)  # torch's default would be 30 minutes
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
            p.wait()
    match = re.search(r"failed after ([\d.]+)s: (.*)", out)
    assert match, out[-3000:]
    assert float(match[1]) < 10 + 15, out[-3000:]  # torch would wait 1800 s
    assert "all_reduce(sum) (control) failed" in match[2], out[-3000:]
