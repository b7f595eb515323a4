"""Hugging Face ``Trainer`` integration: :class:`QGaLoreTrainer` trains with Q-GaLore under
DeepSpeed, configured by the same ds_config entry as :func:`qgalore_dist.initialize`::

    args = TrainingArguments(output_dir, deepspeed="ds_config.json", bf16=True, ...)
    trainer = QGaLoreTrainer(model=model, args=args, train_dataset=ds)  # converts the model
    trainer.train()
    trainer.qgalore.check_replicas()   # the QGaLoreAdamW8bit of the INT8 layers

where ``ds_config.json`` holds ``"optimizer": {"type": "QGaLoreAdamW8bit", "params": {...}}``.

How Trainer's DeepSpeed path is steered (transformers ``integrations/deepspeed.py``
``deepspeed_optim_sched`` and accelerate ``Accelerator._prepare_deepspeed``):

* ``TrainingArguments`` has already resolved the ``"auto"`` values of the ds_config
  (``optimizer.params.lr/betas/eps/weight_decay`` from ``learning_rate``, ``adam_beta1/2``,
  ``adam_epsilon``, ``weight_decay``; ``gradient_clipping`` from ``max_grad_norm``); explicit
  values must match those arguments, as with any optimizer under HF + DeepSpeed.
* In ``__init__`` the entry is parsed (:func:`parse_optimizer_entry`), the ``target_modules``
  become :class:`~qgalore_dist.core.Int8Linear` (broadcast from rank 0), and the entry is taken
  out of the config Trainer hands to DeepSpeed.  With no ``optimizer`` in the config
  ``deepspeed_optim_sched`` calls :meth:`create_optimizer` (ours: an :class:`EngineOptimizer`
  over the dense parameters carrying a :class:`QGaLoreAdamW8bit` over the INT8 weights) and
  sets ``zero_allow_untested_optimizer``.
* Gradient clipping: the resolved ``gradient_clipping`` (``"auto"`` -> ``args.max_grad_norm``)
  is the package's *joint* clipping norm over dense and low-rank GaLore gradients; DeepSpeed
  sees ``gradient_clipping: 0.0`` (its default for an absent key is 1.0, which would clip the
  dense gradients a second time).  Without a ``gradient_clipping`` key nothing is clipped,
  as with plain HF + DeepSpeed (accelerate fills the key only when it says ``"auto"``).
  Trainer's ``grad_norm`` log entry is the joint pre-clipping norm.
* Trainer's lr scheduler drives the dense groups' ``lr``; the GaLore groups follow it
  (``EngineOptimizer._sync_lr``).  Weight decay applies to every dense tensor, as with
  ``qgalore_dist.initialize`` (no HF bias/norm exclusion).
* ``on_train_begin`` (a callback) attaches the optimizer to the engine
  (``trainer.model_wrapped``) and sets ``engine.qgalore`` / ``engine.qgalore_entry``.

Not covered: Trainer checkpoints (``save_strategy``) go through DeepSpeed's
``save_checkpoint`` only, which does not hold the GaLore state (projectors, low-rank
moments); use :mod:`qgalore_dist.checkpoint` with ``trainer.model_wrapped``.
"""

from __future__ import annotations

import logging
import os
import weakref

from transformers import Trainer, TrainerCallback

from ..core import prepare_model
from ..distributed import Collectives
from ..optim import QGaLoreAdamW8bit
from .deepspeed import (
    OPTIMIZER_TYPE,
    EngineOptimizer,
    _broadcast_int8_layers,
    _engine_config,
    _hide_int8_weights,
    _trainable_params,
    galore_optimizer,
    int8_names,
    int8_partitioned,
    matrix_ranks,
    parse_optimizer_entry,
    place_int8_weights,
)

__all__ = ["QGaLoreTrainer", "configure_cpu_deepspeed"]

logger = logging.getLogger(__name__)


def configure_cpu_deepspeed(backend: str = "gloo"):
    """CPU-only hosts (no CUDA/XPU/...): call before ``TrainingArguments`` and pass
    ``accelerator_config={"use_configured_state": True}`` to it.

    Without it accelerate (``PartialState._prepare_backend``, state.py) finds no backend for a
    DeepSpeed run without an accelerator device, leaves ``backend=None`` and so sets
    ``num_processes=1, process_index=0`` on every rank: DeepSpeed still runs on all ranks, but
    Trainer neither shards the data (every rank trains on the same batches) nor keeps logging
    and saving to rank 0.  This builds the shared state with ``backend`` instead (the process
    group is created by ``deepspeed.init_distributed``), so it knows the world size and rank.
    Returns the ``accelerate.PartialState``."""
    from accelerate import PartialState

    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # read by PartialState.__init__
    try:
        return PartialState(backend=backend)
    finally:
        if previous is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous


class _AttachToEngine(TrainerCallback):
    """Once Trainer has built the DeepSpeed engine: ``EngineOptimizer.attach(engine)``."""

    def __init__(self, trainer: "QGaLoreTrainer") -> None:
        self._trainer = weakref.ref(trainer)

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if trainer is not None:
            trainer._attach_engine()


class QGaLoreTrainer(Trainer):
    """``transformers.Trainer`` whose DeepSpeed engine trains with ``QGaLoreAdamW8bit``, read
    from the ds_config's ``optimizer`` entry (``TrainingArguments(deepspeed=...)``).

    The model is converted in place in ``__init__`` (``target_modules`` -> ``Int8Linear``).
    After ``train()`` started, ``trainer.qgalore`` is the :class:`QGaLoreAdamW8bit` of the
    INT8 layers and ``trainer.model_wrapped`` the DeepSpeed engine (with ``engine.qgalore``).
    """

    def __init__(self, model=None, args=None, *posargs, **kwargs):
        if model is None or kwargs.get("model_init") is not None:
            raise ValueError("QGaLoreTrainer needs model= (model_init is not supported: the model is converted "
                             "to INT8 GaLore layers once, in __init__)")
        if kwargs.get("optimizers", (None, None))[0] is not None or kwargs.get("optimizer_cls_and_kwargs"):
            raise ValueError("QGaLoreTrainer builds its optimizer from the ds_config entry; do not pass optimizers=")
        super().__init__(model, args, *posargs, **kwargs)
        if not self.is_deepspeed_enabled:
            raise ValueError(f"QGaLoreTrainer needs DeepSpeed: TrainingArguments(deepspeed=<ds_config with an "
                             f"optimizer of type {OPTIMIZER_TYPE!r}>)")
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_initialized() else 1
        if self.accelerator.num_processes != world:
            raise RuntimeError(
                f"QGaLoreTrainer: accelerate sees {self.accelerator.num_processes} process(es) but the process group "
                f"has {world}: Trainer would not shard the data.  On a CPU-only host call "
                f"qgalore_dist.integrations.hf.configure_cpu_deepspeed() before TrainingArguments(..., "
                f"accelerator_config={{'use_configured_state': True}})")
        plugin = self.accelerator.state.deepspeed_plugin
        ds_config = plugin.hf_ds_config.config  # what deepspeed_init and _prepare_deepspeed read
        entry = parse_optimizer_entry(ds_config)
        if entry is None:
            raise ValueError(f"QGaLoreTrainer: the ds_config optimizer must be of type {OPTIMIZER_TYPE!r}, "
                             f"got {ds_config.get('optimizer')!r}")
        engine_config = _engine_config(ds_config, entry)  # validates fp16 / buffer_dtype
        engine_config["gradient_clipping"] = 0.0  # ours is joint; DeepSpeed's default would be 1.0
        for config in {id(c): c for c in (ds_config, plugin.deepspeed_config)}.values():
            config.clear()  # in place: Trainer, accelerate and the plugin share this dict
            config.update(engine_config)
        self.qgalore_entry = entry
        self.qgalore_stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
        self.qgalore: QGaLoreAdamW8bit | None = None
        """The optimizer of the INT8 layers (built by :meth:`create_optimizer`)."""

        partition = int8_partitioned(entry, self.qgalore_stage)  # ZeRO-3: rows partitioned (.zero3)
        model = self.model
        ranks = matrix_ranks(model, entry)
        prepare_model(model, target_modules=entry.target_modules, group_size=entry.weight_group_size)
        self._qgalore_ranks = ranks
        self._qgalore_comm = Collectives()
        _broadcast_int8_layers(model, self._qgalore_comm)
        self._qgalore_layout, self._qgalore_int8_line = place_int8_weights(model, self._qgalore_comm, ds_config,
                                                                           partition)
        self._qgalore_names = int8_names(model)
        if self.qgalore_stage == 3:
            _hide_int8_weights(model)
        self.add_callback(_AttachToEngine(self))

    def create_optimizer(self, model=None):
        """Called by ``deepspeed_optim_sched`` (the ds_config has no optimizer entry any more):
        an :class:`EngineOptimizer` over the dense parameters with a fresh
        :class:`QGaLoreAdamW8bit` over the INT8 weights."""
        if self.optimizer is None:
            model = self.model if model is None else model
            galore = galore_optimizer(model, self.qgalore_entry, self._qgalore_comm, self._qgalore_layout,
                                      self._qgalore_names, self._qgalore_ranks)
            dense = _trainable_params(model, None)
            self.optimizer = EngineOptimizer(dense, galore, grads_partitioned=self.qgalore_stage >= 1)
            self.qgalore = galore
            logger.info("qgalore-dist: %d INT8 GaLore matrices owned by the package, %d dense tensors by ZeRO "
                        "stage %d\n%s\n%s", len(galore.galore_params), len(dense), self.qgalore_stage,
                        self._qgalore_int8_line, galore.plan.describe())
        return self.optimizer

    def _attach_engine(self) -> None:
        engine = self.model_wrapped
        basic = getattr(engine, "basic_optimizer", None)
        if not isinstance(basic, EngineOptimizer):
            raise RuntimeError(f"QGaLoreTrainer: the DeepSpeed engine's client optimizer is "
                               f"{type(basic).__name__}, not the EngineOptimizer of create_optimizer()")
        basic.attach(engine)
        engine.qgalore = basic.galore
        engine.qgalore_entry = self.qgalore_entry

    def _get_grad_norm(self, model, grad_norm=None):
        """Trainer logs ``grad_norm``: the joint (dense + GaLore) pre-clipping norm when the
        package clips, else DeepSpeed's dense-only norm."""
        if self.qgalore is not None and self.qgalore.last_grad_norm is not None:
            return self.qgalore.last_grad_norm
        return super()._get_grad_norm(model, grad_norm=grad_norm)
