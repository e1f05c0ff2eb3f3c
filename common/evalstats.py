"""Federated evaluation as sufficient statistics: what a site releases and how the server turns sums into metrics.

A deployment has no central labelled test set, so global metrics come from the sites. A site never sends its own
metrics (exact numbers over few patients are what an adaptive server reads single patients from); it sends the
*sums* below over its held-out patients, with Gaussian noise (:mod:`client.privacy.release`). Sums of all sites add
up, and the server computes global metrics from the summed statistics (:func:`metrics_from_sums`): post-processing
of DP releases, so they cost nothing more.

One patient's contribution, :data:`STATISTIC_KEYS` in order. Mixed supervision: a held-out study may carry a
segmentation, a label or both; the Dice sums run over the patient's studies *with a segmentation* (their mean) and
the histograms over its studies *with a label* (their mean), so a patient with several studies counts once in each:

==============================  ===============================================================  ==================
key                             contribution of one patient                                      L2 norm at most
==============================  ===============================================================  ==================
``stat-count``                  1                                                                1
``stat-count-seg``              1 if one of its studies has a segmentation, else 0               1
``stat-dice-<region>``          the case's Dice of the region (:mod:`models.metrics`), in [0, 1]  sqrt(4) over the
                                                                                                 4 regions
``stat-hist-<class>-<b>``       1 in the bin ``b = floor(p * 10)`` of the malignant probability   1 (one bin of one
                                ``p`` of the case's true class (``benign`` / ``malignant``)      class)
==============================  ===============================================================  ==================

so adding or removing one patient changes the vector by at most :data:`SENSITIVITY` = sqrt(7) in L2 norm. The
labelled patients need no count of their own: they are the histograms' total mass. Why
per-case Dice sums and not voxel TP/FP/FN counts: a voxel count's sensitivity is the whole volume (a crafted model
can predict every voxel as lesion), so noise calibrated to it (thousands of voxels) would bury the lesion voxels of
any realistic number of patients, while a per-case Dice is bounded by 1 whatever the model does. The global Dice is
therefore the mean over patients of their Dice (as the held-out evaluation's ``dice-<region>``), not a pooled voxel
Dice.

Classification from the histograms at the threshold 0.5 (a bin edge: predicted malignant iff ``p >= 0.5``):
accuracy, recall (sensitivity), specificity, f1; AUROC and the ROC points (sensitivity and specificity at each bin
edge) from the binned scores, ties within a bin counted one half (the binned AUROC differs from the exact one by
at most the share of malignant-benign pairs that fall in one bin).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from models.config import CLASS_NAMES
from models.metrics import REGIONS

__all__ = ["HIST_BINS", "SENSITIVITY", "STATISTIC_KEYS", "THRESHOLD", "metrics_from_sums", "read_statistics",
           "roc_from_sums", "site_sums", "sum_statistics"]

#: Bins of the malignant-probability histograms (edges at multiples of 1 / HIST_BINS).
HIST_BINS = 10
#: Classification threshold (a bin edge).
THRESHOLD = 0.5
_PREFIX = "stat-"
_REGION_KEYS = tuple(f"{_PREFIX}dice-{r}" for r in REGIONS)
_HIST_KEYS = tuple(f"{_PREFIX}hist-{c}-{b}" for c in CLASS_NAMES for b in range(HIST_BINS))
#: Every statistic a site releases, in vector order.
STATISTIC_KEYS: tuple[str, ...] = (f"{_PREFIX}count", f"{_PREFIX}count-seg", *_REGION_KEYS, *_HIST_KEYS)
#: L2 sensitivity of the statistic vector to adding or removing one patient (see the module docstring).
SENSITIVITY = math.sqrt(1 + 1 + len(REGIONS) + 1)
_DICE0 = 2  # vector position of the first Dice sum
_HIST0 = _DICE0 + len(REGIONS)  # of the first histogram bin


def _bin(prob: float) -> int:
    return min(HIST_BINS - 1, max(0, int(math.floor(prob * HIST_BINS))))


def site_sums(
    dice: np.ndarray, probs: np.ndarray, labels: np.ndarray, groups: Sequence[Sequence[int]],
    has_seg: np.ndarray | None = None, has_label: np.ndarray | None = None,
) -> np.ndarray:
    """The exact (not yet noised) statistic vector of a site.

    Args:
        dice: ``(N, R)`` per-case Dice per region of :data:`models.metrics.REGIONS`, in [0, 1] (read only where
            ``has_seg``).
        probs: ``(N,)`` malignant probability per case, in [0, 1].
        labels: ``(N,)`` true class per case (index into :data:`models.config.CLASS_NAMES`; read only where
            ``has_label``).
        groups: case positions of each patient (disjoint, covering ``0..N-1``).
        has_seg, has_label: ``(N,)`` bool, which cases carry a segmentation / a label (default: all).

    Returns:
        ``(len(STATISTIC_KEYS),)`` float64: the sum over patients of each patient's mean contributions.
    """
    n = len(np.asarray(probs).reshape(-1))
    dice = np.clip(np.asarray(dice, dtype=np.float64).reshape(n, len(REGIONS)), 0.0, 1.0)
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(int)
    seg_on = np.ones(n, dtype=bool) if has_seg is None else np.asarray(has_seg, dtype=bool).reshape(n)
    label_on = np.ones(n, dtype=bool) if has_label is None else np.asarray(has_label, dtype=bool).reshape(n)
    out = np.zeros(len(STATISTIC_KEYS), dtype=np.float64)
    for group in groups:
        out[0] += 1.0
        segmented = [i for i in group if seg_on[i]]
        labelled = [i for i in group if label_on[i]]
        # a patient with k such studies contributes their mean: once, whatever k
        if segmented:
            out[1] += 1.0
            for i in segmented:
                out[_DICE0:_HIST0] += dice[i] / len(segmented)
        for i in labelled:
            if not (0 <= labels[i] < len(CLASS_NAMES)) or not math.isfinite(probs[i]):
                raise ValueError(f"case {i}: label {labels[i]} / probability {probs[i]} cannot be binned")
            out[_HIST0 + labels[i] * HIST_BINS + _bin(float(probs[i]))] += 1.0 / len(labelled)
    return out


def read_statistics(metrics: Mapping[str, object]) -> np.ndarray | None:
    """The statistic vector of a reply's metrics, or ``None`` when a key is missing or not a finite number."""
    values = []
    for key in STATISTIC_KEYS:
        v = metrics.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            return None
        values.append(float(v))
    return np.asarray(values, dtype=np.float64)


def sum_statistics(vectors: Iterable[np.ndarray]) -> np.ndarray:
    """Element-wise sum of statistic vectors (zeros for none)."""
    total = np.zeros(len(STATISTIC_KEYS), dtype=np.float64)
    for v in vectors:
        total += np.asarray(v, dtype=np.float64)
    return total


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else math.nan


def _histograms(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(benign, malignant) histograms, negative noisy bins clamped to 0 (post-processing)."""
    hist = np.maximum(np.asarray(sums, dtype=np.float64)[_HIST0:], 0.0).reshape(len(CLASS_NAMES), HIST_BINS)
    return hist[0], hist[1]


def roc_from_sums(sums: np.ndarray) -> list[tuple[float, float, float]]:
    """``(threshold, sensitivity, specificity)`` at every bin edge ``b / HIST_BINS`` (predicted malignant iff
    ``p >= threshold``), from threshold 0 (everything malignant) to 1 (only the top bin's right edge: nothing)."""
    benign, malignant = _histograms(sums)
    pos, neg = float(malignant.sum()), float(benign.sum())
    points = []
    for b in range(HIST_BINS + 1):
        points.append((b / HIST_BINS, _ratio(float(malignant[b:].sum()), pos), _ratio(float(benign[:b].sum()), neg)))
    return points


def metrics_from_sums(sums: np.ndarray) -> dict[str, float]:
    """Global metrics from (summed, noisy) statistics: ``cases`` (patients), ``cases-seg`` (patients the Dice is
    over), ``cases-label`` (patients the classification metrics are over), ``dice-<region>``, ``accuracy``,
    ``recall``, ``specificity``, ``f1``, ``auroc`` (NaN where a denominator is not positive, e.g. no labelled patient),
    plus the ROC points as ``sensitivity@<t>`` / ``specificity@<t>``."""
    sums = np.asarray(sums, dtype=np.float64)
    if sums.shape != (len(STATISTIC_KEYS),):
        raise ValueError(f"expected {len(STATISTIC_KEYS)} statistics, got shape {tuple(sums.shape)}")
    count = max(float(sums[0]), 0.0)
    count_seg = max(float(sums[1]), 0.0)
    benign, malignant = _histograms(sums)
    out: dict[str, float] = {"cases": count, "cases-seg": count_seg,
                             "cases-label": float(benign.sum() + malignant.sum())}
    for k, r in enumerate(REGIONS):
        d = _ratio(max(float(sums[_DICE0 + k]), 0.0), count_seg)
        out[f"dice-{r}"] = min(d, 1.0) if math.isfinite(d) else d
    cut = int(round(THRESHOLD * HIST_BINS))
    tp, fn = float(malignant[cut:].sum()), float(malignant[:cut].sum())
    fp, tn = float(benign[cut:].sum()), float(benign[:cut].sum())
    out["accuracy"] = _ratio(tp + tn, tp + tn + fp + fn)
    out["recall"] = _ratio(tp, tp + fn)
    out["specificity"] = _ratio(tn, tn + fp)
    out["f1"] = _ratio(2 * tp, 2 * tp + fp + fn)
    below = np.concatenate([[0.0], np.cumsum(benign)[:-1]])  # benign mass in lower bins
    pairs = float(malignant.sum()) * float(benign.sum())
    out["auroc"] = _ratio(float((malignant * (below + 0.5 * benign)).sum()), pairs)
    for t, sens, spec in roc_from_sums(sums):
        out[f"sensitivity@{t:.1f}"] = sens
        out[f"specificity@{t:.1f}"] = spec
    return out
