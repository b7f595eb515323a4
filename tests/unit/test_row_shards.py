"""FSDP2 row shards of any shape (issue 17): torch.chunk row ranges equal DTensor's Shard(0),
every built-in model plans at 64 ranks (closed form and a meta-device llama_1b), and what is
still refused is named with the nearest valid setting.  No process group, no training."""

from __future__ import annotations

import pytest
import torch

from qgalore_dist.distributed import chunk_rows, row_shard_problem
from qgalore_dist.estimate import fsdp
from qgalore_dist.estimate.model import builtin_models, load_model_config, model_shapes

WORLD = 64


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 64])
def test_chunk_rows_are_dtensor_shard0_rows(world):
    from torch.distributed.tensor import Shard

    for rows in list(range(1, 70)) + [5461, 1376, 2736]:
        ranges = chunk_rows(rows, world)
        want = [Shard(0).local_shard_size_and_offset(rows, world, k) for k in range(world)]
        assert ranges == [(offset, offset + size) for size, offset in want], (rows, world)
        assert ranges[0][0] == 0 and ranges[-1][1] == rows
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


@pytest.mark.parametrize("name", sorted(builtin_models()))
def test_every_builtin_model_plans_at_64_ranks(name):
    shapes = model_shapes(name, rank=64)
    for t in shapes.galore:
        assert row_shard_problem(*t.shape, shapes.lay.weight_group, WORLD) is None, t
    assert fsdp.not_shardable(shapes, WORLD) is None
    first, last = (fsdp.fsdp_rank_bytes(shapes, WORLD, r, steady=True) for r in (0, WORLD - 1))
    # FSDP2 stores ceil(m/N) rows on every rank (padded): equal weights; the last ranks hold
    # fewer rows of state (uneven splits), never more.
    assert first.weights == last.weights and last.optimizer <= first.optimizer
    stored = fsdp.components(shapes, WORLD, 0)["int8_codes"]
    assert WORLD * stored >= sum(t.numel for t in shapes.galore)


def test_llama_1b_meta_model_shards_at_64_with_row_aligned_groups():
    """intermediate 5461: gate/up (5461 rows) split 86 per rank, the last 43; down_proj's rows
    (5461 = 21 * 256 + 85) end in an 85-element group, scales sharded as (2048, 22)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qgalore_dist import prepare_model
    from qgalore_dist.integrations.fsdp import check_shardable, meta_shape

    fields = {**load_model_config("llama_1b")[1], "num_hidden_layers": 1}
    with torch.device("meta"):
        model = prepare_model(LlamaForCausalLM(LlamaConfig(**fields)))
    check_shardable(model, WORLD)
    down = model.model.layers[0].mlp.down_proj
    assert (down.row_length, meta_shape(down), tuple(down.weight_scales.shape)) == (5461, (2048, 22), (2048 * 22, 1))
    up = model.model.layers[0].mlp.up_proj
    assert meta_shape(up) == (5461, 8) and chunk_rows(5461, WORLD)[-1] == (5418, 5461)


def test_what_is_still_refused_names_the_matrix_shape_and_nearest_setting():
    from qgalore_dist import Int8Linear
    from qgalore_dist.integrations.fsdp import check_shardable

    # Flat groups spanning rows (group_size > in_features) cut by a shard boundary.
    problem = row_shard_problem(64, 64, 256, 3)
    assert problem is not None and "group_size <= 64" in problem
    assert row_shard_problem(64, 64, 256, 2) is None  # 32 rows = 8 whole groups
    model = torch.nn.Sequential(Int8Linear(64, 64, bias=False, group_size=256))
    with pytest.raises(ValueError, match=r"^0: a 64x64 INT8 weight with group_size=256 cannot be row-sharded over 3"):
        check_shardable(model, 3)
    # A group size that fits no layout (exceeds a row, does not divide the weight).
    assert "choose group_size <= 64" in row_shard_problem(86, 64, 256, 2)
