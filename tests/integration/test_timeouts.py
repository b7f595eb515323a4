"""dist.timeout_s reaches every process group, DeepSpeed's included: a stopped peer makes the other
rank fail within the timeout, naming the operation (issue 18 item 7)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _two_ranks(free_port: int, *args: str) -> tuple[int, str]:
    """Rank 0's exit code and output; rank 1 stops itself (timeout_worker.py)."""
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, os.path.join(TESTS, "timeout_worker.py"), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        out, _ = procs[0].communicate(timeout=120)  # torch's default would be 30 minutes
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
            p.wait()
    return procs[0].returncode, out


def test_stopped_peer_fails_a_later_group_within_the_timeout(free_port, tmp_path):
    _, out = _two_ranks(free_port, "10")
    match = re.search(r"failed after ([\d.]+)s: (.*)", out)
    assert match, out[-3000:]
    assert float(match[1]) < 10 + 15, out[-3000:]  # torch would wait 1800 s
    assert "all_reduce(sum) (control) failed" in match[2], out[-3000:]


def test_watchdog_ends_a_collective_whose_group_timeout_does_not_fire(free_port):
    """A silent peer that the group's own timeout does not catch (a pulled cable under gloo,
    tests/cluster): the watchdog ends the waiting rank past 1.25 x its timeout + 5 s, naming the
    collective, with exit code 75 -- not after the group's 600 s."""
    from qgalore_dist.distributed.watchdog import EXIT_CODE

    start = time.monotonic()
    rc, out = _two_ranks(free_port, "10", "watchdog")
    took = time.monotonic() - start
    assert rc == EXIT_CODE, (rc, out[-3000:])
    assert took < 60, took
    assert re.search(r"qgalore-dist: all_reduce\(sum\) \(control\) failed at optimizer step 0 on rank 0 of 2: "
                     r"timed out: waited \d+ s", out), out[-3000:]
