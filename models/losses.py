"""The multi-task training loss: segmentation (MONAI Dice + cross-entropy) plus case classification (cross-entropy).

Reduction and differential privacy
----------------------------------
The loss is a **mean over the batch** of per-case losses (every case has the same number of voxels, so the voxel
mean of the cross-entropy is the mean of per-case means, and MONAI's ``DiceLoss(batch=False)`` averages per-case
Dice losses). That is what Opacus expects with ``loss_reduction="mean"``: it rescales the summed clipped per-case
gradients by the expected batch size, so the per-case gradients it clips are the gradients of each case's own loss.

For Opacus's ghost clipping (which needs per-case losses), set ``loss.reduction = "none"``: the call then returns
the per-case totals ``(B,)`` only (Opacus's ``DPLossFastGradientClipping`` protocol) instead of ``(total, parts)``.

Mixed supervision (``has_seg``, ``has_label``: per-case 0/1 flags of the dataset's items). Case ``i``'s loss is
``seg_weight * has_seg_i * seg_i + cls_weight * has_label_i * cls_i``: a part whose target the case lacks is
*selected out* (``torch.where``, so its placeholder target gets exactly zero gradient and cannot leak a NaN), and the
batch loss is still the mean of these per-case losses over **all** ``B`` cases. Not a mean over the cases that carry
the target: that divisor is a batch statistic, so each case's gradient would depend on the other cases' flags, and
the per-case gradients Opacus clips would no longer be each case's own (DP-SGD's sensitivity analysis assumes they
are). The price is that a part's gradient is scaled by the share of cases carrying its target; the Adam-type
optimizers fedfusion trains with are insensitive to such a scale. A batch without any target of a part gets 0 for it.
The reported ``parts`` (logging only, never differentiated) are means over the cases that carry each target, with
their counts ``seg-cases`` / ``cls-cases``.

``include_background=False`` for the Dice part (BraTS practice): the background Dice is ~1 on every case and would
dilute the gradient of the small lesion classes; the cross-entropy term still covers the background voxels, so
false positives there are penalised.

Class-balanced voxel cross-entropy (``balanced_ce``): the plain voxel cross-entropy is a mean over all voxels, so in
a 16x32x32 volume an enhancing-rim voxel (~1 % of the voxels) gets 1/16384 of the gradient, and the softmax
probability of a class that is never predicted is ~0, which also starves the Dice gradient (it reaches the logits
through ``p (1 - p)``): the sub-regions then sit on a plateau for hundreds of steps. The balanced form averages the
cross-entropy within each class present in the case, then over those classes, so every class of every case carries
the same weight however few voxels it has. It is computed per case from that case's own labels (no batch
statistics), so it stays a per-case loss.

Class prior (logit adjustment, Menon et al. 2021): a site's class balance is not the balance the model is judged on
(sites hold 15-80 % malignant cases, the held-out set 50 %), and a head trained by plain cross-entropy on a 40 %
malignant site learns "benign" when its features are still weak. With ``class_prior`` the cross-entropy is taken on
``logits + log(prior)``: the network's raw logits then estimate the *balanced* posterior (the class-conditional
likelihood ratio), so thresholding its probability at 0.5 is balanced-error-optimal whatever the training balance,
and sites with different balances train the same function. The prior is a constant per site (its label shares),
so each case's loss still depends on that case only (DP-SGD's per-sample gradients are unchanged in kind).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import Tensor, nn


def label_prior(labels: Sequence[int], num_classes: int = 2, smoothing: float = 1.0) -> tuple[float, ...]:
    """Class shares of ``labels`` with additive (Laplace) ``smoothing``: ``(n_c + s) / (n + C s)`` per class, so a
    class absent from a small site still gets a finite log-prior."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    counts = [0] * num_classes
    for y in labels:
        if not 0 <= int(y) < num_classes:
            raise ValueError(f"label {y} is outside 0..{num_classes - 1}")
        counts[int(y)] += 1
    total = sum(counts) + num_classes * smoothing
    if total <= 0:
        raise ValueError("label_prior needs labels or a positive smoothing")
    return tuple((c + smoothing) / total for c in counts)


class MultiTaskLoss(nn.Module):
    """``seg_weight * DiceCE(seg) + cls_weight * CE(class)``, a mean over the batch.

    Args:
        seg_weight: weight of the segmentation loss (Dice + voxel cross-entropy, each weight 1).
        cls_weight: weight of the case-classification cross-entropy.
        include_background: include the background class in the Dice part (default False, see module docstring).
        class_prior: the training data's class shares (e.g. :func:`label_prior`); ``None`` = plain cross-entropy.
            With it, the classification cross-entropy is logit-adjusted (see module docstring).
        balanced_ce: class-balanced voxel cross-entropy (default; see module docstring); False = the plain voxel
            mean.

    Call with ``seg_logits (B, C_seg, *S)``, ``class_logits (B, C)``, ``seg (B, *S)`` int64 labels in
    ``[0, C_seg)``, ``label (B,)`` int64 in ``[0, C)`` and optionally ``has_seg (B,)`` / ``has_label (B,)`` 0/1
    flags (float or bool; default every case has both targets; see the module docstring); returns ``(total, parts)``
    where ``total`` is a scalar tensor (with grad) and ``parts`` holds detached scalars ``seg``, ``cls``
    (unweighted means over the cases carrying that target, 0 when none does) and ``seg-cases``, ``cls-cases``
    (how many cases carry it).
    """

    def __init__(
        self,
        seg_weight: float = 1.0,
        cls_weight: float = 0.5,
        include_background: bool = False,
        class_prior: Sequence[float] | None = None,
        balanced_ce: bool = True,
    ) -> None:
        super().__init__()
        if seg_weight < 0 or cls_weight < 0 or seg_weight + cls_weight <= 0:
            raise ValueError(
                f"loss weights must be >= 0 and not both 0, got seg_weight={seg_weight}, cls_weight={cls_weight}"
            )
        if class_prior is not None and (
            len(class_prior) < 2 or any(not (0 < p < 1) for p in class_prior) or abs(sum(class_prior) - 1) > 1e-6
        ):
            raise ValueError(f"class_prior must be class shares in (0, 1) summing to 1, got {tuple(class_prior)}")
        self.class_prior = None if class_prior is None else tuple(float(p) for p in class_prior)
        # a buffer-free constant: the log-prior is not a parameter (Opacus must not see it) nor state to aggregate
        self._log_prior = None if class_prior is None else [math.log(p) for p in self.class_prior]
        self.seg_weight = float(seg_weight)
        self.cls_weight = float(cls_weight)
        self.include_background = include_background
        self.balanced_ce = bool(balanced_ce)
        #: "mean" (default): returns (total, parts). "none": returns per-case totals (B,) (Opacus ghost clipping).
        self.reduction = "mean"
        # MONAI's Dice (softmax, one-hot labels), unreduced: per case and class
        self._dice_none = DiceLoss(
            include_background=include_background, to_onehot_y=True, softmax=True, reduction="none", batch=False
        )

    def _check(self, seg_logits: Tensor, class_logits: Tensor, seg: Tensor, label: Tensor,
               has_seg: Tensor | None = None, has_label: Tensor | None = None) -> None:
        if seg_logits.dim() < 3 or tuple(seg.shape) != (seg_logits.shape[0], *seg_logits.shape[2:]):
            raise ValueError(
                f"seg must be (B, *S) matching seg_logits (B, C, *S); got seg {tuple(seg.shape)} and seg_logits "
                f"{tuple(seg_logits.shape)}"
            )
        if class_logits.dim() != 2 or tuple(label.shape) != (class_logits.shape[0],):
            raise ValueError(
                f"label must be (B,) matching class_logits (B, C); got label {tuple(label.shape)} and class_logits "
                f"{tuple(class_logits.shape)}"
            )
        for name, flags in (("has_seg", has_seg), ("has_label", has_label)):
            if flags is not None and tuple(flags.shape) != (class_logits.shape[0],):
                raise ValueError(f"{name} must be (B,) flags, one per case; got shape {tuple(flags.shape)} for "
                                 f"B={class_logits.shape[0]}")
        if self._log_prior is not None and class_logits.shape[1] != len(self._log_prior):
            raise ValueError(
                f"class_prior has {len(self._log_prior)} classes but class_logits has {class_logits.shape[1]}"
            )

    def _adjusted(self, class_logits: Tensor) -> Tensor:
        """``class_logits + log(prior)`` (the logit adjustment), or the logits unchanged without a prior."""
        if self._log_prior is None:
            return class_logits
        return class_logits + torch.tensor(self._log_prior, dtype=class_logits.dtype, device=class_logits.device)

    def _voxel_ce(self, seg_logits: Tensor, seg: Tensor) -> Tensor:
        """Per-case voxel cross-entropy (B,): the voxel mean, or the class-balanced mean (module docstring)."""
        ce = F.cross_entropy(seg_logits, seg, reduction="none").flatten(1)  # (B, P)
        if not self.balanced_ce:
            return ce.mean(dim=1)
        onehot = F.one_hot(seg.flatten(1), seg_logits.shape[1]).to(ce.dtype)  # (B, P, K)
        counts = onehot.sum(dim=1)  # (B, K)
        per_class = torch.einsum("bpk,bp->bk", onehot, ce) / counts.clamp_min(1.0)
        present = (counts > 0).to(ce.dtype)
        return (per_class * present).sum(dim=1) / present.sum(dim=1)

    def per_case(self, seg_logits: Tensor, class_logits: Tensor, seg: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        """Unweighted per-case losses ``(seg (B,), cls (B,))``: Dice (mean over the foreground classes) + voxel
        cross-entropy, and the (logit-adjusted) classification cross-entropy."""
        self._check(seg_logits, class_logits, seg, label)
        dice = self._dice_none(seg_logits, seg.long().unsqueeze(1)).flatten(1).mean(dim=1)
        cls = F.cross_entropy(self._adjusted(class_logits), label.long(), reduction="none")
        return dice + self._voxel_ce(seg_logits, seg.long()), cls

    def masked_per_case(
        self, seg_logits: Tensor, class_logits: Tensor, seg: Tensor, label: Tensor,
        has_seg: Tensor | None = None, has_label: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(seg (B,), cls (B,), seg_on (B,) bool, cls_on (B,) bool)``: the unweighted per-case losses with the
        parts a case has no target for set to exactly 0 (selected out, so no gradient reaches them)."""
        self._check(seg_logits, class_logits, seg, label, has_seg, has_label)
        seg_l, cls_l = self.per_case(seg_logits, class_logits, seg, label)
        seg_on = _flags(has_seg, seg_l)
        cls_on = _flags(has_label, cls_l)
        zero = torch.zeros((), dtype=seg_l.dtype, device=seg_l.device)
        return torch.where(seg_on, seg_l, zero), torch.where(cls_on, cls_l, zero.to(cls_l.dtype)), seg_on, cls_on

    def forward(  # type: ignore[override]
        self, seg_logits: Tensor, class_logits: Tensor, seg: Tensor, label: Tensor,
        has_seg: Tensor | None = None, has_label: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]] | Tensor:
        if self.reduction not in ("mean", "none"):
            raise ValueError(f"MultiTaskLoss.reduction must be 'mean' or 'none', got {self.reduction!r}")
        seg_l, cls_l, seg_on, cls_on = self.masked_per_case(seg_logits, class_logits, seg, label, has_seg, has_label)
        per_case = self.seg_weight * seg_l + self.cls_weight * cls_l
        if self.reduction == "none":
            return per_case
        # the mean over all B cases, never over the cases with a target (module docstring: per-case gradients)
        total = per_case.mean()
        n_seg, n_cls = seg_on.sum().detach(), cls_on.sum().detach()
        seg_mean = seg_l.detach().sum() / n_seg.clamp_min(1)
        cls_mean = cls_l.detach().sum() / n_cls.clamp_min(1)
        return total, {"seg": seg_mean, "cls": cls_mean, "seg-cases": n_seg.to(seg_mean.dtype),
                       "cls-cases": n_cls.to(cls_mean.dtype)}


def _flags(flags: Tensor | None, like: Tensor) -> Tensor:
    """``(B,)`` bool of per-case 0/1 flags (all True when ``None``), on ``like``'s device."""
    if flags is None:
        return torch.ones(like.shape[0], dtype=torch.bool, device=like.device)
    return flags.to(like.device).reshape(-1) > 0

