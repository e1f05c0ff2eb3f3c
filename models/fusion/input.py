"""Input-level (early) fusion: the modalities enter one shared encoder as channels.

One convolution over the stacked channels ``[x_1, ..., x_M]`` is the sum of per-modality convolutions
``sum_i W_i * x_i``. It is written that way -- one stem conv per modality, ``fusion.stems.<m>`` -- so that the
first layer's weights carry their modality in their names (modality-aware aggregation reads ownership from names)
and so that a missing modality is excluded exactly: the stem output is ``M / n_present * sum_i m_i W_i * x_i``
(renormalised like dropout so the scale matches training with all modalities). GroupNorm + ReLU and the shared
encoder ``fusion.encoder`` (owner None) follow.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..config import ModelConfig
from ..encoders import Encoder, conv_block, norm_groups
from .base import Fusion, present_count


class InputFusion(Fusion):
    """Early fusion; parameters ``fusion.stems.<m>`` (owned by ``m``) and ``fusion.encoder``/``fusion.stem_norm``."""

    family = "input"
    modality_encoders = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        c0 = cfg.channels[0]
        self.stems = nn.ModuleDict(
            {m: conv_block(cfg.spatial_dims, 1, c0, conv_only=True, bias=False) for m in cfg.modalities}
        )
        # The stems have no bias: one shared bias would belong to no modality; GroupNorm recentres anyway.
        self.stem_norm = nn.GroupNorm(norm_groups(c0), c0)
        self.stem_act = nn.ReLU()
        self.encoder = Encoder(cfg.spatial_dims, c0, cfg.channels, stem=False)

    def forward(self, image: Tensor, mask: Tensor) -> list[Tensor]:
        """``image`` (B, M, *S) with missing channels already zero, ``mask`` (B, M) -> pyramid ``[F^0..F^{L-1}]``."""
        return self.fuse_stems(self.stem_features(image), mask)

    def stem_features(self, image: Tensor) -> list[Tensor | None]:
        """Per-modality stem outputs ``W_i * x_i`` (B, C_0, *S), ``None`` for modalities declared absent.

        They do not depend on the mask, so subset evaluation (``FusionNet.forward_subsets``) computes them once.
        """
        return [
            None if m in self.skip else self.stems[m](image[:, i : i + 1]) for i, m in enumerate(self.modalities)
        ]

    def fuse_stems(self, stems: list[Tensor | None], mask: Tensor) -> list[Tensor]:
        """Masked, renormalised sum of :meth:`stem_features` (B, C_0, *S) for ``mask`` (B, M), then GroupNorm,
        ReLU and the shared encoder -> pyramid ``[F^0..F^{L-1}]``."""
        first = next(s for s in stems if s is not None)
        extra = [1] * (first.dim() - 1)
        total: Tensor | None = None
        for i, part in enumerate(stems):
            if part is None:  # declared absent at this site: its term is exactly 0 anyway
                continue
            part = part * mask[:, i].reshape(-1, *extra).to(part.dtype)
            total = part if total is None else total + part
        assert total is not None
        scale = (len(self.modalities) / present_count(mask)).reshape(-1, *extra).to(total.dtype)
        return self.encoder(self.stem_act(self.stem_norm(total * scale)))
