"""Tiny-model builders shared by test_optimizer.py, test_reference_galore.py and
test_int8_linear.py (imported as ``helpers``: pytest puts ``tests/`` on ``sys.path``)."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch
import torch.nn as nn

from qgalore_dist.core import DEFAULT_TARGET_MODULES, Int8Linear

GALORE_TARGETS = DEFAULT_TARGET_MODULES  # q/k/v/o + gate/up/down, as the reference drivers pick


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One intra-op thread per test module: on the 2 shared cores of the test machine,
    oversubscribed BLAS threads make these tiny models ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llama(*, hidden: int = 64, intermediate: int = 176, layers: int = 1, heads: int = 4,
               vocab: int = 128, seq_len: int = 64, seed: int = 0) -> nn.Module:
    """A randomly initialised ``transformers`` LlamaForCausalLM (fp32, untied head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
        num_key_value_heads=heads, num_hidden_layers=layers, vocab_size=vocab,
        max_position_embeddings=seq_len, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def galore_linears(model: nn.Module, targets=GALORE_TARGETS) -> list[tuple[str, nn.Linear]]:
    """``(name, module)`` of the float ``nn.Linear`` layers whose leaf name is a target."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets]


def split_params(model: nn.Module, targets=GALORE_TARGETS) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(regular, galore)``: the GaLore weights of the target layers, and everything else."""
    galore = [m.weight for _, m in galore_linears(model, targets)]
    ids = {id(p) for p in galore}
    return [p for p in model.parameters() if id(p) not in ids], galore


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """Parameters to hand the optimizer after ``prepare_model``: float trainables and the
    frozen ``uint8`` INT8 weights (which the optimizer recognises as GaLore matrices)."""
    return [p for p in model.parameters() if p.requires_grad or p.dtype == torch.uint8]


def param_names(model: nn.Module) -> dict[torch.Tensor, str]:
    return {p: n for n, p in model.named_parameters()}


def int8_layers(model: nn.Module) -> list[tuple[str, Int8Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Int8Linear)]


def int8_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Clones of every INT8 layer's codes, scales and zero points, keyed by name."""
    out = {}
    for name, layer in int8_layers(model):
        out[f"{name}.weight"] = layer.weight.detach().clone()
        out[f"{name}.weight_scales"] = layer.weight_scales.clone()
        out[f"{name}.weight_zeros"] = layer.weight_zeros.clone()
    return out


def float_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def token_batches(*, vocab: int, batch: int, seq_len: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless random token batches from a seeded generator (never the global RNG)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, vocab, (batch, seq_len), generator=gen)


def lm_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x, labels=x).loss


def train(model: nn.Module, optimizer, batches: Iterator[torch.Tensor], steps: int) -> list[torch.Tensor]:
    """``steps`` plain steps (forward, backward, step, zero_grad); returns the detached losses."""
    losses = []
    for _ in range(steps):
        loss = lm_loss(model, next(batches))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses


def sigterm_train_workers(cmd: list[str], *, after_step: int, timeout_s: float = 300, **popen) -> tuple[str, int]:
    """Start ``cmd`` (a 2-rank ``torchrun ... -m qgalore_dist.train``), send SIGTERM to both
    training processes once ``step <after_step> loss`` is logged (what SLURM does on
    preemption), and return the whole log and the launcher's exit code."""
    import os
    import re
    import signal
    import subprocess
    import time

    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    lines, deadline = [], time.time() + timeout_s
    try:
        for line in proc.stdout:
            lines.append(line)
            if re.search(rf"step\s+{after_step}\s+loss", line) or time.time() > deadline:
                break
        workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                   if "qgalore_dist.train" in " ".join(c.cmdline())]
        assert len(workers) == 2, lines[-20:]
        for w in workers:
            os.kill(w.pid, signal.SIGTERM)
        rest, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    return "".join(lines) + rest, proc.returncode
