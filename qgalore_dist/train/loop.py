"""``qgalore-train``: Q-GaLore pre-training and fine-tuning of LLaMA models under DeepSpeed,
PyTorch FSDP2 / HSDP or plain data parallel.

    deepspeed --num_gpus 2 --module qgalore_dist.train                       # built-in default
    deepspeed --num_gpus 8 --module qgalore_dist.train --config run.yaml --ds_config ds.json
    torchrun --nproc_per_node 2 -m qgalore_dist.train ...   |   srun / mpirun: see launch/
    torchrun --nproc_per_node 4 -m qgalore_dist.train --engine fsdp2 --parallel.dp_replicate 2
    torchrun --nproc_per_node 2 -m qgalore_dist.train --engine ddp
    qgalore-train --model.name llama_60m --data.source c4 --optim.rank 256   # one process

Options: ``--config FILE`` (YAML/JSON training config), ``--ds_config FILE`` (DeepSpeed config
with a ``QGaLoreAdamW8bit`` optimizer entry), ``--engine deepspeed|fsdp2|ddp``,
``--<section>.<key> VALUE`` overrides of the training config (sections: parallel, model, data,
schedule, eval, checkpoint, logging, dist, optim) and ``--ds.<key> VALUE`` overrides of the
ds_config.  Everything a run writes goes to ``run_dir``: the resolved configs, metrics.jsonl,
TensorBoard files, checkpoints (also on SIGTERM/SIGINT), the tokenizer, the final model (HF
format) and PNG plots.  A run started again with the same ``run_dir`` resumes from its newest
good checkpoint and sees no training sample twice.

The loop (:class:`Run`, :func:`train`) is one code path for the three engines; what differs
(model wrapping, micro-steps, optimizer step, LR schedule, checkpoint target, export, replica
checks) sits behind the adapters of :mod:`.engines`.  Under ``fsdp2`` the model is sharded by
``shard_model`` over the mesh of ``--parallel.dp_replicate R --parallel.dp_shard S``
(:class:`~.parallel.ParallelDims`), checkpoints are DCP directories and the final model is
gathered to rank 0; under ``ddp`` (and ``fsdp2``) micro-batches but the last run under the
optimizer's ``no_sync()``.  Checkpoints of every engine carry a manifest, so resume and the
"already complete" check verify them the same way.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from .config import TrainConfig, parse_args

__all__ = ["main"]

TINY_LLAMA = dict(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_hidden_layers=4,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
"""The built-in ``tiny`` model: 4 layers of width 128 (28 GaLore matrices)."""

MODELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")


def _model_fields(name: str) -> tuple[dict | None, str | None]:
    """``(LlamaConfig fields, None)`` for a from-scratch model, ``(None, dir)`` for fine-tuning."""
    import json

    if name == "tiny":
        return dict(TINY_LLAMA), None
    builtin = os.path.join(MODELS_DIR, f"{name}.json")
    path = builtin if os.path.isfile(builtin) else name
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return None, path
    if os.path.isfile(path):
        with open(path) as f:
            fields = json.load(f)
        _check_model_keys(fields, path)
        return fields, None
    names = sorted(f[:-5] for f in os.listdir(MODELS_DIR) if f.endswith(".json"))
    raise ValueError(f"model.name: {name!r} is neither a built-in model ({['tiny', *names]}), a LlamaConfig "
                     f"JSON file, nor an HF model directory with a config.json")


_LEGACY_MODEL_KEYS = ("rope_scaling", "rope_theta", "torch_dtype")
"""Keys of older LlamaConfig JSON files that transformers still converts."""


def _check_model_keys(fields: Any, path: str) -> None:
    """``ValueError`` for a key LlamaConfig does not have (it would silently keep its default)."""
    import difflib
    import inspect

    from transformers import LlamaConfig, PretrainedConfig

    if not isinstance(fields, dict):
        raise ValueError(f"model.name: {path!r} must hold a JSON object of LlamaConfig fields")
    valid = (set(LlamaConfig().to_dict()) | set(_LEGACY_MODEL_KEYS)
             | set(inspect.signature(LlamaConfig.__init__).parameters)
             | set(inspect.signature(PretrainedConfig.__init__).parameters)) - {"self", "kwargs"}
    for key in fields:
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"model.name: {path!r} has unknown LlamaConfig key {key!r}; {hint}"
                             f"valid keys: {sorted(valid)}")


def check_model_config(cfg: TrainConfig, ds_config: dict) -> None:
    """Before any process group, from the configs alone (every rank raises the same
    ``ValueError``): the model config's keys, and the optimizer entry's ``target_modules``,
    ``rank`` and ``rank_overrides`` against the model's shapes -- on a meta-device model (no
    memory, no time), instead of failing after data preparation and DeepSpeed's start-up."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from ..integrations.deepspeed import matrix_ranks, parse_optimizer_entry

    fields, pretrained = _model_fields(cfg.model.name)
    entry = parse_optimizer_entry(ds_config)
    if entry is None:
        return
    if pretrained is not None:
        config = AutoConfig.from_pretrained(pretrained)
    else:
        config = LlamaConfig(**{k: v for k, v in fields.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    try:
        matrix_ranks(model, entry)
    except ValueError as exc:
        raise ValueError(f"model {cfg.model.name}: {exc}") from None


def build_model(cfg: TrainConfig, *, vocab_size: int, seq_len: int, tokenizer=None) -> torch.nn.Module:
    """An fp32 ``LlamaForCausalLM``: from scratch (seeded, identical on every rank) with the
    tokenizer's vocabulary and its BOS/EOS ids (LlamaConfig's defaults 1/2 would be wrong for
    any tokenizer of ours), or loaded from an HF directory."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    fields, pretrained = _model_fields(cfg.model.name)
    if pretrained is not None:
        model = AutoModelForCausalLM.from_pretrained(pretrained, torch_dtype=torch.float32)
        if model.get_input_embeddings().num_embeddings < vocab_size:
            raise ValueError(f"model.name: {pretrained} has {model.get_input_embeddings().num_embeddings} "
                             f"embeddings, the tokenizer {vocab_size} tokens")
    else:
        positions = max(seq_len, fields.get("max_position_embeddings", 0))
        fields.update(vocab_size=vocab_size, max_position_embeddings=positions)
        if tokenizer is not None:
            fields.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
        for key in ("architectures", "model_type", "transformers_version", "torch_dtype"):
            fields.pop(key, None)
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(LlamaConfig(**fields))
    model.config.use_cache = False
    if cfg.model.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


class StopFlag:
    """SIGTERM / SIGINT (SLURM preemption, Ctrl-C) set a flag; the loop agrees on it across
    ranks at the next step boundary, checkpoints and exits 0."""

    def __init__(self) -> None:
        self.signum: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._set)

    def _set(self, signum, frame) -> None:
        self.signum = signum


@dataclass(kw_only=True)
class Progress:
    """Where the run stands; saved in every checkpoint's client state."""

    step: int = 0
    """Optimizer steps done."""
    tokens: int = 0
    """Tokens trained on, all ranks together."""


def _sum_over_ranks(values: list[float]) -> list[float]:
    """One small all-reduce for the loop's own bookkeeping (loss, stop flag, eval sums)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(engine, batches) -> tuple[float, int]:
    """Mean token loss over the held-out batches of every rank, and the token count.  The loss
    is ``sum of -log p(token) / number of predicted tokens`` over all ranks (one all-reduce of
    the two sums), so ``exp`` of it is the perplexity, not a mean of per-batch means."""
    engine.eval()
    loss_sum, count = 0.0, 0
    for ids in batches:
        logits = engine(input_ids=ids).logits.float()
        targets = ids[:, 1:]
        loss_sum += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1),
                                          reduction="sum"))
        count += targets.numel()
    engine.train()
    loss_sum, count = _sum_over_ranks([loss_sum, float(count)])
    if count == 0:
        raise ValueError("data: the validation split is empty (raise data.val_fraction or use more text)")
    return loss_sum / count, int(count)


def _svd_counts(galore) -> dict[str, int]:
    return {galore.name_of(p): galore.state[p]["projector"].schedule.svd_count for p in galore.galore_params}


def _checkpoint_tags(ckpt_dir: str) -> list[str]:
    """``step<N>`` tags in ``ckpt_dir``, newest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir) if t.startswith("step") and t[4:].isdigit()]
    return sorted(tags, key=lambda t: int(t[4:]), reverse=True)


def resume(engine, ckpt_dir: str, log) -> dict | None:
    """Load the newest checkpoint that verifies (every rank agrees on the verdict) into the
    :mod:`.engines` adapter; a damaged one is skipped with a message.  Returns its client
    state, or None."""
    from ..checkpoint import CheckpointError

    for tag in _checkpoint_tags(ckpt_dir):
        try:
            return engine.load(ckpt_dir, tag)
        except CheckpointError as exc:
            log(f"[qgalore] checkpoint {tag} is unusable ({exc}); trying an older one")
    return None


def _prune(ckpt_dir: str, *, step: int, keep: int) -> None:
    """Keep the ``keep`` newest checkpoints up to ``step``; later ones are from an abandoned
    attempt (the run resumed before them because they were damaged)."""
    tags = _checkpoint_tags(ckpt_dir)
    stale = [t for t in tags if int(t[4:]) > step] + [t for t in tags if int(t[4:]) <= step][keep:]
    for tag in stale:
        shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)


def _header(cfg: TrainConfig, engine, model, data, launcher: str, world: int) -> str:
    galore = engine.qgalore
    int8 = {id(p) for p in galore.galore_params}
    # FSDP2 turns INT8 scales / zero points into frozen parameters: quantization metadata, not weights.
    dense = sum(getattr(p, "ds_numel", p.numel()) for n, p in model.named_parameters()
                if id(p) not in int8 and not n.endswith((".weight_scales", ".weight_zeros")))
    n_params = dense + sum(p.numel() for p in galore.galore_params)  # ZeRO-3 hides INT8 weights as buffers
    launched = {"env": "deepspeed/torchrun (RANK, WORLD_SIZE)", "slurm": "srun (SLURM_*)", "ompi": "mpirun (OMPI_*)",
                "pmi": "PMI", "mpi4py": "mpi4py"}.get(launcher, launcher)
    return (f"[qgalore] launched by {launched}: {world} ranks, {engine.describe()}, "
            f"model {cfg.model.name} "
            f"({n_params / 1e6:.2f}M parameters, {len(galore.galore_params)} INT8 GaLore matrices, "
            f"rank {galore.config.rank}, INT{galore.config.proj_bits or 16} projectors), "
            f"micro batch {engine.micro_batch} x accumulation {engine.accumulation} x {world} ranks x "
            f"{cfg.data.seq_len} tokens\n"
            f"[qgalore] data: {data.description}")


def _save_run_files(cfg: TrainConfig, ds_config: dict) -> None:
    import json

    os.makedirs(cfg.run_dir, exist_ok=True)
    with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    with open(os.path.join(cfg.run_dir, "ds_config.json"), "w") as f:
        json.dump(ds_config, f, indent=2)


def _train_step(engine, stream, stop: StopFlag) -> tuple[float, bool]:
    """One optimizer step (``engine.accumulation`` micro-batches); returns the loss averaged
    over micro-batches and ranks, and whether any rank got a stop signal.  A signal may reach
    only some ranks: agreeing here keeps every rank on the same path (save, then exit)."""
    losses = []
    for i in range(engine.accumulation):
        losses.append(engine.micro_step(stream.next_batch(), last=i == engine.accumulation - 1))
    engine.step()
    world = dist.get_world_size() if dist.is_initialized() else 1
    loss_sum, flags = _sum_over_ranks([sum(losses) / len(losses), 0.0 if stop.signum is None else 1.0])
    return loss_sum / world, flags > 0


def _step_record(engine, progress: Progress, loss: float, seconds: float, tokens: int, svd_before: dict,
                 dense_bytes: float = 0.0) -> dict:
    """``dense_bytes``: DeepSpeed's own traffic for the dense parameters (closed form, see
    :mod:`.dense_comm`), logged beside the package's metered kinds as ``deepspeed_dense``.
    FSDP2's own all-gathers and reduce-scatters are not metered (the package's kinds only)."""
    from .dense_comm import KIND
    from .metrics import peak_memory_bytes, peak_memory_kind

    galore = engine.qgalore
    svd_after = _svd_counts(galore)
    refreshed = [name for name, n in svd_after.items() if n > svd_before.get(name, 0)]
    comm = engine.comm_bytes()
    if dense_bytes:
        comm[KIND] = float(dense_bytes)
    return dict(step=progress.step, tokens=progress.tokens, loss=loss, lr=engine.lr(),
                step_time_s=seconds, tokens_per_s=tokens / max(seconds, 1e-9), svd_count=len(refreshed),
                svd_layers=refreshed, comm_bytes=comm, mem_bytes=peak_memory_bytes(), mem_kind=peak_memory_kind())


def _pretrained_tokenizer(cfg: TrainConfig) -> None:
    """Fine-tuning a model directory that carries its tokenizer: use it unless one was chosen."""
    _, pretrained = _model_fields(cfg.model.name)
    if pretrained and cfg.data.tokenizer == "bpe" and any(
            os.path.isfile(os.path.join(pretrained, f)) for f in ("tokenizer.json", "tokenizer.model")):
        cfg.data.tokenizer = pretrained


class Run:
    """One training run on this rank: the engine, data, position and logger, and what a step,
    an evaluation and a save do.  Every method is collective (all ranks call it in order)."""

    def __init__(self, cfg: TrainConfig, ds_config: dict, *, launcher: str) -> None:
        from .data import TrainStream, build_data
        from .engines import build_engine
        from .metrics import RunLogger

        self.cfg, self.rank, self.world = cfg, dist.get_rank(), dist.get_world_size()
        self.ckpt_dir = os.path.join(cfg.run_dir, "checkpoints")
        if self.rank == 0:
            _save_run_files(cfg, ds_config)
        _pretrained_tokenizer(cfg)
        self.data = build_data(cfg.data, rank=self.rank, world=self.world)
        model = build_model(cfg, vocab_size=self.data.tokenizer.vocab_size, seq_len=cfg.data.seq_len,
                            tokenizer=self.data.tokenizer)
        self.engine = build_engine(cfg, ds_config, model)
        self.galore, self.micro = self.engine.qgalore, self.engine.micro_batch
        self.stream = TrainStream(self.data, rank=self.rank, world=self.world, micro_batch=self.micro, seed=cfg.seed)
        self.tokens_per_step = self.micro * self.engine.accumulation * self.world * cfg.data.seq_len
        self.progress = Progress()
        self.dense_bytes = self.engine.dense_bytes
        client = resume(self.engine, self.ckpt_dir, self._say) if cfg.checkpoint.resume else None
        if client:
            self.progress = Progress(**client["progress"])
            states = client["data"]
            self.stream.load_state_dict(states[self.rank] if len(states) == self.world else states[0])
        self.logger = RunLogger(cfg.run_dir, rank=self.rank, total_steps=cfg.schedule.steps,
                                start_step=self.progress.step, tensorboard=cfg.logging.tensorboard,
                                progress=cfg.logging.progress, log_every=cfg.logging.every)
        # Where each rank runs, for multi-node logs (collective: every rank sends its host name).
        hosts = self.galore.comm.all_gather_object(socket.gethostname())
        if self.rank == 0:
            self.logger.info("[qgalore] hosts: " + " ".join(f"rank{r}={h}" for r, h in enumerate(hosts)))
            self.logger.info(f"[qgalore] resolved training config:\n{yaml.safe_dump(cfg.to_dict(), sort_keys=False)}")
            self.logger.info(_header(cfg, self.engine, model, self.data, launcher, self.world)
                             + (f"\n[qgalore] resumed at step {self.progress.step}" if client else ""))

    def _say(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def step(self, stop: StopFlag) -> bool:
        """One optimizer step, logged; returns whether the run must stop (a signal somewhere)."""
        svd_before, start = _svd_counts(self.galore), time.perf_counter()
        loss, stopping = _train_step(self.engine, self.stream, stop)
        self.progress.step += 1
        self.progress.tokens += self.tokens_per_step
        seconds = time.perf_counter() - start
        self.logger.log_step(_step_record(self.engine, self.progress, loss, seconds, self.tokens_per_step, svd_before,
                                          self.dense_bytes))
        if not math.isfinite(loss):  # the same all-reduced value on every rank: all raise here
            raise FloatingPointError(f"loss is {loss} at step {self.progress.step}; the last good checkpoint is kept")
        return stopping

    def evaluate(self) -> None:
        from .data import val_batches

        batches = val_batches(self.data, rank=self.rank, world=self.world, micro_batch=self.micro)
        with self.engine.autocast():
            val_loss, val_tokens = evaluate(self.engine.module, (ids.to(self.engine.device) for ids in batches))
        self.logger.log_eval(dict(step=self.progress.step, tokens=self.progress.tokens, val_loss=val_loss,
                                  val_ppl=math.exp(val_loss), val_tokens=val_tokens))

    def save(self) -> None:
        step = self.progress.step
        state = {"progress": vars(self.progress).copy(),
                 "data": self.galore.comm.all_gather_object(self.stream.state_dict())}
        path = self.engine.save(self.ckpt_dir, f"step{step}", state)
        if self.rank == 0:
            _prune(self.ckpt_dir, step=step, keep=self.cfg.checkpoint.keep)
        self.logger.summary_extra["checkpoint"] = path

    def finish(self) -> None:
        """Replica (and FSDP2 shard) check, final model export, plots and the summary."""
        checked = self.engine.check()
        out = os.path.join(self.cfg.run_dir, "final_model")
        self.engine.export(out, self.data.tokenizer, self.rank)
        if self.rank == 0:
            self.logger.summary_extra["final_model"] = out
            self.logger.summary_extra["svds_whole_run"] = self.galore.svd_count
            if self.cfg.logging.plots:
                from .plot import plot_run

                plot_run(self.cfg.run_dir)
                self.logger.summary_extra["plots"] = os.path.join(self.cfg.run_dir, "plots")
            self.logger.info(f"[qgalore] done: {self.progress.step} steps, {self.galore.svd_count} SVDs, {checked}")
        self.logger.close()


def completed_step(cfg: TrainConfig) -> int | None:
    """The step of a finished run in ``cfg.run_dir`` -- its newest checkpoint that verifies has
    reached ``schedule.steps`` and ``summary.json`` was written -- or None.  Files only, so every
    rank reaches the same verdict without a collective; engine and DCP (``--engine fsdp2``)
    checkpoints alike carry the manifest ``verify_checkpoint`` reads."""
    from ..checkpoint import CheckpointError, verify_checkpoint

    if not cfg.checkpoint.resume or not os.path.isfile(os.path.join(cfg.run_dir, "summary.json")):
        return None
    ckpt_dir = os.path.join(cfg.run_dir, "checkpoints")
    for tag in _checkpoint_tags(ckpt_dir):
        try:
            verify_checkpoint(os.path.join(ckpt_dir, tag))
        except CheckpointError:
            continue
        return int(tag[4:]) if int(tag[4:]) >= cfg.schedule.steps else None
    return None


def train(cfg: TrainConfig, ds_config: dict, *, launcher: str = "single process") -> int:
    """Collective: the whole run on this rank.  Returns the exit code (0, also after a signal).
    A run that already finished changes nothing (no rewritten summary, no second evaluation)."""
    done = completed_step(cfg)
    if done is not None:
        if os.environ.get("RANK", "0") == "0":
            print(f"[qgalore] {cfg.run_dir}: already complete at step {done}; raise --schedule.steps to "
                  "continue", flush=True)
        return 0
    stop = StopFlag()  # before the (long) set-up: a signal during it is honoured after the first step
    run = Run(cfg, ds_config, launcher=launcher)
    saved_at, evaluated_at = -1, -1
    while run.progress.step < cfg.schedule.steps:
        stopping = run.step(stop)
        step = run.progress.step
        if cfg.eval.every and step % cfg.eval.every == 0:
            run.evaluate()
            evaluated_at = step
        if stopping or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
            run.save()
            saved_at = step
        if stopping:
            run.logger.info(f"[qgalore] signal {stop.signum or 'on another rank'}: checkpoint saved at step "
                            f"{step}, exiting")
            run.logger.close()
            return 0
    if evaluated_at != run.progress.step:
        run.evaluate()
    if saved_at != run.progress.step:
        run.save()
    run.finish()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line (every rank alike, so a bad key fails everywhere before any
    collective), join the process group the launcher describes, and train."""
    from ..integrations.launch import init_distributed

    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv):
        from .config import help_text

        print(__doc__)
        print("Training config keys (YAML/JSON file via --config, or --section.key VALUE); examples in "
              "configs/train/:\n" + help_text())
        return 0
    try:
        cfg, ds_config = parse_args(argv)
        check_model_config(cfg, ds_config)
        _check_engine(cfg, ds_config)
    except (ValueError, FileNotFoundError) as exc:  # a user mistake: one line, argparse-style, exit 2
        # Every rank raises it (from the same files); under a launcher each says which rank it is.
        rank = f"[rank {os.environ['RANK']}] " if "RANK" in os.environ else ""
        print(f"{rank}qgalore-train: error: {exc}", file=sys.stderr, flush=True)
        return 2
    if completed_step(cfg) is not None:  # nothing to do: say so before DeepSpeed's start-up
        return train(cfg, ds_config)
    env = init_distributed(timeout_s=cfg.dist.timeout_s, use_deepspeed=cfg.engine == "deepspeed")
    _cpu_threads(env)
    # DeepSpeed's ZeRO calls a deprecated torch.distributed alias every step: one warning per rank.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*is deprecated", category=FutureWarning)
    return train(cfg, ds_config, launcher=env.source)


def _check_engine(cfg: TrainConfig, ds_config: dict) -> None:
    """``--engine fsdp2`` / ``ddp``: the batch keys and (fsdp2) the mesh against the world size
    the launcher announces, before any process group, so a mistake is one line on every rank
    (the engine checks them again once the group exists)."""
    from ..integrations.launch import resolve_launch_env
    from .engines import plain_settings
    from .parallel import ParallelDims

    if cfg.engine == "deepspeed":
        return
    try:
        world = resolve_launch_env().world_size
    except ValueError:  # an MPI launcher only mpi4py can place: checked after start-up
        return
    plain_settings(ds_config, world, cfg.engine)
    if cfg.engine == "fsdp2":
        ParallelDims(dp_replicate=cfg.parallel.dp_replicate, dp_shard=cfg.parallel.dp_shard, world_size=world)


def _cpu_threads(env) -> None:
    """On CPU ranks without OMP_NUM_THREADS, share the cores among this node's ranks as torchrun
    does: the deepspeed launcher does not, and N ranks x all cores oversubscribe (several times
    slower with OpenMP's spinning threads)."""
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return
    local = env.local_world_size or int(os.environ.get("LOCAL_SIZE") or 0) or env.world_size
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))


def cli() -> None:
    """The ``qgalore-train`` console script."""
    from ..integrations.launch import run_main

    run_main(main)
