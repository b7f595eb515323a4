"""Workers of tests/test_fsdp.py: the tiny LLaMA of test_distributed, trained single-process
with QGaLoreAdamW8bit or sharded with FSDP2 (qgalore_dist.fsdp) on a 1-D gloo mesh."""

from __future__ import annotations

import torch
import torch.distributed as dist

SEQ = 32
GLOBAL_BATCH = 4
CFG = dict(lr=0.01, rank=8, update_proj_gap=4, proj_group_size=64, seed=0)


def build_model(seed: int = 0, group_size: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    from qgalore_dist import prepare_model

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=160, num_attention_heads=4, num_hidden_layers=2, vocab_size=128,
        max_position_embeddings=SEQ, bos_token_id=0, eos_token_id=1, pad_token_id=2))
    prepare_model(model, group_size=group_size)
    return model


def batches(steps: int):
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, 128, (steps, GLOBAL_BATCH, SEQ), generator=gen)


def _codes(opt, full: bool) -> dict:
    from qgalore_dist.core import int8_layer_of

    out = {}
    for p in opt.galore_params:
        t = int8_layer_of(p).weight
        out[opt.name_of(p)] = (t.full_tensor() if full else t).detach().clone()
    return out


def train_single(steps: int, cfg: dict, codes_at: int = 3) -> dict:
    from qgalore_dist import QGaLoreAdamW8bit, QGaLoreConfig

    model = build_model()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or p.dtype == torch.uint8]
    opt = QGaLoreAdamW8bit([p for _, p in named], QGaLoreConfig(**{**CFG, **cfg}), names={p: n for n, p in named})
    data = batches(steps)
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


def train_fsdp(rank: int, world_size: int, steps: int, cfg: dict, projection: str, mesh_shape=None,
               codes_at: int = 3) -> dict:
    """``codes`` are the gathered INT8 codes after step ``codes_at`` (3: the last step of the
    first subspace with update_proj_gap=4)."""
    from torch.distributed.device_mesh import init_device_mesh

    from qgalore_dist import QGaLoreConfig
    from qgalore_dist.fsdp import fully_shard_qgalore

    cfg = {**CFG, **cfg}
    cfg.pop("proj_type", None)  # chosen by ``projection``
    mesh_shape = tuple(mesh_shape or (world_size,))
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard")[-len(mesh_shape):])
    model, opt = fully_shard_qgalore(build_model(), QGaLoreConfig(**cfg), mesh, projection=projection)
    data = batches(steps)
    per_rank = GLOBAL_BATCH // world_size
    losses, svds, placements = [], [], set()
    for step in range(steps):
        x = data[step, rank * per_rank:(rank + 1) * per_rank]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world_size)
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
