"""Bytes DeepSpeed itself sends per optimizer step for the dense parameters (embeddings, norms,
head): the package's meter counts only its own exchanges (low-rank gradients, projectors,
updates), so ``qgalore-train`` adds this closed form as its own, labelled kind.

Per rank, ring collectives (the meter's convention: a reduce-scatter or all-gather of ``B`` bytes
sends ``(N-1)/N * B``, an all-reduce twice that), ``D`` dense elements, ``g`` bytes per
communicated gradient element (DeepSpeed's ``communication_data_type``: bf16 -> 2, fp32 -> 4),
``p`` bytes per parameter element, ``A`` micro-batches per step:

* ZeRO-0: one all-reduce of the gradients per step: ``2 f D g``
* ZeRO-1: reduce-scatter of the gradients at the boundary, all-gather of the updated
  parameters: ``f D (g + p)``
* ZeRO-2: a reduce-scatter per micro-batch, one all-gather: ``f D (A g + p)``
* ZeRO-3: per micro-batch, all-gathers of the parameters in forward and backward and a
  reduce-scatter of the gradients: ``A f D (2 p + g)``
"""

from __future__ import annotations

KIND = "deepspeed_dense"
"""The ``comm_bytes`` kind of this estimate in metrics.jsonl and the summary."""


def dense_bytes_per_step(*, stage: int, world: int, numel: int, grad_bytes: int, param_bytes: int,
                         accumulation: int = 1) -> float:
    """The closed form above (0 at world size 1)."""
    if world <= 1:
        return 0.0
    f = (world - 1) / world
    if stage == 0:
        return 2 * f * numel * grad_bytes
    if stage == 1:
        return f * numel * (grad_bytes + param_bytes)
    if stage == 2:
        return f * numel * (accumulation * grad_bytes + param_bytes)
    if stage == 3:
        return accumulation * f * numel * (2 * param_bytes + grad_bytes)
    raise ValueError(f"ZeRO stage must be 0-3, got {stage!r}")


def engine_dense_bytes(engine, dense_numel: int, world: int) -> float:
    """:func:`dense_bytes_per_step` for a DeepSpeed engine's stage, precision and accumulation."""
    import torch

    size = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
    grad = size.get(engine.communication_data_type, 4)
    param = 2 if engine.bfloat16_enabled() or engine.fp16_enabled() else 4
    return dense_bytes_per_step(stage=engine.zero_optimization_stage(), world=world, numel=dense_numel,
                                grad_bytes=grad, param_bytes=param, accumulation=engine.gradient_accumulation_steps())
