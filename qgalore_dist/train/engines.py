"""The three engines of ``qgalore-train`` behind one face, so the loop (:mod:`.loop`) has one
code path: ``build_engine(cfg, ds_config, model)`` returns

* :class:`DeepSpeedEngine` (``--engine deepspeed``): ``qgalore_dist.initialize``; DeepSpeed owns
  the dense parameters (ZeRO 0-3), micro-batching, bf16 and the LR scheduler;
* :class:`FSDP2Engine` (``--engine fsdp2``): :func:`~qgalore_dist.integrations.fsdp.shard_model`
  on the device mesh of :class:`~.parallel.ParallelDims` (1-D FSDP2, or 2-D HSDP) and
  :class:`~qgalore_dist.integrations.fsdp.FSDPQGaLoreAdamW8bit`;
* :class:`DDPEngine` (``--engine ddp``): plain data parallel: :class:`QGaLoreAdamW8bit` reduces
  low-rank and dense gradients itself (no torch DDP wrapper); also the one-process case.

What each exposes: ``micro_step(ids, last=)`` (forward and backward of one micro-batch; the
loss), ``step()`` (the optimizer step at the accumulation boundary), ``lr()``, ``save`` /
``load`` (:func:`qgalore_dist.checkpoint.save_checkpoint` / ``load_checkpoint``), ``export``
(the HF model on rank 0), ``check()`` (replicas, and FSDP2's row shards), ``describe()``,
``comm_bytes()``, and ``qgalore`` (the :class:`QGaLoreAdamW8bit`), ``module`` (what forward
calls), ``model``, ``micro_batch``, ``accumulation``, ``device``.

FSDP2 and DDP read from the ds_config only what :data:`.config.ENGINE_DS_KEYS` names: the
optimizer entry (parsed by :func:`~qgalore_dist.integrations.deepspeed.parse_optimizer_entry`,
as under DeepSpeed), the micro batch, accumulation, clipping (``gradient_clipping`` becomes
``max_grad_norm``, one norm over every gradient) and ``bf16`` -- which here means autocast:
fp32 weights and optimizer, forward and backward matmuls in bf16 (``shard_model`` takes no
FSDP2 ``MixedPrecisionPolicy``, and one would cast the INT8 layers' fp32 scales with the
other floating parameters it all-gathers).  Their LR schedule is GaLore's warmup + cosine as a
``LambdaLR`` on the optimizer, stepped after each optimizer step as DeepSpeed does, and saved
in the checkpoint's client state.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..core import Int8Linear, prepare_model
from ..distributed import Collectives
from ..integrations.deepspeed import (
    QGaLoreEntry,
    galore_params,
    int8_names,
    matrix_ranks,
    parse_optimizer_entry,
)
from ..optim import QGaLoreAdamW8bit
from .parallel import ParallelDims
from .schedule import warmup_cosine

__all__ = ["DDPEngine", "DeepSpeedEngine", "FSDP2Engine", "PlainSettings", "build_engine", "lr_lambda",
           "plain_settings"]


def lr_lambda(cfg):
    """GaLore's warmup + cosine multiplier of the peak LR, by 0-based optimizer step."""
    return partial(warmup_cosine, total_steps=cfg.schedule.steps, warmup_steps=cfg.schedule.warmup_steps,
                   min_lr_ratio=cfg.schedule.min_lr_ratio)


def _hf_state(model: nn.Module, tensors: dict[str, torch.Tensor], weight_of) -> dict[str, torch.Tensor]:
    """An ordinary HF state dict in fp32: INT8 layers become ``weight`` (``weight_of(name,
    layer)``, dequantized) and ``bias``; every other tensor of ``tensors`` is copied."""
    int8 = {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear)}
    state = {name: t.detach().float().clone().contiguous() for name, t in tensors.items()
             if name.rpartition(".")[0] not in int8}
    for name, m in int8.items():
        state[f"{name}.weight"] = weight_of(name, m).contiguous()
        if m.bias is not None:
            state[f"{name}.bias"] = tensors[f"{name}.bias"].detach().float().clone()
    return state


def _write_hf(model: nn.Module, state: dict[str, torch.Tensor], tokenizer, out_dir: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    model.config.save_pretrained(out_dir)
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(out_dir)


class DeepSpeedEngine:
    """``qgalore_dist.initialize`` (module doc); DeepSpeed steps at the boundary inside
    ``engine.step()``, which :meth:`micro_step` calls after every micro-batch."""

    name = "deepspeed"

    def __init__(self, cfg, ds_config: dict, model: nn.Module) -> None:
        from .. import initialize
        from .dense_comm import engine_dense_bytes

        self.engine, _, _, _ = initialize(model=model, config=ds_config, lr_scheduler=self._scheduler(cfg, ds_config))
        self.module, self.model, self.qgalore = self.engine, self.engine.module, self.engine.qgalore
        self.micro_batch = self.engine.train_micro_batch_size_per_gpu()
        self.accumulation = self.engine.gradient_accumulation_steps()
        self.device = torch.device(self.engine.device)
        int8 = {id(p) for p in self.qgalore.galore_params}
        self.dense_numel = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if id(p) not in int8)
        self.dense_bytes = engine_dense_bytes(self.engine, self.dense_numel, self.qgalore.comm.world_size)
        """DeepSpeed's own traffic for the dense parameters per step (closed form, :mod:`.dense_comm`)."""

    @staticmethod
    def _scheduler(cfg, ds_config: dict):
        """The schedule as a LambdaLR that DeepSpeed steps at each boundary, unless the
        ds_config brings its own ``scheduler`` (which then wins)."""
        if "scheduler" in ds_config:
            return None
        return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))

    def autocast(self):
        return contextlib.nullcontext()  # DeepSpeed's bf16 casts the module itself

    def micro_step(self, ids: torch.Tensor, *, last: bool) -> float:
        ids = ids.to(self.device)
        loss = self.engine(input_ids=ids, labels=ids).loss  # packed batches: equal token counts
        self.engine.backward(loss)
        self.engine.step()
        return float(loss.detach())

    def step(self) -> None:
        pass  # DeepSpeed's engine.step() in micro_step already stepped at the boundary

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def comm_bytes(self) -> dict[str, float]:
        return self.qgalore.last_step_bytes()

    def describe(self) -> str:  # the header's words since before --engine existed
        return (f"ZeRO stage {self.engine.zero_optimization_stage()}, "
                f"{'bf16' if self.engine.bfloat16_enabled() else 'fp32'}")

    def save(self, ckpt_dir: str, tag: str, client_state: dict) -> str:
        from ..checkpoint import save_checkpoint

        return save_checkpoint(self.engine, ckpt_dir, tag=tag, client_state=client_state)

    def load(self, ckpt_dir: str, tag: str) -> dict | None:
        from ..checkpoint import load_checkpoint

        return load_checkpoint(self.engine, ckpt_dir, tag=tag, missing_ok=True)

    def check(self) -> str:
        self.qgalore.check_replicas()
        return "replicas identical"

    def export(self, out_dir: str, tokenizer, rank: int) -> None:
        """Collective (ZeRO-3 gathers the dense parameters); rank 0 writes."""
        gather = contextlib.nullcontext()
        if self.engine.zero_optimization_stage() == 3:  # dense parameters are partitioned: gather them all
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([p for p in self.model.parameters() if hasattr(p, "ds_id")])
        with gather:
            if rank != 0:
                return
            state = _hf_state(self.model, self.model.state_dict(), lambda _, m: m.dequantized_weight(torch.float32))
            _write_hf(self.model, state, tokenizer, out_dir)


@dataclass(kw_only=True, frozen=True)
class PlainSettings:
    """What ``--engine fsdp2`` / ``ddp`` take from the ds_config (module doc)."""

    entry: QGaLoreEntry
    """The ``QGaLoreAdamW8bit`` optimizer entry (``max_grad_norm`` from ``gradient_clipping``)."""
    micro_batch: int
    """Sequences per rank and micro-batch (``train_micro_batch_size_per_gpu``)."""
    accumulation: int
    """Micro-batches per optimizer step (``gradient_accumulation_steps``)."""
    bf16: bool
    """Forward and backward under bf16 autocast (``bf16.enabled``)."""


def _positive_int(ds_config: dict, key: str, default: int | None) -> int | None:
    value = ds_config.get(key, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"ds_config {key} must be an integer >= 1, got {value!r}")
    return value


def plain_settings(ds_config: dict, world_size: int, engine: str) -> PlainSettings:
    """The :class:`PlainSettings` of ``ds_config``; ``ValueError`` naming the key for a value
    ``engine`` cannot run (keys it ignores were refused by ``check_engine_ds_config``)."""
    entry = parse_optimizer_entry(ds_config)
    assert entry is not None, "check_engine_ds_config refuses other optimizers"
    if entry.int8_partition:
        raise ValueError(f"ds_config optimizer.params.int8_partition is DeepSpeed ZeRO-3's; under --engine {engine} "
                         "the INT8 rows are " + ("sharded by FSDP2" if engine == "fsdp2" else "replicated"))
    accumulation = _positive_int(ds_config, "gradient_accumulation_steps", 1)
    micro = _positive_int(ds_config, "train_micro_batch_size_per_gpu", None)
    total = _positive_int(ds_config, "train_batch_size", None)
    if micro is None and total is None:
        raise ValueError("ds_config needs train_micro_batch_size_per_gpu (or train_batch_size)")
    if micro is None:
        micro = total // (accumulation * world_size)
    if micro < 1 or (total is not None and total != micro * accumulation * world_size):
        raise ValueError(f"ds_config train_batch_size {total} must equal train_micro_batch_size_per_gpu {micro} x "
                         f"gradient_accumulation_steps {accumulation} x world size {world_size}")
    bf16 = bool((ds_config.get("bf16") or {}).get("enabled", False))
    return PlainSettings(entry=entry, micro_batch=micro, accumulation=accumulation, bf16=bf16)


def _device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _broadcast_from_rank0(model: nn.Module) -> None:
    """Every rank starts from rank 0's weights, as torch DDP does at wrap time (a seeded model
    is identical anyway; a loaded one could differ if the files changed under a running job)."""
    if dist.get_world_size() > 1:
        with torch.no_grad():
            for t in model.state_dict().values():
                dist.broadcast(t, 0)


def _param_groups(model: nn.Module, entry: QGaLoreEntry, ranks: dict[str, int]) -> list[dict]:
    """The INT8 weights (one group per ``rank_overrides`` rank) and the dense trainables."""
    galore = galore_params(model, entry, ranks)
    groups = galore if galore and isinstance(galore[0], dict) else [{"params": galore}]
    dense = [p for p in model.parameters() if p.requires_grad and p.is_floating_point()]
    return groups + ([{"params": dense}] if dense else [])


class _PlainEngine:
    """What FSDP2 and DDP share: the model prepared here, the optimizer stepped by the loop,
    the LambdaLR schedule, checkpoints of ``(model, optimizer)``."""

    name = ""

    def __init__(self, cfg, ds_config: dict, model: nn.Module) -> None:
        world = dist.get_world_size()
        self.settings = plain_settings(ds_config, world, self.name)
        entry = self.settings.entry
        self.micro_batch, self.accumulation = self.settings.micro_batch, self.settings.accumulation
        self.dense_bytes = 0.0
        ranks = matrix_ranks(model, entry)  # before any collective: every rank raises alike
        self.device = _device()
        model.to(self.device)
        _broadcast_from_rank0(model)
        prepare_model(model, target_modules=entry.target_modules, group_size=entry.weight_group_size)
        self.model = self.module = model
        self.qgalore = self._build(cfg, model, entry, ranks)
        # Every step is exactly this many backward passes: refresh SVDs run as the last completes.
        self.qgalore.set_gradient_accumulation_steps(self.accumulation)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.qgalore, lr_lambda(cfg))

    def _build(self, cfg, model: nn.Module, entry: QGaLoreEntry, ranks: dict[str, int]) -> QGaLoreAdamW8bit:
        raise NotImplementedError

    def autocast(self):
        """bf16 autocast around forward when the ds_config enables bf16 (module doc)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.settings.bf16)

    def precision(self) -> str:
        return "bf16 autocast" if self.settings.bf16 else "fp32"

    def micro_step(self, ids: torch.Tensor, *, last: bool) -> float:
        """Forward and backward of one micro-batch; all but the last of a step exchange
        nothing (``no_sync``: the streamed refresh and overlapped reduces wait for the last)."""
        ids = ids.to(self.device)
        with contextlib.nullcontext() if last else self.qgalore.no_sync():
            with self.autocast():
                loss = self.module(input_ids=ids, labels=ids).loss  # packed batches: equal token counts
            (loss / self.accumulation).backward()
        return float(loss.detach())

    def step(self) -> None:
        self.qgalore.step()
        self.qgalore.zero_grad()
        self.scheduler.step()  # after the optimizer, as DeepSpeed steps it: lr() is the next step's

    def lr(self) -> float:
        return float(self.qgalore.param_groups[0]["lr"])

    def comm_bytes(self) -> dict[str, float]:
        return self.qgalore.last_step_bytes()

    def save(self, ckpt_dir: str, tag: str, client_state: dict) -> str:
        from ..checkpoint import save_checkpoint

        state = {**client_state, "lr_scheduler": self.scheduler.state_dict()}
        return save_checkpoint((self.model, self.qgalore), ckpt_dir, tag=tag, client_state=state)

    def load(self, ckpt_dir: str, tag: str) -> dict | None:
        from ..checkpoint import load_checkpoint

        client = load_checkpoint((self.model, self.qgalore), ckpt_dir, tag=tag, missing_ok=True)
        if client and "lr_scheduler" in client:
            self.scheduler.load_state_dict(client["lr_scheduler"])
            # load_state_dict restores the counter, not the groups' lr (until the next step):
            # put the saved LRs back, or the first resumed step would train with the wrong one.
            for group, lr in zip(self.qgalore.param_groups, self.scheduler.get_last_lr()):
                group["lr"] = float(lr)
        return client


class DDPEngine(_PlainEngine):
    """Plain data parallel (module doc): every rank holds the whole model; the optimizer
    reduces low-rank gradients to their owners and dense gradients likewise."""

    name = "ddp"

    def _build(self, cfg, model: nn.Module, entry: QGaLoreEntry, ranks: dict[str, int]) -> QGaLoreAdamW8bit:
        return QGaLoreAdamW8bit(_param_groups(model, entry, ranks), entry.config, names=int8_names(model),
                                collectives=Collectives())

    def describe(self) -> str:
        return f"engine ddp (QGaLoreAdamW8bit's own exchange), {self.precision()}"

    def check(self) -> str:
        self.qgalore.check_replicas()
        return "replicas identical"

    def export(self, out_dir: str, tokenizer, rank: int) -> None:
        if rank == 0:
            state = _hf_state(self.model, self.model.state_dict(), lambda _, m: m.dequantized_weight(torch.float32))
            _write_hf(self.model, state, tokenizer, out_dir)


class FSDP2Engine(_PlainEngine):
    """FSDP2 / HSDP on the mesh of :class:`ParallelDims` (module doc)."""

    name = "fsdp2"

    def _build(self, cfg, model: nn.Module, entry: QGaLoreEntry, ranks: dict[str, int]) -> QGaLoreAdamW8bit:
        from ..integrations.fsdp import FSDPQGaLoreAdamW8bit, shard_model

        self.dims = ParallelDims(dp_replicate=cfg.parallel.dp_replicate, dp_shard=cfg.parallel.dp_shard,
                                 world_size=dist.get_world_size())
        mesh = self.dims.build_mesh(self.device.type)
        shard_model(model, mesh)
        return FSDPQGaLoreAdamW8bit(_param_groups(model, entry, ranks), entry.config, mesh=mesh,
                                    names=int8_names(model))

    def describe(self) -> str:
        return f"engine fsdp2 on {self.dims.describe()} (right-projected row shards), {self.precision()}"

    def check(self) -> str:
        self.qgalore.check_replicas()
        layers = self.qgalore.check_shards()
        return f"replicas identical, row shards of {layers} INT8 weights checked"

    def export(self, out_dir: str, tokenizer, rank: int) -> None:
        """Collective: FSDP2 gathers the full state dict to rank 0 (on the CPU), which writes."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from ..quant import dequantize

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank != 0:
            return

        def weight_of(name: str, m: Int8Linear) -> torch.Tensor:
            return dequantize(full[f"{name}.weight"], full[f"{name}.weight_scales"], full[f"{name}.weight_zeros"],
                              group_size=m.group_size, dtype=torch.float32, row_length=m.row_length)

        _write_hf(self.model, _hf_state(self.model, full, weight_of), tokenizer, out_dir)


_ENGINES = {"deepspeed": DeepSpeedEngine, "fsdp2": FSDP2Engine, "ddp": DDPEngine}


def build_engine(cfg, ds_config: dict, model: nn.Module) -> Any:
    """Collective: the engine ``cfg.engine`` names, around ``model`` (converted in place)."""
    return _ENGINES[cfg.engine](cfg, ds_config, model)
