"""Checkpoint worker for tests/test_checkpoint.py, started by ``torchrun``: trains the
tests/ds_worker.py model under one ZeRO stage, optionally resuming from ``--load-dir`` first
and saving after ``--save-at`` steps into ``--save-dir``; rank 0 writes the losses and final
state sums of every step run in this process to ``--out``.  The global batch of step s is the
same for every world size (micro-batch ``k * world + rank`` of step s), so runs at different
world sizes with gas * world constant see the same data."""

from __future__ import annotations

import argparse
import json
import os

import torch


def _die_after_first_file() -> None:
    """Make this rank's next checkpoint write kill the process once its first file is on disk."""
    import signal

    from qgalore_dist import checkpoint

    write = checkpoint._write_bytes

    def write_then_die(path, data):
        info = write(path, data)
        os.kill(os.getpid(), signal.SIGKILL)
        return info

    checkpoint._write_bytes = write_then_die


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--gas", type=int, default=1)
    parser.add_argument("--steps", type=int, required=True, help="train until this global step")
    parser.add_argument("--save-at", default="", help="comma-separated steps after which to save")
    parser.add_argument("--kill-in-save", type=int, default=-1,
                        help="rank 1 SIGKILLs itself in the middle of the save after this step")
    parser.add_argument("--save-dir", default="")
    parser.add_argument("--load-dir", default="")
    parser.add_argument("--compress", action="store_true")
    parser.add_argument("--int8-partition", choices=["true", "false"], default=None,
                        help="the entry's int8_partition (default: absent, i.e. on under ZeRO-3)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import torch.distributed as dist
    from ds_worker import build_model, ds_config, train_step

    import qgalore_dist
    from qgalore_dist.checkpoint import load_checkpoint, save_checkpoint
    from qgalore_dist.integrations.launch import init_distributed

    init_distributed(backend="gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    config = ds_config(args.stage, args.dtype, args.gas, world, clip=1.0, lr=3e-3)
    config["optimizer"]["params"]["compress_lowrank"] = args.compress
    if args.int8_partition is not None:
        config["optimizer"]["params"]["int8_partition"] = args.int8_partition == "true"
    engine, _, _, _ = qgalore_dist.initialize(model=build_model(seed=rank + 7), config=config)
    start = 0
    if args.load_dir:
        client = load_checkpoint(engine, args.load_dir)
        start = int(client["next_step"])

    losses = {}
    for step in range(start, args.steps):
        losses[step] = train_step(engine, step, args.gas)
        engine.qgalore.check_replicas()
        if str(step + 1) in args.save_at.split(","):
            if step + 1 == args.kill_in_save and rank == 1:
                _die_after_first_file()
            save_checkpoint(engine, args.save_dir, client_state={"next_step": step + 1})

    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"losses": losses, "svd_count": engine.qgalore.svd_count}, f)
    return 0


if __name__ == "__main__":
    from qgalore_dist.integrations.launch import run_main

    run_main(main)
