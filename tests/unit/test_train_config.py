"""The training tool's configuration: YAML/JSON files, CLI overrides, nearest-name errors, the
optimizer and ds_config overrides, and GaLore's LR schedule."""

from __future__ import annotations

import json
import math

import pytest

from qgalore_dist.train.config import DEFAULT_DS_CONFIG, TrainConfig, parse_args
from qgalore_dist.train.schedule import warmup_cosine


def test_defaults_build_the_builtin_ds_config():
    cfg, ds = parse_args([])
    assert cfg == TrainConfig()
    assert ds == DEFAULT_DS_CONFIG and ds is not DEFAULT_DS_CONFIG
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"]


def test_file_then_cli_precedence_and_types(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run_dir: from_file\nschedule:\n  steps: 50\n  warmup_steps: 5\noptim:\n  rank: 16\n")
    cfg, ds = parse_args(["--config", str(path), "--schedule.steps", "70", "--optim.update_proj_gap=20",
                          "--schedule.min_lr_ratio", "0", "--model.activation_checkpointing",
                          "--ds.zero_optimization.stage", "3", "--local_rank=1"])
    assert cfg.run_dir == "from_file" and cfg.schedule.steps == 70 and cfg.schedule.warmup_steps == 5
    assert cfg.schedule.min_lr_ratio == 0.0 and isinstance(cfg.schedule.min_lr_ratio, float)
    assert cfg.model.activation_checkpointing is True
    assert ds["optimizer"]["params"]["rank"] == 16 and ds["optimizer"]["params"]["update_proj_gap"] == 20
    assert ds["zero_optimization"]["stage"] == 3
    assert DEFAULT_DS_CONFIG["zero_optimization"]["stage"] == 2  # the default is not mutated


def test_json_config_and_ds_config_file(tmp_path):
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "optimizer": {
        "type": "QGaLoreAdamW8bit", "params": {"lr": 0.002, "rank": 8}}}))
    cfg_path = tmp_path / "run.json"
    cfg_path.write_text(json.dumps({"ds_config": str(ds_path), "optim": {"scale": 0.5}}))
    cfg, ds = parse_args(["--config", str(cfg_path)])
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["optimizer"]["params"] == {"lr": 0.002, "rank": 8, "scale": 0.5}


@pytest.mark.parametrize("argv, message", [
    (["--optim.rnak", "8"], "'optim.rnak'; did you mean 'rank'"),
    (["--schedule.step", "8"], "'schedule.step'; did you mean 'steps'"),
    (["--modle.name", "x"], "'modle'; did you mean 'model'"),
    (["--schedule.steps", "ten"], "schedule.steps must be of type int, got 'ten'"),
    (["--schedule.steps", "0"], "schedule.steps must be an integer >= 1"),
    (["--schedule.min_lr_ratio", "2"], "schedule.min_lr_ratio must be in [0, 1]"),
    (["--model", "x"], "model is a section"),
    (["--ds_config", "/nonexistent/ds.json"], "ds_config: file '/nonexistent/ds.json' does not exist"),
    (["--config", "/nonexistent/run.yaml"], "--config: file '/nonexistent/run.yaml' does not exist"),
    (["stray"], "unexpected argument 'stray'"),
])
def test_bad_input_names_the_key(argv, message):
    with pytest.raises(ValueError) as info:
        parse_args(argv)
    assert message in str(info.value)


def test_bad_file_key_and_optim_value(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("checkpoint:\n  evry: 5\n")
    with pytest.raises(ValueError, match=r"'checkpoint.evry'; did you mean 'every'"):
        parse_args(["--config", str(path)])
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        parse_args(["--config", str(path)])


def test_optim_overrides_need_the_qgalore_entry(tmp_path):
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}))
    with pytest.raises(ValueError, match="optim overrides need a ds_config optimizer of type 'QGaLoreAdamW8bit'"):
        parse_args(["--ds_config", str(ds_path), "--optim.rank", "4"])


def _galore_lambda(step, num_warmup_steps, num_training_steps, min_lr_ratio):
    """GaLore's training_utils cosine lambda with cycle_length = num_training_steps (one cycle),
    transcribed from the reference (qgalore-algorithm.md, LR schedule)."""
    if step < num_warmup_steps:
        return float(step) / float(max(1, num_warmup_steps))
    progress = float(step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize("total, warmup", [(100, 10), (7, 0), (1000, 999)])
def test_schedule_is_galores(total, warmup):
    for step in range(total + 1):
        ours = warmup_cosine(step, total_steps=total, warmup_steps=warmup, min_lr_ratio=0.1)
        assert ours == pytest.approx(_galore_lambda(step, warmup, total, 0.1), abs=1e-12)
    assert warmup_cosine(total, total_steps=total, warmup_steps=warmup, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(total + 50, total_steps=total, warmup_steps=warmup, min_lr_ratio=0.1) == pytest.approx(0.1)
