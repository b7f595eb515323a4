"""Int8Linear and model conversion: forward/backward against an fp32 nn.Linear holding the
dequantized weight, gradient accumulation, prepare_model/export_model on a tiny LLaMA."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import GALORE_TARGETS, int8_layers, single_thread, tiny_llama, trainable  # noqa: F401  (fixture)

from qgalore_dist import Int8Linear, QGaLoreAdamW8bit, QGaLoreConfig, export_model, prepare_model
from qgalore_dist.core import int8_layer_of

# (in_features, out_features, leading batch dims, group size): awkward, non-square shapes
# whose groups span rows (48 * 40 = 1920 = 30 groups of 64).
SHAPES = [
    pytest.param(48, 40, (3, 5), 64, id="in48-out40-batch3x5-g64"),
    pytest.param(40, 48, (2, 3, 4), 96, id="in40-out48-batch2x3x4-g96"),
    pytest.param(64, 32, (7,), 256, id="in64-out32-batch7-g256"),
]


def _pair(in_f: int, out_f: int, bias: bool, group_size: int, seed: int = 0):
    """An Int8Linear and an fp32 nn.Linear holding exactly its dequantized weight."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_f, out_f, bias=bias)
    if bias:
        with torch.no_grad():
            linear.bias.normal_()
    layer = Int8Linear.from_linear(linear, group_size=group_size)
    ref = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        ref.weight.copy_(layer.dequantized_weight())
        if bias:
            ref.bias.copy_(layer.bias)
    return layer, ref


def _input(batch: tuple[int, ...], in_f: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*batch, in_f, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("in_f,out_f,batch,group_size", SHAPES)
def test_forward_equals_linear_of_dequantized_weight(in_f, out_f, batch, group_size, bias):
    layer, _ = _pair(in_f, out_f, bias, group_size)
    x = _input(batch, in_f)
    expected = F.linear(x, layer.dequantized_weight(), layer.bias)
    out = layer(x)
    assert out.shape == (*batch, out_f)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("in_f,out_f,batch,group_size", SHAPES)
def test_backward_matches_autograd_of_fp32_linear(in_f, out_f, batch, group_size, bias):
    layer, ref = _pair(in_f, out_f, bias, group_size)
    x = _input(batch, in_f).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    grad_out = torch.randn(*batch, out_f, generator=torch.Generator().manual_seed(2))

    (layer(x) * grad_out).sum().backward()
    (ref(x_ref) * grad_out).sum().backward()

    assert layer.weight.grad is None and not layer.weight.requires_grad  # uint8 codes stay frozen
    assert layer.weight_grad.dtype == torch.float32 and layer.weight_grad.shape == (out_f, in_f)
    torch.testing.assert_close(layer.weight_grad, ref.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    if bias:
        torch.testing.assert_close(layer.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-6)
    # The gradient is far from zero, so the comparisons above are not vacuous.
    assert layer.weight_grad.abs().max() > 0.1


def test_weight_gradient_accumulates_over_two_backward_calls():
    layer, ref = _pair(48, 40, True, 64)
    for seed in (1, 2):
        x = _input((3, 5), 48, seed=seed)
        layer(x).pow(2).sum().backward()
        ref(x).pow(2).sum().backward()
        if seed == 1:
            first = layer.weight_grad.clone()
    torch.testing.assert_close(layer.weight_grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(layer.weight_grad, first)  # the second call added, not replaced


def test_from_linear_quantizes_to_within_half_a_step():
    torch.manual_seed(0)
    linear = nn.Linear(48, 40)
    layer = Int8Linear.from_linear(linear, group_size=64)
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (40, 48)
    assert layer.weight_scales.shape == layer.weight_zeros.shape == (30, 1)
    err = (layer.dequantized_weight() - linear.weight).reshape(30, 64).abs()
    assert bool((err <= layer.weight_scales / 2 + 1e-7).all())


# ----------------------------------------------------------------------------- models

def _expected_targets(layers: int) -> set[str]:
    attn = [f"model.layers.{i}.self_attn.{t}" for i in range(layers) for t in ("q_proj", "k_proj", "v_proj", "o_proj")]
    mlp = [f"model.layers.{i}.mlp.{t}" for i in range(layers) for t in ("gate_proj", "up_proj", "down_proj")]
    return set(attn + mlp)


def test_prepare_model_converts_exactly_the_default_targets():
    model = tiny_llama(layers=2, hidden=64, intermediate=128, vocab=96)
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    returned = prepare_model(model, group_size=64)
    assert returned is model

    converted = {n for n, _ in int8_layers(model)}
    assert converted == _expected_targets(2)
    assert set(GALORE_TARGETS) == {n.rsplit(".", 1)[-1] for n in converted}
    assert type(model.model.embed_tokens) is nn.Embedding
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.requires_grad
    assert torch.equal(model.lm_head.weight, original["lm_head"])
    for i in range(2):
        assert type(model.model.layers[i].input_layernorm).__name__.endswith("RMSNorm")

    state = model.state_dict()
    buffers = dict(model.named_buffers())
    for name, layer in int8_layers(model):
        assert layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
        assert isinstance(layer.weight, nn.Parameter)
        for key in ("weight", "weight_scales", "weight_zeros"):
            assert f"{name}.{key}" in state
        assert f"{name}.weight_scales" in buffers and f"{name}.weight_zeros" in buffers
        assert state[f"{name}.weight"].dtype == torch.uint8
        # Round to nearest from the fp32 initial weights: within half a step of the original.
        step = layer.weight_scales.expand(-1, 64).reshape(layer.weight.shape)
        assert bool(((layer.dequantized_weight() - original[name]).abs() <= step / 2 + 1e-7).all())
        assert int8_layer_of(layer.weight) is layer

    # Exactly the uint8 weights are frozen; the rest stays trainable.
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"{n}.weight" for n in _expected_targets(2)}


def test_export_model_matches_int8_outputs_and_round_trips_save_pretrained(tmp_path):
    from transformers import LlamaForCausalLM

    model = prepare_model(tiny_llama(layers=2, hidden=64, intermediate=128, vocab=96), group_size=64)
    x = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        int8_logits = model(input_ids=x).logits

    exported = export_model(model)
    assert not int8_layers(exported)
    for name in _expected_targets(2):
        module = exported.get_submodule(name)
        assert type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.weight.requires_grad
    assert not any(k.endswith(("weight_scales", "weight_zeros")) for k in exported.state_dict())
    with torch.no_grad():
        exported_logits = exported(input_ids=x).logits
    torch.testing.assert_close(exported_logits, int8_logits, rtol=1e-5, atol=1e-5)

    exported.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        reloaded_logits = reloaded(input_ids=x).logits
    assert torch.equal(reloaded_logits, exported_logits)
    for (n, a), (_, b) in zip(exported.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), n


def test_copied_or_pickled_int8_layers_stay_trainable():
    """A deep copy (or torch.save/torch.load of the module) builds new weight Parameters: they
    must still be recognised as INT8 GaLore weights, or an optimizer built on the copy would
    silently never update them."""
    model = prepare_model(tiny_llama(layers=1, hidden=64, intermediate=128, vocab=96), group_size=64)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = {"deepcopy": copy.deepcopy(model), "torch.load": torch.load(buffer, weights_only=False)}
    for how, clone in copies.items():
        for name, layer in int8_layers(clone):
            assert int8_layer_of(layer.weight) is layer, f"{how}: {name}"
        before = {n: layer.weight.clone() for n, layer in int8_layers(clone)}
        opt = QGaLoreAdamW8bit(trainable(clone), QGaLoreConfig(lr=1e-2, rank=8, update_proj_gap=5))
        assert len(opt.galore_params) == 7, how
        x = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
        clone(input_ids=x, labels=x).loss.backward()
        opt.step()
        changed = [n for n, layer in int8_layers(clone) if not torch.equal(layer.weight, before[n])]
        assert len(changed) == 7, f"{how}: only {changed} were updated"
    # The original is untouched by training its copies.
    for name, layer in int8_layers(model):
        assert int8_layer_of(layer.weight) is layer


def test_dtype_cast_keeps_quantization_metadata_fp32():
    """``model.to(torch.bfloat16)`` casts the bias but must not round scales or zero points."""
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(32, 16), group_size=32)
    scales, zeros = layer.weight_scales.clone(), layer.weight_zeros.clone()
    layer.to(torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16
    assert layer.weight_scales.dtype == torch.float32 and torch.equal(layer.weight_scales, scales)
    assert layer.weight_zeros.dtype == torch.float32 and torch.equal(layer.weight_zeros, zeros)


def test_rows_not_a_multiple_of_the_group_end_in_a_short_group(monkeypatch):
    """in_features 86, group 64: each row is 64 + 22 (row-aligned layout, issue 17), so a row
    shard never cuts a group; the fused update kernel only knows flat groups, so the dispatch
    takes the torch ops for this layout even with ``QGALORE_KERNELS=triton``."""
    from qgalore_dist import kernels
    from qgalore_dist.quant import StreamKey, quantize

    torch.manual_seed(0)
    linear = nn.Linear(86, 5, bias=False)
    layer = Int8Linear.from_linear(linear, group_size=64)
    assert layer.row_length == 86 and layer.weight_scales.shape == (10, 1)
    codes, scales, zeros = quantize(linear.weight.detach(), bits=8, group_size=64, row_length=86)
    assert torch.equal(layer.weight, codes) and torch.equal(layer.weight_scales, scales)
    x = _input((3,), 86)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dequantized_weight()))
    delta = torch.randn(5, 86)
    results = []
    for mode in ("torch", "triton"):
        monkeypatch.setenv("QGALORE_KERNELS", mode)
        monkeypatch.setattr(kernels, "int8_update_", lambda *a, **k: pytest.fail("flat-group kernel on short groups"))
        clone = Int8Linear(86, 5, bias=False, group_size=64)
        clone.load_state_dict(layer.state_dict())
        clone.apply_update_(delta, step_size=0.01, decay=1e-3, stochastic_key=StreamKey(1, 2, 3))
        results.append((clone.weight.clone(), clone.weight_scales.clone(), clone.weight_zeros.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*results))
