"""CPU wall time of ``optimizer.step()``: QGaLoreAdamW8bit vs bitsandbytes AdamW8bit.

What is measured
    Only ``optimizer.step()`` (``time.perf_counter`` around the call); no forward or backward.
    Both optimizers see the same fixed random fp32 gradients, drawn once per parameter from a
    seeded generator and re-attached before every step (outside the timed region):
    ``layer.weight_grad`` for the ``Int8Linear`` layers of the Q-GaLore model, ``p.grad`` for
    every other parameter and for all parameters of the float model given to AdamW8bit.

    The model is ``configs/models/llama_20m.json`` (fp32, vocab 32000 by default).  Three scopes:

    * ``full``:   every trainable parameter;
    * ``galore``: only the 28 GaLore matrices (q/k/v/o/gate/up/down): INT8 + rank-r 8-bit Adam
      + INT4 projector for Q-GaLore, plain 8-bit Adam on the fp32 matrices for AdamW8bit;
    * ``dense``:  only embeddings, RMSNorms and lm_head (8-bit Adam in both).

    Q-GaLore runs the fixed schedule (``adaptive_gap=False``) with ``update_proj_gap`` = ``--gap``
    so that every GaLore matrix refreshes its projector (exact SVD + INT4 quantization) on the
    same steps; steps with and without a refresh are reported separately (classified by
    ``optimizer.svds_last_step``).  The two optimizers' steps are interleaved (one of each per
    iteration) so that both see the same background load.  The first ``--warmup`` steps (state
    allocation, the first SVDs) are not reported; statistics are medians of the remaining steps.

Run from the repository root:  python benchmarks/step_time.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from benchmarks._common import RESULTS_DIR, environment, environment_md, load_config, write_outputs  # noqa: E402
from qgalore_dist import QGaLoreAdamW8bit, QGaLoreConfig, prepare_model  # noqa: E402
from qgalore_dist.core import DEFAULT_TARGET_MODULES, int8_layer_of  # noqa: E402

SCOPES = ("full", "galore", "dense")


# ----------------------------------------------------------------------------- set-up
def build_models(config_name: str, vocab: int, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same initial LLaMA twice: fp32 (for AdamW8bit) and ``prepare_model``-converted (Q-GaLore)."""
    from transformers import LlamaForCausalLM

    config = load_config(config_name, vocab_size=vocab)
    torch.manual_seed(seed)
    float_model = LlamaForCausalLM(config)
    torch.manual_seed(seed)
    int8_model = prepare_model(LlamaForCausalLM(config))
    return float_model, int8_model


def is_galore_name(name: str) -> bool:
    """GaLore matrices are the weights of the q/k/v/o/gate/up/down projections."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in DEFAULT_TARGET_MODULES


def scope_params(model: torch.nn.Module, scope: str) -> list[tuple[str, torch.Tensor]]:
    """Trainable (or INT8) parameters of ``model`` that belong to ``scope``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or p.dtype == torch.uint8]
    if scope == "galore":
        return [(n, p) for n, p in named if is_galore_name(n)]
    if scope == "dense":
        return [(n, p) for n, p in named if not is_galore_name(n)]
    return named


def fixed_grads(named: list[tuple[str, torch.Tensor]], seed: int) -> dict[str, torch.Tensor]:
    """One fp32 N(0, 0.01^2) gradient per parameter name, from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=gen) * 1e-2 for n, p in named}


def attach_grads(named: list[tuple[str, torch.Tensor]], grads: dict[str, torch.Tensor]) -> None:
    """``layer.weight_grad`` for INT8 weights, ``p.grad`` (in the parameter's dtype) otherwise."""
    for name, p in named:
        layer = int8_layer_of(p)
        if layer is not None:
            layer.weight_grad = grads[name]
        else:
            p.grad = grads[name].to(p.dtype)


# ----------------------------------------------------------------------------- timing
def timed_step(optimizer: torch.optim.Optimizer) -> float:
    """Seconds spent in one ``optimizer.step()``."""
    start = time.perf_counter()
    optimizer.step()
    return time.perf_counter() - start


def stats(times: list[float]) -> dict[str, Any]:
    """Median / mean / min / max in milliseconds and the count."""
    if not times:
        return {"n": 0}
    ms = [1e3 * t for t in times]
    return {"n": len(ms), "median_ms": statistics.median(ms), "mean_ms": statistics.fmean(ms),
            "min_ms": min(ms), "max_ms": max(ms)}


def run_scope(scope: str, args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved AdamW8bit / Q-GaLore steps on one scope of the model."""
    import bitsandbytes as bnb

    float_model, int8_model = build_models(args.config, args.vocab, args.seed)
    f_named, q_named = scope_params(float_model, scope), scope_params(int8_model, scope)
    assert [n for n, _ in f_named] == [n for n, _ in q_named]
    grads = fixed_grads(f_named, args.seed + 1)
    common = dict(lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    adamw8bit = bnb.optim.AdamW8bit([p for _, p in f_named], **common)
    qgalore = QGaLoreAdamW8bit([p for _, p in q_named], QGaLoreConfig(
        **common, rank=args.rank, update_proj_gap=args.gap, scale=0.25, adaptive_gap=False, seed=args.seed))

    bnb_times, q_plain, q_refresh = [], [], []
    for i in range(args.warmup + args.steps):
        attach_grads(f_named, grads)
        t_bnb = timed_step(adamw8bit)
        attach_grads(q_named, grads)
        t_q = timed_step(qgalore)
        if i < args.warmup:
            continue
        bnb_times.append(t_bnb)
        (q_refresh if qgalore.svds_last_step else q_plain).append(t_q)
    n_galore = sum(1 for n, _ in q_named if is_galore_name(n))
    return {
        "scope": scope,
        "params": sum(p.numel() for _, p in f_named),
        "galore_matrices": n_galore,
        "adamw8bit": stats(bnb_times),
        "qgalore_no_refresh": stats(q_plain),
        "qgalore_refresh": stats(q_refresh) if n_galore else {"n": 0},
        "svds_per_refresh_step": n_galore,
    }


# ----------------------------------------------------------------------------- report
def _ms(s: dict[str, Any]) -> str:
    return f"{s['median_ms']:.1f}" if s.get("n") else "-"


def _ratio(a: dict[str, Any], b: dict[str, Any]) -> str:
    return f"{a['median_ms'] / b['median_ms']:.2f}" if a.get("n") and b.get("n") else "-"


def markdown(payload: dict[str, Any]) -> str:
    """Markdown table of the medians and the set-up."""
    a = payload["args"]
    lines = ["# Optimizer step time on CPU: QGaLoreAdamW8bit vs bitsandbytes AdamW8bit", "",
             environment_md(payload["environment"]),
             f"- load average (1 min) before / after: {payload['loadavg_before']:.2f} / {payload['loadavg_after']:.2f}",
             "", f"**The CPU ({payload['environment']['machine']['cpu_count']} cores) was shared with other jobs "
             "during this run: absolute times are contended and noisy; compare within a row (the two optimizers' "
             "steps are interleaved, so both saw the same load).**", "",
             f"Model `{a['config']}` (vocab {a['vocab']}, fp32), torch threads {a['threads']}, rank {a['rank']}, "
             f"fixed projector gap {a['gap']} (every GaLore matrix refreshes on the same steps), "
             f"{a['warmup']} warm-up + {a['steps']} timed steps per optimizer and scope; only `optimizer.step()` is "
             "timed, with fixed random gradients. Milliseconds, medians (n = number of steps in the median).", "",
             "| scope | params | AdamW8bit | Q-GaLore, no refresh | Q-GaLore, refresh step | "
             "no-refresh / AdamW8bit | refresh / AdamW8bit |", "|---|---|---|---|---|---|---|"]
    for r in payload["results"]:
        b, p, f = r["adamw8bit"], r["qgalore_no_refresh"], r["qgalore_refresh"]
        lines.append(f"| {r['scope']} | {r['params']:,} | {_ms(b)} (n={b['n']}) | {_ms(p)} (n={p['n']}) | "
                     f"{_ms(f)} (n={f['n']}) | {_ratio(p, b)} | {_ratio(f, b)} |")
    lines += ["", "Refresh steps run one exact SVD per GaLore matrix "
              f"({payload['results'][0]['svds_per_refresh_step']} in scope `full`) plus INT4 quantization. "
              "Amortised over the reference's initial gap T = 200 the refresh adds "
              "(refresh - no-refresh) / 200 per step:", ""]
    for r in payload["results"]:
        p, f = r["qgalore_no_refresh"], r["qgalore_refresh"]
        if p.get("n") and f.get("n"):
            extra = f["median_ms"] - p["median_ms"]
            lines.append(f"- `{r['scope']}`: {extra:.1f} ms per refresh step, {extra / 200:.2f} ms/step at T = 200.")
    lines += ["", "Full statistics (mean/min/max) are in `step_time.json`."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="llama_20m")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--gap", type=int, default=5, help="projector refresh every GAP steps (fixed schedule)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25, help="timed steps per optimizer and scope")
    parser.add_argument("--scopes", nargs="+", default=list(SCOPES), choices=SCOPES)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 by default because with 2 OpenMP threads on a shared 2-core "
                             "machine a 688x256 SVD varied from 0.03 s to 4 s")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    results = [run_scope(s, args) for s in args.scopes]
    payload = {
        "environment": environment(),
        "description": __doc__,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg()[0],
        "wall_s": time.perf_counter() - start,
        "results": results,
    }
    json_path, md_path = write_outputs("step_time", payload, markdown(payload), args.out_dir)
    print(markdown(payload))
    print(f"\nwrote {json_path} and {md_path} ({payload['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
