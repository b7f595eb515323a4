"""Training across two emulated nodes through the real launchers: the deepspeed launcher over
pdsh/ssh, Slurm's sbatch (both scripts in launch/), OpenMPI's mpirun; a node lost mid-run; Slurm
preemption; a node unreachable at start.  See conftest.py for how to run these."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest
from cluster_harness import (
    CLUSTER_SH,
    FORWARDED,
    REPO,
    STEPS,
    deepspeed_cmd,
    free_port,
    last_step,
    losses,
    on_node,
    rank_env,
    run,
    sbatch,
    train_args,
    wait_job,
    wait_until,
)

REL_TOL = 1e-4  # tests/integration/test_deepspeed.py's loss tolerance for ZeRO-2 bf16 (the runs here agree exactly)
RESHARD_TOL = 5e-3  # resumed on another world size, per step relative to the uninterrupted run
LOSS_WALL_S = 120  # a surviving rank must be gone this soon after its peer node is lost
RANK_CMD = r"^\S*python\S*\s+-m qgalore_dist\.train"  # a rank, not the launcher that has it in its arguments


def _check_run(run_dir, log: str, reference: dict[int, float], launched_by: str) -> None:
    """A complete 2-rank run on node1 + node2 whose losses match ``reference``."""
    assert "[qgalore] hosts: rank0=node1 rank1=node2" in log, log[-3000:]
    assert f"launched by {launched_by}: 2 ranks, ZeRO stage 2, bf16" in log, log[-3000:]
    assert "replicas identical" in log and "run summary" in log, log[-3000:]
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    worst = max(abs(got[s] - reference[s]) / abs(reference[s]) for s in reference)
    assert worst <= REL_TOL, (worst, got, reference)


@pytest.fixture(scope="module")
def two_nodes(work):
    """The reference: ``launch/deepspeed.sh`` with the hostfile, one rank on each node."""
    run_dir = work / "ds_2nodes"
    cmd, env = deepspeed_cmd(work, run_dir, hostfile=True, num_gpus=1)
    proc = run(cmd, env=env, cwd=work, timeout=600)  # the first run may JIT-compile DeepSpeed's CPU op
    assert proc.returncode == 0, proc.stdout[-5000:]
    return run_dir, proc.stdout, losses(run_dir)


def test_deepspeed_hostfile_two_nodes_equals_one_node_two_ranks(work, two_nodes):
    run_dir, log, _ = two_nodes
    # pdsh prefixes each remote line with its node: both launchers ran, one per node.
    assert re.search(r"^node1: .*launch\.py.*node_rank=0", log, re.MULTILINE), log[-3000:]
    assert re.search(r"^node2: .*launch\.py.*node_rank=1", log, re.MULTILINE), log[-3000:]
    one_node = work / "ds_1node"
    cmd, env = deepspeed_cmd(work, one_node, hostfile=False, num_gpus=2)
    proc = run(cmd, env=env, cwd=work, timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert "[qgalore] hosts: rank0=node1 rank1=node1" in proc.stdout
    _check_run(run_dir, log.replace("node1: ", ""), losses(one_node), "deepspeed/torchrun (RANK, WORLD_SIZE)")


@pytest.mark.parametrize("script, launched_by", [("slurm_srun.sbatch", "srun (SLURM_*)"),
                                                 ("slurm_torchrun.sbatch", "deepspeed/torchrun (RANK, WORLD_SIZE)")])
def test_sbatch_two_nodes(work, two_nodes, script, launched_by):
    run_dir = work / script.replace(".", "_")
    job = sbatch(work, script, train_args(work, run_dir), env_extra={"GPUS_PER_NODE": "1"}, tag=script)
    state = wait_job(job)
    log = (work / f"{script}-{job}.out").read_text()
    assert state == "COMPLETED", (state, log[-5000:])
    _check_run(run_dir, log, two_nodes[2], launched_by)


def test_mpirun_two_nodes(work, two_nodes):
    run_dir = work / "mpirun"
    (work / "mpihosts").write_text("node1 slots=1\nnode2 slots=1\n")
    env = {**rank_env(), "NP": "2", "MPI_HOSTFILE": str(work / "mpihosts"), "MASTER_ADDR": "node1",
           "MASTER_PORT": str(free_port()), "MPIRUN_ARGS": " ".join(f"-x {k}" for k in FORWARDED if k != "PATH")}
    proc = on_node("node1", [str(REPO / "launch" / "mpirun.sh"), *train_args(work, run_dir)], env=env, cwd=work,
                   timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:]
    _check_run(run_dir, proc.stdout, two_nodes[2], "mpirun (OMPI_*)")


def _node_pids(node: str, pattern: str) -> list[int]:
    """Processes in ``node``'s network namespace whose command line matches ``pattern``."""
    out = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True, timeout=10, check=True).stdout
    pids = []
    for pid in map(int, out.split()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if re.search(pattern, cmdline):
            pids.append(pid)
    return pids


def test_node_loss_fails_fast_then_resumes_on_one_node(work, two_nodes):
    """SIGKILL node2's rank mid-run: rank 0 on node1 must fail within LOSS_WALL_S naming the lost
    peer, and the launcher exit non-zero.  Then node1 alone (1 rank, 2 micro-batches per step: the
    same global batch) resumes from the newest checkpoint and follows the 2-node loss curve."""
    run_dir = work / "node_loss"
    # The kill after step 11: a checkpoint (step 10) exists, and 49 steps of margin before the run would end.
    cmd, env = deepspeed_cmd(work, run_dir, hostfile=True, num_gpus=1)
    log_path = work / "node_loss.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, env=env, cwd=work, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            killed_at = wait_until("step 11 of the 2-node run", lambda: (s := last_step(run_dir)) >= 11 and s, 300)
            victims = _node_pids("node2", RANK_CMD)
            assert len(victims) == 1, victims
            os.kill(victims[0], signal.SIGKILL)
            start = time.monotonic()
            rc = proc.wait(timeout=LOSS_WALL_S + 60)
            took = time.monotonic() - start
        finally:
            if proc.poll() is None:
                proc.kill()
    log = log_path.read_text()
    print(f"node loss: rank killed after step {killed_at}; launcher exited rc={rc} after {took:.1f} s")
    assert rc != 0 and took <= LOSS_WALL_S, (rc, took, log[-4000:])
    wait_until("node1's rank to be gone", lambda: not _node_pids("node1", RANK_CMD), 20, 0.5)
    # The survivor's error names the peer it lost: gloo's "Read error [10.213.0.2]:port: Connection reset
    # by peer" (or "Connection closed by peer [10.213.0.2]"), inside the package's "qgalore-dist: <op>
    # failed at optimizer step N on rank 0 of 2" when the collective was the package's own, under a
    # traceback through DeepSpeed's collective otherwise (the kill lands at any point of a step).
    lost = [line for line in log.splitlines() if line.startswith("node1:") and "10.213.0.2" in line
            and re.search(r"Connection (closed|reset) by peer", line)]
    assert lost, log[-4000:]
    ckpts = sorted(int(t[4:]) for t in os.listdir(run_dir / "checkpoints") if re.fullmatch(r"step\d+", t))
    assert ckpts and ckpts[-1] < STEPS, ckpts

    cmd, env = deepspeed_cmd(work, run_dir, hostfile=False, num_gpus=1, extra=["--ds.gradient_accumulation_steps", "2"])
    resumed = run(cmd, env=env, cwd=work, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-5000:]
    match = re.search(r"resumed at step (\d+)", resumed.stdout)
    assert match and int(match[1]) == ckpts[-1], resumed.stdout[-3000:]
    assert "launched by deepspeed/torchrun (RANK, WORLD_SIZE): 1 ranks" in resumed.stdout
    got, reference = losses(run_dir), two_nodes[2]
    assert sorted(got) == list(range(1, STEPS + 1))
    first = int(match[1]) + 1
    if first == 11:
        # The first resumed loss is the step-10 checkpoint's model on the same 8 samples: exact, so
        # the state came back whole.  (Not asserted for other checkpoints: from the step-5 one,
        # 2 -> 1 ranks gives a first loss 1.5% off while 2 -> 2 is exact; see launch/README.md.)
        assert got[first] == pytest.approx(reference[first], rel=1e-6), (first, got[first], reference[first])
    # Then 2 micro-batches accumulated in bf16 on one rank vs all-reduced over two round differently;
    # the curves drift apart slowly (measured max 8.1e-4 over steps 11-40) but do not diverge.
    worst = max(abs(got[s] - reference[s]) / reference[s] for s in range(first, STEPS + 1))
    print(f"node loss: resumed at step {first - 1} on 1 rank; worst relative loss difference {worst:.2e}")
    assert worst <= RESHARD_TOL, (worst, {s: (got[s], reference[s]) for s in range(first, STEPS + 1)})


def test_slurm_preemption_checkpoints_and_resubmission_resumes(work):
    """TERM to the batch shell (what --signal=B:TERM@60 does before the time limit; the script
    forwards it), then a plain ``scancel --signal=TERM``: each job checkpoints and ends COMPLETED;
    the third submission resumes and finishes."""
    steps = 120  # long enough that the signal lands mid-run
    run_dir = work / "preempted"
    args = train_args(work, run_dir, steps=steps, every=0)
    stopped = []
    for scancel in (["--batch", "--signal=TERM"], ["--signal=TERM"]):
        before = last_step(run_dir)
        job = sbatch(work, "slurm_srun.sbatch", args, tag="preempt")
        wait_until(f"job {job} to train 3 steps", lambda b=before: last_step(run_dir) >= b + 3, 300, 0.2)
        assert on_node("node1", ["scancel", *scancel, job], timeout=30).returncode == 0
        state = wait_job(job, timeout=180)
        log = (work / f"preempt-{job}.out").read_text()
        assert state == "COMPLETED", (scancel, state, log[-4000:])
        match = re.search(r"signal 15: checkpoint saved at step (\d+), exiting", log)
        assert match and before < int(match[1]) < steps, (scancel, log[-4000:])
        if before:
            assert f"resumed at step {before}" in log, log[-3000:]
        if "--batch" in scancel:
            assert "[slurm] TERM: forwarding to the ranks" in log, log[-3000:]
        stopped.append(int(match[1]))
    job = sbatch(work, "slurm_srun.sbatch", args, tag="preempt")
    state = wait_job(job, timeout=300)
    log = (work / f"preempt-{job}.out").read_text()
    assert state == "COMPLETED" and f"resumed at step {stopped[-1]}" in log, (state, log[-4000:])
    assert sorted(losses(run_dir)) == list(range(1, steps + 1))


def test_unreachable_node_fails_fast_with_the_host_named(work):
    run_dir = work / "unreachable"
    assert run([CLUSTER_SH, "sshd", "node2", "stop"], timeout=30).returncode == 0
    try:
        cmd, env = deepspeed_cmd(work, run_dir, hostfile=True, num_gpus=1)
        start = time.monotonic()
        proc = run(cmd, env=env, cwd=work, timeout=120)
        took = time.monotonic() - start
    finally:
        assert run([CLUSTER_SH, "sshd", "node2", "start"], timeout=60).returncode == 0
    assert proc.returncode != 0 and took < 30, (proc.returncode, took, proc.stdout[-3000:])
    assert "cannot ssh (passwordless, 10 s timeout) to node2 from node1" in proc.stdout, proc.stdout[-3000:]
    assert not (run_dir / "metrics.jsonl").exists()  # nothing started


def test_link_is_shaped_and_nodes_resolve_each_other(work):
    """The veth ends carry the token-bucket filter `up` asked for, and each node resolves both
    names to the subnet addresses (what MASTER_ADDR=node1 and gloo rely on)."""
    for node, link in (("node1", "qgc-veth1"), ("node2", "qgc-veth2")):
        qdisc = on_node(node, ["tc", "qdisc", "show", "dev", link], timeout=20).stdout
        assert re.search(r"qdisc tbf .* rate 10Gbit", qdisc), qdisc
        hosts = on_node(node, ["getent", "hosts", "node1", "node2"], timeout=20).stdout.split()
        assert hosts[:2] == ["10.213.0.1", "node1"] and hosts[2:4] == ["10.213.0.2", "node2"], hosts


def test_cluster_script_refuses_without_root():
    # The script on stdin and cwd /: user nobody may not be able to read the checkout.
    with open(CLUSTER_SH) as script:
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", "-s", "up"],
                              stdin=script, capture_output=True, text=True, timeout=30, cwd="/", check=False)
    assert proc.returncode != 0 and "must run as root" in proc.stderr, (proc.stdout, proc.stderr)



def test_link_down_fails_within_the_process_group_timeout(work):
    """Pull node2's cable (its veth end down: packets stop, no reset reaches node1) mid-run: rank 0
    on node1 must fail within LOSS_WALL_S (the process-group timeout here is DEEPSPEED_TIMEOUT = 1
    min; gloo's own timeout was seen not to fire for a silent peer, and the package's watchdog ends
    the rank at 1.25 x 60 + 5 = 80 s) naming the collective it was waiting in, and the launcher
    exit non-zero.  Last in this
    file: Slurm may mark node2 down meanwhile; the test waits until the cluster is whole again."""
    run_dir = work / "link_down"
    cmd, env = deepspeed_cmd(work, run_dir, hostfile=True, num_gpus=1)
    log_path = work / "link_down.log"
    rc = took = None
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, env=env, cwd=work, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            pulled_at = wait_until("step 11 of the 2-node run", lambda: (s := last_step(run_dir)) >= 11 and s, 300)
            assert run([CLUSTER_SH, "link", "node2", "down"], timeout=30).returncode == 0
            start = time.monotonic()
            try:
                rc = proc.wait(timeout=LOSS_WALL_S + 10)
                took = time.monotonic() - start
            except subprocess.TimeoutExpired:
                pass
            hung_at = last_step(run_dir)
        finally:
            if proc.poll() is None:
                proc.kill()
            up = run([CLUSTER_SH, "link", "node2", "up"], timeout=30)
            # Ranks that outlived the launcher (a hang resumes once the link is back, or times out): bounded
            # wait, then SIGKILL by pid; then the cluster must be whole again (ssh, Slurm has node2 back).
            try:
                wait_until("the ranks to be gone", lambda: not (_node_pids("node1", RANK_CMD) or
                                                               _node_pids("node2", RANK_CMD)), 90, 0.5)
            except AssertionError:
                for node in ("node1", "node2"):
                    for pid in _node_pids(node, RANK_CMD):
                        os.kill(pid, signal.SIGKILL)
            wait_until("scripts/cluster.sh status to pass",
                       lambda: run([CLUSTER_SH, "status"], timeout=60).returncode == 0, 180, 2.0)
    assert up.returncode == 0, up.stdout
    log = log_path.read_text()
    print(f"link down: pulled after step {pulled_at}; launcher rc={rc} after {took} s")
    assert took is not None, (f"rank 0 still running {LOSS_WALL_S + 10} s after node2's link went down "
                              f"(last logged step {hung_at}): no process-group timeout fired", log[-3000:])
    assert rc != 0 and took <= LOSS_WALL_S, (rc, took, log[-4000:])
    survivor = "\n".join(line for line in log.splitlines() if line.startswith("node1:"))
    # gloo reports the timeout ("Timed out waiting ...ms for recv operation"); the operation is named
    # by the package ("qgalore-dist: <op> (<kind>) failed at optimizer step N on rank 0 of 2") when the
    # collective was its own, else by the traceback through DeepSpeed's collective.
    assert re.search(r"[Tt]imed out|[Tt]imeout", survivor), log[-4000:]
    named = re.search(r"qgalore-dist: (\S+) \(\w+\) failed at optimizer step \d+ on rank 0 of 2", survivor)
    frames = re.findall(r"in (all_reduce|reduce_scatter\w*|all_gather\w*|broadcast\w*|reduce|barrier|all_to_all\w*)$",
                        survivor, re.MULTILINE)
    assert named or frames, log[-4000:]
    print(f"link down: survivor failed in {named[1] if named else frames[-1]}")
