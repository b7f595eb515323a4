"""8-bit block-wise dynamic codecs for optimizer moments, through bitsandbytes.

Adam's first moment uses bitsandbytes' signed dynamic map and the second moment its unsigned
map, with one absmax per block, as ``bnb.optim.*8bit`` optimizers store them.  Tensors
smaller than ``min_8bit_size`` keep fp32 moments, as bitsandbytes does (``min_8bit_size=4096``).

Only the functional codecs of bitsandbytes are used (``quantize_blockwise`` /
``dequantize_blockwise``): they run on CPU and CUDA, so the Adam math itself stays one pure
torch function (``core.adam``) that every backend and the distributed path share.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = ["BlockwiseCodec", "Moment"]


@lru_cache(maxsize=4)
def _dynamic_map(signed: bool, device: str) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.create_dynamic_map(signed=signed).to(device)


@dataclass(kw_only=True, slots=True)
class Moment:
    """One stored optimizer moment: fp32 values, or 8-bit codes plus per-block absmax."""

    values: torch.Tensor | None = None
    """fp32 moment (when stored in 32 bits), shape of the tensor it belongs to."""
    codes: torch.Tensor | None = None
    """uint8 block-wise codes, shape of the tensor it belongs to."""
    absmax: torch.Tensor | None = None
    """fp32 per-block absmax, ``(ceil(numel / block_size),)``."""

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.codes, self.absmax) if t is not None)


@dataclass(kw_only=True, slots=True)
class BlockwiseCodec:
    """Encodes fp32 moments as 8-bit block-wise dynamic codes (or keeps them fp32)."""

    bits: int = 8
    """8 for bitsandbytes block-wise dynamic codes, 32 to keep fp32 moments."""
    block_size: int = 256
    """Elements per absmax block (bitsandbytes' 8-bit optimizers use 256)."""
    min_8bit_size: int = 4096
    """Tensors with fewer elements keep fp32 moments, as in bitsandbytes."""

    def __post_init__(self) -> None:
        if self.bits not in (8, 32):
            raise ValueError(f"state bits must be 8 or 32, got {self.bits!r}")

    def uses_8bit(self, numel: int) -> bool:
        return self.bits == 8 and numel >= self.min_8bit_size

    def encode(self, x: torch.Tensor, *, signed: bool) -> Moment:
        """fp32 tensor -> :class:`Moment` (a copy in fp32 if this tensor stays 32-bit)."""
        if not self.uses_8bit(x.numel()):
            return Moment(values=x.detach().to(torch.float32).clone())
        import bitsandbytes.functional as bnbf

        qmap = _dynamic_map(signed, str(x.device))
        codes, qstate = bnbf.quantize_blockwise(
            x.detach().to(torch.float32).contiguous(), code=qmap, blocksize=self.block_size
        )
        return Moment(codes=codes.view(x.shape), absmax=qstate.absmax.to(torch.float32))

    def decode(self, moment: Moment, *, signed: bool) -> torch.Tensor:
        """:class:`Moment` -> fp32 tensor."""
        if moment.values is not None:
            return moment.values.clone()
        import bitsandbytes.functional as bnbf

        assert moment.codes is not None and moment.absmax is not None
        qmap = _dynamic_map(signed, str(moment.codes.device))
        out = bnbf.dequantize_blockwise(
            moment.codes.contiguous(), absmax=moment.absmax, code=qmap, blocksize=self.block_size
        )
        return out.to(torch.float32).view(moment.codes.shape)

    def zeros(self, shape: torch.Size, device: torch.device, *, signed: bool) -> Moment:
        return self.encode(torch.zeros(shape, dtype=torch.float32, device=device), signed=signed)
