"""QGaLoreAdamW8bit end to end on tiny LLaMAs: learning with every quantization on (and the
stochastic-rounding ablation), bit-identical resume, NaN/Inf skipping, input validation,
refresh_plan and determinism."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from helpers import (  # noqa: F401  (single_thread is an autouse fixture)
    int8_layers,
    int8_snapshot,
    lm_loss,
    param_names,
    single_thread,
    split_params,
    tiny_llama,
    token_batches,
    train,
    trainable,
)

from qgalore_dist import Int8Linear, QGaLoreAdamW8bit, QGaLoreConfig, prepare_model
from qgalore_dist.train.corpus import builtin_text, byte_batches

# ----------------------------------------------------------------------------- helpers


def _assert_same(a, b, path="state"):
    """Recursive equality of (optimizer) state dicts: tensors with torch.equal."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(map(str, set(a) ^ set(b)))}"
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


# ----------------------------------------------------------------------------- learning

TEXT_CHARS, EVAL_CHARS = 45_000, 5_000
LR, RANK, STEPS, WEIGHT_GROUP = 2e-3, 16, 200, 256


def _train_bytes_lm(model0, *, quantized: bool, stochastic_round: bool = True, galore_lr: float = LR):
    """Train a copy of ``model0`` for STEPS steps on byte-level English; returns
    (held-out loss, optimizer, fraction of INT8 updates below half a quantization step)."""
    text = builtin_text(max_chars=TEXT_CHARS + EVAL_CHARS)
    train_text, eval_text = text[:TEXT_CHARS], text[TEXT_CHARS:]
    model = copy.deepcopy(model0)
    common = dict(lr=LR, rank=RANK, update_proj_gap=50, scale=0.25, seed=0)
    if quantized:
        prepare_model(model, group_size=WEIGHT_GROUP)
        galore = [p for p in model.parameters() if p.dtype == torch.uint8]
        config = QGaLoreConfig(**common, stochastic_round=stochastic_round)  # INT4 P, 8-bit states
    else:
        _, galore = split_params(model)
        config = QGaLoreConfig(**common, proj_bits=None, state_bits=32)  # fp32 everything
    ids = {id(p) for p in galore}
    dense = [p for p in model.parameters() if id(p) not in ids]
    opt = QGaLoreAdamW8bit([{"params": dense}, {"params": galore, "galore": True, "lr": galore_lr}],
                           config, names=param_names(model))

    # Size of each INT8 update relative to the layer's quantization step, before requantization.
    below_half = []
    if quantized:
        original = Int8Linear.set_weight

        def recording(layer, weight, *, stochastic_key=None):
            step = layer.weight_scales.expand(-1, layer.group_size).reshape(weight.shape)
            below_half.append(((weight - layer.dequantized_weight()).abs() < step / 2).float().mean().item())
            original(layer, weight, stochastic_key=stochastic_key)

        Int8Linear.set_weight = recording
    try:
        train(model, opt, byte_batches(train_text, seq_len=64, batch_size=8, seed=0), STEPS)
    finally:
        if quantized:
            Int8Linear.set_weight = original
    evals = byte_batches(eval_text, seq_len=64, batch_size=16, seed=123)
    with torch.no_grad():
        held_out = sum(lm_loss(model, next(evals)).item() for _ in range(4)) / 4
    return held_out, opt, (sum(below_half) / len(below_half) if below_half else None)


def test_quantized_training_learns_like_unquantized_and_needs_stochastic_rounding():
    """Tiny LLaMA (2 layers, hidden 64, byte vocabulary) on real English text, 200 steps.

    Runs: (a) unquantized GaLore (fp32 weights, projector and moments); (b) Q-GaLore: INT8
    weights with stochastic rounding, INT4 projectors, 8-bit moments; (c) as (b) with
    round-to-nearest; (d) as (a) with the GaLore matrices frozen (their lr = 0), the baseline
    that isolates what the GaLore matrices contribute.  At lr 2e-3 most INT8 updates are below
    half a quantization step, so round-to-nearest discards them (the paper's SR ablation).
    """
    model0 = tiny_llama(layers=2, hidden=64, intermediate=256, vocab=256, seq_len=64, seed=0)
    text = builtin_text(max_chars=TEXT_CHARS + EVAL_CHARS)
    evals = byte_batches(text[TEXT_CHARS:], seq_len=64, batch_size=16, seed=123)
    with torch.no_grad():
        initial = sum(lm_loss(model0, next(evals)).item() for _ in range(4)) / 4

    unquantized, _, _ = _train_bytes_lm(model0, quantized=False)
    quantized, opt, sr_below = _train_bytes_lm(model0, quantized=True, stochastic_round=True)
    nearest, _, rtn_below = _train_bytes_lm(model0, quantized=True, stochastic_round=False)
    frozen, _, _ = _train_bytes_lm(model0, quantized=False, galore_lr=0.0)
    print(f"\nheld-out loss: initial {initial:.4f}  unquantized {unquantized:.4f}  "
          f"Q-GaLore+SR {quantized:.4f}  Q-GaLore round-to-nearest {nearest:.4f}  "
          f"GaLore matrices frozen {frozen:.4f}; INT8 updates below half a step: SR run "
          f"{sr_below:.1%}, RTN run {rtn_below:.1%}")

    # Which moments are 8-bit: bitsandbytes keeps tensors < 4096 elements in fp32, so the
    # 64x16 low-rank moments of q/k/v/o and the norms stay fp32; the MLP's 256x16 (16x256)
    # low-rank moments and the 256x64 embedding and head are 8-bit.
    eight_bit = {opt.name_of(p) for p, s in opt.state.items() if "exp_avg" in s and s["exp_avg"].codes is not None}
    mlp = ("gate_proj", "up_proj", "down_proj")
    assert eight_bit == {*(f"model.layers.{i}.mlp.{t}.weight" for i in range(2) for t in mlp),
                         "model.embed_tokens.weight", "lm_head.weight"}
    assert all(opt.state[p]["projector"].bits == 4 for p in opt.galore_params)
    assert opt.svd_count == 14 * 4  # refreshes at steps 0, 50, 100, 150 (no gap doubling yet)

    assert unquantized < 0.6 * initial and quantized < 0.6 * initial  # learns clearly (from ~ln 256)
    assert abs(quantized - unquantized) < 0.10 * unquantized
    # Stochastic rounding keeps (nearly) all of what the GaLore matrices learn...
    gain_full, gain_sr, gain_rtn = frozen - unquantized, frozen - quantized, frozen - nearest
    assert gain_full > 0.01
    assert gain_sr > 0.7 * gain_full
    # ...round to nearest loses most of it: most updates are below half a quantization step.
    assert rtn_below > 0.5
    assert gain_rtn < 0.3 * gain_sr
    assert nearest - quantized > 0.005


# ----------------------------------------------------------------------------- resume


def _resume_setup(seed: int):
    model = prepare_model(tiny_llama(layers=1, hidden=64, intermediate=256, vocab=128, seed=seed), group_size=64)
    config = QGaLoreConfig(lr=3e-3, rank=16, update_proj_gap=2, queue_size=2, cos_threshold=-1.0,
                           proj_group_size=64, seed=7)  # cos >= -1 always: the gap doubles on schedule
    return model, QGaLoreAdamW8bit(trainable(model), config, names=param_names(model))


def test_resume_from_state_dict_is_bit_identical(tmp_path):
    """N=5 steps, save/load through torch.save + torch.load(weights_only=True), then M=6 more
    steps; identical to an uninterrupted 11-step run.  The window holds a projector refresh
    (step 8) at which every gap doubles 4 -> 8 (adaptive schedule state must survive)."""
    n, m = 5, 6
    batches = list(b for _, b in zip(range(n + m), token_batches(vocab=128, batch=4, seq_len=32, seed=3)))

    model, opt = _resume_setup(seed=0)
    gate = model.model.layers[0].mlp.gate_proj.weight
    losses_full, gaps = [], []
    for i in range(n + m):
        losses_full += train(model, opt, iter([batches[i]]), 1)
        gaps.append(opt.state[gate]["projector"].schedule.gap)
    assert gaps[n - 1] == 4 and gaps[-1] == 8  # a gap change inside the resumed window
    assert opt.state[gate]["exp_avg"].codes is not None  # 8-bit moments are part of the checkpoint

    model_a, opt_a = _resume_setup(seed=0)
    losses_a = train(model_a, opt_a, iter(batches[:n]), n)
    torch.save({"model": model_a.state_dict(), "optim": opt_a.state_dict()}, tmp_path / "ckpt.pt")
    del model_a, opt_a
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)

    model_b, opt_b = _resume_setup(seed=1)  # different init: everything must come from the checkpoint
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["optim"])
    svds_before = opt_b.svd_count
    losses_b = train(model_b, opt_b, iter(batches[n:]), m)
    assert opt_b.svd_count > svds_before  # the refresh happened after resuming

    assert all(torch.equal(a, b) for a, b in zip(losses_full, losses_a + losses_b))
    _assert_same(int8_snapshot(model), int8_snapshot(model_b), "int8")
    _assert_same(model.state_dict(), model_b.state_dict(), "model")
    _assert_same(opt.state_dict(), opt_b.state_dict(), "optimizer")


# ----------------------------------------------------------------------------- NaN / Inf


def _poison(model, where: str, value: float) -> None:
    if where == "dense-grad":
        model.model.embed_tokens.weight.grad[3, 5] = value
    elif where == "int8-grad":
        layer = model.model.layers[0].mlp.up_proj
        grad = layer.lowrank_grad if layer.lowrank_grad is not None else layer.weight_grad
        grad.view(-1)[7] = value
    elif where == "norm-grad":
        model.model.norm.weight.grad[0] = value


@pytest.mark.parametrize("where,value", [
    pytest.param("dense-grad", float("nan"), id="nan-in-embedding-grad"),
    pytest.param("int8-grad", float("inf"), id="inf-in-int8-weight-grad"),
    pytest.param("norm-grad", float("-inf"), id="-inf-in-norm-grad"),
    pytest.param("loss", float("nan"), id="nan-loss-all-grads"),
])
def test_non_finite_gradient_skips_the_whole_step(where, value, caplog):
    model = prepare_model(tiny_llama(layers=1, hidden=64, intermediate=256, vocab=128), group_size=64)
    opt = QGaLoreAdamW8bit(trainable(model), QGaLoreConfig(lr=1e-2, rank=16, update_proj_gap=2, proj_group_size=64))
    batches = token_batches(vocab=128, batch=2, seq_len=16, seed=0)
    train(model, opt, batches, 3)

    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = copy.deepcopy(opt.state_dict())
    plan = opt.refresh_plan()

    x = next(batches)
    loss = lm_loss(model, x)
    if where == "loss":
        loss = loss * value
    loss.backward()
    if where != "loss":
        _poison(model, where, value)
    with caplog.at_level(logging.WARNING):
        opt.step()
    opt.zero_grad()

    assert opt.skipped_steps == 1
    assert opt.svds_last_step == 0
    assert any("non-finite" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    _assert_same(weights, model.state_dict(), "model")  # codes, scales, zeros, dense params
    after = opt.state_dict()
    assert after.pop("skipped_steps") == 1 and state.pop("skipped_steps") == 0
    _assert_same(state, after, "optimizer")
    assert opt.refresh_plan() == plan

    # Training continues normally afterwards.
    train(model, opt, iter([x]), 1)
    assert opt.skipped_steps == 1
    assert not torch.equal(weights["model.layers.0.mlp.up_proj.weight"], model.model.layers[0].mlp.up_proj.weight)


# ----------------------------------------------------------------------------- bad input


def _float_matrix_model(m: int = 64, n: int = 48):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(n, m, bias=False))


@pytest.mark.parametrize("rank", [48, 100], ids=["rank-equals-min-dim", "rank-above-min-dim"])
def test_rank_not_below_min_dim_is_rejected_with_the_parameter_name(rank):
    net = _float_matrix_model(64, 48)
    with pytest.raises(ValueError) as err:
        QGaLoreAdamW8bit([{"params": list(net.parameters()), "galore": True}], QGaLoreConfig(rank=rank, proj_bits=None),
                         names={net[0].weight: "blocks.0.proj.weight"})
    msg = str(err.value)
    assert "blocks.0.proj.weight" in msg and "[1, min(m, n) = 48)" in msg and str(rank) in msg


def test_rank_too_large_for_an_int8_layer_names_the_module():
    model = prepare_model(tiny_llama(layers=1, hidden=64, intermediate=256, vocab=128), group_size=64)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*\[1, min\(m, n\) = 64\)"):
        QGaLoreAdamW8bit(trainable(model), QGaLoreConfig(rank=64), names=param_names(model))


def test_projector_group_size_must_divide_min_dim_times_rank():
    net = _float_matrix_model(64, 48)  # P is 8 x 48 = 384 elements; 256 does not divide it
    with pytest.raises(ValueError) as err:
        QGaLoreAdamW8bit([{"params": list(net.parameters()), "galore": True}],
                         QGaLoreConfig(rank=8, proj_bits=4, proj_group_size=256), names={net[0].weight: "proj.weight"})
    assert "proj.weight" in str(err.value) and "group_size=256" in str(err.value) and "384" in str(err.value)
    # 128 divides 384: accepted.
    QGaLoreAdamW8bit([{"params": list(net.parameters()), "galore": True}],
                     QGaLoreConfig(rank=8, proj_bits=4, proj_group_size=128))


@pytest.mark.parametrize("how", ["config", "group-override", "keyword-override"])
def test_unknown_proj_type_is_rejected(how):
    net = _float_matrix_model()
    params = list(net.parameters())
    expected = r"proj_type must be one of \('std', 'reverse_std', 'left', 'right'\), got 'sideways'"
    with pytest.raises(ValueError, match=expected):
        if how == "config":
            QGaLoreConfig(proj_type="sideways")
        elif how == "group-override":
            QGaLoreAdamW8bit([{"params": params, "galore": True, "proj_type": "sideways"}], QGaLoreConfig(rank=8))
        else:
            QGaLoreAdamW8bit([{"params": params, "galore": True}], QGaLoreConfig(rank=8), proj_type="sideways")


@pytest.mark.parametrize("bits", [3, 1, 16, 0], ids=lambda b: f"proj_bits={b}")
def test_proj_bits_outside_2_4_8_lists_allowed_values(bits):
    with pytest.raises(ValueError) as err:
        QGaLoreConfig(proj_bits=bits)
    assert "proj_bits" in str(err.value) and "(2, 4, 8)" in str(err.value)


def test_compress_dense_is_rejected_where_an_engine_owns_the_dense_gradients():
    with pytest.raises(ValueError, match=r"compress_dense.*engine \(DeepSpeed, FSDP2\)"):
        QGaLoreAdamW8bit(list(_float_matrix_model().parameters()), QGaLoreConfig(compress_dense=True),
                         manage_dense=False)


def test_overlap_comm_with_compress_lowrank_is_rejected_naming_both():
    with pytest.raises(ValueError, match=r"overlap_comm cannot be combined with compress_lowrank"):
        QGaLoreConfig(overlap_comm=True, compress_lowrank=True)


def test_unknown_config_key_lists_allowed_keys():
    with pytest.raises(ValueError) as err:
        QGaLoreConfig.from_dict({"lr": 1e-3, "rnak": 8})
    msg = str(err.value)
    assert "rnak" in msg and all(k in msg for k in ("'rank'", "'proj_bits'", "'update_proj_gap'", "'stochastic_round'"))
    with pytest.raises(ValueError, match="rnak"):
        QGaLoreAdamW8bit(list(_float_matrix_model().parameters()), rnak=8)


@pytest.mark.parametrize("target,module", [
    ("embed_tokens", "model.embed_tokens"),
    ("input_layernorm", "model.layers.0.input_layernorm"),
    ("norm", "model.norm"),
], ids=["embedding", "decoder-rmsnorm", "final-rmsnorm"])
def test_prepare_model_rejects_non_linear_targets_by_name(target, module):
    model = tiny_llama(layers=1)
    with pytest.raises(ValueError) as err:
        prepare_model(model, target_modules=[target], group_size=64)
    assert repr(module) in str(err.value) and "nn.Linear" in str(err.value)


def test_prepare_model_target_matching_nothing_is_rejected():
    model = tiny_llama(layers=1)
    with pytest.raises(ValueError, match=r"qkv_proj.*matched no module"):
        prepare_model(model, target_modules=["qkv_proj"], group_size=64)
    assert not int8_layers(model)


def test_prepare_model_weight_group_size_must_divide_the_weight():
    model = tiny_llama(layers=1, hidden=64, intermediate=176)  # 64*64 = 4096, 176*64 = 11264
    with pytest.raises(ValueError) as err:
        prepare_model(model, group_size=100)
    assert "q_proj" in str(err.value) and "100" in str(err.value) and "64x64" in str(err.value)


# ----------------------------------------------------------------------------- refresh plan


def test_refresh_plan_names_exactly_the_layers_that_refresh_next():
    """Attention matrices refresh every 2 steps, MLP matrices every 3 (two GaLore groups),
    so the plans differ from step to step: all, -, attn, mlp, attn, -, all, ..."""
    model = prepare_model(tiny_llama(layers=1, hidden=64, intermediate=128, vocab=128), group_size=64)
    names = param_names(model)
    attn = [p for n, p in model.named_parameters() if "self_attn" in n]
    mlp = [p for n, p in model.named_parameters() if ".mlp." in n]
    dense = [p for p in model.parameters() if p.requires_grad]
    opt = QGaLoreAdamW8bit(
        [{"params": dense}, {"params": attn, "update_proj_gap": 2}, {"params": mlp, "update_proj_gap": 3}],
        QGaLoreConfig(lr=1e-2, rank=8, adaptive_gap=False, proj_group_size=64), names=names)
    attn_names = {names[p] for p in attn}
    mlp_names = {names[p] for p in mlp}
    batches = token_batches(vocab=128, batch=2, seq_len=16, seed=0)
    seen = []
    for step in range(8):
        plan = opt.refresh_plan()
        counts = {opt.name_of(p): opt.state[p]["projector"].schedule.svd_count for p in opt.galore_params}
        train(model, opt, batches, 1)
        refreshed = {opt.name_of(p) for p in opt.galore_params
                     if opt.state[p]["projector"].schedule.svd_count > counts[opt.name_of(p)]}
        assert set(plan) == refreshed, f"step {step}"
        assert len(plan) == len(set(plan)) == opt.svds_last_step
        expected = (attn_names if step % 2 == 0 else set()) | (mlp_names if step % 3 == 0 else set())
        assert set(plan) == expected, f"step {step}"
        seen.append(frozenset(plan))
    assert len(set(seen)) == 4  # all, none, attention only, MLP only


# ----------------------------------------------------------------------------- determinism


def test_two_identical_runs_give_bit_identical_int8_codes():
    runs = []
    for _ in range(2):
        model = prepare_model(tiny_llama(layers=1, hidden=64, intermediate=256, vocab=128, seed=5), group_size=64)
        opt = QGaLoreAdamW8bit(trainable(model), QGaLoreConfig(lr=3e-3, rank=16, update_proj_gap=3,
                                                               proj_group_size=64, seed=11))
        initial = int8_snapshot(model)
        losses = train(model, opt, token_batches(vocab=128, batch=4, seq_len=32, seed=9), 7)
        runs.append((initial, int8_snapshot(model), torch.stack(losses), opt.state_dict()))
    (init_a, final_a, losses_a, state_a), (init_b, final_b, losses_b, state_b) = runs
    _assert_same(init_a, init_b, "initial")
    _assert_same(final_a, final_b, "int8")
    assert torch.equal(losses_a, losses_b)
    _assert_same(state_a, state_b, "optimizer")
    changed = [k for k in final_a if k.endswith(".weight") and not torch.equal(final_a[k], init_a[k])]
    assert len(changed) == 7  # the comparison is not between untouched weights


def _one_clipped_step(max_grad_norm: float, loss_scale: float = 1.0):
    model = prepare_model(tiny_llama(seed=3))
    opt = QGaLoreAdamW8bit(trainable(model), names=param_names(model), rank=8, lr=1e-2, state_bits=32,
                           max_grad_norm=max_grad_norm, update_proj_gap=50)
    x = next(token_batches(vocab=128, batch=2, seq_len=32, seed=5))
    (lm_loss(model, x) * loss_scale).backward()
    full = {n: layer.weight_grad.clone() for n, layer in int8_layers(model)}
    dense = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    opt.step()
    return model, opt, full, dense


def test_clipping_covers_lowrank_and_dense_gradients_with_one_norm():
    model, opt, full, dense = _one_clipped_step(max_grad_norm=0.05)
    # The documented norm: every dense gradient and every GaLore matrix's R = project(G).
    lowrank_sq = sum(float(opt.state[layer.weight]["projector"].project(full[n]).double().square().sum())
                     for n, layer in int8_layers(model))
    dense_sq = sum(float(g.double().square().sum()) for g in dense)
    expected = (lowrank_sq + dense_sq) ** 0.5
    assert opt.last_grad_norm == pytest.approx(expected, rel=1e-6)
    assert lowrank_sq > 0.1 * dense_sq  # both parts really contribute
    assert opt.last_clip_coef == pytest.approx(0.05 / (expected + 1e-6), rel=1e-9) and opt.last_clip_coef < 0.5
    # GaLore matrices: Adam consumed coef * R (first step, fp32 moments: m = (1 - beta1) * g).
    beta1 = opt.config.betas[0]
    for n, layer in int8_layers(model):
        state = opt.state[layer.weight]
        expected_m = (1 - beta1) * opt.last_clip_coef * state["projector"].project(full[n])
        torch.testing.assert_close(opt.codec.decode(state["exp_avg"], signed=True), expected_m, msg=n)
    # Dense parameters: the same weights as an unclipped run whose loss was scaled by coef
    # (only rounding differs; an element whose gradient is near eps moves by up to ~2e-6).
    ref_model, ref_opt, _, _ = _one_clipped_step(max_grad_norm=0.0, loss_scale=opt.last_clip_coef)
    assert ref_opt.last_grad_norm is None and ref_opt.last_clip_coef == 1.0
    for (name, a), (_, b) in zip(model.named_parameters(), ref_model.named_parameters()):
        if a.dtype != torch.uint8:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-6, msg=name)  # lr 1e-2: 0.05% of a step
    unclipped, _, _, _ = _one_clipped_step(max_grad_norm=0.0)
    emb = dict(model.named_parameters())["model.embed_tokens.weight"]
    assert not torch.allclose(emb, dict(unclipped.named_parameters())["model.embed_tokens.weight"])


def test_clipping_threshold_above_the_norm_changes_nothing():
    clipped, opt, _, _ = _one_clipped_step(max_grad_norm=1e6)
    plain, _, _, _ = _one_clipped_step(max_grad_norm=0.0)
    assert opt.last_clip_coef == 1.0 and opt.last_grad_norm > 0
    for (name, a), (_, b) in zip(clipped.named_parameters(), plain.named_parameters()):
        assert torch.equal(a, b), name


def test_random_streams_follow_parameter_names_not_their_order():
    """Named parameters draw their stochastic-rounding bits by name: the same model trained with
    the parameters in another order (as DeepSpeed's integration passes only the INT8 weights)
    gets the same codes."""
    runs = []
    for reverse in (False, True):
        model = prepare_model(tiny_llama(seed=4))
        params = trainable(model)
        opt = QGaLoreAdamW8bit(params[::-1] if reverse else params, names=param_names(model), rank=8,
                               lr=1e-2, update_proj_gap=2)
        train(model, opt, token_batches(vocab=128, batch=2, seq_len=32, seed=6), steps=3)
        runs.append(int8_snapshot(model))
    assert runs[0].keys() == runs[1].keys()
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name
