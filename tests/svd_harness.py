"""Measuring pieces of ``benchmarks/svd.py``: seeded Q-GaLore training runs that record every SVD,
exact vs randomized bases on matrices with a known spectrum, and the schedule / Eckart-Young
validations.  Used by ``tests/unit/test_bench_svd.py`` and ``benchmarks/svd.py`` (which puts
``tests/`` on ``sys.path``)."""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F

from qgalore_dist import QGaLoreAdamW8bit, QGaLoreConfig, prepare_model
from qgalore_dist.core import Int8Linear, RefreshSchedule, accumulate_full_grad, choose_side, svd_basis  # noqa: F401
from qgalore_dist.estimate.model import load_model_config
from qgalore_dist.estimate.schedule import adaptive_refresh_steps, fixed_refresh_steps
from qgalore_dist.train.data import DataConfig, TrainStream, build_data, val_batches  # noqa: F401
from qgalore_dist.train.schedule import warmup_cosine

LOSS_TAIL = 100
"""Training loss is reported as the mean over this many final steps (single steps are noisy)."""


@dataclass(frozen=True)
class RunSpec:
    """One training run of the ``count`` part (picklable: it crosses to a worker process)."""

    gap: int
    adaptive: bool
    steps: int
    micro_batch: int
    seq_len: int
    rank: int
    lr: float
    warmup: int
    seed: int
    model: str
    max_minutes: float
    svd_method: str = "exact"
    probe: bool = False
    """After training, compare exact and randomized bases of real gradients at ``rank``."""

    @property
    def label(self) -> str:
        method = "" if self.svd_method == "exact" else f", {self.svd_method} SVD"
        return f"{'adaptive' if self.adaptive else 'fixed'} T={self.gap}{method}"


def build_training(spec: RunSpec, vocab_size: int) -> tuple[torch.nn.Module, QGaLoreAdamW8bit]:
    """The seeded fp32 LLaMA with INT8 linears and its Q-GaLore optimizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {**load_model_config(spec.model)[1], "vocab_size": vocab_size, "use_cache": False,
              "max_position_embeddings": max(spec.seq_len, 128)}
    config = LlamaConfig(**fields)
    torch.manual_seed(spec.seed)
    model = prepare_model(LlamaForCausalLM(config))
    params = [p for p in model.parameters() if p.requires_grad or p.dtype == torch.uint8]
    optimizer = QGaLoreAdamW8bit(params, QGaLoreConfig(
        lr=spec.lr, rank=spec.rank, update_proj_gap=spec.gap, adaptive_gap=spec.adaptive,
        max_grad_norm=1.0, svd_method=spec.svd_method, seed=spec.seed),
        names={p: n for n, p in model.named_parameters()})
    return model, optimizer


def _svd_counts(optimizer: QGaLoreAdamW8bit) -> dict[str, int]:
    return {optimizer.name_of(p): optimizer.state[p]["projector"].schedule.svd_count for p in optimizer.galore_params}


def _record_refreshes(optimizer: QGaLoreAdamW8bit, before: dict[str, int], step: int, events: dict) -> None:
    """Append ``step``, the new gap and (adaptive, from the 2nd SVD on) the queued cosine of
    every matrix whose SVD count moved during this step."""
    for p in optimizer.galore_params:
        name, schedule = optimizer.name_of(p), optimizer.state[p]["projector"].schedule
        if schedule.svd_count == before[name]:
            continue
        record = events[name]
        record["steps"].append(step)
        record["gap_after"].append(schedule.gap)
        if schedule.adaptive and schedule.svd_count > 1:
            record["cosines"].append(schedule.queue[-1])


@torch.no_grad()
def validation_loss(model: torch.nn.Module, data: Any) -> float:
    """Mean next-token loss over the held-out sequences (equal-length batches)."""
    losses = [float(model(input_ids=ids, labels=ids).loss) for ids in val_batches(data, rank=0, world=1, micro_batch=8)]
    return sum(losses) / len(losses)


def train_run(spec: RunSpec) -> dict[str, Any]:
    """Train one run; returns its SVD events, losses and (``probe``) the real-gradient check."""
    torch.set_num_threads(1)
    data = build_data(DataConfig(source="builtin", seq_len=spec.seq_len))
    model, optimizer = build_training(spec, data.tokenizer.vocab_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        warmup_cosine, total_steps=spec.steps, warmup_steps=spec.warmup, min_lr_ratio=0.1))
    stream = TrainStream(data, rank=0, world=1, micro_batch=spec.micro_batch, seed=spec.seed)
    events = {optimizer.name_of(p): {"shape": list(p.shape), "steps": [], "gap_after": [], "cosines": []}
              for p in optimizer.galore_params}
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(spec.steps):
        if time.perf_counter() - start > 60 * spec.max_minutes:
            break
        ids = stream.next_batch()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        before = _svd_counts(optimizer)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        _record_refreshes(optimizer, before, step, events)
        losses.append(round(float(loss.detach()), 5))
        if (step + 1) % 250 == 0:
            print(f"[svd] {spec.label}: step {step + 1}/{spec.steps}, loss {losses[-1]:.3f}, "
                  f"{optimizer.svd_count} SVDs, {time.perf_counter() - start:.0f} s", flush=True)
    model.eval()
    result = {
        "spec": {**asdict(spec), "label": spec.label}, "steps_done": len(losses), "wall_s": time.perf_counter() - start,
        "svd_total": optimizer.svd_count, "skipped_steps": optimizer.skipped_steps, "events": events,
        "losses": losses, "final_train_loss": statistics.fmean(losses[-LOSS_TAIL:]) if losses else math.nan,
        "val_loss": validation_loss(model, data), "data": data.description,
    }
    if spec.probe:
        result["real_gradient"] = probe_real_gradients(model, data, spec.rank)
    return result


def full_gradients(model: torch.nn.Module, data: Any) -> dict[str, torch.Tensor]:
    """Full fp32 weight gradient of every INT8 layer, summed over the held-out sequences."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    for layer in layers.values():
        layer.grad_sink, layer.weight_grad = accumulate_full_grad, None
    for ids in val_batches(data, rank=0, world=1, micro_batch=8):
        model(input_ids=ids, labels=ids).loss.backward()
    return {f"{n}.weight": layer.weight_grad for n, layer in layers.items()}


def probe_real_gradients(model: torch.nn.Module, data: Any, rank: int) -> list[dict[str, Any]]:
    """Exact vs randomized basis of the largest trained matrices' real gradients."""
    grads = full_gradients(model, data)
    largest = max(g.numel() for g in grads.values())
    return [{"matrix": name, **compare_bases(grad, rank, repeats=3, budget_s=30.0)}
            for name, grad in grads.items() if grad.numel() == largest]


# ----------------------------------------------------------------------------- exact vs randomized
def principal_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the column spans of orthonormal ``a``, ``b``."""
    return torch.linalg.svdvals(a.T.double() @ b.double()).clamp(0.0, 1.0)


def projection_error(grad: torch.Tensor, basis: torch.Tensor, side: str) -> float:
    """||G - P P^T G||_F / ||G||_F for a left basis (m, r); ||G - G P^T P|| for a right one (r, n)."""
    g, p = grad.double(), basis.double()
    residual = g - p @ (p.T @ g) if side == "left" else g - (g @ p.T) @ p
    return float(residual.norm() / g.norm())


def power_law_exponent(singular_values: torch.Tensor) -> float:
    """alpha of s_i ~ i^-alpha, least squares in log-log over the first half of the spectrum
    (a finite batch's gradient drops off at the end)."""
    s = singular_values.double()[: max(2, singular_values.numel() // 2)]
    x, y = torch.arange(1, s.numel() + 1, dtype=torch.float64).log(), s.clamp_min(1e-30).log()
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    return float(-slope)


def timed_repeats(fn: Callable[[int], Any], repeats: int, budget_s: float) -> tuple[list[float], list[float], Any]:
    """Seconds and 1-minute load average of ``fn(0)``, ``fn(1)``, ... (the call index seeds the
    randomized SVD, new at every refresh), up to ``repeats`` calls or until ``budget_s`` is spent."""
    times, loads, value = [], [], None
    for call in range(repeats):
        loads.append(os.getloadavg()[0])
        start = time.perf_counter()
        value = fn(call)
        times.append(time.perf_counter() - start)
        if sum(times) >= budget_s:
            break
    return times, loads, value


def compare_bases(grad: torch.Tensor, rank: int, *, repeats: int, budget_s: float,
                  exact: tuple[list[float], list[float], tuple] | None = None) -> dict[str, Any]:
    """Timings and subspace agreement of exact vs randomized top-``rank`` bases of ``grad``.
    ``exact`` reuses an already timed exact SVD of the same matrix."""
    std_side = choose_side(tuple(grad.shape), "std")
    if exact is None:
        exact = timed_repeats(lambda _: torch.linalg.svd(grad, full_matrices=False), repeats, budget_s)
    exact_times, exact_loads, (u, s, vh) = exact
    rand_times, rand_loads, basis = timed_repeats(lambda seed: svd_basis(
        grad, rank, std_side, method="randomized", oversample=8, power_iters=2, seed=seed), repeats, budget_s)
    if std_side == "left":  # B = Q^T G = Ub S Vh gives (Q Ub)^T G = S Vh: the right side without a second sketch
        rand = {"left": basis, "right": F.normalize(basis.T @ grad, dim=1)}
    else:  # G v_i is not S u_i (G is not Q Q^T G): rerun the last seed for the left side
        rand = {"right": basis, "left": svd_basis(grad, rank, "left", method="randomized", oversample=8,
                                                  power_iters=2, seed=len(rand_times) - 1)}
    exact_bases = {"left": u[:, :rank], "right": vh[:rank]}
    agreement = {}
    for side in ("left", "right"):
        a, b = exact_bases[side], rand[side]
        cos = principal_cosines(a, b) if side == "left" else principal_cosines(a.T, b.T)
        agreement[side] = {"mean_cos": float(cos.mean()), "min_cos": float(cos.min()),
                           "error_exact": projection_error(grad, a, side),
                           "error_randomized": projection_error(grad, b, side)}
    s64 = s.double()
    return {
        "shape": list(grad.shape), "rank": rank, "std_side": std_side,
        "exact_s": exact_times, "exact_loadavg": exact_loads,
        "randomized_s": rand_times, "randomized_loadavg": rand_loads,
        "optimal_error": float(s64[rank:].norm() / s64.norm()),
        "spectrum_alpha_fit": power_law_exponent(s), "gap_ratio_s_r_over_s_r1": float(s64[rank - 1] / s64[rank]),
        "agreement": agreement,
    }


def synthetic_gradient(m: int, n: int, alpha: float, factors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``U diag(s) V^T`` with ``s_i = i^-alpha`` (i = 1..min(m, n)), scaled to unit norm."""
    u, v = factors
    s = torch.arange(1, min(m, n) + 1, dtype=torch.float32) ** -alpha
    return ((u * (s / s.norm())) @ v.T).contiguous()


def random_orthonormal_factors(m: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, k) and (n, k) matrices with orthonormal columns, k = min(m, n), from seeded Gaussians."""
    gen, k = torch.Generator().manual_seed(seed), min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen))
    return u, v


def validate_count(part: dict[str, Any], steps: int) -> list[str]:
    """Schedule invariants every run must satisfy; returns the failures."""
    failures = []
    for run in part["runs"]:
        label, gap = run["spec"]["label"], run["spec"]["gap"]
        if run["steps_done"] != steps or not all(math.isfinite(x) for x in run["losses"]):
            failures.append(f"{label}: {run['steps_done']}/{steps} steps, or a non-finite loss")
            continue
        if run["svd_total"] != sum(len(e["steps"]) for e in run["events"].values()):
            failures.append(f"{label}: optimizer.svd_count disagrees with the recorded SVD events")
        fixed, best = fixed_refresh_steps(steps, gap), adaptive_refresh_steps(steps, gap)
        for name, e in run["events"].items():
            if not run["spec"]["adaptive"] and e["steps"] != fixed:
                failures.append(f"{label} {name}: SVD steps {e['steps'][:6]}... are not 0, T, 2T, ...")
            if run["spec"]["adaptive"] and not (len(best) <= len(e["steps"]) <= len(fixed)
                                                and set(e["steps"]) <= set(fixed) and e["steps"][:6] == fixed[:6]):
                failures.append(f"{label} {name}: SVD steps {e['steps']} break the adaptive rule")
    return failures


def validate_timing(rows: list[dict[str, Any]], tol: float = 1e-3) -> list[str]:
    """Eckart-Young sanity: the exact basis reaches the optimal error, no basis beats it."""
    failures = []
    for row in rows:
        for side, a in row["agreement"].items():
            where = f"{row['shape']} r={row['rank']} alpha={row.get('alpha', '-')} {side}"
            if abs(a["error_exact"] - row["optimal_error"]) > tol * max(row["optimal_error"], 1e-3):
                failures.append(f"{where}: exact basis error {a['error_exact']:.6f} != optimum "
                                f"{row['optimal_error']:.6f}")
            if a["error_randomized"] < row["optimal_error"] * (1 - tol) - 1e-6:
                failures.append(f"{where}: randomized error {a['error_randomized']:.6f} beats the optimum")
    return failures
