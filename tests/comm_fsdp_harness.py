"""Measurement harness of the FSDP2 / HSDP communication closed forms
(``qgalore_dist.estimate.comm_fsdp``): every ``torch.distributed`` collective of real gloo runs,
counted.

W gloo ranks (2: FSDP; 4: HSDP 2 x 2) train a small LlamaForCausalLM (hidden 64, intermediate 160,
2 layers, odd vocab 127: padded shards) two steps (0: every projector refreshes, 1: steady) per
case: FSDP2 + AdamW (+ torchao AdamW8bit given a site-packages holding it) and ours (``"sharded"``
fp32 / bf16 payloads, ``"std"``).  Every collective (FSDP2 and the package look them up at call
time) is wrapped and counted as ring volumes, with its group size, phase (forward, backward,
``step()``) and source (``qgalore_dist`` code on the stack or not).  FSDP2's forward + backward
calls must equal its closed form per collective, the package's calls its meter
(``optimizer.comm.meter.last_step``, all groups) and both the closed form per kind, exactly (==:
ring factors 1/2, 3/4 are exact in binary); any other collective fails it.

Used by ``tests/unit/test_bench_comm_fsdp.py`` and ``benchmarks/comm_fsdp.py``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from typing import Any, Iterator, Sequence

import torch
from comm_harness import TINY_LLAMA

from qgalore_dist.distributed.comm import KINDS
from qgalore_dist.estimate.comm import ring
from qgalore_dist.estimate.comm_fsdp import FSDP2_KINDS, baseline_step, ours_step
from qgalore_dist.estimate.model import model_tensors

OURS = {"ours_sharded": ("sharded", 4), "ours_sharded_bf16": ("sharded", 2), "ours_std": ("std", 4)}  # B/low-rank el.
"""Our cases: name -> (projection, payload bytes per low-rank element)."""
TINY = {**TINY_LLAMA, "vocab_size": 127}   # odd vocab: padded embedding / head shards
TINY_GALORE = dict(rank=8, group_size=64, proj_group=64)


_RING = {"all_gather_single": 1, "reduce_scatter_single": 1, "all_reduce": 2, "reduce_scatter": 1, "reduce": 1,
         "broadcast": 1}
_OTHER = ("all_gather_into_tensor", "reduce_scatter_tensor", "all_gather", "all_to_all_single", "all_to_all",
          "scatter", "gather", "all_gather_object", "broadcast_object_list")  # counted as unexpected


def _payload_bytes(op: str, args: tuple, kwargs: dict) -> int:
    """The buffer S of the ring formula: gathered output, scattered input, or the reduced tensor."""
    if op == "all_gather_single":
        t = kwargs.get("output_tensor", args[0] if args else None)
    elif op == "reduce_scatter_single":
        t = kwargs.get("input", args[1] if len(args) > 1 else None)
    elif op == "reduce_scatter":
        return sum(x.numel() * x.element_size() for x in (args[1] if len(args) > 1 else kwargs["input_list"]))
    else:
        t = args[0] if args else next(iter(kwargs.values()))
    return t.numel() * t.element_size() if torch.is_tensor(t) else 0


def _from_package() -> bool:
    """Whether ``qgalore_dist`` code is on the calling stack (then it is one of the package's collectives)."""
    frame = sys._getframe(2)
    while frame is not None and f"{os.sep}qgalore_dist{os.sep}" not in frame.f_code.co_filename:
        frame = frame.f_back
    return frame is not None


@contextlib.contextmanager
def counting_collectives() -> Iterator[dict[str, Any]]:
    """Wrap the ``torch.distributed`` collectives; yields ``{"phase": str, "calls": [...]}`` (set
    ``phase`` to tag later calls); a call is ``(phase, source, op, group size, payload, ring bytes)``,
    source ``package`` when made from ``qgalore_dist`` code, else ``torch`` (FSDP2, the optimizer)."""
    import torch.distributed as dist

    state: dict[str, Any] = {"phase": "other", "calls": []}
    originals = {op: getattr(dist, op) for op in (*_RING, *_OTHER) if hasattr(dist, op)}

    def wrap(op: str, fn):
        def counted(*args, **kwargs):
            size, source = dist.get_world_size(kwargs.get("group")), "package" if _from_package() else "torch"
            payload = _payload_bytes(op, args, kwargs) if op in _RING else 0
            state["calls"].append((state["phase"], source, op, size, payload, _RING.get(op, 0) * ring(size) * payload))
            return fn(*args, **kwargs)
        return counted

    for op, fn in originals.items():
        setattr(dist, op, wrap(op, fn))
    try:
        yield state
    finally:
        for op, fn in originals.items():
            setattr(dist, op, fn)


def _build_case(case: str, mesh, torchao_site: str | None):
    """(model, optimizer, the optimizer's Collectives) of one case on ``mesh``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from qgalore_dist import QGaLoreConfig, prepare_model
    from qgalore_dist.integrations.fsdp import fully_shard_qgalore

    torch.manual_seed(0)
    if case.startswith("fsdp2_"):
        model = LlamaForCausalLM(LlamaConfig(**TINY))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        if case == "fsdp2_torchao_adamw8bit":
            # private inductor cache: from the shared one a rank loaded a step built for 64-row shards, not 63
            cache = tempfile.TemporaryDirectory(prefix="comm_fsdp_inductor_")  # removed with the optimizer
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
            sys.path.insert(0, torchao_site)
            from torchao.optim import AdamW8bit

            opt = AdamW8bit(model.parameters(), lr=1e-3)
            opt.inductor_cache = cache
            return model, opt, []
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3), []
    projection, payload = OURS[case]
    model = LlamaForCausalLM(LlamaConfig(**TINY)).to(torch.bfloat16)
    prepare_model(model, group_size=TINY_GALORE["group_size"])
    config = QGaLoreConfig(lr=0.01, rank=TINY_GALORE["rank"], update_proj_gap=100, payload_dtype={4: "float32",
                           2: "bfloat16"}[payload], proj_group_size=TINY_GALORE["proj_group"])
    model, opt = fully_shard_qgalore(model, config, mesh, projection=projection)
    comms = list({id(c): c for c in (opt.comm, opt.shard_comm, opt.replicate_comm) if c is not None}.values())
    for comm in comms:  # close the constructor's agreement checks (control traffic, not a step's)
        comm.meter.end_step()
    return model, opt, comms


def _run_case(case: str, mesh, rank: int, counter: dict[str, Any], torchao_site: str | None) -> list[dict[str, Any]]:
    """Two steps (0: every projector refreshes, 1: steady); per step the counted calls and the meter."""
    model, opt, comms = _build_case(case, mesh, torchao_site)
    data = torch.randint(0, TINY["vocab_size"], (2, 2, 16), generator=torch.Generator().manual_seed(1234 + rank))
    steps = []
    for step in range(2):
        counter.update(calls=[], phase="forward")
        loss = model(input_ids=data[step], labels=data[step]).loss
        counter["phase"] = "backward"
        loss.backward()
        counter["phase"] = "step"
        opt.step()
        counter["phase"] = "other"
        opt.zero_grad()
        meter = {k: sum(c.meter.last_step[k]["bytes"] for c in comms) for k in KINDS}
        steps.append({"calls": list(counter["calls"]), "meter": meter, "svds": getattr(opt, "svds_last_step", None),
                      "state": _state_kind(opt)})
    return steps


def _state_kind(opt) -> str:
    """Type of the first ``exp_avg`` in the optimizer's state (a DTensor's: with its local shard's)."""
    moment = next((s["exp_avg"] for s in opt.state.values() if "exp_avg" in s), None)
    return type(moment).__name__ + (f"[{type(moment.to_local()).__name__}]" if hasattr(moment, "to_local") else "")


def _count_rank(rank: int, world: int, mesh_shape: tuple[int, ...], cases: tuple[str, ...],
                torchao_site: str | None) -> dict[str, Any]:
    """Inside the process group (``dist_harness.run_distributed``): every case, counted."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard")[-len(mesh_shape):])
    with counting_collectives() as counter:
        return {case: _run_case(case, mesh, rank, counter, torchao_site) for case in cases}


_FSDP2_OP = {"all_gather_single": "param_all_gather", "reduce_scatter_single": "grad_reduce_scatter",
             "all_reduce": "grad_all_reduce"}
_PACKAGE_OPS = ("all_reduce", "reduce_scatter", "reduce", "broadcast")


def _counted(calls: list) -> dict[str, Any]:
    """Counted ring bytes: FSDP2's (torch's, in forward + backward) by collective, the package's
    total, and any other call (``unexpected``: e.g. torch collectives inside ``step()``)."""
    fsdp, n_calls = dict.fromkeys(FSDP2_KINDS, 0.0), dict.fromkeys(FSDP2_KINDS, 0)
    package, package_calls, unexpected = 0.0, 0, []
    for phase, source, op, size, _, nbytes in calls:
        if source == "torch" and phase in ("forward", "backward") and op in _FSDP2_OP:
            fsdp[_FSDP2_OP[op]] += nbytes
            n_calls[_FSDP2_OP[op]] += 1
        elif source == "package" and op in _PACKAGE_OPS:
            package += nbytes
            package_calls += 1
        else:
            unexpected.append(f"{op} from {source} in {phase} (group of {size})")
    return {"fsdp2": fsdp, "fsdp2_calls": n_calls, "package": package, "package_calls": package_calls,
            "unexpected": unexpected}


def _predicted(case: str, replicas: int, shards: int, refresh: bool) -> dict[str, Any]:
    """The closed form on the validation model's shapes (a meta-device instance)."""
    tensors = [(t.name, t.shape, t.galore) for t in model_tensors(TINY)]
    if case.startswith("fsdp2_"):
        return baseline_step(tensors, replicas, shards)
    projection, payload = OURS[case]
    return ours_step(tensors, replicas, shards, rank=TINY_GALORE["rank"], projection=projection, payload=payload,
                     refresh=refresh, group_size=TINY_GALORE["group_size"], proj_group=TINY_GALORE["proj_group"])


def check_case(case: str, per_rank: list[list[dict[str, Any]]], replicas: int, shards: int) -> list[dict[str, Any]]:
    """Per step and rank: counted FSDP2 bytes vs closed form, meter and counted package bytes vs
    the package closed form; ``exact`` when all are equal and nothing unexpected ran."""
    out = []
    for step in range(2):
        predicted = _predicted(case, replicas, shards, refresh=step == 0)
        ranks = []
        for steps in per_rank:
            got, meter = _counted(steps[step]["calls"]), steps[step]["meter"]
            exact = (got["fsdp2"] == predicted["fsdp2"] and meter == predicted["package"]
                     and got["package"] == sum(predicted["package"].values()) and not got["unexpected"])
            ranks.append({**got, **{k: steps[step][k] for k in ("meter", "svds", "state")}, "exact": exact})
        out.append({"step": step, "kind": "steady" if step else "first" if case.startswith("fsdp2_") else "refresh all",
                    "predicted": predicted, "ranks": ranks, "exact": all(r["exact"] for r in ranks)})
    return out


def validate(mesh_shape: tuple[int, ...], cases: Sequence[str], torchao_site: str | None = None) -> dict[str, Any]:
    """One gloo launch of ``prod(mesh_shape)`` ranks running every case, checked (``check_case``)."""
    from dist_harness import run_distributed  # tests/ is on sys.path (conftest, benchmarks/_common)

    replicas, shards = (1, *mesh_shape)[-2:]
    start, world = time.perf_counter(), replicas * shards
    results = run_distributed(_count_rank, world, tuple(mesh_shape), tuple(cases), torchao_site, timeout_s=300)
    runs = {case: check_case(case, [r[case] for r in results], replicas, shards) for case in cases}
    return {"mesh": f"{replicas}x{shards}", "world": world, "runs": runs, "wall_s": time.perf_counter() - start,
            "exact": all(s["exact"] for steps in runs.values() for s in steps)}
