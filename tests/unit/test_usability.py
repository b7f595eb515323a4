"""Issue 18: nothing silently accepted, nothing misleading.  Each test failed before its fix."""

from __future__ import annotations

import pytest

from qgalore_dist import QGaLoreConfig, prepare_model
from qgalore_dist.core import Int8Linear


# ------------------------------------------------------------------ QGaLoreConfig types and signs
@pytest.mark.parametrize("key, value, expected", [
    ("rank", True, "QGaLoreConfig.rank must be an int >= 1, got True"),
    ("rank", 8.0, "QGaLoreConfig.rank must be an int >= 1, got 8.0"),
    ("lr", "0.01", "QGaLoreConfig.lr must be a float >= 0, got '0.01'"),
    ("scale", "0.25", "QGaLoreConfig.scale must be a float > 0, got '0.25'"),
    ("scale", -0.25, "QGaLoreConfig.scale must be a float > 0, got -0.25"),
    ("eps", "1e-8", "QGaLoreConfig.eps must be a float > 0"),
    ("weight_decay", None, "QGaLoreConfig.weight_decay must be a float >= 0"),
    ("update_proj_gap", False, "QGaLoreConfig.update_proj_gap must be an int >= 1"),
    ("proj_bits", True, "QGaLoreConfig.proj_bits must be None or one of"),
    ("state_bits", 8.0, "QGaLoreConfig.state_bits must be 8 or 32"),
    ("cos_threshold", "0.4", "QGaLoreConfig.cos_threshold must be a float in [-1, 1]"),
    ("svd_oversample", -1, "QGaLoreConfig.svd_oversample must be an int >= 0"),
    ("svd_power_iters", 1.5, "QGaLoreConfig.svd_power_iters must be an int >= 0"),
    ("max_grad_norm", "1", "QGaLoreConfig.max_grad_norm must be a float >= 0"),
    ("betas", ("0.9", 0.95), "QGaLoreConfig.betas must be two floats in [0, 1)"),
    ("betas", 0.9, "QGaLoreConfig.betas must be two floats in [0, 1)"),
    ("stochastic_round", 1, "QGaLoreConfig.stochastic_round must be a bool"),
    ("compress_dense", "no", "QGaLoreConfig.compress_dense must be a bool"),
])
def test_config_type_checks_every_field_by_name(key, value, expected):
    with pytest.raises(ValueError) as info:
        QGaLoreConfig(**{key: value})
    assert expected in str(info.value)


def test_config_accepts_ints_for_floats():
    cfg = QGaLoreConfig(lr=1, scale=1, eps=1, weight_decay=0, max_grad_norm=1, betas=[0, 0.5])
    assert cfg.betas == (0, 0.5)


# ------------------------------------------------------------------ target_modules
def _tiny(**kw):
    from helpers import tiny_llama

    return tiny_llama(layers=1, hidden=64, intermediate=128, vocab=96, **kw)


def test_target_matching_nothing_beside_others_is_refused_with_the_nearest_name():
    model = _tiny()
    with pytest.raises(ValueError) as info:
        prepare_model(model, target_modules=["q_proj", "v_pro"], group_size=64)
    message = str(info.value)
    assert "'v_pro' matched no module" in message and "did you mean 'v_proj'?" in message
    assert not any(isinstance(m, Int8Linear) for m in model.modules())  # nothing half-converted


def test_tied_target_is_refused_naming_both_parameters():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                         num_hidden_layers=1, vocab_size=96, tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ValueError) as info:
        prepare_model(model, target_modules=["q_proj", "lm_head"], group_size=64)
    assert "lm_head.weight is tied to model.embed_tokens.weight" in str(info.value)
    assert model.lm_head.weight is model.model.embed_tokens.weight


# ------------------------------------------------------------------ rank against the model; overrides
def _entry(**params):
    from qgalore_dist.integrations.deepspeed import parse_optimizer_entry

    return parse_optimizer_entry({"optimizer": {"type": "QGaLoreAdamW8bit", "params": params}})


def test_rank_too_large_for_the_model_names_the_layer_and_the_flag():
    from qgalore_dist.integrations.deepspeed import matrix_ranks

    with pytest.raises(ValueError) as info:
        matrix_ranks(_tiny(), _entry(rank=128))
    message = str(info.value)
    assert "optimizer.params.rank = 128 is too large for model.layers.0.self_attn.q_proj (64x64" in message
    assert "--optim.rank 16" in message


def test_rank_overrides_split_param_groups_with_their_rank():
    from qgalore_dist import QGaLoreAdamW8bit
    from qgalore_dist.integrations.deepspeed import galore_params, matrix_ranks

    model, entry = _tiny(), _entry(rank=8, rank_overrides={"k_proj|v_proj": 16}, proj_group_size=64)
    ranks = matrix_ranks(model, entry)
    assert ranks["model.layers.0.self_attn.k_proj"] == 16 and ranks["model.layers.0.self_attn.q_proj"] == 8
    prepare_model(model, group_size=64)
    opt = QGaLoreAdamW8bit(galore_params(model, entry, ranks), entry.config,
                           names={p: n for n, p in model.named_parameters()}, manage_dense=False)
    got = {opt.name_of(p): opt.state[p]["projector"].rank for p in opt.galore_params}
    assert got["model.layers.0.self_attn.v_proj.weight"] == 16 and got["model.layers.0.mlp.up_proj.weight"] == 8
    assert len(got) == 7


@pytest.mark.parametrize("overrides, message", [
    ({"x_proj": 4}, "rank_overrides: 'x_proj' selects none of the target modules"),
    ({"q_proj": 64}, "rank_overrides['q_proj'] = 64 is too large"),
    ({"q_proj": True}, "must map a regex (string) to an int >= 1"),
    ({"(": 4}, "'(' is not a valid regex"),
])
def test_bad_rank_overrides_are_refused(overrides, message):
    from qgalore_dist.integrations.deepspeed import matrix_ranks

    with pytest.raises(ValueError) as info:
        matrix_ranks(_tiny(), _entry(rank=8, rank_overrides=overrides))
    assert message in str(info.value)


# ------------------------------------------------------------------ qgalore-train: mistakes found at parse time
def test_model_json_with_a_misspelled_key_names_the_nearest(tmp_path, capsys):
    import json

    from qgalore_dist.train.loop import main

    path = tmp_path / "model.json"
    path.write_text(json.dumps({"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                                "num_hiden_layers": 2}))
    assert main(["--model.name", str(path), "--run_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qgalore-train: error: model.name:")
    assert "unknown LlamaConfig key 'num_hiden_layers'; did you mean 'num_hidden_layers'?" in err[0]
    assert not (tmp_path / "run").exists()


def test_shipped_ds_config_rank_checked_against_the_default_model_at_parse_time(tmp_path, capsys):
    import os

    from qgalore_dist.train.loop import main

    ds = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "ds", "zero2_bf16.json")
    assert main(["--ds_config", ds, "--run_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qgalore-train: error: model tiny: ds_config optimizer.params.rank = 128 is too large")
    assert "--optim.rank 32" in err and "Traceback" not in err


def test_user_mistake_is_one_line_and_exit_2(capsys):
    from qgalore_dist.train.loop import main

    assert main(["--optim.rnak", "8"]) == 2
    assert capsys.readouterr().err == ("qgalore-train: error: unknown config key 'optim.rnak'; did you mean "
                                       "'rank'? valid keys: " + repr(__import__("qgalore_dist.integrations.deepspeed",
                                       fromlist=["x"]).allowed_params()) + "\n")


# ------------------------------------------------------------------ exported special tokens
def test_model_takes_bos_and_eos_from_the_tokenizer():
    from qgalore_dist.train.config import TrainConfig
    from qgalore_dist.train.loop import build_model
    from qgalore_dist.train.tokenizer import BPETokenizer

    tok = BPETokenizer.train(["the cat sat on the mat"] * 20, vocab_size=300)
    assert tok.eos_id == 0  # <|endoftext|> is the first special token
    model = build_model(TrainConfig(), vocab_size=tok.vocab_size, seq_len=16, tokenizer=tok)
    assert (model.config.bos_token_id, model.config.eos_token_id) == (0, 0)


# ------------------------------------------------------------------ re-running a finished run
def test_rerunning_a_finished_run_changes_nothing(tmp_path, capsys):
    import json
    import os

    from qgalore_dist.checkpoint import FORMAT_VERSION
    from qgalore_dist.train.config import parse_args
    from qgalore_dist.train.loop import train

    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step5"
    ckpt.mkdir(parents=True)
    (ckpt / "manifest.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "files": {}}))
    (run / "summary.json").write_text('{"steps": 5, "final_val_ppl": 12.5}\n')
    (run / "metrics.jsonl").write_text('{"kind": "eval", "step": 5}\n')
    before = {p: open(os.path.join(run, p)).read() for p in ("summary.json", "metrics.jsonl")}
    cfg, ds = parse_args(["--run_dir", str(run), "--schedule.steps", "5"])
    assert train(cfg, ds) == 0
    assert f"{run}: already complete at step 5; raise --schedule.steps to continue" in capsys.readouterr().out
    assert {p: open(os.path.join(run, p)).read() for p in before} == before
    assert sorted(os.listdir(run)) == ["checkpoints", "metrics.jsonl", "summary.json"]


# ------------------------------------------------------------------ log lines, summary and plots say what they show
def _record(step, svds=0, loss=1.0):
    return {"step": step, "tokens": 512 * step, "loss": loss, "lr": 1e-3, "step_time_s": 0.5, "tokens_per_s": 1000.0,
            "svd_count": svds, "svd_layers": [f"l{i}" for i in range(svds)], "comm_bytes": {"lowrank_reduce": 1000.0},
            "mem_bytes": 1000, "mem_kind": "host peak RSS"}


def test_svd_column_counts_svds_since_the_last_line_and_summary_labels(tmp_path, capsys):
    from qgalore_dist.train.metrics import RunLogger

    log = RunLogger(str(tmp_path), rank=0, total_steps=4, log_every=2, tensorboard=False)
    for step, svds in ((1, 3), (2, 0), (3, 2), (4, 0)):
        log.log_step(_record(step, svds, loss=float(step)))
    log.summary_extra["svds_whole_run"] = 12
    summary = log.close()
    out = capsys.readouterr().out
    assert "step 0.50s  svd 3  comm" in out and "step 0.50s  svd 2  comm" in out  # steps 1-2, then 3-4
    assert "train loss        3.5000  (mean of the last 2 steps)" in out
    assert "(host peak RSS, rank 0)" in out and summary["peak_mem_kind"] == "host peak RSS"
    assert "SVDs              5 this run, 12 whole run (resumed)" in out


def test_resumes_are_recorded_and_marked_in_memory_png(tmp_path, monkeypatch):
    from qgalore_dist.train import plot
    from qgalore_dist.train.metrics import RunLogger

    first = RunLogger(str(tmp_path), rank=0, total_steps=4, log_every=1, tensorboard=False)
    for step in (1, 2):
        first.log_step(_record(step))
    first.close()
    second = RunLogger(str(tmp_path), rank=0, total_steps=4, start_step=2, log_every=1, tensorboard=False)
    for step in (3, 4):
        second.log_step(_record(step))
    second.close()
    assert plot.load_resumes(str(tmp_path)) == [2]
    drawn = {}
    real = plot.plot_memory

    def spy(train, path, resumes=()):
        drawn["resumes"] = list(resumes)
        return real(train, path, resumes)

    monkeypatch.setattr(plot, "plot_memory", spy)
    plot.plot_run(str(tmp_path))
    assert drawn["resumes"] == [2]


# ------------------------------------------------------------------ DeepSpeed's dense traffic counted and labelled
def test_deepspeed_dense_bytes_closed_form():
    from qgalore_dist.train.dense_comm import dense_bytes_per_step

    common = dict(world=4, numel=1000, grad_bytes=2, param_bytes=2)
    assert dense_bytes_per_step(stage=0, **common) == pytest.approx(2 * 0.75 * 1000 * 2)
    assert dense_bytes_per_step(stage=1, **common) == pytest.approx(0.75 * 1000 * 4)
    assert dense_bytes_per_step(stage=2, accumulation=3, **common) == pytest.approx(0.75 * 1000 * (3 * 2 + 2))
    assert dense_bytes_per_step(stage=3, accumulation=2, **common) == pytest.approx(2 * 0.75 * 1000 * 6)
    assert dense_bytes_per_step(stage=2, world=1, numel=1000, grad_bytes=2, param_bytes=2) == 0


def test_summary_labels_package_and_deepspeed_traffic(tmp_path, capsys):
    from qgalore_dist.train.metrics import RunLogger

    log = RunLogger(str(tmp_path), rank=0, total_steps=1, log_every=1, tensorboard=False)
    record = _record(1)
    record["comm_bytes"] = {"lowrank_reduce": 1000.0, "deepspeed_dense": 3000.0}
    log.log_step(record)
    summary = log.close()
    assert summary["mean_comm_bytes_per_step"] == 4000.0
    assert ("sent per step     4.0kB  (Q-GaLore exchanges 1.0kB: lowrank_reduce 1.0kB; DeepSpeed dense "
            "parameters 3.0kB, closed form)") in capsys.readouterr().out


# ------------------------------------------------------------------ --help and example configs
def test_help_shows_every_key_with_its_docstring(capsys):
    from qgalore_dist.train.loop import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "  --schedule.steps (default 300)\n      Optimizer steps to train to" in out
    assert "  --dist.timeout_s (default None)" in out and "DEEPSPEED_TIMEOUT" in out and "configs/train/" in out
    assert "  --data.tokenizer (default 'bpe')" in out and "rank_overrides" in out


def test_example_training_configs_parse_and_fit_their_models(monkeypatch):
    import glob
    import os

    from qgalore_dist.train.config import parse_args
    from qgalore_dist.train.loop import check_model_config

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    monkeypatch.chdir(root)
    files = sorted(glob.glob("configs/train/*.yaml"))
    assert len(files) >= 2
    for path in files:
        cfg, ds = parse_args(["--config", path])
        check_model_config(cfg, ds)
