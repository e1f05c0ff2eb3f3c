"""Hierarchical fusion: the single-level formula applied at every encoder level.

At level ``l``: ``F^l = phi(W_l [H_1^l || ... || H_M^l] + b_l)`` as a 1x1 convolution, ``phi`` = ReLU, with missing
modalities zeroed and the concatenation renormalised by ``M / n_present`` (as in :mod:`.single`). Each fused level
is the decoder's skip connection; the deepest is the fused latent ``Z``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..config import ModelConfig
from ..encoders import conv_block
from .base import Fusion, renormalised_concat


class HierarchicalFusion(Fusion):
    """Fusion at every level; parameters ``fusion.levels.<l>`` (shared, owner None)."""

    family = "hierarchical"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        m = len(cfg.modalities)
        self.levels = nn.ModuleList(
            conv_block(cfg.spatial_dims, m * c, c, kernel_size=1, conv_only=True) for c in cfg.channels
        )
        self.act = nn.ReLU()

    def forward(self, pyramids: Sequence[Sequence[Tensor]], mask: Tensor) -> list[Tensor]:
        """``pyramids[i][l]`` (B, C_l, *S_l) -> fused ``[F^0, ..., F^{L-1}]`` with the same shapes."""
        return [
            self.act(proj(renormalised_concat([p[l] for p in pyramids], mask)))
            for l, proj in enumerate(self.levels)
        ]
