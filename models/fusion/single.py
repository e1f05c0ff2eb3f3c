"""Single-level (intermediate) fusion at the bottleneck.

``Z = phi(W [H_1^L || ... || H_M^L] + b)`` -- the multimodal-fusion formula -- as a 1x1 convolution over the
channel-concatenated bottleneck features, ``phi`` = ReLU. Missing modalities: their ``H_i`` are replaced by zeros
and the concatenation is rescaled by ``M / n_present`` (see :func:`renormalised_concat`), which keeps the
pre-activation on the scale training saw with modalities present, instead of a learned "missing" token (that
would need a learned parameter per modality inside the shared core and still be read for absent inputs).
Decoder skip connections at the finer levels are masked means of the per-modality features.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..config import ModelConfig
from ..encoders import conv_block
from .base import Fusion, masked_mean, renormalised_concat


class SingleFusion(Fusion):
    """Bottleneck-only fusion; parameters: ``fusion.proj`` (shared, owner None)."""

    family = "single"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        c = cfg.channels[-1]
        m = len(cfg.modalities)
        self.proj = conv_block(cfg.spatial_dims, m * c, c, kernel_size=1, conv_only=True)
        self.act = nn.ReLU()

    def forward(self, pyramids: Sequence[Sequence[Tensor]], mask: Tensor) -> list[Tensor]:
        """``pyramids[i][l]`` (B, C_l, *S_l) for modality i -> fused pyramid ``[skip_0, ..., skip_{L-2}, Z]``."""
        depth = len(self.channels)
        skips = [masked_mean([p[l] for p in pyramids], mask) for l in range(depth - 1)]
        z = self.act(self.proj(renormalised_concat([p[-1] for p in pyramids], mask)))
        return [*skips, z]
