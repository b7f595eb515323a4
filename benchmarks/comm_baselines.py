"""Baselines of ``benchmarks/comm.py``: closed-form gradient-sync bytes per step per rank of DDP,
ZeRO-2 and torch's PowerSGD DDP hook, and a counted 2-rank DDP + PowerSGD run that checks them.

Volumes are the ring-algorithm ones that ``qgalore_dist.distributed.comm`` meters: an all-reduce of
S bytes costs ``2 (N-1)/N * S`` per rank, a reduce-scatter or all-gather ``(N-1)/N * S``.

* DDP:    one all-reduce of every gradient, ``2 (N-1)/N * b * P`` (b = 2 for bf16 gradients).
* ZeRO-2: reduce-scatter of the gradients + all-gather of the updated parameters,
          ``(N-1)/N * b * P`` each: the same volume as DDP.
* PowerSGD (``torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook``, rank r): per DDP bucket
  the hook views every gradient as ``tensor.view(shape[0], -1)`` = (n, m) and compresses it when
  ``(n + m) * r' * min_compression_rate < n * m`` with ``r' = min(n, m, r)`` (``_should_compress``;
  1-D tensors, viewed as (n, 1), never qualify).  It then issues three all-reduces in the bucket's
  dtype: the uncompressed tensors concatenated, all P matrices (n x r' each) and all Q matrices
  (m x r' each), so a step costs ``2 (N-1)/N * b * (U + sum (n + m) * r')`` per rank whatever the
  bucketing.  Error feedback (a per-bucket residual) and warm start (reusing Q) change memory and
  compute, not bytes.  Before ``start_powerSGD_iter`` the hook all-reduces the whole bucket (the
  DDP volume).  Tensors are sent in the gradients' dtype (fp32 for fp32 parameters, bf16 for bf16).

Counted check (:func:`run_powersgd_ddp`, inside a gloo process group): a small LlamaForCausalLM in
``DistributedDataParallel`` with ``powerSGD_hook`` registered; ``torch.distributed.all_reduce`` is
wrapped for the duration of each backward, so every byte the hook hands to the process group is
counted (DDP's own all-reduces run in C++ only when no hook is registered).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

Tensors = Sequence[tuple[str, tuple[int, ...], bool]]
"""(name, shape, is_galore) of every parameter, as ``comm.model_tensors`` returns them."""

TINY_LLAMA = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_hidden_layers=2, vocab_size=128,
                  max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=2)
"""The small model of the metered checks (comm.py's Q-GaLore runs and the PowerSGD run)."""


def numel(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def ring(world: int) -> float:
    if world < 2:
        raise ValueError(f"world size must be >= 2 for a communication volume, got {world}")
    return (world - 1) / world


def ddp_bytes(params: int, world: int, *, b: int = 2) -> float:
    """All-reduce of every gradient, ``b`` bytes per element."""
    return 2 * ring(world) * b * params


def zero2_bytes(params: int, world: int, *, b: int = 2) -> float:
    """Reduce-scatter of the gradients + all-gather of the parameters, ``b`` bytes each."""
    return ring(world) * b * params + ring(world) * b * params


def powersgd_elements(tensors: Tensors, *, rank: int = 4, min_compression_rate: float = 2.0) -> dict[str, int]:
    """Elements the hook all-reduces per step: ``uncompressed`` (concatenated), ``p`` and ``q``."""
    if rank < 1:
        raise ValueError(f"PowerSGD rank must be >= 1, got {rank}")
    out = {"uncompressed": 0, "p": 0, "q": 0, "compressed_tensors": 0, "uncompressed_tensors": 0}
    for _, shape, _ in tensors:
        n = shape[0]
        m = numel(shape) // n
        r = min(n, m, rank)
        if (n + m) * r * min_compression_rate < n * m:  # torch's _should_compress
            out["p"] += n * r
            out["q"] += m * r
            out["compressed_tensors"] += 1
        else:
            out["uncompressed"] += n * m
            out["uncompressed_tensors"] += 1
    return out


def powersgd_bytes(tensors: Tensors, world: int, *, b: int, rank: int = 4, min_compression_rate: float = 2.0) -> float:
    """Per-rank bytes of one compressed step (``iter >= start_powerSGD_iter``)."""
    el = powersgd_elements(tensors, rank=rank, min_compression_rate=min_compression_rate)
    return 2 * ring(world) * b * (el["uncompressed"] + el["p"] + el["q"])


# ----------------------------------------------------------------------------- counted run
@contextlib.contextmanager
def counting_all_reduce() -> Iterator[list[int]]:
    """Wrap ``torch.distributed.all_reduce``; yields the list of bytes of each call.  The DDP
    hooks look ``dist.all_reduce`` up at call time, so the wrapper sees every hook collective."""
    calls: list[int] = []
    original = dist.all_reduce

    def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any):
        calls.append(tensor.numel() * tensor.element_size())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counted
    try:
        yield calls
    finally:
        dist.all_reduce = original


def run_powersgd_ddp(rank: int, dtype_name: str, *, steps: int = 4, start_iter: int = 2,
                     matrix_rank: int = 4) -> dict[str, Any]:
    """Inside an initialized process group: ``steps`` forward/backward passes of the tiny LLaMA
    under DDP + ``powerSGD_hook``; returns the bytes of every all-reduce of each step and the
    parameter shapes.  ``start_iter`` >= 2 (torch requires it with error feedback / warm start)."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
    from torch.nn.parallel import DistributedDataParallel
    from transformers import LlamaConfig, LlamaForCausalLM

    if steps < 1 or start_iter < 2:
        raise ValueError(f"need steps >= 1 and start_iter >= 2, got {steps}, {start_iter}")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).to(getattr(torch, dtype_name))
    tensors = [(n, tuple(p.shape), False) for n, p in model.named_parameters()]
    ddp = DistributedDataParallel(model)
    state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=matrix_rank,
                               start_powerSGD_iter=start_iter)
    ddp.register_comm_hook(state, psgd.powerSGD_hook)
    data = torch.randint(0, TINY_LLAMA["vocab_size"], (steps, 2, 2, 32), generator=torch.Generator().manual_seed(7))
    per_step: list[list[int]] = []
    for step in range(steps):
        with counting_all_reduce() as calls:
            x = data[step, rank]
            ddp(input_ids=x, labels=x).loss.backward()  # DDP waits for the hook's futures here
        per_step.append(list(calls))
        ddp.zero_grad(set_to_none=True)
    return {"tensors": tensors, "bytes_per_elem": model.lm_head.weight.element_size(), "calls": per_step,
            "start_iter": start_iter, "matrix_rank": matrix_rank}


def check_powersgd(results: list[dict[str, Any]], world: int) -> dict[str, Any]:
    """Counted ring bytes of every rank and step against the closed forms (exact equality)."""
    res = results[0]
    b, tensors = res["bytes_per_elem"], res["tensors"]
    params = sum(numel(s) for _, s, _ in tensors)
    steps = []
    for step in range(len(res["calls"])):
        compressed = step >= res["start_iter"]
        closed = (powersgd_bytes(tensors, world, b=b, rank=res["matrix_rank"]) if compressed
                  else ddp_bytes(params, world, b=b))
        counted = [2 * ring(world) * sum(r["calls"][step]) for r in results]
        steps.append({"step": step, "phase": "PowerSGD" if compressed else "vanilla all-reduce (before start iter)",
                      "all_reduce_calls": len(res["calls"][step]),
                      "raw_bytes": [sum(r["calls"][step]) for r in results],
                      "counted": counted, "closed_form": closed, "exact_match": all(c == closed for c in counted)})
    return {"bytes_per_elem": b, "params": params, "matrix_rank": res["matrix_rank"], "start_iter": res["start_iter"],
            "elements": powersgd_elements(tensors, rank=res["matrix_rank"]), "steps": steps,
            "all_exact": all(s["exact_match"] for s in steps)}
