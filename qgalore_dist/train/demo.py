"""The main job on its built-in default: Q-GaLore training of a tiny LLaMA on real English text.

    python -m qgalore_dist.train.demo [--steps 200]

INT8 weights with stochastic rounding, INT4 projectors and 8-bit Adam states, single process.
"""

from __future__ import annotations

import argparse
import math
import time

import torch


def main(argv: list[str] | None = None) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    from .. import QGaLoreAdamW8bit, QGaLoreConfig, prepare_model
    from .corpus import builtin_text, byte_batches

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    text = builtin_text()
    print(f"corpus: {len(text):,} characters of Python standard-library documentation (byte tokens)")
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=128, intermediate_size=352, num_attention_heads=4, num_hidden_layers=4,
        vocab_size=256, max_position_embeddings=args.seq_len, bos_token_id=0, eos_token_id=1, pad_token_id=2))
    prepare_model(model)
    optimizer = QGaLoreAdamW8bit(
        [p for p in model.parameters() if p.requires_grad or p.dtype == torch.uint8],
        QGaLoreConfig(lr=args.lr, rank=args.rank, update_proj_gap=50, scale=0.25, seed=args.seed))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: LLaMA {n_params / 1e6:.2f}M parameters, 28 INT8 GaLore matrices, rank {args.rank}, INT4 projectors")
    batches = byte_batches(text, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)
    start, window = time.time(), []
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / 20)  # short linear warmup
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = next(batches)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        window.append(loss.item())
        if step % 20 == 0 or step == 1:
            mean = sum(window) / len(window)
            print(f"step {step:4d}  loss {mean:.3f}  ppl {math.exp(mean):7.2f}  lr {lr:.4f}  "
                  f"SVDs so far {optimizer.svd_count}  {time.time() - start:5.1f}s")
            window = []
    print(f"done: {args.steps} steps, {optimizer.svd_count} SVDs, {optimizer.skipped_steps} skipped steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
