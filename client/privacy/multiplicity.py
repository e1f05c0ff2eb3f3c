"""Augmentation multiplicity (run-config key ``augment-multiplicity``): K augmented views of every case per step,
and one gradient per case, the mean over its views, taken *before* DP clipping.

Why (De et al. 2022, arXiv:2204.13650): augmenting a case once per step adds gradient variance that DP-SGD cannot
average away (the batch is small and the noise large). Averaging K views before clipping keeps the per-case
sensitivity at ``C`` (still one clipped vector per case, so the privacy accounting is unchanged) while the clipped
vector is a better estimate of the case's expected gradient. The cost is K forward/backward passes per case.

How: :class:`MultiViewLoader` repeats each case of a batch K times (rows ``[case0 view0..K-1, case1 view0..]``) and
augments every row with :func:`augment_batch`; Opacus then computes one per-sample gradient per *row*.
:func:`average_views` (installed in the ``DPOptimizer`` by :func:`install_view_averaging`) sums the rows of each
case with the same mechanism as the per-patient sum (:func:`client.privacy.patient_sampling.
sum_grad_samples_by_patient`) and divides by K, before the optimizer's own clip (per patient when the site groups
studies by patient). Without DP nothing needs installing: the mean loss over the ``B x K`` rows is already the mean
over cases of the mean over views.

The augmentations are those of :class:`common.data.dataset.CaseDataset` with ``augment=True`` (each with the same
probabilities and ranges), applied to whole batches: a flip along each spatial axis (probability 0.5, image and
segmentation together), a channel-wise intensity scaling ``x * (1 + f)``, ``f ~ U(-0.1, 0.1)`` (probability 0.5) and
a channel-wise shift ``x + o``, ``o ~ U(-0.1, 0.1)`` (probability 0.5); missing channels stay exactly 0. The draws
come from :attr:`MultiViewLoader.generator`, which the site seeds every round from its own randomness
(:mod:`client.privacy.randomness`), never from a value the server sends.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from .patient_sampling import sum_grad_samples_by_patient

__all__ = ["MultiViewLoader", "augment_batch", "average_views", "install_view_averaging"]

#: Probability of each augmentation and the half-width of the intensity ranges (as in CaseDataset).
FLIP_PROB = 0.5
INTENSITY_PROB = 0.5
INTENSITY_RANGE = 0.1


def augment_batch(image: torch.Tensor, mask: torch.Tensor, seg: torch.Tensor,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Independently augmented copies of every row (see the module docstring).

    Args:
        image: ``(B, M, *S)`` float.
        mask: ``(B, M)`` availability (0 channels are re-zeroed).
        seg: ``(B, *S)`` labels, flipped with the image.
        generator: CPU generator of every draw.

    Returns:
        ``(image, seg)``, new tensors of the same shapes.
    """
    b, m = int(image.shape[0]), int(image.shape[1])
    spatial = image.dim() - 2
    image, seg = image.clone(), seg.clone()
    for axis in range(spatial):
        rows = (torch.rand(b, generator=generator) < FLIP_PROB).nonzero().flatten()
        if rows.numel():
            image[rows] = image[rows].flip(2 + axis)
            seg[rows] = seg[rows].flip(1 + axis)
    shape = (b, m, *([1] * spatial))
    scale_on = (torch.rand(b, generator=generator) < INTENSITY_PROB).to(image.dtype).reshape(b, *([1] * (spatial + 1)))
    factor = (torch.rand(shape, generator=generator) * 2 - 1) * INTENSITY_RANGE
    image = image * (1 + scale_on * factor.to(image.dtype))
    shift_on = (torch.rand(b, generator=generator) < INTENSITY_PROB).to(image.dtype).reshape(b, *([1] * (spatial + 1)))
    offset = (torch.rand(shape, generator=generator) * 2 - 1) * INTENSITY_RANGE
    image = image + shift_on * offset.to(image.dtype)
    keep = mask.reshape(b, m, *([1] * spatial)) > 0
    return torch.where(keep, image, torch.zeros((), dtype=image.dtype)), seg


class MultiViewLoader:
    """Batches of ``loader`` (dicts ``image, mask, seg, label``) with every case repeated ``views`` times, each row
    augmented (:func:`augment_batch`).

    Attributes:
        views: K.
        generator: source of the augmentation draws (replace it every round from the site's randomness).
        case_of_row: for the last batch yielded, the case (0..B-1) of each of its ``B x K`` rows.
    """

    def __init__(self, loader: Any, views: int, generator: torch.Generator | None = None) -> None:
        if views < 1:
            raise ValueError(f"augmentation multiplicity must be >= 1 view, got {views} (augment-multiplicity)")
        self.loader = loader
        self.views = int(views)
        self.generator = generator if generator is not None else torch.Generator()
        self.case_of_row = torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.loader:
            yield self.expand(batch)

    def expand(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch`` with K augmented rows per case (an empty batch stays empty); sets :attr:`case_of_row`."""
        if not isinstance(batch, Mapping) or not {"image", "mask", "seg", "label"} <= set(batch):
            raise ValueError("augmentation multiplicity needs dict batches with image, mask, seg, label (CasesOnly)")
        k = self.views
        b = int(batch["image"].shape[0])
        self.case_of_row = torch.arange(b).repeat_interleave(k)
        out = {key: value.repeat_interleave(k, dim=0) for key, value in batch.items()
               if isinstance(value, torch.Tensor)}
        if b:
            out["image"], out["seg"] = augment_batch(out["image"].float(), out["mask"].float(), out["seg"],
                                                     self.generator)
        return out


def average_views(params: Sequence[torch.Tensor], case_of_row: torch.Tensor, views: int) -> None:
    """Replace every ``p.grad_sample`` (one row per view, ``(B*K, *p.shape)``) by one row per case: the mean of that
    case's K view gradients, ``(B, *p.shape)`` (empty batches are left as they are)."""
    sum_grad_samples_by_patient(params, case_of_row)
    if case_of_row.numel():
        for p in params:
            gs = getattr(p, "grad_sample", None)
            if isinstance(gs, torch.Tensor):
                gs.div_(views)


def install_view_averaging(optimizer: Any, loader: MultiViewLoader) -> None:
    """Make an Opacus ``DPOptimizer`` average each case's views (:func:`average_views`) before its clip (which may
    already sum per patient: that sum then runs over the averaged cases)."""
    clip = optimizer.clip_and_accumulate

    def clip_cases() -> None:
        average_views(optimizer.params, loader.case_of_row, loader.views)
        clip()

    optimizer.clip_and_accumulate = clip_cases
