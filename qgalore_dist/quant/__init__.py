"""Pure tensor quantizers: group-wise INT2/4/8 with packing, counter-based stochastic
rounding, and 8-bit block-wise optimizer-state codecs.  No torch.distributed here."""

from .groupwise import (
    SUPPORTED_BITS,
    check_group_layout,
    dequantize,
    groups_per_row,
    num_groups,
    pack_codes,
    packed_numel,
    quantize,
    unpack_codes,
    weight_row_length,
)
from .random import StreamKey, key_to_u32, stream_words, uniform_from_key
from .state_codec import BlockwiseCodec, Moment

__all__ = [
    "SUPPORTED_BITS",
    "BlockwiseCodec",
    "Moment",
    "StreamKey",
    "check_group_layout",
    "dequantize",
    "groups_per_row",
    "key_to_u32",
    "num_groups",
    "pack_codes",
    "packed_numel",
    "quantize",
    "stream_words",
    "uniform_from_key",
    "unpack_codes",
    "weight_row_length",
]
