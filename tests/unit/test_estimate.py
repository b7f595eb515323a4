"""``qgalore_dist.estimate`` and the ``qgalore-estimate`` console script: the CLI end to end, the
estimate's figures against the validated per-rank / per-step closed forms, and internal
consistency (owned parts sum to one copy, refresh >= steady, the streamed refresh's bound, run
averages between steady and refresh, activations by hand)."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qgalore_dist.estimate import EstimateRequest, comm, comm_fsdp, estimate, fsdp, ranks
from qgalore_dist.estimate.activations import activation_bytes
from qgalore_dist.estimate.cli import main
from qgalore_dist.estimate.model import MODELS_DIR, load_model_config, model_shapes, model_tensors
from qgalore_dist.estimate.schedule import adaptive_refresh_steps, fixed_refresh_steps

REPO = Path(__file__).resolve().parents[2]
ENGINES = ("ddp", "zero2", "zero3", "fsdp2")


def _row(e, key):
    return next(r for r in (*e.ours, *e.baselines) if r.key == key)


# ----------------------------------------------------------------------------- CLI
def test_cli_builtin_name_prints_every_section(capsys):
    assert main(["--model", "llama_7b", "--world", "8", "--engine", "fsdp2", "--rank", "1024", "--seq", "2048",
                 "--activation-checkpointing"]) == 0
    out = capsys.readouterr().out
    for text in ("llama_7b: 6,738,415,616 parameters", "ours (fsdp2), steady step", "ours (fsdp2), refresh step",
                 "FSDP2 + AdamW", "FSDP2 + torchao AdamW8bit", "Worst step: the steady step", "Activations per rank",
                 "checkpointing on", "Bytes per rank per step"):
        assert text in out, text
    # The streamed refresh (default) keeps a rank's full gradients to the matrices it owns; without it the
    # refresh step is the worst (every rank holds every full gradient).
    assert main(["--model", "llama_7b", "--world", "8", "--engine", "fsdp2", "--rank", "1024",
                 "--no-streamed-refresh"]) == 0
    assert "Worst step: the refresh step" in capsys.readouterr().out


def _hf_config(path: Path) -> dict:
    fields = json.loads((MODELS_DIR / "llama_60m.json").read_text())
    path.write_text(json.dumps({**fields, "num_hidden_layers": 2}))
    return fields


def test_cli_hf_config_file_and_directory(tmp_path, capsys):
    _hf_config(tmp_path / "my_model.json")
    assert main(["--model", str(tmp_path / "my_model.json"), "--world", "2", "--engine", "ddp"]) == 0
    assert capsys.readouterr().out.startswith("my_model: ")
    model_dir = tmp_path / "checkpoint-7"
    model_dir.mkdir()
    _hf_config(model_dir / "config.json")
    assert main(["--model", str(model_dir), "--world", "2", "--engine", "zero2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    shapes = model_shapes(str(model_dir), 1)
    assert got["model"] == "checkpoint-7"
    assert got["request"]["rank"] == min(min(t.shape) for t in shapes.galore)  # an unknown size: r <= min(m, n)
    assert got["params"]["total"] == shapes.total


@pytest.mark.parametrize("argv,names", [
    (["--model", "llama_13m", "--world", "8"], ["--model", "'llama_13m'", "llama_7b", "llama_70b"]),
    (["--model", "llama_7b", "--world", "8", "--engine", "zero4"], ["--engine", "'zero4'", "fsdp2", "zero3"]),
    (["--model", "llama_7b", "--world", "0"], ["--world"]),
    (["--model", "llama_7b", "--world", "8", "--rank", "5000"], ["--rank", "4096"]),
    (["--model", "llama_7b", "--world", "8", "--engine", "ddp", "--int8-partitioned"], ["--int8-partitioned", "zero3"]),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, names, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own checks (choices)
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("qgalore-estimate: error: "), err
    for name in names:
        assert name in err, (name, err)


def test_cli_json_is_the_same_figures(capsys):
    assert main(["--model", "llama_60m", "--world", "4", "--engine", "ddp", "--seq", "256", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    e = estimate(EstimateRequest(model="llama_60m", world=4, engine="ddp", seq=256))
    assert got == json.loads(json.dumps(e.as_dict()))
    assert {r["key"] for r in got["ours"]} == {"ours_steady", "ours_refresh"} and got["activations"]["total"] > 0


def test_python_dash_m_end_to_end():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "qgalore_dist.estimate", "--model", "llama_70b", "--world", "64",
                           "--engine", "zero3", "--int8-partitioned", "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["request"]["int8_partitioned"] and got["galore_matrices"] == 80 * 7
    bad = subprocess.run([sys.executable, "-m", "qgalore_dist.estimate", "--model", "nope", "--world", "8"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "--model" in bad.stderr


def test_console_script_entry_point_is_declared():
    text = (REPO / "setup.cfg").read_text()
    assert "qgalore-estimate = qgalore_dist.estimate.cli:main" in text


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("overrides", [
    {}, {"num_key_value_heads": 2}, {"tie_word_embeddings": True}, {"attention_bias": True, "mlp_bias": True},
], ids=["mha", "gqa", "tied", "biases"])
def test_shapes_from_config_are_the_hf_models(overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {**load_model_config("llama_20m")[1], "num_hidden_layers": 2, **overrides}
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**fields))
    assert [(t.name, t.shape) for t in model_tensors(fields)] == [(n, tuple(p.shape))
                                                                  for n, p in model.named_parameters()]


def test_llama_70b_is_llama2_70b():
    label, fields = load_model_config("llama_70b")
    assert (fields["hidden_size"], fields["intermediate_size"], fields["num_hidden_layers"],
            fields["num_attention_heads"], fields["num_key_value_heads"], fields["vocab_size"]) == (
        8192, 28672, 80, 64, 8, 32000)
    assert round(model_shapes("llama_70b", 1024).total / 1e9, 2) == 68.98  # LLaMA-2-70B's published count
    assert (REPO / "configs" / "models" / "llama_70b.json").read_text() == (MODELS_DIR / "llama_70b.json").read_text()


# ----------------------------------------------------------------------------- figures = the validated closed forms
@pytest.mark.parametrize("engine", ENGINES)
def test_memory_rows_are_the_validated_per_rank_closed_forms(engine):
    e = estimate(EstimateRequest(model="llama_60m", world=8, engine=engine, rank=128))
    shapes = model_shapes("llama_60m", 128)
    if engine == "fsdp2":
        fn = {k: lambda s, n, r, st=st: fsdp.fsdp_rank_bytes(s, n, r, steady=st)
              for k, st in (("steady", True), ("refresh", False))}
    else:
        zero = {"ddp": None, "zero2": ranks.ZeroBuckets(), "zero3": ranks.ZERO3_DEFAULT}[engine]
        fn = {k: lambda s, n, r, st=st: ranks.ours_rank_bytes(s, n, r, steady=st, zero=zero,
                                                              zero_stage=3 if engine == "zero3" else 2,
                                                              int8_partitioned=engine == "zero3")
              for k, st in (("steady", True), ("refresh", False))}
    for kind in ("steady", "refresh"):
        worst = ranks.worst_rank(fn[kind], shapes, 8)
        row = _row(e, f"ours_{kind}")
        assert row.rank == worst["rank"] and all(row.bytes[k] == worst[k] for k in row.bytes)
    torchao = ranks.worst_rank(lambda s, n, r: fsdp.fsdp2_baseline_bytes(s, n, r, eight_bit=True), shapes, 8)
    assert _row(e, "fsdp2_torchao_adamw8bit").bytes["model_states"] == torchao["model_states"]


def test_seven_b_at_eight_ranks_matches_the_benchmark_rows():
    """The FSDP2 figures the memory benchmark printed before streamed refreshes (steady 7.06,
    refresh 25.99 GiB model states) and ZeRO-2 + AdamW's DeepSpeed figure (26.7 GB)."""
    f = estimate(EstimateRequest(model="llama_7b", world=8, engine="fsdp2", streamed_refresh=False))
    assert round(_row(f, "ours_steady").bytes["model_states"] / 2**30, 2) == 7.06
    assert round(_row(f, "ours_refresh").bytes["model_states"] / 2**30, 2) == 25.99
    assert f.worst_step == "refresh"
    z = estimate(EstimateRequest(model="llama_7b", world=8, engine="zero2"))
    assert round(_row(z, "zero2_adamw").bytes["model_states"] / 2**30, 1) == 26.7


@pytest.mark.parametrize("engine", ENGINES)
def test_traffic_rows_are_the_metered_closed_forms(engine):
    e = estimate(EstimateRequest(model="llama_60m", world=8, engine=engine, rank=128))
    t = model_shapes("llama_60m", 128).as_tuples()
    ours = e.traffic[0]
    if engine == "fsdp2":
        steady = comm_fsdp.ours_step(t, 1, 8, rank=128, projection="sharded", payload=4)["total"]
        refresh = comm_fsdp.ours_step(t, 1, 8, rank=128, projection="sharded", payload=4, refresh=True)["total"]
        base = comm_fsdp.baseline_step(t, 1, 8)["total"]
    elif engine == "ddp":
        kw = dict(b_lowrank=4, b_dense_grad=4, b_dense_param=2)
        steady = sum(comm.ours_steady(t, 128, 8, **kw).values())
        refresh = sum(comm.ours_refresh_all(t, 128, 8, **kw).values())
        base = comm.ddp_bytes(sum(comm.numel(s) for _, s, _ in t), 8)
    else:
        stage = int(engine[-1])
        part = stage == 3  # qgalore_dist.initialize partitions INT8 weights under ZeRO-3
        steady = sum(comm.ours_zero(t, 128, 8, stage=stage, int8_partitioned=part).values())
        refresh = sum(comm.ours_zero(t, 128, 8, stage=stage, refresh=True, int8_partitioned=part).values())
        base = (comm.zero2_bytes if stage == 2 else comm.zero3_bytes)(sum(comm.numel(s) for _, s, _ in t), 8)
    assert (ours.steady, ours.refresh) == (steady, refresh)
    assert {r.steady for r in e.traffic[1:-1]} == {base}


# ----------------------------------------------------------------------------- internal consistency
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("streamed", [False, True])
def test_refresh_step_holds_at_least_a_steady_steps_weights_and_state(engine, streamed):
    e = estimate(EstimateRequest(model="llama_7b", world=8, engine=engine, streamed_refresh=streamed))
    steady, refresh = (_row(e, k).bytes for k in ("ours_steady", "ours_refresh"))
    # A streamed refresh peaks in backward, before the step's exchange buffers exist.
    for key in ("weights", "optimizer", "projectors") + (() if streamed else ("comm_buffers",)):
        assert refresh[key] >= steady[key], key
    if not streamed:
        assert refresh["gradients"] > steady["gradients"] and refresh["peak"] > steady["peak"]
        assert e.worst_step == "refresh" and "every rank" in e.worst_reason


def _zero(engine: str):
    return {"ddp": None, "zero2": ranks.ZeroBuckets(), "zero3": ranks.ZERO3_DEFAULT}[engine]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("model,world", [("llama_7b", 8), ("llama_7b", 64), ("llama_70b", 64)])
def test_streamed_refresh_stays_within_one_matrix_and_one_bucket_of_a_steady_step(engine, model, world):
    """DESIGN I3 with a streamed refresh, SVDs in backward: a rank holds the low-rank results of the
    matrices it owns, one full gradient being refreshed and three buckets (forming, in flight, the
    collective's own); that stays within one largest fp32 gradient and three buckets of a steady
    step -- and below the old path's refresh."""
    shapes = model_shapes(model, 1024)
    full = [t.numel for t in shapes.galore]
    largest = 4 * max(full)
    req = dict(model=model, world=world, engine=engine)
    today, streamed = (estimate(EstimateRequest(**req, streamed_refresh=s)) for s in (False, True))
    steady, refresh_s, refresh_t = (_row(today, "ours_steady").bytes, _row(streamed, "ours_refresh").bytes,
                                    _row(today, "ours_refresh").bytes)
    assert refresh_s["model_states"] <= steady["model_states"] + largest + ranks.streamed_buffers(shapes, world)
    assert refresh_s["model_states"] < refresh_t["model_states"]
    owners = ranks.galore_owners(shapes, world)
    rank = _row(streamed, "ours_refresh").rank
    owned = [t for t in shapes.galore if owners[t.name] == rank]
    held = (4 * sum(ranks.lowrank_numel(t.shape, 1024) for t in owned) + 4 * max(t.numel for t in owned)
            + ranks.streamed_buffers(shapes, world))
    if engine != "fsdp2":  # FSDP2's refresh row is one record (estimate/fsdp.py); the others are per phase
        in_backward = ranks.ours_rank_bytes(shapes, world, rank, steady=False, phase="backward", zero=_zero(engine),
                                            zero_stage=3 if engine == "zero3" else 2,
                                            int8_partitioned=engine == "zero3")
        dense = in_backward.gradients - held
        assert refresh_t["gradients"] - dense == 4 * sum(full)


@pytest.mark.parametrize("world", [2, 8, 64])
def test_owned_parts_over_ranks_are_one_copy(world):
    shapes = model_shapes("llama_7b", 1024)
    one = ranks.ours_rank_bytes(shapes, 1, 0, steady=True)
    per_rank = [ranks.ours_rank_bytes(shapes, world, r, steady=False, streamed_refresh=True, phase="svd",
                                      svd_at_completion=False) for r in range(world)]
    assert sum(b.optimizer for b in per_rank) == one.optimizer
    dense = shapes.lay.dense_bytes * sum(t.numel for t in shapes.dense)
    owned_full = sum(b.gradients - dense for b in per_rank)
    assert owned_full == 4 * sum(t.numel for t in shapes.galore)  # every full gradient on exactly one owner
    z3 = dict(steady=True, zero=ranks.ZERO3_DEFAULT, zero_stage=3)
    replicated = ranks.ours_rank_bytes(shapes, world, 0, **z3)
    parts = [replicated.weights - ranks.ours_rank_bytes(shapes, world, r, int8_partitioned=True, **z3).weights
             for r in range(world)]
    int8 = sum(t.numel + 8 * (t.numel // 256) for t in shapes.galore)
    assert set(parts) == {int8 - -(-int8 // world)}  # each rank keeps ceil(1/N) of the codes + scales


def test_int8_partitioned_gathers_one_point_zero_three_bytes_per_weight():
    t = model_shapes("llama_7b", 1024).as_tuples()
    galore = sum(comm.numel(s) for _, s, g in t if g)
    part = comm.ours_zero(t, 1024, 8, stage=3, int8_partitioned=True)["int8_all_gather"]
    assert part == pytest.approx(2 * 7 / 8 * galore * (1 + 8 / 256))
    assert comm.ours_zero(t, 1024, 8, stage=3)["int8_all_gather"] == 0.0


def test_run_average_lies_between_steady_and_refresh():
    e = estimate(EstimateRequest(model="llama_7b", world=8, engine="fsdp2", train_steps=10_000))
    ours = e.traffic[0]
    assert ours.steady < ours.average_adaptive < ours.average_fixed < ours.refresh
    assert e.refresh_steps == {"fixed": math.ceil(10_000 / 200), "adaptive": len(adaptive_refresh_steps(10_000, 200))}
    k = e.refresh_steps["fixed"]
    assert ours.average_fixed == pytest.approx(((10_000 - k) * ours.steady + k * ours.refresh) / 10_000)
    for base in e.traffic[1:]:
        assert base.steady == base.refresh == base.average_fixed == base.average_adaptive
    assert fixed_refresh_steps(1000, 200) == [0, 200, 400, 600, 800]


def test_activations_by_hand():
    cfg = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
               num_hidden_layers=3, vocab_size=100)
    a = activation_bytes(cfg, micro_batch=2, seq=8)
    sb, h, h_kv = 16, 64, 32
    per_layer = 2 * sb * (6 * h + 2 * h_kv + 4 * 160) + 4 * 4 * sb
    assert a.per_layer == per_layer and a.head == 4 * sb * h + 10 * sb * 100
    assert a.total == 3 * per_layer + a.head
    ckpt = activation_bytes(cfg, micro_batch=2, seq=8, checkpointing=True)
    assert ckpt.total == 3 * 2 * sb * h + per_layer + a.head < a.total
    eager = activation_bytes(cfg, micro_batch=2, seq=8, fused_attention=False)
    assert eager.per_layer - per_layer == 2 * 4 * 8 * 8 * 2 - 4 * 4 * sb


# ----------------------------------------------------------------------------- layering
def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_seven_x_with_compression_holds_over_a_run_only_while_the_gaps_grow():
    """Issue 16 item 3 (``benchmarks/comm.py`` section 3): LLaMA-7B, r = 1024, N = 8, everything 8-bit.
    The steady step and the adaptive best case clear 7x; 150k steps at a fixed T = 200 do not, and a
    refresh step alone moves more bytes than DDP-bf16 (its full gradients travel in fp32)."""
    from qgalore_dist.estimate.schedule import run_average

    tensors = model_shapes("llama_7b", 1).as_tuples()
    kw = dict(b_lowrank=1, b_dense_grad=1, b_dense_param=2, compress=True, compress_dense=True)
    steady = sum(comm.ours_steady(tensors, 1024, 8, **kw).values())
    refresh = sum(comm.ours_refresh_all(tensors, 1024, 8, **kw).values())
    ddp = comm.ddp_bytes(sum(comm.numel(s) for _, s, _ in tensors), 8)
    fixed = run_average(steady, refresh, fixed_refresh_steps(150_000, 200), 150_000).average
    adaptive = run_average(steady, refresh, adaptive_refresh_steps(150_000, 200), 150_000).average
    assert ddp / steady >= 7 and ddp / adaptive >= 7 > ddp / fixed > 6.8
    assert refresh > ddp


def test_no_test_imports_a_benchmark_script():
    offenders = [p.relative_to(REPO).as_posix() for p in (REPO / "tests").rglob("*.py")
                 if any(m == "benchmarks" or m.startswith("benchmarks.") for m in _imports(p))]
    assert offenders == []


def test_benchmarks_import_each_other_without_a_cycle():
    graph = {p.stem: {m.split(".")[1] for m in _imports(p) if m.startswith("benchmarks.") and m.count(".") >= 1}
             for p in (REPO / "benchmarks").glob("*.py")}
    graph = {k: {d for d in v if d in graph and d != k} for k, v in graph.items()}
    done: set[str] = set()

    def visit(node: str, stack: tuple[str, ...]) -> None:
        assert node not in stack, " -> ".join((*stack, node))
        if node not in done:
            for dep in graph[node]:
                visit(dep, (*stack, node))
            done.add(node)

    for node in graph:
        visit(node, ())


def test_only_train_level_code_imports_the_estimator():
    pkg = REPO / "qgalore_dist"
    offenders = [p.relative_to(REPO).as_posix() for p in pkg.rglob("*.py")
                 if p.parent.name not in ("estimate", "train")
                 and any("estimate" in m.split(".") for m in _imports(p))]
    assert offenders == []
