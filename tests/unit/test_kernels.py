"""Triton kernels (qgalore_dist.kernels) against their torch specifications.

CPU tensors always run in Triton's interpreter (the kernels package picks the mode per call,
so this module sets no TRITON_INTERPRET and nothing leaks into other test modules); with a
GPU the same cases also run compiled on CUDA against torch on CUDA.  Sizes are small and
awkward: not multiples of the blocks (the interpreter uses 16-wide tiles), rank 1, tall and
wide, odd numbers of 4-bit codes (a half-used tail byte), groups that cross rows.
"""

from __future__ import annotations

import pytest
import torch

from qgalore_dist import kernels
from qgalore_dist.core import Int8Linear, Projector, RefreshSchedule
from qgalore_dist.quant import StreamKey, pack_codes, quantize

pytest.importorskip("triton")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _packed(shape, bits, group_size, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(*shape, generator=gen)
    codes, scales, zeros = quantize(p, bits=bits, group_size=group_size)
    return tuple(t.to(device) for t in (pack_codes(codes, bits), scales, zeros))


def _close(actual, expected):
    """fp32 accumulation tolerance relative to the result's magnitude."""
    bound = 1e-5 * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=bound)


# (side, (m, n), rank, bits, group_size): P is (r, n) right, (m, r) left.
PROJ_CASES = [
    ("right", (37, 21), 5, 4, 15),    # groups of 15 cross P's 21-wide rows
    ("left", (19, 40), 3, 4, 19),     # P (19, 3): groups span six rows
    ("right", (33, 18), 1, 4, 9),     # rank 1, group = half a row
    ("left", (17, 70), 1, 4, 17),     # rank 1, wide
    ("right", (70, 9), 3, 4, 27),     # tall; 27 codes = 13.5 bytes: odd tail nibble
    ("left", (21, 50), 7, 2, 21),     # 2-bit codes
    ("right", (20, 35), 6, 8, 70),    # 8-bit codes
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side,shape,rank,bits,gs", PROJ_CASES)
def test_projection_matches_torch(device, side, shape, rank, bits, gs):
    m, n = shape
    proj_shape = (rank, n) if side == "right" else (m, rank)
    codes, scales, zeros = _packed(proj_shape, bits, gs, device, seed=m * n + rank)
    p = kernels.dequantize_packed(codes, scales, zeros, proj_shape=proj_shape, bits=bits, group_size=gs)
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(m, n, generator=gen).to(device)
    args = dict(proj_shape=proj_shape, side=side, bits=bits, group_size=gs)
    low = kernels.project_packed(grad, codes, scales, zeros, **args)
    _close(low, kernels.project_torch(grad, p, side))
    # Non-contiguous gradient (a transposed view): strides are honoured.
    _close(kernels.project_packed(grad.T.contiguous().T, codes, scales, zeros, **args), low)
    back = kernels.project_back_packed(low, codes, scales, zeros, scale=0.25, **args)
    _close(back, kernels.project_back_torch(low, p, side, 0.25))


# ((out, in), group_size): groups of 39 and 35 cross rows, 24 and 12 do not; 40 is not a power of 2.
UPDATE_CASES = [((13, 24), 39), ((13, 24), 12), ((7, 40), 35), ((5, 48), 40), ((3, 16), 48)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,gs", UPDATE_CASES)
@pytest.mark.parametrize("stochastic,decay", [(True, 1e-3), (True, 0.0), (False, 1e-3)])
def test_int8_update_bit_exact(device, shape, gs, stochastic, decay):
    gen = torch.Generator().manual_seed(shape[0] * gs)
    w = torch.randn(*shape, generator=gen)
    w[0, :gs // 2] = 3.0               # a constant stretch: the 1e-5 range clamp
    w.view(-1)[-gs:] += 1000.0          # a group far from 0: zero points of ~1e5
    codes, scales, zeros = (t.to(device) for t in quantize(w, bits=8, group_size=gs))
    delta = torch.randn(*shape, generator=gen).to(device)
    key = StreamKey(7, 123, 2**20 + shape[1]) if stochastic else None
    opts = dict(group_size=gs, step_size=0.0123, decay=decay, key=key)
    expected = kernels.int8_update_torch(codes, scales, zeros, delta, **opts)
    kernels.int8_update_(codes, scales, zeros, delta, **opts)
    for got, want in zip((codes, scales, zeros), expected):
        assert torch.equal(got, want.view_as(got))


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_rounding_stream_matches_torch(device):
    """A zero update on values halfway between codes: every code is decided by the noise alone,
    so equal codes mean the kernel drew the same uniforms as quant.random for the key."""
    gs = 64
    w = (torch.arange(4 * gs) % 2).float() * 0.5 + (torch.arange(4 * gs) // gs).float()
    w.view(4, gs)[:, 0], w.view(4, gs)[:, 1] = -1.0, 2.0  # range 3 -> scale 3/255
    codes, scales, zeros = (t.to(device) for t in quantize(w, bits=8, group_size=gs))
    zero_delta = torch.zeros_like(w, device=device)
    for step in range(3):
        key = StreamKey(0, step, 5)
        expected = kernels.int8_update_torch(codes, scales, zeros, zero_delta, group_size=gs, step_size=0.0,
                                             decay=0.0, key=key)
        got = [t.clone() for t in (codes, scales, zeros)]
        kernels.int8_update_(*got, zero_delta, group_size=gs, step_size=0.0, decay=0.0, key=key)
        assert torch.equal(got[0], expected[0])


@pytest.mark.parametrize("device", DEVICES)
def test_layer_and_projector_dispatch(device, monkeypatch):
    """The hooks: ``QGALORE_KERNELS=triton`` and ``=torch`` agree through the public classes."""
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(24, 13, bias=False), group_size=39).to(device)
    proj = Projector((13, 24), rank=3, bits=4, group_size=13, schedule=RefreshSchedule(gap=10))
    proj.set_matrix(torch.linalg.svd(torch.randn(13, 24))[0][:, :3].contiguous())  # left side: U (13, 3)
    for name in ("proj_codes", "proj_scales", "proj_zeros"):
        setattr(proj, name, getattr(proj, name).to(device))
    grad = torch.randn(13, 24, device=device)
    results = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("QGALORE_KERNELS", mode)
        low = proj.project(grad)
        delta = proj.project_back(low)
        clone = Int8Linear(24, 13, bias=False, group_size=39, device=device)
        clone.load_state_dict(layer.state_dict())
        clone.apply_update_(results.get("delta", delta), step_size=0.01, decay=1e-4, stochastic_key=StreamKey(1, 2, 3))
        results.setdefault("delta", delta)  # the same delta for both: the update itself is bit-exact
        results[mode] = (low, delta, clone.weight.clone(), clone.weight_scales.clone(), clone.weight_zeros.clone())
    _close(results["triton"][0], results["torch"][0])
    _close(results["triton"][1], results["torch"][1])
    for got, want in zip(results["triton"][2:], results["torch"][2:]):
        assert torch.equal(got, want)


def test_kernel_mode_switch(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("QGALORE_KERNELS", raising=False)
    assert kernels.kernel_mode() == "auto" and not kernels.use_triton(cpu)  # CPU: torch path by default
    monkeypatch.setenv("QGALORE_KERNELS", "torch")
    assert not kernels.use_triton(cpu)
    monkeypatch.setenv("QGALORE_KERNELS", "TRITON")
    assert kernels.use_triton(cpu)
    monkeypatch.setenv("QGALORE_KERNELS", "fast")
    with pytest.raises(ValueError, match="QGALORE_KERNELS"):
        kernels.use_triton(cpu)
    if torch.cuda.is_available():
        monkeypatch.setenv("QGALORE_KERNELS", "auto")
        assert kernels.use_triton(cpu.cuda()) and not kernels.use_triton(cpu, cpu.cuda())
