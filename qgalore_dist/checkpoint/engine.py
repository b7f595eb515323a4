"""Checkpoints that resume anywhere: same world size bit-identically, another world size by
re-planning ownership.  Works for a DeepSpeed engine from :func:`qgalore_dist.initialize`
(any ZeRO stage) and for a plain ``(model, QGaLoreAdamW8bit)`` pair.

Layout of ``<save_dir>/<tag>/`` (no pickle anywhere: safetensors + JSON, nothing executes on load):

* ``model.safetensors`` (rank 0): every model tensor by name -- INT8 codes, scales and zero
  points, dense parameters as their fp32 master values (gathered from ZeRO partitions), buffers.
* ``optim_rank{r}.safetensors`` / ``.json`` (every rank): the state of the tensors rank r owns,
  keyed by parameter name, never by rank: 8-bit moments, step counts, INT4 projectors and
  their adaptive schedules, update error-feedback buffers; plus rank r's own gradient
  error-feedback buffers (restored only at the same world size).
* ``dense_optim.safetensors`` (rank 0, DeepSpeed only): Adam moments of the engine-owned dense
  parameters, dequantized to fp32 per parameter, so any ZeRO partitioning can take them;
  ``dense_rank{r}.safetensors``: rank r's partition of them as stored (8-bit codes), taken
  instead when the world size and ZeRO stage are unchanged (bit-identical resume).
* ``meta.json``: format version, world size, counters, scheduler and client state.
* ``manifest.json``: size and SHA-256 of every other file, written last.

A save writes into ``<tag>.tmp``, fsyncs every file, renames the directory to ``<tag>`` and
then atomically replaces ``latest``: a crash at any point leaves the previous checkpoint and
``latest`` intact.  A load verifies the manifest on every rank before touching any tensor, so a
truncated or altered checkpoint is refused (:class:`CheckpointError` naming the file) and
nothing is half-loaded.  The stochastic-rounding stream needs no saved RNG: it is a pure
function of (seed, step, tensor id), and the steps are in the optimizer state.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch
import torch.nn as nn

from ..optim import QGaLoreAdamW8bit
from .files import (
    FORMAT_VERSION,
    CheckpointError,
    fsync_dir,
    latest_tag,
    publish_dir,
    publish_latest,
    read_json,
    read_tensors,
    verify_checkpoint,
    write_json,
    write_tensors,
)
from .files import (
    SEP as _SEP,
)
from .rows import load_moments, row_moment_fields, take_rows, whole_tensor

__all__ = ["load_engine_checkpoint", "save_engine_checkpoint", "verify_everywhere"]


# ----------------------------------------------------------------------------- targets
def _target_parts(target) -> tuple[nn.Module, QGaLoreAdamW8bit, Any]:
    """``(model, galore optimizer, engine or None)`` of a DeepSpeed engine or a pair."""
    if isinstance(target, tuple) and len(target) == 2:
        model, optimizer = target
        if not isinstance(optimizer, QGaLoreAdamW8bit):
            raise ValueError(f"checkpoint target: expected (model, QGaLoreAdamW8bit), got {type(optimizer).__name__}")
        return model, optimizer, None
    galore = getattr(target, "qgalore", None)
    if galore is None:
        raise ValueError("checkpoint target must be an engine from qgalore_dist.initialize or (model, optimizer)")
    return target.module, galore, target


def _galore_owned_state(opt: QGaLoreAdamW8bit) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and scalars of every parameter this rank owns, keyed ``name::field``."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    dp_rank, galore = opt.comm.rank, set(opt.galore_params)
    for p in opt.galore_params + opt.dense_params:
        name = opt.name_of(p)
        if p in opt.comm_residuals:
            tensors[f"{name}{_SEP}grad_residual.rank{dp_rank}"] = opt.comm_residuals[p]
        rows = p in galore and opt.row_reduced(p)
        if rows:  # every rank holds the moments of its rows
            tensors.update({f"{name}{_SEP}{k}": v for k, v in row_moment_fields(opt, p).items()})
        if opt.owner.get(p) != dp_rank:
            continue
        for field, value in opt.param_state(p).items():
            if rows and field.startswith("exp_avg"):
                continue
            key = f"{name}{_SEP}{field}"
            (tensors if torch.is_tensor(value) else scalars)[key] = value
        if p in opt.update_residuals:
            tensors[f"{name}{_SEP}update_residual"] = opt.update_residuals[p]
    return tensors, scalars


def _load_galore_state(opt: QGaLoreAdamW8bit, tensors: dict, scalars: dict, same_world: bool) -> None:
    """Every rank takes the replicated fields (steps, projectors) of every parameter and the
    moments of the parameters it owns under the current plan."""
    by_name: dict[str, dict[str, Any]] = {}
    galore = set(opt.galore_params)
    for key, value in [*tensors.items(), *scalars.items()]:
        name, field = key.split(_SEP, 1)
        by_name.setdefault(name, {})[field] = value
    dp_rank = opt.comm.rank
    for p in opt.galore_params + opt.dense_params:
        name = opt.name_of(p)
        fields = by_name.pop(name, {})
        residual = fields.pop(f"grad_residual.rank{dp_rank}", None)
        fields = {k: v for k, v in fields.items() if not k.startswith("grad_residual.")}
        update_residual = fields.pop("update_residual", None)
        owner = opt.owner[p] == dp_rank
        if owner and update_residual is not None:
            opt.update_residuals[p] = update_residual.to(p.device)
        if residual is not None and same_world:
            opt.comm_residuals[p] = residual.to(p.device)
        try:
            fields = load_moments(opt, p, fields, owner)
        except ValueError as exc:
            raise CheckpointError(f"{name}: {exc}") from exc
        if not owner and not (p in galore and opt.row_reduced(p)):  # moments that moved to another owner
            opt.state[p].pop("exp_avg", None)
            opt.state[p].pop("exp_avg_sq", None)
        if fields:
            opt.load_param_state(p, fields)
    if by_name:
        raise CheckpointError(f"checkpoint has optimizer state for parameters this model lacks: {sorted(by_name)[:5]}")
    opt.arm_grad_sinks()


# ----------------------------------------------------------------------------- DeepSpeed dense
_M, _V = "exp_avg.fp32", "exp_avg_sq.fp32"


def _stage(engine) -> int:
    return int(engine.zero_optimization_stage()) if engine.zero_optimization() else 0


def _stage0_masters(engine) -> dict[int, torch.Tensor]:
    """Stage 0: ``id(model param) -> the tensor the optimizer updates`` (itself in fp32, the
    fp32 master copy under the bf16 wrapper)."""
    wrapper = engine.optimizer
    if hasattr(wrapper, "fp32_groups") and hasattr(wrapper, "fp16_groups"):
        return {id(lp): hp for lps, hps in zip(wrapper.fp16_groups, wrapper.fp32_groups) for lp, hp in zip(lps, hps)}
    return {id(p): p for g in engine.basic_optimizer.param_groups for p in g["params"]}


def _dense_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]


def _relink_fragments(engine) -> None:
    """Stages 1/2: DeepSpeed links optimizer-state views into each parameter's fragment once,
    after the first step; link again so the temporary fp32 moment tensors are seen."""
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    zero = engine.optimizer
    for i, _ in enumerate(zero.optimizer.param_groups):
        lazy_init_hp_params_optimizer_state(zero.bit16_groups[i], zero.single_partition_of_fp32_groups[i],
                                            zero.optimizer.state)


def _dense_tensors(engine, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Collective.  ``(fp32 parameters, fp32 moments, steps)`` of every engine-owned dense
    parameter, full size on every rank."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    stage, eopt = _stage(engine), engine.basic_optimizer
    params, moments, steps = {}, {}, {}
    with eopt.fp32_moments(write_back=False):
        masters = _stage0_masters(engine) if stage == 0 else None
        if stage in (1, 2):
            _relink_fragments(engine)
        for name, p in _dense_params(model):
            if stage == 0:
                hp = masters[id(p)]
                params[name] = hp.detach().float()
                state = eopt.state.get(hp, {})
                if _M in state:
                    moments[f"{name}{_SEP}exp_avg"], moments[f"{name}{_SEP}exp_avg_sq"] = state[_M], state[_V]
            else:
                params[name] = safe_get_full_fp32_param(p)
                if eopt.has_moments():
                    moments[f"{name}{_SEP}exp_avg"] = safe_get_full_optimizer_state(p, _M)
                    moments[f"{name}{_SEP}exp_avg_sq"] = safe_get_full_optimizer_state(p, _V)
        steps = eopt.dense_steps()
    return params, moments, steps


def _load_dense(engine, model: nn.Module, params: dict, moments: dict, steps: dict) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    stage, eopt = _stage(engine), engine.basic_optimizer
    missing = [n for n, _ in _dense_params(model) if n not in params]
    if missing:
        raise CheckpointError(f"model.safetensors lacks dense parameters {missing[:5]}")
    eopt.ensure_moments(bool(moments), steps)
    with eopt.fp32_moments(write_back=True):
        masters = _stage0_masters(engine) if stage == 0 else None
        if stage in (1, 2):
            _relink_fragments(engine)
        for name, p in _dense_params(model):
            value = params[name]
            if stage == 0:
                hp = masters[id(p)]
                hp.data.copy_(value.view_as(hp))
                if hp is not p:
                    p.data.copy_(value.view_as(p).to(p.dtype))
                state = eopt.state.get(hp, {})
                if _M in state:
                    state[_M].copy_(moments[f"{name}{_SEP}exp_avg"].view_as(hp))
                    state[_V].copy_(moments[f"{name}{_SEP}exp_avg_sq"].view_as(hp))
                continue
            safe_set_full_fp32_param(p, value)
            if stage in (1, 2) or p.data.numel() == value.numel():
                # The full low-precision copy every rank holds (stages 1/2; stage 3 parameters
                # that are gathered now, e.g. the persistent small ones).
                p.data.copy_(value.view_as(p.data).to(p.dtype))
            if moments:
                safe_set_full_optimizer_state(p, moments[f"{name}{_SEP}exp_avg"], _M)
                safe_set_full_optimizer_state(p, moments[f"{name}{_SEP}exp_avg_sq"], _V)
    if stage == 3:
        # What ZeRO-3 does after a step: low-precision partitions from the fp32 ones, then
        # re-gather the persistent (small, never released) parameters.
        zero = engine.optimizer
        for sub_group in range(len(zero.fp16_partitioned_groups_flat)):
            zero._reassign_or_swap_out_partitioned_parameters(sub_group)
        zero.checkpoint_event_epilogue()


# ----------------------------------------------------------------------------- save / load
def _model_tensors(model: nn.Module, galore: QGaLoreAdamW8bit, engine) -> tuple[dict, dict, dict]:
    """Collective under DeepSpeed.  ``(model tensors by name, dense moments, dense steps)``."""
    # ZeRO-3-partitioned INT8 tensors are gathered one at a time; rank 0 alone keeps them (it
    # writes model.safetensors).
    keep = galore.comm.rank == 0
    tensors = {n: whole_tensor(b, keep) for n, b in model.named_buffers()}
    tensors.update({n: whole_tensor(p, keep) for n, p in model.named_parameters()
                    if not (p.requires_grad and p.is_floating_point())})
    tensors = {n: t for n, t in tensors.items() if t is not None}
    if engine is None:
        tensors.update({n: p.detach() for n, p in _dense_params(model)})
        return tensors, {}, {}
    params, moments, steps = _dense_tensors(engine, model)
    tensors.update(params)
    return tensors, moments, steps


def _meta(galore: QGaLoreAdamW8bit, engine, client_state: dict | None) -> dict:
    meta = {"format_version": FORMAT_VERSION, "world_size": galore.comm.world_size,
            "qgalore_config": galore.config.to_dict(), "steps_taken": galore.steps_taken,
            "plan": {galore.name_of(p): galore.owner[p] for p in galore.galore_params},
            "client_state": client_state or {}}
    if engine is not None:
        meta["engine"] = {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
                          "micro_steps": engine.micro_steps, "zero_stage": _stage(engine)}
        if engine.lr_scheduler is not None and hasattr(engine.lr_scheduler, "state_dict"):
            meta["engine"]["lr_scheduler"] = engine.lr_scheduler.state_dict()
    return meta


def save_engine_checkpoint(target, save_dir: str, *, tag: str | None = None, client_state: dict | None = None) -> str:
    """Collective: every rank calls it.  Writes ``<save_dir>/<tag>`` atomically and points
    ``latest`` at it; returns the checkpoint's path.  ``tag`` defaults to ``step<N>``;
    ``client_state`` must be JSON-serializable (e.g. the data loader's position)."""
    model, galore, engine = _target_parts(target)
    steps = engine.global_steps if engine is not None else galore.steps_taken
    tag = tag or f"step{steps}"
    if "/" in tag or tag in ("", ".", "..", "latest") or tag.endswith(".tmp"):
        raise ValueError(f"checkpoint tag {tag!r} must be a plain directory name")
    # A collective that fails during the save names the step being saved, not the last one run.
    previous, galore.comm.step_index = galore.comm.step_index, steps
    try:
        return _save_engine(model, galore, engine, save_dir, tag, client_state)
    except RuntimeError as exc:
        raise RuntimeError(f"qgalore-dist: saving checkpoint {tag!r} after optimizer step {steps} failed "
                           f"on rank {galore.comm.rank}: {exc}") from exc
    finally:
        galore.comm.step_index = previous


def _save_engine(model: nn.Module, galore: QGaLoreAdamW8bit, engine, save_dir: str, tag: str,
                 client_state: dict | None) -> str:
    import torch.distributed as dist

    comm, dp_rank = galore.comm, galore.comm.rank
    final, tmp = os.path.join(save_dir, tag), os.path.join(save_dir, tag + ".tmp")
    if dp_rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
        os.makedirs(tmp)
    model_tensors, dense_moments, dense_steps = _model_tensors(model, galore, engine)
    if comm.world_size > 1:
        dist.barrier(group=comm.group)
    files: dict[str, dict] = {}
    owned, scalars = _galore_owned_state(galore)
    optim_file = f"optim_rank{dp_rank}.safetensors"
    files[optim_file] = write_tensors(os.path.join(tmp, optim_file), owned)
    files[f"optim_rank{dp_rank}.json"] = write_json(os.path.join(tmp, f"optim_rank{dp_rank}.json"), scalars)
    if engine is not None:  # this rank's dense partition as stored: the bit-identical path
        files[f"dense_rank{dp_rank}.safetensors"] = write_tensors(
            os.path.join(tmp, f"dense_rank{dp_rank}.safetensors"), engine.basic_optimizer.raw_state())
    if dp_rank == 0:
        files["model.safetensors"] = write_tensors(os.path.join(tmp, "model.safetensors"), model_tensors)
        meta = _meta(galore, engine, client_state)
        if engine is not None:
            files["dense_optim.safetensors"] = write_tensors(os.path.join(tmp, "dense_optim.safetensors"),
                                                             dense_moments)
            meta["engine"]["dense_steps"] = dense_steps
        files["meta.json"] = write_json(os.path.join(tmp, "meta.json"), meta)
    all_files = comm.all_gather_object(files)
    if dp_rank == 0:
        merged = {k: v for d in all_files for k, v in d.items()}
        write_json(os.path.join(tmp, "manifest.json"), {"format_version": FORMAT_VERSION, "files": merged})
        fsync_dir(tmp)
        publish_dir(tmp, final)
        publish_latest(save_dir, tag)
    if comm.world_size > 1:
        dist.barrier(group=comm.group)
    return final


def config_diff(saved: dict, current: dict) -> dict[str, tuple]:
    """``{key: (saved, current)}`` for the keys whose values differ once both went through JSON
    (a tuple and the list it was saved as are equal)."""
    saved, current = json.loads(json.dumps(saved)), json.loads(json.dumps(current))
    return {k: (saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current))
            if saved.get(k) != current.get(k)}


def verify_everywhere(comm, path: str) -> dict:
    """Every rank verifies; if any rank fails, every rank raises the same error (no hang)."""
    try:
        manifest, error = verify_checkpoint(path), None
    except CheckpointError as exc:
        manifest, error = None, str(exc)
    errors = [e for e in comm.all_gather_object(error) if e]
    if errors:
        raise CheckpointError(errors[0])
    return manifest


def load_engine_checkpoint(target, load_dir: str, *, tag: str | None = None) -> dict | None:
    """Collective.  Loads ``<load_dir>/<tag>`` (default: ``latest``) into the target after
    verifying it; returns the saved ``client_state``, or None when there is no checkpoint.
    A different world size re-plans ownership: owners pick their moments by name, gradient
    error-feedback buffers (per rank) restart from zero."""
    model, galore, engine = _target_parts(target)
    comm = galore.comm
    tag = tag or latest_tag(load_dir)
    if tag is None:
        return None
    path = os.path.join(load_dir, tag)
    manifest = verify_everywhere(comm, path)
    meta = read_json(os.path.join(path, "meta.json"))
    diff = config_diff(meta["qgalore_config"], galore.config.to_dict())
    if any(k in diff for k in ("rank", "proj_type", "proj_bits", "proj_group_size", "state_bits", "seed")):
        listed = ", ".join(f"{k} (checkpoint {a!r}, now {b!r})" for k, (a, b) in diff.items())
        raise CheckpointError(f"{path}/meta.json: the checkpoint's Q-GaLore config differs in {listed}")
    saved_world = int(meta["world_size"])
    tensors, scalars = {}, {}
    for name in sorted(manifest["files"]):
        if name.startswith("optim_rank") and name.endswith(".safetensors"):
            tensors.update(read_tensors(os.path.join(path, name)))
        elif name.startswith("optim_rank") and name.endswith(".json"):
            scalars.update(read_json(os.path.join(path, name)))
    model_tensors = read_tensors(os.path.join(path, "model.safetensors"))
    _load_model(model, model_tensors, engine)
    if engine is not None:
        dense_moments = read_tensors(os.path.join(path, "dense_optim.safetensors"))
        dense_params = {n: model_tensors[n] for n, _ in _dense_params(model) if n in model_tensors}
        steps = meta["engine"].get("dense_steps", {})
        _load_dense(engine, model, dense_params, dense_moments, steps)
        if saved_world == comm.world_size and meta["engine"]["zero_stage"] == _stage(engine):
            # Same partitioning: take the stored codes, not re-encoded fp32 values.
            raw = read_tensors(os.path.join(path, f"dense_rank{comm.rank}.safetensors"))
            engine.basic_optimizer.load_raw_state(raw, steps)
        for key in ("global_steps", "global_samples", "micro_steps"):
            setattr(engine, key, int(meta["engine"][key]))
        if "lr_scheduler" in meta["engine"] and engine.lr_scheduler is not None:
            _load_lr_scheduler(engine, meta["engine"]["lr_scheduler"])
    _load_galore_state(galore, tensors, scalars, same_world=saved_world == comm.world_size)
    galore.steps_taken = int(meta["steps_taken"])
    return meta["client_state"]


def _load_lr_scheduler(engine, state: dict) -> None:
    """A torch scheduler's ``load_state_dict`` restores its counter but leaves the optimizer's
    ``lr`` at its construction value (LambdaLR: base_lr * lambda(0), which is 0 under warmup)
    until the next ``step()``; the first step after a resume would use that.  Put the saved
    LRs back into the param groups, as ``optimizer.load_state_dict`` would in plain PyTorch."""
    scheduler = engine.lr_scheduler
    scheduler.load_state_dict(state)
    last = getattr(scheduler, "_last_lr", None)
    groups = engine.basic_optimizer.param_groups
    if last is not None and len(last) == len(groups):
        for group, lr in zip(groups, last):
            group["lr"] = float(lr)


def _load_model(model: nn.Module, tensors: dict[str, torch.Tensor], engine) -> None:
    """Non-dense tensors (INT8 codes, scales, zero points, buffers, frozen parameters), and in
    plain mode the dense parameters too; names and shapes must match exactly."""
    dense = {n for n, _ in _dense_params(model)} if engine is not None else set()
    own = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"model.safetensors does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for name, t in own.items():
        if name in dense:
            continue
        if tuple(t.shape) != tuple(tensors[name].shape):
            raise CheckpointError(f"model.safetensors: {name} has shape {tuple(tensors[name].shape)}, "
                                  f"the model has {tuple(t.shape)}")
    with torch.no_grad():
        for name, t in own.items():
            if name not in dense:
                take_rows(t, tensors[name])
