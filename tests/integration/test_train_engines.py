"""``qgalore-train --engine fsdp2`` and ``--engine ddp`` end to end on CPU ranks (gloo), against
one process with the same global batch: the losses agree within the distributed tests'
tolerance (rtol 1e-4), replicas (and FSDP2's row shards) are checked at the end, a resumed run
continues the curve -- bit-identically after SIGTERM at the same world size (FSDP2, DCP
checkpoint), within the tolerance when the world size changes (DDP's checkpoint of 2 ranks
resumed by 1 process) -- and the data position says no sample is seen twice.  Short runs of a
2-layer model: six launches in all."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from dist_harness import free_port

STEPS = 6
EVERY = 3  # checkpoints at steps 3 and 6
MICRO, ACCUM = 2, 2  # per rank at 2 ranks; the single process takes 4 x 2
TOL = dict(rel=1e-4)  # the tolerance of tests/integration/test_distributed.py


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Fixture corpus, a 2-layer LLaMA, an fp32 ds_config with accumulation, clipping, right
    projections (FSDP2's sharded projection: one single-process reference serves both engines)
    and a projector refresh inside the resumed part (update_proj_gap 4)."""
    from qgalore_dist.train.corpus import builtin_text

    root = tmp_path_factory.mktemp("engines")
    docs = [d for d in builtin_text(max_chars=200_000).split("\n\n") if len(d) > 80]
    with open(root / "corpus.jsonl", "w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    (root / "model.json").write_text(json.dumps(dict(hidden_size=64, intermediate_size=176, num_attention_heads=4,
                                                     num_hidden_layers=2, max_position_embeddings=64)))
    (root / "ds.json").write_text(json.dumps({
        "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ACCUM, "gradient_clipping": 1.0,
        "optimizer": {"type": "QGaLoreAdamW8bit", "params": {"lr": 0.01, "rank": 16, "update_proj_gap": 4,
                                                              "scale": 0.25, "proj_type": "right"}}}))
    return root


def _args(root, run_dir, engine: str, *extra: str) -> list[str]:
    return ["-m", "qgalore_dist.train", "--engine", engine, "--ds_config", str(root / "ds.json"), "--run_dir",
            str(run_dir), "--model.name", str(root / "model.json"), "--data.source", str(root / "corpus.jsonl"),
            "--data.seq_len", "64", "--data.vocab_size", "300", "--data.val_sequences", "16", "--data.cache_dir",
            str(root / "cache"), "--schedule.steps", str(STEPS), "--schedule.warmup_steps", "2", "--eval.every", "0",
            "--checkpoint.every", str(EVERY), "--checkpoint.keep", "4", "--logging.every", "1",
            "--logging.tensorboard", "false", "--logging.plots", "false", *extra]


def _run(root, run_dir, engine: str, ranks: int, *extra: str) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
                 str(free_port())] if ranks > 1 else [sys.executable])
    cmd = launcher + _args(root, run_dir, engine, *extra)
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


def _losses(run_dir) -> dict[int, float]:
    lines = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in lines if r["kind"] == "train"}


def _client_state(ckpt) -> dict:
    """The client state of an engine (safetensors) checkpoint: progress, data, LR schedule."""
    return json.load(open(os.path.join(ckpt, "meta.json")))["client_state"]


@pytest.fixture(scope="module")
def single(workdir):
    """The reference: one process, micro batch 4 (= 2 ranks x 2), ``--engine ddp``."""
    run_dir = workdir / "single"
    log = _run(workdir, run_dir, "ddp", 1, "--ds.train_micro_batch_size_per_gpu", str(2 * MICRO))
    assert "1 ranks, engine ddp" in log
    return _losses(run_dir)


@pytest.fixture(scope="module")
def fsdp2(workdir):
    run_dir = workdir / "fsdp2"
    return run_dir, _run(workdir, run_dir, "fsdp2", 2, "--optim.overlap_comm", "true")  # row reduces in backward


def test_fsdp2_two_ranks_match_one_process(single, fsdp2):
    run_dir, log = fsdp2
    assert "2 ranks, engine fsdp2 on FSDP2 mesh dp_shard 2" in log
    assert "replicas identical, row shards of 14 INT8 weights checked" in log
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert losses[step] == pytest.approx(single[step], **TOL), (step, losses, single)
    from qgalore_dist.checkpoint import CheckpointError, verify_checkpoint

    ckpts = run_dir / "checkpoints"
    assert sorted(t for t in os.listdir(ckpts) if t.startswith("step")) == ["step3", "step6"]
    verify_checkpoint(str(ckpts / "step3"))  # DCP directories carry a manifest too
    assert os.path.exists(ckpts / "step3" / ".metadata")
    damaged = run_dir.parent / "fsdp2_damaged"
    shutil.copytree(ckpts / "step3", damaged)
    shard = damaged / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-1] + bytes([shard.read_bytes()[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="__1_0.distcp fails its SHA-256 check"):
        verify_checkpoint(str(damaged))  # so resume skips it and "already complete" does not trust it
    assert os.path.isfile(run_dir / "final_model" / "model.safetensors")


def test_fsdp2_sigterm_then_resume_is_bit_identical(workdir, fsdp2):
    """SIGTERM to both ranks after step 1 (what SLURM does on preemption): a DCP checkpoint at
    the step they agree on, exit 0; the rerun resumes there and reproduces the uninterrupted
    run's later losses exactly (model, 8-bit moments as stored, projectors, LR schedule and
    data position all came back)."""
    from helpers import sigterm_train_workers

    run_dir, _ = fsdp2
    preempted = workdir / "fsdp2_preempted"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           *_args(workdir, preempted, "fsdp2")]
    log, rc = sigterm_train_workers(cmd, after_step=1, cwd=workdir, env=env)
    assert rc == 0, log[-4000:]
    stopped = int(re.search(r"signal 15: checkpoint saved at step (\d+), exiting", log)[1])
    assert 1 <= stopped < STEPS
    log = _run(workdir, preempted, "fsdp2", 2)
    assert f"resumed at step {stopped}" in log and "row shards of 14 INT8 weights checked" in log
    full, again = _losses(run_dir), _losses(preempted)
    assert sorted(again) == list(range(1, STEPS + 1))
    assert [again[s] for s in range(1, STEPS + 1)] == [full[s] for s in range(1, STEPS + 1)]


def test_ddp_two_ranks_match_one_process_and_resume_on_one(workdir, single):
    """DDP on 2 ranks = one process; its step-3 checkpoint then resumes on ONE process
    (micro batch doubled: the same global batch) and continues within the tolerance, taking
    the samples after the 2-rank run's last ones."""
    run_dir = workdir / "ddp"
    log = _run(workdir, run_dir, "ddp", 2)
    assert "2 ranks, engine ddp" in log and "replicas identical" in log
    losses = _losses(run_dir)
    for step in range(1, STEPS + 1):
        assert losses[step] == pytest.approx(single[step], **TOL), (step, losses, single)
    state = _client_state(run_dir / "checkpoints" / "step3")
    assert state["progress"]["step"] == 3
    assert [d["position"] for d in state["data"]] == [3 * ACCUM * 2 * MICRO] * 2  # samples consumed, all ranks
    assert state["lr_scheduler"]["last_epoch"] == 3
    resumed = workdir / "ddp_on_one"
    shutil.copytree(run_dir / "checkpoints" / "step3", resumed / "checkpoints" / "step3")
    log = _run(workdir, resumed, "ddp", 1, "--ds.train_micro_batch_size_per_gpu", str(2 * MICRO))
    assert "resumed at step 3" in log
    again = _losses(resumed)
    assert sorted(again) == [4, 5, 6]
    for step in (4, 5, 6):
        assert again[step] == pytest.approx(single[step], **TOL), (step, again, single)
