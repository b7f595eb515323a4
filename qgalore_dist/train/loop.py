"""Q-GaLore LLaMA training under DeepSpeed (the first cut of the ``qgalore-train`` tool):

    deepspeed --num_gpus 2 --module qgalore_dist.train --deepspeed_config configs/ds/zero2_bf16.json
    torchrun --nproc_per_node 2 -m qgalore_dist.train --deepspeed_config configs/ds/zero2_bf16.json
    python -m qgalore_dist.train --deepspeed_config ...            # one process
    launch/slurm_srun.sbatch, launch/mpirun.sh                     # SLURM, OpenMPI

The model is an HF ``LlamaForCausalLM`` from a config JSON (``configs/models/llama_*.json``) or a
built-in 1M-parameter default; the data is the built-in English corpus (Python's own
documentation, byte tokens), each rank drawing its own seeded stream.  Every ``--save-every``
steps, at the end, and on SIGTERM/SIGINT (SLURM preemption) a checkpoint goes to ``--save-dir``;
a run started with the same ``--save-dir`` resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import time

import torch

TINY_LLAMA = dict(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_hidden_layers=4,
                  vocab_size=256, bos_token_id=0, eos_token_id=1, pad_token_id=2)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deepspeed_config", required=True, help="ds_config JSON with a QGaLoreAdamW8bit optimizer entry")
    parser.add_argument("--model-config", default=None, help="LLaMA config JSON (default: a built-in 1M model)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps to train to")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--save-dir", default=None)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return parser.parse_args(argv)


def _model(path: str | None, seq_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(TINY_LLAMA)
    if path is not None:
        with open(path) as f:
            fields = json.load(f)
    fields["max_position_embeddings"] = max(seq_len, int(fields.get("max_position_embeddings", 0)))
    if int(fields.get("vocab_size", 256)) < 256:
        raise ValueError(f"{path}: vocab_size must be >= 256 for the built-in byte-level corpus")
    return LlamaForCausalLM(LlamaConfig(**fields))


class _StopFlag:
    """SIGTERM / SIGINT set a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._set)

    def _set(self, signum, frame) -> None:
        self.signal = signum


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    from . import initialize
    from .checkpoint import load_checkpoint, save_checkpoint
    from .data import builtin_text, byte_batches
    from .launch_env import init_distributed

    args = _parse(argv)
    env = init_distributed()
    torch.manual_seed(args.seed)  # same initial model everywhere (rank 0's is broadcast anyway)
    model = _model(args.model_config, args.seq_len)
    engine, _, _, _ = initialize(model=model, config=args.deepspeed_config)
    galore, rank, world = engine.qgalore, dist.get_rank(), dist.get_world_size()
    micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    stop = _StopFlag()
    client = load_checkpoint(engine, args.save_dir) if args.save_dir else None
    start = int(client["next_step"]) if client else 0
    if rank == 0:
        print(f"[qgalore] {env.source}: {world} ranks, ZeRO stage {engine.zero_optimization_stage()}, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{len(galore.galore_params)} INT8 GaLore matrices" + (f", resumed at step {start}" if client else ""),
              flush=True)
    # Each rank's stream is keyed by (seed, rank, step): a resumed run continues the same data.
    text = builtin_text()
    t0, window = time.time(), []
    for step in range(start, args.steps):
        batches = byte_batches(text, seq_len=args.seq_len, batch_size=micro, seed=args.seed * 1_000_003 + step * world + rank)
        for _ in range(gas):
            x = next(batches)
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
            window.append(float(loss.detach()))
        done = step + 1
        if rank == 0 and (done % args.log_every == 0 or done == args.steps):
            mean = sum(window) / len(window)
            print(f"step {done:5d}  loss {mean:.4f}  ppl {math.exp(mean):8.2f}  lr {engine.get_lr()[0]:.2e}  "
                  f"SVDs {galore.svd_count}  {time.time() - t0:6.1f}s", flush=True)
            window = []
        # A signal may reach only some ranks: agree, or the others would wait in the save forever.
        flag = torch.tensor([0 if stop.signal is None else 1])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stopping = bool(flag)
        if args.save_dir and (stopping or done == args.steps or (args.save_every and done % args.save_every == 0)):
            save_checkpoint(engine, args.save_dir, tag=f"step{done}", client_state={"next_step": done})
        if stopping:
            if rank == 0:
                print(f"[qgalore] signal {stop.signal}: checkpoint saved at step {done}, exiting", flush=True)
            return 0
    galore.check_replicas()
    if rank == 0:
        print(f"[qgalore] done: {args.steps} steps, {galore.svd_count} SVDs, replicas identical", flush=True)
    return 0


if __name__ == "__main__":
    from .launch_env import run_main

    run_main(main)
