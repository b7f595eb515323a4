"""Counter-based uniform random numbers for stochastic rounding.

Stochastic rounding must produce the same bits on every data-parallel replica, so the noise
cannot come from a process-global RNG.  Each draw is a pure function of
``(seed, step, tensor_id, element_index)``: a 32-bit integer hash (Wellons' ``lowbias32``)
applied twice, so any two processes (or a Triton kernel) that agree on the key reproduce the
stream exactly, and a resumed run needs no RNG state beyond the step counter.
"""

from __future__ import annotations

import torch

__all__ = ["StreamKey", "key_to_u32", "stream_words", "uniform_from_key"]

_MASK32 = 0xFFFFFFFF


def _mix32_int(x: int) -> int:
    """``lowbias32`` on a Python int (used to fold the key once per tensor)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    x ^= x >> 16
    return x


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """``lowbias32`` on an int64 tensor holding values in [0, 2**32).

    int64 multiplication wraps on overflow, which keeps the low 32 bits exact, so masking after
    every multiply gives the same result as uint32 arithmetic.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


class StreamKey(tuple):
    """``(seed, step, tensor_id)``: the identity of one stochastic-rounding draw."""

    def __new__(cls, seed: int, step: int, tensor_id: int) -> "StreamKey":
        for name, value in (("seed", seed), ("step", step), ("tensor_id", tensor_id)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"StreamKey.{name} must be a non-negative int, got {value!r}")
        return super().__new__(cls, (seed, step, tensor_id))


def key_to_u32(key: StreamKey) -> int:
    """Fold a key into one 32-bit word (also what a Triton kernel receives)."""
    seed, step, tensor_id = key
    h = _mix32_int(seed ^ 0x9E3779B9)
    h = _mix32_int(h ^ (seed >> 32))
    h = _mix32_int(h + step)
    h = _mix32_int(h ^ (step >> 32))
    h = _mix32_int(h + tensor_id)
    return _mix32_int(h ^ (tensor_id >> 32))


def stream_words(key: StreamKey) -> tuple[int, int]:
    """The two 32-bit words ``(k, k')`` every draw of ``key`` mixes with its element index
    (what the Triton kernels receive)."""
    k = key_to_u32(key)
    return k, _mix32_int(k ^ 0x85EBCA6B)


def uniform_from_key(key: StreamKey, numel: int, device: torch.device | str = "cpu", *,
                     start: int = 0) -> torch.Tensor:
    """Return ``numel`` fp32 uniforms in [0, 1) that depend only on ``key`` and the index.

    The value at index ``i`` is ``(mix32(mix32(i ^ k) + k') >> 8) * 2**-24`` with ``k``, ``k'``
    from :func:`stream_words`, i.e. 24 random bits: the bias of stochastic rounding is below
    2**-24 of one quantization step.  ``start`` offsets the indices: the draws of elements
    ``[start, start + numel)`` of a larger tensor (a row shard) without drawing the prefix.
    """
    assert start >= 0 and start + numel <= 2**32, f"stream index space is 32-bit, got [{start}, {start + numel})"
    k, k2 = stream_words(key)
    idx = torch.arange(start, start + numel, dtype=torch.int64, device=device)
    bits = _mix32((_mix32(idx ^ k) + k2) & _MASK32)
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))
