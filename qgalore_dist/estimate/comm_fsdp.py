"""Bytes per step per rank on FSDP2 / HSDP, by closed form: Q-GaLore on FSDP2
(``qgalore_dist.integrations.fsdp``, ``projection="sharded"`` and ``"std"``) and FSDP2 + AdamW with
bf16 mixed precision, on meshes R x S (replicas x shards, W = R S).  FSDP2 + torchao ``AdamW8bit``
moves the same bytes as FSDP2 + AdamW (its 8-bit state is sharded like the parameters and never
travels).

FSDP2 (``dist.all_gather_single`` / ``dist.reduce_scatter_single``, one call per ``fully_shard``
group -- each decoder layer, and the root: embeddings, final norm, head -- and ``dist.all_reduce``
across replicas on HSDP) moves dim-0 padded shards, ``ceil(d0/S) * rest``: ``param_all_gather``
``(S-1) * sum(shard bytes)`` per gather of a group, decoder layers twice a step (forward, and
backward: ``reshard_after_forward=True``), the root once (FSDP2's default keeps it unsharded into
backward); ``grad_reduce_scatter`` ``(S-1) * sum(gradient shard bytes)`` per group;
``grad_all_reduce`` (HSDP) ``2 (R-1)/R * sum(gradient shard bytes)``.

* ``fsdp2_adamw``: fp32 parameters under ``MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=bf16)``: parameters gathered and gradients reduced in bf16.
* ours (bf16 model): FSDP2 gathers each INT8 weight's uint8 codes (1 B) + fp32 scales and zeros
  (2 * 4 B per 256 weights) and the bf16 dense tensors, and reduce-scatters only dense gradients.
  The package then sends, by meter kind (b = ``payload_dtype`` bytes, default fp32):
    - ``lowrank_reduce``: right-projected matrices (all with ``"sharded"``, ``m >= n`` with
      ``"std"``): reduce-scatter of the (m, r) rows in the shard group, ``(S-1)/S * m r b``, and on
      HSDP an all-reduce of this rank's rows across replicas, ``2 (R-1)/R * ceil(m/S) r b``;
      ``"std"``'s left-projected matrices: (r, n) to the owner over the world and
      ``update_gather`` the owner's direction back, ``(W-1)/W * r n b`` each;
    - ``control``: an all-reduce over the world of ``1 + 2 (#GaLore + #dense tensors)`` fp32 values;
    - refresh step (every matrix refreshing): the fp32 (m, n) gradient to its owner over the world,
      ``(W-1)/W * m n 4`` (``full_grad_reduce``), and ``proj_broadcast`` (packed INT4 codes + fp32
      scales/zeros per 256 + the fp64 schedule); left matrices then skip their low-rank reduce.

``tests/unit/test_bench_comm_fsdp.py`` counts every collective of real gloo runs against these.
"""

from __future__ import annotations

from typing import Any, Sequence

from qgalore_dist.distributed.rows import row_shard_problem
from qgalore_dist.quant import groups_per_row, weight_row_length

from .comm import KINDS, QUEUE, Tensors, numel, projector_payload, ring

__all__ = ["DENSE_BYTES", "FSDP2_KINDS", "GROUP_SIZE", "baseline_step", "fsdp2_traffic", "fsdp_group",
           "not_shardable", "ours_fsdp_params", "ours_step", "package_traffic", "shard_numel"]

FSDP2_KINDS = ("param_all_gather", "grad_reduce_scatter", "grad_all_reduce")
OURS_ROOT_REGATHER = False
"""``shard_model`` leaves ``reshard_after_forward`` at FSDP2's default: the root is gathered once."""
DENSE_BYTES = 2          # bf16 dense parameters and gradients, ours and the baseline alike
GROUP_SIZE = 256         # prepare_model's INT8 group size
PROJ_BITS, PROJ_GROUP = 4, 256   # QGaLoreConfig defaults
FsdpParam = tuple[str, tuple[int, ...], int, int]  # name, shape, gathered B per element, gradient B (0: none)


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
        problem = row_shard_problem(m, n, group_size, shards)
        if problem is not None:
            return f"{name} ({m}x{n}) cannot be row-sharded over {shards} ranks: {problem}"
    return None


def ours_fsdp_params(tensors: Tensors, group_size: int = GROUP_SIZE) -> list[FsdpParam]:
    """What FSDP2 holds under ``shard_model``: per INT8 weight its uint8 codes and fp32
    scales / zeros (frozen Parameters of ``integrations.fsdp.meta_shape``: ``(m, ceil(n / g))``
    for row-aligned groups, ``(m n / g, 1)`` for flat ones), per dense tensor the bf16 tensor."""
    out: list[FsdpParam] = []
    for name, shape, galore in tensors:
        if galore:
            m, n = shape
            flat = weight_row_length(m, n, group_size) is None
            meta = (m * n // group_size, 1) if flat else (m, groups_per_row(n, group_size))
            out += [(name, shape, 1, 0), (name + "_scales", meta, 4, 0), (name + "_zeros", meta, 4, 0)]
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


def package_traffic(tensors: Tensors, replicas: int, shards: int, *, rank: int, projection: str, payload: int,
                    refresh: bool = False, proj_bits: int = PROJ_BITS,
                    proj_group: int = PROJ_GROUP, streamed_refresh: bool = True) -> dict[str, float]:
    """The package's bytes per rank per step, by meter kind (module doc); ``refresh``: a step on
    which every matrix refreshes.  With ``streamed_refresh`` (``QGaLoreConfig.stream_refresh``) a
    refreshing right-projected matrix's rows come from its owner: one fp32 ``(m, r)`` broadcast
    over the world instead of the row reduce-scatter (and HSDP's replicate all-reduce)."""
    if projection not in ("sharded", "std"):
        raise ValueError(f"projection must be 'sharded' or 'std', got {projection!r}")
    world = replicas * shards
    out = dict.fromkeys(KINDS, 0.0)
    galore = [shape for _, shape, g in tensors if g]
    for m, n in galore:
        right = projection == "sharded" or m >= n
        if right and refresh and streamed_refresh:
            out["lowrank_reduce"] += ring(world) * (m * rank * 4)
        elif right:
            out["lowrank_reduce"] += ring(shards) * (m * rank * payload)
            if replicas > 1:
                # this rank's rows across replicas; FSDP2's first ranks hold ceil(m / S) (the most)
                out["lowrank_reduce"] += 2 * ring(replicas) * (-(-m // shards) * rank * payload)
        else:
            if not refresh:  # a refreshing left matrix is projected by its owner after the full reduce
                out["lowrank_reduce"] += ring(world) * (rank * n * payload)
            out["update_gather"] += ring(world) * (rank * n * payload)
        if refresh:
            out["full_grad_reduce"] += ring(world) * (m * n * 4)
            out["proj_broadcast"] += ring(world) * projector_payload((n if right else m) * rank, proj_bits,
                                                                     proj_group, QUEUE)
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
