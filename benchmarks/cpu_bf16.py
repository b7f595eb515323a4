"""Why the training tool's default batch is small on CPU: forward+backward time of the built-in
``tiny`` LLaMA in fp32 vs bf16 on this CPU (one thread, as each of 2 ranks on 2 cores gets).

    .venv/bin/python benchmarks/cpu_bf16.py [--batch 8 --seq-len 256 --vocab 4096 --repeats 3]

Writes ``benchmarks/results/cpu_bf16.{json,md}`` with machine, versions, command and date.
CPUs without native bf16 matrix instructions (no AVX512-BF16 / AMX) run bf16 ``aten::mm``
several times slower than fp32; the tool's bf16 default then trains 4 x 128 tokens per rank.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from benchmarks._common import environment, environment_md, write_outputs  # noqa: E402
from qgalore_dist.train.loop import TINY_LLAMA  # noqa: E402


def fwd_bwd_seconds(dtype: torch.dtype, *, batch: int, seq_len: int, vocab: int, repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` forward+backward passes (after one warm-up pass)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, vocab_size=vocab, max_position_embeddings=seq_len)).to(dtype)
    ids = torch.randint(0, vocab, (batch, seq_len))
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        if i:
            times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = dict(batch=args.batch, seq_len=args.seq_len, vocab=args.vocab, repeats=args.repeats)
    results = {name: fwd_bwd_seconds(dtype, **shape)
               for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    median = {k: statistics.median(v) for k, v in results.items()}
    payload = {"environment": environment(), "shape": shape, "seconds": results, "median_s": median,
               "bf16_over_fp32": median["bf16"] / median["fp32"]}
    md = "\n".join([
        "# Forward+backward of the tiny LLaMA on CPU: fp32 vs bf16", "", environment_md(payload["environment"]), "",
        f"Batch {args.batch} x {args.seq_len} tokens, vocabulary {args.vocab}, {args.threads} thread(s), "
        f"median of {args.repeats} after a warm-up.", "",
        "| dtype | median s | runs |", "|---|---|---|",
        *(f"| {k} | {median[k]:.3f} | {', '.join(f'{t:.3f}' for t in v)} |" for k, v in results.items()), "",
        f"bf16 / fp32 = {payload['bf16_over_fp32']:.1f}x",
    ])
    json_path, md_path = write_outputs("cpu_bf16", payload, md)
    print(md)
    print(f"\nwrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
