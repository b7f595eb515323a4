"""DeepSpeed ZeRO-3 with partitioned INT8 weights: rank ``k`` of the data-parallel group stores
rows ``[k m / N, (k + 1) m / N)`` of every INT8 GaLore weight (codes, and the fp32 scales /
zero points of exactly those rows' groups), ``1/N`` of the replicated bytes.

Why not ZeRO-3's own partitioning: DeepSpeed's ``Init`` / ``DeepSpeedZeRoOffload`` does accept
frozen ``uint8`` parameters (partitions are flat, per dtype, all-gathered by its module hooks),
but it cuts the *flattened* tensor into padded equal pieces (not rows), leaves buffers (our
scales / zeros) alone, swaps ``param.data`` to an empty tensor between uses (the optimizer reads
every weight's global shape from the tensor it was given) and would quantize uint8 codes again
under ZeRO++ ``zero_quantized_nontrainable_weights``.  The package therefore keeps the INT8
weights hidden from ZeRO (buffers, as with replicated weights) and partitions them itself:

* Storage: ``weight`` / ``weight_scales`` / ``weight_zeros`` become ``Shard(0)`` DTensors over a
  1-D mesh of the data-parallel group, built from this rank's rows.  A DTensor reports the
  global shape (what the optimizer plans with) and holds only the local rows -- exactly what
  :class:`~qgalore_dist.integrations.fsdp.RowShardedLayout` already updates: local rows with
  stochastic rounding keyed by global element index (codes equal the replicated path's),
  right-projected low-rank gradients reduce-scattered by row ranges, left-projected ones through
  the owner exchange with every rank applying ``P[rows] @ U`` (``proj_type="std"``: the
  single-process trajectory).  :class:`ZeroRowLayout` reuses it by composition; the only
  difference is that DeepSpeed, not the layout, owns the dense gradients (``dense_local`` off).
* Gathering: the layer's autograd function (``Int8Linear.gather_weight``) all-gathers codes,
  scales and zeros just before its forward and again in its backward (which needs the weight for
  the input gradient), and drops them when each returns: one gathered layer at a time, no
  prefetch.  The gathers are metered (kind ``int8_all_gather``).
* ``zero_optimization.stage3_param_persistence_threshold``, when the ds_config sets it, keeps
  INT8 matrices with at most that many elements replicated (ZeRO-3's rule for its own small
  parameters); DeepSpeed's implicit default (1e5, meant for norms and biases) is not applied to
  INT8 matrices.  ``stage3_model_persistence_threshold`` is not consulted.
* Not done: prefetching the next layer's rows, uneven row splits (a matrix whose rows cannot be
  split evenly at quantization-group boundaries is refused with a ``ValueError``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..core import Int8Linear, WeightStep, int8_layer_of, update_int8_codes_
from ..distributed import Collectives
from ..optim import QGaLoreAdamW8bit
from ..quant import BlockwiseCodec, groups_per_row
from .fsdp import RowShardedLayout

__all__ = [
    "ZeroQGaLoreAdamW8bit", "ZeroRowLayout", "check_int8_shards", "int8_local_bytes", "partition_int8_layers",
    "partitionable", "row_mesh",
]

_TENSORS = ("weight", "weight_scales", "weight_zeros")


def _dtensor():
    from torch.distributed.tensor import DTensor, Shard

    return DTensor, Shard


def _is_dtensor(t: torch.Tensor) -> bool:
    return isinstance(t, _dtensor()[0])


def row_mesh(comm: Collectives):
    """A 1-D CPU/GPU device mesh over ``comm``'s group (the world when it has none)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    group = comm.group if comm.group is not None else dist.group.WORLD
    device = "cuda" if torch.cuda.is_available() and dist.get_backend(group) == "nccl" else "cpu"
    return DeviceMesh.from_group(group, device)


class ZeroRowLayout:
    """:class:`~qgalore_dist.optim.layout.WeightLayout` of ZeRO-3-partitioned INT8 weights:
    :class:`RowShardedLayout`'s rows, row reduce-scatter and row update for every INT8 matrix.
    A matrix kept whole on every rank (persistence threshold) is updated the same way, by rows,
    and its updated rows are then all-gathered into every rank's whole copy -- what ZeRO-3 does
    for its own persistent parameters (partitioned fp32 master, gathered persistent copy), and
    what keeps the clipping norm's per-row-range sum right.  Dense parameters belong to
    DeepSpeed (``dense_local`` False: the optimizer has none)."""

    weights_sharded = True
    dense_local = False
    replicas = 1

    def __init__(self, mesh, comm: Collectives) -> None:
        self.rows_layout = RowShardedLayout(mesh, comm)
        self.comm = comm
        self.replicated: set[int] = set()
        """``id`` of the INT8 weights kept whole on every rank (below the persistence threshold)."""

    def is_partitioned(self, p: torch.Tensor) -> bool:
        return id(p) not in self.replicated

    def rows(self, p: torch.Tensor) -> tuple[int, int]:
        return self.rows_layout.rows(p)

    def local(self, t: torch.Tensor) -> torch.Tensor:
        return self.rows_layout.local(t)

    def row_reduced(self, side: str) -> bool:
        return self.rows_layout.row_reduced(side)

    def apply_int8(self, layer: Int8Linear, delta: torch.Tensor, how: WeightStep, *, stochastic_key) -> None:
        if self.is_partitioned(layer.weight):
            self.rows_layout.apply_int8(layer, delta, how, stochastic_key=stochastic_key)
            return
        r0, r1 = self.rows(layer.weight)
        g0, g1 = _group_range(layer, r0, r1)
        views = (layer.weight.data[r0:r1], layer.weight_scales[g0:g1], layer.weight_zeros[g0:g1])
        update_int8_codes_(*views, delta, how, group_size=layer.group_size, stochastic_key=stochastic_key,
                           offset=r0 * layer.in_features, row_length=layer.row_length)
        for whole, rows in zip((layer.weight.data, layer.weight_scales, layer.weight_zeros), views):
            self.comm.all_gather_into(whole.view(-1), rows.clone(), "int8_all_gather")

    def reduce_rows(self, items: list, *, dtype: torch.dtype, bucket_bytes: int) -> dict:
        return self.rows_layout.reduce_rows(items, dtype=dtype, bucket_bytes=bucket_bytes)

    def backward_row_groups(self):
        # overlap_comm: the rows' reduce-scatter runs inside engine.backward, as the owner reduce of
        # the replicated layout does under ZeRO 0-3: our sinks launch in the same order on every
        # rank, between DeepSpeed's own collectives on the same group.
        return self.rows_layout.backward_row_groups()

    def row_ranges(self, p: torch.Tensor) -> list[tuple[int, int]]:
        return self.rows_layout.row_ranges(p)

    def moment_codec(self, numel_global: int, codec: BlockwiseCodec) -> BlockwiseCodec:
        return self.rows_layout.moment_codec(numel_global, codec)

    def collectives(self) -> list[Collectives]:
        return self.rows_layout.collectives()


def _gatherer(comm: Collectives):
    """``layer -> (codes, scales, zeros)`` whole, all-gathered from every rank's rows (even
    split, checked by :func:`partition_int8_layers`)."""

    def gather(layer: Int8Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = []
        for name in _TENSORS:
            t = getattr(layer, name)
            local = t.to_local()
            full = torch.empty(t.shape, dtype=local.dtype, device=local.device)
            comm.all_gather_into(full.view(-1), local, "int8_all_gather")
            out.append(full)
        return tuple(out)

    return gather


def _group_range(layer: Int8Linear, r0: int, r1: int) -> tuple[int, int]:
    """The quantization groups ``[g0, g1)`` of rows ``[r0, r1)`` (row-aligned or flat layout)."""
    if layer.row_length is None:
        return r0 * layer.in_features // layer.group_size, r1 * layer.in_features // layer.group_size
    per_row = groups_per_row(layer.in_features, layer.group_size)
    return r0 * per_row, r1 * per_row


def partitionable(layer: Int8Linear, world: int) -> str | None:
    """Why ``layer``'s rows cannot be split evenly over ``world`` ranks at group boundaries, or None."""
    m, n, gs = layer.out_features, layer.in_features, layer.group_size
    if layer.row_length is not None and m % world:  # row-aligned groups: any row boundary is a group's
        return f"a {m}x{n} weight's rows cannot be split evenly over {world} ranks (need m % N == 0)"
    if layer.row_length is None and (m % world or ((m // world) * n) % gs):
        return (f"a {m}x{n} weight with group_size={gs} cannot be split into {world} row blocks at quantization "
                f"group boundaries (need m % N == 0 and (m/N)*n % group_size == 0)")
    return None


def partition_int8_layers(model: nn.Module, layout: ZeroRowLayout, *, threshold: int = 0) -> dict[str, str]:
    """In place: every :class:`Int8Linear` with more than ``threshold`` weight elements keeps only
    this rank's rows (``Shard(0)`` DTensor buffers) and gathers around its forward and backward;
    the others (0: none) stay replicated (plain buffers, recorded in ``layout.replicated``).  The
    INT8 tensors become buffers in both cases (ZeRO-3 must not partition them again).

    Returns ``{layer name: "partitioned" | "replicated (...)"}``.  Raises ``ValueError`` naming
    the first layer whose rows cannot be split at group boundaries."""
    DTensor, Shard = _dtensor()
    mesh, comm = layout.rows_layout.mesh, layout.comm
    gather = _gatherer(comm)
    layers = [(name, layer) for name, layer in model.named_modules() if isinstance(layer, Int8Linear)]
    for name, layer in layers:  # every layer, before any is changed (even the replicated ones
        why = partitionable(layer, comm.world_size)  # are updated by rows)
        if why is not None:
            raise ValueError(f"{name}: {why}; set \"int8_partition\": false in the QGaLoreAdamW8bit entry "
                             f"to keep INT8 weights replicated")
    decisions = {}
    for name, layer in layers:
        numel = layer.out_features * layer.in_features
        tensors = {t: getattr(layer, t).data for t in _TENSORS}
        for t in _TENSORS:  # buffers: invisible to ZeRO-3, same state_dict keys
            layer._parameters.pop(t, None)
            layer._buffers.pop(t, None)
        if numel <= threshold:
            for t, value in tensors.items():
                layer.register_buffer(t, value, persistent=True)
            layout.replicated.add(id(layer.weight))
            decisions[name] = f"replicated (numel {numel} <= stage3_param_persistence_threshold {threshold})"
        else:
            m = layer.out_features
            r0, r1 = layout.rows_layout.rows(tensors["weight"])
            g0, g1 = _group_range(layer, r0, r1)
            for t, value in tensors.items():
                rows = value[r0:r1] if t == "weight" else value[g0:g1]
                full_shape = (m, layer.in_features) if t == "weight" else tuple(value.shape)
                shard = DTensor.from_local(rows.clone(), mesh, [Shard(0)], run_check=False, shape=full_shape,
                                           stride=torch.empty(full_shape, device="meta").stride())
                layer.register_buffer(t, shard, persistent=True)
            layer.gather_weight = gather
            decisions[name] = "partitioned"
        layer._register()  # the optimizer finds the layer from its new weight tensor
    return decisions


def int8_local_bytes(model: nn.Module) -> tuple[int, int]:
    """``(bytes this rank stores, bytes of the whole tensors)`` of every INT8 layer's codes,
    scales and zeros."""
    local = whole = 0
    for layer in model.modules():
        if isinstance(layer, Int8Linear):
            for name in _TENSORS:
                t = getattr(layer, name)
                held = t.to_local() if _is_dtensor(t) else t
                local += held.numel() * held.element_size()
                whole += t.numel() * t.element_size()
    return local, whole


def check_int8_shards(galore, layout: ZeroRowLayout) -> int:
    """Collective.  Every INT8 weight's row ranges are contiguous and cover the matrix; a
    partitioned one holds the codes of its rows and the scales / zeros of exactly their groups,
    a replicated one the whole tensors.  Raises ``ValueError`` naming the first bad layer;
    returns the number of layers checked."""
    mine = []
    for p in galore.galore_params:
        layer = int8_layer_of(p)
        r0, r1 = layout.rows(p)
        held = [tuple(layout.local(getattr(layer, t)).shape) for t in _TENSORS]
        rows = (r0, r1) if layout.is_partitioned(p) else (0, p.shape[0])
        mine.append((galore.name_of(p), r0, r1, held, rows))
    gathered = layout.comm.all_gather_object(mine)
    for i, (name, *_rest) in enumerate(mine):
        p = galore.galore_params[i]
        ranks = [g[i] for g in gathered]
        if ranks[0][1] != 0 or ranks[-1][2] != p.shape[0] or any(a[2] != b[1] for a, b in zip(ranks, ranks[1:])):
            raise ValueError(f"{name}: INT8 row ranges are not contiguous: {[r[1:3] for r in ranks]}")
        for _, r0, r1, (codes, scales, zeros), (h0, h1) in ranks:
            g0, g1 = _group_range(int8_layer_of(p), h0, h1)
            groups = g1 - g0
            if codes != (h1 - h0, p.shape[1]) or scales != (groups, 1) or zeros != (groups, 1):
                raise ValueError(f"{name}: rows {r0}:{r1} hold codes {codes}, scales {scales}, zeros {zeros}")
    return len(mine)


class ZeroQGaLoreAdamW8bit(QGaLoreAdamW8bit):
    """:class:`QGaLoreAdamW8bit` given a :class:`ZeroRowLayout`: the same optimizer, whose
    :meth:`check_replicas` also checks the INT8 shards (:func:`check_int8_shards`) and compares
    the INT8 weights kept replicated."""

    def replicated_tensors(self):
        yield from super().replicated_tensors()
        for p in self.galore_params:
            if not self.layout.is_partitioned(p):
                layer = int8_layer_of(p)
                for suffix, t in (("codes", layer.weight), ("scales", layer.weight_scales),
                                  ("zeros", layer.weight_zeros)):
                    yield f"{self.name_of(p)}.{suffix}", t

    def check_replicas(self) -> int:
        """Projectors (and replicated INT8 weights) bit-identical on every rank, and consistent
        INT8 shards; returns the number of tensors and sharded layers checked."""
        return super().check_replicas() + check_int8_shards(self, self.layout)
