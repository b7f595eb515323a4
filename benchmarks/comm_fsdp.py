"""Bytes per step per rank on FSDP2 / HSDP: Q-GaLore on FSDP2 (``qgalore_dist.integrations.fsdp``,
``projection="sharded"`` and ``"std"``) against FSDP2 + AdamW with bf16 mixed precision, for
LLaMA 60M-7B at N = 8 and 64 shard ranks and on HSDP meshes R x S (replicas x shards, W = R S).
FSDP2 + torchao ``AdamW8bit`` moves the same bytes as FSDP2 + AdamW (its 8-bit state is sharded
like the parameters and never travels): that row, not a column of its own.

Ring volumes per rank, as ``qgalore_dist.distributed.comm`` meters them: all-reduce of S bytes
``2 (N-1)/N * S``, reduce-scatter / all-gather / broadcast / reduce ``(N-1)/N * S`` (S the whole
gathered or scattered buffer, N the size of the group it runs in).

FSDP2 (torch 2.13: ``dist.all_gather_single`` / ``dist.reduce_scatter_single``, one call per
``fully_shard`` group -- each decoder layer, and the root: embeddings, final norm, head -- and
``dist.all_reduce`` across replicas on HSDP) moves dim-0 padded shards, ``ceil(d0/S) * rest``:
``param_all_gather`` ``(S-1) * sum(shard bytes)`` per gather of a group, decoder layers twice a
step (forward, and backward: ``reshard_after_forward=True``), the root once under FSDP2's default
``reshard_after_forward=None`` (it stays unsharded into backward; ``shard_model`` keeps that
default -- it passed ``True`` before, which gathered the root twice); ``grad_reduce_scatter`` ``(S-1) * sum(gradient shard bytes)``
per group; ``grad_all_reduce`` (HSDP) ``2 (R-1)/R * sum(gradient shard bytes)``.

* ``fsdp2_adamw``: fp32 parameters under ``MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=bf16)``: parameters gathered and gradients reduced in bf16; AdamW is local.
* ours (bf16 model): FSDP2 gathers each INT8 weight's uint8 codes (1 B) + fp32 scales and zeros
  (2 * 4 B per 256 weights) and the bf16 dense tensors, and reduce-scatters only dense gradients
  (uint8 codes have none: the layer hands its full gradient to the optimizer's sink).  The
  package then sends, by meter kind (b = ``payload_dtype`` bytes, default fp32):
    - ``lowrank_reduce``: right-projected matrices (all with ``"sharded"``, ``m >= n`` with
      ``"std"``): reduce-scatter of the (m, r) rows in the shard group, ``(S-1)/S * m r b``, and on
      HSDP an all-reduce of this rank's m/S rows across replicas, ``2 (R-1)/R * m r b / S``;
      ``"std"``'s left-projected matrices (m < n: down_proj): (r, n) to the owner over the world,
      ``(W-1)/W * r n b``, and ``update_gather``: the owner's (r, n) direction back, the same;
    - ``control``: finite / has-gradient flags, an all-reduce over the world of
      ``1 + 2 (#GaLore + #dense tensors)`` fp32 values (no clipping: ``max_grad_norm=0``);
    - refresh step (every matrix refreshing; reported as the extra over a steady step): the fp32
      (m, n) gradient to its owner over the world, ``(W-1)/W * m n 4`` (``full_grad_reduce``), and
      ``proj_broadcast``: packed INT4 codes + fp32 scales/zeros per 256 + the fp64 schedule
      ``8 (3 + queue_size)``, of ``n r`` (right) or ``m r`` (left) elements; left matrices then
      skip their low-rank reduce.
  n/a: shapes ``check_shardable`` rejects (llama_1b at S > 1, llama_60m / llama_350m at S = 64).

Validation (counted): W gloo ranks (2: FSDP; 4: HSDP 2 x 2) train a small LlamaForCausalLM (hidden
64, intermediate 160, 2 layers, odd vocab 127: padded shards) two steps (0: every projector
refreshes, 1: steady) per case: FSDP2 + AdamW and ours (``"sharded"`` fp32 / bf16 payloads,
``"std"``).  Every ``torch.distributed`` collective (FSDP2 and the package look them up at call
time) is wrapped and counted as ring volumes, with its group size, phase (forward, backward,
``step()``) and source (``qgalore_dist`` code on the stack or not).  FSDP2's forward + backward
calls must equal its closed form per collective, the package's calls its meter
(``optimizer.comm.meter.last_step``, all groups) and both the closed form per kind, exactly (==:
ring factors 1/2, 3/4 are exact in binary); any other collective fails it; exit code 1 if not.

Run from the repository root:  python benchmarks/comm_fsdp.py   (about 1-2 min on 2 CPU cores;
``--torchao-site DIR`` adds a counted FSDP2 + torchao AdamW8bit run, about 1 more minute)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

_REPO = Path(__file__).resolve().parents[1]
for _p in (_REPO, _REPO / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from benchmarks._common import RESULTS_DIR, environment, environment_md, write_outputs  # noqa: E402
from benchmarks.comm import PAPER_RANK, meta_tensors, mib, model_tensors  # noqa: E402
from benchmarks.comm_baselines import TINY_LLAMA, Tensors, numel, ring  # noqa: E402
from qgalore_dist.distributed.comm import KINDS  # noqa: E402
from qgalore_dist.quant import packed_numel  # noqa: E402

MODELS = tuple(PAPER_RANK)
MESHES = ((1, 8), (1, 64), (2, 4), (8, 8))  # (replicas, shards): FSDP at 8 and 64 ranks, HSDP 2 x 4, 8 x 8
FSDP2_KINDS = ("param_all_gather", "grad_reduce_scatter", "grad_all_reduce")
OURS = {"ours_sharded": ("sharded", 4), "ours_sharded_bf16": ("sharded", 2), "ours_std": ("std", 4)}  # B/low-rank el.
# shard_model leaves reshard_after_forward at FSDP2's default (None): the root stays unsharded into backward
# and is gathered once, as the baseline's (the counted run checks it).
OURS_ROOT_REGATHER = False
DENSE_BYTES = 2          # bf16 dense parameters and gradients, ours and the baseline alike
GROUP_SIZE = 256         # prepare_model's INT8 group size
PROJ_BITS, PROJ_GROUP, QUEUE = 4, 256, 5   # QGaLoreConfig defaults
TINY = {**TINY_LLAMA, "vocab_size": 127}   # odd vocab: padded embedding / head shards
TINY_GALORE = dict(rank=8, group_size=64, proj_group=64)
FsdpParam = tuple[str, tuple[int, ...], int, int]  # name, shape, gathered B per element, gradient B (0: none)


# ----------------------------------------------------------------------------- closed forms
def shard_numel(shape: Sequence[int], shards: int) -> int:
    """Elements of one rank's FSDP2 shard: dim 0 padded to a multiple of ``shards``."""
    return -(-shape[0] // shards) * numel(shape[1:])


def fsdp_group(name: str) -> str:
    """The ``fully_shard`` group of a parameter: its decoder layer, or the root."""
    parts = name.split(".layers.")
    return "root" if len(parts) == 1 else "layer" + parts[1].split(".")[0]


def not_shardable(tensors: Tensors, shards: int, group_size: int = GROUP_SIZE) -> str | None:
    """Why ``qgalore_dist.integrations.fsdp.check_shardable`` rejects these shapes, or None."""
    for name, (m, n), _ in (t for t in tensors if t[2]):
        if m % shards or ((m // shards) * n) % group_size:
            return f"{name} ({m}x{n}) cannot be row-sharded over {shards} ranks without cutting a {group_size}-group"
    return None


def ours_fsdp_params(tensors: Tensors, group_size: int = GROUP_SIZE) -> list[FsdpParam]:
    """What FSDP2 holds under ``shard_model``: per INT8 weight its uint8 codes and fp32
    scales / zeros ((m n / group_size, 1) frozen Parameters), per dense tensor the bf16 tensor."""
    out: list[FsdpParam] = []
    for name, shape, galore in tensors:
        if galore:
            groups = numel(shape) // group_size
            out += [(name, shape, 1, 0), (name + "_scales", (groups, 1), 4, 0), (name + "_zeros", (groups, 1), 4, 0)]
        else:
            out.append((name, shape, DENSE_BYTES, DENSE_BYTES))
    return out


def fsdp2_traffic(params: Sequence[FsdpParam], replicas: int, shards: int, *, root_regather: bool) -> dict[str, float]:
    """FSDP2's own bytes per rank per step (module doc), by collective."""
    if replicas < 1 or shards < 2:
        raise ValueError(f"need replicas >= 1 and shards >= 2, got {replicas} x {shards}")
    gathered, reduced = {}, {}  # one rank's shard bytes per group: parameters, gradients
    for name, shape, b, grad_b in params:
        key = fsdp_group(name)
        gathered[key] = gathered.get(key, 0) + shard_numel(shape, shards) * b
        reduced[key] = reduced.get(key, 0) + shard_numel(shape, shards) * grad_b
    out = dict.fromkeys(FSDP2_KINDS, 0.0)
    for key, shard_bytes in gathered.items():
        gathers = 2 if key != "root" or root_regather else 1
        out["param_all_gather"] += gathers * ring(shards) * (shards * shard_bytes)
        if reduced[key]:
            out["grad_reduce_scatter"] += ring(shards) * (shards * reduced[key])
            if replicas > 1:
                out["grad_all_reduce"] += 2 * ring(replicas) * reduced[key]
    return out


def _projector_bytes(elements: int, proj_bits: int, proj_group: int) -> int:
    """One refresh's broadcast payload: packed codes, fp32 scales + zeros, fp64 schedule vector."""
    return packed_numel(elements, proj_bits) + 2 * 4 * (elements // proj_group) + 8 * (3 + QUEUE)


def package_traffic(tensors: Tensors, replicas: int, shards: int, *, rank: int, projection: str, payload: int,
                    refresh: bool = False, proj_bits: int = PROJ_BITS,
                    proj_group: int = PROJ_GROUP) -> dict[str, float]:
    """The package's bytes per rank per step, by meter kind (module doc); ``refresh``: a step on
    which every matrix refreshes."""
    if projection not in ("sharded", "std"):
        raise ValueError(f"projection must be 'sharded' or 'std', got {projection!r}")
    world = replicas * shards
    out = dict.fromkeys(KINDS, 0.0)
    galore = [shape for _, shape, g in tensors if g]
    for m, n in galore:
        right = projection == "sharded" or m >= n
        if right:
            out["lowrank_reduce"] += ring(shards) * (m * rank * payload)
            if replicas > 1:
                out["lowrank_reduce"] += 2 * ring(replicas) * (m // shards * rank * payload)
        else:
            if not refresh:  # a refreshing left matrix is projected by its owner after the full reduce
                out["lowrank_reduce"] += ring(world) * (rank * n * payload)
            out["update_gather"] += ring(world) * (rank * n * payload)
        if refresh:
            out["full_grad_reduce"] += ring(world) * (m * n * 4)
            out["proj_broadcast"] += ring(world) * _projector_bytes((n if right else m) * rank, proj_bits, proj_group)
    n_dense = sum(1 for *_, g in tensors if not g)
    out["control"] = 2 * ring(world) * (4 * (1 + 2 * (len(galore) + n_dense)))
    return out


def ours_step(tensors: Tensors, replicas: int, shards: int, *, rank: int, projection: str, payload: int,
              refresh: bool = False, group_size: int = GROUP_SIZE, **proj: int) -> dict[str, Any]:
    """FSDP2 + package bytes of one step of ours, by collective / kind, and their total."""
    fsdp = fsdp2_traffic(ours_fsdp_params(tensors, group_size), replicas, shards, root_regather=OURS_ROOT_REGATHER)
    package = package_traffic(tensors, replicas, shards, rank=rank, projection=projection, payload=payload,
                              refresh=refresh, **proj)
    return {"fsdp2": fsdp, "package": package, "total": sum(fsdp.values()) + sum(package.values())}


def baseline_step(tensors: Tensors, replicas: int, shards: int) -> dict[str, Any]:
    """FSDP2 + AdamW (bf16 mixed precision, FSDP2's default root rule); torchao AdamW8bit alike."""
    params = [(name, shape, DENSE_BYTES, DENSE_BYTES) for name, shape, _ in tensors]  # bf16 gathers and grads
    fsdp = fsdp2_traffic(params, replicas, shards, root_regather=False)
    return {"fsdp2": fsdp, "package": dict.fromkeys(KINDS, 0.0), "total": sum(fsdp.values())}


def _ours_cell(tensors: Tensors, replicas: int, shards: int, rank: int, projection: str, payload: int,
               baseline: float) -> dict[str, Any]:
    steady = ours_step(tensors, replicas, shards, rank=rank, projection=projection, payload=payload)
    refresh = ours_step(tensors, replicas, shards, rank=rank, projection=projection, payload=payload, refresh=True)
    root = [t for t in ours_fsdp_params(tensors) if fsdp_group(t[0]) == "root"]
    root_once = fsdp2_traffic(root, replicas, shards, root_regather=False)["param_all_gather"]
    int8 = [t for t in ours_fsdp_params(tensors) if t[2] != DENSE_BYTES]
    return {**steady, "refresh_extra": refresh["total"] - steady["total"],
            "root_regather": root_once if OURS_ROOT_REGATHER else 0.0,
            "int8_all_gather": fsdp2_traffic(int8, replicas, shards, root_regather=True)["param_all_gather"],
            "ratio_over_baseline": steady["total"] / baseline}


def model_rows(name: str, meshes: Sequence[tuple[int, int]] = MESHES) -> dict[str, Any]:
    """Every mesh of one model: the baseline and each variant of ours (None where not shardable)."""
    tensors, rank = meta_tensors(name), PAPER_RANK[name]
    params = sum(numel(s) for _, s, _ in tensors)
    out: dict[str, Any] = {"params": params, "rank": rank, "meshes": {}}
    for replicas, shards in meshes:
        base = baseline_step(tensors, replicas, shards)
        row: dict[str, Any] = {"replicas": replicas, "shards": shards, "fsdp2_adamw": base,
                               "not_shardable": not_shardable(tensors, shards)}
        for key, (projection, payload) in OURS.items():
            row[key] = None if row["not_shardable"] else _ours_cell(tensors, replicas, shards, rank, projection,
                                                                     payload, base["total"])
        out["meshes"][f"{replicas}x{shards}"] = row
    return out


# ----------------------------------------------------------------------------- counted run
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
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        tensors = model_tensors(LlamaForCausalLM(LlamaConfig(**TINY)))
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
    from dist_harness import run_distributed

    replicas, shards = (1, *mesh_shape)[-2:]
    start, world = time.perf_counter(), replicas * shards
    results = run_distributed(_count_rank, world, tuple(mesh_shape), tuple(cases), torchao_site, timeout_s=300)
    runs = {case: check_case(case, [r[case] for r in results], replicas, shards) for case in cases}
    return {"mesh": f"{replicas}x{shards}", "world": world, "runs": runs, "wall_s": time.perf_counter() - start,
            "exact": all(s["exact"] for steps in runs.values() for s in steps)}


# ----------------------------------------------------------------------------- report
def _md_header(p: dict[str, Any]) -> list[str]:
    return [
        "# Bytes per step per rank on FSDP2 / HSDP: Q-GaLore vs FSDP2 + AdamW", "",
        environment_md(p["environment"]),
        f"- load average (1 min) before / after: {p['loadavg_before']:.1f} / {p['loadavg_after']:.1f} "
        f"(2 cores shared with other jobs); wall time {p['wall_s']:.0f} s", "",
        "Sections 1-2: **closed form** (meta-device shapes of `configs/models/*.json`, paper GaLore ranks); section "
        "4 **counts** every `torch.distributed` call of real gloo runs against it. Ring volumes per rank (all-reduce "
        "2(N-1)/N * S, the others (N-1)/N * S, N the group's size); MiB = 2^20 B; formulas: the docstring of "
        "`benchmarks/comm_fsdp.py`; exact bytes: `comm_fsdp.json`. Mesh R x S: R replicas (HSDP), S shards.", "",
        "- **FSDP2 + AdamW**: fp32 parameters, bf16 `MixedPrecisionPolicy` (gathers and gradients in bf16), FSDP2's "
        "default root rule (root gathered once, layers twice). **FSDP2 + torchao AdamW8bit moves exactly the same "
        "bytes** (its state is sharded and never travels), hence no column of its own (section 5).",
        f"- **ours** (`fully_shard_qgalore`, bf16 model): FSDP2 gathers INT8 codes + fp32 scales/zeros (1 + "
        f"8/{GROUP_SIZE} B per weight) and bf16 dense tensors, reduce-scatters dense gradients; the package "
        "reduce-scatters the (m, r) low-rank rows (fp32 payload by default) and, on HSDP, all-reduces each rank's "
        "m/S rows across replicas. `std`: down_proj (m < n) goes left-projected through the owner exchange.", "",
    ]


def _md_table(p: dict[str, Any]) -> list[str]:
    lines = ["## 1. Steady-state step, MiB per rank per step", "",
             "Ratio = FSDP2 + AdamW bytes / ours (> 1: ours sends less). Refresh extra: a step on which every "
             "matrix refreshes (fp32 full gradient to its owner over the world + INT4 projector broadcast), added "
             "to the steady step, and that amortised over the initial gap T = 200. n/a: `shard_model` rejects the "
             "shapes (a row shard would cut a 256-element INT8 group).", "",
             "| model | r | mesh R x S | FSDP2 + AdamW (= torchao AdamW8bit) | ours sharded | ratio | ours sharded, "
             "bf16 payload | ratio | ours std | ratio | refresh extra (sharded) | amortised / 200 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in p["models"].items():
        for mesh, row in m["meshes"].items():
            cells = [x for c in (row[k] for k in OURS) for x in (("n/a", "n/a") if c is None else (
                mib(c["total"]), f"{1 / c['ratio_over_baseline']:.2f}x"))]
            sharded = row["ours_sharded"]
            extra = ["n/a", "n/a"] if sharded is None else [mib(sharded["refresh_extra"]),
                                                             mib(sharded["refresh_extra"] / 200)]
            lines.append(f"| {name} | {m['rank']} | {mesh} | {mib(row['fsdp2_adamw']['total'])} | "
                         + " | ".join(cells + extra) + " |")
    return lines + [""]


def _md_breakdown(p: dict[str, Any], meshes: Sequence[str]) -> list[str]:
    lines = ["## 2. Where the bytes go (ours sharded, fp32 payload), MiB per rank per step", "",
             "| model | mesh | AdamW: param all-gather | AdamW: grad RS + AR | ours: INT8 all-gather (codes + "
             "scales/zeros) | ours: dense all-gather | of which root re-gather | ours: dense grad RS + AR | "
             "ours: low-rank rows (RS + AR) | ours: control | share of ours in all-gathers |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in p["models"].items():
        for mesh in meshes:
            row = m["meshes"][mesh]
            base, ours = row["fsdp2_adamw"]["fsdp2"], row["ours_sharded"]
            if ours is None:
                continue
            f, k, gathers = ours["fsdp2"], ours["package"], ours["fsdp2"]["param_all_gather"]
            lines.append(
                f"| {name} | {mesh} | {mib(base['param_all_gather'])} | "
                f"{mib(base['grad_reduce_scatter'] + base['grad_all_reduce'])} | {mib(ours['int8_all_gather'])} | "
                f"{mib(gathers - ours['int8_all_gather'])} | {mib(ours['root_regather'])} | "
                f"{mib(f['grad_reduce_scatter'] + f['grad_all_reduce'])} | {mib(k['lowrank_reduce'])} | "
                f"{k['control']:,.0f} B | {100 * gathers / ours['total']:.0f}% |")
    return lines + [""]


def _md_summary(p: dict[str, Any]) -> list[str]:
    seven, hsdp = p["models"]["llama_7b"]["meshes"]["1x8"], p["models"]["llama_7b"]["meshes"]["8x8"]
    s, b = seven["ours_sharded"], seven["fsdp2_adamw"]
    gathers = s["fsdp2"]["param_all_gather"]
    small = ", ".join(f"{n.removeprefix('llama_')} {1 / m['meshes']['1x8']['ours_sharded']['ratio_over_baseline']:.2f}"
                      for n, m in p["models"].items() if n != "llama_7b" and m["meshes"]["1x8"]["ours_sharded"])
    return [
        "## 3. Reading it", "",
        f"- LLaMA-7B, r = 1024, 8 shard ranks: FSDP2 + AdamW {mib(b['total'])} MiB per rank per step, ours "
        f"{mib(s['total'])} MiB (**{1 / s['ratio_over_baseline']:.2f}x** fewer; bf16 payload "
        f"{1 / seven['ours_sharded_bf16']['ratio_over_baseline']:.2f}x). HSDP 8 x 8: "
        f"{mib(hsdp['fsdp2_adamw']['total'])} vs {mib(hsdp['ours_sharded']['total'])} MiB "
        f"({1 / hsdp['ours_sharded']['ratio_over_baseline']:.2f}x).",
        f"- The gain comes from the weights more than from GaLore: on FSDP2 the parameter all-gathers are "
        f"{100 * gathers / s['total']:.0f}% of our bytes, and INT8 codes + fp32 scales/zeros are 1 + 8/{GROUP_SIZE} B "
        f"per weight against bf16's 2 B; the low-rank rows ({mib(s['package']['lowrank_reduce'])} MiB) replace a bf16 "
        f"gradient reduce-scatter ({mib(b['fsdp2']['grad_reduce_scatter'])} MiB). Even free low-rank rows would give "
        f"only {b['total'] / sum(s['fsdp2'].values()):.2f}x; smaller models gain less ({small}x at 8 ranks: "
        "embeddings and head, bf16 on both sides, are a larger share).",
        "- `shard_model` keeps FSDP2's default `reshard_after_forward=None`: the root (embeddings, final norm, "
        "head) is all-gathered once per step, as in the baseline (it passed `True` explicitly before, which "
        "gathered the root twice: 2.6% more bytes at 7B / 8 ranks).",
        "- HSDP: only the (m/S, r) rows and the dense gradient shards cross replicas; the INT8 all-gathers stay "
        "inside the shard group. Refresh steps reduce every full fp32 gradient to its owner over the *whole* world "
        "(the largest term of a refresh step); amortised over T = 200 it is small against a steady step.", "",
    ]


def _md_validation(runs: list[dict[str, Any]]) -> list[str]:
    lines = ["## 4. Validation: counted bytes of a real gloo run vs the closed form", "",
             "Small LlamaForCausalLM (hidden 64, intermediate 160, 2 layers, vocab 127: padded shards; GaLore rank "
             "8, INT8 and projector groups of 64); step 0 refreshes every projector, step 1 is steady. FSDP2 = counted "
             "forward + backward `all_gather_single` / `reduce_scatter_single` / `all_reduce` (calls in brackets); "
             "package = counted calls from `qgalore_dist` code; meter = the package's `CommMeter`, all groups. "
             "Exact: all three equal the closed form (==) on every rank, no other collective ran. Rank 0's bytes.", "",
             "| mesh | case | step | all-gather B (calls) | reduce-scatter B | all-reduce B | package counted B "
             "| meter B | closed form: FSDP2 / package B | exact |", "|---|---|---|---|---|---|---|---|---|---|"]
    for v in runs:
        for case, steps in v["runs"].items():
            for s in steps:
                r, pred = s["ranks"][0], s["predicted"]
                f, c = r["fsdp2"], r["fsdp2_calls"]
                lines.append(
                    f"| {v['mesh']} | {case} | {s['step']} ({s['kind']}) | {f['param_all_gather']:,.0f} "
                    f"({c['param_all_gather']}) | {f['grad_reduce_scatter']:,.0f} ({c['grad_reduce_scatter']}) | "
                    f"{f['grad_all_reduce']:,.0f} ({c['grad_all_reduce']}) | {r['package']:,.0f} | "
                    f"{sum(r['meter'].values()):,.0f} | {sum(pred['fsdp2'].values()):,.0f} / "
                    f"{sum(pred['package'].values()):,.0f} | {s['exact']} |")
    ok = all(v["exact"] for v in runs)
    walls = ", ".join(f"{v['mesh']}: {v['wall_s']:.0f} s" for v in runs)
    return lines + ["", f"All exact: **{ok}** (launch wall times {walls}).", ""]


def _md_torchao(t: dict[str, Any]) -> list[str]:
    run = [] if not t.get("run") else [
        f"- counted FSDP2 + torchao AdamW8bit run (2 ranks): equal to the FSDP2 + AdamW closed form, no other "
        f"collective (none in `step()`) on both steps: **{all(s['exact'] for s in t['run'])}**; state "
        f"`{t['run'][-1]['ranks'][0]['state']}`."]
    return ["## 5. torchao AdamW8bit", "", f"- importable: {t['importable']} ({t['detail']}).", *run, ""]


def markdown(p: dict[str, Any]) -> str:
    return "\n".join(_md_header(p) + _md_table(p) + _md_breakdown(p, ("1x8", "8x8")) + _md_summary(p)
                     + (_md_validation(p["validation"]) if p["validation"] else ["## 4. Validation: skipped", ""])
                     + _md_torchao(p["torchao"]))


def torchao_status(site: str | None) -> dict[str, Any]:
    """Whether ``torchao.optim.AdamW8bit`` imports next to this torch (``site`` first on the path),
    in a subprocess: with torchao on this process's path, transformers would import it in every rank."""
    import subprocess

    code = (f"import sys; sys.path[:0] = {[site] if site else []!r}; import torchao, torchao.optim; "
            "torchao.optim.AdamW8bit; print('torchao', torchao.__version__, 'from', torchao.__path__[0])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = (proc.stdout if proc.returncode == 0 else proc.stderr).strip().splitlines() or ["no output"]
    return {"importable": proc.returncode == 0, "detail": lines[-1]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-validation", action="store_true", help="closed forms only (no gloo runs)")
    ap.add_argument("--skip-hsdp-validation", action="store_true", help="leave out the 4-rank HSDP 2 x 2 run")
    ap.add_argument("--torchao-site", help="a site-packages holding torchao: adds a counted FSDP2 + AdamW8bit run")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    start, load_before, validation = time.perf_counter(), os.getloadavg()[0], []
    torchao = torchao_status(args.torchao_site)
    if not args.skip_validation:
        validation.append(validate((2,), ("fsdp2_adamw", *OURS)))
        if not args.skip_hsdp_validation:
            validation.append(validate((2, 2), ("fsdp2_adamw", "ours_sharded", "ours_std")))
    if torchao["importable"] and args.torchao_site:
        run = validate((2,), ("fsdp2_torchao_adamw8bit",), args.torchao_site)
        torchao["run"] = run["runs"]["fsdp2_torchao_adamw8bit"]
    payload = {"environment": environment(), "description": __doc__, "loadavg_before": load_before,
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "meshes": [f"{r}x{s}" for r, s in MESHES], "models": {name: model_rows(name) for name in MODELS},
               "validation": validation, "torchao": torchao}
    payload["loadavg_after"], payload["wall_s"] = os.getloadavg()[0], time.perf_counter() - start
    json_path, md_path = write_outputs("comm_fsdp", payload, markdown(payload), args.out_dir)
    print(markdown(payload))
    print(f"\nwrote {json_path} and {md_path} ({payload['wall_s']:.0f} s)")
    exact = all(v["exact"] for v in validation) and all(s["exact"] for s in torchao.get("run", []))
    return 0 if exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
