"""HF ``Trainer`` + DeepSpeed + Q-GaLore: ``qgalore_dist.integrations.hf.QGaLoreTrainer``.

One 2-rank ``torchrun`` of ``tests/hf_worker.py`` (ZeRO stage 2, bf16, CPU/gloo): Trainer trains
the tiny LLaMA for ``STEPS`` steps from a ds_config whose ``QGaLoreAdamW8bit`` entry and
``gradient_clipping`` say ``"auto"`` (filled from ``TrainingArguments``); then each rank replays
the micro-batches Trainer gave it through ``qgalore_dist.initialize`` on a fresh model with the
same config spelled out.  Same model, batches, optimizer and engine: the losses must be
identical.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer requires accelerate")

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "hf_worker.py"
STEPS = 6
LR = 1e-2
MAX_GRAD_NORM = 1.0
N_INT8_LAYERS = 7  # q, k, v, o, gate, up, down of the 1-layer tiny LLaMA
LAUNCH_TIMEOUT_S = 180

GALORE_PARAMS = {"rank": 8, "update_proj_gap": 3, "scale": 0.25, "proj_bits": 4, "weight_bits": 8,
                 "svd_method": "exact"}


def trainer_ds_config() -> dict:
    """What a Trainer user writes: hyper-parameters shared with TrainingArguments are "auto".
    (No ``train_batch_size``: TrainingArguments computes it before the process group exists,
    with world size 1; DeepSpeed derives it.)"""
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "QGaLoreAdamW8bit", "params": {
            "lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto", **GALORE_PARAMS}},
        "steps_per_print": 10**9,
    }


def reference_ds_config() -> dict:
    """The same run for ``qgalore_dist.initialize``, with TrainingArguments' values spelled out."""
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": MAX_GRAD_NORM,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "QGaLoreAdamW8bit", "params": {
            "lr": LR, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, **GALORE_PARAMS}},
        "steps_per_print": 10**9,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("hf_trainer")
    config, reference = tmp / "ds_config.json", tmp / "reference_ds_config.json"
    config.write_text(json.dumps(trainer_ds_config()))
    reference.write_text(json.dumps(reference_ds_config()))
    out = tmp / "records.json"
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_ext"))
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HFW_BF16="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = ["timeout", "-k", "10", str(LAUNCH_TIMEOUT_S), sys.executable, "-m", "torch.distributed.run",
           "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER),
           "--config", str(config), "--reference-config", str(reference), "--output-dir", str(tmp / "trainer_out"),
           "--steps", str(STEPS), "--lr", str(LR), "--max-grad-norm", str(MAX_GRAD_NORM), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=LAUNCH_TIMEOUT_S + 30)
    if proc.returncode != 0 or not out.exists():
        hint = ""
        lock = Path(env["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm" / "lock"
        if proc.returncode in (124, 137) and lock.exists():
            hint = f"\n(timed out; a stale JIT lock {lock} makes DeepSpeed wait forever -- remove it)"
        pytest.fail(f"{' '.join(cmd)}\nexit {proc.returncode}{hint}\n--- output tail ---\n{proc.stdout[-6000:]}",
                    pytrace=False)
    recs = json.loads(out.read_text())
    assert [r["rank"] for r in recs] == [0, 1] and all(r["world"] == 2 for r in recs)
    return recs


def test_trainer_builds_zero2_around_engine_optimizer(records):
    for rec in records:
        assert rec["engine_type"] == "DeepSpeedEngine"
        assert rec["engine_optimizer"] == "DeepSpeedZeroOptimizer"
        assert rec["basic_is_engine_optimizer"] and rec["engine_qgalore_is_trainer_qgalore"]
        # "auto" -> max_grad_norm is the package's joint clipping; DeepSpeed itself does not clip
        assert rec["joint_clip"] == MAX_GRAD_NORM
        assert rec["engine_gradient_clipping"] == 0.0


def test_trainer_trains(records):
    log = [h for h in records[0]["log_history"] if "loss" in h]
    assert [h["step"] for h in log] == list(range(1, STEPS + 1))
    losses = [h["loss"] for h in log]
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0] - 0.5, losses
    # Trainer's grad_norm is the joint (dense + GaLore) pre-clipping norm
    assert all(math.isfinite(h["grad_norm"]) and h["grad_norm"] > 0 for h in log), log
    for rec in records:
        assert rec["steps_taken"] == STEPS and rec["dense_steps"] == STEPS
        assert rec["svd_count"] == 2 * N_INT8_LAYERS  # refreshes at steps 0 and 3 (update_proj_gap 3)
        assert len(rec["codes_before"]) == N_INT8_LAYERS
        changed = [n for n in rec["codes_before"] if rec["codes_before"][n] != rec["codes_after"][n]]
        assert len(changed) == N_INT8_LAYERS, changed
        assert rec["replicas_checked"] > 0  # check_replicas() passed on this rank
    assert records[0]["codes_after"] == records[1]["codes_after"]
    # the data is sharded: the ranks trained on different batches
    assert records[0]["losses"] != records[1]["losses"]


def test_trainer_matches_qgalore_initialize(records):
    """Each rank's Trainer losses equal those of ``qgalore_dist.initialize`` on the same
    micro-batches (bit-identical: the same engine, optimizer and arithmetic), and so do the
    INT8 weights at the end."""
    for rec in records:
        assert len(rec["losses"]) == STEPS
        assert rec["losses"] == rec["ref_losses"], (rec["losses"], rec["ref_losses"])
        assert rec["codes_after"] == rec["ref_codes"]
        assert rec["ref_replicas_checked"] == rec["replicas_checked"]
    mean_first = sum(r["losses"][0] for r in records) / len(records)
    assert records[0]["log_history"][0]["loss"] == pytest.approx(mean_first, rel=1e-6)
