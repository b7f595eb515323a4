"""Issue 18: nothing silently accepted, nothing misleading.  Each test failed before its fix."""

from __future__ import annotations

import pytest
import torch

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
