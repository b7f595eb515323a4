"""Bytes per step per rank on FSDP2 / HSDP: Q-GaLore on FSDP2 (``qgalore_dist.integrations.fsdp``,
``projection="sharded"`` and ``"std"``) against FSDP2 + AdamW with bf16 mixed precision, for
LLaMA 60M-7B at N = 8 and 64 shard ranks and on HSDP meshes R x S (replicas x shards, W = R S).
FSDP2 + torchao ``AdamW8bit`` moves the same bytes as FSDP2 + AdamW (its 8-bit state is sharded
like the parameters and never travels): that row, not a column of its own.

Closed forms (ring volumes per rank, FSDP2's own collectives by kind and the package's by meter
kind): ``qgalore_dist/estimate/comm_fsdp.py``, whose docstring has every formula.  n/a: shapes
``check_shardable`` rejects (since issue 17's uneven row shards none of the built-in models).

Validation (counted; harness ``tests/comm_fsdp_harness.py``, shared with
``tests/unit/test_bench_comm_fsdp.py``): W gloo ranks (2: FSDP; 4: HSDP 2 x 2) train a small LlamaForCausalLM (hidden
64, intermediate 160, 2 layers, odd vocab 127: padded shards) two steps (0: every projector
refreshes, 1: steady) per case: FSDP2 + AdamW and ours (``"sharded"`` fp32 / bf16 payloads,
``"std"``).  Every ``torch.distributed`` collective (FSDP2 and the package look them up at call
time) is wrapped and counted as ring volumes, with its group size, phase (forward, backward,
``step()``) and source (``qgalore_dist`` code on the stack or not).  FSDP2's forward + backward
calls must equal its closed form per collective, the package's calls its meter
(``optimizer.comm.meter.last_step``, all groups) and both the closed form per kind, exactly (==:
ring factors 1/2, 3/4 are exact in binary); any other collective fails it; exit code 1 if not.

Run from the repository root:  python benchmarks/comm_fsdp.py   (about 1-2 min on 2 CPU cores;
``--torchao-site DIR`` adds a counted FSDP2 + torchao AdamW8bit run, about 1 more minute)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from comm_fsdp_harness import OURS, validate  # noqa: E402  (tests/, on sys.path through _common)

from benchmarks._common import RESULTS_DIR, environment, environment_md, write_outputs  # noqa: E402
from benchmarks.comm import PAPER_RANK, meta_tensors, mib  # noqa: E402
from qgalore_dist.estimate.comm import Tensors, numel  # noqa: E402
from qgalore_dist.estimate.comm_fsdp import (  # noqa: E402
    DENSE_BYTES,
    GROUP_SIZE,
    OURS_ROOT_REGATHER,
    baseline_step,
    fsdp2_traffic,
    fsdp_group,
    not_shardable,
    ours_fsdp_params,
    ours_step,
)

MODELS = tuple(PAPER_RANK)
MESHES = ((1, 8), (1, 64), (2, 4), (8, 8))  # (replicas, shards): FSDP at 8 and 64 ranks, HSDP 2 x 4, 8 x 8


# ----------------------------------------------------------------------------- tables
def _ours_cell(tensors: Tensors, replicas: int, shards: int, rank: int, projection: str, payload: int,
               baseline: float) -> dict[str, Any]:
    steady = ours_step(tensors, replicas, shards, rank=rank, projection=projection, payload=payload)
    refresh = ours_step(tensors, replicas, shards, rank=rank, projection=projection, payload=payload, refresh=True)
    root = [t for t in ours_fsdp_params(tensors) if fsdp_group(t[0]) == "root"]
    root_once = fsdp2_traffic(root, replicas, shards, root_regather=False)["param_all_gather"]
    int8 = [t for t in ours_fsdp_params(tensors) if t[2] != DENSE_BYTES]
    return {**steady, "refresh_extra": refresh["total"] - steady["total"],
            "root_regather": root_once if OURS_ROOT_REGATHER else 0.0,
            "int8_all_gather": fsdp2_traffic(int8, replicas, shards, root_regather=True)["param_all_gather"],
            "ratio_over_baseline": steady["total"] / baseline}


def model_rows(name: str, meshes: Sequence[tuple[int, int]] = MESHES) -> dict[str, Any]:
    """Every mesh of one model: the baseline and each variant of ours (None where not shardable)."""
    tensors, rank = meta_tensors(name), PAPER_RANK[name]
    params = sum(numel(s) for _, s, _ in tensors)
    out: dict[str, Any] = {"params": params, "rank": rank, "meshes": {}}
    for replicas, shards in meshes:
        base = baseline_step(tensors, replicas, shards)
        row: dict[str, Any] = {"replicas": replicas, "shards": shards, "fsdp2_adamw": base,
                               "not_shardable": not_shardable(tensors, shards)}
        for key, (projection, payload) in OURS.items():
            row[key] = None if row["not_shardable"] else _ours_cell(tensors, replicas, shards, rank, projection,
                                                                     payload, base["total"])
        out["meshes"][f"{replicas}x{shards}"] = row
    return out


# ----------------------------------------------------------------------------- report
def _md_header(p: dict[str, Any]) -> list[str]:
    return [
        "# Bytes per step per rank on FSDP2 / HSDP: Q-GaLore vs FSDP2 + AdamW", "",
        environment_md(p["environment"]),
        f"- load average (1 min) before / after: {p['loadavg_before']:.1f} / {p['loadavg_after']:.1f} "
        f"(2 cores shared with other jobs); wall time {p['wall_s']:.0f} s", "",
        "Sections 1-2: **closed form** (meta-device shapes of `configs/models/*.json`, paper GaLore ranks); section "
        "4 **counts** every `torch.distributed` call of real gloo runs against it. Ring volumes per rank (all-reduce "
        "2(N-1)/N * S, the others (N-1)/N * S, N the group's size); MiB = 2^20 B; formulas: the docstring of "
        "`qgalore_dist/estimate/comm_fsdp.py`; exact bytes: `comm_fsdp.json`. Mesh R x S: R replicas (HSDP), "
        "S shards.", "",
        "- **FSDP2 + AdamW**: fp32 parameters, bf16 `MixedPrecisionPolicy` (gathers and gradients in bf16), FSDP2's "
        "default root rule (root gathered once, layers twice). **FSDP2 + torchao AdamW8bit moves exactly the same "
        "bytes** (its state is sharded and never travels), hence no column of its own (section 5).",
        f"- **ours** (`fully_shard_qgalore`, bf16 model): FSDP2 gathers INT8 codes + fp32 scales/zeros (1 + "
        f"8/{GROUP_SIZE} B per weight) and bf16 dense tensors, reduce-scatters dense gradients; the package "
        "reduce-scatters the (m, r) low-rank rows (fp32 payload by default) and, on HSDP, all-reduces each rank's "
        "m/S rows across replicas. `std`: down_proj (m < n) goes left-projected through the owner exchange.", "",
    ]


def _md_table(p: dict[str, Any]) -> list[str]:
    lines = ["## 1. Steady-state step, MiB per rank per step", "",
             "Ratio = FSDP2 + AdamW bytes / ours (> 1: ours sends less). Refresh extra: a step on which every "
             "matrix refreshes (fp32 full gradient to its owner over the world + INT4 projector broadcast), added "
             "to the steady step, and that amortised over the initial gap T = 200. n/a: `shard_model` rejects the "
             "shapes (a row shard would cut an INT8 group spanning rows).", "",
             "| model | r | mesh R x S | FSDP2 + AdamW (= torchao AdamW8bit) | ours sharded | ratio | ours sharded, "
             "bf16 payload | ratio | ours std | ratio | refresh extra (sharded) | amortised / 200 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in p["models"].items():
        for mesh, row in m["meshes"].items():
            cells = [x for c in (row[k] for k in OURS) for x in (("n/a", "n/a") if c is None else (
                mib(c["total"]), f"{1 / c['ratio_over_baseline']:.2f}x"))]
            sharded = row["ours_sharded"]
            extra = ["n/a", "n/a"] if sharded is None else [mib(sharded["refresh_extra"]),
                                                             mib(sharded["refresh_extra"] / 200)]
            lines.append(f"| {name} | {m['rank']} | {mesh} | {mib(row['fsdp2_adamw']['total'])} | "
                         + " | ".join(cells + extra) + " |")
    return lines + [""]


def _md_breakdown(p: dict[str, Any], meshes: Sequence[str]) -> list[str]:
    lines = ["## 2. Where the bytes go (ours sharded, fp32 payload), MiB per rank per step", "",
             "| model | mesh | AdamW: param all-gather | AdamW: grad RS + AR | ours: INT8 all-gather (codes + "
             "scales/zeros) | ours: dense all-gather | of which root re-gather | ours: dense grad RS + AR | "
             "ours: low-rank rows (RS + AR) | ours: control | share of ours in all-gathers |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in p["models"].items():
        for mesh in meshes:
            row = m["meshes"][mesh]
            base, ours = row["fsdp2_adamw"]["fsdp2"], row["ours_sharded"]
            if ours is None:
                continue
            f, k, gathers = ours["fsdp2"], ours["package"], ours["fsdp2"]["param_all_gather"]
            lines.append(
                f"| {name} | {mesh} | {mib(base['param_all_gather'])} | "
                f"{mib(base['grad_reduce_scatter'] + base['grad_all_reduce'])} | {mib(ours['int8_all_gather'])} | "
                f"{mib(gathers - ours['int8_all_gather'])} | {mib(ours['root_regather'])} | "
                f"{mib(f['grad_reduce_scatter'] + f['grad_all_reduce'])} | {mib(k['lowrank_reduce'])} | "
                f"{k['control']:,.0f} B | {100 * gathers / ours['total']:.0f}% |")
    return lines + [""]


def _md_summary(p: dict[str, Any]) -> list[str]:
    seven, hsdp = p["models"]["llama_7b"]["meshes"]["1x8"], p["models"]["llama_7b"]["meshes"]["8x8"]
    s, b = seven["ours_sharded"], seven["fsdp2_adamw"]
    gathers = s["fsdp2"]["param_all_gather"]
    small = ", ".join(f"{n.removeprefix('llama_')} {1 / m['meshes']['1x8']['ours_sharded']['ratio_over_baseline']:.2f}"
                      for n, m in p["models"].items() if n != "llama_7b" and m["meshes"]["1x8"]["ours_sharded"])
    return [
        "## 3. Reading it", "",
        f"- LLaMA-7B, r = 1024, 8 shard ranks: FSDP2 + AdamW {mib(b['total'])} MiB per rank per step, ours "
        f"{mib(s['total'])} MiB (**{1 / s['ratio_over_baseline']:.2f}x** fewer; bf16 payload "
        f"{1 / seven['ours_sharded_bf16']['ratio_over_baseline']:.2f}x). HSDP 8 x 8: "
        f"{mib(hsdp['fsdp2_adamw']['total'])} vs {mib(hsdp['ours_sharded']['total'])} MiB "
        f"({1 / hsdp['ours_sharded']['ratio_over_baseline']:.2f}x).",
        f"- The gain comes from the weights more than from GaLore: on FSDP2 the parameter all-gathers are "
        f"{100 * gathers / s['total']:.0f}% of our bytes, and INT8 codes + fp32 scales/zeros are 1 + 8/{GROUP_SIZE} B "
        f"per weight against bf16's 2 B; the low-rank rows ({mib(s['package']['lowrank_reduce'])} MiB) replace a bf16 "
        f"gradient reduce-scatter ({mib(b['fsdp2']['grad_reduce_scatter'])} MiB). Even free low-rank rows would give "
        f"only {b['total'] / sum(s['fsdp2'].values()):.2f}x; smaller models gain less ({small}x at 8 ranks: "
        "embeddings and head, bf16 on both sides, are a larger share).",
        "- `shard_model` keeps FSDP2's default `reshard_after_forward=None`: the root (embeddings, final norm, "
        "head) is all-gathered once per step, as in the baseline (it passed `True` explicitly before, which "
        "gathered the root twice: 2.6% more bytes at 7B / 8 ranks).",
        "- HSDP: only the (m/S, r) rows and the dense gradient shards cross replicas; the INT8 all-gathers stay "
        "inside the shard group. Refresh steps reduce every full fp32 gradient to its owner over the *whole* world "
        "(the largest term of a refresh step); amortised over T = 200 it is small against a steady step.", "",
    ]


def _md_validation(runs: list[dict[str, Any]]) -> list[str]:
    lines = ["## 4. Validation: counted bytes of a real gloo run vs the closed form", "",
             "Small LlamaForCausalLM (hidden 64, intermediate 160, 2 layers, vocab 127: padded shards; GaLore rank "
             "8, INT8 and projector groups of 64); step 0 refreshes every projector, step 1 is steady. FSDP2 = counted "
             "forward + backward `all_gather_single` / `reduce_scatter_single` / `all_reduce` (calls in brackets); "
             "package = counted calls from `qgalore_dist` code; meter = the package's `CommMeter`, all groups. "
             "Exact: all three equal the closed form (==) on every rank, no other collective ran. Rank 0's bytes.", "",
             "| mesh | case | step | all-gather B (calls) | reduce-scatter B | all-reduce B | package counted B "
             "| meter B | closed form: FSDP2 / package B | exact |", "|---|---|---|---|---|---|---|---|---|---|"]
    for v in runs:
        for case, steps in v["runs"].items():
            for s in steps:
                r, pred = s["ranks"][0], s["predicted"]
                f, c = r["fsdp2"], r["fsdp2_calls"]
                lines.append(
                    f"| {v['mesh']} | {case} | {s['step']} ({s['kind']}) | {f['param_all_gather']:,.0f} "
                    f"({c['param_all_gather']}) | {f['grad_reduce_scatter']:,.0f} ({c['grad_reduce_scatter']}) | "
                    f"{f['grad_all_reduce']:,.0f} ({c['grad_all_reduce']}) | {r['package']:,.0f} | "
                    f"{sum(r['meter'].values()):,.0f} | {sum(pred['fsdp2'].values()):,.0f} / "
                    f"{sum(pred['package'].values()):,.0f} | {s['exact']} |")
    ok = all(v["exact"] for v in runs)
    walls = ", ".join(f"{v['mesh']}: {v['wall_s']:.0f} s" for v in runs)
    return lines + ["", f"All exact: **{ok}** (launch wall times {walls}).", ""]


def _md_torchao(t: dict[str, Any]) -> list[str]:
    run = [] if not t.get("run") else [
        f"- counted FSDP2 + torchao AdamW8bit run (2 ranks): equal to the FSDP2 + AdamW closed form, no other "
        f"collective (none in `step()`) on both steps: **{all(s['exact'] for s in t['run'])}**; state "
        f"`{t['run'][-1]['ranks'][0]['state']}`."]
    return ["## 5. torchao AdamW8bit", "", f"- importable: {t['importable']} ({t['detail']}).", *run, ""]


def markdown(p: dict[str, Any]) -> str:
    return "\n".join(_md_header(p) + _md_table(p) + _md_breakdown(p, ("1x8", "8x8")) + _md_summary(p)
                     + (_md_validation(p["validation"]) if p["validation"] else ["## 4. Validation: skipped", ""])
                     + _md_torchao(p["torchao"]))


def torchao_status(site: str | None) -> dict[str, Any]:
    """Whether ``torchao.optim.AdamW8bit`` imports next to this torch (``site`` first on the path),
    in a subprocess: with torchao on this process's path, transformers would import it in every rank."""
    import subprocess

    code = (f"import sys; sys.path[:0] = {[site] if site else []!r}; import torchao, torchao.optim; "
            "torchao.optim.AdamW8bit; print('torchao', torchao.__version__, 'from', torchao.__path__[0])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = (proc.stdout if proc.returncode == 0 else proc.stderr).strip().splitlines() or ["no output"]
    return {"importable": proc.returncode == 0, "detail": lines[-1]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-validation", action="store_true", help="closed forms only (no gloo runs)")
    ap.add_argument("--skip-hsdp-validation", action="store_true", help="leave out the 4-rank HSDP 2 x 2 run")
    ap.add_argument("--torchao-site", help="a site-packages holding torchao: adds a counted FSDP2 + AdamW8bit run")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    start, load_before, validation = time.perf_counter(), os.getloadavg()[0], []
    torchao = torchao_status(args.torchao_site)
    if not args.skip_validation:
        validation.append(validate((2,), ("fsdp2_adamw", *OURS)))
        if not args.skip_hsdp_validation:
            validation.append(validate((2, 2), ("fsdp2_adamw", "ours_sharded", "ours_std")))
    if torchao["importable"] and args.torchao_site:
        run = validate((2,), ("fsdp2_torchao_adamw8bit",), args.torchao_site)
        torchao["run"] = run["runs"]["fsdp2_torchao_adamw8bit"]
    payload = {"environment": environment(), "description": __doc__, "loadavg_before": load_before,
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "meshes": [f"{r}x{s}" for r, s in MESHES], "models": {name: model_rows(name) for name in MODELS},
               "validation": validation, "torchao": torchao}
    payload["loadavg_after"], payload["wall_s"] = os.getloadavg()[0], time.perf_counter() - start
    json_path, md_path = write_outputs("comm_fsdp", payload, markdown(payload), args.out_dir)
    print(markdown(payload))
    print(f"\nwrote {json_path} and {md_path} ({payload['wall_s']:.0f} s)")
    exact = all(v["exact"] for v in validation) and all(s["exact"] for s in torchao.get("run", []))
    return 0 if exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
