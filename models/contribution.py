"""Modality contribution: how much a trained network relies on each modality (occlusion by masking).

For every modality ``m`` and sample where ``m`` is present, the network is run again with ``m`` masked (mask 0; the
network zeroes its channel) and the drop is measured against the full-input run:

- ``class_drop``: drop in the probability of the reference class (the true ``label`` if given, else the class
  predicted with every available modality): ``p_full[c] - p_without_m[c]``.
- ``dice_drop``: drop in whole-lesion Dice (foreground = any label > 0): against ``seg`` if given,
  ``Dice(pred_full, seg) - Dice(pred_without_m, seg)``; without ``seg``, the disagreement it causes,
  ``1 - Dice(pred_without_m, pred_full)``.
- ``attention_share`` (``attention`` family): mean attention that the present modalities' queries pay to ``m``
  in the full-input run (shares over present modalities sum to 1).
- ``fusion_weight`` (``output`` family): ``m``'s late-fusion weight in the full-input run.

A modality that is the only one present in a sample cannot be masked (the network needs one modality): for that
sample "without m" is the uninformed prediction -- uniform class probabilities ``1 / num_classes`` and an all
background segmentation. Where ``m`` is missing, every per-sample contribution is exactly 0.

:func:`mean_contribution` averages :func:`modality_contribution` over a whole loader (a held-out set).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .metrics import label_map
from .training import unpack_batch


def _whole_dice(pred: Tensor, ref: Tensor) -> Tensor:
    """Per-sample Dice of foreground (label > 0) between integer maps (B, *S); 1 where both are empty."""
    p = (pred > 0).flatten(1).float()
    r = (ref > 0).flatten(1).float()
    inter = (p * r).sum(dim=1)
    denom = p.sum(dim=1) + r.sum(dim=1)
    return torch.where(denom > 0, 2 * inter / denom.clamp_min(1e-8), torch.ones_like(denom))


def _config(model: nn.Module) -> ModelConfig:
    inner = getattr(model, "_module", model)  # Opacus GradSampleModule wraps the network
    cfg = getattr(inner, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"modality_contribution needs a FusionNet (models.network.build_model), got {type(model)}")
    return cfg


@torch.no_grad()
def contribution_per_sample(
    model: nn.Module,
    image: Tensor,
    mask: Tensor,
    seg: Tensor | None = None,
    label: Tensor | None = None,
) -> dict[str, dict[str, Tensor]]:
    """Per-sample contributions for every modality of the model.

    Args:
        model: a FusionNet (or an Opacus-wrapped one); run in eval mode here and restored afterwards.
        image: (B, M, *S) float; mask: (B, M) float 0/1; seg: optional (B, *S) int labels; label: optional (B,) int.

    Returns:
        ``{modality: {metric: (B,) float tensor}}`` for all model modalities; metrics as in the module docstring.
        Entries of samples where the modality is missing are exactly 0.
    """
    cfg = _config(model)
    inner = getattr(model, "_module", model)
    was_training = model.training
    model.eval()
    try:
        mask = mask.to(image.dtype)
        # encoders once; every "without m" run only re-fuses (decode(features, subset) == forward(image, subset))
        features = inner.encode(image, mask)
        seg_full, cls_full = inner.decode(features, mask)
        prob_full = cls_full.softmax(dim=1)
        ref_class = label.long() if label is not None else prob_full.argmax(dim=1)
        pick = ref_class[:, None]
        p_full = prob_full.gather(1, pick)[:, 0]
        pred_full = label_map(seg_full)
        dice_full = _whole_dice(pred_full, seg) if seg is not None else torch.ones_like(p_full)
        attn = inner.attention_weights() if hasattr(inner, "attention_weights") else None
        gates = inner.fusion_weights() if hasattr(inner, "fusion_weights") else None
        present = mask > 0
        out: dict[str, dict[str, Tensor]] = {}
        for i, m in enumerate(cfg.modalities):
            has = present[:, i]
            drop_mask = mask.clone()
            drop_mask[:, i] = 0
            runnable = drop_mask.sum(dim=1) > 0
            p_wo = torch.full_like(p_full, 1.0 / cfg.num_classes)
            pred_wo = torch.zeros_like(pred_full)
            if bool((has & runnable).any()):
                # Samples that keep some modality run without m; the others take the uninformed prediction.
                safe = torch.where(runnable[:, None], drop_mask, mask)
                seg_wo, cls_wo = inner.decode(features, safe)
                p_wo = torch.where(runnable, cls_wo.softmax(dim=1).gather(1, pick)[:, 0], p_wo)
                pred_wo = torch.where(runnable.reshape(-1, *[1] * (pred_full.dim() - 1)), label_map(seg_wo), pred_wo)
            if seg is not None:
                dice_drop = dice_full - _whole_dice(pred_wo, seg)
            else:
                dice_drop = 1.0 - _whole_dice(pred_wo, pred_full)
            zero = torch.zeros_like(p_full)
            metrics = {
                "class_drop": torch.where(has, p_full - p_wo, zero),
                "dice_drop": torch.where(has, dice_drop, zero),
            }
            if attn is not None:
                # attention paid to key m, averaged over the present queries (rows of missing queries are 0)
                share = attn[:, :, i].sum(dim=1) / present.sum(dim=1).clamp_min(1)
                metrics["attention_share"] = torch.where(has, share, zero)
            if gates is not None:
                metrics["fusion_weight"] = torch.where(has, gates[:, i], zero)
            out[m] = metrics
        return out
    finally:
        model.train(was_training)


def modality_contribution(
    model: nn.Module,
    image: Tensor,
    mask: Tensor,
    seg: Tensor | None = None,
    label: Tensor | None = None,
) -> dict[str, dict[str, float]]:
    """Contribution of each modality present in the batch, averaged over the samples where it is present.

    Args and metrics as :func:`contribution_per_sample`.

    Returns:
        ``{modality: {"class_drop": float, "dice_drop": float[, "attention_share" | "fusion_weight": float],
        "cases": float}}`` keyed by the modalities present in at least one sample (config order); ``cases`` is the
        number of samples the means are over.
    """
    per = contribution_per_sample(model, image, mask, seg=seg, label=label)
    cfg = _config(model)
    present = mask > 0
    result: dict[str, dict[str, float]] = {}
    for i, m in enumerate(cfg.modalities):
        n = int(present[:, i].sum())
        if n == 0:
            continue
        result[m] = {k: float(v[present[:, i]].mean()) for k, v in per[m].items()}
        result[m]["cases"] = float(n)
    return result


def mean_contribution(
    model: nn.Module, loader: Iterable[Any], device: torch.device | str
) -> dict[str, dict[str, float]]:
    """:func:`modality_contribution` over every batch of ``loader``: each measure's mean over all the cases where
    the modality is present (batch means weighted by their ``cases``).

    Args:
        model: a FusionNet already on ``device``.
        loader: batches with image, mask, seg and label (:func:`models.training.unpack_batch`); ``seg`` and
            ``label`` are the references of ``dice_drop`` and ``class_drop``.
        device: where the batches are moved to.

    Returns:
        ``{modality: {measure: mean}}`` in config order, for the modalities present in at least one case; a
        non-finite batch value is left out of its measure's sum (the mean stays over all the modality's cases).
    """
    cfg = _config(model)
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    cases: dict[str, float] = defaultdict(float)
    for batch in loader:
        image, mask, seg, label = unpack_batch(batch)
        raw = modality_contribution(model, image.to(device), mask.to(device), seg.to(device),
                                    label.reshape(-1).to(device))
        for m, per in raw.items():
            n = float(per.get("cases", 0.0))
            cases[m] += n
            for k, v in per.items():
                if k != "cases" and v is not None and math.isfinite(v):
                    sums[m][k] += v * n  # a batch mean over its present cases, weighted back to a sum
    return {m: {k: v / cases[m] for k, v in sums[m].items()} for m in cfg.modalities if cases.get(m)}
