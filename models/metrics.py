"""Segmentation and classification metrics (MONAI's implementations), with fedfusion's naming and conventions.

Segmentation, per region of :data:`models.config.SEG_REGIONS` (``oedema``, ``core``, ``enhancing``, ``whole``), on the
binary region masks of the predicted and true label maps, **per case**, then averaged over cases:

========================  =====================================  ===============================================
metric                    definition                             empty conventions (P = prediction, T = truth)
========================  =====================================  ===============================================
``dice-<region>``         2|P∩T| / (|P|+|T|) (``compute_dice``)  P, T both empty -> 1; exactly one empty -> 0
``iou-<region>``          |P∩T| / |P∪T| (``compute_iou``)        P, T both empty -> 1; exactly one empty -> 0
``precision-<region>``    TP / (TP+FP) (confusion matrix)        both empty -> 1; P empty, T not -> 0 (finding
                                                                 nothing is not "precise"); T empty, P not -> 0
``hd95-<region>``         95th-percentile symmetric Hausdorff    both empty -> 0; exactly one empty -> the image
                          distance (``compute_hausdorff_         diagonal (the worst possible distance)
                          distance``), in **voxels** of the
                          model grid (the data pipeline resamples
                          every case to the model's spatial size)
========================  =====================================  ===============================================

Dice/IoU/precision: higher is better; HD95: lower is better. With these conventions no segmentation metric is NaN,
so means over cases and subsets are always defined.

Classification, from the probability of the malignant class (``CLASS_NAMES[1]``), predicted malignant iff
``p >= threshold`` (0.5): ``accuracy``, ``balanced-accuracy`` (mean of recall and specificity: the accuracy at a
50 % base rate, which a constant prediction cannot lift above 0.5 whatever the test set's balance), ``recall``
(sensitivity), ``specificity``, ``f1``, ``auroc`` (``compute_roc_auc``), and ``threshold`` (the decision threshold
the other numbers were computed at, reported beside them). A metric whose denominator is 0 (e.g. recall with no
malignant case, AUROC with one class only) is **NaN** ("undefined"), never a made-up number;
:class:`models.runlog.MetricsLog` stores it as null.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.metrics import (
    compute_confusion_matrix_metric,
    compute_hausdorff_distance,
    compute_roc_auc,
    get_confusion_matrix,
)
from torch import Tensor

from .config import SEG_REGIONS

#: Region names in metric order.
REGIONS: tuple[str, ...] = tuple(SEG_REGIONS)
#: Segmentation metric kinds; ``hd95`` is lower-is-better.
SEG_METRICS: tuple[str, ...] = ("dice", "iou", "precision", "hd95")
#: Decision threshold on P(malignant) when no calibrated one is known (a checkpoint without ``threshold``).
DEFAULT_THRESHOLD = 0.5
#: Classification metric names.
CLS_METRICS: tuple[str, ...] = ("accuracy", "balanced-accuracy", "recall", "specificity", "f1", "auroc", "threshold")
#: Metrics where smaller is better (everything else: larger is better); ``monotonicity-violations`` is the share of
#: modality-subset pairs where adding a modality lowered Dice (:mod:`models.evaluation`).
LOWER_IS_BETTER: frozenset[str] = frozenset({*(f"hd95-{r}" for r in REGIONS), "monotonicity-violations"})


def seg_metric_names(hd95: bool = True) -> list[str]:
    """``dice-oedema, …, hd95-whole`` (HD95 names only when ``hd95``)."""
    kinds = SEG_METRICS if hd95 else SEG_METRICS[:-1]
    return [f"{k}-{r}" for k in kinds for r in REGIONS]


def lower_is_better(metric: str) -> bool:
    """Whether smaller values of ``metric`` (a bare name like ``hd95-whole``) are better."""
    return metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER


def region_masks(labels: Tensor) -> Tensor:
    """Binary region masks of label maps.

    Args:
        labels: (B, *S) integer label map (see ``SEG_LABELS``).

    Returns:
        (B, R, *S) float32 0/1, R = ``len(REGIONS)`` in :data:`REGIONS` order.
    """
    # one table lookup instead of one isin per region (isin was 6 % of the every-subset held-out evaluation); labels
    # outside the table's range belong to no region, as with isin
    table = _REGION_TABLE.to(labels.device)
    top = table.shape[0] - 1
    # long indices: a uint8 or bool label map would otherwise index as a mask
    index = torch.where((labels >= 0) & (labels < top), labels.long(), top)
    return table[index].movedim(-1, 1)


def _region_table() -> Tensor:
    """(max label + 2, R) float32: row ``v`` holds 1 for each region containing label ``v``; the last row is 0."""
    top = max(v for values in SEG_REGIONS.values() for v in values) + 1
    table = torch.zeros(top + 1, len(SEG_REGIONS))
    for r, values in enumerate(SEG_REGIONS.values()):
        table[list(values), r] = 1.0
    return table


_REGION_TABLE = _region_table()
#: ``warnings.catch_warnings`` swaps the process's filters: two threads inside it at once (the subset evaluation's
#: workers) could leave the "ignore" filter installed for good, so the HD95 call that needs it holds this lock.
_WARNINGS_LOCK = threading.Lock()


def label_map(logits: Tensor) -> Tensor:
    """(B, K, *S) segmentation logits -> (B, *S) int64 labels: ``logits.argmax(dim=1)``, by a running comparison.

    PyTorch's CPU argmax over a non-last axis of a few classes is slow: on (2, 4, 32, 64, 64) logits it took 20-27 ms
    against 2 ms for this (a softmax over the same axis takes 0.4 ms). Equal to ``argmax(dim=1)`` for finite logits,
    ties included (the first maximum wins); where a logit is NaN the label is that of the largest non-NaN logit
    before it, not argmax's NaN position (both are meaningless labels of a broken model).
    """
    if logits.dim() < 2 or logits.shape[1] < 1:
        raise ValueError(f"segmentation logits must be (B, K, *S) with K >= 1, got shape {tuple(logits.shape)}")
    best = logits[:, 0]
    labels = torch.zeros(best.shape, dtype=torch.long, device=logits.device)
    for k in range(1, logits.shape[1]):
        candidate = logits[:, k]
        higher = candidate > best
        labels = torch.where(higher, k, labels)
        best = torch.where(higher, candidate, best)
    return labels


def segmentation_metrics(pred: Tensor, truth: Tensor, *, hd95: bool = True) -> dict[str, Tensor]:
    """Per-case segmentation metrics of predicted vs true label maps.

    Args:
        pred: (B, *S) predicted labels (argmax of the segmentation logits).
        truth: (B, *S) true labels.
        hd95: also compute HD95 (the slow one: distance transforms per case and region).

    Returns:
        ``{"dice-<region>": (B,), "iou-<region>": (B,), "precision-<region>": (B,)[, "hd95-<region>": (B,)]}``
        float64 CPU tensors, with the empty conventions of the module docstring.
    """
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and truth {tuple(truth.shape)} label maps differ in shape")
    p = region_masks(pred.detach().cpu())
    t = region_masks(truth.detach().cpu())
    # One confusion matrix for all three: Dice is the F1 score and IoU the threat score of the same counts (what
    # compute_dice / compute_iou count again, each in its own pass over the masks; tests compare with them). Their
    # only 0/0 is "prediction and truth both empty", which our convention scores 1 (compute_dice's
    # ignore_empty=False); precision's other 0/0, an empty prediction of a non-empty truth, scores 0.
    cm = get_confusion_matrix(p, t, include_background=True)  # (B, R, 4): tp, fp, tn, fn
    both_empty = (cm[..., 0] + cm[..., 1] + cm[..., 3]) == 0
    p_empty = (cm[..., 0] + cm[..., 1]) == 0
    one = torch.ones((), dtype=torch.float64)
    dice = torch.where(both_empty, one, compute_confusion_matrix_metric("f1 score", cm).double())
    iou = torch.where(both_empty, one, compute_confusion_matrix_metric("threat score", cm).double())
    precision = torch.where(p_empty, both_empty.double(), compute_confusion_matrix_metric("precision", cm).double())
    out: dict[str, Tensor] = {}
    for i, r in enumerate(REGIONS):
        out[f"dice-{r}"] = dice[:, i]
        out[f"iou-{r}"] = iou[:, i]
        out[f"precision-{r}"] = precision[:, i]
    if hd95:
        hd = hd95_distance(p, t)
        for i, r in enumerate(REGIONS):
            out[f"hd95-{r}"] = hd[:, i]
    return out


def hd95_distance(p: Tensor, t: Tensor) -> Tensor:
    """95th-percentile Hausdorff distance in voxels of binary masks ``(B, R, *S)``, with the empty conventions.

    Only (case, region) pairs where both masks are non-empty go through MONAI (the rest are fixed by convention),
    so MONAI's NaN/inf warnings for empty masks never fire.
    """
    b, r = p.shape[:2]
    diagonal = math.sqrt(sum(float(s) ** 2 for s in p.shape[2:]))
    p_empty = p.flatten(2).sum(-1) == 0
    t_empty = t.flatten(2).sum(-1) == 0
    out = torch.where(p_empty & t_empty, 0.0, diagonal).double()
    both = ~p_empty & ~t_empty
    if bool(both.any()):
        idx = both.nonzero(as_tuple=True)
        pp = p[idx].unsqueeze(1)  # (K, 1, *S)
        tt = t[idx].unsqueeze(1)
        with _WARNINGS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # MONAI's internal deprecated-argument notice
            hd = compute_hausdorff_distance(pp, tt, include_background=True, percentile=95)
        out[idx] = hd[:, 0].double().cpu()
    return out.reshape(b, r)


def mean_over_cases(per_case: Mapping[str, Tensor]) -> dict[str, float]:
    """Average per-case metric tensors ``(N,)`` into floats (NaN for an empty set of cases)."""
    return {k: float(v.double().mean()) if v.numel() else math.nan for k, v in per_case.items()}


def _confusion(probs: Tensor, labels: Tensor, threshold: float) -> Tensor:
    """Binary confusion counts ``(1, 1, 4)`` [tp, fp, tn, fn] in MONAI's layout."""
    y_pred = (probs >= threshold).float().reshape(-1, 1)
    y = labels.float().reshape(-1, 1)
    tp = (y_pred * y).sum()
    fp = (y_pred * (1 - y)).sum()
    tn = ((1 - y_pred) * (1 - y)).sum()
    fn = ((1 - y_pred) * y).sum()
    return torch.stack([tp, fp, tn, fn]).reshape(1, 1, 4)


def classification_metrics(
    probs: Tensor | Sequence[float], labels: Tensor | Sequence[int], threshold: float = DEFAULT_THRESHOLD
) -> dict[str, float]:
    """Case-level metrics from malignant-class probabilities.

    Args:
        probs: (N,) probability of the malignant class per case, in [0, 1].
        labels: (N,) true labels, 0 benign / 1 malignant.
        threshold: predicted malignant iff ``prob >= threshold``.

    Returns:
        :data:`CLS_METRICS` as floats; NaN where undefined (see module docstring); ``threshold`` is ``threshold``.
    """
    p = torch.as_tensor(probs, dtype=torch.float64).flatten().cpu()
    y = torch.as_tensor(labels).flatten().cpu().long()
    if p.shape != y.shape:
        raise ValueError(f"{p.numel()} probabilities but {y.numel()} labels")
    if p.numel() == 0:
        return {k: math.nan for k in CLS_METRICS} | {"threshold": float(threshold)}
    cm = _confusion(p, y, threshold)
    out: dict[str, float] = {}
    for name, monai_name in (
        ("accuracy", "accuracy"),
        ("recall", "sensitivity"),
        ("specificity", "specificity"),
        ("f1", "f1 score"),
    ):
        out[name] = float(compute_confusion_matrix_metric(monai_name, cm).flatten()[0])
    tp, fp, _, fn = cm.flatten().tolist()
    if 2 * tp + fp + fn == 0:  # MONAI returns NaN here too; keep it explicit
        out["f1"] = math.nan
    out["balanced-accuracy"] = 0.5 * (out["recall"] + out["specificity"])  # NaN with one class only
    if int(y.sum()) in (0, y.numel()):
        out["auroc"] = math.nan  # one class only: AUROC is undefined
    else:
        out["auroc"] = float(compute_roc_auc(p, y))
    out["threshold"] = float(threshold)
    return {k: out[k] for k in CLS_METRICS}


def operating_threshold(probs: Tensor | Sequence[float], labels: Tensor | Sequence[int],
                        default: float = DEFAULT_THRESHOLD) -> float:
    """The decision threshold that maximises balanced accuracy (Youden's J) on a tuning set.

    The classifier's probabilities rank cases long before their level settles (early in a run, or under DP, a
    head can order the cases well, AUROC 0.9, while every probability sits on one side of 0.5), so the operating
    point is chosen on labelled cases the reported numbers do not come from (the server's selection set), as a
    clinical operating point is. Among equally good cut points the one nearest ``default`` wins; a cut point lies
    halfway between two neighbouring distinct probabilities, so a case's probability never sits on it.

    Returns:
        a threshold in [0, 1]; ``default`` when the cases hold one class only (or none).
    """
    p = np.asarray(torch.as_tensor(probs, dtype=torch.float64).flatten().cpu())
    y = np.asarray(torch.as_tensor(labels).flatten().cpu()).astype(int)
    if p.shape != y.shape:
        raise ValueError(f"{p.size} probabilities but {y.size} labels")
    pos, neg = int((y == 1).sum()), int((y == 0).sum())
    if pos == 0 or neg == 0:
        return float(default)
    levels = np.unique(p)  # ascending
    cuts = np.concatenate([[0.0], (levels[:-1] + levels[1:]) / 2.0, [1.0]]) if levels.size > 1 else np.array(
        [levels[0]])
    best, best_j = float(default), -math.inf
    for cut in cuts:
        pred = p >= cut
        j = (pred & (y == 1)).sum() / pos + (~pred & (y == 0)).sum() / neg
        if j > best_j + 1e-12 or (abs(j - best_j) <= 1e-12 and abs(cut - default) < abs(best - default)):
            best, best_j = float(cut), float(j)
    return min(max(best, 0.0), 1.0)


def roc_points(probs: Tensor | Sequence[float], labels: Tensor | Sequence[int]) -> list[tuple[float, float, float]]:
    """ROC curve as ``(threshold, sensitivity, specificity)`` points, one per distinct probability plus the ends.

    Thresholds are ``+inf`` (nothing predicted malignant: sensitivity 0, specificity 1), every distinct probability
    in decreasing order (predicted malignant iff ``p >= threshold``), and ``-inf`` is not needed because the lowest
    probability already predicts every case malignant. Sensitivity (specificity) is NaN without malignant (benign)
    cases.
    """
    p = np.asarray(torch.as_tensor(probs, dtype=torch.float64).flatten().cpu())
    y = np.asarray(torch.as_tensor(labels).flatten().cpu()).astype(int)
    pos, neg = int((y == 1).sum()), int((y == 0).sum())
    points: list[tuple[float, float, float]] = []
    for thr in [math.inf, *sorted(set(p.tolist()), reverse=True)]:
        pred = p >= thr
        sens = float((pred & (y == 1)).sum() / pos) if pos else math.nan
        spec = float((~pred & (y == 0)).sum() / neg) if neg else math.nan
        points.append((float(thr), sens, spec))
    return points
