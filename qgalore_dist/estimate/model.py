"""Parameter shapes of a LLaMA-family model, from its config alone (no torch, nothing allocated).

``model_tensors(config)`` lists every parameter exactly as ``transformers.LlamaForCausalLM``
names and orders them (``named_parameters()``), so the ownership plans and the per-tensor
accounting match the real model's; ``tests/unit/test_estimate.py`` checks the list against a
meta-device ``LlamaForCausalLM`` built from the same config.

A config is a dict of ``LlamaConfig`` fields: a built-in name (``qgalore_dist/train/models/*.json``,
the same files as ``configs/models/``), an HF ``config.json`` file, or a directory holding one.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from qgalore_dist.core import DEFAULT_TARGET_MODULES

__all__ = ["MODELS_DIR", "Layout", "Shapes", "Tensor", "builtin_models", "load_model_config", "model_shapes",
           "model_tensors", "param_counts"]

MODELS_DIR = Path(__file__).resolve().parents[1] / "train" / "models"
"""The training tool's built-in model configs (``qgalore-train --model.name llama_7b``)."""


@dataclass(frozen=True)
class Tensor:
    """One parameter: its name, shape and whether it is a GaLore matrix."""

    name: str
    """Parameter name as ``named_parameters()`` gives it."""
    shape: tuple[int, ...]
    """Shape; GaLore matrices are (m, n) = (out_features, in_features)."""
    galore: bool
    """Whether the optimizer projects it (an ``nn.Linear`` weight in ``DEFAULT_TARGET_MODULES``)."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Layout:
    """Storage constants shared by the formulas (``QGaLoreConfig`` / ``prepare_model`` defaults)."""

    rank: int
    """GaLore projection rank r."""
    state_block: int = 256
    """Elements per absmax block of 8-bit moments (bitsandbytes 0.50 and qgalore_dist)."""
    min_8bit_size: int = 4096
    """Tensors with fewer elements keep fp32 moments."""
    weight_group: int = 256
    """INT8 weight quantization group size."""
    proj_group: int = 256
    """Projector quantization group size."""
    proj_bits: int = 4
    """Bits per projector code."""
    dense_bytes: int = 2
    """Bytes per element of non-GaLore weights (bf16)."""
    adaptive: bool = True
    """qgalore_dist keeps the previous first singular vector only when the schedule is adaptive."""


@dataclass(frozen=True)
class Shapes:
    """One model's parameters at one GaLore rank, split into GaLore matrices and dense tensors."""

    name: str
    """A label (the model name)."""
    tensors: tuple[Tensor, ...]
    """Every parameter in model order."""
    lay: Layout
    """Storage constants, the GaLore rank included."""

    @property
    def galore(self) -> list[Tensor]:
        return [t for t in self.tensors if t.galore]

    @property
    def dense(self) -> list[Tensor]:
        return [t for t in self.tensors if not t.galore]

    @property
    def total(self) -> int:
        return sum(t.numel for t in self.tensors)

    def as_tuples(self) -> list[tuple[str, tuple[int, ...], bool]]:
        """``(name, shape, is_galore)`` per parameter: the form the communication formulas take."""
        return [(t.name, t.shape, t.galore) for t in self.tensors]


def builtin_models() -> list[str]:
    """Names of the built-in model configs, sorted."""
    return sorted(p.stem for p in MODELS_DIR.glob("*.json"))


def load_model_config(model: str) -> tuple[str, dict[str, Any]]:
    """``(label, LlamaConfig fields)`` of a built-in name, an HF config JSON file or a directory
    with a ``config.json``; ``ValueError`` naming the valid choices otherwise."""
    builtin = MODELS_DIR / f"{model}.json"
    if builtin.is_file():
        path, label = builtin, model
    elif os.path.isdir(model) and os.path.isfile(os.path.join(model, "config.json")):
        path, label = Path(model) / "config.json", os.path.basename(os.path.normpath(model))
    elif os.path.isfile(model):
        path, label = Path(model), Path(model).stem
    else:
        raise ValueError(f"--model: {model!r} is neither a built-in model ({', '.join(builtin_models())}), "
                         "an HF config JSON file, nor a directory with a config.json")
    try:
        fields = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--model: cannot read {path}: {exc}") from None
    missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                           "vocab_size") if not isinstance(fields.get(k), int)]
    if missing:
        raise ValueError(f"--model: {path} is not a LLaMA-style config (missing integer fields {missing})")
    return label, fields


def model_tensors(config: Mapping[str, Any], target_modules=DEFAULT_TARGET_MODULES) -> list[Tensor]:
    """Every parameter of ``LlamaForCausalLM(config)`` in ``named_parameters()`` order; GaLore
    matrices are the ``target_modules`` projections (Q-GaLore's q/k/v/o/gate/up/down_proj)."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, vocab = config["num_attention_heads"], config["vocab_size"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    attn_bias, mlp_bias = bool(config.get("attention_bias")), bool(config.get("mlp_bias"))
    out = [Tensor("model.embed_tokens.weight", (vocab, h), False)]

    def linear(prefix: str, short: str, m: int, n: int, bias: bool) -> None:
        out.append(Tensor(f"{prefix}.{short}.weight", (m, n), short in target_modules))
        if bias:
            out.append(Tensor(f"{prefix}.{short}.bias", (m,), False))

    for i in range(layers):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        for short, m, n in (("q_proj", heads * head_dim, h), ("k_proj", kv * head_dim, h),
                            ("v_proj", kv * head_dim, h), ("o_proj", h, heads * head_dim)):
            linear(attn, short, m, n, attn_bias)
        for short, m, n in (("gate_proj", inter, h), ("up_proj", inter, h), ("down_proj", h, inter)):
            linear(mlp, short, m, n, mlp_bias)
        out += [Tensor(f"model.layers.{i}.input_layernorm.weight", (h,), False),
                Tensor(f"model.layers.{i}.post_attention_layernorm.weight", (h,), False)]
    out.append(Tensor("model.norm.weight", (h,), False))
    if not config.get("tie_word_embeddings", False):
        out.append(Tensor("lm_head.weight", (vocab, h), False))
    return out


def model_shapes(model: str | Mapping[str, Any], rank: int, dense_bytes: int = 2, **overrides: Any) -> Shapes:
    """``Shapes`` of a model (a name/path for ``load_model_config``, or config fields) at GaLore
    rank ``rank``; ``overrides`` replace config fields (e.g. ``num_hidden_layers=2``)."""
    label, fields = load_model_config(model) if isinstance(model, str) else ("model", dict(model))
    fields = {**fields, **overrides}
    return Shapes(name=label, tensors=tuple(model_tensors(fields)), lay=Layout(rank=rank, dense_bytes=dense_bytes))


def param_counts(tensors: list[Tensor]) -> dict[str, int]:
    """Total, GaLore-managed and embedding + head parameter counts."""
    return {
        "total": sum(t.numel for t in tensors),
        "galore": sum(t.numel for t in tensors if t.galore),
        "embed_head": sum(t.numel for t in tensors if t.name.endswith(("embed_tokens.weight", "lm_head.weight"))),
    }
