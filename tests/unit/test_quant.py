"""Tests for ``qgalore_dist.quant``: group-wise INT2/4/8 quantization and bit packing, the
counter-based uniform stream behind stochastic rounding, and the 8-bit block-wise codec for
optimizer moments.

Every random input comes from a seeded ``torch.Generator``; the code under test never reads
the global RNG (one test checks exactly that).
"""

from __future__ import annotations

import math

import pytest
import torch

from qgalore_dist.quant import (
    BlockwiseCodec,
    StreamKey,
    dequantize,
    pack_codes,
    packed_numel,
    quantize,
    uniform_from_key,
    unpack_codes,
)

BITS = [pytest.param(b, id=f"int{b}") for b in (2, 4, 8)]
# (shape, group_size): groups that span rows, a 1-D tensor, sizes that are not powers of two.
LAYOUTS = [
    pytest.param((3, 40), 8, id="3x40-g8"),
    pytest.param((7, 96), 32, id="7x96-g32"),
    pytest.param((1000,), 100, id="1000-g100"),
]


def _randn(shape, seed: int, *, std: float = 3.0) -> torch.Tensor:
    return std * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _group_max_error(x: torch.Tensor, deq: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group max |x - deq|, shape (numel // group_size, 1) like the scales."""
    return (x - deq).abs().reshape(-1, group_size).amax(dim=1, keepdim=True)


def _fp_slack(scales: torch.Tensor) -> torch.Tensor:
    """Room for fp32 rounding in ``scale * (q - zero)`` on values of magnitude ~10."""
    return 1e-4 * scales + 1e-5


def _reference_quantize(w: torch.Tensor, bits: int, group_size: int):
    """Q-GaLore's ``_quantize`` written from reference/qgalore-algorithm.md section 2.1."""
    max_int = 2**bits - 1
    g = w.reshape(-1, group_size).to(torch.float32)
    scale = (g.amax(dim=1, keepdim=True) - g.amin(dim=1, keepdim=True)).clamp(min=1e-5) / max_int
    zero = (-torch.round(g.amin(dim=1, keepdim=True) / scale)).clamp(0, max_int)
    q = (torch.round(g / scale) + zero).clamp(0, max_int)
    deq = (scale * (q - zero)).reshape(w.shape)
    return q.to(torch.uint8).reshape(w.shape), scale, zero, deq


# --------------------------------------------------------------------------------------------
# Error bounds


@pytest.mark.parametrize("shape,group_size", LAYOUTS)
@pytest.mark.parametrize("bits", BITS)
def test_round_to_nearest_error_at_most_half_a_step(bits, shape, group_size):
    """Round-to-nearest reproduces every element within scale/2 of its own group."""
    x = _randn(shape, seed=bits * 100 + len(shape))
    codes, scales, zeros = quantize(x, bits=bits, group_size=group_size)

    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert int(codes.max()) <= 2**bits - 1
    assert scales.shape == zeros.shape == (x.numel() // group_size, 1)
    deq = dequantize(codes, scales, zeros, group_size=group_size)
    assert deq.shape == x.shape and deq.dtype == torch.float32
    err = _group_max_error(x, deq, group_size)
    assert torch.all(err <= scales / 2 + _fp_slack(scales)), (err / scales).max()


@pytest.mark.parametrize("shape,group_size", LAYOUTS)
@pytest.mark.parametrize("bits", BITS)
def test_stochastic_rounding_error_below_one_step(bits, shape, group_size):
    """Stochastic rounding moves every element by less than one step of its group, and it
    really is random: some codes differ from round-to-nearest."""
    x = _randn(shape, seed=bits * 100 + len(shape) + 7)
    codes, scales, zeros = quantize(x, bits=bits, group_size=group_size, stochastic_key=StreamKey(3, 11, 5))
    deq = dequantize(codes, scales, zeros, group_size=group_size)
    err = _group_max_error(x, deq, group_size)
    assert torch.all(err < scales + _fp_slack(scales)), (err / scales).max()

    rtn = dequantize(*quantize(x, bits=bits, group_size=group_size), group_size=group_size)
    assert not torch.allclose(deq, rtn)


@pytest.mark.parametrize(
    "lo,hi", [pytest.param(1.0, 2.0, id="positive-1..2"), pytest.param(-3.0, -1.0, id="negative-3..-1")]
)
def test_single_sign_group_fixed_versus_reference(lo, hi):
    """A group whose values all have one sign: the fixed quantizer keeps scale/2 accuracy
    (~0.033 for [1, 2] at INT4), while ``reference=True`` reproduces the reference's clamped
    zero point bit for bit, including its error of about 1.0."""
    bits, group_size = 4, 32
    x = torch.linspace(lo, hi, group_size)
    scale = (hi - lo) / (2**bits - 1)

    codes, scales, zeros = quantize(x, bits=bits, group_size=group_size)
    fixed_err = (dequantize(codes, scales, zeros, group_size=group_size) - x).abs().max().item()
    assert fixed_err <= scale / 2 + 1e-6

    ref_codes, ref_scales, ref_zeros, ref_deq = _reference_quantize(x, bits, group_size)
    codes_r, scales_r, zeros_r = quantize(x, bits=bits, group_size=group_size, reference=True)
    assert torch.equal(codes_r, ref_codes)
    torch.testing.assert_close(scales_r, ref_scales, rtol=0, atol=0)
    torch.testing.assert_close(zeros_r, ref_zeros, rtol=0, atol=0)
    deq_r = dequantize(codes_r, scales_r, zeros_r, group_size=group_size)
    torch.testing.assert_close(deq_r, ref_deq)
    ref_err = (deq_r - x).abs().max().item()
    assert ref_err > 0.9 and ref_err > 10 * fixed_err


def test_mixed_sign_groups_match_the_reference_exactly():
    """Where the reference's clamp does not bite (mixed-sign groups), the default quantizer
    gives the reference's codes, scales and zeros exactly."""
    x = _randn((16, 64), seed=5)
    assert torch.all(x.reshape(-1, 64).amin(dim=1) < 0) and torch.all(x.reshape(-1, 64).amax(dim=1) > 0)
    ref_codes, ref_scales, ref_zeros, _ = _reference_quantize(x, 4, 64)
    codes, scales, zeros = quantize(x, bits=4, group_size=64)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(scales, ref_scales) and torch.equal(zeros, ref_zeros)


# --------------------------------------------------------------------------------------------
# Packing


@pytest.mark.parametrize("numel", [1, 3, 7, 1001], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_round_trip_and_packed_size(bits, numel):
    """Packing keeps every code and takes exactly ceil(numel * bits / 8) bytes (INT4 is half
    a byte per code, INT2 a quarter)."""
    gen = torch.Generator().manual_seed(numel * 10 + bits)
    codes = torch.randint(0, 2**bits, (numel,), generator=gen, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(numel * bits / 8) == packed_numel(numel, bits)
    assert torch.equal(unpack_codes(packed, bits, numel), codes)


def test_pack_layout_is_little_end_first():
    """The first code goes into the low bits of a byte and a short tail is zero-padded."""
    assert pack_codes(torch.tensor([0x1, 0x2, 0x3], dtype=torch.uint8), 4).tolist() == [0x21, 0x03]
    assert pack_codes(torch.tensor([1, 2, 3, 0, 3], dtype=torch.uint8), 2).tolist() == [0b00111001, 0b11]


def test_quantize_pack_unpack_dequantize_round_trip():
    """Codes survive packing: dequantizing unpacked codes equals dequantizing the originals."""
    x = _randn((12, 50), seed=9)
    codes, scales, zeros = quantize(x, bits=4, group_size=25)
    unpacked = unpack_codes(pack_codes(codes, 4), 4, x.numel()).view(x.shape)
    assert torch.equal(
        dequantize(unpacked, scales, zeros, group_size=25), dequantize(codes, scales, zeros, group_size=25)
    )


# --------------------------------------------------------------------------------------------
# Stochastic rounding and its random stream


@pytest.mark.parametrize(
    "offset", [pytest.param(0.0, id="mixed-sign"), pytest.param(5.0, id="all-positive")]
)
@pytest.mark.parametrize("bits", [pytest.param(2, id="int2"), pytest.param(4, id="int4")])
def test_stochastic_rounding_is_unbiased(bits, offset):
    """Averaged over 400 keys, dequantized values converge to the input for every element,
    the group's min and max included.  One draw has std <= scale/2, so the mean of n draws is
    within 5 * scale / (2 sqrt(n)) of the input (5 sigma); the mean over all elements is
    tested the same way."""
    group_size, n_draws = 32, 400
    x = _randn((4, 64), seed=bits + int(offset), std=1.0) + offset
    total = torch.zeros_like(x)
    for step in range(n_draws):
        codes, scales, zeros = quantize(x, bits=bits, group_size=group_size, stochastic_key=StreamKey(7, step, 3))
        total += dequantize(codes, scales, zeros, group_size=group_size)
    bias = (total / n_draws - x).reshape(-1, group_size) / scales  # in units of one step
    sigma = 0.5 / math.sqrt(n_draws)
    assert bias.abs().max().item() < 5 * sigma, bias.abs().max()
    assert abs(bias.mean().item()) < 5 * sigma / math.sqrt(x.numel())


def test_reference_stochastic_rounding_matches_the_reference_formula():
    """``reference=True`` with a key is the reference's ``_quantize_stochastic_round``
    (section 2.3: rounded, clamped zero; up with probability frac(w / scale)), given the
    same uniforms."""
    x = _randn((6, 64), seed=4) + 2.0  # some groups are single-sign, where the clamp matters
    key = StreamKey(9, 1, 2)
    g = x.reshape(-1, 64)
    _, scale, zero, _ = _reference_quantize(x, 8, 64)
    noise = uniform_from_key(key, x.numel()).view_as(g)
    lo = torch.floor(g / scale)
    q = torch.where(noise < g / scale - lo, lo + 1, lo)
    expected = (q + zero).clamp(0, 255).to(torch.uint8).view(x.shape)
    codes, scales, zeros = quantize(x, bits=8, group_size=64, stochastic_key=key, reference=True)
    assert torch.equal(codes, expected)
    assert torch.equal(scales, scale) and torch.equal(zeros, zero)


def test_stochastic_rounding_reproducible_and_keyed():
    """The same key gives identical codes; changing seed, step or tensor id changes them."""
    x = _randn((8, 64), seed=2)

    def codes_for(key):
        return quantize(x, bits=8, group_size=64, stochastic_key=key)[0]

    base = codes_for(StreamKey(1, 10, 4))
    assert torch.equal(base, codes_for(StreamKey(1, 10, 4)))
    for other in (StreamKey(1, 11, 4), StreamKey(1, 10, 5), StreamKey(2, 10, 4)):
        assert not torch.equal(base, codes_for(other)), other


def test_uniform_stream_range_mean_and_uniformity():
    """``uniform_from_key`` is fp32 in [0, 1), mean 1/2 within 5 sigma, and a 20-bin
    histogram passes a loose chi-square bound (df = 19: mean 19, sd ~6; bound 60)."""
    n = 100_000
    u = uniform_from_key(StreamKey(0, 0, 0), n)
    assert u.dtype == torch.float32 and u.shape == (n,)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    counts = torch.histc(u, bins=20, min=0.0, max=1.0)
    expected = n / 20
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 60, chi2


def test_uniform_stream_is_a_pure_function_of_key_and_index():
    """Values depend only on (key, index): a shorter draw is a prefix of a longer one, and
    streams of neighbouring steps are uncorrelated."""
    key = StreamKey(123, 45, 6)
    assert torch.equal(uniform_from_key(key, 10), uniform_from_key(key, 5000)[:10])
    n = 20_000
    a = uniform_from_key(StreamKey(123, 45, 6), n) - 0.5
    b = uniform_from_key(StreamKey(123, 46, 6), n) - 0.5
    corr = (a * b).mean() / (a.std() * b.std())
    assert abs(corr.item()) < 5 / math.sqrt(n)


def test_stochastic_rounding_does_not_touch_global_rng():
    """Drawing the stream and quantizing stochastically leave the global RNG state unchanged,
    and the result does not depend on the global seed."""
    x = _randn((4, 32), seed=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = torch.random.get_rng_state()
        first = uniform_from_key(StreamKey(5, 6, 7), 1000)
        codes_first = quantize(x, bits=4, group_size=32, stochastic_key=StreamKey(5, 6, 7))[0]
        assert torch.equal(torch.random.get_rng_state(), state)
        torch.manual_seed(1)
        assert torch.equal(first, uniform_from_key(StreamKey(5, 6, 7), 1000))
        assert torch.equal(codes_first, quantize(x, bits=4, group_size=32, stochastic_key=StreamKey(5, 6, 7))[0])


@pytest.mark.parametrize("field", ["seed", "step", "tensor_id"])
def test_stream_key_rejects_negative_fields(field):
    """Key fields must be non-negative ints; the error names the field."""
    kwargs = {"seed": 0, "step": 0, "tensor_id": 0, field: -1}
    with pytest.raises(ValueError, match=field):
        StreamKey(**kwargs)


# --------------------------------------------------------------------------------------------
# 8-bit optimizer-state codec


@pytest.mark.parametrize("signed", [pytest.param(True, id="signed-normal"), pytest.param(False, id="unsigned-squared")])
def test_blockwise_codec_8bit_round_trip(signed):
    """8-bit block-wise codes reproduce a moment to ~1% (relative Frobenius error < 2%, each
    element within 1% of its block's absmax) in about a quarter of the fp32 bytes."""
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    if not signed:
        x = x**2
    codec = BlockwiseCodec(bits=8, block_size=256)
    moment = codec.encode(x, signed=signed)
    assert moment.values is None
    assert moment.codes.dtype == torch.uint8 and moment.codes.shape == x.shape
    assert moment.absmax.shape == (math.ceil(x.numel() / 256),)
    assert moment.nbytes() < x.numel() * 4 / 3.5

    out = codec.decode(moment, signed=signed)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert ((out - x).norm() / x.norm()).item() < 0.02
    block_absmax = x.abs().reshape(-1, 256).amax(dim=1, keepdim=True)
    assert ((out - x).abs().reshape(-1, 256) / block_absmax).max().item() < 0.01
    if not signed:
        assert float(out.min()) >= 0.0


def test_blockwise_codec_keeps_small_tensors_fp32():
    """Tensors below ``min_8bit_size`` (4096) are stored as an fp32 copy and come back exactly."""
    codec = BlockwiseCodec(bits=8)
    x = torch.randn(4095, generator=torch.Generator().manual_seed(1))
    moment = codec.encode(x, signed=True)
    assert moment.codes is None and moment.values is not None
    out = codec.decode(moment, signed=True)
    assert torch.equal(out, x)
    x.add_(1.0)  # the stored copy is not a view of the input
    assert not torch.equal(codec.decode(moment, signed=True), x)
    assert codec.uses_8bit(4096) and not codec.uses_8bit(4095)


def test_blockwise_codec_32bit_is_exact():
    """``bits=32`` keeps even large moments bit-exact, and other widths are rejected."""
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    codec = BlockwiseCodec(bits=32)
    assert torch.equal(codec.decode(codec.encode(x, signed=True), signed=True), x)
    with pytest.raises(ValueError, match="8 or 32"):
        BlockwiseCodec(bits=16)


def test_blockwise_codec_zeros_decode_to_zero():
    """A zero-initialised 8-bit moment decodes to exact zeros."""
    codec = BlockwiseCodec(bits=8)
    moment = codec.zeros(torch.Size((64, 128)), torch.device("cpu"), signed=False)
    assert moment.codes is not None
    assert torch.equal(codec.decode(moment, signed=False), torch.zeros(64, 128))


# --------------------------------------------------------------------------------------------
# Input validation


@pytest.mark.parametrize("bits", [1, 3, 16], ids=lambda b: f"bits{b}")
def test_unsupported_bit_widths_raise(bits):
    """Only 2, 4 and 8 bits exist, for quantize and for packing."""
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.zeros(16), bits=bits, group_size=8)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.zeros(16, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match="bits"):
        unpack_codes(torch.zeros(16, dtype=torch.uint8), bits, 16)


@pytest.mark.parametrize("shape,group_size", [((10,), 3), ((7, 96), 64), ((3, 40), 0)],
                         ids=["10-g3", "7x96-g64", "3x40-g0"])
def test_group_size_must_divide_numel(shape, group_size):
    """A group size that does not divide the tensor (or is not positive) is a ValueError that
    names the group size."""
    with pytest.raises(ValueError, match=f"group_size(=| must be a positive int, got ){group_size}"):
        quantize(torch.zeros(shape), bits=4, group_size=group_size)


# ----------------------------------------------------------------------------- row-aligned layout (issue 17)
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("shape,group_size", [((7, 86), 64), ((5, 5461), 256), ((4, 30), 64), ((6, 48), 16)],
                         ids=["86-g64", "5461-g256", "row-shorter-than-group", "divides"])
def test_row_aligned_groups_never_cross_rows_and_a_row_shard_is_the_whole_tensors_slice(shape, group_size,
                                                                                         stochastic):
    from qgalore_dist.quant import groups_per_row, num_groups

    m, n = shape
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(n))
    key = StreamKey(5, 6, 7) if stochastic else None
    codes, scales, zeros = quantize(w, bits=8, group_size=group_size, stochastic_key=key, row_length=n)
    per_row = groups_per_row(n, group_size)
    assert scales.shape == zeros.shape == (num_groups(m * n, group_size, n), 1) == (m * per_row, 1)
    # Each row's groups are that row's own quantization: row i alone gives the same codes.
    for i in range(m):
        c, s, z = quantize(w[i:i + 1], bits=8, group_size=group_size, stochastic_key=key, row_length=n, offset=i * n)
        assert torch.equal(c, codes[i:i + 1]) and torch.equal(s, scales[i * per_row:(i + 1) * per_row])
        assert torch.equal(z, zeros[i * per_row:(i + 1) * per_row])
    # A shard of rows [2, m) equals the whole tensor's rows (the stream is indexed by flat element).
    c, s, z = quantize(w[2:], bits=8, group_size=group_size, stochastic_key=key, row_length=n, offset=2 * n)
    assert torch.equal(c, codes[2:]) and torch.equal(s, scales[2 * per_row:]) and torch.equal(z, zeros[2 * per_row:])
    back = dequantize(codes, scales, zeros, group_size=group_size, row_length=n)
    step = scales.view(m, per_row).repeat_interleave(group_size, dim=1)[:, :n]
    assert ((back - w).abs() <= step * (1.0 if stochastic else 0.5) + 1e-6).all()
    # Scales of any shape with the groups in order, e.g. FSDP2's (rows, groups_per_row).
    assert torch.equal(dequantize(codes, scales.view(m, per_row), zeros.view(m, per_row), group_size=group_size,
                                  row_length=n), back)
    if n % group_size == 0:  # whole groups: the row-aligned layout is the flat one
        flat = quantize(w, bits=8, group_size=group_size, stochastic_key=key)
        assert all(torch.equal(a, b) for a, b in zip(flat, (codes, scales, zeros)))


def test_row_aligned_offset_must_be_whole_rows():
    with pytest.raises(ValueError, match="row_length=86"):
        quantize(torch.zeros(2, 86), bits=8, group_size=64, offset=64, row_length=86)
