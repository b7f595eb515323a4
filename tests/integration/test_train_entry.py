"""``qgalore-train`` end to end with 2 CPU ranks on fixture text: the loss falls, validation
perplexity is exp(mean token loss) recomputed independently from the exported model, SIGTERM
checkpoints and exits 0, the resumed run continues the uninterrupted loss curve exactly, the
plots are valid PNGs, and bad input fails clearly on every rank."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from dist_harness import free_port
from helpers import sigterm_train_workers

STEPS = 16


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Fixture corpus (real English: stdlib docstrings), a 2-layer LLaMA config and a fp32
    ZeRO-2 ds_config with gradient accumulation and frequent projector refreshes."""
    from qgalore_dist.train.corpus import builtin_text

    root = tmp_path_factory.mktemp("train")
    docs = [d for d in builtin_text(max_chars=250_000).split("\n\n") if len(d) > 80]
    with open(root / "corpus.jsonl", "w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    (root / "model.json").write_text(json.dumps(dict(hidden_size=64, intermediate_size=176, num_attention_heads=4,
                                                     num_hidden_layers=2, max_position_embeddings=64)))
    (root / "ds.json").write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2}, "steps_per_print": 10**9,
        "optimizer": {"type": "QGaLoreAdamW8bit", "params": {"lr": 0.01, "rank": 16, "update_proj_gap": 5,
                                                              "scale": 0.25}}}))
    return root


def _args(root, run_dir: str) -> list[str]:
    return ["--ds_config", str(root / "ds.json"), "--run_dir", run_dir, "--model.name", str(root / "model.json"),
            "--data.source", str(root / "corpus.jsonl"), "--data.seq_len", "64", "--data.vocab_size", "300",
            "--data.val_sequences", "16", "--data.cache_dir", str(root / "cache"), "--schedule.steps", str(STEPS),
            "--schedule.warmup_steps", "3", "--eval.every", "8", "--checkpoint.every", "8", "--logging.every", "4"]


def _env() -> dict:
    # torchrun sets OMP_NUM_THREADS=1 and the deepspeed launcher does not; the same thread count
    # everywhere makes the two launchers' runs comparable bit for bit.
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _metrics(run_dir) -> tuple[dict[int, float], list[dict]]:
    lines = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    train = {r["step"]: r["loss"] for r in lines if r["kind"] == "train"}
    return train, [r for r in lines if r["kind"] == "eval"]


@pytest.fixture(scope="module")
def full_run(workdir):
    """The uninterrupted reference run, under the deepspeed launcher."""
    run_dir = str(workdir / "full")
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "qgalore_dist.train",
           *_args(workdir, run_dir)]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=420, env=_env())
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return run_dir, log


def test_trains_evaluates_checkpoints_and_summarizes(full_run):
    run_dir, log = full_run
    assert "2 ranks, ZeRO stage 2" in log and "replicas identical" in log
    losses, evals = _metrics(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert sum(losses[s] for s in range(13, 17)) / 4 < sum(losses[s] for s in range(1, 5)) / 4 - 0.3
    assert [e["step"] for e in evals] == [8, 16]
    for e in evals:
        assert math.isfinite(e["val_ppl"]) and e["val_ppl"] == pytest.approx(math.exp(e["val_loss"]), rel=1e-12)
    assert evals[1]["val_loss"] < evals[0]["val_loss"]
    assert re.search(r"step\s+16\s+loss", log) and "val_ppl" in log
    from qgalore_dist.checkpoint import verify_checkpoint

    ckpts = os.path.join(run_dir, "checkpoints")
    assert open(os.path.join(ckpts, "latest")).read().strip() == "step16"
    assert sorted(t for t in os.listdir(ckpts) if t.startswith("step")) == ["step16", "step8"]
    verify_checkpoint(os.path.join(ckpts, "step16"))
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["final_val_ppl"] == pytest.approx(evals[-1]["val_ppl"])
    assert summary["total_svds"] > 0 and summary["plots"].endswith("plots")


def test_val_perplexity_matches_independent_recomputation(full_run, workdir):
    """Reload the exported HF model and the held-out sequences; compute the mean token loss
    with plain torch (no DeepSpeed, no Q-GaLore) and compare with the logged value."""
    from transformers import AutoModelForCausalLM

    from qgalore_dist.train.config import parse_args
    from qgalore_dist.train.data import build_data, val_batches

    run_dir, _ = full_run
    cfg, _ = parse_args(_args(workdir, run_dir))
    data = build_data(cfg.data, rank=0, world=1)
    model = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "final_model"), torch_dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for rank in range(2):
            for ids in val_batches(data, rank=rank, world=2, micro_batch=4):
                logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), dim=-1)
                total -= float(logp.gather(-1, ids[:, 1:, None]).sum())
                count += ids[:, 1:].numel()
    _, evals = _metrics(run_dir)
    assert count == evals[-1]["val_tokens"]
    assert math.exp(total / count) == pytest.approx(evals[-1]["val_ppl"], rel=1e-4)


def test_plot_command_writes_pngs(full_run):
    run_dir, _ = full_run
    out = subprocess.run([sys.executable, "-m", "qgalore_dist.train.plot", run_dir], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("loss.png", "comm.png", "svd_events.png", "memory.png"):
        with open(os.path.join(run_dir, "plots", name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_sigterm_saves_then_resume_continues_the_same_curve(full_run, workdir):
    """torchrun this time.  SIGTERM to every task (what SLURM does on preemption) after step 5:
    a checkpoint, exit 0; the rerun resumes and reproduces the uninterrupted losses exactly,
    which it cannot do if it skipped or repeated a sample."""
    reference, _ = _metrics(full_run[0])
    run_dir = str(workdir / "preempted")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "qgalore_dist.train", *_args(workdir, run_dir), "--logging.every", "1"]
    log, rc = sigterm_train_workers(cmd, after_step=5, cwd=workdir, env=_env())
    assert rc == 0, log[-4000:]
    stopped = int(re.search(r"signal 15: checkpoint saved at step (\d+), exiting", log)[1])
    assert 5 <= stopped < STEPS
    meta = json.load(open(os.path.join(run_dir, "checkpoints", f"step{stopped}", "meta.json")))
    assert meta["client_state"]["progress"]["step"] == stopped
    cmd[cmd.index("--master_port") + 1] = str(free_port())
    second = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=420, env=_env())
    log2 = second.stdout + second.stderr
    assert second.returncode == 0, log2[-4000:]
    assert f"resumed at step {stopped}" in log2
    losses, _ = _metrics(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert [losses[s] for s in range(1, STEPS + 1)] == [reference[s] for s in range(1, STEPS + 1)]


@pytest.mark.parametrize("extra, message", [
    (["--optim.rnak", "4"], "unknown config key 'optim.rnak'; did you mean 'rank'"),
    (["--data.source", "/nonexistent/corpus.jsonl"], "/nonexistent/corpus.jsonl"),
    (["--data.source", "BROKEN"], "broken.parquet"),  # found only by the build on rank 0, after init
])
def test_bad_input_fails_on_every_rank(workdir, tmp_path, extra, message):
    """Two ranks started by hand (a launcher would kill the slower rank as soon as the first one
    fails, hiding whether it would have failed too): each must exit non-zero naming the problem."""
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"this is not a parquet file")
    extra = [str(broken) if x == "BROKEN" else x for x in extra]
    args = [*_args(workdir, str(tmp_path / "run")), "--data.cache_dir", str(tmp_path / "cache"), *extra]
    port, procs = str(free_port()), []
    for rank in range(2):
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-m", "qgalore_dist.train", *args], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode not in (0, None), log[-3000:]
        assert message in log and f"[rank {rank}]" in log, log[-3000:]
