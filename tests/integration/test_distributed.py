"""Data-parallel Q-GaLore on gloo (2 and 4 CPU processes) against one process.

I2 equivalence: N ranks with per-rank batch B reproduce one process with batch N*B (losses,
INT8 codes, SVD events); I1 replicas are bit-identical after every step; I4 metered bytes
match the closed form; bad input fails on every rank with the same error.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_distributed

STEPS = 12
SEQ = 32
PER_RANK_BATCH = 2
GLOBAL_BATCH = 4  # divisible by 1, 2 and 4


def _build(seed: int = 0, accumulation: int | None = None, **cfg_overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    from qgalore_dist import QGaLoreAdamW8bit, QGaLoreConfig, prepare_model

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=160, num_attention_heads=4, num_hidden_layers=2, vocab_size=128,
        max_position_embeddings=SEQ, bos_token_id=0, eos_token_id=1, pad_token_id=2))
    prepare_model(model, group_size=32)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or p.dtype == torch.uint8]
    cfg = dict(lr=0.01, rank=8, update_proj_gap=4, proj_group_size=64, seed=seed)
    cfg.update(cfg_overrides)
    opt = QGaLoreAdamW8bit([p for _, p in named], QGaLoreConfig(**cfg), names={p: n for n, p in named},
                           gradient_accumulation_steps=accumulation)
    return model, opt


def _batches(steps: int, accum: int):
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, 128, (steps, accum, GLOBAL_BATCH, SEQ), generator=gen)


def _train(rank: int, world_size: int, accum: int, cfg: dict, check_every_step: bool, steps: int = STEPS,
           no_sync: bool = False) -> dict:
    model, opt = _build(**cfg)
    data = _batches(steps, accum)
    per_rank = GLOBAL_BATCH // world_size
    losses, svds, held, dense_held = [], [], [], []
    for step in range(steps):
        total = torch.zeros(())
        for micro in range(accum):
            x = data[step, micro, rank * per_rank:(rank + 1) * per_rank]
            with opt.no_sync() if no_sync and micro < accum - 1 else contextlib.nullcontext():
                loss = model(input_ids=x, labels=x).loss / accum
                loss.backward()
            total += loss.detach()
        if opt.overlap is not None:
            opt.overlap.wait_all()  # so that what is held does not depend on timing
        held.append(opt.lowrank_grad_bytes())
        dense_held.append(sum(p.grad.numel() for p in opt.dense_params if p.grad is not None))
        opt.step()
        opt.zero_grad()
        if world_size > 1:
            dist.all_reduce(total)
            total /= world_size
        losses.append(total.item())
        svds.append(opt.svds_last_step)
        if check_every_step:
            opt.check_replicas()
    codes = {n: t.clone() for n, t in opt.replicated_tensors() if n.endswith(".codes")}  # INT8 weights
    launches = {name: (r.launches_in_backward, r.launches_at_step) if r else (0, 0)
                for name, r in (("lowrank", opt.overlap), ("dense", opt.dense_overlap))}
    return {"losses": losses, "svds": svds, "codes": codes, "meter": opt.comm.meter.last_step,
            "plan": opt.plan.owner, "lowrank_held": held, "dense_grads_held": dense_held, "launches": launches}


def _single(accum: int, cfg: dict, steps: int = STEPS) -> dict:
    return _train(0, 1, accum, cfg, False, steps)


def _codes_identical(result: dict, reference: dict) -> float:
    same = sum(int((result["codes"][n] == reference["codes"][n]).sum()) for n in reference["codes"])
    return same / sum(t.numel() for t in reference["codes"].values())


@pytest.mark.parametrize("world_size,accum,cfg", [
    pytest.param(2, 1, {}, id="N2-accum1-exact-balanced"),
    pytest.param(2, 2, {"svd_method": "randomized", "placement": "rank0"}, id="N2-accum2-randomized-rank0"),
    pytest.param(4, 1, {"placement": "balanced"}, id="N4-accum1-exact-balanced"),
])
def test_equivalence_with_single_process(world_size, accum, cfg):
    reference = _single(accum, cfg)
    results = run_distributed(_train, world_size, accum, cfg, True)
    for r in results:
        assert r["svds"] == reference["svds"]
        assert sum(r["svds"]) > 0
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(reference["losses"]), rtol=1e-4, atol=0)
    if world_size > 1 and cfg.get("placement", "balanced") == "balanced":
        assert len(set(results[0]["plan"].values())) == world_size  # every rank owns something


def test_int8_codes_match_single_process_within_one_subspace():
    """Between refreshes the INT8 codes agree with one process to >= 99.9%.  Across refreshes
    they do not stay that close: the SVD of a tiny random model's gradient has nearly equal
    singular values, so reduction-order noise (1e-7) rotates the subspace and the runs part
    (measured: 99.9% -> 72% over 12 steps with refreshes every 4); losses still agree to 1e-4."""
    cfg = {"update_proj_gap": 1000}
    reference = _single(1, cfg, steps=4)
    for r in run_distributed(_train, 2, 1, cfg, False, 4):
        assert r["svds"] == reference["svds"] == [14, 0, 0, 0]  # 7 matrices x 2 layers
        assert _codes_identical(r, reference) >= 0.999


def _perturb_one_rank(rank: int, world_size: int) -> str:
    from qgalore_dist.distributed.replicas import ReplicaMismatchError

    model, opt = _build()
    x = _batches(1, 1)[0, 0, rank * 2:(rank + 1) * 2]
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.check_replicas()
    layer = model.model.layers[1].mlp.up_proj
    if rank == 1:
        layer.weight.data[3, 5] ^= 1
    try:
        opt.check_replicas()
    except ReplicaMismatchError as exc:
        return str(exc)
    return "no error"


def test_check_replicas_detects_a_perturbed_rank():
    messages = run_distributed(_perturb_one_rank, 2)
    assert all("layers.1.mlp.up_proj.weight.codes" in m and "rank 1" in m for m in messages), messages


def _mismatched(rank: int, world_size: int, field: str) -> str:
    try:
        _build(**({field: 8 + 4 * rank} if field == "rank" else {"seed": rank}))
    except ValueError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize("field", ["rank", "seed"])
def test_mismatched_config_raises_on_every_rank(field):
    messages = run_distributed(_mismatched, 2, field)
    assert all("differs between rank 0 and rank 1" in m and field in m for m in messages), messages


def _raises_mid_step(rank: int, world_size: int) -> str:
    model, opt = _build()
    x = _batches(1, 1)[0, 0, rank * 2:(rank + 1) * 2]
    model(input_ids=x, labels=x).loss.backward()
    if rank == 1:
        raise RuntimeError("injected failure on rank 1")
    try:
        opt.step()
    except Exception as exc:  # the survivor must not wait forever
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def test_rank_failure_mid_step_does_not_hang():
    with pytest.raises(RuntimeError) as info:
        run_distributed(_raises_mid_step, 2, timeout_s=20)
    text = str(info.value)
    assert "injected failure on rank 1" in text
    assert "rank 0: RuntimeError" not in text  # rank 0 returned (did not hang) ...
    survivor = run_distributed.last_results[0]
    assert "failed at optimizer step 0" in survivor and "qgalore-dist" in survivor, survivor


def _metered(rank: int, world_size: int) -> dict:
    model, opt = _build(update_proj_gap=100)
    x = _batches(2, 1)
    per_rank = GLOBAL_BATCH // world_size
    for step in range(2):  # step 0 refreshes every projector, step 1 is steady state
        xb = x[step, 0, rank * per_rank:(rank + 1) * per_rank]
        model(input_ids=xb, labels=xb).loss.backward()
        opt.step()
        opt.zero_grad()
    shapes = [(opt.state[p]["projector"].lowrank_shape, p.shape) for p in opt.galore_params]
    dense = sum(p.numel() * p.element_size() for p in opt.dense_params)
    return {"meter": opt.comm.meter.last_step, "shapes": shapes, "dense": dense}


def test_metered_bytes_match_closed_form():
    world_size = 2
    res = run_distributed(_metered, world_size)[0]
    factor = (world_size - 1) / world_size
    lowrank_bytes = sum(a * b * 4 for (a, b), _ in res["shapes"])
    meter = res["meter"]
    assert meter["lowrank_reduce"]["bytes"] == pytest.approx(factor * lowrank_bytes)
    assert meter["update_gather"]["bytes"] == pytest.approx(factor * lowrank_bytes)
    assert meter["full_grad_reduce"]["bytes"] == 0 and meter["proj_broadcast"]["bytes"] == 0
    assert meter["dense"]["bytes"] == pytest.approx(2 * factor * res["dense"])
    # Each GaLore matrix moves at most r / min(m, n) of a dense bf16 all-reduce of it (times 2 for fp32 payloads).
    galore_dense_bf16 = sum(2 * factor * m * n * 2 for _, (m, n) in res["shapes"])
    ratio = (meter["lowrank_reduce"]["bytes"] + meter["update_gather"]["bytes"]) / galore_dense_bf16
    assert ratio <= max(8 / min(m, n) for _, (m, n) in res["shapes"]) * 2 + 1e-9


def test_compressed_payloads_stay_within_one_percent():
    """8-bit low-rank gradients and updates, and 8-bit dense gradients and updates
    (``compress_dense``), with error feedback: replicas identical (checked every step), loss
    within 1% of one process, about a quarter of the fp32 payload's bytes for every kind."""
    cfg = {"compress_lowrank": True, "compress_dense": True, "update_proj_gap": 100}
    reference = _single(1, {"update_proj_gap": 100})
    results = run_distributed(_train, 2, 1, cfg, True)
    for r in results:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(reference["losses"]), rtol=1e-2, atol=0)
    plain = run_distributed(_train, 2, 1, {"update_proj_gap": 100}, False)[0]["meter"]
    for kind in ("lowrank_reduce", "update_gather", "dense"):
        compressed = results[0]["meter"][kind]["bytes"]
        assert 0.25 <= compressed / plain[kind]["bytes"] <= 0.27, (kind, compressed, plain[kind])


def test_bf16_payloads_halve_bytes_and_keep_replicas_identical():
    """bfloat16 payloads: replicas stay bit-identical (checked every step), loss within 1% of
    one process, half the low-rank and update bytes of fp32 payloads."""
    cfg = {"payload_dtype": "bfloat16", "update_proj_gap": 100}
    reference = _single(1, {"update_proj_gap": 100})
    results = run_distributed(_train, 2, 1, cfg, True)
    torch.testing.assert_close(torch.tensor(results[0]["losses"]), torch.tensor(reference["losses"]), rtol=1e-2, atol=0)
    plain = run_distributed(_train, 2, 1, {"update_proj_gap": 100}, False)[0]["meter"]
    for kind in ("lowrank_reduce", "update_gather"):
        assert results[0]["meter"][kind]["bytes"] == plain[kind]["bytes"] / 2


def test_buckets_pack_in_order_within_the_cap():
    from qgalore_dist.distributed import pack_buckets

    gen = torch.Generator().manual_seed(0)
    items = [(i, 0, torch.empty(int(n))) for i, n in enumerate(torch.randint(1, 700, (40,), generator=gen))]
    items.insert(7, ("huge", 1, torch.empty(5000)))
    for cap in (1024, 4096, 10**6):
        buckets = pack_buckets(items, cap, lambda t: 4)
        assert [item for bucket in buckets for item in bucket] == items  # order kept, nothing lost
        for bucket in buckets:
            size = sum(t.numel() * 4 for _, _, t in bucket)
            assert size <= cap or len(bucket) == 1, (cap, size, len(bucket))
        for first, second in zip(buckets, buckets[1:]):  # greedy: the next tensor did not fit
            assert sum(t.numel() * 4 for _, _, t in first) + second[0][2].numel() * 4 > cap
    assert pack_buckets(items, 0, lambda t: 4) == [items] and pack_buckets([], 1024, lambda t: 4) == []


def test_bucket_cap_changes_calls_not_results_or_bytes():
    """A 4 KiB cap splits every exchange into several collectives: losses and INT8 codes stay
    bit-identical to one bucket per kind, the metered bytes are the same, the calls grow."""
    steps = 6  # refreshes at steps 0 and 4: full-gradient reduce and projector broadcast too
    one = run_distributed(_train, 2, 1, {"bucket_cap_mb": 0}, False, steps)
    capped = run_distributed(_train, 2, 1, {"bucket_cap_mb": 4 / 1024}, True, steps)
    for a, b in zip(one, capped):
        assert a["losses"] == b["losses"]
        assert all(torch.equal(a["codes"][n], b["codes"][n]) for n in a["codes"])
    for kind in ("lowrank_reduce", "update_gather", "dense"):
        assert capped[0]["meter"][kind]["bytes"] == one[0]["meter"][kind]["bytes"], kind
        assert capped[0]["meter"][kind]["calls"] > one[0]["meter"][kind]["calls"], kind


def test_overlap_comm_reduces_during_backward_and_keeps_only_owned_lowrank_gradients():
    """``overlap_comm`` with 4 KiB buckets: low-rank and dense buckets are reduce-scattered from
    the gradient sinks / hooks during backward (none left for ``step()``), losses and INT8 codes
    are bit-identical to the exchange in ``step()``, the bytes are the same, and after backward
    each rank holds only the low-rank gradients it owns (about half on 2 ranks, instead of all)
    and no dense ``p.grad``."""
    steps = 6  # refreshes at steps 0 and 4: those layers keep the full gradient, not overlapped
    plain = run_distributed(_train, 2, 1, {"bucket_cap_mb": 4 / 1024}, False, steps)
    overlapped = run_distributed(_train, 2, 1, {"bucket_cap_mb": 4 / 1024, "overlap_comm": True}, True, steps)
    for a, b in zip(plain, overlapped):
        assert a["losses"] == b["losses"]
        assert all(torch.equal(a["codes"][n], b["codes"][n]) for n in a["codes"])
        launched_in_backward, launched_at_step = b["launches"]["lowrank"]
        assert launched_in_backward > 4 * steps and launched_at_step == 0, b["launches"]
        launched_in_backward, launched_at_step = b["launches"]["dense"]
        assert launched_in_backward >= 3 * steps and launched_at_step == 0, b["launches"]
        assert b["dense_grads_held"] == [0] * steps and min(a["dense_grads_held"]) > 0
        for step in (1, 2, 3, 5):  # steady steps: every INT8 layer's low-rank gradient was held
            assert b["lowrank_held"][step] < 0.75 * a["lowrank_held"][step], \
                (step, a["lowrank_held"], b["lowrank_held"])
    held_total = [sum(r["lowrank_held"][1] for r in overlapped), plain[0]["lowrank_held"][1]]
    assert held_total[0] == held_total[1]  # owners together hold exactly one copy of every matrix's
    for kind in ("lowrank_reduce", "update_gather", "dense"):
        assert overlapped[0]["meter"][kind]["bytes"] == plain[0]["meter"][kind]["bytes"], kind


def test_overlap_comm_with_gradient_accumulation():
    """Accumulation 2: with ``no_sync`` on the first micro-batch the result is bit-identical to
    the exchange in ``step()`` with the same bytes; without it every micro-batch is reduced
    (twice the low-rank bytes) and the owners sum the averages, equal up to rounding."""
    steps = 4
    plain = run_distributed(_train, 2, 2, {"stream_refresh": False}, False, steps)  # everything in step()
    with_no_sync = run_distributed(_train, 2, 2, {"overlap_comm": True}, False, steps, True)
    every_micro = run_distributed(_train, 2, 2, {"overlap_comm": True}, True, steps)
    assert with_no_sync[0]["losses"] == plain[0]["losses"]
    assert all(torch.equal(with_no_sync[0]["codes"][n], plain[0]["codes"][n]) for n in plain[0]["codes"])
    assert with_no_sync[0]["meter"]["lowrank_reduce"]["bytes"] == plain[0]["meter"]["lowrank_reduce"]["bytes"]
    torch.testing.assert_close(torch.tensor(every_micro[0]["losses"]), torch.tensor(plain[0]["losses"]),
                               rtol=1e-4, atol=0)
    assert every_micro[0]["meter"]["lowrank_reduce"]["bytes"] == 2 * plain[0]["meter"]["lowrank_reduce"]["bytes"]


def _refresh_step(rank: int, world_size: int, stream: bool, accumulation: int | None = None) -> dict:
    """One refresh step (step 0: every matrix refreshes): the full gradients each rank holds
    after backward, and every replicated tensor after the step."""
    from qgalore_dist.core import int8_layer_of

    model, opt = _build(stream_refresh=stream, accumulation=accumulation)
    x = _batches(1, 1)[0, 0, rank * 2:(rank + 1) * 2]
    model(input_ids=x, labels=x).loss.backward()
    stream_reduce = opt.reduces.full
    if stream_reduce is not None:
        stream_reduce.wait_all()
    local = sum(4 * layer.weight_grad.numel() for layer in map(int8_layer_of, opt.galore_params)
                if layer.weight_grad is not None)
    held = local + (stream_reduce.held_bytes() if stream_reduce is not None else 0)
    owned = sum(4 * p.numel() for p in opt.galore_params if opt.owner[p] == rank)
    total = sum(4 * p.numel() for p in opt.galore_params)
    launches = stream_reduce.launches_in_backward if stream_reduce is not None else 0
    early = len(opt.early.snapshots)
    opt.step()
    return {"held": held, "owned": owned, "total": total, "launches": launches, "svds": opt.svds_last_step,
            "tensors": {n: t.clone() for n, t in opt.replicated_tensors()}, "meter": opt.comm.meter.last_step,
            "early": early, "owned_count": sum(opt.owner[p] == rank for p in opt.galore_params)}


def test_streamed_refresh_keeps_only_owned_full_gradients_and_changes_no_bit():
    """stream_refresh (default): after backward on a refresh step each rank holds exactly the full
    fp32 gradients of the matrices it owns (the rest left for their owners during backward);
    projectors, schedules, INT8 codes and dense parameters equal the old path bit for bit, and
    the full-gradient bytes sent are the same."""
    streamed = run_distributed(_refresh_step, 2, True)
    kept = run_distributed(_refresh_step, 2, False)
    for rank, (s, k) in enumerate(zip(streamed, kept)):
        assert s["svds"] == k["svds"] == 14
        assert k["held"] == k["total"]
        assert s["held"] == s["owned"] < s["total"]
        assert s["launches"] > 0 and k["launches"] == 0
        assert s["tensors"].keys() == k["tensors"].keys()
        differing = [n for n in s["tensors"] if not torch.equal(s["tensors"][n], k["tensors"][n])]
        assert not differing, f"rank {rank}: {differing[:5]}"
        assert s["meter"]["full_grad_reduce"]["bytes"] == k["meter"]["full_grad_reduce"]["bytes"] > 0


def test_svds_at_completion_free_every_full_gradient_in_backward_and_change_no_bit():
    """With the passes per step known (``gradient_accumulation_steps=1``) each owner runs its SVDs
    as the last backward pass completes each averaged full gradient: after backward no rank holds
    any full gradient, every owned matrix was refreshed in backward, and the step's result equals
    the SVDs at ``step()`` (and the old path) bit for bit, with the same bytes."""
    at_completion = run_distributed(_refresh_step, 2, True, 1)
    at_step = run_distributed(_refresh_step, 2, True)
    for rank, (c, s) in enumerate(zip(at_completion, at_step)):
        assert c["svds"] == s["svds"] == 14
        assert c["held"] == 0 < s["held"] == s["owned"]
        assert c["early"] == c["owned_count"] > 0 and s["early"] == 0
        differing = [n for n in s["tensors"] if not torch.equal(s["tensors"][n], c["tensors"][n])]
        assert c["tensors"].keys() == s["tensors"].keys() and not differing, f"rank {rank}: {differing[:5]}"
        assert c["meter"]["full_grad_reduce"]["bytes"] == s["meter"]["full_grad_reduce"]["bytes"] > 0


def test_svds_at_completion_with_gradient_accumulation():
    """Accumulation 2 with ``gradient_accumulation_steps=2``: with ``no_sync`` on the first
    micro-batch bit-identical to the SVDs at ``step()``; without it (every micro-batch streamed,
    the SVD after the second) equal up to rounding; a third backward pass before ``step()``
    raises the same ``ValueError`` on every rank."""
    steps = 5  # refreshes at steps 0 and 4
    at_step = run_distributed(_train, 2, 2, {}, False, steps, True)
    no_sync = run_distributed(_train, 2, 2, {"accumulation": 2}, False, steps, True)
    every_micro = run_distributed(_train, 2, 2, {"accumulation": 2}, True, steps)
    assert no_sync[0]["losses"] == at_step[0]["losses"] and no_sync[0]["svds"] == at_step[0]["svds"]
    assert all(torch.equal(no_sync[0]["codes"][n], at_step[0]["codes"][n]) for n in at_step[0]["codes"])
    torch.testing.assert_close(torch.tensor(every_micro[0]["losses"]), torch.tensor(at_step[0]["losses"]),
                               rtol=1e-4, atol=0)
    assert every_micro[0]["svds"] == at_step[0]["svds"]
    messages = run_distributed(_one_pass_too_many, 2)
    assert messages[0] == messages[1] and "gradient_accumulation_steps is 2" in messages[0]


def _one_pass_too_many(rank: int, world_size: int) -> str:
    model, opt = _build(accumulation=2)
    x = _batches(1, 1)[0, 0, rank * 2:(rank + 1) * 2]
    for _ in range(2):
        model(input_ids=x, labels=x).loss.backward()
    with pytest.raises(ValueError) as caught:
        model(input_ids=x, labels=x).loss.backward()
    return str(caught.value)


def _skipped_after_svds_in_backward(rank: int, world_size: int) -> dict:
    """Step 0 with SVDs run in backward, then skipped (non-finite elsewhere): nothing of it stays."""
    model, opt = _build(accumulation=1)
    x = _batches(1, 1)[0, 0, rank * 2:(rank + 1) * 2]
    model(input_ids=x, labels=x).loss.backward()
    opt.reduces.full.wait_all()  # the last bucket's SVDs too (else they run at step())
    refreshed_in_backward = len(opt.early.snapshots)
    opt.step(extra_finite=rank != 0)  # rank 0's engine found a non-finite gradient
    out = {"early": refreshed_in_backward, "skipped": opt.skipped_steps,
           "no_projector": not any(opt.state[p]["projector"].has_matrix() for p in opt.galore_params)}
    return {**out, "next_svds": _next_step_svds(model, opt, x)}


def _next_step_svds(model, opt, x) -> int:
    """One more step after a skipped one: its SVD count (it must refresh again), replicas checked."""
    opt.zero_grad()
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.check_replicas()
    return opt.svds_last_step


def test_a_skipped_step_undoes_svds_run_in_backward():
    for r in run_distributed(_skipped_after_svds_in_backward, 2):
        assert r["early"] > 0 and r["skipped"] == 1 and r["no_projector"] and r["next_svds"] == 14


def _svd_fails_on_its_owner(rank: int, world_size: int, accumulation: int | None = None) -> dict:
    from qgalore_dist.optim import RefreshError

    model, opt = _build(accumulation=accumulation)
    victim = opt.galore_params[3]
    proj = opt.state[victim]["projector"]
    if opt.owner[victim] == rank:
        def failing_refresh(*args, **kwargs):
            raise torch.linalg.LinAlgError("simulated: SVD did not converge")
        proj.refresh = failing_refresh
    before = {n: t.clone() for n, t in opt.replicated_tensors()}
    x = _batches(1, 1)[0, 0, rank * 2:(rank + 1) * 2]
    model(input_ids=x, labels=x).loss.backward()
    with pytest.raises(RefreshError) as caught:
        opt.step()
    after = dict(opt.replicated_tensors())
    out = {"message": str(caught.value), "skipped": opt.skipped_steps, "victim": opt.name_of(victim),
           "unchanged": sorted(before) == sorted(after) and all(torch.equal(before[n], after[n]) for n in before),
           "no_moments": all("exp_avg" not in opt.state[p] for p in opt.galore_params + opt.dense_params),
           "no_projector": not any(opt.state[p]["projector"].has_matrix() for p in opt.galore_params)}
    proj.__dict__.pop("refresh", None)  # the SVD works again: the next step refreshes and trains
    return {**out, "next_svds": _next_step_svds(model, opt, x)}


@pytest.mark.parametrize("accumulation", [None, 1], ids=["svd_at_step", "svd_in_backward"])
def test_a_failed_svd_raises_on_every_rank_and_changes_nothing(accumulation):
    results = run_distributed(_svd_fails_on_its_owner, 2, accumulation)
    assert results[0]["message"] == results[1]["message"]
    assert results[0]["victim"] in results[0]["message"] and "step 0" in results[0]["message"]
    for r in results:
        assert r["skipped"] == 1 and r["unchanged"] and r["no_moments"] and r["no_projector"]
        assert r["next_svds"] == 14
