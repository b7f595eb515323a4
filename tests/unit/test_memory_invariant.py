"""DESIGN invariant I3, measured: during backward no point holds full-size fp32 weight gradients
of more than one GaLore layer (layers that refresh at the coming step excepted).

Every ``Int8Linear``'s ``grad_sink`` is wrapped by :class:`FullGradTracker`: each call records a
weak reference to the full (out, in) fp32 gradient it is handed, then counts how many of the
gradients handed so far are still alive (and their bytes).  A weak reference keeps nothing
alive, so the count is exactly the number of full-size gradient tensors that exist at that
moment.  The refresh step, where every layer keeps its full gradient, is the control: there the
same tracker sees all of them alive at once.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from helpers import int8_layers, param_names, single_thread, tiny_llama, trainable  # noqa: F401  (fixture)

from qgalore_dist import QGaLoreAdamW8bit, QGaLoreConfig, prepare_model

SEQ = 32
VOCAB = 128


@dataclass
class FullGradTracker:
    """Wraps the current grad sinks of ``layers`` (``{name: Int8Linear}``)."""

    layers: dict
    refs: list = field(default_factory=list)
    """(layer name, weakref to the full gradient handed to the sink, bytes)."""
    events: list = field(default_factory=list)
    """Per sink call: (layer name, names of live full gradients, bytes of live full gradients)."""

    def __post_init__(self) -> None:
        for name, layer in self.layers.items():
            layer.grad_sink = self._wrap(name, layer.grad_sink)

    def _wrap(self, name, inner):
        def sink(layer, weight_grad: torch.Tensor) -> None:
            assert weight_grad.shape == (layer.out_features, layer.in_features), (name, weight_grad.shape)
            assert weight_grad.dtype == torch.float32
            self.refs.append((name, weakref.ref(weight_grad), weight_grad.numel() * weight_grad.element_size()))
            alive = self.alive()
            self.events.append((name, [n for n, _ in alive], sum(b for _, b in alive)))
            inner(layer, weight_grad)
        return sink

    def alive(self) -> list[tuple[str, int]]:
        return [(n, b) for n, ref, b in self.refs if ref() is not None]

    def max_alive(self, exclude=()) -> int:
        return max(len([n for n in names if n not in exclude]) for _, names, _ in self.events)

    def peak_bytes(self) -> int:
        return max(b for _, _, b in self.events)


def _build(groups=None, **cfg):
    model = tiny_llama(hidden=64, intermediate=176, layers=2, heads=4, vocab=VOCAB, seq_len=SEQ)
    prepare_model(model, group_size=64)
    names = param_names(model)
    params = trainable(model) if groups is None else groups(model)
    config = QGaLoreConfig(**{**dict(lr=0.01, rank=8, update_proj_gap=100, proj_group_size=64), **cfg})
    return model, QGaLoreAdamW8bit(params, config, names=names)


def _batch(step: int, micro: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(100 * step + micro))


def _train_step(model, opt, step: int, accum: int = 1) -> None:
    for micro in range(accum):
        x = _batch(step, micro)
        (model(input_ids=x, labels=x).loss / accum).backward()
    opt.step()
    opt.zero_grad()


def _full_bytes(layers: dict) -> int:
    return sum(lay.out_features * lay.in_features * 4 for lay in layers.values())


def test_steady_step_holds_one_full_gradient_at_a_time():
    model, opt = _build()
    layers = dict(int8_layers(model))
    assert len(layers) == 14  # 7 GaLore matrices x 2 layers
    _train_step(model, opt, 0)  # the first step refreshes every projector
    assert opt.refresh_plan() == []  # update_proj_gap=100: the next step is steady

    tracker = FullGradTracker(layers)
    accum = 2  # gradient accumulation must not keep full gradients either
    for micro in range(accum):
        x = _batch(1, micro)
        (model(input_ids=x, labels=x).loss / accum).backward()

    assert len(tracker.events) == accum * len(layers)  # every layer's sink ran once per micro-batch
    peak, total = tracker.peak_bytes(), _full_bytes(layers)
    largest = max(lay.out_features * lay.in_features * 4 for lay in layers.values())
    summary = (f"peak live full fp32 gradients {peak} B (max {tracker.max_alive()} tensors at once) vs "
               f"{total} B for all {len(layers)} GaLore layers together")
    assert tracker.max_alive() == 1, summary + f"; events: {tracker.events}"
    assert peak == largest, summary
    assert tracker.alive() == [], "full gradients outlive backward: " + summary
    for name, layer in layers.items():
        assert layer.weight_grad is None, name
        assert layer.lowrank_grad is not None, name
        assert tuple(layer.lowrank_grad.shape) == opt.state[layer.weight]["projector"].lowrank_shape, name
    print(summary)
    opt.step()  # the accumulated low-rank gradients are consumed normally
    assert opt.svds_last_step == 0


def test_refresh_step_keeps_full_gradients():
    """The control: on a refresh step every refreshing layer accumulates its full gradient,
    and the same tracker sees all of them alive together."""
    model, opt = _build()
    layers = dict(int8_layers(model))
    due = opt.refresh_plan()
    assert sorted(due) == sorted(f"{n}.weight" for n in layers)  # no projector yet: all refresh
    tracker = FullGradTracker(layers)
    x = _batch(0)
    model(input_ids=x, labels=x).loss.backward()
    assert tracker.max_alive() == len(layers)
    assert tracker.peak_bytes() == _full_bytes(layers)
    for name, layer in layers.items():
        assert layer.weight_grad is not None and layer.lowrank_grad is None, name
        assert tuple(layer.weight_grad.shape) == (layer.out_features, layer.in_features)
    opt.step()
    assert opt.svds_last_step == len(layers)


def _split_groups(model):
    """Attention matrices on gap 100, MLP matrices on gap 2, dense parameters default."""
    layers = dict(int8_layers(model))
    attn = [lay.weight for n, lay in layers.items() if "self_attn" in n]
    mlp = [lay.weight for n, lay in layers.items() if ".mlp." in n]
    ids = {id(p) for p in attn + mlp}
    dense = [p for p in trainable(model) if id(p) not in ids]
    return [{"params": attn, "update_proj_gap": 100}, {"params": mlp, "update_proj_gap": 2}, {"params": dense}]


def test_mixed_step_only_refreshing_layers_keep_full_gradients():
    model, opt = _build(groups=_split_groups)
    layers = dict(int8_layers(model))
    for step in range(2):  # step 0 refreshes all, step 1 none; the next (state step 2) refreshes the MLPs
        _train_step(model, opt, step)
    due = set(opt.refresh_plan())
    assert due == {f"{n}.weight" for n in layers if ".mlp." in n} and len(due) == 6

    tracker = FullGradTracker(layers)
    x = _batch(2)
    model(input_ids=x, labels=x).loss.backward()
    refreshing = {n for n in layers if f"{n}.weight" in due}
    steady = set(layers) - refreshing
    # Apart from the refreshing layers' kept gradients, at most one full gradient at a time.
    peak_steady = max(sum(4 * layers[n].out_features * layers[n].in_features for n in names if n in steady)
                      for _, names, _ in tracker.events)
    assert tracker.max_alive(exclude=refreshing) == 1, (
        f"peak {peak_steady} B of non-refreshing full gradients vs {_full_bytes({n: layers[n] for n in steady})} B "
        f"for all {len(steady)} of them; events: {tracker.events}")
    assert sorted(n for n, _ in tracker.alive()) == sorted(refreshing)
    for name, layer in layers.items():
        if name in refreshing:
            assert layer.weight_grad is not None and layer.lowrank_grad is None, name
        else:
            assert layer.weight_grad is None and layer.lowrank_grad is not None, name
    opt.step()
    assert opt.svds_last_step == len(refreshing)


def test_one_process_refresh_runs_each_svd_in_backward_when_the_passes_are_known():
    """One process told its backward passes per step (``gradient_accumulation_steps=1``): each
    refreshing layer's full gradient is refreshed, projected and freed as backward produces it
    (one bucket per matrix here), so never more than one is alive -- against every one of them
    without it -- and the step's projectors, INT8 codes and dense parameters are bit-identical."""
    tiny_buckets = dict(bucket_cap_mb=4 / 1024)
    model, opt = _build(**tiny_buckets)
    opt.set_gradient_accumulation_steps(1)
    ref_model, ref_opt = _build(**tiny_buckets)
    layers = dict(int8_layers(model))
    tracker, ref_tracker = FullGradTracker(layers), FullGradTracker(dict(int8_layers(ref_model)))
    x = _batch(0)
    model(input_ids=x, labels=x).loss.backward()
    ref_model(input_ids=x, labels=x).loss.backward()
    assert tracker.max_alive() == 1 and ref_tracker.max_alive() == len(layers)
    assert all(layer.weight_grad is None and layer.lowrank_grad is None for layer in layers.values())
    assert len(opt.early.snapshots) == len(layers)  # every SVD already ran in backward
    opt.step()
    ref_opt.step()
    assert opt.svds_last_step == ref_opt.svds_last_step == len(layers)
    ours, ref = dict(opt.replicated_tensors()), dict(ref_opt.replicated_tensors())
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ours)
    opt.zero_grad()
    ref_opt.zero_grad()
    _train_step(model, opt, 1, accum=1)  # a steady step after it trains as usual
    _train_step(ref_model, ref_opt, 1, accum=1)
    ours, ref = dict(opt.replicated_tensors()), dict(ref_opt.replicated_tensors())
    assert all(torch.equal(ours[k], ref[k]) for k in ours)
