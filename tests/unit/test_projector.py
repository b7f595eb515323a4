"""Tests for ``qgalore_dist.core.projector``: side selection, rank limits, projection algebra,
INT-quantized storage, the layer-adaptive refresh schedule (reference/qgalore-algorithm.md
section 2.2), randomized against exact SVD, and checkpoint round trips.

Gradients are built with a known, decaying spectrum from seeded generators, so the expected
subspaces are well defined and computed independently in float64.
"""

from __future__ import annotations

import io

import pytest
import torch

from qgalore_dist.core.projector import PROJ_TYPES, Projector, RefreshSchedule, choose_side, svd_basis
from qgalore_dist.quant import StreamKey, key_to_u32


def _decaying_gradient(m: int, n: int, *, decay: float = 0.8, seed: int = 0) -> torch.Tensor:
    """fp32 (m, n) matrix with singular values ``decay**i`` and random singular vectors."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    s = decay ** torch.arange(k, dtype=torch.float64)
    return ((u * s) @ v.T).to(torch.float32)


def _truncated(g: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-``rank`` approximation of ``g`` from a float64 SVD (Eckart-Young)."""
    u, s, vh = torch.linalg.svd(g.to(torch.float64), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).to(torch.float32)


def _subspace(p: torch.Tensor, side: str) -> torch.Tensor:
    """Orthogonal projector onto the span of ``P`` (sign- and rotation-invariant)."""
    return p.T @ p if side == "right" else p @ p.T


def _refresh(proj: Projector, grad: torch.Tensor, step: int = 0, *, method: str = "exact", tensor_id: int = 0) -> None:
    proj.refresh(grad, step=step, method=method, oversample=8, power_iters=2, key=StreamKey(0, step, tensor_id))


def _projector(shape, rank, *, gap: int = 200, **kwargs) -> Projector:
    return Projector(shape, rank=rank, schedule=RefreshSchedule(gap=gap), **kwargs)


# --------------------------------------------------------------------------------------------
# Side selection and rank limits

TALL, WIDE, SQUARE = (64, 16), (16, 64), (32, 32)
SIDE_CASES = [
    pytest.param(shape, proj_type, side, id=f"{name}-{proj_type}-{side}")
    for name, shape, by_type in [
        ("tall", TALL, {"std": "right", "reverse_std": "left"}),
        ("wide", WIDE, {"std": "left", "reverse_std": "right"}),
        ("square", SQUARE, {"std": "right", "reverse_std": "left"}),
    ]
    for proj_type, side in [*by_type.items(), ("left", "left"), ("right", "right")]
]


@pytest.mark.parametrize("shape,proj_type,side", SIDE_CASES)
def test_choose_side(shape, proj_type, side):
    """``std`` projects the smaller dimension (right when m >= n), ``reverse_std`` the other,
    ``left``/``right`` force it; the projector's shapes follow the side."""
    assert choose_side(shape, proj_type) == side
    proj = _projector(shape, 4, proj_type=proj_type)
    m, n = shape
    assert proj.side == side
    assert proj.proj_shape == ((4, n) if side == "right" else (m, 4))
    assert proj.lowrank_shape == ((m, 4) if side == "right" else (4, n))


@pytest.mark.parametrize("proj_type", ["full", "STD", ""], ids=["full", "STD", "empty"])
def test_unknown_proj_type_lists_allowed_values(proj_type):
    """An unknown proj_type is a ValueError naming every allowed value, also via Projector."""
    with pytest.raises(ValueError) as info:
        choose_side((8, 4), proj_type)
    for allowed in PROJ_TYPES:
        assert repr(allowed) in str(info.value)
    with pytest.raises(ValueError, match="proj_type"):
        _projector((8, 4), 2, proj_type=proj_type)


@pytest.mark.parametrize(
    "shape,rank",
    [((8, 64), 8), ((64, 8), 9), ((16, 16), 16), ((16, 16), 0), ((16, 16), 3.0)],
    ids=["wide-r=m", "tall-r>n", "square-r=n", "r=0", "float-rank"],
)
def test_rank_out_of_range_raises(shape, rank):
    """rank must be an int in [1, min(m, n)): full rank is not a projection."""
    with pytest.raises(ValueError, match="rank"):
        _projector(shape, rank)


EDGE_CASES = [
    pytest.param((8, 64), "reverse_std", id="wide-reverse_std"),
    pytest.param((8, 64), "std", id="wide-std"),
    pytest.param((64, 8), "reverse_std", id="tall-reverse_std"),
    pytest.param((64, 8), "std", id="tall-std"),
    pytest.param((16, 16), "left", id="square-left"),
    pytest.param((16, 16), "right", id="square-right"),
]


@pytest.mark.parametrize("shape,proj_type", EDGE_CASES)
def test_rank_one_below_min_dim_projects_both_ways(shape, proj_type):
    """rank = min(m, n) - 1, where the reference's shape-guessing ``project_back`` is fragile:
    the stored side gives the right shapes, and project_back(project(G)) is G's best rank-r
    approximation (true for either side, since P spans top singular vectors)."""
    m, n = shape
    rank = min(m, n) - 1
    g = _decaying_gradient(m, n, seed=m + n)
    proj = _projector(shape, rank, proj_type=proj_type)
    _refresh(proj, g)
    low = proj.project(g)
    side = choose_side(shape, proj_type)
    assert low.shape == ((m, rank) if side == "right" else (rank, n))
    back = proj.project_back(low)
    assert back.shape == (m, n)
    torch.testing.assert_close(back, _truncated(g, rank), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Projection algebra with an exact fp32 projector


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize("shape", [pytest.param((40, 24), id="tall"), pytest.param((24, 40), id="wide")])
def test_project_back_of_project_is_scaled_subspace_projection(shape, proj_type):
    """With an fp32 projector: P has orthonormal rows (right) or columns (left),
    project_back(project(G)) = scale * G P^T P (right) or scale * P P^T G (left), and since P
    is G's top singular basis this equals scale times G's best rank-r approximation."""
    m, n = shape
    rank, scale = 5, 0.25
    g = _decaying_gradient(m, n, seed=3)
    proj = _projector(shape, rank, proj_type=proj_type, scale=scale)
    _refresh(proj, g)
    p = proj.matrix()
    assert proj.proj is not None and proj.proj_codes is None and p.dtype == torch.float32

    gram = p @ p.T if proj.side == "right" else p.T @ p
    torch.testing.assert_close(gram, torch.eye(rank), atol=1e-5, rtol=0)

    back = proj.project_back(proj.project(g))
    manual = scale * (g @ p.T @ p if proj.side == "right" else p @ p.T @ g)
    torch.testing.assert_close(back, manual, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(back, scale * _truncated(g, rank), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Quantized storage


@pytest.mark.parametrize("bits", [2, 4, 8], ids=lambda b: f"int{b}")
@pytest.mark.parametrize("shape", [pytest.param((96, 256), id="wide-left"), pytest.param((256, 96), id="tall-right")])
def test_quantized_projector_storage_and_accuracy(shape, bits):
    """``bits`` stores P packed: min(m, n) * r * bits / 8 bytes (INT4: half a byte per entry)
    and no fp32 copy.  The dequantized P is close to the fp32 one (relative Frobenius error
    < 0.15 at INT4 and < 0.01 at INT8, cf. 0.110 / 0.0065 in the reference notes), and
    ``project`` uses it."""
    m, n = shape
    rank = 16
    g = _decaying_gradient(m, n, decay=0.9, seed=4)
    proj = _projector(shape, rank, bits=bits, group_size=256)
    _refresh(proj, g)
    assert proj.proj is None and proj.proj_codes.dtype == torch.uint8
    assert proj.proj_codes.nbytes == min(m, n) * rank * bits // 8
    assert proj.proj_scales.shape == proj.proj_zeros.shape == (min(m, n) * rank // 256, 1)

    exact = svd_basis(g, rank, proj.side)
    deq = proj.matrix()
    rel = ((deq - exact).norm() / exact.norm()).item()
    limit = {2: 0.75, 4: 0.15, 8: 0.01}[bits]
    assert rel < limit, rel
    expected_low = g @ deq.T if proj.side == "right" else deq.T @ g
    torch.testing.assert_close(proj.project(g), expected_low)


def test_projector_group_size_must_divide_projector():
    """A quantized projector whose size is not a multiple of the group size is refused up front."""
    with pytest.raises(ValueError, match="group_size=256"):
        _projector((100, 30), 7, bits=4, group_size=256)


# --------------------------------------------------------------------------------------------
# Refresh schedule (reference section 2.2)


def _drive(schedule: RefreshSchedule, steps, vector_at) -> list[int]:
    """Run the schedule over ``steps`` and return the steps at which an SVD happens."""
    svd_steps = []
    for step in steps:
        if schedule.is_due(step, has_projector=bool(svd_steps)):
            schedule.record(vector_at(len(svd_steps)))
            svd_steps.append(step)
    return svd_steps


def test_schedule_with_constant_vector_doubles_geometrically():
    """Cosine always 1, gap 200: first comparison at the 2nd SVD, queue of 5 full at the 6th
    (step 1000), then the gap doubles at every SVD because the queue is never cleared, and the
    next SVD waits for the next multiple of the new gap."""
    v = torch.randn(32, generator=torch.Generator().manual_seed(0))
    sched = RefreshSchedule(gap=200)
    steps = _drive(sched, range(7001), lambda i: v)
    assert steps == [0, 200, 400, 600, 800, 1000, 1200, 1600, 3200, 6400]
    assert sched.gap == 6400 and sched.svd_count == 10 and len(sched.queue) == 5


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_projector_schedule_with_an_unchanging_gradient(method):
    """The same through a real Projector (gap 2, steps 0..40, the same gradient every step so
    the first singular vector repeats).  The randomized SVD draws a new sketch every refresh,
    so this also proves its singular-vector signs do not depend on the seed."""
    g = _decaying_gradient(96, 64, seed=5)
    proj = _projector((96, 64), 3, gap=2)
    steps = []
    for step in range(41):
        if proj.schedule.is_due(step, proj.has_matrix()):
            _refresh(proj, g, step, method=method)
            steps.append(step)
            if len(steps) > 1:  # each refresh compares against the previous first vector
                assert proj.schedule.queue[-1] > 0.999, (step, proj.schedule.queue)
    assert steps == [0, 2, 4, 6, 8, 10, 12, 16, 32]
    assert proj.schedule.svd_count == len(steps)


def test_schedule_signed_cosine_never_grows_on_sign_flips():
    """Alternating the sign of the first vector gives cosine -1 (signed, as the reference):
    the gap never grows, so SVDs stay every 200 steps."""
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))
    sched = RefreshSchedule(gap=200)
    steps = _drive(sched, range(3001), lambda i: v if i % 2 == 0 else -v)
    assert steps == list(range(0, 3001, 200))
    assert sched.gap == 200 and sched.queue == pytest.approx([-1.0] * 5)


def test_schedule_not_adaptive_keeps_fixed_gap():
    """adaptive=False is GaLore's fixed schedule: identical vectors never change the gap."""
    v = torch.ones(8)
    sched = RefreshSchedule(gap=200, adaptive=False)
    steps = _drive(sched, range(3001), lambda i: v)
    assert steps == list(range(0, 3001, 200))
    assert sched.gap == 200 and sched.queue == [] and sched.svd_count == len(steps)


def test_schedule_gap_never_shrinks_and_queue_is_not_cleared():
    """Six identical vectors (gap 200 -> 400), then sign flips: the rolling mean is still
    (1+1+1+1-1)/5 = 0.6 >= 0.4 at the 7th record (-> 800), then 0.2: the gap stays at 800."""
    v = torch.randn(16, generator=torch.Generator().manual_seed(2))
    sched = RefreshSchedule(gap=200)
    gaps = []
    for i in range(12):
        sched.record(v if i < 6 or i % 2 == 1 else -v)
        gaps.append(sched.gap)
    assert gaps == [200] * 5 + [400] + [800] * 6


def test_schedule_gap_is_monotone_under_random_similarities():
    """Whatever the similarities (random vectors partially aligned with a fixed one), the gap
    only ever grows, by the integer factor gamma."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(16, generator=gen)
    sched = RefreshSchedule(gap=10, gamma=2)
    gaps = [sched.gap]
    for _ in range(60):
        sched.record(base + 1.2 * torch.randn(16, generator=gen))
        gaps.append(sched.gap)
    assert all(b in (a, 2 * a) for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] > gaps[0]  # the stream did trigger growth at least once


def test_first_refresh_happens_at_any_step():
    """Without a projector an SVD is due whatever the step; with one, only at multiples of gap."""
    sched = RefreshSchedule(gap=200)
    assert sched.is_due(7, has_projector=False)
    assert not sched.is_due(7, has_projector=True)
    assert sched.is_due(400, has_projector=True)


# --------------------------------------------------------------------------------------------
# Randomized SVD


@pytest.mark.parametrize("side", ["left", "right"])
def test_randomized_subspace_matches_exact(side):
    """On a (300, 120) gradient with singular values 0.8**i, the randomized rank-16 basis
    spans the exact subspace: ||P_r P_r^T - P_e P_e^T||_F < 1e-3 relative; it is orthonormal,
    and a fixed seed makes it bit-for-bit deterministic."""
    g = _decaying_gradient(300, 120, decay=0.8, seed=6)
    rank = 16
    exact = _subspace(svd_basis(g, rank, side), side)
    p_rand = svd_basis(g, rank, side, method="randomized", seed=1234)
    rand = _subspace(p_rand, side)
    assert ((rand - exact).norm() / exact.norm()).item() < 1e-3

    gram = p_rand @ p_rand.T if side == "right" else p_rand.T @ p_rand
    torch.testing.assert_close(gram, torch.eye(rank), atol=1e-5, rtol=0)
    assert torch.equal(p_rand, svd_basis(g, rank, side, method="randomized", seed=1234))


def test_randomized_svd_sign_independent_of_seed_and_global_rng():
    """Different seeds give the same first singular vector with the same sign (the refresh
    cosine sees +1, not a spurious -1), and drawing the sketch leaves the global RNG alone."""
    g = _decaying_gradient(96, 64, seed=7)
    before = torch.random.get_rng_state()
    firsts = [
        svd_basis(g, 8, "right", method="randomized", seed=key_to_u32(StreamKey(0, step, 1)))[0]
        for step in range(8)
    ]
    assert torch.equal(torch.random.get_rng_state(), before)
    cosines = torch.stack([torch.dot(firsts[0], f) for f in firsts[1:]])
    assert torch.all(cosines > 0.999), cosines


def test_unknown_svd_method_raises():
    """Only 'exact' and 'randomized' exist."""
    with pytest.raises(ValueError, match="randomized"):
        svd_basis(torch.ones(4, 3), 1, "right", method="lanczos")


# --------------------------------------------------------------------------------------------
# Checkpoints


@pytest.mark.parametrize("bits", [None, 4], ids=["fp32", "int4"])
def test_state_dict_round_trip_through_torch_save(bits):
    """state_dict survives torch.save + torch.load(weights_only=True); a fresh projector that
    loads it projects bit-identically, has the same schedule, and evolves identically."""
    shape, rank = (64, 32), 8
    g0 = _decaying_gradient(*shape, seed=8)
    g1 = _decaying_gradient(*shape, seed=9)
    src = _projector(shape, rank, gap=2, bits=bits, group_size=64, scale=0.5)
    _refresh(src, g0, 0)
    _refresh(src, g1, 2)

    buffer = io.BytesIO()
    torch.save(src.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    dst = _projector(shape, rank, gap=2, bits=bits, group_size=64, scale=0.5)
    dst.load_state_dict(state)
    assert torch.equal(dst.project(g0), src.project(g0))
    assert torch.equal(dst.project_back(dst.project(g0)), src.project_back(src.project(g0)))
    s, d = src.schedule, dst.schedule
    assert (d.gap, d.svd_count, d.queue) == (s.gap, s.svd_count, s.queue)
    assert len(d.queue) == 1 and torch.equal(d.past_vector, s.past_vector)

    for step in (4, 6, 8, 10, 12):
        _refresh(src, g0, step)
        _refresh(dst, g0, step)
    assert (d.gap, d.svd_count, d.queue) == (s.gap, s.svd_count, s.queue)
    assert torch.equal(dst.matrix(), src.matrix())


def test_load_state_dict_rejects_other_side():
    """A checkpoint taken with one projection side cannot be loaded into the other."""
    src = _projector((64, 32), 4, proj_type="right")
    _refresh(src, _decaying_gradient(64, 32, seed=10))
    dst = _projector((64, 32), 4, proj_type="left")
    with pytest.raises(ValueError, match="side"):
        dst.load_state_dict(src.state_dict())
