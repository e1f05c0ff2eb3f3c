"""The case-level classifier: features pooled inside the predicted lesion, per modality, into a small MLP.

The class cues of a lesion are thin and modality-specific (an enhancing rim on T1ce, calcified foci on CT, necrotic
texture on T2/US, the oedema's extent on FLAIR), so the head reads them where they are and from whom they come:

1. **Region weights** from the segmentation: the softmax probabilities of background, oedema, core, enhancing and
   their lesion union (B, R=5, *S), detached (the classification loss does not bend the segmentation), average-
   pooled to each feature level's resolution.
2. **Per modality** ``i`` (kept apart, ``modalities.<m>``, owned by ``m``), two branches summed then ReLU:

   * ``stats``: its normalised image's weighted mean and log standard deviation inside each region (2R numbers,
     z-units of the case's own head: already on one scale across cases) -> ``Linear``;
   * ``levels``: the weighted mean of each of its feature maps inside each region at every level it has
     (R * sum_l C_l numbers) -> ``LayerNorm`` -> ``Linear``.

   The result is multiplied by the modality's availability: a missing modality contributes exact zeros, whatever
   its pixels or features.
3. **Shared** (``shared``, owner None): the lesion's log volume fraction and the log share of each sub-region in it
   (the oedema's extent relative to the lesion is a cue no single intensity shows) -> ``Linear``, plus, when the
   family has fused features, their region means at every level -> ``LayerNorm`` -> ``Linear``.
4. **MLP** ``mlp``: [m_1 e_1 || ... || m_M e_M || e_shared || mask] -> hidden -> ReLU -> dropout -> class logits. The
   mask itself is an input so the head knows which modalities it is missing (modality dropout trains that).

Why the split: the head learns by Adam from per-case features whose case-to-case spread is small next to their
offsets (log volumes ~7 +- 0.2, feature means ~1 +- 0.1), which makes its first layer learn slowly, and no batch
statistic may standardise them (DP-SGD needs cases independent). The image statistics and volume ratios are put on
a common scale by construction (z-units, logs of ratios); the many feature-map means go through a LayerNorm.
Measured on captured features of a trained model (bench notes in docs/benchmarks.md): held-out AUROC 0.84 with one
LayerNorm over everything, 0.85-0.87 with this split.

Every parametrised layer is ``nn.Linear`` or ``nn.LayerNorm`` (Opacus's per-sample gradients), pooling has no
parameters, and each case is pooled over its own voxels only, so cases stay independent.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Region weight maps, in order: the four label probabilities and the lesion (1 - background).
REGION_MAPS: tuple[str, ...] = ("background", "oedema", "core", "enhancing", "lesion")
#: Voxel mass added to every region's weight sum: an (almost) empty region pools to ~0, not to noise.
_EMPTY_MASS = 1e-2


def region_weights(seg_logits: Tensor) -> Tensor:
    """(B, K, *S) segmentation logits -> (B, R, *S) detached region weights in :data:`REGION_MAPS` order."""
    probs = torch.softmax(seg_logits.detach().float(), dim=1)
    if probs.shape[1] != 4:
        raise ValueError(f"the lesion classifier expects 4 segmentation classes, got {probs.shape[1]}")
    return torch.cat([probs, 1.0 - probs[:, :1]], dim=1)


def _weights_at(weights: Tensor, spatial: Sequence[int]) -> Tensor:
    """Region weights average-pooled to the spatial size ``spatial`` (an integer divisor of theirs)."""
    if tuple(weights.shape[2:]) == tuple(spatial):
        return weights
    factor = weights.shape[2] // spatial[0]
    pool = F.avg_pool3d if weights.dim() == 5 else F.avg_pool2d
    return pool(weights, factor)


def pool_regions(features: Tensor, weights: Tensor, *, std: bool = False) -> Tensor:
    """Weighted means (and log standard deviations) of ``features`` (B, C, *S') inside each region.

    Args:
        features: (B, C, *S') feature maps.
        weights: (B, R, *S) region weights at full resolution; pooled to ``S'`` here.
        std: also return each region's weighted log standard deviation.

    Returns:
        (B, R * C) means (R-major), or (B, 2 * R * C) means then log standard deviations with ``std``.
    """
    w = _weights_at(weights, features.shape[2:]).flatten(2)  # (B, R, P)
    f = features.flatten(2)  # (B, C, P)
    mass = w.sum(dim=2, keepdim=True) + _EMPTY_MASS  # (B, R, 1)
    mean = torch.einsum("brp,bcp->brc", w, f) / mass
    if not std:
        return mean.flatten(1)
    second = torch.einsum("brp,bcp->brc", w, f * f) / mass
    log_spread = 0.5 * torch.log((second - mean * mean).clamp_min(0.0) + 1e-4)
    return torch.cat([mean.flatten(1), log_spread.flatten(1)], dim=1)


def volume_shares(weights: Tensor) -> Tensor:
    """(B, R, *S) region weights -> (B, 4): log of the lesion's share of the volume and log of each sub-region's
    (oedema, core, enhancing) share of the lesion (soft voxel counts, +1 voxel so empty regions stay finite)."""
    counts = weights.flatten(2).sum(dim=2)  # (B, R) in REGION_MAPS order
    lesion = counts[:, 4:5] + 1.0
    total = counts[:, :1] + counts[:, 4:5]
    return torch.cat([torch.log(lesion / total), torch.log((counts[:, 1:4] + 1.0) / lesion)], dim=1)


class ModalityEmbedding(nn.Module):
    """One modality's embedding: ``stats`` (image statistics, Linear) + ``levels`` (feature-map means, LayerNorm +
    Linear), summed; ``levels`` is absent when the modality has no feature levels."""

    def __init__(self, stats: int, levels: int, embed: int) -> None:
        super().__init__()
        self.stats = nn.Linear(stats, embed)
        self.levels = nn.Sequential(nn.LayerNorm(levels), nn.Linear(levels, embed)) if levels else None

    def forward(self, stats: Tensor, levels: Tensor | None) -> Tensor:
        out = self.stats(stats)
        if self.levels is not None and levels is not None:
            out = out + self.levels(levels)
        return out


class LesionClassifier(nn.Module):
    """Case-level head (see the module docstring).

    Args:
        modalities: modality names, in the order of the ``image`` channels and ``levels`` given to ``forward``.
        modality_channels: widths of the per-modality feature levels (e.g. an encoder's ``channels``; may be empty).
        shared_channels: widths of the shared (fused) feature levels (may be empty).
        num_classes: class logits.
        dropout: dropout before the last layer.
        embed: width of each modality's (and the shared) embedding.
        hidden: width of the MLP's hidden layer.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        modality_channels: Sequence[int],
        shared_channels: Sequence[int],
        num_classes: int,
        dropout: float,
        *,
        embed: int = 8,
        hidden: int = 32,
    ) -> None:
        super().__init__()
        r = len(REGION_MAPS)
        self.names = tuple(modalities)
        self.modalities = nn.ModuleDict(
            {m: ModalityEmbedding(2 * r, r * sum(modality_channels), embed) for m in self.names}
        )
        self.shared = ModalityEmbedding(4, r * sum(shared_channels), embed)
        self.mlp = nn.Sequential(
            nn.Linear(len(self.names) * embed + embed + len(self.names), hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(
        self,
        seg_logits: Tensor,
        image: Tensor,
        levels: Sequence[Sequence[Tensor]],
        shared: Sequence[Tensor],
        mask: Tensor,
    ) -> Tensor:
        """Class logits (B, num_classes).

        Args:
            seg_logits: (B, 4, *S) segmentation logits of the same forward (detached here).
            image: (B, M, *S) the normalised input, missing channels zero.
            levels: per modality (M entries) its feature maps ``[(B, C_l, *S_l), ...]`` (``modality_channels``).
            shared: fused feature maps ``[(B, C_l, *S_l), ...]`` (``shared_channels``).
            mask: (B, M) float availability.
        """
        if image.shape[1] != len(self.names) or len(levels) != len(self.names):
            raise ValueError(
                f"the classifier has {len(self.names)} modalities ({', '.join(self.names)}), got {image.shape[1]} "
                f"image channels and {len(levels)} feature pyramids"
            )
        weights = region_weights(seg_logits)
        embedded = []
        for i, name in enumerate(self.names):
            stats = pool_regions(image[:, i : i + 1], weights, std=True)
            feats = torch.cat([pool_regions(f, weights) for f in levels[i]], dim=1) if len(levels[i]) else None
            e = torch.relu(self.modalities[name](stats, feats))
            embedded.append(torch.where(mask[:, i : i + 1] > 0, e, torch.zeros((), dtype=e.dtype, device=e.device)))
        fused = torch.cat([pool_regions(f, weights) for f in shared], dim=1) if len(shared) else None
        s = torch.relu(self.shared(volume_shares(weights), fused))
        return self.mlp(torch.cat([*embedded, s, mask.to(s.dtype)], dim=1))
