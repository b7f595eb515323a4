"""Memory per rank of Q-GaLore on FSDP2, checked against the bytes a real 2-rank gloo FSDP2 run holds.
The closed form and its conventions: ``qgalore_dist/estimate/fsdp.py`` (rows merged into
``benchmarks/memory_ranks.py``'s per-rank table).

Validation (``validate_fsdp``)
    A 2-layer LLaMA (``llama_60m`` widths, odd vocab so the embedding shards are padded, bf16)
    is sharded with ``fully_shard_qgalore`` on 2 gloo ranks (``FsdpSpec.world``: 3 splits the
    rows unevenly) and trains a refresh step and a steady step.  Each rank sums the bytes it
    really holds -- local storages of the INT8 codes / scales / zeros and dense DTensor shards,
    ``Moment.nbytes()`` of every moment, projector codes / scales / zeros, past vectors, the
    GaLore gradients after each backward (the sinks' local ones and what the backward reduces
    hold once waited for: streamed refresh's owned full gradients, ``overlap_comm``'s received
    rows) -- and every component must equal the closed form for that rank byte for byte; the
    optimizer's owners must be ``plan_ownership``'s.  Buffers, temporaries and the bucket being
    filled during backward are not measured (closed form only).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from benchmarks._common import load_config
from benchmarks.memory_rss import spawn_ranks
from qgalore_dist.estimate.fsdp import components
from qgalore_dist.estimate.model import Shapes, model_shapes
from qgalore_dist.estimate.ranks import galore_owners
from qgalore_dist.estimate.states import GiB


# ----------------------------------------------------------------------------- validation on a real FSDP2 run
@dataclass(frozen=True)
class FsdpSpec:
    """The validation run: ``config`` widths cut to ``layers`` layers, ``world`` gloo ranks."""

    config: str = "llama_60m"
    layers: int = 2
    vocab: int = 1001          # odd: the embedding / head shards are padded (501 rows on each of 2 ranks)
    rank: int = 128
    seq: int = 16
    world: int = 2
    dtype: str = "bfloat16"
    update_proj_gap: int = 100  # step 0 refreshes every matrix, step 1 is steady
    overlap: bool = False       # QGaLoreConfig.overlap_comm
    seed: int = 0
    timeout_s: float = 240.0

    def overrides(self) -> dict[str, int]:
        return dict(num_hidden_layers=self.layers, vocab_size=self.vocab, max_position_embeddings=4 * self.seq)

    def shapes(self) -> Shapes:
        dense_bytes = torch.empty(0, dtype=getattr(torch, self.dtype)).element_size()
        return model_shapes(self.config, self.rank, dense_bytes=dense_bytes, **self.overrides())


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (DTensors: their local shards)."""
    seen: dict[int, int] = {}
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        storage = local.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def measure_rank(model, opt) -> dict[str, int]:
    """Bytes this rank holds, in ``components``' keys (``unaccounted``: any other state tensor)."""
    from qgalore_dist.core import Int8Linear

    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    meta = {id(t) for m in int8 for t in (m.weight_scales, m.weight_zeros)}
    out = {"int8_codes": _storage_bytes(m.weight for m in int8),
           "int8_scales_zeros": _storage_bytes(t for m in int8 for t in (m.weight_scales, m.weight_zeros)),
           "dense_weights": _storage_bytes(p for p in model.parameters()
                                           if p.dtype != torch.uint8 and id(p) not in meta),
           "lowrank_state": 0, "dense_state": 0, "proj_codes": 0, "proj_scales_zeros": 0, "proj_past_vector": 0,
           "unaccounted": 0}
    for state in opt.state.values():
        for name, value in state.items():
            if name in ("exp_avg", "exp_avg_sq"):
                out["lowrank_state" if "projector" in state else "dense_state"] += value.nbytes()
            elif name == "projector":
                out["proj_codes"] += _storage_bytes([value.proj_codes])
                out["proj_scales_zeros"] += _storage_bytes([value.proj_scales, value.proj_zeros])
                past = value.schedule.past_vector
                out["proj_past_vector"] += 0 if past is None else _storage_bytes([past])
                out["unaccounted"] += 0 if value.proj is None else _storage_bytes([value.proj])
            elif torch.is_tensor(value):
                out["unaccounted"] += _storage_bytes([value])
    residuals = (*opt.comm_residuals.values(), *opt.update_residuals.values())  # compression off: none
    out["unaccounted"] += sum(_storage_bytes([t]) for t in residuals)
    return out


def _gradient_bytes(model, opt) -> dict[str, int]:
    """The GaLore gradients after backward -- the sinks' (low-rank or full) and the backward
    reduces' results (waited for first, so nothing is in flight) -- and FSDP2's dense shards."""
    from qgalore_dist.core import Int8Linear

    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    galore = [t for m in int8 for t in (m.lowrank_grad, m.weight_grad) if t is not None]
    for reducer in opt.reduces.all():
        reducer.wait_all()
        galore += list(reducer.owned_sum.values())
    return {"galore": _storage_bytes(galore),
            "dense": _storage_bytes(p.grad for p in model.parameters() if p.grad is not None)}


def _measure(spec: FsdpSpec, rank: int) -> dict[str, Any]:
    """Build, shard, train a refresh and a steady step; bytes held after each backward and at the end."""
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import LlamaForCausalLM

    from qgalore_dist import QGaLoreConfig, prepare_model
    from qgalore_dist.integrations.fsdp import fully_shard_qgalore

    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(load_config(spec.config, **spec.overrides())).to(getattr(torch, spec.dtype))
    prepare_model(model)
    config = QGaLoreConfig(rank=spec.rank, update_proj_gap=spec.update_proj_gap, seed=spec.seed,
                           overlap_comm=spec.overlap)
    model, opt = fully_shard_qgalore(model, config, init_device_mesh("cpu", (spec.world,)))
    gen = torch.Generator().manual_seed(spec.seed + rank)
    grads, svds = [], []
    for _ in range(2):
        tokens = torch.randint(0, spec.vocab, (1, spec.seq), generator=gen)
        model(input_ids=tokens, labels=tokens).loss.backward()
        grads.append(_gradient_bytes(model, opt))
        opt.step()
        svds.append(opt.svds_last_step)
        opt.zero_grad()
    return {"held": measure_rank(model, opt), "grad_refresh": grads[0], "grad_steady": grads[1],
            "svds": svds, "matrices": len(opt.galore_params),
            "owners": {opt.name_of(p): opt.owner[p] for p in opt.galore_params}}


def _launch(spec: FsdpSpec) -> list[dict[str, Any]]:
    """Run ``_measure`` on ``spec.world`` spawned gloo ranks; each rank's result."""
    return spawn_ranks(_measure, spec, spec.world, spec.timeout_s)


def predicted_rank(shapes: Shapes, world: int, rank: int, overlap: bool = False) -> dict[str, int]:
    """The closed form for ``rank``, in ``measure_rank``'s keys plus the two gradient probes
    (refresh: streamed, the owner's full gradients; steady: every (m, r) gradient, or with
    ``overlap`` this rank's rows of them)."""
    c = components(shapes, world, rank)
    held = {k: c[k] for k in ("int8_codes", "int8_scales_zeros", "dense_weights", "lowrank_state", "dense_state",
                              "proj_codes", "proj_scales_zeros", "proj_past_vector")}
    steady = c["grad_steady_rows"] if overlap else c["grad_steady"]
    return {**held, "unaccounted": 0, "grad_refresh.galore": c["grad_refresh_owned"],
            "grad_refresh.dense": c["dense_grads"], "grad_steady.galore": steady, "grad_steady.dense": c["dense_grads"]}


def validate_fsdp(spec: FsdpSpec = FsdpSpec()) -> dict[str, Any]:
    """Measured bytes vs. the closed form, per rank and component; ``ok`` when all are equal, the
    owners are ``plan_ownership``'s and step 0 refreshed every matrix, step 1 none."""
    results = _launch(spec)
    errors = [f"rank {r}: {res['error']}" for r, res in enumerate(results) if "error" in res]
    if errors:
        return {"ran": True, "ok": False, "spec": asdict(spec), "errors": errors}
    shapes, ranks = spec.shapes(), []
    for rank, res in enumerate(results):
        measured = {**res["held"], **{f"{probe}.{kind}": res[probe][kind] for probe in ("grad_refresh", "grad_steady")
                                      for kind in ("galore", "dense")}}
        predicted = predicted_rank(shapes, spec.world, rank, spec.overlap)
        rows = {k: {"measured": measured[k], "predicted": p, "equal": measured[k] == p} for k, p in predicted.items()}
        ranks.append({"rank": rank, "components": rows, "svds": res["svds"],
                      "owners_match": res["owners"] == galore_owners(shapes, spec.world),
                      "refresh_then_steady": res["svds"] == [res["matrices"], 0]})
    ok = all(r["owners_match"] and r["refresh_then_steady"] and all(c["equal"] for c in r["components"].values())
             for r in ranks)
    return {"ran": True, "ok": ok, "spec": asdict(spec), "ranks": ranks}


# ----------------------------------------------------------------------------- report
def _gib(x: int) -> str:
    return f"{x / GiB:.2f}"


def fsdp_markdown(target: dict[str, Any], v: dict[str, Any]) -> list[str]:
    """The FSDP2 verdict and the validation as markdown lines."""
    lines = ["## FSDP2 rows (`qgalore_dist.integrations.fsdp`, projection=\"sharded\")", ""]
    if target.get("evaluated"):
        lines += [f"{target['model']} at {target['world']} ranks, target model states <= "
                  f"{_gib(target['target_bytes'])} GiB per rank: " + "; ".join(
                      f"`{k}` {_gib(r['model_states'])} GiB (peak {_gib(r['peak'])}): "
                      f"**{'MET' if r['met'] else 'NOT MET'}**" for k, r in target["rows"].items()) + ".", ""]
    lines += ["### Validation: closed form vs. bytes held by a real 2-rank gloo FSDP2 run", ""]
    if not v["ran"] or "errors" in v:
        return lines + [f"Not run: {v.get('reason') or v.get('errors')}.", ""]
    s = v["spec"]
    lines += [f"`{s['config']}` widths, {s['layers']} layers, vocab {s['vocab']} (padded embedding shards), rank "
              f"{s['rank']}, {s['dtype']}, `fully_shard_qgalore` on {s['world']} ranks; step 0 refreshes every "
              "matrix, step 1 is steady. Bytes of local storages (DTensor shards), `Moment.nbytes()`, projector "
              "tensors and past vectors after step 1; gradients after each backward. Tolerance: none (bytes).", "",
              "| rank | component | measured B | predicted B | equal |", "|---|---|---|---|---|"]
    for r in v["ranks"]:
        for key, c in r["components"].items():
            lines.append(f"| {r['rank']} | {key} | {c['measured']:,} | {c['predicted']:,} | {c['equal']} |")
    lines += ["", "; ".join(f"rank {r['rank']}: SVDs per step {r['svds']}, owners = plan_ownership: "
                            f"{r['owners_match']}" for r in v["ranks"]),
              "", f"All equal: **{v['ok']}**.", ""]
    return lines
