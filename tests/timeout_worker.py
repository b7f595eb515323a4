"""One rank of tests/integration/test_timeouts.py: joins a 2-rank group through
``qgalore_dist.integrations.launch.init_distributed(timeout_s=T)``, builds a second group the way
DeepSpeed builds its ZeRO groups (``new_group`` without a timeout), then rank 1 stops itself
(SIGSTOP) and rank 0 runs a metered all-reduce on that group; prints how long it took to fail.
With ``watchdog`` as the second argument the group's own timeout is 600 s and the package's
watchdog (1 s) must end rank 0 instead."""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from qgalore_dist.distributed import Collectives
from qgalore_dist.integrations.launch import init_distributed

timeout_s = float(sys.argv[1])
init_distributed(backend="gloo", timeout_s=timeout_s)
group = dist.new_group([0, 1])  # as deepspeed.utils.groups does: no timeout given
if len(sys.argv) > 2 and sys.argv[2] == "watchdog":
    # A group whose own timeout cannot fire in time (as gloo's did not for a pulled cable): only
    # the package's watchdog, told a 1 s timeout, can end the wait.
    import datetime

    from qgalore_dist.distributed import set_watchdog_timeout

    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=600))
    set_watchdog_timeout(1.0)
comm = Collectives(group)
comm.all_reduce_sum(torch.ones(4), "control")  # both alive: works
if dist.get_rank() == 1:
    print("stopping", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
    time.sleep(3600)
time.sleep(1.0)
start = time.monotonic()
try:
    comm.all_reduce_sum(torch.ones(4), "control")
    print("no error", flush=True)
except RuntimeError as exc:
    print(f"failed after {time.monotonic() - start:.1f}s: {exc}", flush=True)
os._exit(0)
