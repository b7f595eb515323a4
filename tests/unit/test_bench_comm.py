"""``qgalore_dist.estimate.comm``'s closed forms (the figures of ``benchmarks/comm.py``) against what actually
moves: torch's PowerSGD compression rule, and (2 gloo ranks) the package's meter with ``compress_lowrank`` and the
bytes torch's ``powerSGD_hook`` hands to ``all_reduce``."""

from __future__ import annotations

import comm_harness
import pytest
import torch
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress

from qgalore_dist.estimate import comm


@pytest.mark.parametrize("shape", [(64,), (128, 64), (8, 8), (16, 16), (17, 16), (4096, 11008), (3, 5, 7)])
def test_powersgd_selection_matches_torch(shape):
    n = shape[0]
    m = comm.numel(shape) // n
    r = min(n, m, 4)
    compress, _, _ = _should_compress(n, m, r, 2)
    el = comm.powersgd_elements([("t", shape, False)], rank=4)
    assert el["compressed_tensors"] == int(compress)
    assert el["p"] + el["q"] + el["uncompressed"] == ((n + m) * r if compress else n * m)


def test_compressed_all_to_all_mean_is_the_ring_volume():
    # Uneven ownership on 3 ranks, so the all-to-all bytes differ between ranks.
    tensors = [(f"w{i}", (512, 512), True) for i in range(4)] + [(f"u{i}", (1376, 512), True) for i in range(3)]
    kw = dict(b_lowrank=1, b_dense_grad=2, b_dense_param=2, compress=True)
    per_rank = [comm.ours_steady(tensors, 64, 3, at_rank=k, **kw)["lowrank_reduce"] for k in range(3)]
    mean = comm.ours_steady(tensors, 64, 3, **kw)["lowrank_reduce"]
    assert len(set(per_rank)) > 1
    assert sum(per_rank) / 3 == pytest.approx(mean, rel=1e-12)
    assert mean == pytest.approx(2 / 3 * comm.compressed_payload(sum(comm.lowrank_by_owner(tensors, 64, 3))), rel=0.01)
    with pytest.raises(ValueError):
        comm.ring(1)


def test_closed_forms_equal_meter_and_counted_bytes_on_two_ranks():
    case = "bf16 model, int8 low-rank + bf16 dense (ours int8)"
    all_int8 = "bf16 model, int8 low-rank + int8 dense (ours int8 all)"
    torch.set_num_threads(1)
    out = comm_harness.validate(2, cases={c: comm_harness.CASES[c] for c in (case, all_int8)}, psgd_dtypes=("float32",))
    steady = out["runs"][case]["steps"][1]["kinds"]
    assert steady["lowrank_reduce"]["metered"] == steady["lowrank_reduce"]["closed_form"]
    assert steady["lowrank_reduce"]["metered"][0] > 0
    # compress_dense: the dense kind is 8-bit both ways (+ one fp32 absmax per 256): about half of
    # bf16 gradients + bf16 parameters.
    dense_int8 = out["runs"][all_int8]["steps"][1]["kinds"]["dense"]
    assert dense_int8["metered"] == dense_int8["closed_form"]
    assert 0.5 < dense_int8["metered"][0] / steady["dense"]["metered"][0] < 0.52
    assert out["ours_exact"], out["runs"]
    assert out["powersgd_exact"], out["powersgd"]
