"""Workers of tests/test_fsdp.py: the tiny LLaMA of test_distributed, trained single-process
with QGaLoreAdamW8bit or sharded with FSDP2 (qgalore_dist.integrations.fsdp) on a 1-D or (HSDP) 2-D gloo
mesh, and DCP checkpoint save/load/resume runs."""

from __future__ import annotations

import torch
import torch.distributed as dist

SEQ = 32
GLOBAL_BATCH = 4
CFG = dict(lr=0.01, rank=8, update_proj_gap=4, proj_group_size=64, seed=0)


def build_model(seed: int = 0, group_size: int = 64, intermediate: int = 160, vocab: int = 128, hidden: int = 64,
                heads: int = 4, kv_heads: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    from qgalore_dist import prepare_model

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads, num_key_value_heads=kv_heads,
        num_hidden_layers=2, vocab_size=vocab,
        max_position_embeddings=SEQ, bos_token_id=0, eos_token_id=1, pad_token_id=2))
    prepare_model(model, group_size=group_size)
    return model


def batches(steps: int, global_batch: int = GLOBAL_BATCH):
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, 128, (steps, global_batch, SEQ), generator=gen)


def _codes(opt, full: bool) -> dict:
    from qgalore_dist.core import int8_layer_of

    out = {}
    for p in opt.galore_params:
        t = int8_layer_of(p).weight
        out[opt.name_of(p)] = (t.full_tensor() if full else t).detach().clone()
    return out


def train_single(steps: int, cfg: dict, codes_at: int = 3, model_kw: dict | None = None,
                 global_batch: int = GLOBAL_BATCH) -> dict:
    """One process, global batch ``global_batch``; ``model_kw``: :func:`build_model`'s shape options."""
    from qgalore_dist import QGaLoreAdamW8bit, QGaLoreConfig

    model = build_model(**(model_kw or {}))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or p.dtype == torch.uint8]
    opt = QGaLoreAdamW8bit([p for _, p in named], QGaLoreConfig(**{**CFG, **cfg}), names={p: n for n, p in named})
    data = batches(steps, global_batch)
    losses, svds = [], []
    for step in range(steps):
        loss = model(input_ids=data[step], labels=data[step]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        svds.append(opt.svds_last_step)
        if step == codes_at:
            codes = _codes(opt, False)
    return {"losses": losses, "svds": svds, "codes": codes}


def _train_step(model, opt, x: torch.Tensor, world_size: int) -> float:
    """One optimizer step on this rank's micro-batch ``x``; returns the loss averaged over ranks."""
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total.item() / world_size


def train_fsdp(rank: int, world_size: int, steps: int, cfg: dict, projection: str, mesh_shape=None,
               codes_at: int = 3, model_kw: dict | None = None, global_batch: int = GLOBAL_BATCH) -> dict:
    """``codes`` are the gathered INT8 codes after step ``codes_at`` (3: the last step of the
    first subspace with update_proj_gap=4).  ``model_kw``: :func:`build_model`'s shape options
    (e.g. intermediate 86: rows split unevenly at 3 ranks, down_proj rows end in a short group)."""
    from torch.distributed.device_mesh import init_device_mesh

    from qgalore_dist import QGaLoreConfig
    from qgalore_dist.integrations.fsdp import fully_shard_qgalore

    cfg = {**CFG, **cfg}
    cfg.pop("proj_type", None)  # chosen by ``projection``
    mesh_shape = tuple(mesh_shape or (world_size,))
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard")[-len(mesh_shape):])
    model, opt = fully_shard_qgalore(build_model(**(model_kw or {})), QGaLoreConfig(**cfg), mesh,
                                     projection=projection)
    data = batches(steps, global_batch)
    per_rank = global_batch // world_size
    losses, svds, placements = [], [], set()
    for step in range(steps):
        losses.append(_train_step(model, opt, data[step, rank * per_rank:(rank + 1) * per_rank], world_size))
        svds.append(opt.svds_last_step)
        opt.check_replicas()
        opt.check_shards()
        if step == codes_at:
            codes = _codes(opt, True)
    for _, p in model.named_parameters():
        placements.add((type(p).__name__, str(p.dtype), str(p.placements)))
    return {"losses": losses, "svds": svds, "codes": codes, "placements": sorted(placements),
            "meter": opt.comm.meter.last_step, "shard_meter": opt.shard_comm.meter.last_step,
            "replicate_meter": opt.replicate_comm.meter.last_step if opt.replicate_comm else None,
            "lowrank_shapes": [(tuple(p.shape), opt.state[p]["projector"].lowrank_shape) for p in opt.galore_params]}


def _overlap_run(rank: int, world_size: int, mesh, steps: int, cfg: dict, projection: str, model_kw, global_batch: int,
                 accum: int, no_sync: bool) -> dict:
    """One FSDP2 run of :func:`overlap_pair`; per step: the mean loss, SVDs, and the low-rank gradient
    bytes this rank holds after backward (reduces waited for, so it does not depend on timing)."""
    import contextlib

    from qgalore_dist import QGaLoreConfig
    from qgalore_dist.integrations.fsdp import fully_shard_qgalore

    model, opt = fully_shard_qgalore(build_model(**(model_kw or {})), QGaLoreConfig(**cfg), mesh,
                                     projection=projection)
    data = batches(steps * accum, global_batch)
    per_rank = global_batch // world_size
    out: dict = {"losses": [], "svds": [], "held": []}
    for step in range(steps):
        total = torch.zeros(())
        for micro in range(accum):
            x = data[step * accum + micro, rank * per_rank:(rank + 1) * per_rank]
            last = micro == accum - 1
            quiet = no_sync and not last
            model.set_requires_gradient_sync(not quiet)
            with opt.no_sync() if quiet else contextlib.nullcontext():
                loss = model(input_ids=x, labels=x).loss / accum
                loss.backward()
            total += loss.detach()
        for reducer in opt.reduces.all():
            reducer.wait_all()
        out["held"].append(opt.lowrank_grad_bytes())
        opt.step()
        opt.zero_grad()
        dist.all_reduce(total)
        out["losses"].append(total.item() / world_size)
        out["svds"].append(opt.svds_last_step)
        opt.check_replicas()
        opt.check_shards()
    out["codes"] = _codes(opt, True)
    out["shapes"] = [(opt.name_of(p), tuple(p.shape)) for p in opt.galore_params]  # global (m, n)
    out["launches"] = {name: (r.launches_in_backward, r.launches_at_step) if r else None
                       for name, r in (("lowrank", opt.reduces.lowrank), ("rows", opt.reduces.rows))}
    meters = {"world": opt.comm.meter, "shard": opt.shard_comm.meter}
    if opt.replicate_comm is not None:
        meters["replicate"] = opt.replicate_comm.meter
    out["bytes"] = {group: {k: m.total_bytes[k] for k in m.total_bytes} for group, m in meters.items()}
    return out


def overlap_pair(rank: int, world_size: int, steps: int, cfg: dict, projection: str = "sharded", mesh_shape=None,
                 model_kw: dict | None = None, global_batch: int = GLOBAL_BATCH, accum: int = 1,
                 no_sync: bool = False) -> dict:
    """The same FSDP2 training twice on one mesh: ``overlap_comm`` off (reduces in ``step()``),
    then on; both with ``optimizer.no_sync()`` and FSDP2's ``set_requires_gradient_sync(False)`` on
    all but the last of ``accum`` micro-batches when ``no_sync``.  ``{"plain": ..., "overlap": ...}``
    of :func:`_overlap_run`, with the metered bytes per group and kind over the whole run."""
    from torch.distributed.device_mesh import init_device_mesh

    cfg = {**CFG, **cfg}
    cfg.pop("proj_type", None)
    mesh_shape = tuple(mesh_shape or (world_size,))
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard")[-len(mesh_shape):])
    rest = (projection, model_kw, global_batch, accum, no_sync)
    plain = _overlap_run(rank, world_size, mesh, steps, cfg, *rest)
    overlap = _overlap_run(rank, world_size, mesh, steps, {**cfg, "overlap_comm": True}, *rest)
    return {"plain": plain, "overlap": overlap, "shapes": overlap["shapes"]}


def checkpoint_run(rank: int, world_size: int, ops: list, cfg: dict | None = None, mesh_shape=None,
                   projection: str = "sharded", model_kw: dict | None = None, global_batch: int = GLOBAL_BATCH) -> dict:
    """Run ``ops`` in order on a mesh of ``world_size`` ranks (default 1-D FSDP2; ``mesh_shape``
    ``(replicas, shards)``: HSDP) with ``projection``: ``("train", n)`` n steps on the global
    batches from ``opt.steps_taken`` on (losses recorded under ``"train<i>"``; each rank takes its
    ``GLOBAL_BATCH / world_size`` rows, so the global batch is the same at every world size),
    ``("save", path)``, ``("load", path[, raw])``: a *fresh* model and optimizer loaded from
    ``path`` (``raw=False``: re-encode the fp32 moments).  A load of a path this run saved also
    records how the loaded 8-bit moments (codes, dequantized values) compare with the saved
    optimizer's (``"moments<i>"``).  Saves and loads record this rank's 8-bit moments
    (``"state<i>"``, :func:`_moments`) and the owner-held moments of left-projected matrices
    it holds (``"held<i>"``, ``{name: {field: tensor}}``).
    Replicas (projectors; HSDP: every local shard across the replicate group) are checked
    after every op.  ``model_kw`` / ``global_batch``: as in :func:`train_fsdp`."""
    from torch.distributed.device_mesh import init_device_mesh

    from qgalore_dist import QGaLoreConfig
    from qgalore_dist.checkpoint.dcp import load_dcp as load_checkpoint
    from qgalore_dist.checkpoint.dcp import save_dcp as save_checkpoint
    from qgalore_dist.integrations.fsdp import fully_shard_qgalore

    cfg = {**CFG, **(cfg or {})}
    cfg.pop("proj_type", None)
    mesh_shape = tuple(mesh_shape or (world_size,))
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard")[-len(mesh_shape):])

    def fresh():
        return fully_shard_qgalore(build_model(**(model_kw or {})), QGaLoreConfig(**cfg), mesh, projection=projection)

    model, opt = fresh()
    data = batches(32, global_batch)
    per_rank = global_batch // world_size
    out: dict = {}
    saved: dict = {}
    for i, (op, *args) in enumerate(ops):
        if op == "train":
            losses = []
            for _ in range(args[0]):
                x = data[opt.steps_taken, rank * per_rank:(rank + 1) * per_rank]
                losses.append(_train_step(model, opt, x, world_size))
            out[f"train{i}"] = losses
        elif op == "save":
            save_checkpoint(model, opt, args[0])
            saved[args[0]] = out[f"state{i}"] = _moments(opt)
            out[f"held{i}"] = _owner_held(opt)
        elif op == "load":
            model, opt = fresh()
            load_checkpoint(model, opt, args[0], raw=args[1] if len(args) > 1 else True)
            out[f"state{i}"] = _moments(opt)
            out[f"held{i}"] = _owner_held(opt)
            if args[0] in saved:
                codec = opt.layout.moment_codec(1 << 30, opt.codec)
                out[f"moments{i}"] = _compare_moments(saved[args[0]], _moments(opt), codec)
        else:
            raise ValueError(op)
        opt.check_replicas()
        opt.check_shards()
        _check_replicate_group(model, opt)
    return out


def _owner_held(opt) -> dict:
    """Copies of the owner-held moments (left-projected matrices) this rank holds."""
    out = {}
    for p in opt.galore_params:
        state = opt.state[p]
        if opt.row_reduced(p) or "exp_avg" not in state:
            continue
        assert opt.owner[p] == opt.comm.rank, f"{opt.name_of(p)}: moments held off their owner"
        out[opt.name_of(p)] = {f"{name}.{field}": getattr(state[name], field).clone()
                               for name in ("exp_avg", "exp_avg_sq") for field in ("values", "codes", "absmax")
                               if getattr(state[name], field) is not None}
    return out


def _check_replicate_group(model, opt) -> None:
    """HSDP: every rank's local shards (parameters, INT8 codes/scales/zeros, moments) are
    bit-identical to those of the same shard on the other replicas."""
    if opt.replicate_comm is None:
        return
    mine = {n: t.to_local().clone() for n, t in model.state_dict().items() if hasattr(t, "to_local")}
    for p in opt.galore_params + opt.dense_params:
        for name in ("exp_avg", "exp_avg_sq"):
            m = opt.state[p].get(name)
            for field in ("values", "codes", "absmax"):
                if m is not None and getattr(m, field) is not None:
                    mine[f"{opt.name_of(p)}.{name}.{field}"] = getattr(m, field).clone()
    for other in opt.replicate_comm.all_gather_object(mine):
        assert other.keys() == mine.keys()
        differing = [k for k in mine if not torch.equal(other[k], mine[k])]
        assert not differing, f"replicas differ in {differing[:5]}"


def _moments(opt) -> list:
    """Copies of every 8-bit moment, in parameter order."""
    from qgalore_dist.quant import Moment

    out = []
    for p in opt.galore_params + opt.dense_params:
        for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            m = opt.state[p].get(name)
            if m is not None and m.codes is not None:
                out.append((signed, Moment(codes=m.codes.clone(), absmax=m.absmax.clone())))
    return out


def _compare_moments(a: list, b: list, codec) -> dict:
    """Codes that differ between two lists of 8-bit moments, and the largest |dequantized
    difference| relative to its tensor's max |value|."""
    differing, total, rel = 0, 0, 0.0
    assert len(a) == len(b) and a
    for (signed, ma), (_, mb) in zip(a, b):
        differing += int((ma.codes != mb.codes).sum())
        total += ma.codes.numel()
        va, vb = codec.decode(ma, signed=signed), codec.decode(mb, signed=signed)
        rel = max(rel, float((va - vb).abs().max() / va.abs().max().clamp_min(1e-30)))
    return {"differing_codes": differing, "codes": total, "max_rel_diff": rel}
