"""Measurement harness of the communication closed forms (``qgalore_dist.estimate.comm``): metered
2-rank gloo runs of ``QGaLoreAdamW8bit`` and a counted DDP + ``powerSGD_hook`` run.

Used by ``tests/unit/test_bench_comm.py`` and ``benchmarks/comm.py`` (which puts ``tests/`` on
``sys.path``).

* ours: a small LlamaForCausalLM (``TINY_LLAMA``) converted with ``prepare_model``, rank 8, 2 steps
  (step 0 refreshes every projector, step 1 is steady) per payload case (``CASES``);
  ``optimizer.comm.meter.last_step`` after each step is compared kind by kind and rank by rank with
  the closed form on the same shapes and ownership plan: equality is exact (==).
* PowerSGD: the same model (not converted) in ``DistributedDataParallel`` with ``powerSGD_hook``;
  ``torch.distributed.all_reduce`` is wrapped for the duration of each backward, so every byte the
  hook hands to the process group is counted (DDP's own all-reduces run in C++ only when no hook is
  registered); they must equal the DDP closed form before ``start_powerSGD_iter`` and the PowerSGD
  one after.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist

from qgalore_dist.estimate.comm import (
    KINDS,
    ddp_bytes,
    numel,
    ours_refresh_all,
    ours_steady,
    powersgd_bytes,
    powersgd_elements,
    ring,
)

TINY_LLAMA = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_hidden_layers=2, vocab_size=128,
                  max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=2)
"""The small model of the metered checks (the Q-GaLore runs and the PowerSGD run)."""

CASES = {  # validation: name -> (model dtype, payload_dtype, compress_lowrank, compress_dense)
    "fp32 model, fp32 payload": ("float32", "float32", False, False),
    "bf16 model, fp32 payload (ours fp32)": ("bfloat16", "float32", False, False),
    "bf16 model, bf16 payload (ours bf16)": ("bfloat16", "bfloat16", False, False),
    "bf16 model, int8 low-rank + bf16 dense (ours int8)": ("bfloat16", "bfloat16", True, False),
    "fp32 model, int8 low-rank + fp32 dense": ("float32", "float32", True, False),
    "bf16 model, int8 low-rank + int8 dense (ours int8 all)": ("bfloat16", "bfloat16", True, True),
}



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


# ----------------------------------------------------------------------------- ours, metered
def _ours_case(rank: int, model_dtype: str, payload_dtype: str, compress: bool, compress_dense: bool) -> dict:
    """Two metered steps of QGaLoreAdamW8bit on the tiny LLaMA (inside the process group)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qgalore_dist import QGaLoreAdamW8bit, QGaLoreConfig, prepare_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).to(getattr(torch, model_dtype))
    prepare_model(model, group_size=64)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or p.dtype == torch.uint8]
    cfg = QGaLoreConfig(lr=0.01, rank=8, update_proj_gap=100, proj_group_size=64, payload_dtype=payload_dtype,
                        compress_lowrank=compress, compress_dense=compress_dense)
    opt = QGaLoreAdamW8bit([p for _, p in named], cfg, names={p: n for n, p in named})
    # The constructor's agreement checks (all_gather_object of the config and the shapes) are
    # metered as control traffic; close that "step" so step 0 holds only step 0's bytes.
    construction = {k: v["bytes"] for k, v in opt.comm.meter.end_step().items() if v["bytes"]}
    data = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 4, 32), generator=torch.Generator().manual_seed(1234))
    meters = []
    for step in range(2):  # step 0 refreshes every projector, step 1 is steady
        x = data[step, 2 * rank:2 * rank + 2]
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        meters.append({k: v["bytes"] for k, v in opt.comm.meter.last_step.items()})
    tensors = [(n, tuple(p.shape), p.dtype == torch.uint8) for n, p in named]
    return {"meters": meters, "construction": construction, "tensors": tensors, "svds": opt.svd_count,
            "owners": sorted(set(opt.plan.owner.values())),
            "dense_param_bytes": next(p.element_size() for _, p in named if p.dtype != torch.uint8),
            "payload_bytes": torch.tensor([], dtype=getattr(torch, payload_dtype)).element_size()}


def _validate_rank(rank: int, world: int, cases: dict[str, tuple[str, str, bool, bool]],
                   psgd_dtypes: tuple[str, ...]) -> dict:
    return {"ours": {name: _ours_case(rank, *case) for name, case in cases.items()},
            "powersgd": {d: run_powersgd_ddp(rank, d) for d in psgd_dtypes}}


def _check_case(results: list[dict], world: int, compress: bool, compress_dense: bool) -> dict[str, Any]:
    res = results[0]
    kw = dict(b_lowrank=res["payload_bytes"], b_dense_grad=res["payload_bytes"],
              b_dense_param=res["dense_param_bytes"], compress=compress, compress_dense=compress_dense)
    closed = [[ours_refresh_all(res["tensors"], 8, world, proj_group=64, at_rank=k, **kw) for k in range(world)],
              [ours_steady(res["tensors"], 8, world, at_rank=k, **kw) for k in range(world)]]
    steps = []
    for step in range(2):
        rows = {k: {"metered": [r["meters"][step][k] for r in results],
                    "closed_form": [closed[step][rk][k] for rk in range(world)]} for k in KINDS}
        exact = all(row["metered"] == row["closed_form"] for row in rows.values())
        steps.append({"step": step, "kind": "refresh, all matrices" if step == 0 else "steady", "kinds": rows,
                      "metered_total": [sum(r["meters"][step].values()) for r in results],
                      "closed_form_total": [sum(c.values()) for c in closed[step]], "exact_match": exact})
    return {"dense_bytes_per_elem": {"grad": res["payload_bytes"], "param": res["dense_param_bytes"]},
            "payload_bytes": res["payload_bytes"], "compress_lowrank": compress, "compress_dense": compress_dense,
            "construction_bytes": [r["construction"] for r in results],
            "galore_matrices": sum(1 for *_, g in res["tensors"] if g),
            "dense_tensors": sum(1 for *_, g in res["tensors"] if not g), "steps": steps}


def validate(world: int = 2, cases: dict[str, tuple[str, str, bool, bool]] | None = None,
             psgd_dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> dict[str, Any]:
    """One gloo launch: every Q-GaLore case against the meter, PowerSGD against counted bytes."""
    from dist_harness import run_distributed  # tests/ is on sys.path (conftest, benchmarks/_common)

    cases = CASES if cases is None else cases
    results = run_distributed(_validate_rank, world, cases, psgd_dtypes)
    out: dict[str, Any] = {"world_size": world, "runs": {}, "powersgd": {}}
    for name, (_, _, compress, compress_dense) in cases.items():
        out["runs"][name] = _check_case([r["ours"][name] for r in results], world, compress, compress_dense)
    for dtype in psgd_dtypes:
        out["powersgd"][dtype] = check_powersgd([r["powersgd"][dtype] for r in results], world)
    out["ours_exact"] = all(s["exact_match"] for run in out["runs"].values() for s in run["steps"])
    out["powersgd_exact"] = all(v["all_exact"] for v in out["powersgd"].values())
    out["all_exact"] = out["ours_exact"] and out["powersgd_exact"]
    return out
