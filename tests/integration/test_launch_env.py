"""Launcher environment discovery (qgalore_dist.integrations.launch) and the launch/ scripts.

Pure mappings: what torchrun / the deepspeed launcher / srun / mpirun / mpiexec export, mapped to
RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT; hostlist expansion; errors
that name the offending variable.  End to end: two plain python processes with srun's variables,
launch/deepspeed.sh and launch/mpirun.sh each form a 2-rank gloo group whose all_reduce of the
ranks is 1; run_main's exit codes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import MappingProxyType

import pytest

from qgalore_dist.integrations.launch import LaunchEnv, apply_launch_env, first_host, resolve_launch_env

REPO = Path(__file__).resolve().parents[2]
# The launch scripts call deepspeed / mpirun / python from PATH: put this interpreter's venv first.
PATH = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
TIMEOUT_S = 300  # a fresh TORCH_EXTENSIONS_DIR JIT-builds DeepSpeed's shm op (25-110 s) on first init


def srun_env(rank: int, *, ntasks: int = 2, per_node: str = "2", node_id: int = 0, local_id: int | None = None,
             nodelist: str = "node07", job_id: int = 4242) -> dict[str, str]:
    """What srun exports to task ``rank`` of a step (Slurm's env_array_for_step + slurmstepd)."""
    return {
        "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank if local_id is None else local_id),
        "SLURM_NODEID": str(node_id), "SLURM_NTASKS": str(ntasks), "SLURM_NPROCS": str(ntasks),
        "SLURM_NTASKS_PER_NODE": per_node.split("(")[0].split(",")[0], "SLURM_TASKS_PER_NODE": per_node,
        "SLURM_STEP_TASKS_PER_NODE": per_node, "SLURM_STEP_NUM_TASKS": str(ntasks),
        "SLURM_JOB_NODELIST": nodelist, "SLURM_NODELIST": nodelist, "SLURM_STEP_NODELIST": nodelist,
        "SLURM_JOB_ID": str(job_id), "SLURM_JOBID": str(job_id), "SLURM_STEP_ID": "0", "SLURM_STEPID": "0",
    }


# ---------------------------------------------------------------------------------------------
# pure mappings


def test_deepspeed_launcher_env():
    # exactly what `deepspeed --num_gpus 2` set for rank 1 (distributed-integration.md 2.3)
    environ = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": "29500", "CROSS_RANK": "0", "CROSS_SIZE": "1"}
    assert resolve_launch_env(MappingProxyType(environ)) == LaunchEnv(
        rank=1, local_rank=1, world_size=2, local_world_size=2, master_addr="127.0.0.1", master_port=29500,
        source="env")


def test_torchrun_env_wins_over_slurm_and_local_size_may_be_unknown():
    # srun torchrun: the task also carries SLURM_PROCID=0 of a 2-task step, but torchrun's RANK counts.
    environ = {**srun_env(0, ntasks=2), "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
               "MASTER_ADDR": "node07", "MASTER_PORT": "29400"}
    assert resolve_launch_env(environ) == LaunchEnv(rank=5, local_rank=1, world_size=8, local_world_size=4,
                                                 master_addr="node07", master_port=29400, source="env")
    del environ["LOCAL_WORLD_SIZE"]
    assert resolve_launch_env(environ).local_world_size is None


@pytest.mark.parametrize("rank", [0, 1])
def test_slurm_two_tasks_one_node(rank):
    env = resolve_launch_env(MappingProxyType(srun_env(rank)))
    # one node: loopback, which needs no DNS; port derived from the job id so all tasks agree
    assert env == LaunchEnv(rank=rank, local_rank=rank, world_size=2, local_world_size=2, master_addr="127.0.0.1",
                         master_port=15000 + 4242, source="slurm")


def test_slurm_two_nodes_uses_first_host_of_the_step():
    environ = srun_env(3, ntasks=4, per_node="2(x2)", node_id=1, local_id=1, nodelist="gpu-a[3,5]-ib")
    assert resolve_launch_env(environ) == LaunchEnv(rank=3, local_rank=1, world_size=4, local_world_size=2,
                                                 master_addr="gpu-a3-ib", master_port=19242, source="slurm")
    # A step on part of the job: the step's task count and node list win over the allocation's.
    environ.update(SLURM_NTASKS="8", SLURM_JOB_NODELIST="n[1-4]", SLURM_STEP_NODELIST="n[3-4]",
                   MASTER_PORT="31000")
    env = resolve_launch_env(environ)
    assert (env.world_size, env.master_addr, env.master_port) == (4, "n3", 31000)
    # uneven layout 3,1: node 1 has one task
    environ.update(SLURM_STEP_TASKS_PER_NODE="3,1", SLURM_PROCID="3", SLURM_LOCALID="0")
    assert resolve_launch_env(environ).local_world_size == 1


@pytest.mark.parametrize("local_size,master", [("2", "127.0.0.1"), ("1", None)], ids=["one-node", "two-nodes"])
def test_openmpi(local_size, master):
    environ = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
               "OMPI_COMM_WORLD_LOCAL_SIZE": local_size, "PMIX_RANK": "1"}
    if master is None:  # ranks on two nodes: only the user knows rank 0's host
        with pytest.raises(ValueError, match="MASTER_ADDR is not set.*OMPI_COMM_WORLD_SIZE=2"):
            resolve_launch_env(environ)
        environ["MASTER_ADDR"] = master = "node01"
    # mpirun inside a Slurm allocation: the inherited SLURM_* describe its daemons, not the ranks
    environ.update(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0")
    assert resolve_launch_env(environ) == LaunchEnv(
        rank=1, local_rank=0, world_size=2, local_world_size=int(local_size), master_addr=master, master_port=29500,
        source="ompi")


def test_mpich_pmi():
    environ = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2",
               "MASTER_ADDR": "h1", "MASTER_PORT": "23456"}
    assert resolve_launch_env(environ) == LaunchEnv(rank=2, local_rank=0, world_size=4, local_world_size=2,
                                                 master_addr="h1", master_port=23456, source="pmi")


def test_single_process():
    assert resolve_launch_env({}) == LaunchEnv(rank=0, local_rank=0, world_size=1, local_world_size=1,
                                            master_addr="127.0.0.1", master_port=0, source="single")
    assert resolve_launch_env({"MASTER_PORT": "29555"}).master_port == 29555


def test_apply_launch_env_round_trips_and_skips_unknown_local_size():
    target: dict[str, str] = {}
    env = resolve_launch_env(srun_env(1))
    apply_launch_env(env, target)
    assert target == {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "LOCAL_SIZE": "2",
                      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "19242"}
    assert resolve_launch_env(target) == dataclasses.replace(env, source="env")
    target = {}
    apply_launch_env(dataclasses.replace(env, local_world_size=None), target)
    assert "LOCAL_SIZE" not in target and "LOCAL_WORLD_SIZE" not in target


@pytest.mark.parametrize("nodelist,host", [
    ("node[01-04,07]", "node01"), ("gpu-a[3,5]-ib", "gpu-a3-ib"), ("n1,n2", "n1"), ("host[001-010]", "host001"),
    ("r[1-2]-n[08-09],x7", "r1-n08"), ("node[7,01-04]", "node7"), ("localhost", "localhost"), (" n[2-3] ", "n2"),
])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


@pytest.mark.parametrize("nodelist", ["node[01-04", "a]b", "", "n[x-y]", "n[]"])
def test_first_host_rejects_malformed(nodelist):
    with pytest.raises(ValueError, match=r"SLURM_STEP_NODELIST=.*not a Slurm hostlist"):
        first_host(nodelist, var="SLURM_STEP_NODELIST")


TORCH_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("environ,message", [
    ({**TORCH_ENV, "RANK": "x"}, r"RANK='x': expected an integer"),
    ({**TORCH_ENV, "RANK": "2"}, r"RANK=2: expected < WORLD_SIZE=2"),
    ({**TORCH_ENV, "WORLD_SIZE": "0"}, r"WORLD_SIZE=0: expected an integer >= 1"),
    ({**TORCH_ENV, "MASTER_PORT": "70000"}, r"MASTER_PORT=70000"),
    ({**TORCH_ENV, "MASTER_ADDR": ""}, r"MASTER_ADDR is empty"),
    ({"RANK": "1", "WORLD_SIZE": "2"}, r"RANK, WORLD_SIZE set but MASTER_ADDR, MASTER_PORT, LOCAL_RANK not"),
    ({**srun_env(2)}, r"SLURM_PROCID=2: expected < SLURM_STEP_NUM_TASKS=2"),
    ({**srun_env(1, local_id=2)}, r"SLURM_LOCALID=2: expected < SLURM_STEP_TASKS_PER_NODE=2"),
    ({k: v for k, v in srun_env(0).items() if k != "SLURM_LOCALID"}, r"SLURM_LOCALID is not set"),
    ({**srun_env(0), "SLURM_STEP_NUM_TASKS": "two"}, r"SLURM_STEP_NUM_TASKS='two'"),
    ({**srun_env(0), "SLURM_STEP_TASKS_PER_NODE": "2(x"}, r"SLURM_STEP_TASKS_PER_NODE='2\(x' is not a task count"),
    ({**srun_env(0, ntasks=4, per_node="2(x2)", node_id=2)}, r"SLURM_NODEID=2 but SLURM_STEP_TASKS_PER_NODE"),
    (srun_env(0, ntasks=4, per_node="2(x2)", nodelist="n[1-2"),
     r"SLURM_STEP_NODELIST='n\[1-2' is not a Slurm hostlist"),
    # the batch script: SLURM_PROCID=0 of the allocation's 4 tasks, but no srun step
    ({k: v for k, v in srun_env(0, ntasks=4, per_node="2(x2)").items() if "STEP" not in k},
     r"SLURM_STEP_ID is not \(SLURM_NTASKS=4\)"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "-1",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, r"OMPI_COMM_WORLD_LOCAL_RANK=-1: expected an integer >= 0"),
    ({"PMIX_RANK": "0"}, r"PMIX_RANK is set: an MPI launcher"),
])
def test_errors_name_the_variable(environ, message):
    with pytest.raises(ValueError, match=message):
        resolve_launch_env(environ)


# ---------------------------------------------------------------------------------------------
# end to end: real processes, gloo on loopback

CHILD = r'''
import dataclasses, json, os, sys
from qgalore_dist.integrations.launch import init_distributed, mpi4py_discovery, run_main

def main() -> int:
    import torch
    import torch.distributed as dist
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    found = dataclasses.asdict(mpi4py_discovery()) if mode == "mpi4py" else None
    env = init_distributed(backend="gloo", timeout_s=60)
    total = torch.tensor([env.rank])
    dist.all_reduce(total)
    exported = {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_PORT")}
    result = {"env": dataclasses.asdict(env), "sum": int(total), "exported": exported, "mpi4py": found}
    with open(os.path.join(os.environ["LE_OUT"], f"rank{env.rank}.json"), "w") as f:
        json.dump(result, f)
    if mode == "fail":
        raise RuntimeError("boom after all_reduce")
    return 0

run_main(main)
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This process's environment without any launcher's variables (pytest may itself run under one)."""
    launcher = ("SLURM_", "OMPI_COMM_WORLD_", "PMI_", "PMIX_", "MV2_", "PALS_")
    names = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in names and not k.startswith(launcher)}
    env.update(LE_OUT=str(tmp_path), PATH=PATH, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", **extra)
    return env


def run_all(commands: list[tuple[list[str], dict[str, str]]]) -> list[subprocess.CompletedProcess]:
    """Start every command, wait for all with one deadline, kill the rest on timeout."""
    procs = [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd, env in commands]
    try:
        outs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"launch did not finish in {TIMEOUT_S} s")
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def results(tmp_path: Path, world: int) -> list[dict]:
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def test_slurm_variables_two_processes_end_to_end(tmp_path):
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    port = free_port()  # as launch/slurm_srun.sbatch exports it
    runs = run_all([([sys.executable, str(child)],
                     clean_env(tmp_path, MASTER_PORT=str(port), **srun_env(r, nodelist="localhost")))
                    for r in range(2)])
    assert [r.returncode for r in runs] == [0, 0], [r.stderr[-2000:] for r in runs]
    for rank, res in enumerate(results(tmp_path, 2)):
        assert res["sum"] == 1
        assert res["env"] == dict(rank=rank, local_rank=rank, world_size=2, local_world_size=2,
                                  master_addr="127.0.0.1", master_port=port, source="slurm")
        assert res["exported"] == {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_SIZE": "2",
                                   "MASTER_PORT": str(port)}
    # init_distributed unlinks DeepSpeed's 69 MB shm all-reduce segments, which DeepSpeed leaves behind
    if Path("/dev/shm").is_dir():
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*"))


def test_failing_main_exits_nonzero_after_one_rank_group(tmp_path):
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    (run,) = run_all([([sys.executable, str(child), "fail"], clean_env(tmp_path))])
    assert run.returncode == 1
    assert "[rank 0] main failed" in run.stderr and "RuntimeError: boom after all_reduce" in run.stderr
    (res,) = results(tmp_path, 1)  # one process still got a working 1-rank group on a free port
    assert res["sum"] == 0 and res["env"]["source"] == "single" and res["env"]["master_port"] > 0


# Loads launch_env.py by path: the package's __init__ imports torch (3 s), the module needs nothing.
RUN_MAIN = r'''
import importlib.util, sys
spec = importlib.util.spec_from_file_location("launch_env", sys.argv[2])
launch_env = sys.modules["launch_env"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(launch_env)

def main():
    mode = sys.argv[1]
    print("partial output", end="")  # no newline: os._exit must not drop the buffer
    if mode == "raise":
        raise RuntimeError("boom")
    if mode == "exit-message":
        sys.exit("bad config")
    return {"return-3": 3, "return-none": None, "return-256": 256}[mode]

launch_env.run_main(main)
'''


@pytest.mark.parametrize("mode,rc,stderr", [
    ("raise", 1, "RuntimeError: boom"), ("exit-message", 1, "bad config"), ("return-3", 3, ""),
    ("return-none", 0, ""), ("return-256", 1, ""),  # os._exit(256) would report success
])
def test_run_main_exit_codes(tmp_path, mode, rc, stderr):
    module = REPO / "qgalore_dist" / "integrations" / "launch.py"
    run = subprocess.run([sys.executable, "-c", RUN_MAIN, mode, str(module)], env=clean_env(tmp_path),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == rc
    assert run.stdout == "partial output"
    assert stderr in run.stderr
    assert ("Traceback" in run.stderr) == (mode == "raise")


@pytest.mark.skipif(shutil.which("deepspeed", path=PATH) is None, reason="deepspeed launcher not on PATH")
def test_deepspeed_sh_two_ranks(tmp_path):
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    port = free_port()
    env = clean_env(tmp_path, NUM_GPUS="2", MASTER_PORT=str(port), TRAIN=f"{sys.executable} {child}")
    (run,) = run_all([(["bash", str(REPO / "launch" / "deepspeed.sh")], env)])
    assert run.returncode == 0, run.stderr[-3000:]
    for rank, res in enumerate(results(tmp_path, 2)):
        assert res["sum"] == 1
        assert res["env"] == dict(rank=rank, local_rank=rank, world_size=2, local_world_size=2,
                                  master_addr="127.0.0.1", master_port=port, source="env")


needs_mpirun = pytest.mark.skipif(shutil.which("mpirun", path=PATH) is None,
                                  reason="mpirun not installed (pip install .[mpi])")


@needs_mpirun
def test_mpirun_sh_two_ranks(tmp_path):
    # With mpi4py, every rank also places itself with MPI.COMM_WORLD (and exit_cleanly finalizes MPI).
    mode = "mpi4py" if importlib.util.find_spec("mpi4py") else "ompi"
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    port = free_port()
    env = clean_env(tmp_path, NP="2", MASTER_PORT=str(port), TRAIN=f"{sys.executable} {child} {mode}",
                    MPIRUN_ARGS="--oversubscribe")
    (run,) = run_all([(["bash", str(REPO / "launch" / "mpirun.sh")], env)])
    assert run.returncode == 0, run.stderr[-3000:]
    for rank, res in enumerate(results(tmp_path, 2)):
        expected = dict(rank=rank, local_rank=rank, world_size=2, local_world_size=2, master_addr="127.0.0.1",
                        master_port=port, source="ompi")
        assert res["sum"] == 1 and res["env"] == expected
        assert res["mpi4py"] == (None if mode == "ompi" else {**expected, "source": "mpi4py"})
