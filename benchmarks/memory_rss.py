"""Memory per rank of ``qgalore_dist.estimate.ranks``' ``ours`` accounting (torch.distributed),
checked against the resident set size of real gloo ranks.

Validation (``rss_validation``, one case; ``rss_validations``, the cases of ``RSS_CASES``)
    A model with llama_60m widths (8 layers: its 96 MiB of full fp32 GaLore gradients exceed one
    25 MiB bucket, so streaming can save memory) trains three steps (refresh, steady, refresh) on
    2 or 4 gloo ranks, with ``stream_refresh`` on (the default at world size > 1: refreshing
    layers' full gradients reduce-scatter to their owners during backward) and off.  Each rank
    records its resident set size (VmRSS) after building the model, after each backward, after
    each step, and the peaks (VmHWM, reset through ``/proc/self/clear_refs`` before each forward
    and before each step: ``bwpeak`` = forward + backward, ``peak`` = ``step()``); the growth over
    a baseline taken after a warm-up run must match ``ours`` (``streamed_refresh`` as the run)
    evaluated for that rank on the same shapes.  On a refresh step the streamed model holds the
    owned full gradients + one bucket in flight + one transient full gradient; that is the
    backward peak, so after backward (the transient freed, reaped buckets freed) the streamed
    runs' ``backward`` probes are reported, not checked.  Two CPU facts enter the prediction, both stated in the
    report: receive slots made by ``torch.empty`` and never written do not enter RSS, and the
    temporary of the CPU (torch) INT8 update path is measured separately on the largest matrix.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from benchmarks._common import load_config, meta_model  # noqa: E402
from qgalore_dist.estimate.model import Shapes, model_shapes  # noqa: E402
from qgalore_dist.estimate.ranks import dense_owners, galore_owners, ours_rank_bytes  # noqa: E402
from qgalore_dist.estimate.states import MiB  # noqa: E402
from qgalore_dist.optim import QGaLoreConfig  # noqa: E402


@dataclass(frozen=True)
class RssSpec:
    """The validation run: a ``config``-width LLaMA cut to ``layers`` layers, on ``world`` gloo ranks."""

    config: str = "llama_60m"
    layers: int = 8
    vocab: int = 2048
    rank: int = 256
    seq: int = 16
    world: int = 2
    update_proj_gap: int = 2       # steps 0 and 2 refresh every matrix, step 1 is a steady step
    svd_method: str = "randomized"  # same projector bytes as exact; its workspace stays below the update buffers
    seed: int = 0
    stream_refresh: bool = True     # QGaLoreConfig.stream_refresh (its default)
    svd_at_completion: bool = True  # gradient_accumulation_steps=1 given: owners' SVDs run in backward
    abs_tol_mib: float = 2.0
    rel_tol: float = 0.04
    timeout_s: float = 600.0

    def shapes(self, layers: int | None = None) -> Shapes:
        return model_shapes(self.config, self.rank, **self.overrides(layers))

    def overrides(self, layers: int | None = None) -> dict[str, int]:
        return dict(num_hidden_layers=layers or self.layers, vocab_size=self.vocab,
                    max_position_embeddings=4 * self.seq)


def _proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)
                if k in ("VmRSS", "VmHWM")}


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _build(spec: RssSpec, layers: int | None = None):
    """A bf16 LLaMA of ``spec`` converted by ``prepare_model`` and its ``QGaLoreAdamW8bit``."""
    from transformers import LlamaForCausalLM

    from qgalore_dist import QGaLoreAdamW8bit, prepare_model

    model = prepare_model(LlamaForCausalLM(load_config(spec.config, **spec.overrides(layers))).to(torch.bfloat16))
    gc.collect()
    names = {p: n for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad or p.dtype == torch.uint8]
    config = QGaLoreConfig(rank=spec.rank, update_proj_gap=spec.update_proj_gap, svd_method=spec.svd_method,
                           seed=spec.seed, stream_refresh=spec.stream_refresh)
    return model, QGaLoreAdamW8bit(params, config, names=names,
                                   gradient_accumulation_steps=1 if spec.svd_at_completion else None)


def _train(model, opt, spec: RssSpec, steps: int, probe: Callable[[str, bool], None]) -> None:
    """``steps`` steps; ``probe(tag, peak)`` after each backward (and its peak since the reset
    just before the forward), step (peak since the reset just before ``step()``) and ``zero_grad``."""
    gen = torch.Generator().manual_seed(spec.seed)
    for step in range(steps):
        tokens = torch.randint(0, spec.vocab, (1, spec.seq), generator=gen)
        gc.collect(1)
        _reset_peak()
        out = model(input_ids=tokens, labels=tokens, use_cache=False)
        out.loss.backward()
        probe(f"bwpeak{step}", True)
        del out
        gc.collect(1)  # young generations only: a full collection costs about 1 s with transformers loaded
        probe(f"backward{step}", False)
        _reset_peak()
        opt.step()
        probe(f"peak{step}", True)
        opt.zero_grad()
        gc.collect(1)
        probe(f"after{step}", False)


def _update_temporary(model, opt, spec: RssSpec) -> int:
    """Peak bytes of ``_apply_galore``'s work on the largest matrix (torch CPU path): back-projection,
    dequantize, update, stochastic requantization -- the calls the optimizer makes."""
    from qgalore_dist.core import Int8Linear
    from qgalore_dist.quant import StreamKey

    layer = max((m for m in model.modules() if isinstance(m, Int8Linear)), key=lambda m: m.weight.numel())
    proj = opt.state[layer.weight]["projector"]
    direction = torch.randn(proj.lowrank_shape, generator=torch.Generator().manual_seed(spec.seed)) * 1e-3
    gc.collect()
    _reset_peak()
    before = _proc_status()["VmRSS"]
    delta = proj.project_back(direction)
    layer.apply_update_(delta, step_size=1e-3, decay=0.0, stochastic_key=StreamKey(spec.seed, 10**6, 0))
    del delta
    return _proc_status()["VmHWM"] - before


def _svd_workspace(model, opt, spec: RssSpec) -> int:
    """Peak bytes of one refresh of the largest matrix beyond its gradient (``refresh_owned``'s
    calls: the SVD of ``svd_method``, then the projection of the gradient)."""
    from qgalore_dist.core import Int8Linear
    from qgalore_dist.quant import StreamKey

    layer = max((m for m in model.modules() if isinstance(m, Int8Linear)), key=lambda m: m.weight.numel())
    proj = opt.state[layer.weight]["projector"]
    snapshot = proj.state_dict()
    grad = torch.randn(layer.out_features, layer.in_features, generator=torch.Generator().manual_seed(spec.seed))
    gc.collect()
    _reset_peak()
    before = _proc_status()["VmRSS"]
    proj.refresh(grad, step=10**6, method=spec.svd_method, oversample=8, power_iters=2, key=StreamKey(spec.seed, 0, 0))
    lowrank = proj.project(grad)
    peak = _proc_status()["VmHWM"] - before
    del lowrank
    proj.load_state_dict(snapshot)
    return peak


def _measure(spec: RssSpec, rank: int) -> dict[str, Any]:
    """One rank: warm-up, then RSS growth over the baseline at every probe of a 3-step run."""
    warm_model, warm_opt = _build(spec, layers=1)  # same widths: kernels, LAPACK and gloo paths at these sizes
    _train(warm_model, warm_opt, spec, 2, lambda tag, peak: None)  # a refresh and a steady step
    del warm_model, warm_opt
    gc.collect()
    base = _proc_status()["VmRSS"]
    measured: dict[str, int] = {}

    def probe(tag: str, peak: bool) -> None:
        measured[tag] = _proc_status()["VmHWM" if peak else "VmRSS"] - base

    model, opt = _build(spec)
    probe("built", False)
    _train(model, opt, spec, 3, probe)
    return {"measured": measured, "update_temporary": _update_temporary(model, opt, spec),
            "svd_workspace": _svd_workspace(model, opt, spec),
            "owners": {opt.name_of(p): r for p, r in opt.owner.items()}}


def _rank_worker(measure, rank: int, world: int, port: int, outdir: str, spec) -> None:
    """One spawned gloo rank: ``measure(spec, rank)`` written to ``outdir/rank<r>.json``."""
    import datetime

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=spec.timeout_s))
    try:
        result = measure(spec, rank)
    except Exception as exc:  # reported to the parent
        result = {"error": f"{type(exc).__name__}: {exc}"}
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def spawn_ranks(measure, spec, world: int, timeout_s: float) -> list[dict[str, Any]]:
    """Run ``measure(spec, rank)`` (a module-level function; ``spec`` a picklable dataclass with
    ``timeout_s``) on ``world`` spawned gloo ranks; each rank's JSON result (``{"error": ...}``
    for a rank that crashed or timed out)."""
    import random

    import torch.multiprocessing as mp

    port = random.randint(29600, 29999)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as outdir:
        procs = [ctx.Process(target=_rank_worker, args=(measure, r, world, port, outdir, spec)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=timeout_s)
            if p.is_alive():
                p.kill()
        results = []
        for r in range(world):
            path = os.path.join(outdir, f"rank{r}.json")
            if not os.path.exists(path):
                results.append({"error": "no result (crashed or timed out)"})
                continue
            with open(path) as f:
                results.append(json.load(f))
    return results


def _launch(spec: RssSpec) -> list[dict[str, Any]]:
    """Run ``_measure`` on ``spec.world`` spawned gloo ranks; each rank's result."""
    # glibc's dynamic mmap threshold (up to 32 MiB) keeps freed tensors in the heap, so RSS stops
    # tracking live tensors; a fixed 64 KiB threshold gives every larger tensor its own mapping,
    # unmapped on free.  Read by the children's glibc at start-up.
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        return spawn_ranks(_measure, spec, spec.world, spec.timeout_s)
    finally:
        if saved is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved


def rss_predictions(spec: RssSpec, rank: int, update_temporary: int, svd_workspace: int) -> dict[str, int]:
    """``ours`` for ``rank`` on the validation shapes, at every probe of ``_train``.  A streamed
    refresh step is predicted per phase: its backward peak (buckets, and with SVDs at completion the
    owner's SVD workspace) and its ``step()`` peak."""
    shapes = spec.shapes()
    buffers = sum(b.numel() * b.element_size() for b in meta_model(load_config(spec.config, **spec.overrides()))
                  .to(torch.bfloat16).buffers())  # RoPE inv_freq
    kw = dict(receive_slots=False, update_temporary=update_temporary, streamed_refresh=spec.stream_refresh,
              svd_at_completion=spec.svd_at_completion, svd_workspace=svd_workspace)
    steady = ours_rank_bytes(shapes, spec.world, rank, steady=True, **kw)
    at_step = max((ours_rank_bytes(shapes, spec.world, rank, steady=False, phase=ph, **kw) for ph in ("svd", "update")),
                  key=lambda b: b.peak)  # step(): the owners' SVDs, then the update exchange
    in_backward = ours_rank_bytes(shapes, spec.world, rank, steady=False, phase="backward", **kw)
    backward = in_backward.gradients + (in_backward.temporary if spec.stream_refresh else 0)
    svd_held = ours_rank_bytes(shapes, spec.world, rank, steady=False, phase="svd", **kw).gradients
    weights = steady.weights + buffers
    persistent = weights + steady.optimizer + steady.projectors
    out = {"built": weights, "bwpeak0": weights + backward, "backward0": weights + svd_held,
           "after0": persistent, "backward1": persistent + steady.gradients, "peak1": buffers + steady.peak,
           "after1": persistent, "bwpeak2": persistent + backward,
           "backward2": persistent + svd_held, "peak2": buffers + at_step.peak, "after2": persistent}
    if spec.stream_refresh:  # after backward the last bucket may still be in flight: reported only
        del out["backward0"], out["backward2"]
    return out


def rss_validation(spec: RssSpec = RssSpec()) -> dict[str, Any]:
    """Measured RSS growth vs. ``ours`` per rank and probe; ``ok`` when all are within tolerance
    and the optimizer's owners are the ones the formulas assume."""
    if not os.path.exists("/proc/self/clear_refs"):
        return {"ran": False, "ok": True, "reason": "no /proc/self/clear_refs (not Linux): RSS validation skipped"}
    results = _launch(spec)
    errors = [f"rank {r}: {res['error']}" for r, res in enumerate(results) if "error" in res]
    if errors:
        return {"ran": True, "ok": False, "spec": asdict(spec), "errors": errors}
    shapes = spec.shapes()
    expected_owners = {**galore_owners(shapes, spec.world), **dense_owners(shapes, spec.world)}
    ranks = []
    for rank, res in enumerate(results):
        pred = rss_predictions(spec, rank, res["update_temporary"], res["svd_workspace"])
        rows = {}
        for tag, p in pred.items():
            m = res["measured"][tag]
            tol = max(spec.abs_tol_mib * MiB, spec.rel_tol * p)
            rows[tag] = {"measured": m, "predicted": p, "difference": m - p, "tolerance": int(tol),
                         "ok": abs(m - p) <= tol}
        ranks.append({"rank": rank, "update_temporary": res["update_temporary"], "svd_workspace": res["svd_workspace"],
                      "probes": rows,
                      "unchecked": {t: v for t, v in res["measured"].items() if t not in pred},
                      "owners_match": res["owners"] == expected_owners})
    ok = all(r["owners_match"] and all(p["ok"] for p in r["probes"].values()) for r in ranks)
    return {"ran": True, "ok": ok, "spec": asdict(spec), "ranks": ranks}


RSS_CASES = tuple(RssSpec(world=w, stream_refresh=stream, svd_at_completion=completion) for w in (2, 4)
                  for stream, completion in ((True, True), (True, False), (False, False)))
"""The validated cases: 2 and 4 ranks; streamed refresh with the SVDs as each full gradient
completes in backward (the default where the passes per step are known), streamed with the SVDs at
``step()``, and the old path."""


def _svd_label(spec: dict[str, Any]) -> str:
    if not spec["stream_refresh"]:
        return "off (old path)"
    return "streamed, SVDs in backward" if spec.get("svd_at_completion") else "streamed, SVDs at step()"


def rss_validations(cases: tuple[RssSpec, ...] = RSS_CASES, partial: Path | None = None) -> dict[str, Any]:
    """``rss_validation`` of every case; ``ok`` when all are.  ``partial``: a JSON file rewritten
    after each case (the cases done so far)."""
    if not os.path.exists("/proc/self/clear_refs"):
        return {"ran": False, "ok": True, "reason": "no /proc/self/clear_refs (not Linux): RSS validation skipped"}
    runs = []
    for spec in cases:
        print(f"[memory_rss] {spec.world} ranks, {_svd_label(asdict(spec))}", flush=True)
        runs.append(rss_validation(spec))
        if partial is not None:
            partial.write_text(json.dumps(runs))
    return {"ran": True, "ok": all(v["ok"] for v in runs), "cases": runs}


_PROBES = {"built": "weights", "bwpeak0": "peak of forward + backward, step 0 (refresh; no state yet)",
           "backward0": "weights + full fp32 gradients (step 0 refreshes all; no state yet)",
           "after0": "weights + optimizer + projectors", "backward1": "+ low-rank fp32 gradients (steady step)",
           "peak1": "peak of the steady step()", "after1": "weights + optimizer + projectors",
           "bwpeak2": "peak of forward + backward, refresh step",
           "backward2": "+ full fp32 gradients (refresh step)", "peak2": "peak of the refresh step()",
           "after2": "weights + optimizer + projectors"}


def _case_lines(v: dict[str, Any]) -> list[str]:
    s = v["spec"]
    lines = [f"### {s['world']} ranks, refresh: {_svd_label(s)}", ""]
    if "errors" in v:
        return lines + [f"Not run: {v['errors']}.", ""]
    lines += ["| rank | probe | holds | measured MiB | predicted MiB | difference MiB | ok |",
              "|---|---|---|---|---|---|---|"]
    for r in v["ranks"]:
        for tag, p in r["probes"].items():
            lines.append(f"| {r['rank']} | {tag} | {_PROBES[tag]} | {p['measured'] / 2**20:.2f} | "
                         f"{p['predicted'] / 2**20:.2f} | {p['difference'] / 2**20:+.2f} | {p['ok']} |")
    lines += ["", "; ".join(f"rank {r['rank']}: update temporary {r['update_temporary'] / 2**20:.2f} MiB, SVD "
                            f"workspace {r['svd_workspace'] / 2**20:.2f} MiB, owners as "
                            f"formulas assume: {r['owners_match']}; not checked: "
                            + ", ".join(f"{t} {m / 2**20:.2f}" for t, m in r["unchecked"].items()) + " MiB"
                            for r in v["ranks"]), "", f"Within tolerance: **{v['ok']}**.", ""]
    return lines


def _summary_lines(cases: list[dict[str, Any]]) -> list[str]:
    """The refresh step (step 2) of every case side by side: backward peak, step() peak, after backward."""
    lines = ["| ranks | refresh | rank | bwpeak2 measured / predicted MiB "
             "| peak2 (step) measured / predicted MiB | backward2 measured MiB | peak1 (steady step) measured MiB "
             "| all probes ok |",
             "|---|---|---|---|---|---|---|---|"]
    for v in cases:
        if "ranks" not in v:
            continue
        for r in v["ranks"]:
            p, u = r["probes"], r["unchecked"]
            after = p["backward2"]["measured"] if "backward2" in p else u["backward2"]
            lines.append(f"| {v['spec']['world']} | {_svd_label(v['spec'])} | {r['rank']} | "
                         f"{p['bwpeak2']['measured'] / 2**20:.1f} / {p['bwpeak2']['predicted'] / 2**20:.1f} | "
                         f"{p['peak2']['measured'] / 2**20:.1f} / {p['peak2']['predicted'] / 2**20:.1f} | "
                         f"{after / 2**20:.1f} | {p['peak1']['measured'] / 2**20:.1f} | "
                         f"{all(x['ok'] for x in p.values()) and r['owners_match']} |")
    return lines + [""]


def rss_markdown(v: dict[str, Any]) -> list[str]:
    """The validation (``rss_validations``' cases, or one ``rss_validation``) as markdown lines."""
    lines = ["## Validation: per-rank accounting vs. measured RSS (gloo ranks)", ""]
    if not v["ran"] or "errors" in v:
        return lines + [f"Not run: {v.get('reason') or v.get('errors')}.", ""]
    cases = v.get("cases", [v])
    s = next((c["spec"] for c in cases), {})
    lines += [f"`{s['config']}` widths, {s['layers']} layers, vocab {s['vocab']}, rank {s['rank']}, bf16, "
              f"update_proj_gap {s['update_proj_gap']} (steps 0 and 2 refresh every matrix, step 1 steady), svd "
              f"{s['svd_method']}, batch 1 x {s['seq']}, `MALLOC_MMAP_THRESHOLD_=65536`, 25 MiB buckets. Growth of "
              "VmRSS (VmHWM for peaks, reset before each forward (`bwpeak`) and before each `step()` (`peak`)) over "
              "a baseline taken after a warm-up run; predicted: `qgalore_dist.estimate.ranks.ours_rank_bytes` for "
              "that rank (`streamed_refresh` as the run), without never-written receive slots, with the temporary "
              "of the torch INT8 update path measured on the largest matrix. Tolerance: max("
              f"{s['abs_tol_mib']} MiB, {s['rel_tol']:.0%}) (heap allocations under 64 KiB, Python objects, "
              "activations, lazily created library state).", "",
              "Refresh step (step 2) side by side:", ""] + _summary_lines(cases)
    for c in cases:
        lines += _case_lines(c)
    return lines + [f"All cases within tolerance: **{v['ok']}**.", ""]


def main(argv: list[str] | None = None) -> int:
    """``python benchmarks/memory_rss.py``: every case of ``RSS_CASES`` to results/memory_rss.{md,json}."""
    import argparse
    import time

    from benchmarks._common import RESULTS_DIR, environment, environment_md, write_outputs

    ap = argparse.ArgumentParser(description="RSS validation of the per-rank memory closed form")
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    ap.add_argument("--partial", type=Path, default=None, help="write the cases done so far here after each")
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="no run: report the cases of these --partial files (runs split over processes)")
    args = ap.parse_args(argv if argv is not None else sys.argv[1:])
    start, load = time.perf_counter(), os.getloadavg()[0]
    if args.merge:
        runs = [case for path in args.merge for case in json.loads(path.read_text())]
        v = {"ran": True, "ok": all(c["ok"] for c in runs), "cases": runs, "merged_from": [str(p) for p in args.merge]}
    else:
        v = rss_validations(tuple(c for c in RSS_CASES if c.world in args.worlds), args.partial)
    payload = {"environment": environment(), "description": __doc__, "loadavg_before": load,
               "loadavg_after": os.getloadavg()[0], "wall_s": time.perf_counter() - start, "rss_validation": v}
    md = "\n".join(["# Per-rank memory vs. measured RSS", "", environment_md(payload["environment"]),
                     f"- load average (1 min) before / after: {load:.1f} / {payload['loadavg_after']:.1f}; wall time "
                     f"{payload['wall_s']:.0f} s", ""] + rss_markdown(v))
    write_outputs("memory_rss", payload, md, args.out_dir)
    print(md)
    return 0 if v["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
