"""INT8 linear layer with a hand-written weight gradient, and model conversion both ways.

The weight lives as a frozen ``uint8`` parameter ``weight`` (out, in) with group-wise fp32
``weight_scales`` / ``weight_zeros`` buffers ``(num_groups, 1)`` (buffers, not
tensor attributes: FSDP2 and ``state_dict`` keep buffers and drop attributes).  Autograd cannot
give a uint8 tensor a gradient, so :class:`_Int8LinearFunction` computes the fp32 weight
gradient ``grad_out^T @ x`` itself and hands it to the layer's ``grad_sink``, whose default
adds it to ``layer.weight_grad`` (accumulation across micro-batches).  The distributed path
replaces the sink to project the gradient at once and keep only its low-rank image.
"""

from __future__ import annotations

import difflib
import re
import weakref
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..quant import dequantize, num_groups, quantize, weight_row_length
from .adam import WeightStep, apply_direction_

__all__ = [
    "DEFAULT_TARGET_MODULES", "Int8Linear", "accumulate_full_grad", "export_model", "find_targets", "int8_layer_of",
    "lowrank_sink", "prepare_model", "update_int8_codes_",
]

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# uint8 weight parameter -> its layer; lets an optimizer built from parameters find the
# layer's scales and gradient without tensor attributes.
# Keyed by id() because tensors compare element-wise; the identity check below guards reuse.
_LAYER_OF_WEIGHT: "dict[int, weakref.ref[Int8Linear]]" = {}
# Every live layer: the fallback when a layer's ``weight`` Parameter was replaced behind its
# back (``copy.deepcopy``/pickling build new Parameters, so do ``load_state_dict(assign=True)``
# and engines that re-register parameters); without it such a weight would silently be
# treated as a plain tensor without gradient and never be trained.
_LIVE_LAYERS: "weakref.WeakSet[Int8Linear]" = weakref.WeakSet()


def int8_layer_of(param: torch.Tensor) -> "Int8Linear | None":
    """The :class:`Int8Linear` whose ``weight`` is ``param``, or None."""
    ref = _LAYER_OF_WEIGHT.get(id(param))
    layer = ref() if ref is not None else None
    if layer is not None and layer.weight is param:
        return layer
    if param.dtype != torch.uint8:
        return None
    for layer in list(_LIVE_LAYERS):
        if layer.weight is param:
            _LAYER_OF_WEIGHT[id(param)] = weakref.ref(layer)
            return layer
    return None


def _int8_backward(ctx, grad_out, x, codes, scales, zeros):
    """``(grad_input, grad_bias)``; hands the fp32 weight gradient (out, in) to the layer's sink."""
    layer = ctx.layer
    weight = dequantize(codes, scales, zeros, group_size=layer.group_size, dtype=grad_out.dtype,
                        row_length=layer.row_length)
    grad_input = grad_out @ weight
    del weight
    g2 = grad_out.reshape(-1, grad_out.shape[-1]).to(torch.float32)
    weight_grad = g2.T @ x.reshape(-1, x.shape[-1]).to(torch.float32)  # (out, in) fp32
    layer.grad_sink(layer, weight_grad)
    grad_bias = g2.sum(0).to(grad_out.dtype) if ctx.has_bias else None
    return grad_input, grad_bias


class _Int8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, codes, scales, zeros, bias, layer):
        weight = dequantize(codes, scales, zeros, group_size=layer.group_size, dtype=x.dtype,
                            row_length=layer.row_length)
        ctx.save_for_backward(x, codes, scales, zeros)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_input, grad_bias = _int8_backward(ctx, grad_out, *ctx.saved_tensors)
        return grad_input, None, None, None, grad_bias, None


class _GatheredInt8LinearFunction(torch.autograd.Function):
    """The same product for a layer whose rows are partitioned (``layer.gather_weight`` set):
    the whole codes / scales / zeros are gathered for the forward, freed when it returns, and
    gathered again in backward (only ``x`` is saved), so a rank holds one gathered layer at a
    time instead of every layer's weight between forward and backward."""

    @staticmethod
    def forward(ctx, x, bias, layer):
        codes, scales, zeros = layer.gather_weight(layer)
        weight = dequantize(codes, scales, zeros, group_size=layer.group_size, dtype=x.dtype,
                            row_length=layer.row_length)
        del codes, scales, zeros
        ctx.save_for_backward(x)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        grad_input, grad_bias = _int8_backward(ctx, grad_out, x, *ctx.layer.gather_weight(ctx.layer))
        return grad_input, grad_bias, None


def accumulate_full_grad(layer: "Int8Linear", weight_grad: torch.Tensor) -> None:
    """Default gradient sink: ``layer.weight_grad += weight_grad`` (fp32, full size)."""
    if layer.weight_grad is None:
        layer.weight_grad = weight_grad
    else:
        layer.weight_grad.add_(weight_grad)


def lowrank_sink(project: Callable[[torch.Tensor], torch.Tensor]) -> Callable[["Int8Linear", torch.Tensor], None]:
    """A gradient sink that projects at once and accumulates only the low-rank image in
    ``layer.lowrank_grad``: the full fp32 gradient lives only for the duration of one
    layer's backward (DESIGN invariant I3)."""

    def sink(layer: "Int8Linear", weight_grad: torch.Tensor) -> None:
        lowrank = project(weight_grad)
        if layer.lowrank_grad is None:
            layer.lowrank_grad = lowrank
        else:
            layer.lowrank_grad.add_(lowrank)

    return sink


def update_int8_codes_(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, delta: torch.Tensor,
                       how: WeightStep, *, group_size: int, stochastic_key=None, offset: int = 0,
                       row_length: int | None = None) -> None:
    """In place on INT8 ``codes`` (uint8, any shape) and their fp32 ``scales`` / ``zeros``
    (one element per group, any shape: ``(num_groups, 1)``, or ``(rows, groups_per_row)`` under
    FSDP2) in the group layout of ``row_length`` (:func:`~qgalore_dist.quant.quantize`): dequantize,
    :func:`~qgalore_dist.core.adam.apply_direction_`
    with ``delta`` (``codes``' numel), requantize (stochastic rounding keyed by
    ``stochastic_key``, nearest when None).  ``offset`` is the flat index of ``codes``' first
    element in the whole weight (a row shard's), so a shard draws the bits the whole weight
    would and the codes equal the replicated path's.

    Runs the fused Triton kernel when :func:`qgalore_dist.kernels.use_triton` says so
    (bit-identical codes; the kernel knows the flat layout only, which a row-aligned layout
    with whole groups is), else the torch ops below."""
    if _kernel_layout(group_size, row_length) and kernels.use_triton(codes, delta):
        kernels.int8_update_(codes, scales, zeros, delta, group_size=group_size, step_size=how.step_size,
                             decay=how.decay, key=stochastic_key, offset=offset)
        return
    weight = dequantize(codes, scales, zeros, group_size=group_size, row_length=row_length)
    apply_direction_(weight, delta.view(weight.shape), how)
    new_codes, new_scales, new_zeros = quantize(weight, bits=8, group_size=group_size,
                                                stochastic_key=stochastic_key, offset=offset, row_length=row_length)
    codes.copy_(new_codes)
    scales.copy_(new_scales.view_as(scales))
    zeros.copy_(new_zeros.view_as(zeros))


def _kernel_layout(group_size: int, row_length: int | None) -> bool:
    """Whether the fused update kernel handles the layout: flat groups (row-aligned layouts
    with whole groups are flat); rows ending in a short group take the torch ops."""
    return row_length is None or row_length % group_size == 0


class Int8Linear(nn.Module):
    """``y = x @ dequant(W).T + b`` with W stored as group-wise asymmetric INT8.

    Group layout (:func:`~qgalore_dist.quant.weight_row_length`): row-aligned when
    ``group_size <= in_features`` (``row_length = in_features``; the reference's flat layout
    when ``group_size`` divides ``in_features``, else each row ends in a shorter group), flat
    (``row_length = None``, groups spanning rows) when ``group_size`` exceeds a row."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, group_size: int = 256,
                 device=None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.row_length: int | None = weight_row_length(out_features, in_features, group_size)
        """Row length of the group layout (``in_features``), None for flat groups spanning rows."""
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = num_groups(in_features * out_features, group_size, self.row_length)
        codes = torch.zeros(out_features, in_features, dtype=torch.uint8, device=device)
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.register_buffer("weight_scales", torch.ones(groups, 1, device=device))
        self.register_buffer("weight_zeros", torch.zeros(groups, 1, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.weight_grad: torch.Tensor | None = None
        """Accumulated full fp32 weight gradient (out, in), when the sink keeps it full."""
        self.lowrank_grad: torch.Tensor | None = None
        """Accumulated projected gradient, when the sink projects in backward."""
        self.grad_sink: Callable[[Int8Linear, torch.Tensor], None] = accumulate_full_grad
        self.gather_weight: Callable[[Int8Linear], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        """Set when this rank holds only some rows of the weight (ZeRO-3 partitioning): returns
        the whole ``(codes (out, in), scales, zeros)``, freshly gathered; forward and backward
        then gather around each use instead of reading ``weight`` / ``weight_scales`` /
        ``weight_zeros``, which hold this rank's rows."""
        self._register()

    def _register(self) -> None:
        _LAYER_OF_WEIGHT[id(self.weight)] = weakref.ref(self)
        _LIVE_LAYERS.add(self)

    def __getstate__(self) -> dict:
        # An optimizer's sink is a closure over its projector: a copy (or a pickle) of the
        # layer belongs to no optimizer, and closures cannot be pickled.
        state = super().__getstate__()
        state["grad_sink"] = accumulate_full_grad
        state["gather_weight"] = None  # a copy holds whatever its tensors hold, and no process group
        return state

    def __setstate__(self, state: dict) -> None:
        row_length = weight_row_length(state["out_features"], state["in_features"], state["group_size"])
        state.setdefault("row_length", row_length)
        super().__setstate__(state)
        self._register()  # copy.deepcopy / torch.load built a new weight Parameter

    def _apply(self, fn, recurse: bool = True):
        # model.to(torch.bfloat16) would round the quantization metadata (scales and the
        # fractional zero points of stochastic rounding): move it, but keep it fp32.
        meta = {name: self._buffers[name] for name in ("weight_scales", "weight_zeros")}
        super()._apply(fn, recurse)
        for name, before in meta.items():
            self._buffers[name] = before.to(device=self._buffers[name].device, dtype=torch.float32)
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group_size: int = 256, name: str = "linear") -> "Int8Linear":
        """Quantize ``linear``'s weight (round to nearest) into a new layer."""
        out_f, in_f = linear.weight.shape
        try:
            weight_row_length(out_f, in_f, group_size)
        except ValueError as exc:
            raise ValueError(f"{name}: weight_group_size={group_size} does not fit its {out_f}x{in_f} weight: "
                             f"{exc}") from None
        layer = cls(in_f, out_f, bias=linear.bias is not None, group_size=group_size,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        layer.set_weight(linear.weight.detach())
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def set_weight(self, weight: torch.Tensor, *, stochastic_key=None) -> None:
        """Quantize the fp ``weight`` (out, in) into this layer's codes, scales and zeros, in place."""
        codes, scales, zeros = quantize(weight, bits=8, group_size=self.group_size, stochastic_key=stochastic_key,
                                        row_length=self.row_length)
        self.weight.data.copy_(codes)
        self.weight_scales.copy_(scales)
        self.weight_zeros.copy_(zeros)

    def apply_update_(self, delta: torch.Tensor, *, step_size: float, decay: float, stochastic_key=None) -> None:
        """``W <- quant(dequant(W) - step_size * delta - decay * W')`` in place (``W'`` the
        updated weight: decoupled decay after the update; ``quant`` rounds stochastically with
        ``stochastic_key``, nearest when None).  ``delta`` (out, in).

        Runs the fused Triton kernel when :func:`qgalore_dist.kernels.use_triton` says so
        (bit-identical codes), else the torch ops of :func:`update_int8_codes_`."""
        how = WeightStep(step_size=step_size, decay=decay)
        if _kernel_layout(self.group_size, self.row_length) and kernels.use_triton(self.weight, delta):
            update_int8_codes_(self.weight.data, self.weight_scales, self.weight_zeros, delta, how,
                               group_size=self.group_size, stochastic_key=stochastic_key, row_length=self.row_length)
            return
        weight = self.dequantized_weight()
        apply_direction_(weight, delta, how)
        self.set_weight(weight, stochastic_key=stochastic_key)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole (out, in) weight (gathered first when the rows are partitioned)."""
        codes, scales, zeros = (self.weight, self.weight_scales, self.weight_zeros) if self.gather_weight is None \
            else self.gather_weight(self)
        return dequantize(codes, scales, zeros, group_size=self.group_size, dtype=dtype, row_length=self.row_length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gather_weight is not None:
            return _GatheredInt8LinearFunction.apply(x, self.bias, self)
        return _Int8LinearFunction.apply(x, self.weight, self.weight_scales, self.weight_zeros, self.bias, self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}")


def _matches(name: str, targets: Iterable[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return any(leaf == t or re.fullmatch(t, name) for t in targets)


def _nearest_module_name(target: str, model: nn.Module) -> str:
    """``; did you mean 'v_proj'?`` for the leaf name of an ``nn.Linear`` closest to ``target``."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and isinstance(m, nn.Linear)})
    close = difflib.get_close_matches(target, leaves, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; nn.Linear leaf names of the model: {leaves}"


def _tied_names(model: nn.Module) -> dict[int, list[str]]:
    """``id(parameter) -> every name it has`` for parameters registered under several names."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {k: v for k, v in names.items() if len(v) > 1}


def find_targets(model: nn.Module, target_modules: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module ``target_modules`` selects, checked: raises
    ``ValueError`` (deterministically, from the model alone, so every rank raises alike) when
    no module matches, when one entry matches nothing while others match (naming the nearest
    module name), when a match is not an ``nn.Linear`` with a 2-D weight, or when a match's
    weight is tied to another parameter (naming both)."""
    targets = tuple(target_modules)
    named = [(n, m) for n, m in model.named_modules() if n]
    matched = [(n, m) for n, m in named if _matches(n, targets)]
    if not matched:
        raise ValueError(f"target_modules={list(targets)} matched no module of {type(model).__name__}")
    for target in targets:
        if not any(_matches(n, (target,)) for n, _ in named):
            raise ValueError(f"target_modules entry {target!r} matched no module of {type(model).__name__} "
                             f"(the other entries match {len(matched)} module(s), which would train while "
                             f"this one stays dense){_nearest_module_name(target, model)}")
    tied = _tied_names(model)
    for name, module in matched:
        if isinstance(module, Int8Linear):
            continue
        if type(module) is not nn.Linear or module.weight.dim() != 2:
            raise ValueError(f"target module {name!r} is a {type(module).__name__}; target_modules must name "
                             f"nn.Linear layers")
        others = [n for n in tied.get(id(module.weight), []) if n != f"{name}.weight"]
        if others:
            raise ValueError(f"target module {name!r}: its weight {name}.weight is tied to {others[0]} (one "
                             f"tensor); an INT8 copy would untie them. Remove {name.rsplit('.', 1)[-1]!r} from "
                             "target_modules or untie the weights (e.g. tie_word_embeddings=false)")
    return matched


def prepare_model(model: nn.Module, *, target_modules: Iterable[str] = DEFAULT_TARGET_MODULES,
                  group_size: int = 256) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` whose leaf name (or full name, as a regex) is in
    ``target_modules`` with an :class:`Int8Linear`; other modules are left alone.

    Raises ``ValueError`` before changing anything (see :func:`find_targets`) if any entry of
    ``target_modules`` matches no module, if a match is not an ``nn.Linear`` with a 2-D weight,
    or if a match's weight is tied to another parameter.
    """
    for name, module in find_targets(model, target_modules):
        if isinstance(module, Int8Linear):
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, Int8Linear.from_linear(module, group_size=group_size, name=name))
    return model


def export_model(model: nn.Module, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Inverse of :func:`prepare_model`, in place: every :class:`Int8Linear` becomes an
    ``nn.Linear`` holding the dequantized weight (``dtype`` defaults to the bias dtype or
    fp32), so ``model.save_pretrained`` writes an ordinary checkpoint for inference."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, Int8Linear):
            continue
        out_dtype = dtype or (module.bias.dtype if module.bias is not None else torch.float32)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=module.weight.device, dtype=out_dtype)
        with torch.no_grad():
            linear.weight.copy_(module.dequantized_weight(out_dtype))
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, linear)
    return model
