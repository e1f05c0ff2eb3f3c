"""Modality contribution: masked modalities contribute exactly 0; keys are the present modalities."""

from __future__ import annotations

import pytest
import torch

from models.contribution import contribution_per_sample, modality_contribution
from models.network import build_model
from common.runconfig import default_model_config
from models.fusion import FUSIONS

FAMILIES = tuple(FUSIONS)

torch.set_num_threads(1)

MODS = ("t1", "t2", "ct")


def setup(family: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = default_model_config(family=family, modalities=MODS, spatial_dims=2, spatial_size=(16, 16), channels=(4, 8))
    torch.manual_seed(0)
    model = build_model(cfg)
    image = torch.randn(3, 3, 16, 16)
    # t2 missing everywhere; t1 missing in sample 2 (where ct is alone)
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    image = image * mask[:, :, None, None]
    seg = torch.randint(0, 4, (3, 16, 16), generator=torch.Generator().manual_seed(1))
    return model, image, mask, seg


@pytest.mark.parametrize("family", FAMILIES)
def test_missing_modality_contributes_exactly_zero(family: str) -> None:
    model, image, mask, seg = setup(family)
    model.train()
    per = contribution_per_sample(model, image, mask, seg=seg)
    assert model.training  # mode restored
    assert set(per) == set(MODS)
    for metric, values in per["t2"].items():
        assert torch.equal(values, torch.zeros(3)), metric
    for metric, values in per["t1"].items():
        assert values[2] == 0.0, metric  # t1 missing in sample 2
    # a modality that matters somewhere has some non-zero effect (the zeros above are not vacuous)
    assert any(bool((v[:2] != 0).any()) for v in per["ct"].values())
    expected = {"class_drop", "dice_drop"} | (
        {"attention_share"} if family == "attention" else {"fusion_weight"} if family == "output" else set()
    )
    assert set(per["ct"]) == expected


@pytest.mark.parametrize("family", ["attention", "output", "single"])
def test_aggregate_keys_are_present_modalities(family: str) -> None:
    model, image, mask, seg = setup(family)
    result = modality_contribution(model, image, mask, seg=seg)
    assert list(result) == ["t1", "ct"]
    assert result["t1"]["cases"] == 2.0 and result["ct"]["cases"] == 3.0
    per = contribution_per_sample(model, image, mask, seg=seg)
    assert result["t1"]["class_drop"] == pytest.approx(float(per["t1"]["class_drop"][:2].mean()))
    # ct is alone in sample 2: without it the prediction is uninformed (uniform probabilities)
    probs = model.eval()(image[2:], mask[2:])[1].softmax(dim=1)
    ref = probs.max().item()
    assert float(per["ct"]["class_drop"][2]) == pytest.approx(ref - 0.5, abs=1e-5)
    if family == "attention":
        # shares over the present modalities of a sample sum to 1
        total = per["t1"]["attention_share"] + per["ct"]["attention_share"]
        assert torch.allclose(total, torch.ones(3), atol=1e-5)
    if family == "output":
        total = per["t1"]["fusion_weight"] + per["ct"]["fusion_weight"]
        assert torch.allclose(total, torch.ones(3), atol=1e-6)


def test_without_seg_and_with_labels() -> None:
    model, image, mask, _ = setup("hierarchical")
    label = torch.tensor([0, 1, 1])
    result = modality_contribution(model, image, mask, label=label)
    assert set(result) == {"t1", "ct"}
    for metrics in result.values():
        assert 0.0 <= metrics["dice_drop"] <= 1.0  # disagreement with the full prediction
        assert -1.0 <= metrics["class_drop"] <= 1.0
