"""Bytes of weights + optimizer state (+ GaLore projectors) for LLaMA 60M-7B, by closed form.

What is measured
    For each model the parameter shapes come from ``LlamaForCausalLM`` built on
    ``torch.device('meta')`` (nothing is allocated); GaLore matrices are the ``nn.Linear`` layers
    named q/k/v/o/gate/up/down_proj (Q-GaLore's ``target_modules``; for these LLaMAs the same
    set as GaLore's "attn"/"mlp" rule; ``qgalore_dist.estimate.model`` derives the same list from
    the config alone, checked here on every config).  Each approach's bytes are then a closed
    form per tensor: ``qgalore_dist.estimate.states`` (its docstring lists the approaches:
    AdamW fp32 / bf16 states, bnb AdamW8bit, GaLore bf16 / 8-bit, the Q-GaLore reference as
    stored, and qgalore-dist).  Not included anywhere: gradients, activations, temporaries, the
    shared 8-bit quantile maps and the RoPE buffers.

Validation
    A tiny real model (``llama_9m`` shapes, small vocab) is converted with ``prepare_model``,
    optimized one step by ``QGaLoreAdamW8bit``, and the bytes of every tensor it really holds
    (parameters, buffers, ``Moment.nbytes()`` of exp_avg/exp_avg_sq, projector codes / scales /
    zeros / past vector) are compared, component by component, with the ``qgalore_dist`` formula
    evaluated on the meta-device shapes of the same config.

Per rank (``benchmarks/memory_ranks.py``; conventions and formulas: ``qgalore_dist/estimate/ranks.py``)
    Weights, gradients, optimizer, projectors, communication buffers and peak on the most loaded
    of N = 1, 2, 4, 8, 64 ranks, ours vs. DDP/ZeRO-2 baselines; the 7B-at-8-ranks target; a PNG;
    and the accounting checked against the measured RSS of 2 gloo ranks (exit code 1 if outside).
    The FSDP2 rows (``benchmarks/memory_fsdp.py``) are checked byte for byte against the tensors a
    real 2-rank gloo FSDP2 run holds (exit code 1 if any component differs).

Run from the repository root:  python benchmarks/memory.py   (about 1 min on 2 idle cores)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from benchmarks import memory_fsdp, memory_ranks, memory_rss  # noqa: E402
from benchmarks._common import RESULTS_DIR, environment, environment_md, load_config, meta_model, write_outputs  # noqa: E402
from qgalore_dist.core import DEFAULT_TARGET_MODULES  # noqa: E402
from qgalore_dist.estimate.model import Layout, Tensor, model_shapes, model_tensors, param_counts  # noqa: E402
from qgalore_dist.estimate.states import APPROACHES, GiB, account, lowrank_numel, qgalore_dist_components, sum_dicts  # noqa: E402

# Ranks of the GaLore / Q-GaLore C4 scripts (reference doc section 3.2/3.3); the papers use 512 at 1B.
SCRIPT_RANKS = {"llama_60m": 128, "llama_130m": 256, "llama_350m": 256, "llama_1b": 1024, "llama_7b": 1024}

# Parameter counts of the reference doc section 1.5 (millions): total, GaLore-managed, embed+head.
DOC_COUNTS_M = {
    "llama_60m": (58.1, 25.3, 32.8), "llama_130m": (134.1, 84.9, 49.2), "llama_350m": (368.0, 302.4, 65.5),
    "llama_1b": (1339, 1208, 131), "llama_7b": (6738, 6476, 262),
}

PAPER_RANKS = {"llama_60m": 128, "llama_130m": 256, "llama_350m": 256, "llama_1b": 512}

# Paper estimates of weights + optimizer states (G as printed): GaLore Table 2 / Q-GaLore Table 1,
# ranks 128/256/256/512.
PAPER_GB = {
    "Full-Rank (GaLore Tab. 2)": {"llama_60m": 0.36, "llama_130m": 0.76, "llama_350m": 2.06, "llama_1b": 7.80},
    "GaLore (GaLore Tab. 2)": {"llama_60m": 0.24, "llama_130m": 0.52, "llama_350m": 1.22, "llama_1b": 4.38},
    "Q-GaLore (Q-GaLore Tab. 1)": {"llama_60m": 0.18, "llama_130m": 0.39, "llama_350m": 0.88, "llama_1b": 3.08},
}


# ----------------------------------------------------------------------------- shapes of the real model
def meta_tensors(model: torch.nn.Module) -> list[Tensor]:
    """Every parameter of a (meta-device) HF model, GaLore matrices being the target ``nn.Linear``
    weights: what ``qgalore_dist.estimate.model.model_tensors`` must reproduce from the config."""
    galore = {f"{name}.weight" for name, mod in model.named_modules()
              if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in DEFAULT_TARGET_MODULES}
    return [Tensor(n, tuple(p.shape), n in galore) for n, p in model.named_parameters()]


# Reference doc section 3.1: hidden, intermediate, heads, layers, vocab, max_seq.
DOC_CONFIGS = {
    "llama_9m": (128, 352, 4, 4, 32000, 1024), "llama_20m": (256, 688, 4, 4, 32000, 1024),
    "llama_35m": (384, 1024, 8, 6, 32000, 1024), "llama_60m": (512, 1376, 8, 8, 32000, 1024),
    "llama_130m": (768, 2048, 12, 12, 32000, 1024), "llama_350m": (1024, 2736, 16, 24, 32000, 1024),
    "llama_1b": (2048, 5461, 32, 24, 32000, 1024), "llama_7b": (4096, 11008, 32, 32, 32000, 2048),
}


def config_checks() -> list[dict[str, Any]]:
    """Load every ``configs/models/llama_*.json`` with ``LlamaConfig.from_json_file`` and check it."""
    out = []
    for name, expected in DOC_CONFIGS.items():
        c = load_config(name)
        got = (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_hidden_layers, c.vocab_size,
               c.max_position_embeddings)
        fixed = (c.hidden_act == "silu" and c.rms_norm_eps == 1e-6 and c.initializer_range == 0.02
                 and c.bos_token_id == 0 and c.eos_token_id == 1 and c.pad_token_id is None
                 and not c.tie_word_embeddings)
        meta = meta_tensors(meta_model(c))
        counts = param_counts(meta)
        out.append({"config": name, "fields": dict(zip(("hidden", "intermediate", "heads", "layers", "vocab",
                                                        "max_position_embeddings"), got)),
                    "matches_doc_table": got == expected and fixed, "params": counts,
                    # the estimator's shapes, from the config alone, are the HF model's
                    "estimate_shapes_match": model_tensors(c.to_dict()) == meta})
    return out


# ----------------------------------------------------------------------------- the model table
def model_rows(models: list[str], ranks: dict[str, int]) -> list[dict[str, Any]]:
    """Per model: parameter counts (checked against the doc) and bytes per approach."""
    rows = []
    for name, rank in ((m, ranks[m]) for m in models):
        tensors = list(model_shapes(name.split("@")[0], rank).tensors)
        counts = param_counts(tensors)
        lay = Layout(rank=rank)
        row = {"model": name, "rank": rank, "params": counts,
               "approaches": {k: account(tensors, lay, fn) for k, (_, fn) in APPROACHES.items()}}
        doc = DOC_COUNTS_M.get(name.split("@")[0])
        if doc is not None:
            row["doc_counts_M"] = dict(zip(("total", "galore", "embed_head"), doc))
            row["counts_match_doc"] = all(
                _round_like(counts[k] / 1e6, ref) == ref for k, ref in row["doc_counts_M"].items())
        rows.append(row)
    return rows


def _round_like(value: float, ref: float) -> float:
    """Round ``value`` to as many decimals as the doc prints ``ref`` with (float: 1, int: 0)."""
    return round(value, 1) if isinstance(ref, float) else round(value)


# ----------------------------------------------------------------------------- validation on a real model
def measure_real(model: torch.nn.Module, optimizer) -> dict[str, int]:
    """Bytes the model and QGaLoreAdamW8bit really hold, in qgalore_dist_components' keys."""
    from qgalore_dist.core import Int8Linear

    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    out = dict.fromkeys(("dense_weights", "int8_codes", "int8_scales_zeros", "dense_state", "lowrank_state",
                         "proj_codes", "proj_scales_zeros", "proj_past_vector", "other_buffers",
                         "unaccounted_state"), 0)
    int8_buffers = set()
    for mod in model.modules():
        if isinstance(mod, Int8Linear):
            int8_buffers |= {id(mod.weight_scales), id(mod.weight_zeros)}
    for p in model.parameters():
        out["int8_codes" if p.dtype == torch.uint8 else "dense_weights"] += nbytes(p)
    for b in model.buffers():
        out["int8_scales_zeros" if id(b) in int8_buffers else "other_buffers"] += nbytes(b)
    for state in optimizer.state.values():
        key = "lowrank_state" if "projector" in state else "dense_state"
        for name, value in state.items():
            if name in ("exp_avg", "exp_avg_sq"):
                out[key] += value.nbytes()
            elif name == "projector":
                proj = value
                out["proj_codes"] += nbytes(proj.proj_codes) if proj.proj_codes is not None else 0
                out["proj_codes"] += nbytes(proj.proj) if proj.proj is not None else 0
                out["proj_scales_zeros"] += sum(nbytes(t) for t in (proj.proj_scales, proj.proj_zeros) if t is not None)
                past = proj.schedule.past_vector
                out["proj_past_vector"] += nbytes(past) if past is not None else 0
            elif torch.is_tensor(value):
                out["unaccounted_state"] += nbytes(value)
    return out


def validate(config_name: str, vocab: int, rank: int, dtype: torch.dtype, seed: int) -> dict[str, Any]:
    """One real Q-GaLore step on a tiny model; real bytes vs the formula on the same shapes."""
    from transformers import LlamaForCausalLM

    from qgalore_dist import QGaLoreAdamW8bit, QGaLoreConfig, prepare_model

    torch.manual_seed(seed)
    config = load_config(config_name, vocab_size=vocab, max_position_embeddings=64)
    lay = Layout(rank=rank, dense_bytes=torch.empty(0, dtype=dtype).element_size())
    model = prepare_model(LlamaForCausalLM(config).to(dtype))
    params = [p for p in model.parameters() if p.requires_grad or p.dtype == torch.uint8]
    opt = QGaLoreAdamW8bit(params, QGaLoreConfig(lr=1e-3, rank=rank, update_proj_gap=200, seed=seed))
    tokens = torch.randint(0, vocab, (2, 32))
    model(input_ids=tokens, labels=tokens).loss.backward()
    opt.step()

    measured = measure_real(model, opt)
    shapes = meta_model(config).to(dtype)  # .to(dtype) casts the RoPE buffers as it did the real model's
    tensors = model_tensors(config.to_dict())
    formula = sum_dicts([qgalore_dist_components(t, lay) for t in tensors])
    formula["other_buffers"] = sum(b.numel() * b.element_size() for b in shapes.buffers())
    formula["unaccounted_state"] = 0
    keys = list(measured)
    diff = {k: measured[k] - formula.get(k, 0) for k in keys}
    low_rank_sizes = sorted({lowrank_numel(t.shape, rank) for t in tensors if t.galore})
    return {
        "config": config_name, "vocab_size": vocab, "rank": rank, "dtype": str(dtype).replace("torch.", ""),
        "params": param_counts(tensors),
        "lowrank_state_numels": low_rank_sizes,
        "fp32_fallback_lowrank": [n for n in low_rank_sizes if n < lay.min_8bit_size],
        "measured": measured, "formula": formula, "difference": diff,
        "total_measured": sum(measured.values()), "total_formula": sum(formula[k] for k in keys),
        "exact_match": all(v == 0 for v in diff.values()),
    }


# ----------------------------------------------------------------------------- report
def gib(x: int) -> str:
    return f"{x / GiB:.3f}"


def markdown(payload: dict[str, Any]) -> str:
    """Markdown report of the model table, the paper comparison and the validation."""
    rows, lines = payload["models"], []
    lines += ["# Memory of weights + optimizer state (closed form, meta-device shapes)", "",
              environment_md(payload["environment"]), "",
              "Bytes of weights + optimizer state (+ GaLore projectors and Q-GaLore schedule vectors); "
              "no gradients, activations or temporaries. GiB = 2^30 bytes. "
              "Shapes from `LlamaForCausalLM` on `torch.device('meta')`; per-tensor formulas in the "
              "docstring of `benchmarks/memory.py`; exact byte counts in `memory.json`.", ""]
    lines += ["## Model configs (`configs/models/*.json`, loaded with `LlamaConfig.from_json_file`)", "",
              "| config | hidden | intermediate | heads | layers | vocab | max_pos | fields = doc 3.1 "
              "| params (meta) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in payload["configs"]:
        f = c["fields"]
        lines.append(f"| {c['config']} | {f['hidden']} | {f['intermediate']} | {f['heads']} | {f['layers']} | "
                     f"{f['vocab']} | {f['max_position_embeddings']} | {c['matches_doc_table']} | "
                     f"{c['params']['total']:,} |")
    lines += ["", "`pad_token_id` is `null`: the reference JSONs say -1, which transformers 5 rejects with a warning "
              "and turns into `padding_idx = vocab - 1` (embedding row 31999 zero-initialised, no gradient, as the "
              "reference effectively had); `null` gives no padding row. Common fields as in doc 3.1.", ""]
    lines += ["## Parameter counts (vs. reference doc section 1.5)", "",
              "| model | total | GaLore-managed | embed+head | doc (total / GaLore / embed+head) | match |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        c, d = r["params"], r.get("doc_counts_M")
        doc = f"{d['total']} / {d['galore']} / {d['embed_head']} M" if d else "-"
        lines.append(f"| {r['model']} | {c['total']:,} | {c['galore']:,} ({c['galore'] / c['total']:.0%}) | "
                     f"{c['embed_head']:,} | {doc} | {r.get('counts_match_doc', '-')} |")
    header = " | ".join(f"{r['model']} (r={r['rank']})" for r in rows)
    lines += ["", "## Total GiB (weights + optimizer state + projector)", "",
              f"| approach | {header} |", "|---|" + "---|" * len(rows)]
    for key, (desc, _) in APPROACHES.items():
        cells = " | ".join(gib(r["approaches"][key]["total"]) for r in rows)
        lines.append(f"| `{key}`: {desc} | {cells} |")
    lines += ["", "## Breakdown, GiB: weights / optimizer state / projector", "",
              f"| approach | {header} |", "|---|" + "---|" * len(rows)]
    for key in APPROACHES:
        cells = " | ".join(" / ".join(gib(r["approaches"][key][k]) for k in ("weights", "state", "projector"))
                           for r in rows)
        lines.append(f"| `{key}` | {cells} |")
    lines += ["", "## qgalore-dist relative to the others (total bytes)", "",
              f"| ratio | {header} |", "|---|" + "---|" * len(rows)]
    for key in ("adamw", "adamw8bit", "galore8bit", "qgalore_ref"):
        cells = " | ".join(f"{r['approaches']['qgalore_dist']['total'] / r['approaches'][key]['total']:.3f}"
                           for r in rows)
        lines.append(f"| qgalore_dist / {key} | {cells} |")
    lines += ["", "## Paper estimates (weights + optimizer states, ranks 128/256/256/512) for comparison", "",
              "| source | " + " | ".join(r["model"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    for src, vals in PAPER_GB.items():
        cells = [str(vals[b]) if (b := r["model"].split("@")[0]) in vals and r["rank"] == PAPER_RANKS[b] else "-"
                 for r in rows]
        lines.append(f"| {src} | " + " | ".join(cells) + " |")
    lines += ["", *payload["notes"], ""]
    lines += ["## Validation: formula vs. real state of a tiny model after one step", ""]
    for v in payload["validation"]:
        lines += _validation_md(v)
    return "\n".join(lines)


def _validation_md(v: dict[str, Any]) -> list[str]:
    lines = ["### " + f"{v['config']}, vocab {v['vocab_size']}, {v['dtype']}, rank {v['rank']}", "",
              f"`{v['config']}` shapes with vocab {v['vocab_size']}, {v['dtype']} dense weights, rank {v['rank']}, "
              f"`prepare_model` + `QGaLoreAdamW8bit`, one forward/backward/step. Low-rank state sizes "
              f"{v['lowrank_state_numels']} elements ({v['fp32_fallback_lowrank']} below 4096, so fp32).", "",
              "| component | measured bytes | formula bytes | difference |", "|---|---|---|---|"]
    for k in v["measured"]:
        lines.append(f"| {k} | {v['measured'][k]:,} | {v['formula'][k]:,} | {v['difference'][k]:,} |")
    lines += [f"| **total** | {v['total_measured']:,} | {v['total_formula']:,} | "
              f"{v['total_measured'] - v['total_formula']:,} |", "",
              f"Exact match: **{v['exact_match']}**.", ""]
    return lines


NOTES = [
    "Notes:",
    "- `adamw` assumes bf16 weights with fp32 m and v (10 B/param). GaLore's Table 2 \"Full-Rank\" "
    "numbers are much closer to 6 B/param (`adamw_bf16`, everything bf16): 350M 2.056 GiB vs 2.06 printed; "
    "60M/130M/1B come out 1-10% below the printed 0.36/0.76/7.80, so the paper's exact counting is unknown. "
    "`galore_bf16` comes out 1-10% above GaLore's printed GaLore estimates (0.24/0.52/1.22/4.38).",
    "- 8-bit moments: 1 byte per element + one fp32 absmax per 256-element block (bitsandbytes 0.50 and "
    "qgalore-dist both use 256; bnb 0.43, used by the reference runs, used 2048-element blocks, i.e. "
    "slightly less absmax). Tensors under 4096 elements (the RMSNorm weights up to hidden 2048) keep fp32 m, v.",
    "- `qgalore_ref` follows the reference code (section 2.1/2.3 of the algorithm doc): INT4 codes stored one "
    "per byte, so the reference does not realise the INT4 saving; INT8 scales/zeros become bf16 after the "
    "first step. `qgalore_dist` packs INT4 codes two per byte and keeps fp32 scales/zeros "
    "(zero points are unclamped floats) and an fp32 copy of the first singular vector for the adaptive "
    "schedule (4*min(m,n) B per matrix).",
    "- 1B uses the script rank 1024 (the papers use 512; the `llama_1b@r512` column, if present, uses 512).",
]


# ----------------------------------------------------------------------------- per rank (memory_ranks.py)
def per_rank_payload(models: list[str], ranks: dict[str, int], skip_rss: bool) -> dict[str, Any]:
    """Per-rank tables, 7B target verdicts, RSS and FSDP2 validations."""
    mr = memory_ranks
    rows, buckets = mr.per_rank_rows(models, ranks), mr.zero2_buckets()
    skipped = {"ran": False, "ok": True, "reason": "--skip-rss-validation"}
    rss = skipped if skip_rss else memory_rss.rss_validations()
    fsdp = skipped if skip_rss else memory_fsdp.validate_fsdp()
    return {"per_rank": rows, "per_rank_approaches": {k: d for k, (d, _) in mr.approaches(buckets).items()},
            "per_rank_doc": mr.RANKS_DOC, "rss_doc": memory_rss.__doc__, "per_rank_fsdp2_doc": mr.FSDP_DOC,
            "zero2_buckets": asdict(buckets), "target": mr.target_verdict(rows), "rss_validation": rss,
            "target_fsdp2": mr.fsdp_target(rows), "fsdp2_validation": fsdp}


def per_rank_markdown(payload: dict[str, Any]) -> list[str]:
    fsdp_markdown, rss_markdown = memory_fsdp.fsdp_markdown, memory_rss.rss_markdown
    rows, t, zb = payload["per_rank"], payload["target"], payload["zero2_buckets"]
    worlds = list(rows[0]["approaches"]["ddp_adamw"])
    lines = ["## Memory per rank (closed form, the most loaded rank), GiB", "",
             "model states = weights + gradients + optimizer + projectors; peak = model states + communication "
             "buffers + largest temporary. No activations, no library scratch. Conventions and every formula: "
             "docstrings of `qgalore_dist/estimate/ranks.py` and `fsdp.py`; ZeRO-2 reduce buckets from "
             "`configs/ds/zero2_bf16.json`: "
             f"{zb['reduce_bucket_size']:,} elements x {2 if zb['overlap_comm'] else 1} (overlap_comm) x bf16. "
             "`ours_*_refresh`: a step on which every GaLore matrix refreshes (step 0, and while the adaptive "
             "schedules coincide).", ""]
    if t.get("evaluated"):
        lines += _target_md(t, next(r for r in rows if r["model"] == t["model"]), payload["per_rank_approaches"])
    for r in rows:
        lines += [f"### {r['model']} (r={r['rank']}, {r['params']:,} params): model states / peak", "",
                  "| approach | " + " | ".join(f"N={n}" for n in worlds) + " |", "|---|" + "---|" * len(worlds)]
        for key, by in r["approaches"].items():
            cells = " | ".join(f"{gib(by[n]['model_states'])} / {gib(by[n]['peak'])}" if "peak" in by[n] else "n/a"
                               for n in worlds)  # n/a: FSDP2 cannot row-shard these shapes (memory_fsdp.py)
            lines.append(f"| `{key}` | {cells} |")
        lines += ["", "DeepSpeed `estimate_zero2_model_states_mem_needs` (GiB): " + ", ".join(
            f"N={n}: {gib(v)}" for n, v in r["deepspeed_zero2_estimate"].items())
            + f"; equal to `zero2_adamw` model states: {all(r['zero2_matches_deepspeed'].values())}.", ""]
    return lines + rss_markdown(payload["rss_validation"]) + fsdp_markdown(payload["target_fsdp2"],
                                                                          payload["fsdp2_validation"])


def _target_md(t: dict[str, Any], row: dict[str, Any], desc: dict[str, str]) -> list[str]:
    n, keys = str(t["world"]), ("weights", "gradients", "optimizer", "projectors", "model_states", "comm_buffers",
                                "temporary", "peak")
    lines = [f"### {t['model']} at {n} ranks: per-rank breakdown (GiB)", "",
             "| approach | " + " | ".join(k.replace("_", " ") for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for key, by in row["approaches"].items():
        lines.append(f"| `{key}`: {desc[key]} | " + " | ".join(gib(by[n][k]) for k in keys) + " |")

    def margin(x: int) -> str:
        return f"{gib(abs(x))} GiB {'over' if x > 0 else 'under'}"

    lines += ["", f"**Target ({t['model']} model states <= {gib(t['target_bytes'])} GiB per rank at {n} ranks): "
              f"{'MET' if t['met'] else 'NOT MET'}.** "
              + "; ".join(f"`{k}` {gib(v)} GiB" for k, v in t["model_states"].items())
              + f". Steady step {margin(t['steady_over_target_bytes'])}, worst (refresh) step "
              f"{margin(t['worst_over_target_bytes'])}. ZeRO-2 + AdamW by DeepSpeed's estimator: "
              f"{gib(t['deepspeed_zero2_adamw'])} GiB; Q-GaLore reference on one GPU (paper, incl. activations): "
              f"{t['qgalore_reference_1gpu_gb_quoted']} GB.", "",
              f"`estimate_zero2_model_states_mem_needs_all_cold({row['params']:,} params, {n} GPUs per node)` prints:",
              "", "```", t["deepspeed_printout"], "```", ""]
    return lines


def plot_per_rank(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Per-rank GiB vs N for the target model (7B): model states (left), peak (right), the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    TARGET_GIB, TARGET_MODEL = memory_ranks.TARGET_GIB, memory_ranks.TARGET_MODEL

    row = next((r for r in rows if r["model"] == TARGET_MODEL), None)
    if row is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, key, title in zip(axes, ("model_states", "peak"), ("model states", "peak")):
        for name, by in row["approaches"].items():
            worlds = [int(n) for n in by if key in by[n]]
            ax.plot(worlds, [by[n][key] / GiB for n in by if key in by[n]], marker="o", label=name,
                    linestyle="-" if name.startswith("ours") else "--")
        ax.axhline(TARGET_GIB, color="black", linewidth=0.8, linestyle=":", label=f"target {TARGET_GIB:g} GiB")
        ax.set_xscale("log", base=2)
        ticks = [int(n) for n in next(iter(row["approaches"].values()))]
        ax.set_xticks(ticks, [str(n) for n in ticks])
        ax.set(title=f"{TARGET_MODEL} (r={row['rank']}): {title} per rank", xlabel="data-parallel ranks N",
               ylabel="GiB (most loaded rank)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["llama_60m", "llama_130m", "llama_350m", "llama_1b",
                                                        "llama_1b@r512", "llama_7b"],
                        help="config names under configs/models; NAME@rR overrides the rank")
    parser.add_argument("--val-config", default="llama_9m")
    parser.add_argument("--val-vocab", type=int, default=1000)
    parser.add_argument("--val-rank", type=int, default=20,
                        help="20: q/k/v/o low-rank states (128x20) fall under 4096 elements and stay fp32, "
                             "MLP states (352x20 = 27.5 blocks) exercise the partial last absmax block")
    parser.add_argument("--val-dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--skip-rss-validation", action="store_true",
                        help="leave out the 2-rank RSS measurement (about 40 s); the report then says so")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # One thread: the tensors are small, and on shared cores threaded LAPACK SVDs contend (10x slower).
    torch.set_num_threads(1)
    ranks = {m: int(m.split("@r")[1]) if "@r" in m else SCRIPT_RANKS[m] for m in args.models}
    payload = {
        "environment": environment(),
        "description": __doc__,
        "layout": {k: v for k, v in asdict(Layout(rank=0)).items() if k != "rank"},
        "approaches": {k: d for k, (d, _) in APPROACHES.items()},
        "models": model_rows(args.models, ranks),
        "paper_estimates_G": PAPER_GB,
        "notes": NOTES,
        "configs": config_checks(),
        "validation": [validate(args.val_config, args.val_vocab, args.val_rank, getattr(torch, d), args.seed)
                       for d in args.val_dtypes],
    }
    payload.update(per_rank_payload(args.models, ranks, args.skip_rss_validation))
    report = markdown(payload) + "\n" + "\n".join(per_rank_markdown(payload))
    json_path, md_path = write_outputs("memory", payload, report, args.out_dir)
    png_path = plot_per_rank(payload["per_rank"], args.out_dir / "memory.png")
    print(report)
    print(f"\nwrote {json_path}, {md_path} and {png_path}")
    ok = all(v["exact_match"] for v in payload["validation"]) and all(
        c["matches_doc_table"] for c in payload["configs"])
    ok = ok and payload["rss_validation"]["ok"] and payload["fsdp2_validation"]["ok"] and all(
        all(r["zero2_matches_deepspeed"].values()) for r in payload["per_rank"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
