"""``torch.distributed.checkpoint`` (DCP) checkpoints of an FSDP2 Q-GaLore run
(:mod:`qgalore_dist.fsdp`), resumable at another world size.

Entry points (collective: every rank calls them)::

    save_checkpoint((model, opt), "ckpt/step100")    # qgalore_dist.checkpoint: save_dcp into ckpt/step100.tmp, rename
    load_checkpoint((model, opt), "ckpt/step100")    # any world size / mesh the shapes shard over
    sd = optimizer_state_dict(opt)                 # the DCP-ready optimizer half, on its own
    load_optimizer_state_dict(opt, sd)             # ... and back (``sd`` filled by ``dcp.load``)

The checkpoint is one DCP directory holding ``{"model": ..., "optim": ...}``:

* ``model``: ``get_model_state_dict(model)`` -- FSDP2's sharded DTensors: dense parameters, the
  ``uint8`` INT8 codes and their fp32 ``weight_scales`` / ``weight_zeros`` (``Shard(0)``, groups
  never cross a shard, see :func:`qgalore_dist.fsdp.check_shardable`), so DCP re-shards them to
  the loading mesh and a shard's groups are the same groups at every world size.
* ``optim``: a flat dict keyed by **parameter name** (``"<fqn>::<field>"``), never by rank:

  - ``<fqn>::exp_avg`` / ``::exp_avg_sq``: the moments of row-sharded parameters (dense
    parameters and right-projected GaLore rows, ``(m, r)``) as **fp32 DTensors built from the
    local shards** with the parameter's placements (``Shard(0)``; HSDP ``(Replicate(),
    Shard(0))``).  8-bit moments are stored *dequantized*: bitsandbytes' block-wise codes are
    blocked over each rank's local tensor, so in general their absmax blocks only mean
    something at the world size that wrote them; fp32 values re-shard exactly and are
    re-encoded on the loading rank's blocks (chosen over a tensor subclass, which would need
    every op DCP and FSDP2 apply to it).  Re-encoding is not exact (tests measure it on the
    same blocks: no code changed, dequantized values moved by up to 0.63 % of their tensor's
    max |value| -- blocks whose absmax shrinks on the second encoding), hence the raw codes:
  - ``<fqn>::exp_avg.codes@<tag>`` / ``.absmax@<tag>``: the same 8-bit moments as stored
    (uint8 codes and per-block absmax, DTensors with the same placements), taken instead of
    re-encoding where they are valid, so a same-world resume is bit-identical.  ``<tag>`` is
    ``blocks`` when every rank's moment holds a whole number of 256-element blocks (shard
    boundaries are block boundaries: the local blocks are the global tensor's, and any world
    size with that property -- e.g. LLaMA shapes at power-of-two world sizes -- takes the
    codes exactly), else ``raw<S>`` with ``S`` the number of shards (taken only by a load on a
    mesh with ``S`` shards: an HSDP mesh's replicas hold the same row shards as a 1-D mesh of
    ``S`` ranks, so an ``(R, S)`` HSDP checkpoint and an ``S``-rank FSDP one share them).
    Uneven row shards (FSDP2's ``torch.chunk`` split) save their codes as they are (rows of
    the moment) and their absmax zero-padded to the largest shard's block count, so the
    absmax is one evenly split ``(S * slots,)`` tensor; a load trims each shard's padding.
  - owner-held moments of left-projected matrices (``projection="std"``): plain tensors
    (codes + absmax, or fp32 values) of the whole ``(r, n)`` moment, saved by its owner and
    read by whichever rank owns the matrix after the load (exact at any world size).
  - ``<fqn>::projector.<key>``: the INT4 projector codes/scales/zeros (and the schedule's
    past vector) as plain tensors: replicated, so DCP writes them once and every rank reads them.
  - ``<fqn>::scalars`` and ``__meta__``: JSON strings with the step counts, projector side,
    refresh gap, SVD count, cosine queue, ``steps_taken``, ``skipped_steps``, the param groups'
    hyper-parameters, the Q-GaLore config and the mesh shape.

Nothing random is saved: stochastic rounding and the randomized SVD are keyed by
(seed, step, parameter name), and the steps are in the state.

Atomicity.  What DCP guarantees: every rank writes its own ``__<rank>_*.distcp`` files
(fsynced, ``FileSystemWriter(sync_files=True)``); the coordinator (rank 0) writes ``.metadata``
only after gathering every rank's write results, so a directory with ``.metadata`` is complete --
but a crash mid-save leaves a partial directory at the target path and nothing replaces an
older checkpoint atomically.  Hence :func:`save_dcp` writes into ``path + ".tmp"``,
barriers, rank 0 adds ``manifest.json`` (size and SHA-256 of every file, as engine checkpoints
have: ``verify_checkpoint`` and a load refuse a damaged one) and renames it to ``path`` (an
existing ``path`` is moved aside first and removed after) and fsyncs the parent directory; a
crash leaves either the old checkpoint or the new one at ``path``.

Not supported: the error-feedback residuals of ``compress_lowrank`` (refused at save).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..quant import Moment
from .files import FORMAT_VERSION, fsync_dir, publish_dir, write_manifest
from .files import SEP as _SEP

__all__ = ["load_dcp", "load_optimizer_state_dict", "optimizer_load_template", "optimizer_state_dict", "save_dcp"]

_MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))  # (name, signed)
_META = "__meta__"


def _DTensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def _row_sharded(opt, p: torch.Tensor) -> bool:
    """Moments held as this rank's rows of a global tensor (else: owner-held, whole)."""
    if p in set(opt.galore_params):
        return opt.row_reduced(p)
    return isinstance(p, _DTensor())


def _global_moment_shape(opt, p: torch.Tensor) -> tuple[int, ...]:
    if p in set(opt.galore_params):
        return tuple(opt.state[p]["projector"].lowrank_shape)
    return tuple(p.shape)


def _as_dtensor(p: torch.Tensor, local: torch.Tensor, global_shape: tuple[int, ...]):
    """``local`` (this rank's rows) as a DTensor laid out like ``p`` (same mesh, placements)."""
    stride = torch.empty(global_shape, device="meta").stride()
    return _DTensor().from_local(local.contiguous(), device_mesh=p.device_mesh, placements=p.placements,
                                 run_check=False, shape=torch.Size(global_shape), stride=stride)


def _raw_tag(opt, p: torch.Tensor) -> str:
    """``"blocks"`` when every shard boundary of ``p``'s moments is an absmax block boundary
    (the local blocks are then the global tensor's blocks, valid at any such world size),
    else ``"raw<shards>"``: valid on any mesh with the saving mesh's number of shards (the
    replicate dim of an HSDP mesh does not change which rows a shard holds)."""
    if _aligned(opt, p):
        return "blocks"
    return f"raw{opt.shard_comm.world_size}"


def _aligned(opt, p: torch.Tensor) -> bool:
    local = _numel(_global_moment_shape(opt, p)) // opt.shard_comm.world_size
    return _even(opt, p) and local % opt.codec.block_size == 0


def _absmax_slots(opt, p: torch.Tensor) -> int:
    """Absmax entries each rank saves for ``p``'s 8-bit moments: the blocks of the largest local
    moment (FSDP2's first ranks hold ``ceil(M/S)`` rows); smaller shards are zero-padded, so the
    saved absmax is one ``(S * slots,)`` tensor split evenly, and a load trims the padding."""
    shape = _global_moment_shape(opt, p)
    rows = -(-shape[0] // opt.shard_comm.world_size)
    return -(-(rows * _numel(shape[1:])) // opt.codec.block_size)


def _even(opt, p: torch.Tensor) -> bool:
    """Equal local shapes on every rank (raw absmax blocks can then form one global tensor)."""
    return _global_moment_shape(opt, p)[0] % opt.shard_comm.world_size == 0


def _scalars(opt, p: torch.Tensor) -> dict:
    state = opt.state[p]
    out: dict[str, Any] = {}
    if "step" in state:
        out["step"] = int(state["step"])
    proj = state.get("projector")
    if proj is not None:
        s = proj.schedule
        out.update(side=proj.side, gap=int(s.gap), svd_count=int(s.svd_count), queue=[float(v) for v in s.queue])
    return out


def _check_saveable(opt) -> None:
    from ..integrations.fsdp import FSDPQGaLoreAdamW8bit

    if not isinstance(opt, FSDPQGaLoreAdamW8bit):
        raise TypeError(f"expected FSDPQGaLoreAdamW8bit, got {type(opt).__name__}")
    if opt.comm_residuals or opt.update_residuals:
        raise NotImplementedError("DCP checkpoints of compress_lowrank error-feedback residuals are not implemented")


# ----------------------------------------------------------------------------- optimizer
def optimizer_state_dict(opt) -> dict[str, Any]:
    """The optimizer's state for ``dcp.save`` (module doc): sharded moments as DTensors,
    replicated pieces as plain tensors and JSON strings, keyed by parameter name."""
    _check_saveable(opt)
    out: dict[str, Any] = {}
    for p in opt.galore_params + opt.dense_params:
        name, state = opt.name_of(p), opt.state[p]
        tag = _raw_tag(opt, p)
        out[f"{name}{_SEP}scalars"] = json.dumps(_scalars(opt, p), sort_keys=True)
        proj = state.get("projector")
        if proj is not None:
            for key, value in proj.state_dict().items():
                if torch.is_tensor(value):
                    out[f"{name}{_SEP}projector.{key}"] = value
        if "exp_avg" not in state:
            continue
        sharded = _row_sharded(opt, p)
        codec = opt.layout.moment_codec(_numel(_global_moment_shape(opt, p)), opt.codec)
        for moment, signed in _MOMENTS:
            m: Moment = state[moment]
            key = f"{name}{_SEP}{moment}"
            if not sharded:  # owner-held whole moment: only its owner has it
                if m.values is not None:
                    out[key] = m.values
                else:
                    out[f"{key}.codes"], out[f"{key}.absmax"] = m.codes, m.absmax
                continue
            shape = _global_moment_shape(opt, p)
            out[key] = _as_dtensor(p, codec.decode(m, signed=signed), shape)
            if m.codes is not None:
                out[f"{key}.codes@{tag}"] = _as_dtensor(p, m.codes, shape)
                slots = _absmax_slots(opt, p)  # the same on every rank: uneven shards pad theirs
                absmax = torch.cat([m.absmax, m.absmax.new_zeros(slots - m.absmax.numel())])
                out[f"{key}.absmax@{tag}"] = _as_dtensor(p, absmax, (slots * opt.shard_comm.world_size,))
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    out[_META] = json.dumps({"format_version": FORMAT_VERSION, "steps_taken": opt.steps_taken,
                             "skipped_steps": opt.skipped_steps, "param_groups": groups,
                             "config": opt.config.to_dict(), "mesh": list(opt.mesh.shape),
                             "projection": opt.projection}, sort_keys=True)
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def optimizer_load_template(opt, saved_keys: dict[str, Any], *, raw: bool = True) -> dict[str, Any]:
    """The state dict ``dcp.load`` fills for ``opt``: one entry per saved key this rank needs,
    shaped for the *current* mesh.  ``saved_keys``: ``{key: storage metadata}`` of the
    checkpoint's optimizer entries (prefix stripped)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    _check_saveable(opt)
    dp_rank = opt.comm.rank
    out: dict[str, Any] = {}
    if _META not in saved_keys:
        raise ValueError("checkpoint has no Q-GaLore optimizer state (no optim.__meta__)")
    out[_META] = ""
    for p in opt.galore_params + opt.dense_params:
        name = opt.name_of(p)
        prefix = f"{name}{_SEP}"
        mine = {k[len(prefix):]: md for k, md in saved_keys.items() if k.startswith(prefix)}
        if "scalars" not in mine:
            raise ValueError(f"checkpoint has no optimizer state for {name}")
        out[prefix + "scalars"] = ""
        for field, md in mine.items():
            if not field.startswith("projector."):
                continue
            out[prefix + field] = torch.empty(md.size, dtype=md.properties.dtype)
        sharded = _row_sharded(opt, p)
        if not sharded and opt.owner.get(p) != dp_rank:
            continue  # another rank owns this moment now
        for moment, _ in _MOMENTS:
            if sharded:
                tag = _raw_tag(opt, p)
                raw_fields = [f"{moment}.codes@{tag}", f"{moment}.absmax@{tag}"]
                if raw and all(f in mine for f in raw_fields):
                    fields = raw_fields
                elif moment in mine:
                    fields = [moment]
                else:
                    continue
                for field in fields:
                    md = mine[field]
                    assert isinstance(md, TensorStorageMetadata)
                    gshape = tuple(md.size)
                    world = opt.shard_comm.world_size
                    r0 = opt.shard_comm.rank
                    local_rows = _local_rows(gshape[0], world, r0, p)
                    local = torch.zeros((local_rows, *gshape[1:]), dtype=md.properties.dtype)
                    out[prefix + field] = _as_dtensor(p, local, gshape)
            else:
                for field in (moment, f"{moment}.codes", f"{moment}.absmax"):
                    if field in mine:
                        md = mine[field]
                        out[prefix + field] = torch.empty(md.size, dtype=md.properties.dtype)
    return out


def _local_rows(rows: int, world: int, rank: int, p: torch.Tensor) -> int:
    """This rank's row count of a ``rows``-row tensor sharded like ``p`` (torch.chunk
    semantics, as FSDP2 and DTensor's Shard(0) use)."""
    chunk = -(-rows // world)
    return max(0, min(rows, (rank + 1) * chunk) - rank * chunk)


def load_optimizer_state_dict(opt, sd: dict[str, Any]) -> None:
    """Install a state dict filled by ``dcp.load`` (:func:`optimizer_load_template`)."""
    meta = json.loads(sd[_META])
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"optimizer checkpoint format {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    saved_cfg, cfg = meta["config"], opt.config.to_dict()
    diff = sorted(k for k in saved_cfg if cfg.get(k) != saved_cfg[k])
    if any(k in diff for k in ("rank", "proj_type", "proj_bits", "proj_group_size", "state_bits", "seed")):
        raise ValueError(f"the checkpoint's Q-GaLore config differs in {diff}")
    if len(meta["param_groups"]) != len(opt.param_groups):
        raise ValueError("optimizer checkpoint does not match this optimizer's parameter groups")
    for group, saved in zip(opt.param_groups, meta["param_groups"]):
        group.update(saved)
        group["betas"] = tuple(group["betas"])
    local = lambda t: t.to_local() if isinstance(t, _DTensor()) else t  # noqa: E731
    for p in opt.galore_params + opt.dense_params:
        name, state = opt.name_of(p), opt.state[p]
        prefix = f"{name}{_SEP}"
        scalars = json.loads(sd[prefix + "scalars"])
        state.pop("step", None)
        if "step" in scalars:
            state["step"] = int(scalars["step"])
        proj = state.get("projector")
        if proj is not None:
            proj_state = {"side": scalars["side"], "gap": scalars["gap"], "svd_count": scalars["svd_count"],
                          "queue": torch.tensor(scalars["queue"], dtype=torch.float64)}
            proj_state.update({k[len(prefix) + len("projector."):]: v.to(p.device) for k, v in sd.items()
                               if k.startswith(prefix + "projector.")})
            proj.load_state_dict(proj_state)
        state.pop("exp_avg", None)
        state.pop("exp_avg_sq", None)
        codec = opt.layout.moment_codec(_numel(_global_moment_shape(opt, p)), opt.codec)
        for moment, signed in _MOMENTS:
            fields = {k[len(prefix) + len(moment):]: local(v) for k, v in sd.items()
                      if k.startswith(prefix + moment) and k[len(prefix) + len(moment):][:1] in ("", ".", "@")}
            if not fields:
                continue
            codes = next((v for k, v in fields.items() if k.startswith(".codes")), None)
            absmax = next((v for k, v in fields.items() if k.startswith(".absmax")), None)
            if codes is not None:  # as stored (same shard count, or owner-held): bit-identical
                blocks = -(-codes.numel() // opt.codec.block_size)  # a shard's padding trimmed
                state[moment] = Moment(codes=codes.to(p.device).contiguous(),
                                       absmax=absmax[:blocks].to(p.device).contiguous())
            elif "" in fields:  # fp32 values: kept (32-bit state) or re-encoded on this rank's blocks
                state[moment] = codec.encode(fields[""].to(p.device), signed=signed)
    opt.steps_taken = int(meta["steps_taken"])
    opt.skipped_steps = int(meta["skipped_steps"])
    opt.arm_grad_sinks()


# ----------------------------------------------------------------------------- whole checkpoint
def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_dcp(model: nn.Module, opt, path: str, *, client_state: dict | None = None) -> str:
    """Collective.  ``dcp.save`` of ``{"model", "optim"}`` into ``path + ".tmp"``, then rank 0
    renames it to ``path`` (module doc: atomicity).  ``client_state`` (JSON-serializable) is
    kept in the optimizer meta.  Returns ``path``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    path = os.path.normpath(path)
    tmp = path + ".tmp"
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    state = {"model": get_model_state_dict(model), "optim": optimizer_state_dict(opt)}
    if client_state is not None:
        meta = json.loads(state["optim"][_META])
        meta["client_state"] = client_state
        state["optim"][_META] = json.dumps(meta)
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
        os.makedirs(tmp)
    _barrier()
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
    _barrier()
    if rank0:
        write_manifest(tmp)  # after every rank's files: verify_checkpoint covers DCP checkpoints too
        fsync_dir(tmp)
        publish_dir(tmp, path)
        fsync_dir(os.path.dirname(path) or ".")
    _barrier()
    return path


def load_dcp(model: nn.Module, opt, path: str, *, raw: bool = True) -> dict:
    """Collective.  Loads a :func:`save_dcp` directory into an FSDP2 model and its
    :class:`~qgalore_dist.fsdp.FSDPQGaLoreAdamW8bit` at any world size whose mesh the shapes
    shard over; returns the saved optimizer meta (steps, mesh shape, ...).  ``raw=False``
    ignores the stored 8-bit codes of the saving mesh and re-encodes the fp32 moments, as a
    load on a mesh with another number of shards does (to measure that difference)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    if not os.path.exists(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"{path} is not a complete DCP checkpoint (no .metadata)")
    metadata = dcp.FileSystemReader(path).read_metadata()
    saved = {k[len("optim."):]: md for k, md in metadata.state_dict_metadata.items() if k.startswith("optim.")}
    model_sd = get_model_state_dict(model)
    state = {"model": model_sd, "optim": optimizer_load_template(opt, saved, raw=raw)}
    dcp.load(state, storage_reader=dcp.FileSystemReader(path))
    set_model_state_dict(model, state["model"])
    load_optimizer_state_dict(opt, state["optim"])
    return json.loads(state["optim"][_META])
