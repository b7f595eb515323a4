"""Dispatch and host-side launchers of the Triton kernels.

Dispatch (:func:`use_triton`), decided at *call* time so that tests and processes can switch:

* ``QGALORE_KERNELS=torch``: never Triton -- the torch code path, numerically unchanged;
* ``QGALORE_KERNELS=triton``: always Triton; CPU tensors then run in Triton's interpreter
  (slow, for tests and debugging);
* ``QGALORE_KERNELS=auto`` (default, also when unset): Triton for CUDA tensors when triton
  imports, the torch path otherwise.

Execution mode of a launch: the GPU compiler for CUDA tensors, the interpreter for CPU
tensors or when ``TRITON_INTERPRET=1`` is set at call time.  Each mode has its own copy of
the kernels (see :mod:`._triton_src`), so the choice never depends on import order.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import struct
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

from ..quant import StreamKey, stream_words

__all__ = [
    "KERNEL_MODES", "int8_update_", "kernel_mode", "project_back_packed", "project_packed",
    "triton_available", "use_triton",
]

KERNEL_MODES = ("auto", "triton", "torch")
_TRUE = ("1", "true", "yes", "on")


def kernel_mode() -> str:
    """The ``QGALORE_KERNELS`` switch, read now: ``'auto'`` (default), ``'triton'`` or ``'torch'``."""
    mode = os.environ.get("QGALORE_KERNELS", "auto").strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise ValueError(f"QGALORE_KERNELS must be one of {KERNEL_MODES}, got {mode!r}")
    return mode


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` works in this environment."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising something else
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the kernels should run for these operands (see the module doc)."""
    mode = kernel_mode()
    if mode == "torch":
        return False
    if mode == "triton":
        if not triton_available():
            raise RuntimeError("QGALORE_KERNELS=triton but triton cannot be imported")
        return True
    return triton_available() and all(t.is_cuda for t in tensors)


def _interpret_for(t: torch.Tensor) -> bool:
    return t.device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


_MODULES: dict[bool, ModuleType] = {}


def _triton_module(interpret: bool) -> ModuleType:
    """The kernels compiled for the GPU (``False``) or wrapped for the interpreter (``True``)."""
    if interpret not in _MODULES:
        name = f"{__package__}._triton_src_{'interp' if interpret else 'jit'}"
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("_triton_src.py"))
        mod = importlib.util.module_from_spec(spec)
        mod.INTERPRET = interpret
        sys.modules[name] = mod  # the JIT resolves the kernels' module for its cache key
        spec.loader.exec_module(mod)
        _MODULES[interpret] = mod
    return _MODULES[interpret]


_INTERP_LOCK = threading.Lock()


@contextlib.contextmanager
def _launch_scope(interpret: bool):
    """Run an interpreted launch even though ``triton`` was imported without TRITON_INTERPRET.

    ``triton.language``'s own library functions (``tl.zeros``, ``tl.max``, ...) are decorated
    once, at import, in the mode the environment names; a ``JITFunction`` called inside an
    interpreted kernel raises "Cannot call @triton.jit'd outside of the scope of a kernel".
    For the duration of the launch such calls run the function through the interpreter
    instead.  ``JITFunction.__call__`` is never used by compiled kernels (the compiler
    inlines callees from their source), so GPU launches are unaffected; the lock keeps two
    threads from restoring each other's patch.
    """
    if not interpret:
        yield
        return
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    with _INTERP_LOCK:
        original = JITFunction.__call__
        wrapped: dict[int, InterpretedFunction] = {}

        def call(self, *args, **kwargs):
            fn = wrapped.setdefault(id(self), InterpretedFunction(self.fn))
            return fn(*args, **kwargs)

        JITFunction.__call__ = call
        try:
            yield
        finally:
            JITFunction.__call__ = original


def _launch_opts(interpret: bool, num_warps: int) -> dict:
    # The interpreter ignores scheduling hints and some versions reject them.
    return {} if interpret else {"num_warps": num_warps}


def _matmul(a, b, out, M, N, K, a_strides, b_strides, *, a_packed, b_packed, bits, group_size, scale, blocks):
    """``out = scale * (A @ B)``; a packed operand is a tuple ``(codes, scales, zeros)``."""
    interpret = _interpret_for(out)
    mod = _triton_module(interpret)
    bm, bn, bk = blocks or ((16, 16, 16) if interpret else (64, 64, 32))
    a_ptrs = a if a_packed else (a, a, a)
    b_ptrs = b if b_packed else (b, b, b)
    grid = (triton_cdiv(M, bm), triton_cdiv(N, bn))
    with _launch_scope(interpret):
        mod.packed_matmul_kernel[grid](
            *a_ptrs, *b_ptrs, out, M, N, K, *a_strides, *b_strides, out.stride(0), out.stride(1), _f32(scale),
            A_PACKED=a_packed, B_PACKED=b_packed, BITS=bits, GS=group_size,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **_launch_opts(interpret, 4),
        )
    return out


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _check_packed(codes, scales, zeros, proj_shape, bits, group_size) -> None:
    numel = proj_shape[0] * proj_shape[1]
    assert bits in (2, 4, 8) and numel % group_size == 0, (bits, numel, group_size)
    assert codes.dtype == torch.uint8 and codes.is_contiguous() and codes.numel() * (8 // bits) >= numel
    assert scales.numel() == zeros.numel() == numel // group_size
    assert scales.dtype == zeros.dtype == torch.float32 and scales.is_contiguous() and zeros.is_contiguous()


def project_packed(grad: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *,
                   proj_shape: tuple[int, int], side: str, bits: int, group_size: int,
                   blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``G @ P.T`` (side ``right``: G (m, n), P (r, n) -> (m, r)) or ``P.T @ G`` (``left``:
    P (m, r) -> (r, n)), fp32, reading P straight from its packed codes and group scales.

    Equals :func:`.reference.project_torch` on the dequantized P up to fp32 summation order.
    """
    _check_packed(codes, scales, zeros, proj_shape, bits, group_size)
    m, n = grad.shape
    packed = (codes, scales, zeros)
    if side == "right":
        r = proj_shape[0]
        assert proj_shape == (r, n), (proj_shape, grad.shape)
        out = torch.empty(m, r, device=grad.device, dtype=torch.float32)
        # B = P.T (n, r): element (j, k) is P[k, j], flat k * n + j.
        return _matmul(grad, packed, out, m, r, n, grad.stride(), (1, n), a_packed=False, b_packed=True,
                       bits=bits, group_size=group_size, scale=1.0, blocks=blocks)
    assert side == "left", side
    r = proj_shape[1]
    assert proj_shape == (m, r), (proj_shape, grad.shape)
    out = torch.empty(r, n, device=grad.device, dtype=torch.float32)
    # A = P.T (r, m): element (k, i) is P[i, k], flat i * r + k.
    return _matmul(packed, grad, out, r, n, m, (1, r), grad.stride(), a_packed=True, b_packed=False,
                   bits=bits, group_size=group_size, scale=1.0, blocks=blocks)


def project_back_packed(lowrank: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *,
                        proj_shape: tuple[int, int], side: str, bits: int, group_size: int, scale: float,
                        blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``scale * (R @ P)`` (``right``: R (m, r), P (r, n)) or ``scale * (P @ R)`` (``left``:
    P (m, r), R (r, n)) -> (m, n) fp32, P read from its packed codes.

    Equals :func:`.reference.project_back_torch` up to fp32 summation order.
    """
    _check_packed(codes, scales, zeros, proj_shape, bits, group_size)
    lr = lowrank.to(torch.float32)
    packed = (codes, scales, zeros)
    if side == "right":
        m, r = lr.shape
        n = proj_shape[1]
        assert proj_shape == (r, n), (proj_shape, lr.shape)
        out = torch.empty(m, n, device=lr.device, dtype=torch.float32)
        return _matmul(lr, packed, out, m, n, r, lr.stride(), (n, 1), a_packed=False, b_packed=True,
                       bits=bits, group_size=group_size, scale=scale, blocks=blocks)
    assert side == "left", side
    r, n = lr.shape
    m = proj_shape[0]
    assert proj_shape == (m, r), (proj_shape, lr.shape)
    out = torch.empty(m, n, device=lr.device, dtype=torch.float32)
    return _matmul(packed, lr, out, m, n, r, (r, 1), lr.stride(), a_packed=True, b_packed=False,
                   bits=bits, group_size=group_size, scale=scale, blocks=blocks)


def int8_update_(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, delta: torch.Tensor, *,
                 group_size: int, step_size: float, decay: float, key: StreamKey | None,
                 offset: int = 0, block_groups: int | None = None) -> None:
    """In place: ``codes, scales, zeros <- int8_update_torch(codes, scales, zeros, delta, ...)``.

    ``codes`` uint8 (any shape, contiguous; groups of ``group_size`` consecutive elements of
    the flat tensor, crossing rows freely), ``scales``/``zeros`` fp32 (numel / group_size, 1),
    ``delta`` the back-projected update with ``codes``'s numel (fp32 or lower).  One read of
    codes and delta, one write of codes: the fp32 weight never exists in memory.  Bit-exact
    with the torch path for the same ``key`` (see :mod:`._triton_src` for the one caveat of
    the interpreter's FMA emulation).
    """
    numel = codes.numel()
    assert codes.dtype == torch.uint8 and codes.is_contiguous() and numel % group_size == 0
    assert scales.dtype == zeros.dtype == torch.float32 and scales.is_contiguous() and zeros.is_contiguous()
    assert scales.numel() == zeros.numel() == numel // group_size and delta.numel() == numel
    assert offset % group_size == 0 and offset + numel <= 2**32, \
        "the stochastic-rounding stream's index space is 32-bit"
    delta = delta.contiguous()
    interpret = _interpret_for(codes)
    mod = _triton_module(interpret)
    gs_p2 = triton_next_pow2(group_size)
    block_g = block_groups or max(1, (1024 if interpret else 2048) // gs_p2)
    n_groups = numel // group_size
    k1, k2 = stream_words(key) if key is not None else (0, 0)
    grid = (triton_cdiv(n_groups, block_g),)
    with _launch_scope(interpret):
        mod.int8_update_kernel[grid](
            codes, scales, zeros, delta, n_groups, _f32(-step_size), _f32(-decay), k1, k2, offset,
            GS=group_size, GS_P2=gs_p2, BLOCK_G=block_g, HAS_DECAY=decay > 0, STOCHASTIC=key is not None,
            EMULATE_FMA=interpret, CUDA_TORCH=codes.is_cuda,
            **_launch_opts(interpret, 8 if block_g * gs_p2 >= 2048 else 4),
        )


def _f32(x: float) -> float:
    """``x`` rounded to fp32, as torch rounds a Python ``alpha`` for an fp32 tensor (the
    interpreter would otherwise compute with the fp64 value)."""
    return struct.unpack("f", struct.pack("f", float(x)))[0]


def triton_next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()
