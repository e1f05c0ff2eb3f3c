"""Shared pieces of the fusion families: the base class and the mask helpers every family uses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..encoders import masked_mean, masked_mean_stacked

__all__ = ["Fusion", "masked_mean", "masked_mean_stacked", "renormalised_concat", "present_count"]


class Fusion(nn.Module):
    """Base of the five fusion families (one subclass per family, registered in :mod:`models.fusion`).

    A family declares which shared parts :class:`models.network.FusionNet` builds around it:

    - ``modality_encoders``: whether the network runs one encoder per modality (``encoders.<m>``) and passes the
      per-modality pyramids to :meth:`forward`; False for early fusion, which encodes the image itself.
    - ``late``: whether predictions are made per modality and fused at the output (then the network builds no
      shared classifier and its decoder returns features, not logits).

    Contract for every family: a modality whose mask is 0 never contributes (its features are multiplied by
    exactly 0 or masked out of attention keys), and every parameter takes part in every forward so that Opacus's
    per-sample gradients exist for all of them (zero for a modality missing from a sample).

    Subset evaluation: :meth:`prepare` does the part of the fusion that does not depend on the mask and :meth:`fuse`
    the rest, ``forward(pyramids, mask) == fuse(prepare(pyramids), mask)``; ``FusionNet.forward_subsets`` prepares
    once and fuses per subset. By default everything is in :meth:`fuse`.
    """

    family: str = ""
    modality_encoders: bool = True
    late: bool = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.modalities: tuple[str, ...] = cfg.modalities
        self.channels: tuple[int, ...] = cfg.channels
        self.spatial_dims: int = cfg.spatial_dims
        #: modalities declared absent at this site (``FusionNet.set_site_modalities``): their branches are skipped.
        self.skip: frozenset[str] = frozenset()

    def prepare(self, pyramids: Any) -> Any:
        """The mask-independent work on the per-modality features (a nested list/tuple of tensors, batch first)."""
        return pyramids

    def fuse(self, prepared: Any, mask: Tensor) -> Any:
        """:meth:`forward` on :meth:`prepare`'s output."""
        return self(prepared, mask)


def present_count(mask: Tensor) -> Tensor:
    """(B, M) mask -> (B,) number of present modalities, at least 1 (callers reject samples with none)."""
    return mask.sum(dim=1).clamp_min(1.0)


def renormalised_concat(features: Sequence[Tensor], mask: Tensor) -> Tensor:
    """``[m_1 H_1 || ... || m_M H_M] * M / n_present`` along channels: (B, M*C, *S).

    Missing modalities are replaced by zeros and the rest scaled by ``M / n_present`` so that a linear map W
    applied to it keeps the scale it has with every modality present (a dropout-style renormalisation): with all
    modalities present it is the plain concatenation of the multimodal-fusion formula ``W [H_1 || ... || H_M]``.
    """
    m = len(features)
    extra = [1] * (features[0].dim() - 1)
    scale = (m / present_count(mask)).reshape(-1, *extra).to(features[0].dtype)
    parts = [f * mask[:, i].reshape(-1, *extra).to(f.dtype) for i, f in enumerate(features)]
    return torch.cat(parts, dim=1) * scale
