"""The measuring pieces of ``benchmarks/svd.py`` (``tests/svd_harness.py``): the schedule bookkeeping against the
reference's simulated SVD steps (reference/qgalore-algorithm.md section 2.2), the exact/randomized basis comparison
on a matrix with a known spectrum, the validations, and a few-step training run end to end."""

from __future__ import annotations

import math

import pytest
import svd_harness as svd
import torch

from qgalore_dist.core import RefreshSchedule
from qgalore_dist.estimate.schedule import adaptive_refresh_steps, fixed_refresh_steps


def _refresh_schedule_steps(steps: int, gap: int) -> list[int]:
    """The adaptive rule's best case driven through ``RefreshSchedule`` itself (a constant first
    singular vector: every cosine is 1)."""
    schedule, vector, done = RefreshSchedule(gap=gap), torch.ones(4), []
    for step in range(steps):
        if schedule.is_due(step, has_projector=bool(done)):
            schedule.record(vector)
            done.append(step)
    return done


def test_best_case_adaptive_schedule_matches_reference_simulation():
    """All cosines >= 0.4 from T = 200: the reference doc's list, 14 SVDs in 150k steps."""
    assert adaptive_refresh_steps(150_000, 200) == [
        0, 200, 400, 600, 800, 1000, 1200, 1600, 3200, 6400, 12800, 25600, 51200, 102400]


@pytest.mark.parametrize("steps,gap", [(150_000, 200), (5000, 50), (40, 10), (7, 1), (3000, 3)])
def test_closed_form_schedule_is_refresh_schedules(steps, gap):
    assert adaptive_refresh_steps(steps, gap) == _refresh_schedule_steps(steps, gap)


@pytest.mark.parametrize("steps,gap,fixed,best", [(2000, 200, 10, 8), (2000, 50, 40, 10), (40, 10, 4, 4)])
def test_schedule_counts_over_a_short_run(steps, gap, fixed, best):
    """Within 2000 steps the adaptive rule saves at most 20% at T = 200 and 75% at T = 50."""
    assert fixed_refresh_steps(steps, gap) == list(range(0, steps, gap))
    assert len(fixed_refresh_steps(steps, gap)) == fixed
    assert len(adaptive_refresh_steps(steps, gap)) == best


def _power_law_matrix(m: int, n: int, alpha: float) -> torch.Tensor:
    return svd.synthetic_gradient(m, n, alpha, svd.random_orthonormal_factors(m, n, seed=3))


@pytest.mark.parametrize("shape", [(96, 200), (200, 96)], ids=["wide-left", "tall-right"])
def test_compare_bases_on_a_known_spectrum(shape):
    """The exact basis reaches the Eckart-Young error; on a fast-decaying spectrum the randomized
    one agrees on both sides (the derived right basis of a left projection included)."""
    grad = _power_law_matrix(*shape, alpha=2.0)
    row = svd.compare_bases(grad, 8, repeats=2, budget_s=60.0)
    s = torch.arange(1, min(shape) + 1, dtype=torch.float64) ** -2.0
    assert row["optimal_error"] == pytest.approx(float(s[8:].norm() / s.norm()), rel=1e-4)
    assert row["std_side"] == ("left" if shape[0] < shape[1] else "right")
    assert len(row["exact_s"]) == len(row["randomized_s"]) == 2
    for side in ("left", "right"):
        a = row["agreement"][side]
        assert a["error_exact"] == pytest.approx(row["optimal_error"], rel=1e-4)
        assert a["error_randomized"] == pytest.approx(row["optimal_error"], rel=1e-3)
        assert a["min_cos"] > 0.999
    assert row["spectrum_alpha_fit"] == pytest.approx(2.0, rel=1e-3)
    assert svd.validate_timing([row]) == []


def test_validate_timing_flags_a_basis_better_than_optimal():
    row = svd.compare_bases(_power_law_matrix(64, 128, 1.0), 4, repeats=1, budget_s=60.0)
    row["agreement"]["left"]["error_randomized"] = row["optimal_error"] * 0.5
    assert any("beats the optimum" in f for f in svd.validate_timing([row]))


def _run(spec: svd.RunSpec, steps_of: list[int]) -> dict:
    events = {f"m{i}": {"steps": list(steps_of), "gap_after": [spec.gap], "cosines": []} for i in range(2)}
    return {"spec": {**spec.__dict__, "label": spec.label}, "steps_done": spec.steps, "losses": [1.0] * spec.steps,
            "svd_total": 2 * len(steps_of), "events": events}


def test_validate_count_flags_broken_schedules():
    fixed = svd.RunSpec(gap=10, adaptive=False, steps=40, micro_batch=1, seq_len=8, rank=2, lr=0.0, warmup=0,
                        seed=0, model="llama_9m", max_minutes=1.0)
    assert svd.validate_count({"runs": [_run(fixed, [0, 10, 20, 30])]}, 40) == []
    assert svd.validate_count({"runs": [_run(fixed, [0, 10, 30])]}, 40)
    adaptive = svd.RunSpec(**{**fixed.__dict__, "adaptive": True, "steps": 2000, "gap": 50})
    assert svd.validate_count({"runs": [_run(adaptive, adaptive_refresh_steps(2000, 50))]}, 2000) == []
    assert svd.validate_count({"runs": [_run(adaptive, [0, 50, 100])]}, 2000)  # fewer than the best case


def test_short_training_runs_record_every_svd():
    """A few real steps of llama_9m on the builtin corpus: the fixed run refreshes at 0, T, 2T;
    the adaptive run matches it until its queue is full; losses are finite; the real-gradient
    probe passes the Eckart-Young check."""
    common = dict(gap=2, steps=6, micro_batch=1, seq_len=32, rank=4, lr=1e-3, warmup=1, seed=0,
                  model="llama_9m", max_minutes=5.0)
    fixed = svd.train_run(svd.RunSpec(adaptive=False, **common))
    adaptive = svd.train_run(svd.RunSpec(adaptive=True, probe=True, **common))
    assert all(e["steps"] == [0, 2, 4] for e in fixed["events"].values())
    assert len(fixed["events"]) == 28 and fixed["svd_total"] == 28 * 3
    assert all(e["steps"] == [0, 2, 4] and len(e["cosines"]) == 2 for e in adaptive["events"].values())
    assert fixed["losses"] == adaptive["losses"]  # identical until the adaptive gap could change
    assert math.isfinite(fixed["val_loss"]) and math.isfinite(fixed["final_train_loss"])
    assert svd.validate_count({"runs": [fixed, adaptive]}, 6) == []
    assert adaptive["real_gradient"] and svd.validate_timing(adaptive["real_gradient"]) == []
