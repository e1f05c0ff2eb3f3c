"""Running a trained network on one study and mapping its output back onto the study's own series.

A study folder is a case folder without a label (DICOM series at any depth and/or ``<id>_<modality>.nii.gz``
files, any subset of the model's modalities). :func:`predict_study` reads it exactly as training does
(:func:`common.data.site.load_case`: every modality resampled onto one reference grid, reoriented slice-first;
then :func:`common.data.dataset.preprocess_case`, the training preprocessing), runs the network, and keeps the
segmentation probabilities on the reference grid. :meth:`StudyPrediction.labels_on` then maps them onto any grid
in patient space, normally a source series' native grid (:attr:`StudyPrediction.source_grid`): probabilities are
resampled (trilinear, by physical position) and the argmax taken there, so undoing the reorientation moves whole
voxels and a coarser or finer source grid gets the label with the highest interpolated probability.

:func:`restore_probabilities` is the inverse of ``preprocess_case``'s spatial step (a whole-grid resize to the
model's ``spatial_size``, the segmentation with torch's floor-nearest rule: the network learns labels taken from
those positions); it must change whenever that step does (tests/test_predict.py checks the pair).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from common.data.dataset import preprocess_case
from common.data.geometry import Grid, affine_spacing, resample_to_grid
from common.data.limits import DEFAULT_LIMITS, ReaderLimits
from common.data.problems import Problem
from common.data.series_mapping import MappingSource
from common.data.site import load_case
from models.config import CLASS_NAMES, SEG_LABELS, ModelConfig

__all__ = ["MALIGNANT", "StudyPrediction", "predict_study", "restore_probabilities"]

#: Index of the malignant class in the classifier's output.
MALIGNANT = CLASS_NAMES.index("malignant")

#: ``inferer(image, network, mask)`` -> ``(seg logits, class logits)``; MONAI's ``SimpleInferer`` has this form.
Inferer = Callable[..., tuple[Tensor, Tensor]]


@dataclass
class StudyPrediction:
    """The network's output for one study.

    Attributes:
        study: the study folder's name.
        modalities: the modalities used (present in the study and inputs of the model), canonical order.
        probability: P(malignant) from the classifier.
        grid: the reference grid the study was read on (slice-first, ``common.data.site.CaseData.grid``).
        probabilities: ``(K, D, H, W)`` float32 segmentation probabilities on ``grid`` (K = len(SEG_LABELS)).
        native: ``{modality: Grid}``: each used modality's own grid as read.
        problems: what the readers reported (warnings of a readable study; a missing segmentation is not one).
    """

    study: str
    modalities: tuple[str, ...]
    probability: float
    grid: Grid
    probabilities: np.ndarray
    native: dict[str, Grid]
    problems: list[Problem] = field(default_factory=list)
    _labels: dict[tuple[tuple[int, ...], bytes], np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def reference_modality(self) -> str:
        """The modality whose series the outputs are written on: the first used one, canonical order."""
        return self.modalities[0]

    @property
    def source_grid(self) -> Grid:
        """The reference modality's native grid (shape and RAS affine as the readers compute them)."""
        return self.native[self.reference_modality]

    def labels_on(self, grid: Grid | None = None) -> np.ndarray:
        """Labels 0..K-1 ``(D, H, W)`` uint8 on ``grid`` (default :attr:`source_grid`): the argmax of the
        probabilities resampled there; outside the study's field of view, background."""
        grid = grid or self.source_grid
        key = (tuple(grid.shape), np.asarray(grid.affine, dtype=float).tobytes())
        if key not in self._labels:  # the NIfTI and the DICOM SEG are usually on one grid: resample once
            # outside the study's field of view every probability resamples to 0, and argmax picks 0 = background
            resampled = np.stack([resample_to_grid(p, self.grid.affine, grid, order=1) for p in self.probabilities])
            self._labels[key] = resampled.argmax(axis=0).astype(np.uint8)
        return self._labels[key].copy()

    def volumes_ml(self, labels: np.ndarray, grid: Grid) -> dict[str, float]:
        """Volume in millilitres of each foreground label of ``labels`` on ``grid``."""
        voxel_ml = float(np.prod(affine_spacing(grid.affine))) / 1000.0
        return {SEG_LABELS[k]: float(np.count_nonzero(labels == k)) * voxel_ml for k in SEG_LABELS if k}


def _linear_weights(model_size: int, source_size: int) -> Tensor:
    """``(source_size, model_size)`` linear-interpolation weights that put model voxel ``i`` back where
    ``preprocess_case``'s nearest resize took its training label from: source index ``floor(i * source / model)``
    (torch's ``nearest``), so the network's output lands where its training targets came from; a source voxel several
    model voxels were taken from gets their mean, one between two such positions a linear blend, one beyond the last
    the last model voxel."""
    taken = torch.floor(torch.arange(model_size, dtype=torch.float64) * (source_size / model_size))
    taken = taken.clamp_max(source_size - 1)
    x = torch.arange(source_size, dtype=torch.float64)
    lower = (torch.searchsorted(taken, x, right=True) - 1).clamp(0, model_size - 1)
    upper = (lower + 1).clamp_max(model_size - 1)
    span = (taken[upper] - taken[lower]).clamp_min(1.0)
    frac = ((x - taken[lower]) / span).clamp(0.0, 1.0)
    frac[upper == lower] = 0.0
    weights = torch.zeros(source_size, model_size, dtype=torch.float64)
    rows = torch.arange(source_size)
    weights.index_put_((rows, lower), 1.0 - frac, accumulate=True)
    weights.index_put_((rows, upper), frac, accumulate=True)
    # upsampled axes: several model voxels took their label from one source voxel, which gets their mean
    exact = (taken[None, :] == x[:, None]).double()
    matched = exact.sum(dim=1) > 0
    weights[matched] = exact[matched] / exact[matched].sum(dim=1, keepdim=True)
    return weights.float()


def restore_probabilities(probabilities: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of ``preprocess_case``'s resize: ``(K, *spatial_size)`` probabilities -> ``(K, *shape)`` on the
    reference grid (separable linear interpolation, :func:`_linear_weights`), still summing to one per voxel."""
    out = probabilities.float()
    for axis, size in enumerate(shape, start=1):
        weights = _linear_weights(out.shape[axis], int(size))
        out = torch.movedim(torch.tensordot(weights, torch.movedim(out, axis, 0), dims=1), 0, axis)
    return out.clamp_min(0.0) / out.sum(dim=0, keepdim=True).clamp_min(1e-12)


def _forward(network: nn.Module, image: Tensor, mask: Tensor, inferer: Inferer | None) -> tuple[Tensor, Tensor]:
    if inferer is not None:
        return inferer(image, network, mask)
    return network(image, mask)


def predict_study(
    network: nn.Module,
    study_dir: str | os.PathLike[str],
    *,
    device: torch.device | str | None = None,
    series_mapping: MappingSource = None,
    limits: ReaderLimits = DEFAULT_LIMITS,
    inferer: Inferer | None = None,
) -> StudyPrediction:
    """Read ``study_dir``, preprocess it as training does, and run ``network`` on it (no gradients).

    Args:
        network: a FusionNet (``network.config`` a 3D :class:`models.config.ModelConfig`), in eval mode.
        study_dir: the study folder.
        device: where the network runs (default: where its parameters are).
        series_mapping: SeriesDescription -> modality rules (see ``common.data.series_mapping``).
        limits: what one file, series and the study folder may cost the readers.
        inferer: optional ``inferer(image (1, M, D, H, W), network, mask (1, M))`` (e.g. MONAI ``SimpleInferer``).

    Raises:
        common.data.site.CaseError: no modality of the model could be read; its ``problems`` say why.
        ValueError: a 2D model (its output is one axial slice, not a segmentation of the study).
    """
    cfg: ModelConfig = network.config  # type: ignore[assignment]
    if cfg.spatial_dims != 3:
        raise ValueError(f"predict needs a 3D model; this checkpoint's model is {cfg.spatial_dims}D "
                         f"(spatial size {cfg.spatial_size}), whose output covers one axial slice only")
    case = load_case(Path(study_dir), cfg.modalities, series_mapping, require_seg=False, limits=limits)
    arrays = preprocess_case(case.images, None, cfg.modalities, cfg.spatial_size)
    if device is None:
        device = next(network.parameters()).device
    image = torch.from_numpy(arrays["image"])[None].to(device)
    mask = torch.from_numpy(arrays["mask"])[None].to(device)
    with torch.no_grad():
        seg_logits, class_logits = _forward(network, image, mask, inferer)
    seg_probs = torch.softmax(seg_logits[0].float(), dim=0).cpu()
    probability = float(torch.softmax(class_logits[0].float(), dim=0)[MALIGNANT])
    restored = restore_probabilities(seg_probs, case.grid.shape)
    used = tuple(m for m in cfg.modalities if m in case.images)
    return StudyPrediction(
        study=case.case_id, modalities=used, probability=probability, grid=case.grid,
        probabilities=restored.numpy().astype(np.float32), native={m: case.native[m] for m in used},
        problems=[p for p in case.problems if p.kind != "missing-seg"],
    )

