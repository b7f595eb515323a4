"""Activation memory of a LLaMA decoder during training, per rank (data parallel: one micro-batch).

The counting follows Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models" (arXiv:2205.05198), section 4.1: per layer, the tensors autograd saves for
backward, 16-bit activations.  Their GPT layer gives ``s b h (34 + 5 a s / h)`` bytes; the same
counting on a LLaMA layer (RMSNorm, no dropout, grouped-query attention, SwiGLU MLP) gives, with
``h_kv`` = key/value heads x head_dim and ``I`` the MLP width (2 B per element):

* attention block: RMSNorm input ``2sbh``, its output (q/k/v input) ``2sbh``, q after RoPE ``2sbh``,
  k, v ``2 * 2sb h_kv``, attention output (o_proj input) ``2sbh``;
  eager attention adds the softmax output ``2 a s^2 b``, fused (SDPA / FlashAttention) only the
  fp32 log-sum-exp ``4 a s b``;
* MLP block: RMSNorm input and output ``2 * 2sbh``; gate and up outputs, SiLU(gate), and the
  product (down_proj input) ``4 * 2sbI``.

So ``2sb (6h + 2h_kv + 4I)`` + the attention term per layer.  The head: final RMSNorm input and
output ``4sbh``, bf16 logits ``2sbV``, their fp32 copy for the loss ``4sbV`` and the loss's fp32
log-softmax ``4sbV``.  With activation checkpointing (per decoder layer, as HF
``gradient_checkpointing_enable``) each layer keeps only its input ``2sbh`` (Korthikanti's full
recomputation, ``2sbhL``), and one layer's activations exist again while it is recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["Activations", "activation_bytes"]


@dataclass(frozen=True, kw_only=True)
class Activations:
    """Activation bytes of one micro-batch on one rank."""

    micro_batch: int
    """Sequences per micro-batch (b)."""
    seq: int
    """Tokens per sequence (s)."""
    checkpointing: bool
    """Activation checkpointing per decoder layer."""
    fused_attention: bool
    """SDPA / FlashAttention (no s^2 softmax saved)."""
    per_layer: int
    """Saved activations of one decoder layer without checkpointing."""
    head: int
    """Final norm, logits and loss."""
    total: int
    """Peak activation bytes during backward."""


def activation_bytes(config: Mapping[str, Any], *, micro_batch: int, seq: int, checkpointing: bool = False,
                     fused_attention: bool = True) -> Activations:
    """Activations of ``LlamaForCausalLM(config)`` for a ``micro_batch x seq`` batch (module doc)."""
    if micro_batch < 1 or seq < 1:
        raise ValueError(f"micro_batch and seq must be >= 1, got {micro_batch}, {seq}")
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, vocab = config["num_attention_heads"], config["vocab_size"]
    head_dim = config.get("head_dim") or h // heads
    h_kv = (config.get("num_key_value_heads") or heads) * head_dim
    sb = seq * micro_batch
    attention = 4 * heads * sb if fused_attention else 2 * heads * seq * seq * micro_batch
    per_layer = 2 * sb * (6 * h + 2 * h_kv + 4 * inter) + attention
    head = 4 * sb * h + 10 * sb * vocab
    total = (layers * 2 * sb * h + per_layer if checkpointing else layers * per_layer) + head
    return Activations(micro_batch=micro_batch, seq=seq, checkpointing=checkpointing,
                       fused_attention=fused_attention, per_layer=per_layer, head=head, total=total)
