"""A watchdog over the package's collectives: a process whose collective has waited much longer
than the process group's timeout aborts, naming the collective, instead of hanging.

Why: gloo's timeout does not always fire.  With a peer node's link pulled (no reset reaches this
node, the connection just goes silent) a surviving rank was measured waiting inside the package's
``reduce_scatter`` for minutes past a 60 s group timeout, and resumed when the link came back
(``tests/cluster/test_cluster.py``).  NCCL has the same failure mode and the same answer: its
watchdog aborts the process (``TORCH_NCCL_ASYNC_ERROR_HANDLING``).  Here one daemon thread per
process checks, every few seconds, how long each collective in progress has waited; past
``timeout_s * 1.25 + 5`` seconds it prints one line in the form the collectives use for their own
failures ("qgalore-dist: <op> (<kind>) failed at optimizer step N on rank r of W: timed out ...")
to stderr and ends the process with exit code :data:`EXIT_CODE`: the launcher then sees a failed
rank and stops the job, and a restart resumes from the newest good checkpoint.

Off until :func:`set_watchdog_timeout` is called (``qgalore_dist.integrations.launch`` does it
with the process group's timeout); it never sees DeepSpeed's or FSDP2's own collectives.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from contextlib import contextmanager

__all__ = ["EXIT_CODE", "set_watchdog_timeout", "watch"]

EXIT_CODE = 75
"""Exit status of a process the watchdog ended (EX_TEMPFAIL: retrying from a checkpoint may work)."""

_lock = threading.Lock()
_active: dict[int, tuple[str, float]] = {}
"""Collectives in progress: token -> (description, start time)."""
_tokens = itertools.count()
_timeout_s: float | None = None
_thread: threading.Thread | None = None


def limit_s(timeout_s: float) -> float:
    """How long a collective may wait before the watchdog ends the process."""
    return 1.25 * timeout_s + 5.0


def set_watchdog_timeout(timeout_s: float | None) -> None:
    """Watch every collective of the package against ``timeout_s`` (the process group's timeout,
    seconds); None turns the watchdog off."""
    global _timeout_s, _thread
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"watchdog timeout_s must be > 0 seconds or None, got {timeout_s!r}")
    _timeout_s = timeout_s
    if timeout_s is not None and _thread is None:
        _thread = threading.Thread(target=_loop, name="qgalore-dist-watchdog", daemon=True)
        _thread.start()


@contextmanager
def watch(description: str):
    """Mark one collective (``description`` names it as its error would) as in progress."""
    if _timeout_s is None:
        yield
        return
    token = next(_tokens)
    with _lock:
        _active[token] = (description, time.monotonic())
    try:
        yield
    finally:
        with _lock:
            _active.pop(token, None)


def _loop() -> None:
    while True:
        timeout = _timeout_s
        time.sleep(2.0 if timeout is None else min(5.0, max(0.5, timeout / 8)))
        if timeout is None:
            continue
        now = time.monotonic()
        with _lock:
            late = [(d, now - t0) for d, t0 in _active.values() if now - t0 > limit_s(timeout)]
        if late:
            description, waited = late[0]
            print(f"{description}: timed out: waited {waited:.0f} s, past the process group's timeout of "
                  f"{timeout:.0f} s, which did not fire (a peer unreachable without closing its connection, "
                  f"e.g. a lost node or link); the qgalore-dist watchdog ends this process (exit {EXIT_CODE})",
                  file=sys.stderr, flush=True)
            os._exit(EXIT_CODE)
