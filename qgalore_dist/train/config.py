"""The training configuration of ``qgalore-train``: typed sections, loaded from YAML or JSON,
overridden from the command line, rejected with the nearest valid name when a key is wrong.

    qgalore-train --config run.yaml --optim.rank 256 --schedule.steps 2000 --data.source c4

A run reads two files: this training config (model, data, schedule, evaluation, checkpoints,
logging, and ``optim`` overrides of the optimizer entry) and a ds_config (batch sizes, ZeRO
stage, precision, clipping, the ``QGaLoreAdamW8bit`` entry).  Either may be omitted: the
built-in defaults train a tiny LLaMA on built-in English text.  ``--ds.<key> value`` overrides
ds_config keys (``--ds.zero_optimization.stage 3``); DeepSpeed validates those itself.

``--engine`` picks what trains the model: ``deepspeed`` (default), ``fsdp2`` (PyTorch FSDP2 /
HSDP over the mesh ``--parallel.dp_replicate R --parallel.dp_shard S``) or ``ddp`` (plain data
parallel by the optimizer's own exchange).  The last two read only the ds_config keys in
:data:`ENGINE_DS_KEYS` and refuse the others (:func:`check_engine_ds_config`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..integrations.deepspeed import OPTIMIZER_TYPE, allowed_params, load_ds_config
from .data import DataConfig

__all__ = ["DEFAULT_DS_CONFIG", "ENGINES", "ENGINE_DS_KEYS", "CheckpointConfig", "DistConfig", "EvalConfig",
           "LoggingConfig", "ModelConfig", "ParallelConfig", "ScheduleConfig", "TrainConfig", "check_engine_ds_config",
           "field_docs", "help_text", "parse_args"]

DEFAULT_DS_CONFIG: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "bf16": {"enabled": True},
    "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
    "optimizer": {"type": OPTIMIZER_TYPE, "params": {
        "lr": 0.01, "betas": [0.9, 0.95], "weight_decay": 0.0, "rank": 32, "update_proj_gap": 50,
        "scale": 0.25, "proj_bits": 4, "weight_bits": 8}},
    "steps_per_print": 10**9,
}
"""The ds_config used when none is given: ZeRO-2, bf16, Q-GaLore with INT4 projectors and INT8
weights, sized for the built-in tiny model (rank 32 of hidden size 128).  Under ``--engine fsdp2``
or ``ddp`` the same without ``zero_optimization``."""

ENGINES = ("deepspeed", "fsdp2", "ddp")
"""The values of ``--engine``."""

ENGINE_DS_KEYS = ("optimizer", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
                  "bf16", "train_batch_size", "steps_per_print", "wall_clock_breakdown")
"""The ds_config keys ``--engine fsdp2`` / ``ddp`` read (the last two are DeepSpeed's logging,
harmless and ignored; ``train_batch_size`` must then equal micro batch x accumulation x world
size, checked once the world size is known).  ``zero_optimization`` with stage 0 and ``fp16``
with ``enabled: false`` are accepted as saying nothing; any other key is refused, named."""


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "tiny"
    """``tiny`` (a built-in 1M-parameter LLaMA), one of ``llama_9m`` ... ``llama_7b`` (GaLore's
    configs), a path to a LlamaConfig JSON (trained from scratch), or a local HF model directory
    (fine-tuning: its weights are loaded)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward (HF gradient checkpointing)."""


@dataclass(kw_only=True)
class ScheduleConfig:
    steps: int = 300
    """Optimizer steps to train to (a resumed run continues up to this number)."""
    warmup_steps: int = 30
    """Linear warmup from 0 to the peak LR (the ds_config optimizer lr) over this many steps."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at this fraction of the peak LR at ``steps`` (GaLore's 10%)."""


@dataclass(kw_only=True)
class EvalConfig:
    every: int = 50
    """Evaluate on the held-out split every this many steps and at the end (0: only at the end)."""


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 100
    """Save every this many steps (0: only at the end and on SIGTERM/SIGINT)."""
    keep: int = 2
    """Checkpoints kept in ``<run_dir>/checkpoints``; older ones are deleted after a good save."""
    resume: bool = True
    """Resume from the newest checkpoint in ``<run_dir>/checkpoints`` that verifies."""


@dataclass(kw_only=True)
class LoggingConfig:
    every: int = 10
    """Print a log line (and the progress bar postfix) every this many steps."""
    progress: bool = True
    """Show a progress bar on rank 0 when stdout is a terminal."""
    tensorboard: bool = True
    """Write TensorBoard event files under ``<run_dir>/tb``."""
    plots: bool = True
    """Write PNG plots (``qgalore-plot``) into ``<run_dir>/plots`` at the end."""


@dataclass(kw_only=True)
class DistConfig:
    timeout_s: float | None = None
    """Timeout in seconds of every collective of every process group the run creates (the world
    group and DeepSpeed's ZeRO groups alike): a stuck or dead peer makes the others fail within it,
    naming the operation, instead of hanging for torch's default 30 minutes.  None: the launcher's
    ``DEEPSPEED_TIMEOUT`` (minutes, as DeepSpeed reads it) when set, else 600 s."""


@dataclass(kw_only=True)
class ParallelConfig:
    dp_replicate: int = 1
    """``--engine fsdp2``: replicas of the model (HSDP's replicate dim of the 2-D device mesh;
    1: plain FSDP2 on a 1-D mesh).  -1: the world size over ``dp_shard``."""
    dp_shard: int = -1
    """``--engine fsdp2``: ranks each model replica is sharded over (FSDP2's ``Shard(0)`` dim).
    -1: the rest, world size over ``dp_replicate``.  ``dp_replicate x dp_shard`` must equal
    the world size."""


@dataclass(kw_only=True)
class TrainConfig:
    run_dir: str = "runs/qgalore"
    """Where the resolved configs, metrics, checkpoints, tokenizer, plots and final model go."""
    ds_config: str | None = None
    """Path of the ds_config JSON (None: the built-in ``DEFAULT_DS_CONFIG``)."""
    seed: int = 0
    """Seed of the model initialization and the data order."""
    engine: str = "deepspeed"
    """What trains the model: ``deepspeed`` (``qgalore_dist.initialize``, ZeRO 0-3 from the
    ds_config), ``fsdp2`` (FSDP2 / HSDP, ``FSDPQGaLoreAdamW8bit``; mesh from ``parallel``) or
    ``ddp`` (``QGaLoreAdamW8bit`` reduces every gradient itself; also one process)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    optim: dict[str, Any] = field(default_factory=dict)
    """Overrides of the ds_config ``QGaLoreAdamW8bit`` params (``--optim.rank 256``)."""

    def validate(self) -> None:
        """``ValueError`` naming the field for a value out of range."""
        checks = [("schedule.steps", self.schedule.steps, 1), ("schedule.warmup_steps", self.schedule.warmup_steps, 0),
                  ("eval.every", self.eval.every, 0), ("checkpoint.every", self.checkpoint.every, 0),
                  ("checkpoint.keep", self.checkpoint.keep, 1), ("logging.every", self.logging.every, 1)]
        for name, value, low in checks:
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {list(ENGINES)}, got {self.engine!r}")
        self._validate_parallel()
        if self.dist.timeout_s is not None and not self.dist.timeout_s > 0:
            raise ValueError(f"dist.timeout_s must be a number of seconds > 0, got {self.dist.timeout_s!r}")
        if not 0.0 <= self.schedule.min_lr_ratio <= 1.0:
            raise ValueError(f"schedule.min_lr_ratio must be in [0, 1], got {self.schedule.min_lr_ratio!r}")
        if self.ds_config is not None and not os.path.isfile(self.ds_config):
            raise ValueError(f"ds_config: file {self.ds_config!r} does not exist")
        if hasattr(self.data, "validate"):
            self.data.validate()

    def _validate_parallel(self) -> None:
        # Ranges and the product with the world size: ParallelDims (train/parallel.py), in main().
        dims = self.parallel
        if self.engine != "fsdp2" and (dims.dp_replicate, dims.dp_shard) != (1, -1):
            raise ValueError(f"parallel.dp_replicate / parallel.dp_shard shape FSDP2's device mesh; with "
                             f"engine {self.engine!r} leave them unset (got {dims.dp_replicate} x {dims.dp_shard})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass whose fields carry attribute docstrings (the string
    literal right after each annotated field), read from its source."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (frozen app): keys and defaults only
        return {}
    body, docs = tree.body[0].body, {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def help_text() -> str:
    """Every ``--section.key`` with its default and docstring, for ``qgalore-train --help``."""
    import textwrap

    lines = []

    def walk(section: Any, prefix: str) -> None:
        docs = field_docs(type(section))
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                lines.append(f"\n{prefix}{f.name}:")
                walk(value, f"{prefix}{f.name}.")
                continue
            lines.append(f"  --{prefix}{f.name} (default {value!r})")
            if docs.get(f.name):
                lines.append(textwrap.fill(docs[f.name], width=100, initial_indent="      ",
                                           subsequent_indent="      "))

    walk(TrainConfig(), "")
    lines.append(f"\n  --optim.<key>: any {OPTIMIZER_TYPE} ds_config param: {', '.join(allowed_params())}")
    lines.append("  --ds.<key>[.<sub>] VALUE: any ds_config key (e.g. --ds.zero_optimization.stage 3)")
    return "\n".join(lines)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _nearest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}? " if close else ""


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """``value`` as the field type ``tp`` (CLI values arrive as YAML scalars), or ValueError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise ValueError(f"{path} must be of type {getattr(tp, '__name__', tp)}, got {value!r}")


def _apply(section: Any, values: dict[str, Any], prefix: str) -> None:
    """Set ``values`` (nested dicts) on the dataclass ``section``; unknown keys raise."""
    hints = typing.get_type_hints(type(section))
    valid = [f.name for f in dataclasses.fields(section)]
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in valid:
            raise ValueError(f"unknown config key {path!r}; {_nearest(key, valid)}valid keys here: {valid}")
        if prefix == "" and key == "optim":
            _check_optim_keys(value)
            section.optim.update(value)
        elif _is_section(hints[key]):
            if not isinstance(value, dict):
                raise ValueError(f"{path} is a section: expected a mapping of its keys, got {value!r}")
            _apply(getattr(section, key), value, f"{path}.")
        else:
            setattr(section, key, _coerce(path, value, hints[key]))


def _check_optim_keys(values: Any) -> None:
    if not isinstance(values, dict):
        raise ValueError(f"optim must be a mapping of {OPTIMIZER_TYPE} params, got {values!r}")
    valid = allowed_params()
    for key in values:
        if key not in valid:
            raise ValueError(f"unknown config key 'optim.{key}'; {_nearest(key, valid)}valid keys: {valid}")


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _read_mapping(path: str, what: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ValueError(f"{what}: file {path!r} does not exist")
    is_yaml = path.endswith((".yaml", ".yml"))
    with open(path) as f:
        try:
            data = yaml.safe_load(f) if is_yaml else json.load(f)
        except (yaml.YAMLError, json.JSONDecodeError) as exc:
            raise ValueError(f"{what}: {path!r} is not valid {'YAML' if is_yaml else 'JSON'}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {path!r} must hold a mapping at the top level")
    return data


def _split_argv(argv: list[str]) -> list[tuple[str, str]]:
    """``--a.b value`` / ``--a.b=value`` pairs; a bare ``--flag`` means ``true``."""
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(f"unexpected argument {arg!r}: options look like --section.key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = "true"
        pairs.append((key, value))
        i += 1
    return pairs


_ALIASES = {"deepspeed_config": "ds_config", "deepspeed-config": "ds_config", "ds-config": "ds_config",
            "run-dir": "run_dir"}


def parse_args(argv: list[str]) -> tuple[TrainConfig, dict[str, Any]]:
    """The resolved training config and ds_config from the command line:
    ``[--config FILE] [--ds_config FILE] [--section.key VALUE ...] [--ds.key.sub VALUE ...]``.
    Precedence: built-in defaults < the config file < command-line overrides."""
    pairs = [(_ALIASES.get(k, k), v) for k, v in _split_argv(argv)]
    pairs = [(k, v) for k, v in pairs if k not in ("local_rank", "local-rank", "deepspeed")]  # from launchers
    cfg = TrainConfig()
    file_values = {}
    for key, value in pairs:
        if key == "config":
            file_values = _read_mapping(value, "--config")
    _apply(cfg, file_values, "")
    ds_overrides = []
    for key, value in pairs:
        if key == "config":
            continue
        parsed = yaml.safe_load(value) if value != "" else ""
        if key.startswith("ds."):
            ds_overrides.append((key[3:], parsed))
        else:
            _apply(cfg, _nest(key, parsed), "")
    cfg.validate()
    ds_config = load_ds_config(cfg.ds_config) if cfg.ds_config else copy.deepcopy(DEFAULT_DS_CONFIG)
    if cfg.ds_config is None and cfg.engine != "deepspeed":
        del ds_config["zero_optimization"]  # the built-in default's, not the user's: DeepSpeed only
    for key, value in ds_overrides:
        _set_nested(ds_config, key, value)
    if cfg.optim:
        entry = ds_config.get("optimizer") or {}
        if entry.get("type") != OPTIMIZER_TYPE:
            raise ValueError(f"optim overrides need a ds_config optimizer of type {OPTIMIZER_TYPE!r}, "
                             f"got {entry.get('type')!r}")
        entry.setdefault("params", {}).update(cfg.optim)
    check_engine_ds_config(cfg.engine, ds_config)
    return cfg, ds_config


def check_engine_ds_config(engine: str, ds_config: dict[str, Any]) -> None:
    """``ValueError`` naming the first ds_config key that ``engine`` (fsdp2, ddp) would not
    honour: anything outside :data:`ENGINE_DS_KEYS` (a ZeRO stage, DeepSpeed's ``scheduler``,
    ``fp16``, ...), and an optimizer that is not ``QGaLoreAdamW8bit``.  DeepSpeed checks its own."""
    if engine == "deepspeed":
        return
    for key, value in ds_config.items():
        if key in ENGINE_DS_KEYS:
            continue
        if key == "zero_optimization" and isinstance(value, dict) and int(value.get("stage", 0)) == 0:
            continue  # ZeRO stage 0 is plain data parallel: what --engine ddp does
        if key == "fp16" and isinstance(value, dict) and not value.get("enabled", False):
            continue
        where = f"ds_config key {key!r}"
        if key == "zero_optimization":
            where = f"ds_config zero_optimization.stage {value.get('stage') if isinstance(value, dict) else value!r}"
        raise ValueError(f"{where} has no meaning under --engine {engine} (it reads only {list(ENGINE_DS_KEYS)}"
                         f"{'; FSDP2 shards by --parallel.dp_shard' if key == 'zero_optimization' else ''}); "
                         f"remove it or use --engine deepspeed")
    entry = ds_config.get("optimizer") or {}
    if entry.get("type") != OPTIMIZER_TYPE:
        raise ValueError(f"ds_config optimizer.type must be {OPTIMIZER_TYPE!r} under --engine {engine}, "
                         f"got {entry.get('type')!r}")
    params = entry.get("params") or {}
    if engine == "fsdp2" and params.get("compress_dense"):  # FSDPQGaLoreAdamW8bit would refuse it after start-up
        raise ValueError("ds_config optimizer.params.compress_dense: not available under --engine fsdp2 "
                         "(fully_shard reduces the dense gradients); remove it")


def _set_nested(config: dict, dotted: str, value: Any) -> None:
    node = config
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--ds.{dotted}: ds_config key {part!r} is not a mapping")
    node[parts[-1]] = value
