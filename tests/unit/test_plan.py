"""Ownership planning (``qgalore_dist.distributed.plan``): pure functions, no processes.

``balanced`` is longest-processing-time-first (LPT) by SVD cost m*n*min(m, n), ties broken by
state bytes and then by rank; ``rank0`` puts everything on rank 0.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from qgalore_dist.distributed.plan import PLACEMENTS, MatrixSpec, OwnershipPlan, plan_ownership

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "models"


def llama_specs(config: str = "llama_60m", rank: int = 128) -> list[MatrixSpec]:
    """The 7 GaLore matrices x layers of a LLaMA config, in model order, as (out, in) shapes."""
    cfg = json.loads((CONFIGS / f"{config}.json").read_text())
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    return [MatrixSpec(name=f"model.layers.{i}.{leaf}.weight", shape=shape, rank=rank)
            for i in range(layers) for leaf, shape in shapes.items()]


def unit_specs(costs: list[int], rank: int = 1) -> list[MatrixSpec]:
    """Matrices of shape (c, 1): SVD cost c*1*1 = c, state bytes 2*c*rank."""
    return [MatrixSpec(name=f"m{k}", shape=(c, 1), rank=rank) for k, c in enumerate(costs)]


def test_spec_costs():
    s = MatrixSpec(name="w", shape=(1376, 512), rank=128)
    assert s.svd_cost == 1376 * 512 * 512
    assert s.state_bytes == 2 * 1376 * 128


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_deterministic_and_identical_for_same_specs(placement):
    specs = llama_specs()
    a = plan_ownership(specs, 4, placement)
    b = plan_ownership(list(specs), 4, placement)  # an independent call (another "rank")
    c = plan_ownership([MatrixSpec(name=s.name, shape=s.shape, rank=s.rank) for s in specs], 4, placement)
    assert a == b == c
    assert list(a.owner) == [s.name for s in specs]  # the model's order is kept


def test_rank0_puts_everything_on_rank0():
    specs = llama_specs()
    plan = plan_ownership(specs, 4, "rank0")
    assert set(plan.owner.values()) == {0}
    assert plan.owned_by(0) == [s.name for s in specs]
    assert plan.svd_cost == (sum(s.svd_cost for s in specs), 0, 0, 0)
    assert plan.state_bytes == (sum(s.state_bytes for s in specs), 0, 0, 0)
    assert plan.imbalance() == pytest.approx(4.0)


@pytest.mark.parametrize("config,rank", [("llama_60m", 128), ("llama_130m", 256)])
def test_balanced_llama_over_4_ranks(config, rank):
    specs = llama_specs(config, rank)
    assert len(specs) == 7 * json.loads((CONFIGS / f"{config}.json").read_text())["num_hidden_layers"]
    plan = plan_ownership(specs, 4, "balanced")
    assert plan.imbalance() <= 1.25, plan.describe()
    mean = sum(plan.svd_cost) / 4
    assert max(plan.svd_cost) <= 1.25 * mean
    for r in range(4):
        assert plan.owned_by(r), f"rank {r} owns nothing\n{plan.describe()}"
    # The per-rank totals are consistent with the owner map.
    by_name = {s.name: s for s in specs}
    for r in range(4):
        assert plan.svd_cost[r] == sum(by_name[n].svd_cost for n in plan.owned_by(r))
        assert plan.state_bytes[r] == sum(by_name[n].state_bytes for n in plan.owned_by(r))
    assert sum(len(plan.owned_by(r)) for r in range(4)) == len(specs)


def _reference_lpt(specs: list[MatrixSpec], world_size: int) -> dict[str, int]:
    """Textbook LPT: jobs by decreasing cost, each to the currently least-loaded machine."""
    load = [0] * world_size
    state = [0] * world_size
    owner = {}
    for s in sorted(specs, key=lambda s: (-s.svd_cost, -s.state_bytes, s.name)):
        k = min(range(world_size), key=lambda r: (load[r], state[r], r))
        owner[s.name] = k
        load[k] += s.svd_cost
        state[k] += s.state_bytes
    return owner


def test_lpt_assigns_largest_first():
    # Costs 5, 4, 3, 3, 3 on 2 ranks.  LPT: 5 -> r0, 4 -> r1, 3 -> r1 (4 < 5), 3 -> r0 (5 < 7),
    # 3 -> r1 (7 < 8): loads (8, 10).  Input order must not matter (the largest goes first).
    specs = unit_specs([3, 4, 3, 5, 3])  # m0=3, m1=4, m2=3, m3=5, m4=3
    plan = plan_ownership(specs, 2, "balanced")
    assert plan.owner["m3"] == 0  # the largest job opens rank 0
    assert plan.owner["m1"] == 1  # the second largest opens rank 1
    assert plan.owner == {"m0": 1, "m1": 1, "m2": 0, "m3": 0, "m4": 1}
    assert plan.svd_cost == (8, 10)
    # The first world_size matrices by decreasing cost land on ranks 0, 1, ..., N-1.
    big = unit_specs([10, 70, 40, 90, 20, 60, 30, 80, 50])
    plan = plan_ownership(big, 4, "balanced")
    top4 = sorted(big, key=lambda s: -s.svd_cost)[:4]
    assert [plan.owner[s.name] for s in top4] == [0, 1, 2, 3]


@pytest.mark.parametrize("seed", range(5))
def test_lpt_matches_reference_and_is_order_invariant(seed):
    rng = random.Random(seed)
    specs = [MatrixSpec(name=f"w{k}", shape=(rng.choice([64, 128, 176, 256]), rng.choice([64, 128, 256])), rank=8)
             for k in range(40)]
    world = rng.choice([2, 3, 4, 8])
    plan = plan_ownership(specs, world, "balanced")
    assert plan.owner == _reference_lpt(specs, world)
    shuffled = specs[:]
    rng.shuffle(shuffled)
    assert plan_ownership(shuffled, world, "balanced").owner == plan.owner
    # Greedy list scheduling (LPT included): makespan <= mean + (1 - 1/N) * largest job.
    total, largest = sum(s.svd_cost for s in specs), max(s.svd_cost for s in specs)
    assert max(plan.svd_cost) <= total / world + (1 - 1 / world) * largest


def test_ties_broken_by_state_bytes():
    # a: (16, 2) and b, c: (4, 4) all cost 64; a has 4x the state bytes (2*16*r vs 2*4*r).
    specs = [MatrixSpec(name="c", shape=(4, 4), rank=1), MatrixSpec(name="b", shape=(4, 4), rank=1),
             MatrixSpec(name="a", shape=(16, 2), rank=1)]
    assert len({s.svd_cost for s in specs}) == 1
    plan = plan_ownership(specs, 2, "balanced")
    # Order: a (more state) before b, c (name).  a -> r0; b -> r1 (cost 0 < 64);
    # c: costs tie (64, 64), so the rank with fewer state bytes (r1: 8 < 32) takes it.
    assert plan.owner == {"c": 1, "b": 1, "a": 0}
    assert plan.svd_cost == (64, 128)
    assert plan.state_bytes == (32, 16)
    # Full tie (cost and state) between ranks: the lower rank wins.
    even = plan_ownership([MatrixSpec(name="x", shape=(4, 4), rank=1)], 3, "balanced")
    assert even.owner == {"x": 0}


def test_describe_mentions_each_rank():
    plan = plan_ownership(llama_specs(), 4, "balanced")
    text = plan.describe()
    assert "balanced" in text and "4 ranks" in text and "imbalance" in text
    for r in range(4):
        assert f"rank {r}:" in text
    assert len(text.splitlines()) == 1 + 4


def test_invalid_arguments():
    specs = unit_specs([1, 2])
    with pytest.raises(ValueError, match="placement"):
        plan_ownership(specs, 2, "round_robin")
    with pytest.raises(ValueError, match="world_size"):
        plan_ownership(specs, 0)
    with pytest.raises(ValueError, match="world_size"):
        plan_ownership(specs, -3, "rank0")


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_world_size_one(placement):
    specs = llama_specs()
    plan = plan_ownership(specs, 1, placement)
    assert isinstance(plan, OwnershipPlan)
    assert set(plan.owner.values()) == {0} and len(plan.owner) == len(specs)
    assert plan.imbalance() == 1.0
    assert "rank 0:" in plan.describe()


def test_empty_specs():
    plan = plan_ownership([], 4)
    assert plan.owner == {} and plan.svd_cost == (0, 0, 0, 0)
    assert plan.imbalance() == 1.0
