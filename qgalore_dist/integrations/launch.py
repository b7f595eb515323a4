"""Launcher environment discovery and a clean process exit for distributed runs.

``deepspeed.init_distributed`` needs RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and LOCAL_RANK;
without them it runs ``mpi_discovery`` (needs mpi4py, ignores SLURM_*, master from ``hostname -I``).
This module maps what each launcher exports onto those variables, so one entry point runs under
torchrun / deepspeed, srun, mpirun and plain python: ``env = init_distributed()`` ... ``run_main(main)``.

Sources, first match wins: "env" (all five set: torchrun, deepspeed, srun torchrun), "ompi"
(OpenMPI), "pmi" (MPICH / Intel MPI), "slurm" (srun tasks), "mpi4py" (other MPI launchers; only
from init_distributed), "single".  MPI comes before Slurm: mpirun inside an allocation starts its
daemons with srun, so the SLURM_* its ranks inherit describe the daemons, not the ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.util
import logging
import os
import re
import socket
import sys
import traceback
from collections.abc import Callable, Mapping, MutableMapping
from typing import NoReturn

__all__ = ["LaunchEnv", "apply_launch_env", "exit_cleanly", "first_host", "init_distributed",
           "mpi4py_discovery", "resolve_launch_env", "run_main"]

SOURCES = ("env", "ompi", "pmi", "slurm", "mpi4py", "single")
DEFAULT_PORT = 29500  # torchrun's and DeepSpeed's default
LOCALHOST = "127.0.0.1"
_TORCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
# source -> (rank, world size, local rank candidates, local size candidates)
_VARS = {
    "env": ("RANK", "WORLD_SIZE", ("LOCAL_RANK",), ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")),
    "ompi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", ("OMPI_COMM_WORLD_LOCAL_RANK",),
             ("OMPI_COMM_WORLD_LOCAL_SIZE",)),
    "pmi": ("PMI_RANK", "PMI_SIZE", ("MPI_LOCALRANKID", "PALS_LOCAL_RANKID"), ("MPI_LOCALNRANKS", "PALS_LOCAL_SIZE")),
}
# Set by MPI launchers whose rank variables are not mapped above: only mpi4py can place the process.
_MPI_MARKERS = ("PMIX_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK", "PALS_RANKID")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class LaunchEnv:
    """Where this process sits in the job, as torch's ``env://`` rendezvous needs it."""

    rank: int
    """Global rank, 0 <= rank < world_size."""
    local_rank: int
    """Rank among the processes on this node (the accelerator index on GPU nodes)."""
    world_size: int
    """Number of processes in the job (>= 1)."""
    local_world_size: int | None
    """Processes on this node; None when the launcher does not say."""
    master_addr: str
    """Host of rank 0's TCPStore, reachable from every rank."""
    master_port: int
    """Port of rank 0's TCPStore; 0 only for "single" (init_distributed then picks a free one)."""
    source: str
    """The launcher the values came from, one of SOURCES."""


def first_host(nodelist: str, *, var: str = "SLURM_JOB_NODELIST") -> str:
    """First host of a Slurm hostlist: ``node[01-04,07]`` -> node01, ``gpu-a[3,5]-ib`` -> gpu-a3-ib,
    ``n1,n2`` -> n1, ``r[1-2]-n[08-09]`` -> r1-n08 (padding kept).  ValueError names ``var``."""
    text, depth = nodelist.strip(), 0
    for i, ch in enumerate(text):  # the first comma outside brackets ends the first item
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            text = text[:i]
            break
    bad = ValueError(f"{var}={nodelist!r} is not a Slurm hostlist (expected e.g. node[01-04,07] or n1,n2)")

    def first_of_range(match: re.Match[str]) -> str:
        first = re.split(r"[,-]", match.group(1), maxsplit=1)[0].strip()
        if not first.isdigit():
            raise bad
        return first

    host = re.sub(r"\[([^\[\]]*)\]", first_of_range, text)
    if not host or "[" in host or "]" in host:
        raise bad
    return host


def resolve_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Map the launcher's variables in ``environ`` (default ``os.environ``) to a LaunchEnv.  Pure;
    never "mpi4py" (needs MPI_Init).  ValueError names the variable: non-integers, ranks out of range,
    partial RANK/WORLD_SIZE/LOCAL_RANK, a Slurm batch shell with several tasks (no srun step), a
    multi-node MPI job without MASTER_ADDR, an MPI launcher whose variables are not mapped here."""
    environ = os.environ if environ is None else environ
    env = _from_launcher(environ)
    return env if env is not None else _single(environ)


def _from_launcher(environ: Mapping[str, str]) -> LaunchEnv | None:
    if all(v in environ for v in _TORCH_VARS):
        return _from_vars(environ, "env")
    if "OMPI_COMM_WORLD_RANK" in environ:
        return _from_vars(environ, "ompi")
    if "PMI_RANK" in environ and _first_set(environ, *_VARS["pmi"][2]):  # srun --mpi=pmi2 has no local id
        return _from_vars(environ, "pmi")
    if "SLURM_PROCID" in environ:
        return _from_slurm(environ)
    return None


def _from_vars(environ: Mapping[str, str], source: str) -> LaunchEnv:
    """torchrun / OpenMPI / PMI: MASTER_ADDR, else loopback when every rank is on this node."""
    rank_var, world_var, local_rank_vars, local_vars = _VARS[source]
    local_rank_var = _first_set(environ, *local_rank_vars) or local_rank_vars[0]
    local_var = _first_set(environ, *local_vars)
    world = _int(environ, world_var, minimum=1)
    local = None if local_var is None else _int(environ, local_var, minimum=1)
    addr = environ.get("MASTER_ADDR", "")
    if not addr and source != "env":  # "env" always has MASTER_ADDR; _checked rejects an empty one
        if local != world:
            raise ValueError(f"MASTER_ADDR is not set and the {world_var}={world} ranks are not all on this "
                             f"node ({local_var or local_vars[0]}={local}); export MASTER_ADDR=<host of rank 0> "
                             "reachable from every node (mpirun: -x MASTER_ADDR)")
        addr = LOCALHOST  # every rank is on this node
    env = LaunchEnv(rank=_int(environ, rank_var), local_rank=_int(environ, local_rank_var), world_size=world,
                    local_world_size=local, master_addr=addr, master_port=_port(environ, DEFAULT_PORT),
                    source=source)
    return _checked(env, (rank_var, world_var, local_rank_var, local_var or local_vars[0]))


def _from_slurm(environ: Mapping[str, str]) -> LaunchEnv:
    """One srun task per rank.  Step variables win over job ones: a step may use part of the job."""
    world_var = _first_set(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS") or "SLURM_NTASKS"
    world = _int(environ, world_var, minimum=1)
    if world > 1 and _first_set(environ, "SLURM_STEP_ID", "SLURM_STEPID") is None:
        # The batch script also has SLURM_PROCID=0 and SLURM_NTASKS=<allocation>: rank 0 would wait forever.
        raise ValueError(f"SLURM_PROCID is set but SLURM_STEP_ID is not ({world_var}={world}): this is the "
                         "batch shell, not an srun task; start the ranks with srun (launch/slurm_*.sbatch)")
    local_var = _first_set(environ, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE")
    local = None
    if local_var == "SLURM_NTASKS_PER_NODE":
        local = _int(environ, local_var, minimum=1)
    elif local_var is not None:
        node_id = _int(environ, "SLURM_NODEID") if "SLURM_NODEID" in environ else 0
        local = _tasks_on_node(environ[local_var], node_id, local_var)
    addr = environ.get("MASTER_ADDR") or _slurm_master(environ, single_node=world in (1, local))
    job_id = _int(environ, "SLURM_JOB_ID") if "SLURM_JOB_ID" in environ else 0
    # Below Linux's ephemeral ports (32768+); derived, so every task agrees without talking.
    env = LaunchEnv(rank=_int(environ, "SLURM_PROCID"), local_rank=_int(environ, "SLURM_LOCALID"),
                    world_size=world, local_world_size=local, master_addr=addr,
                    master_port=_port(environ, 15000 + job_id % 15000), source="slurm")
    return _checked(env, ("SLURM_PROCID", world_var, "SLURM_LOCALID", local_var or "SLURM_TASKS_PER_NODE"))


def _slurm_master(environ: Mapping[str, str], *, single_node: bool) -> str:
    """Loopback when every task is on this node (needs no DNS), else the step's first host."""
    if single_node:
        return LOCALHOST
    list_var = _first_set(environ, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    if list_var is None:
        raise ValueError("MASTER_ADDR is not set and neither is SLURM_JOB_NODELIST; export MASTER_ADDR")
    return first_host(environ[list_var], var=list_var)


def _tasks_on_node(value: str, node_id: int, var: str) -> int:
    """Entry ``node_id`` of a Slurm task count list such as ``2(x3),1`` (= 2,2,2,1)."""
    counts: list[int] = []
    for item in value.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if match is None:
            raise ValueError(f"{var}={value!r} is not a task count list (expected e.g. 2(x3),1)")
        counts += [int(match[1])] * int(match[2] or 1)
    if node_id >= len(counts):
        raise ValueError(f"SLURM_NODEID={node_id} but {var}={value!r} lists only {len(counts)} nodes")
    return counts[node_id]


def _single(environ: Mapping[str, str]) -> LaunchEnv:
    """Rank 0 of 1, unless the variables say that a multi-process launch went half-way."""
    partial = [v for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if v in environ]
    if partial:
        missing = [v for v in _TORCH_VARS if v not in environ]
        raise ValueError(f"{', '.join(partial)} set but {', '.join(missing)} not: export all of "
                         f"{', '.join(_TORCH_VARS)}, or none of RANK, WORLD_SIZE, LOCAL_RANK")
    marker = next((m for m in _MPI_MARKERS if m in environ), None)
    if marker is not None:
        raise ValueError(f"{marker} is set: an MPI launcher started this process without OMPI_COMM_WORLD_*, "
                         "PMI_RANK + MPI_LOCALRANKID or SLURM_PROCID; use init_distributed() with mpi4py "
                         f"installed, or export {', '.join(_TORCH_VARS)}")
    env = LaunchEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, source="single",
                    master_addr=environ.get("MASTER_ADDR") or LOCALHOST, master_port=_port(environ, 0))
    return _checked(env, ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))


def _first_set(environ: Mapping[str, str], *names: str) -> str | None:
    return next((n for n in names if environ.get(n, "").strip()), None)


def _int(environ: Mapping[str, str], name: str, *, minimum: int = 0) -> int:
    raw = environ.get(name)
    if raw is None:
        raise ValueError(f"{name} is not set: expected an integer >= {minimum}")
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected an integer >= {minimum}") from None
    if value < minimum:
        raise ValueError(f"{name}={value}: expected an integer >= {minimum}")
    return value


def _port(environ: Mapping[str, str], default: int) -> int:
    return _int(environ, "MASTER_PORT") if environ.get("MASTER_PORT", "").strip() else default


def _checked(env: LaunchEnv, names: tuple[str, str, str, str]) -> LaunchEnv:
    """Cross-variable checks; ``names`` = the (rank, world, local rank, local size) variables."""
    rank_var, world_var, local_rank_var, local_var = names
    local = env.local_world_size
    if env.rank >= env.world_size:
        raise ValueError(f"{rank_var}={env.rank}: expected < {world_var}={env.world_size}")
    if local is not None and local > env.world_size:
        raise ValueError(f"{local_var}={local}: expected <= {world_var}={env.world_size}")
    if local is not None and env.local_rank >= local:
        raise ValueError(f"{local_rank_var}={env.local_rank}: expected < {local_var}={local}")
    if env.master_port > 65535 or (env.master_port == 0 and env.world_size > 1):
        raise ValueError(f"MASTER_PORT={env.master_port}: expected a TCP port in 1..65535")
    if not env.master_addr.strip():
        raise ValueError("MASTER_ADDR is empty: expected the host of rank 0")
    return env


def apply_launch_env(env: LaunchEnv, environ: MutableMapping[str, str] = os.environ) -> None:
    """Export ``env`` for torch's env:// and DeepSpeed (which then skips mpi_discovery).  LOCAL_SIZE
    is DeepSpeed's name (CPU device count, shm all-reduce "all ranks local" test), LOCAL_WORLD_SIZE
    torchrun's; both are left alone when the local size is unknown."""
    environ.update(RANK=str(env.rank), LOCAL_RANK=str(env.local_rank), WORLD_SIZE=str(env.world_size),
                   MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    if env.local_world_size is not None:
        environ.update(LOCAL_WORLD_SIZE=str(env.local_world_size), LOCAL_SIZE=str(env.local_world_size))


def mpi4py_discovery(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Place this process with MPI.COMM_WORLD (collective; initializes MPI).  Local rank = ranks
    with this processor name below this one, as DeepSpeed's mpi_discovery.  Master: MASTER_ADDR, else
    127.0.0.1 on one host (DeepSpeed's ``hostname -I`` takes eth0 even then), else rank 0's host."""
    from mpi4py import MPI  # optional dependency: extras "mpi"

    environ = os.environ if environ is None else environ
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    hosts: list[str] = comm.allgather(MPI.Get_processor_name())
    local = hosts.count(hosts[rank])
    env = LaunchEnv(rank=rank, local_rank=hosts[:rank].count(hosts[rank]), world_size=world,
                    local_world_size=local, master_addr=environ.get("MASTER_ADDR") or (
                        LOCALHOST if local == world else hosts[0]),
                    master_port=_port(environ, DEFAULT_PORT), source="mpi4py")
    return _checked(env, ("MPI rank", "MPI size", "MPI local rank", "MPI local size"))


def _unlink_deepspeed_shm(environ: Mapping[str, str]) -> None:
    """Unlink this rank's DeepSpeed shm all-reduce segment (69 MB of /dev/shm per rank when all ranks
    are local; DeepSpeed 0.19 never unlinks it).  The mappings stay valid; nothing reopens the name."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{environ.get('MASTER_ADDR', '')}_"
            f"{environ.get('MASTER_PORT', '')}_{environ.get('RANK', '')}")
    with contextlib.suppress(OSError):
        os.unlink(os.path.join("/dev/shm", name))


DEFAULT_TIMEOUT_S = 600.0
"""Collective timeout of every process group when none is configured (DeepSpeed's 10 minutes)."""


def set_group_timeout(timeout_s: float) -> None:
    """Make ``timeout_s`` the timeout of every process group created from now on: torch's
    ``new_group()`` without a timeout (how DeepSpeed builds its ZeRO data-parallel groups) takes
    ``distributed_c10d``'s module defaults, 30 minutes for gloo whatever the world group got."""
    from torch.distributed import distributed_c10d as c10d

    timeout = datetime.timedelta(seconds=timeout_s)
    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        c10d.default_pg_nccl_timeout = timeout
    # A backstop where the group's own timeout does not fire (a silent peer: distributed/watchdog.py);
    # imported here because this module imports nothing of the package at load time.
    from ..distributed import set_watchdog_timeout

    set_watchdog_timeout(timeout_s)


def resolve_timeout_s(timeout_s: float | None, environ: Mapping[str, str] = os.environ) -> float:
    """``timeout_s``, else ``DEEPSPEED_TIMEOUT`` (minutes, as DeepSpeed reads it), else 600 s."""
    if timeout_s is not None:
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
            raise ValueError(f"timeout_s must be a number of seconds > 0, got {timeout_s!r}")
        return float(timeout_s)
    if environ.get("DEEPSPEED_TIMEOUT"):
        return 60.0 * _int(environ, "DEEPSPEED_TIMEOUT", minimum=1)
    return DEFAULT_TIMEOUT_S


def init_distributed(backend: str | None = None, timeout_s: float | None = None, *,
                     use_deepspeed: bool = True) -> LaunchEnv:
    """Resolve and export the launch environment, then ``deepspeed.init_distributed`` with
    ``auto_mpi_discovery=False`` (``use_deepspeed=False``: torch's ``init_process_group``, gloo on
    CPU and nccl on GPU, DeepSpeed not imported -- for engines that do not need it); one process
    gets a 1-rank group, so collectives work the same.
    ``backend`` None: DeepSpeed picks (gloo on CPU); ``timeout_s`` None: DEEPSPEED_TIMEOUT
    (minutes) or 600 s -- applied to the world group and to every group created later (DeepSpeed's
    ZeRO groups included, see :func:`set_group_timeout`), so a stuck peer fails every collective
    within it.  An existing group is only wrapped (ValueError if its rank or size disagree with
    the launcher)."""
    import torch.distributed as dist

    timeout_s = resolve_timeout_s(timeout_s)
    set_group_timeout(timeout_s)

    env = _from_launcher(os.environ)
    if env is None and any(m in os.environ for m in _MPI_MARKERS) and importlib.util.find_spec("mpi4py"):
        env = mpi4py_discovery()
    env = env if env is not None else _single(os.environ)
    initialized = dist.is_initialized()
    if initialized:
        live = (dist.get_rank(), dist.get_world_size())
        if live != (env.rank, env.world_size):
            raise ValueError(f"the process group is rank {live[0]} of {live[1]} but the launcher "
                             f"({env.source}) says rank {env.rank} of {env.world_size}")
    else:
        if env.master_port == 0:  # one rank: any free port; a fixed one could clash with other jobs
            with socket.socket() as sock:
                sock.bind((env.master_addr, 0))
                env = dataclasses.replace(env, master_port=sock.getsockname()[1])
        apply_launch_env(env)
    timeout = datetime.timedelta(seconds=timeout_s)
    if not use_deepspeed:
        if not initialized:
            import torch

            dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"), timeout=timeout)
        return env
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timeout)
    if not initialized:  # every rank has mapped every shm segment once all pass the barrier
        dist.barrier()
        _unlink_deepspeed_shm(os.environ)
    return env


def exit_cleanly(rc: int) -> NoReturn:
    """Flush, destroy the process group (no barrier), finalize MPI after success, ``os._exit(rc)``.
    Skipping interpreter teardown avoids the exit-time SIGABRT ("terminate called without an active
    exception") of ~9% of DeepSpeed CPU runs, so the exit code is the training's status.  atexit
    handlers do not run: close writers in main.  Codes outside 0..255 become 1 (256 would wrap to 0)."""
    _flush()
    dist = sys.modules.get("torch.distributed")  # not imported: no group to destroy, skip the import
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # teardown must not turn a finished run into a failure
        traceback.print_exc()
    mpi = sys.modules.get("mpi4py.MPI")
    # MPI_Finalize may wait for the other ranks, so a failing rank leaves without it (mpirun then
    # stops the job on the nonzero code); without it a successful rank counts as failed.
    if rc == 0 and mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    logging.shutdown()
    _flush()
    os._exit(rc if 0 <= rc <= 255 else 1)


def run_main(main: Callable[[], int | None]) -> NoReturn:
    """Run ``main`` and exit through exit_cleanly with its return code (None -> 0).  An exception
    prints its traceback (after the rank) and exits 1; SystemExit keeps its code."""
    try:
        rc = main()
    except SystemExit as exc:  # sys.exit() and argparse inside main
        rc = exc.code
        if rc is not None and not isinstance(rc, int):
            print(rc, file=sys.stderr)  # sys.exit("message"): print it and exit 1, as Python does
            rc = 1
    except BaseException:  # KeyboardInterrupt too: the traceback is the only record of the failure
        print(f"[rank {os.environ.get('RANK', '?')}] main failed:", file=sys.stderr)
        traceback.print_exc()
        rc = 1
    exit_cleanly(0 if rc is None else int(rc))


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe must not change the exit code
            stream.flush()
