"""The case-level classifier: features pooled inside the predicted lesion, per modality, into a small MLP.

The class cues of a lesion are thin and modality-specific (an enhancing rim on T1ce, calcified foci on CT, necrotic
texture on T2/US, the oedema's extent on FLAIR), so the head reads them where they are and from whom they come:

1. **Region weights** from the segmentation: the softmax probabilities of background, oedema, core, enhancing and
   their lesion union (B, R=5, *S), detached (the classification loss does not bend the segmentation), average-
   pooled to each feature level's resolution.
2. **Per modality** ``i`` (kept apart): the weighted mean and standard deviation of its normalised image inside
   each region (2R numbers), and the weighted mean of each of its feature maps inside each region at every level it
   has (sum_l C_l * R numbers), embedded by its own ``LayerNorm`` + ``Linear`` + ReLU (``modalities.<m>``, owned
   by ``m``) and multiplied by its availability: a missing modality contributes exact zeros, whatever its pixels or
   features. (The LayerNorm puts image statistics, feature means of every level and volumes on one scale per case;
   without it the head learned nothing under modality dropout: its inputs' case-to-case variation is ~10x smaller
   than their offsets.)
3. **Shared**: log region volumes (R numbers: the oedema's extent relative to the lesion is a cue no single
   intensity shows) and, when the family has fused features, their region means at every level, embedded by
   ``shared`` (owner None).
4. **MLP** ``mlp``: [m_1 e_1 || ... || m_M e_M || e_shared || mask] -> hidden -> ReLU -> dropout -> class logits. The
   mask itself is an input so the head knows which modalities it is missing (modality dropout trains that).

Every parametrised layer is ``nn.Linear`` (Opacus's per-sample gradients), pooling has no parameters, and each case
is pooled over its own voxels only, so cases stay independent.
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
    """Weighted means (and standard deviations) of ``features`` (B, C, *S') inside each region.

    Args:
        features: (B, C, *S') feature maps.
        weights: (B, R, *S) region weights at full resolution; pooled to ``S'`` here.
        std: also return each region's weighted standard deviation.

    Returns:
        (B, R * C) means (R-major), or (B, 2 * R * C) means then standard deviations with ``std``.
    """
    w = _weights_at(weights, features.shape[2:]).flatten(2)  # (B, R, P)
    f = features.flatten(2)  # (B, C, P)
    mass = w.sum(dim=2, keepdim=True) + _EMPTY_MASS  # (B, R, 1)
    mean = torch.einsum("brp,bcp->brc", w, f) / mass
    if not std:
        return mean.flatten(1)
    second = torch.einsum("brp,bcp->brc", w, f * f) / mass
    spread = (second - mean * mean).clamp_min(0.0).add(1e-6).sqrt()
    return torch.cat([mean.flatten(1), spread.flatten(1)], dim=1)


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
        per_modality = 2 * r + r * sum(modality_channels)
        shared = r + r * sum(shared_channels)
        self.modalities = nn.ModuleDict(
            {m: nn.Sequential(nn.LayerNorm(per_modality), nn.Linear(per_modality, embed)) for m in self.names}
        )
        self.shared = nn.Sequential(nn.LayerNorm(shared), nn.Linear(shared, embed))
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
            parts = [pool_regions(image[:, i : i + 1], weights, std=True)]
            parts += [pool_regions(f, weights) for f in levels[i]]
            e = torch.relu(self.modalities[name](torch.cat(parts, dim=1)))
            embedded.append(torch.where(mask[:, i : i + 1] > 0, e, torch.zeros((), dtype=e.dtype, device=e.device)))
        volumes = torch.log1p(weights.flatten(2).sum(dim=2))  # (B, R)
        s = torch.relu(self.shared(torch.cat([volumes, *(pool_regions(f, weights) for f in shared)], dim=1)))
        return self.mlp(torch.cat([*embedded, s, mask.to(s.dtype)], dim=1))
