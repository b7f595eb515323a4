"""Models of the training tool: the built-in configs, fine-tuning from an HF directory, and
activation checkpointing giving the same Q-GaLore training as without it."""

from __future__ import annotations

import json
import os

import pytest
import torch

from qgalore_dist import QGaLoreAdamW8bit, QGaLoreConfig, prepare_model
from qgalore_dist.train.config import TrainConfig
from qgalore_dist.train.loop import MODELS_DIR, _model_fields, build_model

GALORE_SIZES = ["llama_9m", "llama_20m", "llama_35m", "llama_60m", "llama_130m", "llama_350m", "llama_1b", "llama_7b"]


@pytest.mark.parametrize("name", GALORE_SIZES)
def test_builtin_configs_resolve(name):
    from transformers import LlamaConfig

    fields, pretrained = _model_fields(name)
    assert pretrained is None
    with open(os.path.join(MODELS_DIR, f"{name}.json")) as f:
        assert fields == json.load(f)
    assert LlamaConfig(**fields).num_hidden_layers == fields["num_hidden_layers"]


def test_unknown_model_names_the_field():
    expected = r"model.name: 'llama_13m' is neither a built-in model \(\['tiny', 'llama_130m'"
    with pytest.raises(ValueError, match=expected):
        _model_fields("llama_13m")


def test_vocab_and_positions_follow_the_data():
    cfg = TrainConfig()
    cfg.model.name = "llama_9m"
    model = build_model(cfg, vocab_size=777, seq_len=1024)
    assert model.get_input_embeddings().num_embeddings == 777
    assert model.config.max_position_embeddings == 1024


def test_fine_tuning_loads_the_directory(tmp_path):
    cfg = TrainConfig()
    source = build_model(cfg, vocab_size=300, seq_len=32)
    source.save_pretrained(tmp_path / "hf")
    cfg.model.name = str(tmp_path / "hf")
    loaded = build_model(cfg, vocab_size=300, seq_len=32)
    for (name, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="has 300 embeddings, the tokenizer 301 tokens"):
        build_model(cfg, vocab_size=301, seq_len=32)


def _train(checkpointing: bool, steps: int = 4) -> tuple[list[float], list[torch.Tensor], list[torch.Tensor]]:
    cfg = TrainConfig(seed=3)
    cfg.model.activation_checkpointing = checkpointing
    model = prepare_model(build_model(cfg, vocab_size=300, seq_len=24))
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or p.dtype == torch.uint8]
    opt = QGaLoreAdamW8bit([p for _, p in named], QGaLoreConfig(lr=0.01, rank=8, update_proj_gap=2, seed=1),
                           names={p: n for n, p in named})
    initial = [p.detach().clone() for p in opt.galore_params]
    gen, losses = torch.Generator().manual_seed(0), []
    for _ in range(steps):
        for _ in range(2):  # accumulation: low-rank gradients summed over micro-batches
            ids = torch.randint(0, 300, (3, 24), generator=gen)
            loss = model(input_ids=ids, labels=ids).loss
            (loss / 2).backward()
            losses.append(float(loss.detach()))
        opt.step()
        opt.zero_grad()
    return losses, initial, [p.detach().clone() for p in opt.galore_params]


def test_activation_checkpointing_trains_identically():
    """Recomputing activations in backward must not change what the INT8 layers' gradient sinks
    accumulate (a sink that ran twice, or projected a recomputed input differently, would)."""
    plain_losses, initial, plain_codes = _train(False)
    ckpt_losses, _, ckpt_codes = _train(True)
    assert ckpt_losses == pytest.approx(plain_losses, rel=1e-6, abs=1e-6)
    assert sum(not torch.equal(a, b) for a, b in zip(initial, plain_codes)) == len(initial)  # all layers trained
    changed = sum(not torch.equal(a, b) for a, b in zip(plain_codes, ckpt_codes))
    assert changed == 0, f"{changed} INT8 weight tensors differ with activation checkpointing"
