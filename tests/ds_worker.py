"""A DeepSpeed training worker for tests/test_deepspeed.py, started by ``torchrun`` or the
``deepspeed`` launcher (or as one plain process).

For every ``stage:dtype:gas`` in ``--matrix`` it builds the same tiny LLaMA, calls
``qgalore_dist.initialize`` with a ds_config holding the ``QGaLoreAdamW8bit`` entry, trains
``--steps`` optimizer steps and writes, from rank 0, ``{combo: record}`` JSON to ``--out``.

Every optimizer step consumes the same global batch whatever the world size: its
micro-batches are split over ranks and accumulation steps (rank r, accumulation step k takes
micro-batch ``k * world + r``), so a 2-rank run with gas g is compared with a 1-rank run with
gas 2g.  ``check_replicas()`` runs after every step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

import torch

VOCAB, SEQ, MICRO_BATCH = 128, 32, 2


def build_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=4,
                         num_hidden_layers=1, vocab_size=VOCAB, max_position_embeddings=SEQ, bos_token_id=0,
                         eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def micro_batch(step: int, index: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + index)
    return torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=gen)


def train_step(engine, step: int, gas: int) -> float:
    """One optimizer step over the global batch of ``step``; returns its mean loss."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    step_loss = torch.zeros(())
    for k in range(gas):
        x = micro_batch(step, k * world + rank)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        step_loss += loss.detach().float() / gas
    dist.all_reduce(step_loss)
    return float(step_loss) / world


def ds_config(stage: int, dtype: str, gas: int, world: int, clip: float, lr: float, overlap: bool = False) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": gas,
        "train_batch_size": MICRO_BATCH * gas * world,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": dtype == "bf16"},
        "optimizer": {"type": "QGaLoreAdamW8bit", "params": {
            "lr": lr, "rank": 8, "update_proj_gap": 3, "scale": 0.25, "proj_bits": 4, "weight_bits": 8,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            "svd_method": "exact", "weight_decay": 0.01, "overlap_comm": overlap}},
        "steps_per_print": 10**9,
    }


def _all_ranks(value) -> list:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def ds_config_with(config: dict, args) -> dict:
    """``--int8-partition``: the QGaLoreAdamW8bit entry's ``int8_partition`` (true/false);
    ``--persistence-threshold``: ``zero_optimization.stage3_param_persistence_threshold``."""
    if args.int8_partition is not None:
        config["optimizer"]["params"]["int8_partition"] = args.int8_partition == "true"
    if args.persistence_threshold is not None:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = args.persistence_threshold
    return config


def run_combo(stage: int, dtype: str, gas: int, args, config: dict | None = None) -> dict:
    import torch.distributed as dist

    import qgalore_dist

    world = dist.get_world_size()
    model = build_model()
    if config is None:
        config = ds_config_with(ds_config(stage, dtype, gas, world, args.clip, args.lr, args.overlap), args)
    engine, optimizer, _, _ = qgalore_dist.initialize(model=model, config=config)
    galore = engine.qgalore
    losses, norms, coefs, svds, checked = [], [], [], [], 0
    for step in range(args.steps):
        losses.append(train_step(engine, step, gas))
        norms.append(galore.last_grad_norm)
        coefs.append(galore.last_clip_coef)
        svds.append(galore.svds_last_step)
        checked = galore.check_replicas()
    dense = {}
    from deepspeed.utils import safe_get_full_fp32_param

    for name, p in engine.module.named_parameters():
        if p.is_floating_point():
            full = safe_get_full_fp32_param(p) if stage >= 1 else None
            dense[name] = float((full if full is not None else p.detach()).double().sum())
    layers = {n: m for n, m in engine.module.named_modules() if isinstance(m, qgalore_dist.Int8Linear)}
    # ZeRO-3 partitioned INT8 weights are Shard(0) DTensors: gather the rows to compare codes.
    whole = {n: m.weight.full_tensor() if hasattr(m.weight, "full_tensor") else m.weight for n, m in layers.items()}
    codes = {n: int(w.long().sum()) for n, w in whole.items()}
    codes_digest = {n: hashlib.sha256(w.contiguous().numpy().tobytes()).hexdigest()[:16] for n, w in whole.items()}
    from qgalore_dist.integrations.zero3 import int8_local_bytes

    int8_bytes = int8_local_bytes(engine.module)
    record = dict(losses=losses, norms=norms, coefs=coefs, svds=svds, replicas_checked=checked,
                  svd_count=galore.svd_count, dense=dense, codes=codes, codes_digest=codes_digest, world=world,
                  int8_local_bytes=_all_ranks(int8_bytes),
                  int8_partitioned=bool(getattr(engine, "qgalore_int8_partitioned", False)),
                  engine_optimizer=type(engine.optimizer).__name__,
                  engine_gradient_clipping=engine.gradient_clipping(),  # DeepSpeed's own (dense-only) clipping
                  comm=galore.comm.meter.total_bytes and dict(galore.comm.meter.total_bytes),
                  overlap_launches=galore.overlap and [galore.overlap.launches_in_backward,
                                                       galore.overlap.launches_at_step])
    engine.destroy() if hasattr(engine, "destroy") else None
    return record


def run_passthrough(stage: int, dtype: str, gas: int, args) -> dict:
    """``--passthrough``: a ds_config optimizer other than QGaLoreAdamW8bit (torch AdamW, no
    FusedAdam build) goes through ``qgalore_dist.initialize`` to DeepSpeed untouched."""
    import torch.distributed as dist

    import qgalore_dist

    world = dist.get_world_size()
    config = ds_config(stage, dtype, gas, world, args.clip, args.lr)
    config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}
    engine, _, _, _ = qgalore_dist.initialize(model=build_model(), config=config)
    losses = [train_step(engine, step, gas) for step in range(args.steps)]
    basic = type(engine.basic_optimizer)
    return dict(losses=losses, world=world, engine_optimizer=type(engine.optimizer).__name__,
                basic_optimizer=f"{basic.__module__}.{basic.__qualname__}",
                int8_layers=sum(isinstance(m, qgalore_dist.Int8Linear) for m in engine.module.modules()),
                has_qgalore=hasattr(engine, "qgalore"))


def config_file_run(path: str, args) -> tuple[str, dict]:
    """``--config-file``: the file is the ds_config, except rank 8 and update_proj_gap 3 (the
    tiny model's matrices are 64 wide); returns (its ``stage:dtype:gas``, record)."""
    from qgalore_dist.integrations.deepspeed import load_ds_config

    config = load_ds_config(path)
    config["optimizer"]["params"].update(rank=8, update_proj_gap=3)
    stage = int((config.get("zero_optimization") or {}).get("stage", 0))
    dtype = "bf16" if (config.get("bf16") or {}).get("enabled") else "fp32"
    gas = int(config.get("gradient_accumulation_steps", 1))
    return f"{stage}:{dtype}:{gas}", run_combo(stage, dtype, gas, args, config=config)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--matrix", default="0:fp32:1")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--clip", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", required=True)
    parser.add_argument("--config-file", default=None, help="one run with this ds_config file (see config_file_run)")
    parser.add_argument("--passthrough", action="store_true",
                        help="ds_config optimizer AdamW instead (run_passthrough)")
    parser.add_argument("--overlap", action="store_true", help="the optimizer's overlap_comm on")
    parser.add_argument("--int8-partition", choices=["true", "false"], default=None,
                        help="the entry's int8_partition (default: absent, i.e. on under ZeRO-3)")
    parser.add_argument("--persistence-threshold", type=int, default=None,
                        help="zero_optimization.stage3_param_persistence_threshold (default: absent)")
    parser.add_argument("--local_rank", type=int, default=0)  # the deepspeed launcher appends it
    args = parser.parse_args()
    torch.set_num_threads(1)
    import torch.distributed as dist

    from qgalore_dist.integrations.launch import init_distributed

    init_distributed(backend="gloo")

    results = {}
    if args.config_file:
        combo, results[combo] = config_file_run(args.config_file, args)
    for combo in [] if args.config_file else args.matrix.split(","):
        stage, dtype, gas = combo.split(":")
        run = run_passthrough if args.passthrough else run_combo
        results[combo] = run(int(stage), dtype, int(gas), args)
    if dist.get_rank() == 0:
        with open(args.out + ".tmp", "w") as f:
            json.dump(results, f)
        os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    from qgalore_dist.integrations.launch import run_main

    run_main(main)
