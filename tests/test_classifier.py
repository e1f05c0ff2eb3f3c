"""The lesion classifier head (models/classifier.py): region pooling, masked modalities, ownership."""

from __future__ import annotations

import math

import pytest
import torch

from models.classifier import (
    REGION_MAPS,
    LesionClassifier,
    channel_statistics,
    pool_regions,
    region_weights,
    volume_shares,
)
from models.modalities import owner_modality

torch.set_num_threads(1)

MODS = ("t1ce", "flair", "ct")
SIZE = (4, 8, 8)


def _inputs(b: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, *SIZE, generator=g), torch.randn(b, len(MODS), *SIZE, generator=g)


def test_pool_regions_is_the_weighted_mean_and_log_std_inside_each_region() -> None:
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
    expected = 0.5 * math.log(float(features[0].flatten().var(unbiased=False)) + 1e-4)
    assert float(out[0, 3]) == pytest.approx(expected, rel=1e-2)
    with pytest.raises(ValueError, match="differ in grid"):
        pool_regions(torch.ones(2, 1, 1, 1, 1), weights)


def test_channel_statistics_equal_pooling_each_channel_alone() -> None:
    """The classifier pools every modality in one pass; row c equals pooling channel c on its own."""
    seg_logits, image = _inputs(b=2, seed=4)
    weights = region_weights(seg_logits)
    stats = channel_statistics(image, weights)
    assert stats.shape == (2, len(MODS), 2 * len(REGION_MAPS))
    for c in range(len(MODS)):
        torch.testing.assert_close(stats[:, c], pool_regions(image[:, c : c + 1], weights, std=True))


def test_region_weights_and_volume_shares() -> None:
    logits = torch.randn(2, 4, *SIZE, requires_grad=True)
    w = region_weights(logits)
    assert w.shape == (2, len(REGION_MAPS), *SIZE) and not w.requires_grad
    assert torch.allclose(w[:, 1:4].sum(1), w[:, 4], atol=1e-6)
    with pytest.raises(ValueError, match="4 segmentation classes"):
        region_weights(torch.randn(2, 3, *SIZE))
    # a hard label map: 8 lesion voxels of 256, half oedema, a quarter core, a quarter rim
    hard = torch.zeros(1, 5, *SIZE)
    hard[0, 0] = 1.0
    lesion = torch.zeros(SIZE, dtype=torch.bool)
    lesion[0, 0, :8] = True
    hard[0, 0, lesion] = 0.0
    hard[0, 1, 0, 0, :4] = hard[0, 2, 0, 0, 4:6] = hard[0, 3, 0, 0, 6:8] = 1.0
    hard[0, 4] = hard[0, 1:4].sum(0)
    shares = volume_shares(hard)[0]
    assert shares.tolist() == pytest.approx([math.log(9 / 256), math.log(5 / 9), math.log(3 / 9), math.log(3 / 9)])


def test_a_masked_modality_is_ignored_whatever_its_pixels() -> None:
    torch.manual_seed(0)
    head = LesionClassifier(MODS, num_classes=2, dropout=0.0).eval()
    seg_logits, image = _inputs()
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    reference = head(seg_logits, image, mask)
    scrambled = image.clone()
    for b, i in (mask == 0).nonzero().tolist():
        scrambled[b, i] = 1e3 * torch.randn(SIZE)
    assert torch.equal(head(seg_logits, scrambled, mask), reference)
    # a present modality does matter
    scrambled[0, 0] += 5.0 * torch.randn(SIZE)
    assert not torch.allclose(head(seg_logits, scrambled, mask)[0], reference[0])


def test_each_modality_owns_its_embedding_and_bad_inputs_are_named() -> None:
    head = LesionClassifier(MODS, num_classes=2, dropout=0.1)
    owners = {owner_modality(f"classifier.{n}") for n, _ in head.named_parameters()}
    assert owners == {*MODS, None}
    seg_logits, image = _inputs()
    with pytest.raises(ValueError, match="3 modalities"):
        head(seg_logits, image[:, :2], torch.ones(3, 2))
