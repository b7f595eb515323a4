"""Typed configuration of :class:`QGaLoreAdamW8bit`."""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, fields

from ..core.projector import PROJ_TYPES, SVD_METHODS
from ..distributed.plan import PLACEMENTS
from ..quant import SUPPORTED_BITS

__all__ = ["QGaLoreConfig"]


def _is_real(value) -> bool:
    """A real number that is not a bool (``True`` is an int to Python, never a learning rate)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(kw_only=True, slots=True)
class QGaLoreConfig:
    """Hyperparameters of Q-GaLore.  Defaults follow the Q-GaLore C4 scripts
    (``run_pretrain.py`` with ``--proj_quant --weight_quant --stochastic_round``)."""

    lr: float = 1e-3
    """Peak learning rate (the scripts use 0.015 at 60M/130M, 0.01 at 350M/1B, 0.004 at 7B)."""
    rank: int = 128
    """Rank r of the gradient subspace; must be < min(m, n) of every GaLore matrix."""
    update_proj_gap: int = 200
    """Initial number of steps between projector refreshes (T)."""
    scale: float = 0.25
    """GaLore scale alpha applied to the back-projected update."""
    proj_type: str = "std"
    """Side selection: std (keep the larger dimension), reverse_std, left or right."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas; the Q-GaLore driver passes (0.9, --beta2=0.95)."""
    eps: float = 1e-8
    """Adam epsilon (bitsandbytes' default, used by the Q-GaLore driver)."""
    weight_decay: float = 0.0
    """Decoupled weight decay, applied after the update as in the reference."""
    proj_bits: int | None = 4
    """Bits of the stored projector (2, 4 or 8); None keeps it in fp32."""
    proj_group_size: int = 256
    """Group size of projector quantization (must divide min(m, n) * r)."""
    state_bits: int = 8
    """8 for bitsandbytes block-wise 8-bit Adam moments, 32 for fp32 moments."""
    stochastic_round: bool = True
    """Requantize INT8 weights with stochastic rounding (off: round to nearest)."""
    adaptive_gap: bool = True
    """Q-GaLore's layer-adaptive gap; False gives GaLore's fixed schedule."""
    cos_threshold: float = 0.4
    """Mean cosine similarity at or above which a layer's gap grows."""
    gamma_proj: int = 2
    """Factor by which the gap grows."""
    queue_size: int = 5
    """Number of recent similarities averaged."""
    svd_method: str = "exact"
    """exact (torch.linalg.svd) or randomized (subspace iteration)."""
    svd_oversample: int = 8
    """Extra sketch columns of the randomized SVD."""
    svd_power_iters: int = 2
    """Power iterations of the randomized SVD."""
    seed: int = 0
    """Key of the stochastic-rounding and randomized-SVD streams (same on every rank)."""
    placement: str = "balanced"
    """Owner placement of GaLore matrices over data-parallel ranks: balanced or rank0."""
    payload_dtype: str = "float32"
    """Dtype of gradient and update payloads between ranks: float32 (exact equivalence with
    one process up to reduction order) or bfloat16 (half the bytes, DESIGN's b = 2)."""
    compress_lowrank: bool = False
    """Send low-rank gradients and low-rank updates as 8-bit block-wise codes with error
    feedback (costs one fp32 residual per low-rank gradient per rank, and one per owned
    update on its owner)."""
    compress_dense: bool = False
    """Also send dense parameters' gradients (to their owners) and their Adam updates (from
    their owners) as 8-bit block-wise codes with error feedback -- ZeRO++ qgZ/qwZ's bytes.
    Every rank, the owner included, applies the same decoded update, so replicas stay
    bit-identical without an fp32 master.  Costs one fp32 residual per dense parameter per
    rank, plus one per owned parameter on its owner.  Only where the optimizer manages the
    dense parameters (plain torch.distributed); under DeepSpeed or FSDP2 the engine reduces
    them and this is rejected."""

    overlap_comm: bool = False
    """Reduce low-rank gradients (and dense gradients, where this optimizer manages them) to
    their owners during backward, a bucket at a time as the layers finish (DDP's and
    DeepSpeed's ``overlap_comm``), instead of in ``step()``; after backward only owners hold
    them, and dense ``p.grad`` is released once sent, as under ZeRO-2 (clip with
    ``max_grad_norm``, not ``clip_grad_norm_``).  Needs every rank's backward to produce the
    same gradients in the same order (DDP's contract); with gradient accumulation use
    ``optimizer.no_sync()`` on all but the last micro-batch, or every micro-batch is reduced.
    Under FSDP2 right-projected low-rank gradients are reduce-scattered by row ranges the same
    way (HSDP: the mean across replicas at ``step()``).  Not combined with payload compression yet."""

    stream_refresh: bool = True
    """On a refresh step, reduce each refreshing INT8 layer's full fp32 gradient to the layer's
    owner *during backward*, a bucket at a time as the layers finish, and free it on every other
    rank at once (the owner keeps only the matrices it owns until its SVDs at ``step()``).  A
    refresh step then needs about the memory of a steady step (one bucket and one layer's
    gradient more) instead of every refreshing matrix's full gradient on every rank.  False:
    the old path (full gradients kept on every rank until ``step()``), for comparison."""

    bucket_cap_mb: float = 25.0
    """Largest flat buffer one exchange collective carries, in MiB (DDP's ``bucket_cap_mb``).
    Tensors are packed in order into buckets up to this size (a larger tensor travels alone), so
    the exchange's temporary memory stays bounded on large models; 0 puts every tensor of one
    kind into a single collective (fewest calls).  Bytes sent do not depend on it."""

    max_grad_norm: float = 0.0
    """Clip the global L2 norm of the gradients the optimizer consumes to this value (0: off).
    The norm covers every dense gradient (averaged over ranks) and every GaLore matrix's
    averaged low-rank gradient R = project(G) -- what Adam sees; on a refresh step R uses the
    new projector.  The reference never clips INT8 gradients."""

    def __post_init__(self) -> None:
        betas = self.betas
        if isinstance(betas, (list, tuple)):
            self.betas = tuple(betas)  # type: ignore[assignment]
        for name, ok, expected in self._checks():
            if not ok:
                raise ValueError(f"QGaLoreConfig.{name} must be {expected}, got {getattr(self, name)!r}")
        for compress in ("compress_lowrank", "compress_dense"):
            if self.overlap_comm and getattr(self, compress):
                raise ValueError(f"QGaLoreConfig.overlap_comm cannot be combined with {compress} yet "
                                 "(the compressed exchange runs in step()): set one of them to False")

    def _checks(self) -> list[tuple[str, bool, str]]:
        """``(field, ok, expected)`` for every field: types first (a bool is not an int, a string
        is not a number), then ranges."""
        betas_ok = (isinstance(self.betas, tuple) and len(self.betas) == 2
                    and all(_is_real(b) and 0 <= b < 1 for b in self.betas))
        checks = [
            ("lr", _is_real(self.lr) and self.lr >= 0, "a float >= 0"),
            ("rank", _is_int(self.rank) and self.rank >= 1, "an int >= 1"),
            ("update_proj_gap", _is_int(self.update_proj_gap) and self.update_proj_gap >= 1, "an int >= 1"),
            ("scale", _is_real(self.scale) and self.scale > 0, "a float > 0"),
            ("proj_type", self.proj_type in PROJ_TYPES, f"one of {PROJ_TYPES}"),
            ("betas", betas_ok, "two floats in [0, 1)"),
            ("eps", _is_real(self.eps) and self.eps > 0, "a float > 0"),
            ("weight_decay", _is_real(self.weight_decay) and self.weight_decay >= 0, "a float >= 0"),
            ("max_grad_norm", _is_real(self.max_grad_norm) and self.max_grad_norm >= 0,
             "a float >= 0 (0 disables clipping)"),
            ("bucket_cap_mb", _is_real(self.bucket_cap_mb) and self.bucket_cap_mb >= 0, "a number >= 0 (0: no cap)"),
            ("proj_bits", self.proj_bits is None or (_is_int(self.proj_bits) and self.proj_bits in SUPPORTED_BITS),
             f"None or one of {SUPPORTED_BITS}"),
            ("proj_group_size", _is_int(self.proj_group_size) and self.proj_group_size >= 1, "an int >= 1"),
            ("state_bits", _is_int(self.state_bits) and self.state_bits in (8, 32), "8 or 32"),
            ("cos_threshold", _is_real(self.cos_threshold) and -1 <= self.cos_threshold <= 1, "a float in [-1, 1]"),
            ("gamma_proj", _is_int(self.gamma_proj) and self.gamma_proj >= 1, "an int >= 1"),
            ("queue_size", _is_int(self.queue_size) and self.queue_size >= 1, "an int >= 1"),
            ("svd_method", self.svd_method in SVD_METHODS, f"one of {SVD_METHODS}"),
            ("svd_oversample", _is_int(self.svd_oversample) and self.svd_oversample >= 0, "an int >= 0"),
            ("svd_power_iters", _is_int(self.svd_power_iters) and self.svd_power_iters >= 0, "an int >= 0"),
            ("seed", _is_int(self.seed) and self.seed >= 0, "an int >= 0"),
            ("placement", self.placement in PLACEMENTS, f"one of {PLACEMENTS}"),
            ("payload_dtype", self.payload_dtype in ("float32", "bfloat16"), "'float32' or 'bfloat16'"),
        ]
        flags = ("stochastic_round", "adaptive_gap", "compress_lowrank", "compress_dense", "overlap_comm",
                 "stream_refresh")
        return checks + [(name, isinstance(getattr(self, name), bool), "a bool (true or false)") for name in flags]

    @classmethod
    def from_dict(cls, params: dict) -> "QGaLoreConfig":
        """Build from a plain dict (e.g. a ds_config ``optimizer.params``), rejecting unknown keys."""
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ValueError(f"unknown Q-GaLore option(s) {unknown}; allowed: {allowed}")
        return cls(**params)

    def to_dict(self) -> dict:
        return asdict(self)
