"""Memory per rank of Q-GaLore on FSDP2 (``qgalore_dist.integrations.fsdp``), by closed form, checked against
the bytes a real 2-rank gloo FSDP2 run holds.

Rows (``approaches``; merged into ``benchmarks/memory_ranks.py``'s per-rank table, same columns,
most loaded of all N ranks, ``projection="sharded"``: right projection ``R = G Q`` for every matrix)

    * weights      this rank's ``Shard(0)`` rows of every INT8 weight (``m n / N`` codes + fp32
                   scales/zeros of its ``m n / (N g)`` groups) and of every dense parameter
                   (FSDP2 pads dim 0 to a multiple of N: ``ceil(d0 / N)`` rows on every rank).
    * gradients    steady step: the sink's fp32 ``(m, r)`` low-rank gradient of *every* matrix (each
                   rank projects its own full gradient, all m rows, before the row reduce-scatter);
                   refresh step: the full fp32 ``(m, n)`` gradient of every matrix instead; plus the
                   dense gradient shards FSDP2 reduce-scattered (``dense_bytes`` per element).
    * optimizer    8-bit moments of this rank's ``m/N x r`` rows of every matrix (8 bits chosen from
                   the global ``m r``, as one process does) and of its dense shards.
    * projectors   the packed INT4 ``r x n`` projector of every matrix + fp32 scales/zeros
                   (replicated), and the fp32 first singular vector (``n`` floats, adaptive
                   schedule) of the matrices this rank owns (``plan_ownership``).
    * comm buffers the larger of (a) the step's row reduce-scatter: one ``bucket_cap_mb`` bucket of
                   concatenated ``(m, r)`` rows + this rank's ``1/N`` outputs of all matrices
                   (``_reduce_rows``); on refresh steps also the ``(m, r)`` projections of
                   the new full gradients and the owner's low-rank results of ``_refresh``; and
                   (b) FSDP2's backward: the root group (embeddings, head, final norm; FSDP2 keeps
                   the root unsharded from forward to backward) unsharded, its unsharded gradients
                   and their reduce-scatter copy, and two decoder layers all-gathered (current +
                   prefetched).
    * temporary    refresh: the owner's clone of the largest full gradient + its SVD factors (when
                   larger than the buffers then alive); otherwise the torch row update of the
                   largest matrix: fp32 ``P`` (r x n) + five fp32 ``m/N x n`` row tensors
                   (dequantized weight, delta, and ``quantize_rows``' shifted / noise / floor);
                   at least the sink's transient full fp32 gradient of the largest matrix.

    Shapes FSDP2 cannot row-shard without cutting a 256-element group (``check_shardable``:
    ``m % N == 0`` and ``(m/N) n % g == 0``) have no row: ``llama_1b`` (intermediate 5461) at
    any N > 1, ``llama_60m`` / ``llama_350m`` at 64.

Validation (``validate_fsdp``)
    A 2-layer LLaMA (``llama_60m`` widths, odd vocab so the embedding shards are padded, bf16)
    is sharded with ``fully_shard_qgalore`` on 2 gloo ranks and trains a refresh step and a
    steady step.  Each rank sums the bytes it really holds -- local storages of the INT8
    codes / scales / zeros and dense DTensor shards, ``Moment.nbytes()`` of every moment, projector
    codes / scales / zeros, past vectors, the sink's gradients after each backward -- and every
    component must equal the closed form for that rank byte for byte; the optimizer's owners
    must be ``plan_ownership``'s.  Buffers and temporaries are not measured (closed form only).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from benchmarks._common import load_config
from benchmarks.memory import GiB, Layout, Tensor, moment_8bit_bytes
from benchmarks.memory_ranks import (RankBytes, Shapes, Unsupported, _bucket, _bucket_cap, _payload_bytes,
                                     _svd_temporary, galore_owners, model_shapes)
from benchmarks.memory_rss import spawn_ranks
from qgalore_dist.quant import packed_numel

TARGET_KEYS = ("ours_fsdp2_steady", "ours_fsdp2_refresh")


# ----------------------------------------------------------------------------- closed form
def not_shardable(shapes: Shapes, world: int) -> str | None:
    """Why ``qgalore_dist.integrations.fsdp.check_shardable`` rejects these shapes at ``world`` ranks, or None."""
    g = shapes.lay.weight_group
    for t in shapes.galore:
        m, n = t.shape
        if m % world or ((m // world) * n) % g:
            return f"{t.name} ({m}x{n}) cannot be row-sharded over {world} ranks without cutting a {g}-element group"
    return None


def _dense_rows(d0: int, world: int) -> int:
    """Rows of a dense tensor FSDP2 allocates on every rank (dim 0 padded to a multiple of N)."""
    return -(-d0 // world)


def _moment_local(local: int, global_numel: int, lay: Layout) -> int:
    """One moment of a local shard: 8-bit (with ``min_8bit_size=0``) iff the global tensor is 8-bit."""
    return moment_8bit_bytes(local, Layout(rank=lay.rank, min_8bit_size=0)) if global_numel >= lay.min_8bit_size \
        else 4 * local


def galore_components(t: Tensor, lay: Layout, world: int, owner: bool) -> dict[str, int]:
    """One INT8 GaLore matrix on one rank (right projection), in ``measure_rank``'s keys."""
    (m, n), r = t.shape, lay.rank
    rows = m // world
    return {
        "int8_codes": rows * n,
        "int8_scales_zeros": 2 * 4 * (rows * n // lay.weight_group),
        "lowrank_state": 2 * _moment_local(rows * r, m * r, lay),
        "proj_codes": packed_numel(r * n, lay.proj_bits),
        "proj_scales_zeros": 2 * 4 * (r * n // lay.proj_group),
        "proj_past_vector": 4 * n if owner and lay.adaptive else 0,
        "grad_steady": 4 * m * r,
        "grad_refresh": 4 * m * n,
    }


def dense_components(t: Tensor, lay: Layout, world: int, rank: int) -> dict[str, int]:
    """One dense parameter's FSDP2 shard on ``rank``: parameter and gradient storages are padded
    to ``ceil(d0/N)`` rows on every rank; the moments follow the unpadded local gradient
    (``torch.chunk`` rows: ``ceil(d0/N)`` on the first ranks, fewer or none on the last)."""
    rows, row_numel = _dense_rows(t.shape[0], world), math.prod(t.shape[1:])
    own_rows = max(0, min(rows, t.shape[0] - rank * rows))
    return {"dense_weights": lay.dense_bytes * rows * row_numel,
            "dense_state": 2 * _moment_local(own_rows * row_numel, t.numel, lay),
            "dense_grads": lay.dense_bytes * rows * row_numel}


def components(shapes: Shapes, world: int, rank: int) -> dict[str, int]:
    """Every persistent component and both gradient kinds of ``rank``, summed over tensors."""
    owners, out = galore_owners(shapes, world), {}
    parts = [galore_components(t, shapes.lay, world, owners[t.name] == rank) for t in shapes.galore]
    parts += [dense_components(t, shapes.lay, world, rank) for t in shapes.dense]
    for part in parts:
        for key, value in part.items():
            out[key] = out.get(key, 0) + value
    return out


def _layer_groups(shapes: Shapes) -> tuple[int, int]:
    """Unsharded bytes of (the root FSDP group, the largest decoder-layer group)."""
    lay, layers, root = shapes.lay, {}, 0
    for t in shapes.tensors:
        size = t.numel + 8 * (t.numel // lay.weight_group) if t.galore else lay.dense_bytes * t.numel
        if ".layers." in t.name:
            key = t.name.split(".layers.")[1].split(".")[0]
            layers[key] = layers.get(key, 0) + size
        else:
            root += size
    return root, max(layers.values())


def fsdp_rank_bytes(shapes: Shapes, world: int, rank: int, *, steady: bool) -> RankBytes:
    """``FSDPQGaLoreAdamW8bit`` (``projection="sharded"``) on ``rank`` of ``world`` (module doc)."""
    reason = not_shardable(shapes, world)
    if reason:
        raise Unsupported(reason)
    c, lay, b = components(shapes, world, rank), shapes.lay, _payload_bytes()
    rows_all = sum(t.shape[0] * lay.rank for t in shapes.galore)      # sum of m r over matrices
    owners = galore_owners(shapes, world)
    rows_owned = sum(t.shape[0] * lay.rank for t in shapes.galore if owners[t.name] == rank)
    rows_max = max(t.shape[0] * lay.rank for t in shapes.galore)
    step_buffers = _bucket(b * rows_all, b * rows_max, _bucket_cap()) + b * rows_all // world
    if not steady:  # _refresh's owner results + _reduce_rows' projections of the new full gradients
        step_buffers += 4 * rows_owned + 4 * rows_all
    root, layer = _layer_groups(shapes)
    root_grads = lay.dense_bytes * sum(t.numel for t in shapes.dense if ".layers." not in t.name)
    backward_buffers = root + 2 * root_grads + 2 * layer
    largest = max(shapes.galore, key=lambda t: t.numel)
    (m, n), r = largest.shape, lay.rank
    temporary = max(4 * (r * n + 5 * (m // world) * n), 4 * m * n)
    buffers = max(step_buffers, backward_buffers)
    if not steady and owners[largest.name] == rank:
        temporary = max(temporary, _svd_temporary(largest) - buffers)
    return RankBytes(weights=c["int8_codes"] + c["int8_scales_zeros"] + c["dense_weights"],
                     gradients=c["grad_steady" if steady else "grad_refresh"] + c["dense_grads"],
                     optimizer=c["lowrank_state"] + c["dense_state"],
                     projectors=c["proj_codes"] + c["proj_scales_zeros"] + c["proj_past_vector"],
                     comm_buffers=buffers, temporary=temporary)


def fsdp2_baseline_bytes(shapes: Shapes, world: int, rank: int, *, eight_bit: bool) -> RankBytes:
    """FSDP2 + AdamW with bf16 mixed precision (``MixedPrecisionPolicy(param_dtype=bf16,
    reduce_dtype=bf16)``, ``fully_shard`` per decoder layer + root, the models' plain
    ``nn.Linear`` layers): fp32 ``Shard(0)`` parameters and gradients (padded rows), fp32 m and
    v of the local rows -- or, ``eight_bit``, torchao ``AdamW8bit``'s block-wise 8-bit m and v
    (counted with the same 256-block rule as ours, fp32 under 4096 elements).  Buffers: the bf16
    root unsharded with its unsharded bf16 gradients and their reduce-scatter copy, and two bf16
    decoder layers gathered (as for ours)."""
    state = weights = 0
    for t in shapes.tensors:
        row_numel = math.prod(t.shape[1:])
        rows = _dense_rows(t.shape[0], world)
        local = max(0, min(rows, t.shape[0] - rank * rows)) * row_numel
        weights += 4 * rows * row_numel
        state += 2 * (_moment_local(local, t.numel, shapes.lay) if eight_bit else 4 * local)
    root = 2 * sum(t.numel for t in shapes.tensors if ".layers." not in t.name)
    layers: dict[str, int] = {}
    for t in shapes.tensors:
        if ".layers." in t.name:
            key = t.name.split(".layers.")[1].split(".")[0]
            layers[key] = layers.get(key, 0) + 2 * t.numel
    return RankBytes(weights=weights, gradients=weights, optimizer=state, projectors=0,
                     comm_buffers=3 * root + 2 * max(layers.values()), temporary=0)


def approaches() -> dict[str, tuple[str, Any]]:
    """Rows for ``memory_ranks.approaches``: key -> (description, f(shapes, world, rank))."""
    return {
        "fsdp2_adamw": ("FSDP2 + AdamW (bf16 mixed precision, fp32 sharded params/grads/m/v)",
                        lambda s, n, r: fsdp2_baseline_bytes(s, n, r, eight_bit=False)),
        "fsdp2_torchao_adamw8bit": ("FSDP2 + torchao AdamW8bit (8-bit sharded m/v)",
                                    lambda s, n, r: fsdp2_baseline_bytes(s, n, r, eight_bit=True)),
        "ours_fsdp2_steady": ("ours on FSDP2 (qgalore_dist.integrations.fsdp, sharded rows), steady step",
                              lambda s, n, r: fsdp_rank_bytes(s, n, r, steady=True)),
        "ours_fsdp2_refresh": ("ours on FSDP2, refresh step (all matrices: full fp32 gradients)",
                               lambda s, n, r: fsdp_rank_bytes(s, n, r, steady=False)),
    }


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


def _gradient_bytes(model) -> dict[str, int]:
    """The sink's GaLore gradients (low-rank or full) and FSDP2's dense gradient shards."""
    from qgalore_dist.core import Int8Linear

    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    galore = [t for m in int8 for t in (m.lowrank_grad, m.weight_grad) if t is not None]
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
    config = QGaLoreConfig(rank=spec.rank, update_proj_gap=spec.update_proj_gap, seed=spec.seed)
    model, opt = fully_shard_qgalore(model, config, init_device_mesh("cpu", (spec.world,)))
    gen = torch.Generator().manual_seed(spec.seed + rank)
    grads, svds = [], []
    for _ in range(2):
        tokens = torch.randint(0, spec.vocab, (1, spec.seq), generator=gen)
        model(input_ids=tokens, labels=tokens).loss.backward()
        grads.append(_gradient_bytes(model))
        opt.step()
        svds.append(opt.svds_last_step)
        opt.zero_grad()
    return {"held": measure_rank(model, opt), "grad_refresh": grads[0], "grad_steady": grads[1],
            "svds": svds, "matrices": len(opt.galore_params),
            "owners": {opt.name_of(p): opt.owner[p] for p in opt.galore_params}}


def _launch(spec: FsdpSpec) -> list[dict[str, Any]]:
    """Run ``_measure`` on ``spec.world`` spawned gloo ranks; each rank's result."""
    return spawn_ranks(_measure, spec, spec.world, spec.timeout_s)


def predicted_rank(shapes: Shapes, world: int, rank: int) -> dict[str, int]:
    """The closed form for ``rank``, in ``measure_rank``'s keys plus the two gradient probes."""
    c = components(shapes, world, rank)
    held = {k: c[k] for k in ("int8_codes", "int8_scales_zeros", "dense_weights", "lowrank_state", "dense_state",
                              "proj_codes", "proj_scales_zeros", "proj_past_vector")}
    return {**held, "unaccounted": 0, "grad_refresh.galore": c["grad_refresh"], "grad_refresh.dense": c["dense_grads"],
            "grad_steady.galore": c["grad_steady"], "grad_steady.dense": c["dense_grads"]}


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
        predicted = predicted_rank(shapes, spec.world, rank)
        rows = {k: {"measured": measured[k], "predicted": p, "equal": measured[k] == p} for k, p in predicted.items()}
        ranks.append({"rank": rank, "components": rows, "svds": res["svds"],
                      "owners_match": res["owners"] == galore_owners(shapes, spec.world),
                      "refresh_then_steady": res["svds"] == [res["matrices"], 0]})
    ok = all(r["owners_match"] and r["refresh_then_steady"] and all(c["equal"] for c in r["components"].values())
             for r in ranks)
    return {"ran": True, "ok": ok, "spec": asdict(spec), "ranks": ranks}


# ----------------------------------------------------------------------------- report
def fsdp_target(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's target (7B model states <= 8 GiB per rank at 8 ranks) for the FSDP2 rows."""
    from benchmarks.memory_ranks import TARGET_GIB, TARGET_MODEL, TARGET_WORLD

    row = next((r for r in rows if r["model"] == TARGET_MODEL), None)
    if row is None:
        return {"evaluated": False}
    cells = {k: row["approaches"][k][str(TARGET_WORLD)] for k in TARGET_KEYS}
    target = int(TARGET_GIB * GiB)
    return {"evaluated": True, "model": TARGET_MODEL, "world": TARGET_WORLD, "target_bytes": target,
            "rows": {k: {"model_states": c["max_model_states"], "peak": c["peak"],
                         "met": c["max_model_states"] <= target} for k, c in cells.items()}}


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
