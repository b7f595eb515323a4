"""An emulated two-node link: two network namespaces joined by a veth pair, shaped with ``tc``.

``EmulatedLink`` creates namespaces ``qg_thr_a`` / ``qg_thr_b`` (only these two names are ever
created or deleted), a veth pair ``qg_thr_va`` (10.77.0.1/24, in A) <-> ``qg_thr_vb``
(10.77.0.2/24, in B), and shapes the egress of both ends to the same rate:

* ``netem delay D rate R`` when the kernel has netem (delay and rate in one qdisc);
* otherwise ``tbf rate R`` (token bucket; no delay can be added), with the netem error recorded
  so that reports say the delay was not emulated.

Nothing outside the two namespaces is touched: no root-namespace interface, route or qdisc.
``launch_rank`` starts one torch rank per namespace (``ip netns exec``), talking over its veth end.
Every ``ip``/``tc`` call has a timeout.  ``open()`` first deletes namespaces of these two names
left by a crashed run; ``close()`` (also the context manager's exit) deletes both namespaces,
which destroys the veth pair and its qdiscs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

NS_A, NS_B = "qg_thr_a", "qg_thr_b"
VETH_A, VETH_B = "qg_thr_va", "qg_thr_vb"
ADDR_A, ADDR_B = "10.77.0.1", "10.77.0.2"
_CMD_TIMEOUT_S = 20
# tbf: the queue holds this much time at the shaped rate, so that TCP meets queueing delay
# rather than drops (a drop costs a retransmit timeout, which is not what a slower link does).
_QUEUE_S = 0.25
# Token bucket depth: 1 ms at the rate, at least a few 64 KiB GSO segments (tbf splits larger ones).
_BURST_S = 0.001
MIN_BURST_BYTES = 4 * 65536


class NetnsUnavailable(RuntimeError):
    """The namespaces or the veth pair could not be created (message: the exact error)."""


def _run(cmd: list[str], *, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_CMD_TIMEOUT_S)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (rc {proc.returncode}): {proc.stderr.strip()}")
    return proc


def _in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def list_namespaces() -> list[str]:
    """Names from ``ip netns list`` (first word of each line)."""
    out = _run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def delete_stale() -> list[str]:
    """Delete our two namespaces if a previous run left them; returns the names deleted."""
    stale = [ns for ns in list_namespaces() if ns in (NS_A, NS_B)]
    for ns in stale:
        _run(["ip", "netns", "del", ns], check=False)
    return stale


@dataclass(kw_only=True)
class Shaping:
    """What one phase put on both veth ends."""

    rate_bit_s: float | None
    """Egress rate of each end; None: no qdisc (the veth's own speed)."""
    delay_ms: float
    """Requested one-way delay."""
    qdisc: str
    """``none``, ``netem`` or ``tbf``: what was actually installed."""
    delay_emulated: bool
    """False when netem is missing and tbf was used: the delay was not applied."""
    commands: list[str] = field(default_factory=list)
    """The tc command lines run (for the report)."""


@dataclass(kw_only=True)
class EmulatedLink:
    """Two namespaces and a veth between them; use as a context manager."""

    netem_error: str | None = None
    """stderr of the first failed netem attempt ("Specified qdisc kind is unknown" without netem)."""
    created: bool = False
    _last_error: str = field(default="", repr=False)

    def __enter__(self) -> "EmulatedLink":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        """Create both namespaces and the veth pair; NetnsUnavailable with the exact error."""
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                raise NetnsUnavailable(f"`{tool}` is not installed (iproute2)")
        delete_stale()
        steps = [
            ["ip", "netns", "add", NS_A],
            ["ip", "netns", "add", NS_B],
            ["ip", "link", "add", VETH_A, "netns", NS_A, "type", "veth", "peer", "name", VETH_B, "netns", NS_B],
            _in_ns(NS_A, "ip", "addr", "add", f"{ADDR_A}/24", "dev", VETH_A),
            _in_ns(NS_B, "ip", "addr", "add", f"{ADDR_B}/24", "dev", VETH_B),
        ]
        for ns, dev in ((NS_A, VETH_A), (NS_B, VETH_B)):
            steps += [_in_ns(ns, "ip", "link", "set", "lo", "up"), _in_ns(ns, "ip", "link", "set", dev, "up")]
        self.created = True  # from here on close() must run, even if a later step fails
        try:
            for cmd in steps:
                _run(cmd)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            self.close()
            raise NetnsUnavailable(str(exc)) from exc

    def close(self) -> None:
        """Delete both namespaces (the veth pair goes with them). Safe to call twice."""
        if self.created:
            for ns in (NS_A, NS_B):
                _run(["ip", "netns", "del", ns], check=False)
            self.created = False

    def shape(self, rate_bit_s: float | None, delay_ms: float) -> Shaping:
        """Replace the egress qdisc of both ends: netem (rate + delay), else tbf (rate only);
        ``rate_bit_s=None`` removes shaping (and the delay)."""
        if rate_bit_s is not None and rate_bit_s <= 0:
            raise ValueError(f"rate_bit_s must be > 0 or None, got {rate_bit_s!r}")
        if delay_ms < 0:
            raise ValueError(f"delay_ms must be >= 0, got {delay_ms!r}")
        for ns, dev in ((NS_A, VETH_A), (NS_B, VETH_B)):
            _run(_in_ns(ns, "tc", "qdisc", "del", "dev", dev, "root"), check=False)  # absent at first: fine
        if rate_bit_s is None:
            return Shaping(rate_bit_s=None, delay_ms=0.0, qdisc="none", delay_emulated=delay_ms == 0)
        rate = f"{int(rate_bit_s)}bit"
        netem = ["netem", "delay", f"{delay_ms}ms", "rate", rate, "limit", "100000"]
        if self.netem_error is None and self._try_all(netem):
            return Shaping(rate_bit_s=rate_bit_s, delay_ms=delay_ms, qdisc="netem", delay_emulated=True,
                           commands=[self._tc_line(netem)])
        rate_bytes = rate_bit_s / 8
        burst = max(MIN_BURST_BYTES, int(rate_bytes * _BURST_S))
        tbf = ["tbf", "rate", rate, "burst", str(burst), "limit", str(burst + int(rate_bytes * _QUEUE_S))]
        if not self._try_all(tbf, record_netem_error=False):
            raise RuntimeError(f"tc could not install tbf either: {self._last_error}")
        return Shaping(rate_bit_s=rate_bit_s, delay_ms=delay_ms, qdisc="tbf", delay_emulated=delay_ms == 0,
                       commands=[self._tc_line(tbf)])

    def _try_all(self, qdisc: list[str], *, record_netem_error: bool = True) -> bool:
        for ns, dev in ((NS_A, VETH_A), (NS_B, VETH_B)):
            proc = _run(_in_ns(ns, "tc", "qdisc", "replace", "dev", dev, "root", *qdisc), check=False)
            if proc.returncode != 0:
                self._last_error = proc.stderr.strip()
                if record_netem_error:
                    self.netem_error = self._last_error or f"rc {proc.returncode}"
                return False
        return True

    @staticmethod
    def _tc_line(qdisc: list[str]) -> str:
        return "tc qdisc replace dev <veth> root " + " ".join(qdisc)


def tx_bytes(dev: str) -> int:
    """Bytes sent by ``dev`` as the calling process's network namespace sees it (``ip netns exec``
    remounts /sys, so inside a namespace this is that namespace's veth)."""
    return int(Path(f"/sys/class/net/{dev}/statistics/tx_bytes").read_text())


# ----------------------------------------------------------------------------- one process per namespace
def launch_rank(argv: list[str], rank: int, world: int, port: int, log, *, in_netns: bool,
                cwd: Path) -> subprocess.Popen:
    """Start torch rank ``rank`` of ``world`` (2 with namespaces): inside its namespace when
    ``in_netns``, with env:// variables pointing at rank 0's veth address (else loopback).  Each
    rank is alone on its "node" (LOCAL_RANK 0 of 1) and its gloo traffic leaves through its veth."""
    if in_netns and not 0 <= rank < 2:
        raise ValueError(f"the emulated link has two ends; rank {rank} has none")
    dev = (VETH_A, VETH_B)[rank] if in_netns else ""
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", QG_THR_DEV=dev,
               MASTER_ADDR=ADDR_A if in_netns else "127.0.0.1", GLOO_SOCKET_IFNAME=dev or "lo")
    prefix = ["ip", "netns", "exec", (NS_A, NS_B)[rank]] if in_netns else []
    return subprocess.Popen(prefix + argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(cwd))


def wait_for_file(path: Path, procs: list[subprocess.Popen], deadline: float, poll_s: float = 0.2) -> None:
    """Poll for ``path`` until ``deadline`` (time.monotonic); fail early if a process exited first."""
    while not path.exists():
        if any(p.poll() is not None for p in procs) and not path.exists():
            raise RuntimeError(f"a worker exited (rc {[p.returncode for p in procs]}) before writing {path.name}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {path.name}")
        time.sleep(poll_s)


def stop(procs: list[subprocess.Popen]) -> None:
    """Terminate (then kill, after 10 s) those of ``procs`` still running: our own children only."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
