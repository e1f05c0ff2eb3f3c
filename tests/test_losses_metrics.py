"""Multi-task loss and metric conventions, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from models.config import SEG_REGIONS
from models.losses import MultiTaskLoss, label_prior
from models.metrics import (
    classification_metrics,
    label_map,
    operating_threshold,
    region_masks,
    roc_points,
    seg_metric_names,
    segmentation_metrics,
)


def _batch(b: int = 2, c: int = 4, s: tuple[int, ...] = (4, 8, 8), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    seg = torch.zeros((b, *s), dtype=torch.long)
    seg[:, 1:3, 2:6, 2:6] = 1
    seg[:, 2, 3:5, 3:5] = 3
    label = torch.tensor([0, 1] * (b // 2) + [1] * (b % 2))
    seg_logits = torch.randn((b, c, *s), generator=g)
    class_logits = torch.randn((b, 2), generator=g)
    return seg_logits, class_logits, seg, label


def test_loss_is_batch_mean_of_per_case_losses() -> None:
    seg_logits, class_logits, seg, label = _batch(b=3)
    loss = MultiTaskLoss(seg_weight=1.0, cls_weight=0.5)
    total, parts = loss(seg_logits, class_logits, seg, label)
    seg_l, cls_l = loss.per_case(seg_logits, class_logits, seg, label)
    assert torch.allclose(total, (seg_l + 0.5 * cls_l).mean(), atol=1e-5)
    assert torch.allclose(parts["seg"], seg_l.mean(), atol=1e-5)
    loss.reduction = "none"
    per_case = loss(seg_logits, class_logits, seg, label)
    assert per_case.shape == (3,)


def test_loss_decreases_on_a_tiny_batch() -> None:
    torch.manual_seed(0)
    seg_logits, class_logits, seg, label = _batch(b=2)
    seg_param = torch.nn.Parameter(torch.zeros_like(seg_logits))
    cls_param = torch.nn.Parameter(torch.zeros_like(class_logits))
    loss = MultiTaskLoss()
    opt = torch.optim.Adam([seg_param, cls_param], lr=0.1)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        total, _ = loss(seg_param, cls_param, seg, label)
        total.backward()
        opt.step()
        losses.append(float(total.detach()))
    assert losses[-1] < 0.5 * losses[0]


def test_loss_rejects_mismatched_shapes() -> None:
    seg_logits, class_logits, seg, label = _batch()
    with pytest.raises(ValueError, match="seg must be"):
        MultiTaskLoss()(seg_logits, class_logits, seg[:, :2], label)
    with pytest.raises(ValueError, match="label must be"):
        MultiTaskLoss()(seg_logits, class_logits, seg, label[:1])


def test_region_masks_follow_seg_regions() -> None:
    labels = torch.tensor([[0, 1, 2, 3]])
    r = region_masks(labels)  # (1, 4 regions, 4)
    assert r[0].tolist() == [[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 1, 1, 1]]

    # the lookup equals one isin per region, labels outside the known ones (negative, too large) in no region
    g = torch.Generator().manual_seed(0)
    noisy = torch.randint(-2, 7, (2, 3, 5, 7), generator=g)
    by_isin = torch.stack([torch.isin(noisy, torch.tensor(v)) for v in SEG_REGIONS.values()], dim=1).float()
    assert torch.equal(region_masks(noisy), by_isin)
    small = noisy.clamp(min=0).to(torch.uint8)  # label maps also come as uint8 (saved predictions)
    assert torch.equal(region_masks(small), region_masks(small.long()))


def test_dice_iou_precision_match_hand_computation() -> None:
    truth = torch.zeros((1, 1, 4, 5), dtype=torch.long)
    pred = torch.zeros_like(truth)
    truth[0, 0, 0, :4] = 1  # 4 oedema voxels
    pred[0, 0, 0, 1:] = 1  # 4 predicted, 3 overlap, 1 false positive
    pred[0, 0, 1, 0] = 1  # one more false positive
    m = segmentation_metrics(pred, truth, hd95=False)
    tp, fp, fn = 3, 2, 1
    assert m["dice-oedema"].item() == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["iou-oedema"].item() == pytest.approx(tp / (tp + fp + fn))
    assert m["precision-oedema"].item() == pytest.approx(tp / (tp + fp))
    assert m["dice-whole"].item() == pytest.approx(m["dice-oedema"].item())
    assert set(m) == set(seg_metric_names(hd95=False))


def test_empty_conventions() -> None:
    shape = (4, 1, 6, 8)
    truth = torch.zeros(shape, dtype=torch.long)
    pred = torch.zeros(shape, dtype=torch.long)
    # case 0: both empty; case 1: truth only; case 2: prediction only; case 3: identical non-empty
    truth[1, 0, 2, 2] = 1
    pred[2, 0, 3, 3] = 1
    truth[3, 0, 1:3, 1:3] = 1
    pred[3, 0, 1:3, 1:3] = 1
    m = segmentation_metrics(pred, truth, hd95=True)
    diagonal = math.sqrt(1 + 36 + 64)
    assert m["dice-oedema"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert m["iou-oedema"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert m["precision-oedema"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert m["hd95-oedema"].tolist() == pytest.approx([0.0, diagonal, diagonal, 0.0])
    assert all(math.isfinite(v) for t in m.values() for v in t.tolist())


def test_hd95_of_shifted_masks() -> None:
    truth = torch.zeros((1, 1, 10, 10), dtype=torch.long)
    pred = torch.zeros_like(truth)
    truth[0, 0, 2:5, 2:5] = 1
    pred[0, 0, 2:5, 4:7] = 1  # same square, shifted two voxels along one axis
    m = segmentation_metrics(pred, truth, hd95=True)
    assert m["hd95-oedema"].item() == pytest.approx(2.0)


def test_classification_metrics_hand_computed() -> None:
    probs = torch.tensor([0.9, 0.6, 0.4, 0.2, 0.7, 0.1])
    labels = torch.tensor([1, 1, 1, 0, 0, 0])
    m = classification_metrics(probs, labels)
    tp, fn, fp, tn = 2, 1, 1, 2
    assert m["accuracy"] == pytest.approx((tp + tn) / 6)
    assert m["recall"] == pytest.approx(tp / (tp + fn))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["balanced-accuracy"] == pytest.approx((tp / (tp + fn) + tn / (tn + fp)) / 2)
    assert m["threshold"] == 0.5 and classification_metrics(probs, labels, threshold=0.65)["threshold"] == 0.65
    # ranking: of the 9 (positive, negative) pairs, the positive scores higher in 7 (not 0.6 or 0.4 vs 0.7)
    assert m["auroc"] == pytest.approx(7 / 9)


def test_classification_undefined_metrics_are_nan() -> None:
    m = classification_metrics(torch.tensor([0.2, 0.3]), torch.tensor([0, 0]))
    assert m["specificity"] == 1.0 and m["accuracy"] == 1.0
    assert math.isnan(m["recall"]) and math.isnan(m["auroc"]) and math.isnan(m["balanced-accuracy"])


def test_a_constant_prediction_has_balanced_accuracy_one_half_whatever_the_balance() -> None:
    labels = torch.tensor([0] * 8 + [1] * 2)
    m = classification_metrics(torch.full((10,), 0.1), labels)
    assert m["accuracy"] == pytest.approx(0.8) and m["balanced-accuracy"] == pytest.approx(0.5)


def test_logit_adjustment_learns_the_balanced_posterior() -> None:
    # 80 % benign cases with the same features: plain cross-entropy learns p(malignant) = 0.2, the logit-adjusted
    # loss learns the balanced posterior 0.5 (the features carry no evidence either way)
    labels = torch.tensor([0] * 8 + [1] * 2)
    prior = label_prior(labels.tolist(), smoothing=0.0)
    assert prior == pytest.approx((0.8, 0.2))
    seg = torch.zeros((10, 2, 4, 4), dtype=torch.long)
    for class_prior, expected in ((None, 0.2), (prior, 0.5)):
        logits = torch.nn.Parameter(torch.zeros(1, 2))
        loss = MultiTaskLoss(seg_weight=0.0, cls_weight=1.0, class_prior=class_prior)
        opt = torch.optim.Adam([logits], lr=0.05)
        for _ in range(400):
            opt.zero_grad()
            total, _ = loss(torch.zeros(10, 4, 2, 4, 4), logits.expand(10, 2), seg, labels)
            total.backward()
            opt.step()
        assert float(logits.softmax(1)[0, 1]) == pytest.approx(expected, abs=0.02)
    assert label_prior([0, 0], smoothing=1.0) == pytest.approx((0.75, 0.25))
    with pytest.raises(ValueError, match="class_prior"):
        MultiTaskLoss(class_prior=(0.5, 0.6))
    with pytest.raises(ValueError, match="outside"):
        label_prior([0, 2])


def test_roc_points_cover_both_ends() -> None:
    probs = [0.9, 0.6, 0.4, 0.2]
    labels = [1, 0, 1, 0]
    pts = roc_points(probs, labels)
    assert pts[0] == (math.inf, 0.0, 1.0)
    assert pts[-1][1:] == (1.0, 0.0)
    assert [p[0] for p in pts[1:]] == sorted(probs, reverse=True)
    sens = [p[1] for p in pts]
    assert sens == sorted(sens)  # sensitivity never falls as the threshold drops


def test_operating_threshold_maximises_balanced_accuracy_on_the_tuning_cases() -> None:
    # a head that ranks perfectly while every probability sits above 0.5 (early in a run, or under DP)
    probs = torch.tensor([0.61, 0.64, 0.66, 0.71, 0.74, 0.80])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    assert classification_metrics(probs, labels)["balanced-accuracy"] == 0.5  # at the default 0.5: constant
    t = operating_threshold(probs, labels)
    assert t == pytest.approx((0.66 + 0.71) / 2)  # halfway between the neighbours, no case sits on it
    assert classification_metrics(probs, labels, t)["balanced-accuracy"] == 1.0
    # ties: of the equally good cut points the one nearest the default wins
    tied = torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=torch.float64)  # cuts 0.2 and 0.75 both reach J = 1.5
    assert operating_threshold(tied, torch.tensor([0, 1, 0, 1])) == pytest.approx(0.75)
    # one class only (or nothing): no operating point can be chosen, the default stays
    assert operating_threshold(torch.tensor([0.2, 0.9]), torch.tensor([1, 1])) == 0.5
    assert operating_threshold(torch.empty(0), torch.empty(0, dtype=torch.long)) == 0.5
    with pytest.raises(ValueError, match="3 probabilities but 2 labels"):
        operating_threshold(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0, 1]))


def test_label_map_equals_argmax_ties_included() -> None:
    """label_map (a running comparison) gives argmax(dim=1) exactly: random logits, ties (the first maximum wins,
    as argmax's), 2D and 3D, one class."""
    g = torch.Generator().manual_seed(0)
    for shape in ((2, 4, 3, 5, 6), (3, 3, 7, 7), (1, 1, 4, 4)):
        logits = torch.randn(shape, generator=g)
        assert torch.equal(label_map(logits), logits.argmax(dim=1))
    tied = torch.randint(0, 3, (2, 4, 5, 5), generator=g).float()  # many exact ties
    assert torch.equal(label_map(tied), tied.argmax(dim=1))
    with pytest.raises(ValueError, match="logits must be"):
        label_map(torch.zeros(4))


def test_dice_and_iou_from_one_confusion_matrix_equal_monai_compute_dice_and_iou() -> None:
    """segmentation_metrics computes Dice and IoU from one confusion matrix; they equal MONAI's compute_dice and
    compute_iou (ignore_empty=False) on random label maps with empty regions in prediction, truth and both."""
    from monai.metrics import compute_dice, compute_iou

    g = torch.Generator().manual_seed(3)
    truth = torch.randint(0, 4, (6, 4, 6, 6), generator=g)
    pred = torch.randint(0, 4, (6, 4, 6, 6), generator=g)
    truth[0] = 0  # empty truth, non-empty prediction
    pred[1] = 0  # empty prediction
    truth[2] = pred[2] = 0  # both empty
    pred[3] = torch.where(pred[3] == 3, 1, pred[3])  # no enhancing predicted
    m = segmentation_metrics(pred, truth, hd95=False)
    p, t = region_masks(pred), region_masks(truth)
    dice = compute_dice(p, t, include_background=True, ignore_empty=False).double()
    iou = compute_iou(p, t, include_background=True, ignore_empty=False).double()
    for i, r in enumerate(SEG_REGIONS):
        torch.testing.assert_close(m[f"dice-{r}"], dice[:, i])
        torch.testing.assert_close(m[f"iou-{r}"], iou[:, i])
