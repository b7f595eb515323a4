"""``--engine`` / ``--parallel.*`` of qgalore-train without processes: ParallelDims resolves
-1 and refuses a mesh that does not fill the world (naming the values and the world size);
ds_config keys an engine would not honour are refused by name; the batch keys are checked."""

from __future__ import annotations

import pytest

from qgalore_dist.train.parallel import ParallelDims


@pytest.mark.parametrize("replicate, shard, world, shape", [
    (1, -1, 4, (4,)), (2, -1, 8, (2, 4)), (-1, 2, 8, (4, 2)), (1, 1, 1, (1,)), (2, 2, 4, (2, 2)),
])
def test_parallel_dims_resolve_the_rest(replicate, shard, world, shape):
    dims = ParallelDims(dp_replicate=replicate, dp_shard=shard, world_size=world)
    assert dims.mesh_shape == shape and dims.dp_replicate * dims.dp_shard == world
    assert dims.dim_names == (("dp_replicate", "dp_shard") if len(shape) == 2 else ("dp_shard",))


@pytest.mark.parametrize("replicate, shard, world, message", [
    (2, 3, 4, "parallel.dp_replicate 2 x parallel.dp_shard 3 = 6 ranks, but the world size is 4"),
    (3, -1, 4, "parallel.dp_replicate 3 does not divide the world size 4"),
    (-1, -1, 4, "at most one of them may be -1 (the rest of the world size 4)"),
    (0, 2, 4, "parallel.dp_replicate must be an integer >= 1 or -1"),
    (1, -2, 4, "parallel.dp_shard must be an integer >= 1 or -1"),
])
def test_parallel_dims_refuse_a_mesh_that_does_not_fill_the_world(replicate, shard, world, message):
    with pytest.raises(ValueError) as info:
        ParallelDims(dp_replicate=replicate, dp_shard=shard, world_size=world)
    assert message in str(info.value)


def test_parallel_dims_are_keyword_only():
    with pytest.raises(TypeError):
        ParallelDims(2, 2, 4)  # type: ignore[misc]


def test_engine_and_parallel_keys_parse():
    from qgalore_dist.train.config import parse_args

    cfg, ds = parse_args(["--engine", "fsdp2", "--parallel.dp_replicate", "2", "--parallel.dp_shard", "2"])
    assert (cfg.engine, cfg.parallel.dp_replicate, cfg.parallel.dp_shard) == ("fsdp2", 2, 2)
    assert "zero_optimization" not in ds  # the built-in default's ZeRO stage is DeepSpeed's only
    cfg, ds = parse_args([])
    assert cfg.engine == "deepspeed" and ds["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("argv, message", [
    (["--engine", "fsdp3"], "engine must be one of ['deepspeed', 'fsdp2', 'ddp'], got 'fsdp3'"),
    (["--engine", "ddp", "--parallel.dp_shard", "2"], "with engine 'ddp' leave them unset"),
    (["--engine", "fsdp2", "--ds.zero_optimization.stage", "3"],
     "ds_config zero_optimization.stage 3 has no meaning under --engine fsdp2"),
    (["--engine", "ddp", "--ds.scheduler.type", "WarmupLR"],
     "ds_config key 'scheduler' has no meaning under --engine ddp"),
    (["--engine", "fsdp2", "--optim.compress_dense", "true"], "optimizer.params.compress_dense: not available under"),
])
def test_engine_mistakes_name_the_key(argv, message):
    from qgalore_dist.train.config import parse_args

    with pytest.raises(ValueError) as info:
        parse_args(argv)
    assert message in str(info.value)


def test_zero_stage_0_is_accepted_by_ddp():
    from qgalore_dist.train.config import parse_args

    parse_args(["--engine", "ddp", "--ds.zero_optimization.stage", "0"])


@pytest.mark.parametrize("ds, message", [
    ({"train_batch_size": 12}, "train_batch_size 12 must equal train_micro_batch_size_per_gpu 4 x "
                               "gradient_accumulation_steps 1 x world size 2"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be an integer >= 1, got 0"),
])
def test_plain_settings_check_the_batch_keys(ds, message):
    from qgalore_dist.train.config import DEFAULT_DS_CONFIG
    from qgalore_dist.train.engines import plain_settings

    with pytest.raises(ValueError) as info:
        plain_settings({**DEFAULT_DS_CONFIG, **ds}, 2, "ddp")
    assert message in str(info.value)
    assert plain_settings({**DEFAULT_DS_CONFIG, "train_batch_size": 8}, 2, "fsdp2").micro_batch == 4
    derived = {k: v for k, v in DEFAULT_DS_CONFIG.items() if k != "train_micro_batch_size_per_gpu"}
    settings = plain_settings({**derived, "train_batch_size": 16}, 2, "fsdp2")
    assert (settings.micro_batch, settings.accumulation, settings.bf16) == (8, 1, True)
    assert settings.entry.config.max_grad_norm == 1.0  # gradient_clipping, as under DeepSpeed


def test_main_refuses_a_mesh_of_the_wrong_size_before_start_up(tmp_path, capsys, monkeypatch):
    from qgalore_dist.train.loop import main

    for key, value in dict(RANK="0", WORLD_SIZE="4", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(key, value)
    assert main(["--engine", "fsdp2", "--parallel.dp_replicate", "3", "--parallel.dp_shard", "2",
                 "--run_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("[rank 0] qgalore-train: error: parallel.dp_replicate 3 x parallel.dp_shard 2 = 6 ranks, "
                          "but the world size is 4")
