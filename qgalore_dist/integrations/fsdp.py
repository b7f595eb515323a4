"""Q-GaLore on PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``): FSDP on a 1-D mesh,
HSDP on a 2-D (replicate x shard) mesh.

Entry points::

    model = prepare_model(hf_llama, group_size=256)            # INT8 GaLore layers
    mesh = init_device_mesh("cuda", (world_size,))              # or "cpu" (gloo); HSDP: (replicas, shards)
    shard_model(model, mesh)                                    # fully_shard per decoder layer + root
    opt = build_optimizer(model, QGaLoreConfig(...), mesh)      # FSDPQGaLoreAdamW8bit
    # or both at once: model, opt = fully_shard_qgalore(model, config, mesh)

What is sharded, and by whom
----------------------------
* Dense parameters (embeddings, norms, head, biases): FSDP2 shards them ``Shard(0)``,
  all-gathers them in forward/backward and reduce-scatters (averages) their gradients; the
  optimizer runs the package's AdamW (same formula, 8-bit moments) on the local DTensor shards.
  No package collective touches them.
* INT8 GaLore weights: the ``uint8`` weight is an FSDP2 ``Shard(0)`` DTensor, and so are its
  ``weight_scales`` / ``weight_zeros`` (turned from buffers into frozen ``Parameter`` s by
  :func:`shard_model`, so that FSDP2 shards and all-gathers them with the codes).  Rows split as
  FSDP2 splits dim 0 (``torch.chunk``: ``ceil(m/N)`` rows per rank, the last ranks fewer or
  none); :meth:`RowShardedLayout.rows` reads each rank's range off the DTensor.  The group layout
  is the replicated path's (:class:`~qgalore_dist.core.Int8Linear`): row-aligned whenever
  ``group_size <= n`` -- the reference's flattened groups when ``group_size`` divides ``n``
  (every LLaMA shape but odd widths: codes identical to the reference), else each row cut into
  ``ceil(n/g)`` groups, the last shorter (e.g. ``n = 5461``).  Row-aligned scales / zeros are
  sharded as ``(m, ceil(n/g))`` (:func:`meta_shape`): dim 0 is the codes' rows, so FSDP2's
  chunks of both line up at any split and no group ever crosses a shard.  Only flat groups
  spanning rows (``group_size > n``) remain, sharded as ``(G, 1)`` where the row and group
  chunks coincide; :func:`check_shardable` refuses the rest (naming the nearest valid
  ``group_size``).  Tests measure the difference to one process: bit-identical codes within
  one subspace up to reduction-order flips, even and uneven splits alike.
* FSDP2 never reduces INT8 gradients (a ``uint8`` parameter has none): the layer's backward
  computes this rank's full ``(m, n)`` gradient from the all-gathered weight and hands it to the
  optimizer's sink, which projects it at once (DESIGN I3).

Projection side and steady-state traffic (``projection=``)
----------------------------------------------------------
* ``"sharded"`` (default): every matrix uses the **right** projection ``R = G Q`` (m x r).
  Rows of ``R`` are rows of ``G``, so rank ``k`` needs only its rows: one reduce-scatter of
  the m x r low-rank gradients by FSDP row ranges (``(N-1)/N * m r * 4`` bytes per rank), then
  8-bit Adam on the local rows (the moments are sharded like the weight: m/N x r per rank),
  ``delta = U_local Q`` and requantization of the local rows -- no update gather, no owner.
  Trade-off against the reference's ``std`` rule (left projection ``Pᵀ G``, r x n, when m < n,
  i.e. ``down_proj``): for those matrices the low-rank gradient and the Adam state are *smaller*
  (m r instead of r n) but the stored INT4 projector is larger (r n / 2 instead of m r / 2
  bytes, replicated) and the optimizer follows a different trajectory than the reference
  (Adam normalizes in the other basis), so it is compared with a single process that uses
  ``proj_type="right"``.
* ``"std"``: the reference's rule.  Right-projected matrices take the sharded path above;
  left-projected ones (r x n) use the package's owner exchange (reduce-scatter of ``R`` to its
  owner, owner Adam, broadcast of the r x n update) and every rank applies ``P[rows] @ U`` to
  its rows.  Equivalent to the single-process reference with ``proj_type="std"``.

Refresh: the full gradient is reduced to the matrix's owner **only on refresh steps** (exact
SVD on the owner, or the configured randomized SVD, then one INT4 projector broadcast) -- the
package's ``_refresh``; a randomized SVD across shards would avoid the m x n reduction but
changes numerics against the single-process reference (kept for later).  The sharded rows of
``R`` are then formed from each rank's own gradient with the new projector and reduce-scattered
like a steady step (an extra ``(N-1)/N * m r * 4`` bytes on refresh steps).

``overlap_comm``: the same reduces start during backward instead of in ``step()``, as each INT8
layer's sink projects its gradient: right-projected rows are reduce-scattered by row ranges
(inside the shard group), left-projected ones to their owners, in bucket-sized collectives in
plan order with at most one bucket in flight (:mod:`qgalore_dist.distributed.overlap`); each
sink's full-size ``(m, r)`` gradient is freed once its bucket leaves, so after backward a rank
holds only its rows and the owner-held results it owns.  HSDP's mean across the replicate group
still runs at ``step()``, one all-reduce per bucket of the kept rows (same bytes and rounding as
without overlap).  ``optimizer.no_sync()`` on all but the last micro-batch accumulates locally.

HSDP (2-D mesh ``(replicate, shard)``): FSDP2 shards over the shard dim and all-reduces dense
gradients across replicas itself.  INT8 rows are split over the shard dim; the (m, r) rows are
reduce-scattered inside the shard group and then all-reduced across the replicate group
(``2 (R-1)/R * m r * 4 / S`` bytes per rank and matrix): in steady state only low-rank tensors
cross the replicate group.  Refresh steps still reduce the full gradient to the owner over the
whole world (DESIGN's "refresh extra"), and ``projection="std"``'s left-projected matrices use
the owner exchange over the world (low-rank r x n payloads).

Stochastic rounding uses the reference's counter-based stream keyed by (seed, step, parameter
name) at the global element index, so each shard draws exactly the bits a single process would.

Checkpoints: :func:`save_checkpoint` / :func:`load_checkpoint` (``torch.distributed.checkpoint``,
resumable at another world size; :mod:`qgalore_dist.fsdp_checkpoint` documents the layout).
The optimizer's own ``state_dict()`` still holds local tensors and is not resharding-aware.

Not in this first cut (issue 7): INT8 payload compression with error feedback
across the replicate group, a refresh that keeps the full gradient inside the replica (e.g. a
randomized SVD across shards).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from ..core import Int8Linear, WeightStep, int8_layer_of, update_int8_codes_
from ..distributed import Collectives, chunk_rows, reduce_rows_to_shards, row_shard_problem
from ..optim import QGaLoreAdamW8bit, QGaLoreConfig
from ..quant import BlockwiseCodec, groups_per_row

__all__ = [
    "FSDPQGaLoreAdamW8bit", "PROJECTIONS", "RowShardedLayout", "build_optimizer", "check_shardable",
    "default_mesh", "fully_shard_qgalore", "shard_model",
]

PROJECTIONS = ("sharded", "std")
_META = ("weight_scales", "weight_zeros")


def _dtensor_cls():
    from torch.distributed.tensor import DTensor

    return DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, _dtensor_cls()) else t


# ---------------------------------------------------------------------------------- model side
class _ShardableInt8Linear(Int8Linear):
    """An :class:`Int8Linear` whose scales/zeros are frozen Parameters (so FSDP2 shards them
    like the codes) instead of buffers; everything else is inherited."""

    def _apply(self, fn, recurse: bool = True):  # keep the metadata fp32 (as Int8Linear does)
        meta = {name: self._parameters[name] for name in _META if name in self._parameters}
        nn.Module._apply(self, fn, recurse)
        for name, before in meta.items():
            after = self._parameters[name]
            if after is not None and after.dtype != torch.float32:
                self._parameters[name] = nn.Parameter(before.data.to(device=after.device, dtype=torch.float32),
                                                      requires_grad=False)
        return self


def meta_shape(layer: Int8Linear) -> tuple[int, int]:
    """Shape of ``layer``'s scales / zeros as FSDP2 shards them: ``(m, groups_per_row)`` for a
    row-aligned group layout -- dim 0 is then the codes' rows, so ``Shard(0)``'s chunks of
    both line up at any split, even or not -- else ``(groups, 1)`` (flat groups spanning rows,
    row-sharded only where a shard is a whole number of groups, :func:`check_shardable`)."""
    m, n = layer.out_features, layer.in_features
    if layer.row_length is None:
        return m * n // layer.group_size, 1
    return m, groups_per_row(n, layer.group_size)


def _make_shardable(layer: Int8Linear) -> None:
    if isinstance(layer, _ShardableInt8Linear):
        return
    for name in _META:
        t = layer._buffers.pop(name).reshape(meta_shape(layer))  # same elements, group order kept
        layer.register_parameter(name, nn.Parameter(t, requires_grad=False))
    layer.__class__ = _ShardableInt8Linear


def check_shardable(model: nn.Module, world_size: int) -> None:
    """Raise ``ValueError`` naming the first INT8 layer (name, shape, group size) that cannot be
    row-sharded over ``world_size`` ranks, and the nearest setting that can
    (:func:`~qgalore_dist.distributed.rows.row_shard_problem`; module doc)."""
    for name, mod in model.named_modules():
        if not isinstance(mod, Int8Linear):
            continue
        m, n, gs = mod.out_features, mod.in_features, mod.group_size
        problem = row_shard_problem(m, n, gs, world_size)
        if problem is not None:
            raise ValueError(f"{name}: a {m}x{n} INT8 weight with group_size={gs} cannot be row-sharded over "
                             f"{world_size} ranks: {problem}")


def default_mesh(model: nn.Module):
    """A 1-D mesh over the whole world on the device type of ``model``'s tensors (``cuda`` on a
    GPU node, ``cpu`` for gloo), as ``init_device_mesh`` needs it."""
    from torch.distributed.device_mesh import init_device_mesh

    tensor = next(iter(model.parameters()), None)
    device_type = tensor.device.type if tensor is not None else "cpu"
    if device_type == "meta":
        raise ValueError("default_mesh: the model is on the meta device; pass mesh= explicitly")
    return init_device_mesh(device_type, (torch.distributed.get_world_size(),))


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    for path in ("model.layers", "layers", "transformer.h", "model.decoder.layers"):
        try:
            mods = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mods, nn.ModuleList):
            return list(mods)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}; pass layers=")


def shard_model(model: nn.Module, mesh=None, *, layers: Iterable[nn.Module] | None = None,
                reshard_after_forward: bool | None = None) -> nn.Module:
    """``fully_shard`` every decoder layer, then the root (torchtitan's recipe), on the 1-D
    ``mesh`` (default: the world).  INT8 layers' scales/zeros become frozen Parameters first,
    so they are row-sharded with the codes.  ``reshard_after_forward`` is ``fully_shard``'s:
    None (FSDP2's default) reshards the decoder layers after forward but keeps the root
    (embeddings, final norm, head) gathered into backward -- passing True for the root would
    all-gather it twice per step.  Returns ``model`` (sharded in place)."""
    from torch.distributed.fsdp import fully_shard

    mesh = mesh if mesh is not None else default_mesh(model)
    if mesh.ndim not in (1, 2):
        raise ValueError(f"mesh must be 1-D (FSDP) or 2-D (HSDP: replicate x shard), got {mesh.ndim}-D")
    check_shardable(model, mesh.size(mesh.ndim - 1))
    for mod in list(model.modules()):
        if isinstance(mod, Int8Linear):
            _make_shardable(mod)
    for layer in (list(layers) if layers is not None else _decoder_layers(model)):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


# ---------------------------------------------------------------------------------- layout
class RowShardedLayout:
    """FSDP2's row-sharded weights as a :class:`~qgalore_dist.optim.layout.WeightLayout`: rank
    ``k`` of the mesh's shard dim holds the rows its ``Shard(0)`` DTensor holds (``torch.chunk``:
    ``ceil(m/S)`` rows per rank, the last fewer or none) of every INT8 weight (codes, and the
    scales / zeros of exactly those rows' groups); right-projected low-rank gradients are
    reduce-scattered by those ranges (HSDP: then all-reduced across the
    replicate dim) and every rank updates its own rows; dense parameters arrive as local shards
    with gradients averaged by ``fully_shard``."""

    weights_sharded = True
    dense_local = True

    def __init__(self, mesh, world_comm: Collectives | None = None) -> None:
        if mesh.ndim not in (1, 2):
            raise ValueError(f"mesh must be 1-D (FSDP) or 2-D (HSDP: replicate x shard), got {mesh.ndim}-D")
        self.mesh = mesh
        # On a 1-D mesh the shard group is the world: one Collectives (one meter) for both.
        one_group = mesh.ndim == 1 and world_comm is not None
        self.shard_comm = world_comm if one_group else Collectives(mesh.get_group(mesh.ndim - 1))
        """Collectives over the shard dim (the ranks among which each weight's rows are split)."""
        self.replicate_comm = Collectives(mesh.get_group(0)) if mesh.ndim == 2 else None
        """Collectives over HSDP's replicate dim (None on a 1-D mesh)."""
        self.replicas = 1 if self.replicate_comm is None else self.replicate_comm.world_size
        self._codecs: dict[tuple[int, bool], BlockwiseCodec] = {}

    def rows(self, p: torch.Tensor) -> tuple[int, int]:
        """This rank's rows of ``p`` as its DTensor holds them (FSDP2's ``Shard(0)``: ceil(m / S)
        rows per rank, the last ranks fewer); a plain tensor gets the same split."""
        if isinstance(p, _dtensor_cls()):
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            return offset[0], offset[0] + shape[0]
        return chunk_rows(p.shape[0], self.shard_comm.world_size)[self.shard_comm.rank]

    def row_ranges(self, p: torch.Tensor) -> list[tuple[int, int]]:
        """Every shard rank's rows of ``p`` (rank ``j`` of the shard dim at index ``j``), by
        DTensor's ``Shard(0)`` rule; this rank's entry is :meth:`rows`."""
        world = self.shard_comm.world_size
        if isinstance(p, _dtensor_cls()):
            from torch.distributed.tensor import Shard

            sizes = [Shard(0).local_shard_size_and_offset(p.shape[0], world, j) for j in range(world)]
            ranges = [(offset, offset + size) for size, offset in sizes]
        else:
            ranges = chunk_rows(p.shape[0], world)
        assert ranges[self.shard_comm.rank] == self.rows(p), (ranges, self.rows(p))
        return ranges

    def local(self, t: torch.Tensor) -> torch.Tensor:
        return _local(t)

    def row_reduced(self, side: str) -> bool:
        return side == "right"  # rows of R = G Q are rows of G: each rank needs only its own

    def apply_int8(self, layer: Int8Linear, delta: torch.Tensor, how: WeightStep, *, stochastic_key) -> None:
        r0, _ = self.rows(layer.weight)
        update_int8_codes_(_local(layer.weight).data, _local(layer.weight_scales), _local(layer.weight_zeros), delta,
                           how, group_size=layer.group_size, stochastic_key=stochastic_key,
                           offset=r0 * layer.in_features, row_length=layer.row_length)

    def reduce_rows(self, items: list, *, dtype: torch.dtype, bucket_bytes: int) -> dict:
        return reduce_rows_to_shards(self.shard_comm, [(p, self.row_ranges(p), grad) for p, grad in items],
                                     "lowrank_reduce", replicate_comm=self.replicate_comm, dtype=dtype,
                                     bucket_bytes=bucket_bytes)

    def backward_row_groups(self) -> tuple[Collectives, Collectives | None]:
        # overlap_comm: the rows' reduce-scatter runs during backward, inside the shard group;
        # the replicate mean waits for step() (distributed/overlap.py says why).
        return self.shard_comm, self.replicate_comm

    def moment_codec(self, numel_global: int, codec: BlockwiseCodec) -> BlockwiseCodec:
        # The 8-bit/fp32 choice follows the *global* size; a shard's blocks are then its own.
        eight = codec.uses_8bit(numel_global)
        key = (codec.bits, eight)
        if key not in self._codecs:
            self._codecs[key] = BlockwiseCodec(bits=codec.bits, min_8bit_size=0) if eight else BlockwiseCodec(bits=32)
        return self._codecs[key]

    def collectives(self) -> list[Collectives]:
        return [c for c in (self.shard_comm, self.replicate_comm) if c is not None]


# ---------------------------------------------------------------------------------- optimizer
class FSDPQGaLoreAdamW8bit(QGaLoreAdamW8bit):
    """:class:`QGaLoreAdamW8bit` given a :class:`RowShardedLayout` of ``mesh`` (module doc): the
    same optimizer, constructed for FSDP2 and with :meth:`check_shards`.  Build it with
    :func:`build_optimizer`."""

    def __init__(self, params, config: QGaLoreConfig | None = None, *, mesh,
                 names: dict[torch.Tensor, str] | None = None, projection: str = "sharded", **overrides) -> None:
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        if projection == "sharded":
            overrides["proj_type"] = "right"
        self.projection = projection
        self.mesh = mesh
        world = Collectives(mesh.get_group() if mesh.ndim == 1 else None)  # HSDP: the whole world
        layout = RowShardedLayout(mesh, world)
        cfg = config or QGaLoreConfig()
        if cfg.compress_dense or overrides.get("compress_dense"):
            raise ValueError("QGaLoreConfig.compress_dense: under FSDP2 the dense gradients are reduced by "
                             "fully_shard itself, not by the optimizer; leave it False")
        super().__init__(params, config, names=names, collectives=world, layout=layout,
                         **overrides)
        for p in self.galore_params:
            if int8_layer_of(p) is None:
                raise NotImplementedError(f"{self.name_of(p)}: only INT8 GaLore layers are supported under FSDP2")
            r0, r1 = layout.rows(p)
            if _local(p).shape[0] != r1 - r0:
                raise ValueError(f"{self.name_of(p)}: local shard has {_local(p).shape[0]} rows, expected {r1 - r0}")

    @property
    def shard_comm(self) -> Collectives:
        return self.layout.shard_comm

    @property
    def replicate_comm(self) -> Collectives | None:
        return self.layout.replicate_comm

    def check_shards(self) -> int:
        """Every rank holds its own contiguous row range of each INT8 weight, with the scales
        and zeros of exactly those rows' groups; raises ``ValueError`` otherwise.  Returns
        the number of layers checked."""
        mine = []
        for p in self.galore_params:
            layer = int8_layer_of(p)
            r0, r1 = self.layout.rows(p)
            # this shard's rows of meta_shape: (rows, groups_per_row), or (rows' groups, 1) when flat
            per_row = meta_shape(layer)[1]
            meta = ((r1 - r0) * p.shape[1] // layer.group_size, 1) if layer.row_length is None else (r1 - r0, per_row)
            mine.append((self.name_of(p), r0, r1, tuple(_local(p).shape), tuple(_local(layer.weight_scales).shape),
                         tuple(_local(layer.weight_zeros).shape), meta))
        gathered = self.shard_comm.all_gather_object(mine)
        for i, (name, *_rest) in enumerate(mine):
            rows = [g[i] for g in gathered]
            if rows[0][1] != 0 or rows[-1][2] != self.galore_params[i].shape[0] or any(
                    a[2] != b[1] for a, b in zip(rows, rows[1:])):
                raise ValueError(f"{name}: row shards are not contiguous: {[r[1:3] for r in rows]}")
            for _, r0, r1, wshape, sshape, zshape, meta in rows:
                if wshape[0] != r1 - r0 or sshape != meta or zshape != meta:
                    raise ValueError(f"{name}: shard rows {r0}:{r1} hold codes {wshape}, scales {sshape}, "
                                     f"zeros {zshape}")
        return len(mine)


def _named_trainable(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters the optimizer owns: trainable ones and INT8 codes (not scales/zeros)."""
    return [(n, p) for n, p in model.named_parameters()
            if p.requires_grad or (p.dtype == torch.uint8 and int8_layer_of(p) is not None)]


def build_optimizer(model: nn.Module, config: QGaLoreConfig | None = None, mesh=None, *,
                    projection: str = "sharded", **overrides) -> FSDPQGaLoreAdamW8bit:
    """The Q-GaLore optimizer over a model sharded by :func:`shard_model`."""
    mesh = mesh if mesh is not None else default_mesh(model)
    named = _named_trainable(model)
    return FSDPQGaLoreAdamW8bit([p for _, p in named], config, mesh=mesh, names={p: n for n, p in named},
                                projection=projection, **overrides)


def fully_shard_qgalore(model: nn.Module, config: QGaLoreConfig | None = None, mesh=None, *,
                        projection: str = "sharded", layers: Iterable[nn.Module] | None = None,
                        reshard_after_forward: bool | None = None, **overrides):
    """:func:`shard_model` then :func:`build_optimizer`; returns ``(model, optimizer)``."""
    mesh = mesh if mesh is not None else default_mesh(model)
    shard_model(model, mesh, layers=layers, reshard_after_forward=reshard_after_forward)
    return model, build_optimizer(model, config, mesh, projection=projection, **overrides)

