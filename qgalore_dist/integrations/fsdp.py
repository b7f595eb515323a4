"""Q-GaLore on PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``): FSDP on a 1-D mesh,
HSDP on a 2-D (replicate x shard) mesh.

Entry points::

    model = prepare_model(hf_llama, group_size=256)            # INT8 GaLore layers
    mesh = init_device_mesh("cpu", (world_size,))               # or "cuda"; HSDP: (replicas, shards)
    shard_model(model, mesh)                                    # fully_shard per decoder layer + root
    opt = build_optimizer(model, QGaLoreConfig(...), mesh)      # FSDPQGaLoreAdamW8bit
    # or both at once: model, opt = fully_shard_qgalore(model, config, mesh)

What is sharded, and by whom
----------------------------
* Dense parameters (embeddings, norms, head, biases): FSDP2 shards them ``Shard(0)``,
  all-gathers them in forward/backward and reduce-scatters (averages) their gradients; the
  optimizer runs the package's AdamW (same formula, 8-bit moments) on the local DTensor shards.
  No package collective touches them.
* INT8 GaLore weights: the ``uint8`` weight is an FSDP2 ``Shard(0)`` DTensor (rows split
  evenly over ranks), and so are its ``weight_scales`` / ``weight_zeros`` (turned from buffers
  into frozen ``Parameter`` s by :func:`shard_model`, so that FSDP2 shards and all-gathers them
  with the codes).  The group layout is the reference's: the weight flattened row-major and cut
  into ``group_size`` consecutive elements.  :func:`shard_model` requires that every shard
  boundary is a group boundary (``m % N == 0`` and ``(m / N) * n % group_size == 0``), which
  holds for every LLaMA shape (``n`` a multiple of 256) -- so groups never cross a shard, the
  group layout is *unchanged* and the numerical difference to the reference layout is zero
  (tests measure it: bit-identical codes within one subspace).  Row groups (``group_size | n``)
  are the special case ``group_size <= n``; a layout that changes groups is not implemented.
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
randomized SVD across shards), non-even row splits and row-group layouts for shapes whose
shard boundaries would cut a 256-element group (rejected by :func:`check_shardable`).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from ..core import Int8Linear, adam_step_size, int8_layer_of
from ..core.adam import lowrank_adam_update
from ..distributed import Collectives, pack_buckets, reduce_to_owners
from ..distributed.replicas import check_replicas
from ..optim import QGaLoreAdamW8bit, QGaLoreConfig
from ..quant import BlockwiseCodec, StreamKey, dequantize
from ..quant.groupwise import _group_params
from ..quant.random import _MASK32, _mix32, _mix32_int, key_to_u32

__all__ = [
    "FSDPQGaLoreAdamW8bit", "PROJECTIONS", "build_optimizer", "check_shardable", "fully_shard_qgalore",
    "quantize_rows", "shard_model", "uniform_from_key_at",
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


def _make_shardable(layer: Int8Linear) -> None:
    if isinstance(layer, _ShardableInt8Linear):
        return
    for name in _META:
        t = layer._buffers.pop(name)
        layer.register_parameter(name, nn.Parameter(t, requires_grad=False))
    layer.__class__ = _ShardableInt8Linear


def check_shardable(model: nn.Module, world_size: int) -> None:
    """Raise ``ValueError`` naming the first INT8 layer whose row shards would cut a
    quantization group (see module doc)."""
    for name, mod in model.named_modules():
        if not isinstance(mod, Int8Linear):
            continue
        m, n, gs = mod.out_features, mod.in_features, mod.group_size
        if m % world_size or ((m // world_size) * n) % gs:
            raise ValueError(
                f"{name}: a {m}x{n} INT8 weight with group_size={gs} cannot be row-sharded over {world_size} "
                f"ranks without cutting a quantization group (need m % N == 0 and (m/N)*n % group_size == 0)")


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
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
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


# ---------------------------------------------------------------------------------- quantization
def uniform_from_key_at(key: StreamKey, start: int, numel: int, device="cpu") -> torch.Tensor:
    """``uniform_from_key(key, start + numel)[start:]`` without drawing the prefix: the bits a
    single process draws for the elements ``[start, start + numel)`` of a tensor."""
    k = key_to_u32(key)
    k2 = _mix32_int(k ^ 0x85EBCA6B)
    idx = torch.arange(start, start + numel, dtype=torch.int64, device=device)
    bits = _mix32((_mix32(idx ^ k) + k2) & _MASK32)
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))


def quantize_rows(x: torch.Tensor, *, group_size: int, offset: int,
                  stochastic_key: StreamKey | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`qgalore_dist.quant.quantize` (8 bits) of the slice of a tensor that starts at flat
    element ``offset`` (a multiple of ``group_size``): the same codes, scales and zeros the
    whole tensor's quantization gives for that slice."""
    assert offset % group_size == 0 and x.numel() % group_size == 0
    groups = x.detach().reshape(-1, group_size).to(torch.float32)
    scales, zeros = _group_params(groups, 8, False)
    if stochastic_key is None:
        codes = torch.round(groups / scales) + zeros
    else:
        lo = groups.amin(dim=1, keepdim=True)
        zeros = -lo / scales
        shifted = (groups - lo) / scales
        noise = uniform_from_key_at(stochastic_key, offset, groups.numel(), groups.device).view_as(groups)
        floor = torch.floor(shifted)
        codes = floor + (noise < (shifted - floor)).to(shifted.dtype)
    return codes.clamp_(0, 255).to(torch.uint8).view(x.shape), scales, zeros


# ---------------------------------------------------------------------------------- optimizer
class FSDPQGaLoreAdamW8bit(QGaLoreAdamW8bit):
    """:class:`QGaLoreAdamW8bit` over FSDP2 DTensor parameters (module doc): INT8 weights
    row-sharded, right-projected matrices updated shard-locally, dense parameters updated on
    their local shards.  Build it with :func:`build_optimizer`."""

    weights_sharded = True

    def __init__(self, params, config: QGaLoreConfig | None = None, *, mesh,
                 names: dict[torch.Tensor, str] | None = None, projection: str = "sharded", **overrides) -> None:
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        if projection == "sharded":
            overrides["proj_type"] = "right"
        self.projection = projection
        self.mesh = mesh
        if mesh.ndim not in (1, 2):
            raise ValueError(f"mesh must be 1-D (FSDP) or 2-D (HSDP: replicate x shard), got {mesh.ndim}-D")
        world_group = mesh.get_group() if mesh.ndim == 1 else None  # HSDP: the whole world
        super().__init__(params, config, names=names, collectives=Collectives(world_group),
                         manage_dense=True, **overrides)
        if self.config.compress_dense:
            raise ValueError("QGaLoreConfig.compress_dense: under FSDP2 the dense gradients are reduced by "
                             "fully_shard itself, not by the optimizer; leave it False")
        if self.config.overlap_comm:
            raise ValueError("QGaLoreConfig.overlap_comm is not implemented under FSDP2 yet (its row "
                             "reduce-scatter runs in step()); leave it False")
        # Row shards live on the shard dim; low-rank rows are averaged across the replicate dim.
        self.shard_comm = self.comm if mesh.ndim == 1 else Collectives(mesh.get_group(1))
        self.replicate_comm = Collectives(mesh.get_group(0)) if mesh.ndim == 2 else None
        self.replicas = 1 if self.replicate_comm is None else self.replicate_comm.world_size
        rank, world = self.shard_comm.rank, self.shard_comm.world_size
        self._rows: dict[torch.Tensor, tuple[int, int]] = {}
        for p in self.galore_params:
            layer = int8_layer_of(p)
            if layer is None:
                raise NotImplementedError(f"{self.name_of(p)}: only INT8 GaLore layers are supported under FSDP2")
            m = p.shape[0]
            self._rows[p] = (rank * m // world, (rank + 1) * m // world)
            if _local(p).shape[0] != m // world:
                raise ValueError(f"{self.name_of(p)}: local shard has {_local(p).shape[0]} rows, expected {m // world}")
        # 8-bit or fp32 moments are decided from the *global* size, as a single process does.
        self._codec_8 = BlockwiseCodec(bits=self.config.state_bits, min_8bit_size=0)
        self._codec_32 = BlockwiseCodec(bits=32)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _local_grad(p: torch.Tensor):
        out = QGaLoreAdamW8bit._local_grad(p)
        return None if out is None else (out[0], _local(out[1]))

    def _sharded(self, p: torch.Tensor) -> bool:
        return self.state[p]["projector"].side == "right"

    def _codec_for(self, numel_global: int) -> BlockwiseCodec:
        return self._codec_8 if self.codec.uses_8bit(numel_global) else self._codec_32

    def _adam_local(self, state: dict, grad: torch.Tensor, group: dict, numel_global: int) -> torch.Tensor:
        codec = self._codec_for(numel_global)
        if "exp_avg" not in state:
            state["exp_avg"] = codec.zeros(grad.shape, grad.device, signed=True)
            state["exp_avg_sq"] = codec.zeros(grad.shape, grad.device, signed=False)
        direction, state["exp_avg"], state["exp_avg_sq"] = lowrank_adam_update(
            grad, state["exp_avg"], state["exp_avg_sq"], codec, betas=group["betas"], eps=group["eps"])
        return direction

    def _reduce_rows(self, params: list[torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
        """Each rank's (m, r) low-rank gradients, averaged over ranks and scattered by row range:
        returns ``{p: (m/N, r) mean rows}`` for this rank's rows, one reduce-scatter per
        ``bucket_cap_mb`` bucket.  HSDP: reduce-scatter inside the shard group, then an
        all-reduce of the (m/S, r) rows across the replicate group -- the only GaLore tensors
        that cross it."""
        full = {}
        for p in params:
            kind, grad = self._local_grad(p)
            full[p] = grad if kind == "lowrank" else self.state[p]["projector"].project(grad)
        itemsize = self._payload_dtype.itemsize
        out = {}
        for bucket in pack_buckets([(p, 0, full[p]) for p in params], self._bucket_bytes, lambda t: itemsize):
            out.update(self._reduce_rows_bucket([p for p, _, _ in bucket], full))
        return out

    def _reduce_rows_bucket(self, params: list[torch.Tensor], full: dict) -> dict[torch.Tensor, torch.Tensor]:
        world = self.shard_comm.world_size
        chunks = []
        for k in range(world):
            parts = [full[p][k * p.shape[0] // world:(k + 1) * p.shape[0] // world].reshape(-1) for p in params]
            chunks.append(torch.cat(parts).to(self._payload_dtype))
        mine = self.shard_comm.reduce_scatter_mean(chunks, "lowrank_reduce")
        if self.replicate_comm is not None:
            self.replicate_comm.all_reduce_mean(mine, "lowrank_reduce")
        out, offset = {}, 0
        for p in params:
            r0, r1 = self._rows[p]
            shape = (r1 - r0, full[p].shape[1])
            out[p] = mine[offset:offset + shape[0] * shape[1]].view(shape).to(torch.float32)
            offset += shape[0] * shape[1]
        return out

    # ------------------------------------------------------------------ step
    def _update(self, galore: list[torch.Tensor], dense: list[torch.Tensor], *, extra_grad_sq=0.0) -> None:
        """The sharded layout: rows of R reduce-scattered by FSDP row ranges and updated
        locally; left-projected matrices through the owner exchange; dense shards locally."""
        assert not extra_grad_sq, "FSDP2 owns no gradients outside this optimizer"
        refreshing = [p for p in galore if self._is_refreshing(p)]
        owner_lowrank = self._refresh(refreshing)  # full G to owners, SVD, INT4 broadcast
        rows = [p for p in galore if self._sharded(p)]
        left = [p for p in galore if not self._sharded(p)]
        row_avg = self._reduce_rows(rows)
        left_items = []
        for p in left:
            if p in set(refreshing):
                continue
            kind, grad = self._local_grad(p)
            left_items.append((p, self.owner[p], grad if kind == "lowrank" else self.state[p]["projector"].project(grad)))
        left_avg = reduce_to_owners(self.comm, left_items, "lowrank_reduce", dtype=self._payload_dtype,
                                    bucket_bytes=self._bucket_bytes)
        left_avg.update({p: owner_lowrank[p] for p in left if p in owner_lowrank})
        dense_grads = {p: _local(p.grad) for p in dense}
        coef = self._clip_coef_local(row_avg, left_avg, dense_grads)
        for p in rows:
            state = self.state[p]
            state["step"] = state.get("step", 0) + 1
            grad = row_avg[p] if coef == 1.0 else row_avg[p] * coef
            numel = p.shape[0] * state["projector"].rank
            self._apply_galore(p, self._adam_local(state, grad, self._group_of[p], numel))
        self._update_galore(left, left_avg, coef)  # owner exchange; applies through _apply_galore
        self._update_dense_local(dense, dense_grads, coef)

    def _end_step(self) -> None:
        for comm in {id(c): c for c in (self.comm, self.shard_comm, self.replicate_comm) if c is not None}.values():
            comm.meter.end_step()

    def _clip_coef_local(self, row_avg: dict, left_avg: dict, dense_grads: dict) -> float:
        self.last_grad_norm = None
        if self.config.max_grad_norm <= 0:
            return 1.0
        total = torch.zeros(1, dtype=torch.float64)
        for g in [*row_avg.values(), *dense_grads.values()]:  # shards: present on every replica
            total += g.double().square().sum() / self.replicas
        for p, g in left_avg.items():
            if self.owner[p] == self.comm.rank:
                total += g.double().square().sum()
        self.comm.all_reduce_sum(total, "control")
        self.last_grad_norm = float(total.sqrt())
        self.last_clip_coef = min(1.0, self.config.max_grad_norm / (self.last_grad_norm + 1e-6))
        return self.last_clip_coef

    def _apply_galore(self, p: torch.Tensor, direction: torch.Tensor) -> None:
        """Update this rank's rows of the INT8 weight: ``direction`` is the local (m/N, r) rows
        (right projection) or the full (r, n) update (left projection)."""
        state, group = self.state[p], self._group_of[p]
        step = state["step"]
        proj = state["projector"]
        layer = int8_layer_of(p)
        r0, r1 = self._rows[p]
        P = proj.matrix()
        delta = (direction @ P if proj.side == "right" else P[r0:r1] @ direction) * proj.scale
        codes, scales, zeros = _local(layer.weight), _local(layer.weight_scales), _local(layer.weight_zeros)
        weight = dequantize(codes, scales, zeros, group_size=layer.group_size)
        weight.add_(delta.to(weight.dtype), alpha=-adam_step_size(group["lr"], group["betas"], step))
        if group["weight_decay"] > 0:
            weight.add_(weight, alpha=-group["lr"] * group["weight_decay"])
        key = StreamKey(self.config.seed, step - 1, self._stream_ids[p]) if self.config.stochastic_round else None
        new_codes, new_scales, new_zeros = quantize_rows(weight, group_size=layer.group_size,
                                                         offset=r0 * p.shape[1], stochastic_key=key)
        codes.copy_(new_codes)
        scales.copy_(new_scales)
        zeros.copy_(new_zeros)

    def _update_dense_local(self, params: list[torch.Tensor], grads: dict, coef: float) -> None:
        for p in params:
            state, group = self.state[p], self._group_of[p]
            state["step"] = state.get("step", 0) + 1
            grad = grads[p] if coef == 1.0 else grads[p] * coef
            local = _local(p.data if not isinstance(p, _dtensor_cls()) else p)
            direction = self._adam_local(state, grad, group, p.numel())
            local.add_(direction.to(local.dtype), alpha=-adam_step_size(group["lr"], group["betas"], state["step"]))
            if group["weight_decay"] > 0:
                local.add_(local, alpha=-group["lr"] * group["weight_decay"])

    # ------------------------------------------------------------------ checks
    def replicated_tensors(self):
        """Tensors that must be bit-identical on all ranks: projectors and their schedules
        (weights, scales and dense parameters are shards, see :meth:`check_shards`)."""
        for p in self.galore_params:
            proj = self.state[p]["projector"]
            if proj.has_matrix():
                for key, t in proj.to_payload().items():
                    yield f"{self.name_of(p)}.{key}", t

    def check_replicas(self) -> int:
        return check_replicas(self.comm, self.replicated_tensors())

    def check_shards(self) -> int:
        """Every rank holds its own contiguous row range of each INT8 weight, with the scales
        and zeros of exactly those rows' groups; raises ``ValueError`` otherwise.  Returns
        the number of layers checked."""
        mine = []
        for p in self.galore_params:
            layer = int8_layer_of(p)
            r0, r1 = self._rows[p]
            n_groups = (r1 - r0) * p.shape[1] // layer.group_size
            mine.append((self.name_of(p), r0, r1, tuple(_local(p).shape), tuple(_local(layer.weight_scales).shape),
                         tuple(_local(layer.weight_zeros).shape), n_groups))
        gathered = self.shard_comm.all_gather_object(mine)
        for i, (name, *_rest) in enumerate(mine):
            rows = [g[i] for g in gathered]
            if rows[0][1] != 0 or rows[-1][2] != self.galore_params[i].shape[0] or any(
                    a[2] != b[1] for a, b in zip(rows, rows[1:])):
                raise ValueError(f"{name}: row shards are not contiguous: {[r[1:3] for r in rows]}")
            for _, r0, r1, wshape, sshape, zshape, n_groups in rows:
                if wshape[0] != r1 - r0 or sshape != (n_groups, 1) or zshape != (n_groups, 1):
                    raise ValueError(f"{name}: shard rows {r0}:{r1} hold codes {wshape}, scales {sshape}, zeros {zshape}")
        return len(mine)


def _named_trainable(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters the optimizer owns: trainable ones and INT8 codes (not scales/zeros)."""
    return [(n, p) for n, p in model.named_parameters()
            if p.requires_grad or (p.dtype == torch.uint8 and int8_layer_of(p) is not None)]


def build_optimizer(model: nn.Module, config: QGaLoreConfig | None = None, mesh=None, *,
                    projection: str = "sharded", **overrides) -> FSDPQGaLoreAdamW8bit:
    """The Q-GaLore optimizer over a model sharded by :func:`shard_model`."""
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    named = _named_trainable(model)
    return FSDPQGaLoreAdamW8bit([p for _, p in named], config, mesh=mesh, names={p: n for n, p in named},
                                projection=projection, **overrides)


def fully_shard_qgalore(model: nn.Module, config: QGaLoreConfig | None = None, mesh=None, *,
                        projection: str = "sharded", layers: Iterable[nn.Module] | None = None,
                        reshard_after_forward: bool | None = None, **overrides):
    """:func:`shard_model` then :func:`build_optimizer`; returns ``(model, optimizer)``."""
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    shard_model(model, mesh, layers=layers, reshard_after_forward=reshard_after_forward)
    return model, build_optimizer(model, config, mesh, projection=projection, **overrides)

