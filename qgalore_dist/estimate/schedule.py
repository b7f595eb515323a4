"""Refresh (SVD) steps over a run, and bytes per step averaged over it.

Two bounds on how often a GaLore matrix refreshes, from the reference's rules
(``reference/qgalore-algorithm.md`` section 2.2; ``qgalore_dist.core.RefreshSchedule``):

* fixed (GaLore, or Q-GaLore when the cosine similarity of successive first singular vectors
  stays below ``cos_threshold``): an SVD at 0, T, 2T, ...;
* adaptive best case (every similarity >= threshold): the gap is multiplied by ``gamma`` once the
  queue of the last ``queue_size`` similarities is full and its mean passes, at every later SVD
  (the queue is never cleared), and the next SVD is at the next multiple of the new gap on the
  absolute step: with T = 200 ``[0, 200, ..., 1000, 1200, 1600, 3200, 6400, ...]``.

A refresh step is modelled as every matrix refreshing at once (step 0 always is; with one
schedule per matrix and equal gaps they coincide while the similarities agree), so the run
average of a per-step figure is ``((S - k) * steady + k * refresh) / S`` for k refresh steps in S.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RunAverage", "adaptive_refresh_steps", "fixed_refresh_steps", "run_average"]


def fixed_refresh_steps(steps: int, gap: int) -> list[int]:
    """GaLore's fixed schedule: an SVD at 0, T, 2T, ... below ``steps``."""
    if gap < 1 or steps < 0:
        raise ValueError(f"need gap >= 1 and steps >= 0, got gap={gap}, steps={steps}")
    return list(range(0, steps, gap))


def adaptive_refresh_steps(steps: int, gap: int, *, queue_size: int = 5, gamma: float = 2,
                           always_similar: bool = True) -> list[int]:
    """SVD steps of the adaptive rule below ``steps``; ``always_similar`` (every cosine >= the
    threshold) gives the fewest it can run, ``False`` the fixed schedule (the gap never grows)."""
    if not always_similar:
        return fixed_refresh_steps(steps, gap)
    if gap < 1 or steps < 0 or queue_size < 1:
        raise ValueError(f"need gap >= 1, queue_size >= 1 and steps >= 0, got {gap}, {queue_size}, {steps}")
    done, similarities = [], 0
    step = 0
    while step < steps:
        if done:  # the first SVD has no previous vector to compare with
            similarities += 1
            if similarities >= queue_size:
                gap = int(gap * gamma)
        done.append(step)
        step = (step // gap + 1) * gap  # next multiple of the (possibly new) gap on the absolute step
    return done


@dataclass(frozen=True, kw_only=True)
class RunAverage:
    """A per-step figure averaged over a run with refresh steps."""

    steps: int
    """Steps in the run."""
    refresh_steps: int
    """Steps on which the matrices refresh."""
    steady: float
    """The figure on a steady step."""
    refresh: float
    """The figure on a refresh step."""

    @property
    def average(self) -> float:
        return ((self.steps - self.refresh_steps) * self.steady + self.refresh_steps * self.refresh) / self.steps


def run_average(steady: float, refresh: float, refresh_steps: list[int], steps: int) -> RunAverage:
    """``RunAverage`` of a figure over ``steps`` steps refreshing at ``refresh_steps``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return RunAverage(steps=steps, refresh_steps=sum(1 for s in refresh_steps if s < steps), steady=steady,
                      refresh=refresh)
