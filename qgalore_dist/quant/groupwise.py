"""Group-wise asymmetric integer quantization (2, 4 and 8 bits) with real bit packing.

A tensor is flattened row-major and cut into groups of ``group_size`` consecutive elements.
Each group ``w`` gets ``scale = max(max(w) - min(w), 1e-5) / (2**bits - 1)`` and a zero point
``zero = -round(min(w) / scale)``; codes are ``q = clamp(round(w / scale) + zero, 0, 2**bits-1)``
and ``dequant(q) = scale * (q - zero)``.  This is the Q-GaLore reference scheme
(``q_galore_projector._quantize``, ``_quantize_tensor_int8``) with one fix: the reference
clamps ``zero`` into ``[0, 2**bits-1]``, which destroys groups whose values all have one sign
(a group spanning [1, 2] dequantizes with an error of 1.0 at 4 bits).  Here ``zero`` is kept
unclamped (stored as fp32), so every group is reproduced to within ``scale / 2`` (nearest) or
``scale`` (stochastic).  Stochastic rounding additionally uses the unrounded zero point
``zero = -min(w) / scale`` (codes ``SR((w - min(w)) / scale)``), so that it is unbiased for
every element, the group's min and max included.  ``reference=True`` restores the clamped,
rounded formula for comparisons.

Layouts: flat (the reference's) or row-aligned (``row_length=``: groups never cross a row, the
last group of a row shorter when ``group_size`` does not divide it; identical to flat when it
does) -- the INT8 weights' layout, so that a row shard never cuts a group (FSDP2).

Shapes: ``x`` any shape with ``numel % group_size == 0`` (flat) or ``numel % row_length == 0``;
codes are uint8 with ``x``'s shape (one code per byte) until :func:`pack_codes` packs ``8 // bits``
codes per byte; ``scales`` and ``zeros`` are fp32 ``(num_groups, 1)``.
"""

from __future__ import annotations

import torch

from .random import StreamKey, uniform_from_key

__all__ = [
    "SUPPORTED_BITS",
    "check_group_layout",
    "groups_per_row",
    "num_groups",
    "quantize",
    "dequantize",
    "weight_row_length",
    "pack_codes",
    "unpack_codes",
    "packed_numel",
]

SUPPORTED_BITS = (2, 4, 8)
_MIN_RANGE = 1e-5  # the reference's clamp on max - min, so constant groups do not divide by 0


def check_group_layout(numel: int, bits: int, group_size: int, *, name: str = "tensor",
                       row_length: int | None = None) -> None:
    """Raise ``ValueError`` unless ``bits`` is supported and the groups tile the tensor:
    ``group_size`` divides ``numel`` (flat layout, ``row_length=None``), or ``row_length``
    divides ``numel`` (row-aligned layout: any ``group_size``)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{name}: bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"{name}: group_size must be a positive int, got {group_size!r}")
    if row_length is not None:
        if row_length <= 0 or numel % row_length:
            raise ValueError(f"{name}: row_length={row_length} does not divide the tensor's {numel} elements")
        return
    if numel % group_size != 0:
        raise ValueError(
            f"{name}: group_size={group_size} does not divide the tensor's {numel} elements; "
            f"choose a group size that divides {numel}"
        )


def groups_per_row(row_length: int, group_size: int) -> int:
    """Groups of one row in the row-aligned layout: ``ceil(row_length / group_size)`` (the
    last one shorter when ``group_size`` does not divide ``row_length``)."""
    return -(-row_length // group_size)


def num_groups(numel: int, group_size: int, row_length: int | None = None) -> int:
    """Number of (scale, zero) pairs of a ``numel``-element tensor in the given layout."""
    if row_length is None:
        return numel // group_size
    return numel // row_length * groups_per_row(row_length, group_size)


def weight_row_length(out_features: int, in_features: int, group_size: int) -> int | None:
    """The group layout of an INT8 ``(out_features, in_features)`` weight: ``in_features``
    (row-aligned) when ``group_size <= in_features`` -- identical to the reference's flat
    layout when ``group_size`` divides ``in_features``, else each row ends in a short group,
    so a row shard never cuts a group; ``None`` (the flat layout, groups spanning rows) when
    ``group_size`` exceeds a row but divides the weight.  Raises ``ValueError`` otherwise."""
    if group_size <= in_features:
        return in_features
    if (out_features * in_features) % group_size == 0:
        return None
    raise ValueError(f"group_size={group_size} exceeds a row and does not divide the "
                     f"{out_features}x{in_features} weight; choose group_size <= {in_features}")


def _partial_rows(group_size: int, row_length: int | None) -> bool:
    """Whether the layout has a short last group per row (else it is the flat layout)."""
    return row_length is not None and row_length % group_size != 0


def _group_params(groups: torch.Tensor, bits: int, reference: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``groups`` (G, g) fp32 -> ``(scales, zeros)``, each (G, 1) fp32."""
    max_int = 2**bits - 1
    lo = groups.amin(dim=1, keepdim=True)
    hi = groups.amax(dim=1, keepdim=True)
    scales = (hi - lo).clamp(min=_MIN_RANGE) / max_int
    zeros = -torch.round(lo / scales)
    if reference:
        zeros = zeros.clamp(0, max_int)
    return scales, zeros


def _quantize_groups(groups: torch.Tensor, noise: torch.Tensor | None, bits: int,
                     reference: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``groups`` (G, g) fp32 and its uniforms ``noise`` (G, g; None: round to nearest) ->
    ``(codes (G, g) uint8, scales (G, 1), zeros (G, 1))``."""
    max_int = 2**bits - 1
    scales, zeros = _group_params(groups, bits, reference)
    if noise is None:
        codes = torch.round(groups / scales) + zeros
    else:
        if reference:
            code_offset, shifted = zeros, groups / scales
        else:
            # Unrounded zero point: the grid runs from min(w) to max(w) exactly, so a group's
            # extreme elements can round either way and stochastic rounding is unbiased for
            # every element.  With the rounded zero point, min(w) can sit up to half a step
            # below code 0 and is then always clamped up (a bias of up to scale / 2).
            lo = groups.amin(dim=1, keepdim=True)
            zeros = -lo / scales
            code_offset, shifted = 0.0, (groups - lo) / scales
        floor = torch.floor(shifted)
        codes = floor + (noise < (shifted - floor)).to(shifted.dtype) + code_offset
    return codes.clamp_(0, max_int).to(torch.uint8), scales, zeros


def quantize(
    x: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    stochastic_key: StreamKey | None = None,
    reference: bool = False,
    offset: int = 0,
    row_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` group-wise; return ``(codes, scales, zeros)`` (codes unpacked, uint8).

    With ``stochastic_key`` the codes are rounded stochastically (up with probability equal to
    the fractional part) using the counter-based stream of that key, so the result is a pure
    function of ``(x, key)``; without it, round-to-nearest.  ``offset`` says that ``x`` is the
    slice of a larger tensor starting at that flat element (a multiple of ``group_size``, e.g. a
    row shard): the result equals that slice of the whole tensor's quantization.

    ``row_length`` (row-aligned layout): ``x`` is rows of ``row_length`` elements and no group
    crosses a row -- each row is cut into ``ceil(row_length / group_size)`` groups, the last
    one shorter when ``group_size`` does not divide ``row_length``; scales / zeros are
    ``(rows * groups_per_row, 1)``, row-major.  When ``group_size`` divides ``row_length`` this
    *is* the flat layout (identical results).  ``offset`` must then be a whole number of rows.
    The stochastic-rounding stream is indexed by flat element, whatever the layout.
    """
    check_group_layout(x.numel(), bits, group_size, row_length=row_length)
    if not _partial_rows(group_size, row_length):
        if offset % group_size:
            raise ValueError(f"quantize: offset {offset} is not a multiple of group_size={group_size}")
        groups = x.detach().reshape(-1, group_size).to(torch.float32)
        noise = None if stochastic_key is None else uniform_from_key(
            stochastic_key, groups.numel(), groups.device, start=offset).view_as(groups)
        codes, scales, zeros = _quantize_groups(groups, noise, bits, reference)
        return codes.view(x.shape), scales, zeros
    if offset % row_length:
        raise ValueError(f"quantize: offset {offset} is not a multiple of row_length={row_length}")
    rows = x.detach().reshape(-1, row_length).to(torch.float32)
    noise = None if stochastic_key is None else uniform_from_key(
        stochastic_key, rows.numel(), rows.device, start=offset).view_as(rows)
    head = row_length // group_size * group_size  # the full groups of every row, then the short one
    parts = [_quantize_groups(rows[:, :head].reshape(-1, group_size),
                              None if noise is None else noise[:, :head].reshape(-1, group_size), bits, reference),
             _quantize_groups(rows[:, head:], None if noise is None else noise[:, head:], bits, reference)]
    n_rows, full = rows.shape[0], row_length // group_size  # explicit sizes: a shard may hold no rows
    codes = torch.cat([parts[0][0].view(n_rows, head), parts[1][0]], dim=1)
    scales, zeros = (torch.cat([parts[0][i].view(n_rows, full), parts[1][i]], dim=1).reshape(-1, 1) for i in (1, 2))
    return codes.view(x.shape), scales, zeros


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    *,
    group_size: int,
    dtype: torch.dtype = torch.float32,
    row_length: int | None = None,
) -> torch.Tensor:
    """Inverse of :func:`quantize` for unpacked codes; returns ``codes``'s shape in ``dtype``.
    ``scales`` / ``zeros`` may have any shape with one element per group, in group order
    (e.g. ``(rows, groups_per_row)`` under FSDP2)."""
    if not _partial_rows(group_size, row_length):
        groups = codes.reshape(-1, group_size).to(torch.float32)
        return ((groups - zeros.reshape(-1, 1)) * scales.reshape(-1, 1)).to(dtype).view(codes.shape)
    rows = codes.reshape(-1, row_length).to(torch.float32)
    n_rows, head = rows.shape[0], row_length // group_size * group_size
    per_row = groups_per_row(row_length, group_size)  # explicit sizes: a shard may hold no rows
    s, z = scales.reshape(n_rows, per_row), zeros.reshape(n_rows, per_row)
    full = (rows[:, :head].reshape(n_rows, per_row - 1, group_size) - z[:, :-1, None]) * s[:, :-1, None]
    tail = (rows[:, head:] - z[:, -1:]) * s[:, -1:]
    return torch.cat([full.reshape(n_rows, head), tail], dim=1).to(dtype).view(codes.shape)


def packed_numel(numel: int, bits: int) -> int:
    """Bytes needed for ``numel`` codes of ``bits`` bits (the tail byte is zero-padded)."""
    per_byte = 8 // bits
    return (numel + per_byte - 1) // per_byte


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (< 2**bits) ``8 // bits`` per byte, little end first; returns 1-D uint8."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    flat = codes.reshape(-1)
    if bits == 8:
        return flat.clone()
    per_byte = 8 // bits
    pad = packed_numel(flat.numel(), bits) * per_byte - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    lanes = flat.view(-1, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, dtype=torch.int32, device=flat.device) * bits
    return (lanes << shifts).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes as 1-D uint8."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if bits == 8:
        return packed.reshape(-1)[:numel]
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32, device=packed.device) * bits
    lanes = (packed.reshape(-1, 1).to(torch.int32) >> shifts) & (2**bits - 1)
    return lanes.reshape(-1)[:numel].to(torch.uint8)
