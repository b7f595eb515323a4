"""Checkpoints (qgalore_dist.checkpoint): bit-identical resume under DeepSpeed, resume on
another world size, refusal of corrupted checkpoints, and a save killed half-way.

DeepSpeed runs are ``torchrun`` launches of tests/ckpt_worker.py; the plain (model, optimizer)
path runs in this process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from helpers import lm_loss, param_names, single_thread, tiny_llama, token_batches, trainable  # noqa: F401  (autouse fixture)

from qgalore_dist import QGaLoreAdamW8bit, prepare_model
from qgalore_dist.checkpoint import CheckpointError, latest_tag, load_checkpoint, save_checkpoint, verify_checkpoint

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path, nproc: int, *args: str, expect_ok: bool = True) -> dict | subprocess.CompletedProcess:
    out = tmp_path / f"out{_port()}.json"
    env = {**os.environ, "PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_port()), os.path.join(TESTS, "ckpt_worker.py"), "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    if not expect_ok:
        return proc
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("stage,dtype,extra", [(0, "bf16", []), (2, "fp32", ["--compress"]), (3, "bf16", [])])
def test_deepspeed_resume_is_bit_identical_for_20_steps(tmp_path, stage, dtype, extra):
    common = ["--stage", str(stage), "--dtype", dtype, "--steps", "25", *extra]
    full = _run(tmp_path, 2, *common, "--save-at", "5", "--save-dir", str(tmp_path / "ck"))
    resumed = _run(tmp_path, 2, *common, "--load-dir", str(tmp_path / "ck"))
    assert sorted(resumed["losses"], key=int) == [str(s) for s in range(5, 25)]
    assert resumed["losses"] == {k: v for k, v in full["losses"].items() if int(k) >= 5}  # exact
    assert resumed["svd_count"] == full["svd_count"] > 0


@pytest.mark.parametrize("saved,resumed", [(4, 2), (2, 4)])
def test_deepspeed_resume_on_another_world_size_replans_and_continues(tmp_path, saved, resumed):
    # gas * world = 4 in every run, so every step sees the same global batch.
    common = ["--stage", "2", "--dtype", "bf16", "--steps", "9"]
    full = _run(tmp_path, saved, *common, "--gas", str(4 // saved), "--save-at", "4",
                "--save-dir", str(tmp_path / "ck"))
    meta = json.loads((tmp_path / "ck" / "step4" / "meta.json").read_text())
    assert meta["world_size"] == saved and set(meta["plan"].values()) == set(range(saved))
    cont = _run(tmp_path, resumed, *common, "--gas", str(4 // resumed), "--load-dir", str(tmp_path / "ck"))
    assert sorted(cont["losses"], key=int) == [str(s) for s in range(4, 9)]
    for step, loss in cont["losses"].items():
        assert loss == pytest.approx(full["losses"][step], rel=1e-4), step
    assert cont["svd_count"] == full["svd_count"]


def test_zero3_partitioned_int8_resume_on_one_rank(tmp_path):
    """ZeRO-3 with INT8 rows partitioned over 2 ranks saves whole tensors and per-row-range
    moments; one rank (stage 3, and stage 2 with replicated INT8 weights) resumes from them."""
    from safetensors import safe_open

    common = ["--dtype", "bf16", "--steps", "8"]
    full = _run(tmp_path, 2, "--stage", "3", *common, "--save-at", "4", "--save-dir", str(tmp_path / "ck"))
    with safe_open(str(tmp_path / "ck" / "step4" / "model.safetensors"), "pt") as f:
        assert tuple(f.get_slice("model.layers.0.mlp.gate_proj.weight").get_shape()) == (176, 64)
    for stage in ("3", "2"):
        cont = _run(tmp_path, 1, "--stage", stage, *common, "--gas", "2", "--load-dir", str(tmp_path / "ck"))
        assert sorted(cont["losses"], key=int) == [str(s) for s in range(4, 8)]
        for step, loss in cont["losses"].items():
            assert loss == pytest.approx(full["losses"][step], rel=1e-4), (stage, step)
        assert cont["svd_count"] == full["svd_count"]


def test_rank_killed_in_the_middle_of_a_save_leaves_the_previous_checkpoint(tmp_path):
    ck = tmp_path / "ck"
    proc = _run(tmp_path, 2, "--stage", "2", "--steps", "8", "--save-at", "3,6", "--kill-in-save", "6",
                "--save-dir", str(ck), expect_ok=False)
    assert proc.returncode != 0
    assert latest_tag(str(ck)) == "step3"
    assert not (ck / "step6").exists() and (ck / "step6.tmp").exists()
    verify_checkpoint(str(ck / "step3"))
    # ... and a run resumes from it, continuing exactly like an uninterrupted run.
    resumed = _run(tmp_path, 2, "--stage", "2", "--steps", "5", "--load-dir", str(ck))
    full = _run(tmp_path, 2, "--stage", "2", "--steps", "5")
    assert resumed["losses"] == {k: v for k, v in full["losses"].items() if int(k) >= 3}


def test_deepspeed_refuses_a_corrupted_checkpoint_on_every_rank(tmp_path):
    ck = tmp_path / "ck"
    _run(tmp_path, 2, "--stage", "1", "--steps", "2", "--save-at", "2", "--save-dir", str(ck))
    target = ck / "step2" / "optim_rank1.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x40
    target.write_bytes(bytes(data))
    proc = _run(tmp_path, 2, "--stage", "1", "--steps", "4", "--load-dir", str(ck), expect_ok=False)
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert log.count("optim_rank1.safetensors fails its SHA-256 check") >= 2, log[-3000:]  # both ranks


# ----------------------------------------------------------------------------- plain optimizer
def _plain(seed: int = 0):
    model = prepare_model(tiny_llama(seed=seed))
    opt = QGaLoreAdamW8bit(trainable(model), names=param_names(model), rank=8, lr=3e-3, update_proj_gap=3,
                           max_grad_norm=1.0)
    return model, opt


def _steps(model, opt, batches, n):
    losses = []
    for _ in range(n):
        loss = lm_loss(model, next(batches))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def test_plain_optimizer_resume_is_bit_identical(tmp_path):
    model, opt = _plain()
    batches = token_batches(vocab=128, batch=2, seq_len=32, seed=1)
    _steps(model, opt, batches, 4)
    path = save_checkpoint((model, opt), str(tmp_path), client_state={"next_step": 4, "note": "x"})
    assert os.path.basename(path) == "step4" and latest_tag(str(tmp_path)) == "step4"
    after = _steps(model, opt, batches, 8)
    model2, opt2 = _plain(seed=5)  # different initial weights: everything must come from the checkpoint
    assert load_checkpoint((model2, opt2), str(tmp_path)) == {"next_step": 4, "note": "x"}
    batches2 = token_batches(vocab=128, batch=2, seq_len=32, seed=1)
    for _ in range(4):
        next(batches2)
    assert _steps(model2, opt2, batches2, 8) == after
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), n


def test_load_without_any_checkpoint_returns_none(tmp_path):
    assert load_checkpoint(_plain(), str(tmp_path / "nothing"), missing_ok=True) is None
    assert load_checkpoint(_plain(), str(tmp_path), missing_ok=True) is None  # exists, no checkpoint yet


def test_load_without_any_checkpoint_raises_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"checkpoint directory '{tmp_path}/nothing' does not exist"):
        load_checkpoint(_plain(), str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="has no 'latest' file"):
        load_checkpoint(_plain(), str(tmp_path))


def _saved(tmp_path):
    model, opt = _plain()
    _steps(model, opt, token_batches(vocab=128, batch=2, seq_len=32, seed=1), 2)
    return model, opt, save_checkpoint((model, opt), str(tmp_path))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "no_manifest"])
def test_damaged_checkpoint_is_refused_naming_the_file_and_nothing_is_loaded(tmp_path, damage):
    _, _, path = _saved(tmp_path)
    victim = os.path.join(path, "model.safetensors")
    if damage == "flip":
        data = bytearray(open(victim, "rb").read())
        data[-10] ^= 0x01
        open(victim, "wb").write(bytes(data))
    elif damage == "truncate":
        os.truncate(victim, os.path.getsize(victim) // 2)
    elif damage == "delete":
        os.remove(victim)
    else:
        os.remove(os.path.join(path, "manifest.json"))
    model, opt = _plain(seed=9)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    expected = "manifest.json" if damage == "no_manifest" else "model.safetensors"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint((model, opt), str(tmp_path))
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert not any("exp_avg" in s for s in opt.state.values())


def test_checkpoint_holds_no_pickle(tmp_path):
    _, _, path = _saved(tmp_path)
    names = sorted(os.listdir(path))
    assert all(n.endswith((".safetensors", ".json")) for n in names), names
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    assert sorted(manifest["files"]) == [n for n in names if n != "manifest.json"]


def test_resaving_a_tag_replaces_it_atomically_and_cleans_a_crashed_save(tmp_path):
    model, opt, path = _saved(tmp_path)
    os.makedirs(path + "_junk.tmp")
    os.makedirs(os.path.join(str(tmp_path), "again.tmp"))  # left by a crashed save of tag "again"
    save_checkpoint((model, opt), str(tmp_path), tag="again")
    assert not os.path.exists(os.path.join(str(tmp_path), "again.tmp"))
    save_checkpoint((model, opt), str(tmp_path), tag="again")
    verify_checkpoint(os.path.join(str(tmp_path), "again"))
    assert latest_tag(str(tmp_path)) == "again"
    with pytest.raises(ValueError, match="plain directory name"):
        save_checkpoint((model, opt), str(tmp_path), tag="../escape")
    shutil.rmtree(path + "_junk.tmp")


def test_config_mismatch_lists_only_what_differs(tmp_path):
    _saved(tmp_path)
    model = prepare_model(tiny_llama(seed=0))
    opt = QGaLoreAdamW8bit(trainable(model), names=param_names(model), rank=16, lr=3e-3, update_proj_gap=3,
                           max_grad_norm=1.0)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint((model, opt), str(tmp_path))
    assert "differs in rank (checkpoint 8, now 16)" in str(info.value)
    assert "betas" not in str(info.value)


def test_failure_during_a_save_names_the_step_being_saved(tmp_path, monkeypatch):
    model, opt = _plain()
    _steps(model, opt, token_batches(vocab=128, batch=2, seq_len=32, seed=1), 3)

    def peer_died(obj):  # what Collectives._run raises when a peer dies mid-collective
        raise RuntimeError(f"qgalore-dist: all_gather_object (control) failed at optimizer step "
                           f"{opt.comm.step_index} on rank 0 of 2: Connection closed by peer")

    monkeypatch.setattr(opt.comm, "all_gather_object", peer_died)
    with pytest.raises(RuntimeError) as info:
        save_checkpoint((model, opt), str(tmp_path))
    message = str(info.value)
    assert "saving checkpoint 'step3' after optimizer step 3 failed" in message
    assert "optimizer step 2" not in message
    assert opt.comm.step_index == 2  # restored for the next step's messages
