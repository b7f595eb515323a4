"""DeepSpeed integration (``qgalore_dist.initialize``) on CPU / gloo.

Multi-process runs launch ``tests/ds_worker.py`` in subprocesses (``torchrun`` or the
``deepspeed`` launcher), each under ``timeout`` with a fresh free master port, from a temporary
working directory; a module-scoped cache launches every distinct run once.  Every optimizer step
consumes the same global batch whatever the world size, so a 2-rank run with gradient
accumulation g is compared with the 1-rank reference with 2g:

* stage 0 fp32, gas 1: bit-identical losses, INT8 codes and dense parameters (the 2-rank
  all-reduce of 2 micro-batch gradients sums them in the order the 1-rank accumulation does);
  gas 2 (vs 4) sums in another order: fp32 rounding only (``EXACT_INPUT_TOL``);
* stages 1-3 and bf16: within ``REL_TOL`` (ZeRO partitions the dense 8-bit Adam moments, and the
  moments' quantization blocks fall on other boundaries than with one rank).

Stage 0 fp32 on one rank is also compared with the plain optimizer without DeepSpeed.  The
``deepspeed``-launcher runs turn on the optimizer's ``overlap_comm`` (its low-rank reduce runs
during DeepSpeed's backward, once per micro-batch) and are held to the same tolerances.

The joint clipping norm (dense + low-rank GaLore gradients) must not depend on the world size
or the ZeRO stage, and ``CLIP`` is chosen so that clipping is active in some steps.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "ds_worker.py"
CONFIG_DIR = ROOT / "configs" / "ds"

STEPS = 6
LR = 3e-3
# Pre-clipping norms of the 1-rank reference: ~1.02-1.09 with gas 2 (every step clipped) and
# ~0.72-0.77 with gas 4 (2 of 6 steps clipped).  So every combo clips somewhere, and the gas-4
# references (= the 2-rank gas-2 runs) mix clipped and unclipped steps.
CLIP = 0.75
REL_TOL = 1e-4  # losses (measured max 3.0e-5)
# Steps 0 and 1 see the same parameters in every run (the first dense update does not read the
# 8-bit moments back); from step 2 on the dense 8-bit moment blocks, which fall on other ZeRO
# partition boundaries with 2 ranks, and bf16 accumulation order make the trajectories drift
# apart, and the refresh at step 3 (an INT4 projector from the SVD of a slightly different
# gradient) amplifies that in the norm: measured max 5.1e-4 (2:bf16:1, step 4).
SAME_PARAMS_STEPS = 2
EXACT_INPUT_TOL = 1e-6  # fp32 rounding only (measured max 6.1e-8)
NORM_TOL = 1e-3
LAUNCH_TIMEOUT_S = 240

STAGES = (0, 1, 2, 3)
DTYPES = ("fp32", "bf16")
REF_MATRIX = [f"{s}:{d}:{g}" for s in STAGES for d in DTYPES for g in (2, 4)]
DIST_MATRIX = [f"{s}:{d}:{g}" for s in STAGES for d in DTYPES for g in (1, 2)]
LAUNCHER_MATRIX = ["0:bf16:1", "1:fp32:2", "2:bf16:1", "3:fp32:2"]  # one per stage, dtype and gas mixed
N_INT8_LAYERS = 7  # q, k, v, o, gate, up, down of the 1-layer tiny LLaMA

EXPECTED_ENGINE_OPTIMIZER = {
    (0, "fp32"): "EngineOptimizer",  # no wrapper: DeepSpeed steps the client optimizer itself
    (0, "bf16"): "FP16_UnfusedOptimizer",
    (1, "fp32"): "DeepSpeedZeroOptimizer", (1, "bf16"): "DeepSpeedZeroOptimizer",
    (2, "fp32"): "DeepSpeedZeroOptimizer", (2, "bf16"): "DeepSpeedZeroOptimizer",
    (3, "fp32"): "DeepSpeedZeroOptimizer_Stage3", (3, "bf16"): "DeepSpeedZeroOptimizer_Stage3",
}


def parse_combo(combo: str) -> tuple[int, str, int]:
    stage, dtype, gas = combo.split(":")
    return int(stage), dtype, int(gas)


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def max_rel(xs, ys) -> float:
    assert len(xs) == len(ys), (xs, ys)
    return max((rel_diff(x, y) for x, y in zip(xs, ys)), default=0.0)


# ----------------------------------------------------------------------------- launching
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_ext"))  # the shm comm op built once
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def _launch_cmd(launcher: str, nproc: int, port: int) -> list[str]:
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(port), str(WORKER)]
    if launcher == "deepspeed":
        exe = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
        return [exe, "--num_gpus", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(port), str(WORKER)]
    raise ValueError(launcher)


def launch(launcher: str, nproc: int, worker_args: list[str], workdir: Path, out: Path) -> dict:
    """Run the worker under ``timeout``; returns rank 0's records (or raises with the log tail)."""
    cmd = ["timeout", "-k", "10", str(LAUNCH_TIMEOUT_S),
           *_launch_cmd(launcher, nproc, free_port()), *worker_args, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=workdir, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=LAUNCH_TIMEOUT_S + 30)
    if proc.returncode != 0 or not out.exists():
        hint = ""
        lock = Path(_env()["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm" / "lock"
        if proc.returncode in (124, 137) and lock.exists():
            hint = f"\n(timed out; a stale JIT lock {lock} makes DeepSpeed wait forever -- remove it)"
        raise RuntimeError(f"{' '.join(cmd)}\nexit {proc.returncode}{hint}\n--- output tail ---\n{proc.stdout[-6000:]}")
    return json.loads(out.read_text())


RUNS = {
    # name: (launcher, nproc, worker args)
    "reference": ("torchrun", 1, ["--matrix", ",".join(REF_MATRIX)]),
    "torchrun2": ("torchrun", 2, ["--matrix", ",".join(DIST_MATRIX)]),
    "launcher2": ("deepspeed", 2, ["--matrix", ",".join(LAUNCHER_MATRIX), "--overlap"]),
    "config_zero2": ("torchrun", 2, ["--config-file", str(CONFIG_DIR / "zero2_bf16.json"), "--steps", "4"]),
    "passthrough": ("torchrun", 2, ["--passthrough", "--matrix", "1:bf16:1", "--steps", "3"]),
    # ZeRO-3 with the INT8 weights kept replicated (int8_partition false): the path that
    # torchrun2's stage-3 combos (partitioned by default) must reproduce code for code.
    "zero3_replicated2": ("torchrun", 2, ["--matrix", "3:fp32:1,3:bf16:2", "--int8-partition", "false"]),
    # Without clipping the two paths are the same arithmetic: bit-identical codes and losses.
    "zero3_noclip2": ("torchrun", 2, ["--matrix", "3:bf16:2", "--clip", "0"]),
    "zero3_noclip_replicated2": ("torchrun", 2, ["--matrix", "3:bf16:2", "--clip", "0", "--int8-partition", "false"]),
    "zero3_partitioned4": ("torchrun", 4, ["--matrix", "3:fp32:1"]),
    # attention matrices (64 x 64 = 4096 elements) stay replicated, the MLP ones are partitioned
    "zero3_threshold2": ("torchrun", 2, ["--matrix", "3:fp32:1", "--persistence-threshold", "5000"]),
}
COMMON_ARGS = ["--steps", str(STEPS), "--clip", str(CLIP), "--lr", str(LR)]


class RunCache:
    """Launches each named run at most once per module (a failure is cached too)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.records: dict[str, dict] = {}
        self.errors: dict[str, str] = {}

    def __call__(self, name: str) -> dict:
        if name in self.errors:
            pytest.fail(f"run {name!r} failed earlier:\n{self.errors[name]}", pytrace=False)
        if name not in self.records:
            launcher, nproc, args = RUNS[name]
            workdir = self.root / name
            workdir.mkdir()
            try:
                # later occurrences of an option win in argparse: run-specific args come last
                self.records[name] = launch(launcher, nproc, [*COMMON_ARGS, *args], workdir, workdir / "records.json")
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                self.errors[name] = str(exc)
                pytest.fail(f"run {name!r} failed:\n{exc}", pytrace=False)
        return self.records[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> RunCache:
    return RunCache(tmp_path_factory.mktemp("deepspeed_runs"))


@pytest.fixture(scope="module")
def reference(runs) -> dict:
    return runs("reference")


# ----------------------------------------------------------------------------- equivalence
def check_against_reference(combo: str, rec: dict, reference: dict, world: int) -> None:
    stage, dtype, gas = parse_combo(combo)
    ref_combo = f"{stage}:{dtype}:{gas * world}"
    ref = reference[ref_combo]
    where = f"{combo} on {world} ranks vs {ref_combo} on 1 rank"
    assert rec["world"] == world and ref["world"] == 1
    assert rec["engine_optimizer"] == EXPECTED_ENGINE_OPTIMIZER[stage, dtype], where
    assert len(rec["losses"]) == STEPS and all(math.isfinite(x) for x in rec["losses"]), (where, rec["losses"])
    if (stage, dtype, gas) == (0, "fp32", 1):  # same summation order: bit-identical
        assert rec["losses"] == ref["losses"], where
        assert rec["codes"] == ref["codes"] and rec["dense"] == ref["dense"], where
    loss_tol = EXACT_INPUT_TOL if (stage, dtype) == (0, "fp32") else REL_TOL
    assert max_rel(rec["losses"], ref["losses"]) <= loss_tol, (where, rec["losses"], ref["losses"])
    # projector refreshes: same steps, one SVD per INT8 layer, nothing else (in particular the bf16
    # stage-0 wrapper's start-up step() with zero gradients must not refresh anything)
    assert rec["svds"] == ref["svds"], where
    assert rec["svds"][0] == N_INT8_LAYERS == len(rec["codes"]), where
    assert rec["svd_count"] == ref["svd_count"] == sum(rec["svds"]), where
    assert rec["replicas_checked"] > 0, where
    # The joint clipping norm does not depend on the world size or the ZeRO partitioning: in the
    # first SAME_PARAMS_STEPS steps both runs hold the same parameters, and with fp32 gradients
    # (or bf16 ones summed in the same order, gas 1) the norms agree to fp32 rounding.
    assert None not in rec["norms"] and None not in ref["norms"], where
    if (stage, dtype) == (0, "fp32"):  # one trajectory up to fp32 rounding
        assert max_rel(rec["norms"], ref["norms"]) <= EXACT_INPUT_TOL, (where, rec["norms"], ref["norms"])
    if dtype == "fp32" or gas == 1:
        early = max_rel(rec["norms"][:SAME_PARAMS_STEPS], ref["norms"][:SAME_PARAMS_STEPS])
        assert early <= EXACT_INPUT_TOL, (where, rec["norms"], ref["norms"])
    assert max_rel(rec["norms"], ref["norms"]) <= NORM_TOL, (where, rec["norms"], ref["norms"])
    assert min(rec["coefs"]) < 1.0 and min(ref["coefs"]) < 1.0, (where, rec["coefs"])
    assert max_rel(rec["coefs"], ref["coefs"]) <= NORM_TOL, (where, rec["coefs"], ref["coefs"])
    assert set(rec["dense"]) == set(ref["dense"]) and set(rec["codes"]) == set(ref["codes"]), where


def test_reference_clips_some_steps(reference):
    assert sorted(reference) == sorted(REF_MATRIX)
    for combo, rec in reference.items():
        assert rec["engine_optimizer"] == EXPECTED_ENGINE_OPTIMIZER[parse_combo(combo)[:2]], combo
        assert None not in rec["norms"], combo
        assert min(rec["coefs"]) < 1.0, (combo, rec["coefs"])  # clipping active ...
        if parse_combo(combo)[2] == 4:
            assert max(rec["coefs"]) == 1.0, (combo, rec["coefs"])  # ... but not in every step


def test_deepspeed_does_not_clip_dense_gradients(reference):
    """``gradient_clipping`` is the package's joint clipping; DeepSpeed's own clipping would
    cover only the dense gradients (clipping them a second time).  DeepSpeed's default for an
    absent key is 1.0, so the config it sees must say 0.0."""
    clipping = {combo: rec["engine_gradient_clipping"] for combo, rec in reference.items()}
    assert all(v == 0.0 for v in clipping.values()), clipping


@pytest.mark.parametrize("combo", DIST_MATRIX)
def test_torchrun_two_ranks_match_one_rank(runs, reference, combo):
    records = runs("torchrun2")
    check_against_reference(combo, records[combo], reference, world=2)


@pytest.mark.parametrize("combo", LAUNCHER_MATRIX)
def test_deepspeed_launcher_two_ranks_match_one_rank(runs, reference, combo):
    records = runs("launcher2")
    check_against_reference(combo, records[combo], reference, world=2)
    in_backward, at_step = records[combo]["overlap_launches"]
    assert in_backward > 0 and at_step == 0, records[combo]["overlap_launches"]


# ----------------------------------------------------------------------------- vs. no DeepSpeed
def plain_optimizer_run(gas: int) -> dict:
    """The single-process optimizer without DeepSpeed on the worker's model, batches and params."""
    from ds_worker import build_model, ds_config, micro_batch

    import qgalore_dist

    params = dict(ds_config(0, "fp32", gas, 1, CLIP, LR)["optimizer"]["params"])
    targets = params.pop("target_modules")
    assert params.pop("weight_bits") == 8
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker: the same BLAS reduction order
    try:
        model = build_model()
        qgalore_dist.prepare_model(model, target_modules=targets)
        # INT8 weights first, in module order, as qgalore_dist.initialize hands them over: the
        # stochastic-rounding stream of a GaLore matrix is keyed by its index in the optimizer
        int8_weights = [m.weight for m in model.modules() if isinstance(m, qgalore_dist.Int8Linear)]
        trainable = int8_weights + [p for p in model.parameters() if p.requires_grad and p.is_floating_point()]
        opt = qgalore_dist.QGaLoreAdamW8bit(trainable, names={p: n for n, p in model.named_parameters()},
                                            max_grad_norm=CLIP, **params)
        losses, norms, coefs, svds = [], [], [], []
        for step in range(STEPS):
            step_loss = torch.zeros(())  # accumulated as the worker does
            for k in range(gas):
                x = micro_batch(step, k)
                loss = model(input_ids=x, labels=x).loss
                (loss / gas).backward()
                step_loss += loss.detach().float() / gas
            opt.step()
            opt.zero_grad()
            losses.append(float(step_loss))
            norms.append(opt.last_grad_norm)
            coefs.append(opt.last_clip_coef)
            svds.append(opt.svds_last_step)
        codes = {n: int(m.weight.long().sum()) for n, m in model.named_modules()
                 if isinstance(m, qgalore_dist.Int8Linear)}
        dense = {n: float(p.detach().double().sum()) for n, p in model.named_parameters() if p.is_floating_point()}
    finally:
        torch.set_num_threads(threads)
    return dict(losses=losses, norms=norms, coefs=coefs, svds=svds, codes=codes, dense=dense)


@pytest.mark.parametrize("gas", [2, 4])
def test_stage0_matches_plain_optimizer(reference, gas):
    """DeepSpeed stage 0 fp32 on one rank is the plain optimizer: the same joint clipping (only
    the package clips, DeepSpeed must not clip the dense gradients again), the same updates."""
    ds = reference[f"0:fp32:{gas}"]
    plain = plain_optimizer_run(gas)
    assert plain["svds"] == ds["svds"]
    assert max_rel(plain["norms"], ds["norms"]) <= EXACT_INPUT_TOL, (plain["norms"], ds["norms"])
    assert max_rel(plain["coefs"], ds["coefs"]) <= EXACT_INPUT_TOL, (plain["coefs"], ds["coefs"])
    assert max_rel(plain["losses"], ds["losses"]) <= EXACT_INPUT_TOL, (plain["losses"], ds["losses"])
    assert plain["codes"] == ds["codes"]
    assert max_rel(list(plain["dense"].values()), [ds["dense"][n] for n in plain["dense"]]) <= EXACT_INPUT_TOL


# ----------------------------------------------------------------------------- config files
CONFIG_FILES = ["zero0_fp32.json", "zero1_bf16.json", "zero2_bf16.json", "zero3_bf16.json"]


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_file_parses(name):
    from qgalore_dist.integrations.deepspeed import load_ds_config, parse_optimizer_entry

    path = CONFIG_DIR / name
    config = load_ds_config(path)
    stage, dtype = int(name[4]), name.split("_")[1].split(".")[0]
    assert config["zero_optimization"]["stage"] == stage
    assert bool((config.get("bf16") or {}).get("enabled")) == (dtype == "bf16")
    assert not (config.get("fp16") or {}).get("enabled")
    assert "train_batch_size" not in config  # DeepSpeed derives it from micro batch x gas x world
    assert config["train_micro_batch_size_per_gpu"] >= 1 and config["gradient_accumulation_steps"] >= 1
    entry = parse_optimizer_entry(config)
    assert entry is not None
    assert entry.config.max_grad_norm == config["gradient_clipping"] == 1.0
    assert (entry.config.lr, entry.config.rank, entry.config.update_proj_gap, entry.config.scale,
            entry.config.proj_bits) == (0.01, 128, 200, 0.25, 4)
    assert entry.weight_bits == 8
    assert entry.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert (CONFIG_DIR / "README.md").is_file()


def test_config_file_zero2_trains_two_ranks(runs):
    records = runs("config_zero2")
    config = json.loads((CONFIG_DIR / "zero2_bf16.json").read_text())
    combo = f"2:bf16:{config['gradient_accumulation_steps']}"
    assert list(records) == [combo]
    rec = records[combo]
    assert rec["world"] == 2 and rec["engine_optimizer"] == "DeepSpeedZeroOptimizer"
    assert len(rec["losses"]) == 4 and all(math.isfinite(x) for x in rec["losses"]), rec["losses"]
    assert rec["replicas_checked"] > 0
    assert rec["svds"][0] == N_INT8_LAYERS  # rank 8 override applied (rank 128 > 64 would fail)
    # gradient_clipping from the file reached the package's joint clipping
    assert None not in rec["norms"] and all(n > 0 for n in rec["norms"]), rec["norms"]
    assert all(0 < c <= 1.0 for c in rec["coefs"]), rec["coefs"]


# ----------------------------------------------------------------------------- pass-through
def test_other_optimizer_type_passes_through(runs):
    rec = runs("passthrough")["1:bf16:1"]
    assert rec["world"] == 2
    assert rec["basic_optimizer"] == "torch.optim.adamw.AdamW"
    assert rec["engine_optimizer"] == "DeepSpeedZeroOptimizer"
    assert rec["int8_layers"] == 0 and not rec["has_qgalore"]
    assert all(math.isfinite(x) for x in rec["losses"]), rec["losses"]


# ----------------------------------------------------------------------------- argument errors
def _entry_config(**params) -> dict:
    base = {"lr": 0.01, "rank": 8, "update_proj_gap": 3}
    return {"gradient_clipping": 1.0, "optimizer": {"type": "QGaLoreAdamW8bit", "params": {**base, **params}}}


def test_parse_unknown_params_key_lists_allowed():
    from qgalore_dist.integrations.deepspeed import allowed_params, parse_optimizer_entry

    with pytest.raises(ValueError) as info:
        parse_optimizer_entry(_entry_config(rnak=8))
    msg = str(info.value)
    assert "rnak" in msg and "allowed" in msg
    for key in ("rank", "update_proj_gap", "target_modules", "weight_bits"):
        assert key in msg and key in allowed_params()
    with pytest.raises(ValueError, match="frobnicate"):
        parse_optimizer_entry({"optimizer": {"type": "QGaLoreAdamW8bit", "params": {}, "frobnicate": 1}})


@pytest.mark.parametrize("field,value", [("rank", 0), ("proj_type", "diag"), ("betas", [0.9]),
                                         ("update_proj_gap", 0), ("proj_bits", 3), ("target_modules", "q_proj")])
def test_parse_bad_value_names_field(field, value):
    from qgalore_dist.integrations.deepspeed import parse_optimizer_entry

    with pytest.raises(ValueError, match=field):
        parse_optimizer_entry(_entry_config(**{field: value}))


def test_parse_refuses_weight_bits_4_and_max_grad_norm():
    from qgalore_dist.integrations.deepspeed import parse_optimizer_entry

    with pytest.raises(ValueError, match="weight_bits"):
        parse_optimizer_entry(_entry_config(weight_bits=4))
    with pytest.raises(ValueError, match="gradient_clipping"):
        parse_optimizer_entry(_entry_config(max_grad_norm=1.0))


def test_parse_maps_gradient_clipping_and_passes_other_types():
    from qgalore_dist.integrations.deepspeed import parse_optimizer_entry

    cfg = _entry_config(betas=[0.9, 0.99], target_modules=["q_proj", "v_proj"])
    cfg["gradient_clipping"] = 0.5
    entry = parse_optimizer_entry(cfg)
    assert entry.config.max_grad_norm == 0.5 and entry.config.betas == (0.9, 0.99)
    assert entry.target_modules == ("q_proj", "v_proj")
    assert parse_optimizer_entry({k: v for k, v in cfg.items() if k != "gradient_clipping"}).config.max_grad_norm == 0.0
    for other in ({"type": "AdamW", "params": {"lr": 1e-3}}, {"type": "Lamb"}, None):
        assert parse_optimizer_entry({"gradient_clipping": 1.0, **({"optimizer": other} if other else {})}) is None


def test_load_ds_config_errors(tmp_path):
    from qgalore_dist.integrations.deepspeed import load_ds_config

    missing = tmp_path / "nope.json"
    with pytest.raises(ValueError, match="nope.json"):
        load_ds_config(missing)
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_micro_batch_size_per_gpu": 2,,}')
    with pytest.raises(ValueError, match="bad.json.*JSON"):
        load_ds_config(str(bad))
    with pytest.raises(ValueError, match="bad.json"):
        load_ds_config(None, SimpleNamespace(deepspeed_config=str(bad)))
    with pytest.raises(ValueError, match="no DeepSpeed config"):
        load_ds_config(None, SimpleNamespace())
    cfg = _entry_config()
    loaded = load_ds_config(cfg)
    assert loaded == cfg and loaded is not cfg and loaded["optimizer"] is not cfg["optimizer"]  # deep copy
    good = tmp_path / "good.json"
    good.write_text(json.dumps(cfg))
    assert load_ds_config(good) == cfg == load_ds_config(None, SimpleNamespace(deepspeed_config=str(good)))


def test_initialize_argument_errors(tmp_path):
    """All raised before any distributed initialisation or model conversion."""
    import qgalore_dist

    model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="fp16"):
        qgalore_dist.initialize(model=model, config={**_entry_config(), "fp16": {"enabled": True}})
    with pytest.raises(ValueError, match="optimizer"):
        qgalore_dist.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                config=_entry_config())
    with pytest.raises(ValueError, match="model"):
        qgalore_dist.initialize(config=_entry_config())
    with pytest.raises(ValueError, match="mpu"):
        qgalore_dist.initialize(model=model, mpu=object(), config=_entry_config())
    with pytest.raises(ValueError, match="missing.json"):
        qgalore_dist.initialize(model=model, config=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="rnak"):
        qgalore_dist.initialize(model=model, config=_entry_config(rnak=1))
    assert isinstance(model.weight, torch.nn.Parameter) and model.weight.dtype == torch.float32  # untouched


# ----------------------------------------------------------------------------- ZeRO-3 INT8 partitioning
def _check_partitioned_bytes(rec: dict, world: int) -> None:
    """Every rank stores exactly 1/N of the INT8 codes + scales + zeros (the tiny model's
    shapes split evenly), and they add up to the whole."""
    local = rec["int8_local_bytes"]
    assert len(local) == world and len({whole for _, whole in local}) == 1, local
    whole = local[0][1]
    assert all(held * world == whole for held, _ in local), local


@pytest.mark.parametrize("combo", ["3:fp32:1", "3:bf16:2"])
def test_zero3_partitioned_int8_matches_replicated(runs, reference, combo):
    """Under ZeRO-3 (default int8_partition) each rank holds 1/2 of every INT8 weight and
    gathers it around forward and backward; the run matches the replicated path and both match
    the 1-rank run.  With clipping the joint norm is summed per row shard instead of per owner
    (float64 order), which may flip a stochastic rounding: codes within rounding, not bit-equal."""
    part, repl = runs("torchrun2")[combo], runs("zero3_replicated2")[combo]
    assert part["int8_partitioned"] and not repl["int8_partitioned"]
    _check_partitioned_bytes(part, 2)
    assert all(held == whole for held, whole in repl["int8_local_bytes"]), repl["int8_local_bytes"]
    assert max_rel(part["losses"], repl["losses"]) <= EXACT_INPUT_TOL, (part["losses"], repl["losses"])
    assert max_rel(list(part["codes"].values()), [repl["codes"][n] for n in part["codes"]]) <= REL_TOL
    # two gathers per layer and micro-batch (forward, backward): 2 * (N-1)/N * whole bytes
    micro = STEPS * parse_combo(combo)[2]
    assert part["comm"]["int8_all_gather"] == 2 * micro * 0.5 * part["int8_local_bytes"][0][1]
    assert "int8_all_gather" not in repl["comm"]
    check_against_reference(combo, repl, reference, world=2)


def test_zero3_partitioned_int8_codes_identical_to_replicated_without_clipping(runs):
    part, repl = runs("zero3_noclip2")["3:bf16:2"], runs("zero3_noclip_replicated2")["3:bf16:2"]
    assert part["int8_partitioned"] and not repl["int8_partitioned"]
    assert part["codes_digest"] == repl["codes_digest"] and part["codes"] == repl["codes"]
    assert part["losses"] == repl["losses"] and part["svd_count"] == repl["svd_count"] > 0


def test_zero3_partitioned_int8_four_ranks_match_one_rank(runs, reference):
    rec = runs("zero3_partitioned4")["3:fp32:1"]
    assert rec["int8_partitioned"]
    _check_partitioned_bytes(rec, 4)
    check_against_reference("3:fp32:1", rec, reference, world=4)


def test_zero3_persistence_threshold_keeps_small_int8_matrices_replicated(runs, reference):
    rec = runs("zero3_threshold2")["3:fp32:1"]
    (held0, whole), (held1, _) = rec["int8_local_bytes"]
    attention = 4 * (64 * 64 + 8 * 64 * 64 // 256)  # q, k, v, o: codes + fp32 scales and zeros
    assert held0 == held1 == attention + (whole - attention) // 2, rec["int8_local_bytes"]
    check_against_reference("3:fp32:1", rec, reference, world=2)


@pytest.mark.parametrize("zero, params, expected", [
    ({"stage": 2, "overlap_comm": True}, {}, True),
    ({"stage": 2}, {}, False),                       # DeepSpeed's default below stage 3
    ({"stage": 3}, {}, True),                        # ... and at stage 3
    ({"stage": 2, "overlap_comm": True}, {"overlap_comm": False}, False),  # the entry wins
    ({"stage": 2, "overlap_comm": True}, {"compress_lowrank": True}, False),  # not combined yet
    ({"stage": 0, "overlap_comm": True}, {}, False),
])
def test_overlap_comm_follows_zero_unless_the_entry_sets_it(zero, params, expected):
    from qgalore_dist.integrations.deepspeed import parse_optimizer_entry

    ds = {"zero_optimization": zero, "optimizer": {"type": "QGaLoreAdamW8bit", "params": params}}
    assert parse_optimizer_entry(ds).config.overlap_comm is expected


def test_int8_partition_option_errors():
    import qgalore_dist
    from qgalore_dist.integrations.deepspeed import parse_optimizer_entry

    with pytest.raises(ValueError, match="int8_partition"):
        parse_optimizer_entry(_entry_config(int8_partition="yes"))
    assert parse_optimizer_entry(_entry_config(int8_partition=False)).int8_partition is False
    model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="stage 3"):
        qgalore_dist.initialize(model=model, config={**_entry_config(int8_partition=True),
                                                     "zero_optimization": {"stage": 2}})
    assert isinstance(model.weight, torch.nn.Parameter) and model.weight.dtype == torch.float32  # untouched
