"""Triton kernels of the Q-GaLore hot path (device code only; launched from :mod:`.ops`).

This file is *loaded twice* by :func:`qgalore_dist.kernels.ops._triton_module`, once per
execution mode, under distinct module names: ``INTERPRET = True`` wraps every kernel in
Triton's CPU interpreter, ``False`` in the GPU JIT compiler.  ``triton.jit`` decides between
the two from ``TRITON_INTERPRET`` at *decoration* time, so a single import would freeze the
mode for the whole process (and leak a test's setting into every other test); loading the
source per mode lets CPU tensors always take the interpreter and CUDA tensors the compiler.

Numerics that the torch specification fixes, and how the kernels reproduce them:

* dequantization is ``(code - zero) * scale`` in fp32 (``quant.groupwise.dequantize``);
* ``w.add_(d, alpha=a)`` is a fused multiply-add on CPU (ATen's ``vec::fmadd``) and on CUDA
  (nvcc contracts ``a + alpha * b``), so the update uses ``tl.fma``; the interpreter's
  ``tl.fma`` is an unfused numpy ``x * y + z``, so there it is emulated in fp64 (the product
  of two fp32 is exact in fp64, the sum is rounded twice: equal to a true fp32 FMA except in
  cases of probability ~2**-29 per element);
* fp32 ``/`` in Triton is an approximate division on NVIDIA GPUs: ``tl.math.div_rn`` gives
  the correctly rounded quotient torch computes;
* ``torch.round`` rounds half to even: :func:`_rint` does it exactly with floor arithmetic;
* the stochastic-rounding noise is ``quant.random.uniform_from_key`` (lowbias32 twice) in
  uint32 arithmetic, which wraps exactly like the reference's masked int64 arithmetic.
"""

from __future__ import annotations

import triton.language as tl
from triton.runtime.jit import JITFunction

INTERPRET = globals().get("INTERPRET", False)  # injected by the loader before execution


def _jit(**kwargs):
    """``triton.jit`` with the mode chosen by the loader rather than by the environment."""

    def deco(fn):
        if INTERPRET:
            from triton.runtime.interpreter import InterpretedFunction

            return InterpretedFunction(fn, **kwargs)
        return JITFunction(fn, **kwargs)

    return deco


# ----------------------------------------------------------------------------- helpers
@_jit()
def _fma(x, y, z, EMULATE: tl.constexpr):
    """``x * y + z`` rounded once (see module doc for the interpreter emulation)."""
    if EMULATE:
        # tl.cast also accepts the plain Python floats the interpreter passes for scalars.
        prod = tl.cast(x, tl.float64) * tl.cast(y, tl.float64)
        return (prod + tl.cast(z, tl.float64)).to(tl.float32)
    else:
        return tl.fma(x, y, z)


@_jit()
def _rint(x):
    """Round half to even, exactly (``torch.round``); fp32 in, fp32 out."""
    r = tl.floor(x)
    d = x - r  # exact: x and floor(x) share the binade or d is tiny
    half = r * 0.5
    odd = (half - tl.floor(half)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return r + up.to(tl.float32)


@_jit()
def _mix32(x):
    """Wellons' lowbias32 on uint32 (multiplications wrap mod 2**32 like the reference's masks)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@_jit()
def _uniform(idx, k1, k2):
    """``uniform_from_key`` at flat indices ``idx`` (int64 < 2**32); ``k1``/``k2`` folded keys."""
    bits = _mix32(_mix32(idx.to(tl.uint32) ^ k1) + k2)
    return (bits >> 8).to(tl.float32) * (1.0 / 16777216.0)


@_jit()
def _dequant_at(codes_ptr, scales_ptr, zeros_ptr, f, mask, BITS: tl.constexpr, GS: tl.constexpr):
    """Dequantized value of the packed matrix at flat (row-major) indices ``f`` (int64)."""
    PER: tl.constexpr = 8 // BITS
    byte = tl.load(codes_ptr + f // PER, mask=mask, other=0).to(tl.int32)
    code = (byte >> ((f % PER) * BITS).to(tl.int32)) & ((1 << BITS) - 1)
    g = f // GS
    s = tl.load(scales_ptr + g, mask=mask, other=0.0)
    z = tl.load(zeros_ptr + g, mask=mask, other=0.0)
    return (code.to(tl.float32) - z) * s


@_jit()
def _load_tile(ptr, s_ptr, z_ptr, rows, cols, R, C, stride_r, stride_c,
               PACKED: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr):
    """fp32 tile ``X[rows, cols]`` of a logical (R, C) operand, zero outside it.

    ``PACKED``: X is a view of a packed quantized matrix whose row-major flat index of
    element (i, j) is ``i * stride_r + j * stride_c`` (a transpose just swaps the strides),
    dequantized on the fly -- no fp copy of it ever exists in memory.
    """
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    f = rows[:, None].to(tl.int64) * stride_r + cols[None, :].to(tl.int64) * stride_c
    if PACKED:
        return _dequant_at(ptr, s_ptr, z_ptr, f, mask, BITS, GS)
    else:
        return tl.load(ptr + f, mask=mask, other=0.0).to(tl.float32)


# ----------------------------------------------------------------------------- kernels
@_jit()
def packed_matmul_kernel(
    a_ptr, as_ptr, az_ptr, b_ptr, bs_ptr, bz_ptr, c_ptr,
    M, N, K, sa_r, sa_c, sb_r, sb_c, sc_r, sc_c, scale,
    A_PACKED: tl.constexpr, B_PACKED: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``C = scale * (A @ B)`` (M, N) fp32, A (M, K) and B (K, N) dense or packed (one or both).

    fp32 ("ieee") products and accumulation: no TF32, as torch's default fp32 matmul.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = _load_tile(a_ptr, as_ptr, az_ptr, rm, rk, M, K, sa_r, sa_c, A_PACKED, BITS, GS)
        b = _load_tile(b_ptr, bs_ptr, bz_ptr, rk, rn, K, N, sb_r, sb_c, B_PACKED, BITS, GS)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    acc = acc * scale
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None].to(tl.int64) * sc_r + rn[None, :] * sc_c, acc, mask=mask)


@_jit(do_not_specialize=["k1", "k2", "stream_offset"])
def int8_update_kernel(
    codes_ptr, scales_ptr, zeros_ptr, delta_ptr, n_groups, neg_step, neg_decay, k1, k2, stream_offset,
    GS: tl.constexpr, GS_P2: tl.constexpr, BLOCK_G: tl.constexpr,
    HAS_DECAY: tl.constexpr, STOCHASTIC: tl.constexpr, EMULATE_FMA: tl.constexpr,
    CUDA_TORCH: tl.constexpr,
):
    """In place, one pass over W: dequantize INT8 groups, ``w += neg_step * delta``,
    ``w += neg_decay * w``, requantize with fresh per-group scale / zero point.

    Each program owns ``BLOCK_G`` whole groups (a tile ``(BLOCK_G, GS_P2)`` of the flat
    weight; groups may cross rows of W), so it reads and writes its codes without any
    other program touching them: in-place is safe.  ``k1``/``k2`` are the folded
    stochastic-rounding key (``key_to_u32`` and its second mix), unused when rounding
    to nearest; ``stream_offset`` is the flat index of element 0 in the whole tensor (a row
    shard's first element), added to every draw's index.  ``CUDA_TORCH``: reproduce the torch
    path as it runs on CUDA tensors (``x / 255`` is ``x * fp32(1 / 255)`` there), else as on CPU.
    """
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    j = tl.arange(0, GS_P2)
    gmask = g < n_groups
    mask = gmask[:, None] & (j[None, :] < GS)
    idx = g[:, None].to(tl.int64) * GS + j[None, :]
    q = tl.load(codes_ptr + idx, mask=mask, other=0).to(tl.float32)
    s = tl.load(scales_ptr + g, mask=gmask, other=1.0)
    z = tl.load(zeros_ptr + g, mask=gmask, other=0.0)
    w = (q - z[:, None]) * s[:, None]
    d = tl.load(delta_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    w = _fma(d, neg_step, w, EMULATE_FMA)
    if HAS_DECAY:
        w = _fma(w, neg_decay, w, EMULATE_FMA)
    # Groups past the end get lo = hi = 0 (not +-inf): no NaNs even in masked lanes.
    lo = tl.where(gmask, tl.min(tl.where(mask, w, float("inf")), axis=1), 0.0)
    hi = tl.where(gmask, tl.max(tl.where(mask, w, float("-inf")), axis=1), 0.0)
    if CUDA_TORCH:
        # ATen's CUDA true division by a CPU scalar multiplies by the fp32 reciprocal.
        scale = tl.maximum(hi - lo, 1e-5) * (1.0 / 255.0)
    else:
        scale = tl.math.div_rn(tl.maximum(hi - lo, 1e-5), 255.0)
    if STOCHASTIC:
        # Unrounded zero point, codes SR((w - lo) / scale): quant.groupwise.quantize's order.
        shifted = tl.math.div_rn(w - lo[:, None], scale[:, None])
        noise = _uniform(idx + stream_offset, k1.to(tl.uint32), k2.to(tl.uint32))
        fl = tl.floor(shifted)
        c = fl + (noise < (shifted - fl)).to(tl.float32)
        zero = tl.math.div_rn(-lo, scale)
    else:
        zero = -_rint(tl.math.div_rn(lo, scale))
        c = _rint(tl.math.div_rn(w, scale[:, None])) + zero[:, None]
    c = tl.minimum(tl.maximum(c, 0.0), 255.0)
    tl.store(codes_ptr + idx, c.to(tl.uint8), mask=mask)
    tl.store(scales_ptr + g, scale, mask=gmask)
    tl.store(zeros_ptr + g, zero, mask=gmask)
