"""The lesion classifier head (models/classifier.py): region pooling, masked modalities, ownership."""

from __future__ import annotations

import math

import pytest
import torch

from models.classifier import REGION_MAPS, LesionClassifier, pool_regions, region_weights
from models.modalities import owner_modality

torch.set_num_threads(1)

MODS = ("t1ce", "flair", "ct")
SIZE = (4, 8, 8)
CHANNELS = (4, 8)


def _inputs(b: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[list[torch.Tensor]], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    seg_logits = torch.randn(b, 4, *SIZE, generator=g)
    image = torch.randn(b, len(MODS), *SIZE, generator=g)
    levels = [[torch.randn(b, c, *(s // 2**l for s in SIZE), generator=g) for l, c in enumerate(CHANNELS)]
              for _ in MODS]
    shared = [torch.randn(b, c, *(s // 2**l for s in SIZE), generator=g) for l, c in enumerate(CHANNELS)]
    return seg_logits, image, levels, shared


def test_pool_regions_is_the_weighted_mean_and_std_inside_each_region() -> None:
    features = torch.arange(2 * 1 * 2 * 2, dtype=torch.float32).reshape(2, 1, 1, 2, 2)
    weights = torch.zeros(2, 2, 1, 2, 2)
    weights[:, 0, 0, 0, :] = 1.0  # region 0: the first row
    weights[:, 1] = 1.0  # region 1: everything
    out = pool_regions(features, weights, std=True)
    assert out.shape == (2, 4)
    first_row = features[:, 0, 0, 0, :]
    mass = torch.tensor([2.0, 4.0]) + 1e-2
    assert torch.allclose(out[:, 0], first_row.sum(1) / mass[0])
    assert torch.allclose(out[:, 1], features.flatten(1).sum(1) / mass[1])
    assert float(out[0, 3]) == pytest.approx(0.5 * math.log(float(features[0].flatten().var(unbiased=False)) + 1e-4), rel=1e-2)
    # weights at full resolution are pooled to a coarser feature map
    coarse = pool_regions(torch.ones(2, 3, 1, 1, 1), weights)
    assert coarse.shape == (2, 6)


def test_region_weights_are_detached_probabilities_and_their_lesion_union() -> None:
    logits = torch.randn(2, 4, *SIZE, requires_grad=True)
    w = region_weights(logits)
    assert w.shape == (2, len(REGION_MAPS), *SIZE) and not w.requires_grad
    assert torch.allclose(w[:, 1:4].sum(1), w[:, 4], atol=1e-6)
    with pytest.raises(ValueError, match="4 segmentation classes"):
        region_weights(torch.randn(2, 3, *SIZE))


def test_a_masked_modality_is_ignored_whatever_its_pixels_and_features() -> None:
    torch.manual_seed(0)
    head = LesionClassifier(MODS, CHANNELS, CHANNELS, num_classes=2, dropout=0.0).eval()
    seg_logits, image, levels, shared = _inputs()
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    reference = head(seg_logits, image, levels, shared, mask)
    # scramble every masked modality's image channel and feature maps
    image2 = image.clone()
    levels2 = [[f.clone() for f in fl] for fl in levels]
    for b, i in (mask == 0).nonzero().tolist():
        image2[b, i] = 1e3 * torch.randn(SIZE)
        for f in levels2[i]:
            f[b] = torch.randn_like(f[b]) * 1e3
    assert torch.equal(head(seg_logits, image2, levels2, shared, mask), reference)
    # a present modality does matter
    image2[0, 0] += 5.0
    assert not torch.allclose(head(seg_logits, image2, levels2, shared, mask)[0], reference[0])


def test_each_modality_owns_its_embedding() -> None:
    head = LesionClassifier(MODS, CHANNELS, (), num_classes=2, dropout=0.1)
    owners = {owner_modality(f"classifier.{n}") for n, _ in head.named_parameters()}
    assert owners == {*MODS, None}
    with pytest.raises(ValueError, match="3 modalities"):
        seg_logits, image, levels, _ = _inputs()
        head(seg_logits, image[:, :2], levels[:2], [], torch.ones(3, 2))
