"""Intensity normalisation per modality kind, as nnU-Net does it: the one place it is defined.

:func:`common.data.dataset.preprocess_case` calls :func:`normalise` on every present modality of a case on its
reference grid (before resizing), so site training, server evaluation and ``fedfusion evaluate`` all see the same
numbers. What each kind gets (``models.modalities.DICOM_MODALITY``):

* **CT** (Hounsfield units are calibrated): clipped to the brain window :data:`CT_WINDOW`, then z-scored over the
  head (voxels above -500 HU, holes filled: skull, brain, CSF; not air). Without the window the skull (~1100 HU)
  and air (-1000 HU) set the scale and the 10-30 HU contrasts of brain lesions shrink to ~0.01 z-units; with it
  they are ~0.2-0.5 z-units. Calcifications (200-800 HU) saturate at the window's top and stay the brightest thing
  in the brain.
* **MR** (arbitrary units, per-exam gain): z-scored over the head mask (:func:`foreground_mask`), so air -- half of
  the volume -- no longer sets the mean and standard deviation.
* **US** (echo 0-255, gain-dependent): z-scored over the field of view (:func:`foreground_mask`: the imaged
  tissue, not the empty surroundings).

Voxels outside the mask are transformed with the same mean and standard deviation (they are not zeroed: the skull
and the air are anatomy the network may use for orientation). Statistics are float64; a constant mask region
(standard deviation 0) only subtracts the mean.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from models.modalities import DICOM_MODALITY, MODALITIES

#: CT brain window ``(low, high)`` in HU: wide enough for the iodine-enhanced rim (up to ~50 HU) and a
#: saturated-but-visible calcification, narrow enough that grey/white matter/oedema differ by ~0.1 window widths.
CT_WINDOW: tuple[float, float] = (-50.0, 150.0)
#: HU above which a CT voxel belongs to the head (air is ~-1000 HU, fat ~-100 HU).
CT_HEAD_HU: float = -500.0


def otsu_threshold(volume: np.ndarray, bins: int = 128) -> float:
    """Otsu's threshold of ``volume``: the intensity that best splits its histogram into two classes
    (maximal between-class variance); for a head image, air/empty field versus tissue."""
    values = np.asarray(volume, dtype=np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        return lo
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2.0
    w0 = np.cumsum(counts)
    w1 = w0[-1] - w0
    m0 = np.cumsum(counts * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def foreground_mask(volume: np.ndarray, modality: str) -> np.ndarray:
    """Boolean mask of the head (CT, MR) or of the ultrasound field of view, same shape as ``volume``.

    CT: voxels above :data:`CT_HEAD_HU`. MR and US: voxels above the Otsu threshold. Then holes are filled in
    every axial slice (dark CSF, skull on MR, anechoic necrosis on US lie inside the head; slice by slice because
    the head is cut open by the top and bottom of the field of view, where a 3D fill would leak). An empty result
    (a blank image) falls back to the whole volume, so normalisation is always defined.
    """
    kind = _kind(modality)
    vol = np.asarray(volume)
    raw = vol > (CT_HEAD_HU if kind == "CT" else otsu_threshold(vol))
    if vol.ndim == 2:
        mask = ndimage.binary_fill_holes(raw)
    elif vol.ndim == 3:
        mask = np.stack([ndimage.binary_fill_holes(s) for s in raw])
    else:
        mask = raw
    if not mask.any():
        return np.ones(vol.shape, dtype=bool)
    return np.asarray(mask, dtype=bool)


def normalise(volume: np.ndarray, modality: str) -> np.ndarray:
    """``volume`` (any shape, physical units) normalised for ``modality`` (see the module docstring); float32."""
    vol = np.asarray(volume, dtype=np.float64)
    if not np.all(np.isfinite(vol)):
        raise ValueError(f"{modality} volume holds non-finite values (NaN/inf); the reader should have refused it")
    mask = foreground_mask(vol, modality)
    if _kind(modality) == "CT":
        vol = np.clip(vol, *CT_WINDOW)
    inside = vol[mask]
    mean = float(inside.mean())
    std = float(inside.std())
    out = vol - mean
    if std > 0:
        out /= std
    return out.astype(np.float32)


def _kind(modality: str) -> str:
    if modality not in DICOM_MODALITY:
        raise ValueError(f"unknown modality {modality!r}; known modalities are {', '.join(MODALITIES)}")
    return DICOM_MODALITY[modality]
