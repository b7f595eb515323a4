"""Sketched refresh (analysis only): reduce randomized-range-finder sketches instead of full gradients.

Why it works
    On a refresh step the owner needs a basis of mean_i G_i.  A randomized range finder only
    touches G through products with shared matrices, and (sum_i G_i) Omega = sum_i (G_i Omega):
    every rank multiplies its own gradient by the same seeded Gaussian Omega and the sketches are
    summed instead of the gradients.  With A = G (left projector, m < n, P = U[:, :r]) or A = G^T
    (right projector), k = r + p columns (p = ``svd_oversample``, 8 as in
    ``qgalore_dist/core/projector.py``) and q power iterations:

        Y = A Omega  (a x k)                                   reduction 1
        q times: Q = qr(Y); Z = A^T Q (b x k); Q' = qr(Z); Y = A Q'   2 reductions each
        range:    basis = top-r left singular vectors of Y       -> 2q + 1 reductions
        range+B:  Q = qr(Y); B = Q^T A (k x b); basis = Q svd(B).U[:, :r]
                  (exactly ``svd_basis(method="randomized")``)   -> 2q + 2 reductions

    Each reduction but the last must be an all-reduce (every rank multiplies by the new Q); the
    last goes to the owner.  Bytes per rank (ring volumes as the package's meter counts them,
    fp32): all-reduce 2 (N-1)/N * S * 4, reduce (N-1)/N * S * 4; exact = the streamed
    ``full_grad_reduce``, (N-1)/N * m n * 4.  The INT4 projector broadcast is the same for both and
    left out of the per-matrix table.

What is measured (quality; the bytes are closed form)
    Projection error ||G - P P^T G||_F / ||G||_F on the side ``proj_type="std"`` projects, of the
    sketched basis against the exact SVD basis (the Eckart-Young optimum):
    * synthetic G = U diag(s) V^T at 4096 x 11008 (LLaMA-7B's MLP shape), U, V random orthonormal
      (``tests/svd_harness.py``), s_k = k^-alpha, alpha in ``--alphas``: the exact basis is U[:, :r]
      of the construction (no SVD needed; the benchmark checks its error equals ||s[r:]|| / ||s||);
    * real gradients: the full fp32 gradients of every GaLore matrix of a trained llama_9m
      (``--real-model``, an HF directory a ``qgalore-train`` run wrote) over 32 held-out sequences of
      the built-in corpus, at the run's rank 32 (exact = ``torch.linalg.svd``).
    The sketch seeds are 0, 1, ... (``--seeds``; the projector draws a new one per refresh); the
    table gives the mean and worst.  Linearity is checked once: the sum of two ranks' sketches
    equals the sketch of the summed gradient (relative difference printed).

Run from the repository root:  python benchmarks/sketch_refresh.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from benchmarks._common import RESULTS_DIR, environment, environment_md, write_outputs  # noqa: E402, I001
from qgalore_dist.core import choose_side, svd_basis  # noqa: E402
from qgalore_dist.estimate.comm import ours_refresh_all, ours_steady, ring  # noqa: E402
from qgalore_dist.estimate.model import model_shapes  # noqa: E402
from svd_harness import random_orthonormal_factors, synthetic_gradient  # noqa: E402  (tests/, through _common)

MiB = 2**20
QS = (0, 1, 2)
VARIANT_LABEL = {"range": "range (2q+1)", "range_b": "range+B (2q+2)"}


# ----------------------------------------------------------------------------- bytes (closed form)
def sketch_reductions(m: int, n: int, rank: int, oversample: int, q: int, side: str) -> dict[str, list[int]]:
    """Elements of each reduction, in order, per variant (the last one goes to the owner)."""
    a, b = (m, n) if side == "left" else (n, m)
    k = min(rank + oversample, m, n)
    sizes = [a * k] + [x for _ in range(q) for x in (b * k, a * k)]
    return {"range": sizes, "range_b": sizes + [k * b]}


def reduction_bytes(sizes: list[int], world: int, b: int = 4) -> float:
    """All-reduces for every reduction but the last, a reduce to the owner for the last."""
    f = ring(world)
    return sum(2 * f * s * b for s in sizes[:-1]) + f * sizes[-1] * b


def exact_bytes(m: int, n: int, world: int) -> float:
    return ring(world) * m * n * 4


def bytes_table(shape: tuple[int, int], ranks: list[int], oversample: int, world: int) -> list[dict[str, Any]]:
    m, n = shape
    side = choose_side(shape, "std")
    rows = []
    for r in ranks:
        for q in QS:
            red = sketch_reductions(m, n, r, oversample, q, side)
            row = {"rank": r, "q": q, "side": side, "exact": exact_bytes(m, n, world)}
            for v, sizes in red.items():
                row[v] = reduction_bytes(sizes, world)
                row[f"{v}_reductions"] = len(sizes)
                row[f"{v}_ratio"] = row["exact"] / row[v]
            rows.append(row)
    return rows


def model_refresh_step(model: str, rank: int, oversample: int, world: int) -> list[dict[str, Any]]:
    """A whole refresh step (every matrix refreshing) of ``model``, everything 8-bit, with the
    full-gradient reduce replaced by the sketches, against DDP-bf16 and the steady step."""
    tensors = model_shapes(model, 1).as_tuples()
    kw = dict(b_lowrank=1, b_dense_grad=1, b_dense_param=2, compress=True, compress_dense=True)
    steady = sum(ours_steady(tensors, rank, world, **kw).values())
    refresh = ours_refresh_all(tensors, rank, world, **kw)
    params = sum(torch.Size(s).numel() for _, s, _ in tensors)
    ddp = 2 * ring(world) * 2 * params
    base = sum(refresh.values()) - refresh["full_grad_reduce"]
    rows = [{"method": "exact (streamed full gradients)", "q": None, "bytes": sum(refresh.values()), "rank": rank}]
    for q in QS:
        for v in ("range", "range_b"):
            sk = sum(reduction_bytes(sketch_reductions(*s, rank, oversample, q, choose_side(tuple(s), "std"))[v],
                                     world) for _, s, g in tensors if g)
            rows.append({"method": VARIANT_LABEL[v], "q": q, "bytes": base + sk, "rank": rank})
    for row in rows:
        row.update(ddp_bf16=ddp, steady=steady, ratio_ddp=ddp / row["bytes"],
                   over_steady=row["bytes"] / steady)
    return rows


# ----------------------------------------------------------------------------- quality
def projection_error(g: torch.Tensor, basis: torch.Tensor, side: str, g_sq: float) -> float:
    """||G - P P^T G||_F / ||G||_F = sqrt(1 - ||P^T G||^2 / ||G||^2) for orthonormal P."""
    proj = basis.T @ g if side == "left" else g @ basis.T
    return max(0.0, 1.0 - float(proj.double().square().sum()) / g_sq) ** 0.5


def sketched_bases(g: torch.Tensor, rank: int, side: str, oversample: int, seed: int,
                   qs: tuple[int, ...] = QS) -> dict[int, dict[str, torch.Tensor]]:
    """Both variants' bases (left (m, r) or right (r, n)) for every q, from one power-iteration run."""
    a = g if side == "left" else g.T
    k = min(rank + oversample, *a.shape)
    omega = torch.randn(a.shape[1], k, generator=torch.Generator().manual_seed(seed))
    y, out = a @ omega, {}
    for q in range(max(qs) + 1):
        if q > 0:
            qm, _ = torch.linalg.qr(y)
            z, _ = torch.linalg.qr(a.T @ qm)
            y = a @ z
        if q in qs:
            u_range = torch.linalg.svd(y, full_matrices=False)[0][:, :rank]
            qm, _ = torch.linalg.qr(y)
            ub = torch.linalg.svd(qm.T @ a, full_matrices=False)[0]
            u_b = qm @ ub[:, :rank]
            out[q] = {"range": u_range, "range_b": u_b} if side == "left" else {"range": u_range.T, "range_b": u_b.T}
    return out


def quality_rows(g: torch.Tensor, exact_basis: torch.Tensor, rank: int, oversample: int, seeds: int,
                 label: dict[str, Any]) -> list[dict[str, Any]]:
    side = choose_side(tuple(g.shape), "std")
    g_sq = float(g.double().square().sum())
    exact = projection_error(g, exact_basis, side, g_sq)
    per: dict[tuple[int, str], list[float]] = {}
    seconds = []
    for seed in range(seeds):
        t0 = time.perf_counter()
        bases = sketched_bases(g, rank, side, oversample, seed)
        seconds.append(time.perf_counter() - t0)
        for q, vs in bases.items():
            for v, basis in vs.items():
                per.setdefault((q, v), []).append(projection_error(g, basis, side, g_sq))
    rows = []
    for (q, v), errs in sorted(per.items()):
        mean = sum(errs) / len(errs)
        rows.append({**label, "rank": rank, "side": side, "q": q, "variant": v, "error_exact": exact,
                     "error_mean": mean, "error_max": max(errs), "excess_mean": mean / exact - 1 if exact else None,
                     "seeds": len(errs), "seconds_all_q": seconds})
    return rows


def check_randomized_matches(g: torch.Tensor, rank: int, oversample: int) -> float:
    """Projection error of range+B (q = 2, seed 0) minus ``svd_basis("randomized")``'s: the same algorithm."""
    side = choose_side(tuple(g.shape), "std")
    g_sq = float(g.double().square().sum())
    ours = sketched_bases(g, rank, side, oversample, 0, qs=(2,))[2]["range_b"]
    lib = svd_basis(g, rank, side, method="randomized", oversample=oversample, power_iters=2, seed=0)
    return abs(projection_error(g, ours, side, g_sq) - projection_error(g, lib, side, g_sq))


def linearity_check(g: torch.Tensor, rank: int, oversample: int) -> float:
    """max |sum_i (G_i Omega) - (sum_i G_i) Omega| / max |G Omega| for a random two-rank split."""
    gen = torch.Generator().manual_seed(1)
    g1 = torch.randn(g.shape, generator=gen) * g.std()
    g2 = g - g1
    omega = torch.randn(g.shape[1], rank + oversample, generator=gen)
    whole = g @ omega
    return float((g1 @ omega + g2 @ omega - whole).abs().max() / whole.abs().max())


def synthetic_part(args: argparse.Namespace) -> dict[str, Any]:
    m, n = args.shape
    t0 = time.perf_counter()
    u, v = random_orthonormal_factors(m, n, 0)
    rows, checks = [], {}
    for alpha in args.alphas:
        g = synthetic_gradient(m, n, alpha, (u, v))
        s = torch.arange(1, min(m, n) + 1, dtype=torch.float64) ** -alpha
        for r in args.ranks:
            print(f"[sketch] synthetic alpha={alpha} r={r}", flush=True)
            side = choose_side((m, n), "std")
            exact_basis = u[:, :r] if side == "left" else v[:, :r].T
            new = quality_rows(g, exact_basis, r, args.oversample, args.seeds, {"source": f"synthetic alpha={alpha}",
                                                                                "shape": [m, n]})
            for row in new:
                row["optimal_error"] = float(s[r:].norm() / s.norm())
            rows += new
        if alpha == args.alphas[0]:
            checks["linearity_rel_diff"] = linearity_check(g, args.ranks[0], args.oversample)
            checks["range_b_vs_svd_basis_randomized_error_diff"] = check_randomized_matches(g, args.ranks[0],
                                                                                           args.oversample)
        del g
    return {"rows": rows, "checks": checks, "seconds": time.perf_counter() - t0}


def real_part(args: argparse.Namespace) -> dict[str, Any]:
    """Full gradients of a trained llama_9m (HF directory) over held-out sequences of the corpus."""
    from transformers import LlamaForCausalLM

    from qgalore_dist.train.data import DataConfig, build_data, val_batches

    model = LlamaForCausalLM.from_pretrained(str(args.real_model), torch_dtype=torch.float32)
    data = build_data(DataConfig(source="builtin", seq_len=128))
    for i, ids in enumerate(val_batches(data, rank=0, world=1, micro_batch=8)):
        if i >= 4:
            break
        model(input_ids=ids, labels=ids).loss.backward()
    rows = []
    for name, p in model.named_parameters():
        if p.grad is None or p.dim() != 2 or "embed" in name or "lm_head" in name:
            continue
        g = p.grad.detach().float().contiguous()
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        side = choose_side(tuple(g.shape), "std")
        exact_basis = u[:, :args.real_rank] if side == "left" else vh[:args.real_rank]
        rows += quality_rows(g, exact_basis, args.real_rank, args.oversample, args.seeds,
                             {"source": "llama_9m real", "matrix": name, "shape": list(g.shape)})
    return {"model_dir": str(args.real_model), "rows": rows}


# ----------------------------------------------------------------------------- output
def _agg_real(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Real matrices grouped by shape: mean over matrices of the mean error, worst error."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((tuple(r["shape"]), r["q"], r["variant"]), []).append(r)
    out = []
    for (shape, q, v), rs in sorted(groups.items()):
        out.append({"shape": list(shape), "q": q, "variant": v, "matrices": len(rs), "rank": rs[0]["rank"],
                    "error_exact": sum(r["error_exact"] for r in rs) / len(rs),
                    "error_mean": sum(r["error_mean"] for r in rs) / len(rs),
                    "error_max": max(r["error_max"] for r in rs),
                    "excess_mean": sum(r["excess_mean"] for r in rs) / len(rs)})
    return out


def markdown(p: dict[str, Any]) -> str:
    a = p["args"]
    lines = ["# Sketched refresh: bytes and subspace quality (analysis, not implemented)", "",
             environment_md(p["environment"]),
             f"- load average (1 min) before / after: {p['loadavg_before']:.1f} / {p['loadavg_after']:.1f} "
             f"(2 cores shared); wall time {p['wall_s']:.0f} s", "",
             "Method and formulas: the docstring of `benchmarks/sketch_refresh.py`. Bytes are closed form "
             f"(fp32 payloads, N = {a['world']} ranks, per rank per refresh of one matrix); errors are measured.", "",
             f"## 1. Bytes per rank per refresh, {a['shape'][0]} x {a['shape'][1]} (std side: "
             f"{p['bytes'][0]['side']}), p = {a['oversample']}", "",
             "| r | q | exact MiB | range (2q+1) MiB | reductions | exact / range | range+B (2q+2) MiB | reductions "
             "| exact / range+B |", "|---" * 9 + "|"]
    for r in p["bytes"]:
        lines.append(f"| {r['rank']} | {r['q']} | {r['exact'] / MiB:,.1f} | {r['range'] / MiB:,.2f} | "
                     f"{r['range_reductions']} | {r['range_ratio']:.1f}x | {r['range_b'] / MiB:,.2f} | "
                     f"{r['range_b_reductions']} | {r['range_b_ratio']:.1f}x |")
    mr = p["model_refresh"]
    lines += ["", f"## 2. A whole LLaMA-7B refresh step, N = {a['world']}, everything 8-bit "
              "(`compress_lowrank` + `compress_dense`), every matrix refreshing", "",
              "DDP-bf16: " + f"{mr[0]['ddp_bf16'] / MiB:,.1f} MiB per rank; steady step: "
              + ", ".join(f"r = {r['rank']}: {r['steady'] / MiB:,.1f} MiB" for r in mr if r["q"] is None) + ".", "",
              "| r | full-gradient exchange | q | MiB per rank | refresh / steady | DDP-bf16 / refresh |",
              "|---|---|---|---|---|---|"]
    for r in mr:
        lines.append(f"| {r['rank']} | {r['method']} | {'' if r['q'] is None else r['q']} | {r['bytes'] / MiB:,.1f} | "
                     f"{r['over_steady']:.2f}x | {r['ratio_ddp']:.2f}x |")
    lines += ["", f"## 3. Subspace quality: ||G - P P^T G||_F / ||G||_F ({a['seeds']} sketch seeds: mean, worst)", "",
              "| G | r | q | variant | exact SVD | sketched mean | sketched worst | excess over exact (mean) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in p["synthetic"]["rows"]:
        lines.append(f"| {r['source']}, {r['shape'][0]}x{r['shape'][1]} | {r['rank']} | {r['q']} | "
                     f"{VARIANT_LABEL[r['variant']]} | {r['error_exact']:.4f} | {r['error_mean']:.4f} | "
                     f"{r['error_max']:.4f} | {100 * r['excess_mean']:+.1f}% |")
    for r in p.get("real_summary", []):
        lines.append(f"| llama_9m real gradients, {r['matrices']} x {r['shape'][0]}x{r['shape'][1]} | {r['rank']} | "
                     f"{r['q']} | {VARIANT_LABEL[r['variant']]} | {r['error_exact']:.4f} | {r['error_mean']:.4f} | "
                     f"{r['error_max']:.4f} | {100 * r['excess_mean']:+.1f}% |")
    c = p["synthetic"]["checks"]
    lines += ["", "Checks: exact-basis error equals ||s[r:]|| / ||s|| (max |difference| "
              f"{p['optimal_check']:.1e}); linearity: two ranks' summed sketches vs the sketch of the sum, max "
              f"relative difference {c['linearity_rel_diff']:.1e} (fp32 rounding); range+B at q = 2 vs "
              "`svd_basis(method=\"randomized\")` error difference "
              f"{c['range_b_vs_svd_basis_randomized_error_diff']:.1e}.",
              ""]
    return "\n".join(lines)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=2, default=[4096, 11008])
    ap.add_argument("--ranks", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--oversample", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--real-model", type=Path, default=None, help="HF directory of a trained llama_9m")
    ap.add_argument("--real-rank", type=int, default=32)
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    payload: dict[str, Any] = {"environment": environment(), "description": __doc__,
                               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                               "loadavg_before": load_before}
    payload["bytes"] = bytes_table(tuple(args.shape), args.ranks, args.oversample, args.world)
    payload["model_refresh"] = [row for r in args.ranks
                                for row in model_refresh_step("llama_7b", r, args.oversample, args.world)]
    if args.real_model is not None:
        payload["real"] = real_part(args)
        payload["real_summary"] = _agg_real(payload["real"]["rows"])
    payload["synthetic"] = synthetic_part(args)
    payload["optimal_check"] = max(abs(r["error_exact"] - r["optimal_error"]) for r in payload["synthetic"]["rows"])
    payload["loadavg_after"] = os.getloadavg()[0]
    payload["wall_s"] = time.perf_counter() - start
    md = markdown(payload)
    json_path, md_path = write_outputs("sketch_refresh", payload, md, args.out_dir)
    print(md)
    print(f"\nwrote {json_path} and {md_path} ({payload['wall_s']:.0f} s)")
    return 0 if payload["optimal_check"] < 1e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
