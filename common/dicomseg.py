"""DICOM Segmentation objects of fedfusion's sub-regions (highdicom): finding the source series, writing, reading.

A segmentation is written on the grid of one source series (the series a viewer overlays it on) and references
its instances: :func:`find_source_series` finds, among a study's DICOM series of a modality, the one whose
frames lie exactly on a given grid (the grid :func:`common.data.site.load_case` read the modality on) and which
plane ``k`` of that grid each frame is; :func:`build_segmentation` turns a label map on that grid into a BINARY
Segmentation with one segment per sub-region (:data:`SEGMENTS`) and the algorithm's identification;
:func:`read_segmentation` gives the label map back per source frame.

Coded concepts (DICOM CID 7150 category / CID 7151 property type, the lists viewers and archives know):

=====  ======================  ======================================  ============================================
label  fedfusion sub-region    category                                property type
=====  ======================  ======================================  ============================================
1      oedema                  SCT 49755003 Morphologically Abnormal   SCT 79654002 Edema
2      non-enhancing core      SCT 49755003 Morphologically Abnormal   SCT 6574001 Necrosis (BraTS "necrotic /
                                                                       non-enhancing tumour core")
3      enhancing rim           SCT 49755003 Morphologically Abnormal   NCIt C113842 Enhancing Lesion (CID 7151
                                                                       holds no SNOMED CT concept for it)
=====  ======================  ======================================  ============================================

Every segment also names the brain (SCT 12738006) as its anatomic region.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.data.dicom_reader import scan_dicom
from common.data.geometry import LPS_TO_RAS, Grid, affine_spacing
from common.data.limits import DEFAULT_LIMITS, ReaderLimits
from common.data.series_mapping import MappingSource, load_series_mapping
from models.config import SEG_LABELS

__all__ = [
    "SEGMENTS",
    "AlgorithmInfo",
    "SourceSeries",
    "SourceSeriesError",
    "build_segmentation",
    "find_source_series",
    "read_segmentation",
]

#: Largest distance (in voxels) between a frame's position and its grid plane that still counts as on the grid;
#: DICOM decimal strings carry about 10 significant digits.
ON_GRID_TOLERANCE = 1e-2


def _segments() -> dict[int, tuple[str, Any, Any]]:
    from pydicom.sr.codedict import codes

    types = {1: codes.SCT.Edema, 2: codes.SCT.Necrosis, 3: codes.NCIt.EnhancingLesion}
    category = codes.SCT.MorphologicallyAbnormalStructure
    return {label: (SEG_LABELS[label], category, types[label]) for label in sorted(types)}


#: ``{label: (segment label, category code, property type code)}`` for labels 1..3 (see the module doc).
SEGMENTS: dict[int, tuple[str, Any, Any]] = _segments()


class SourceSeriesError(ValueError):
    """No DICOM series of the study can carry the segmentation; the message says why."""


@dataclass
class SourceSeries:
    """A study's DICOM series the segmentation is written on.

    Attributes:
        modality: the fedfusion modality of the series.
        datasets: its headers (no pixel data): one multi-frame object, or single-frame objects in file order.
        planes: for every frame (single-frame: every dataset; multi-frame: every frame of the one dataset) the plane
            ``k`` of :attr:`grid` it lies on.
        grid: the native grid the series was read on.
    """

    modality: str
    datasets: list[Any]
    planes: list[int]
    grid: Grid

    @property
    def frame_uids(self) -> list[str]:
        """SOPInstanceUID of each dataset (of the one multi-frame object, or of each slice), in :attr:`datasets`
        order."""
        return [str(ds.SOPInstanceUID) for ds in self.datasets]


@dataclass(frozen=True)
class AlgorithmInfo:
    """What made the segmentation, as written into every segment's AlgorithmIdentificationSequence.

    Attributes:
        version: fedfusion's version.
        run_id: the training run's id.
        checkpoint_sha256: hex SHA-256 of the checkpoint file.
        model: a short model description (fusion family, modalities).
    """

    version: str
    run_id: str
    checkpoint_sha256: str
    model: str


def _frame_geometry(ds: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(position (3,) LPS mm, orientation (6,))`` of every frame of ``ds``.

    Raises:
        SourceSeriesError: a frame without ImagePositionPatient/ImageOrientationPatient.
    """
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames <= 1:
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            raise SourceSeriesError("a slice has no ImagePositionPatient/ImageOrientationPatient")
        return [(np.asarray(ds.ImagePositionPatient, dtype=float), np.asarray(ds.ImageOrientationPatient, dtype=float))]
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    per_frame = ds.PerFrameFunctionalGroupsSequence if "PerFrameFunctionalGroupsSequence" in ds else []
    out = []
    for f in range(frames):
        group = per_frame[f] if f < len(per_frame) else None
        pos = next((g.PlanePositionSequence[0] for g in (group, shared)
                    if g is not None and "PlanePositionSequence" in g), None)
        ori = next((g.PlaneOrientationSequence[0] for g in (group, shared)
                    if g is not None and "PlaneOrientationSequence" in g), None)
        if pos is None or ori is None:
            raise SourceSeriesError(f"frame {f + 1} of the multi-frame object has no plane position/orientation")
        out.append((np.asarray(pos.ImagePositionPatient, dtype=float),
                    np.asarray(ori.ImageOrientationPatient, dtype=float)))
    return out


def _planes_on_grid(datasets: Sequence[Any], grid: Grid) -> list[int]:
    """The plane ``k`` of ``grid`` each frame of ``datasets`` lies on.

    Raises:
        SourceSeriesError: a frame off the grid (position, orientation or size), or two frames on one plane.
    """
    affine = np.asarray(grid.affine, dtype=float)
    inverse = np.linalg.inv(affine)
    _, dj, di = affine_spacing(affine)
    # ImageOrientationPatient is (direction of increasing column index i, of increasing row index j) in LPS
    i_dir = (LPS_TO_RAS @ affine)[:3, 2] / di
    j_dir = (LPS_TO_RAS @ affine)[:3, 1] / dj
    planes: list[int] = []
    for ds in datasets:
        if (int(ds.Rows), int(ds.Columns)) != (grid.shape[1], grid.shape[2]):
            raise SourceSeriesError(f"frames of {ds.Rows} x {ds.Columns} pixels, the grid has {grid.shape[1]} x "
                                    f"{grid.shape[2]}")
        for position, orientation in _frame_geometry(ds):
            if not (np.allclose(orientation[:3], i_dir, atol=1e-3) and np.allclose(orientation[3:6], j_dir, atol=1e-3)):
                raise SourceSeriesError("ImageOrientationPatient differs from the grid's axes")
            k, j, i = (inverse @ np.append(LPS_TO_RAS[:3, :3] @ position, 1.0))[:3]
            plane = int(round(k))
            if max(abs(j), abs(i), abs(k - plane)) > ON_GRID_TOLERANCE or not 0 <= plane < grid.shape[0]:
                raise SourceSeriesError(f"a frame at ImagePositionPatient {position.tolist()} is not on a plane of "
                                        "the grid")
            planes.append(plane)
    if len(set(planes)) != len(planes):
        raise SourceSeriesError("several frames lie on one plane of the grid")
    return planes


def find_source_series(
    study_dir: str | os.PathLike[str],
    modality: str,
    grid: Grid,
    series_mapping: MappingSource = None,
    limits: ReaderLimits = DEFAULT_LIMITS,
) -> SourceSeries:
    """The DICOM series of ``modality`` in ``study_dir`` whose frames lie on ``grid`` (headers only).

    Series are grouped and named exactly as the readers do (``common.data.dicom_reader.scan_dicom`` with the same
    ``series_mapping``); of several candidates, the one with the most frames that fits is taken, as the reader takes
    the series with the most frames.

    Raises:
        SourceSeriesError: the study has no DICOM series of ``modality``, or none lies on ``grid`` (e.g. the modality
            was read from a NIfTI file); the message says which.
    """
    import pydicom

    study = Path(study_dir)
    series, _problems = scan_dicom(study, load_series_mapping(series_mapping), study.name, limits)
    candidates = sorted((s for s in series if s.modality == modality),
                        key=lambda s: (-sum(h.frames for h in s.files), s.folder))
    if not candidates:
        raise SourceSeriesError(f"{study} has no DICOM series of {modality}")
    reasons = []
    for candidate in candidates:
        if any(h.frames > 1 for h in candidate.files) and len(candidate.files) > 1:
            reasons.append(f"{candidate.folder}: mixes multi-frame and other files")
            continue
        datasets = [pydicom.dcmread(h.path, stop_before_pixels=True) for h in candidate.files]
        try:
            planes = _planes_on_grid(datasets, grid)
        except SourceSeriesError as exc:
            reasons.append(f"{candidate.folder}: {exc}")
            continue
        return SourceSeries(modality, datasets, planes, grid)
    raise SourceSeriesError(f"no DICOM series of {modality} in {study} lies on the grid it was read on "
                            f"({'; '.join(reasons)})")


def build_segmentation(
    labels: np.ndarray,
    source: SourceSeries,
    algorithm: AlgorithmInfo,
    *,
    series_number: int = 300,
    series_description: str = "fedfusion segmentation",
) -> Any:
    """A ``highdicom.seg.Segmentation`` (BINARY, one segment per label 1..3) of ``labels`` on ``source``.

    Args:
        labels: ``(D, H, W)`` labels 0..3 on ``source.grid``.
        source: the series the segmentation references (:func:`find_source_series`).
        algorithm: written into each segment's AlgorithmIdentificationSequence (name ``fedfusion``, family
            Artificial Intelligence, the version, and the run id, checkpoint hash and model as parameters).
        series_number, series_description: of the new segmentation series.

    Every source frame gets a segmentation frame (empty ones too), so a viewer shows "no finding" on a slice
    rather than a gap, and every segment is described even when absent from ``labels``.

    Raises:
        ValueError: ``labels`` not on ``source.grid`` or holding other values than 0..3.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    labels = np.asarray(labels)
    if labels.shape != tuple(source.grid.shape):
        raise ValueError(f"labels of shape {labels.shape} are not on the source series' grid {source.grid.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > max(SEGMENTS)):
        raise ValueError(f"labels hold values outside 0..{max(SEGMENTS)}")
    identification = hd.AlgorithmIdentificationSequence(
        name="fedfusion",
        family=codes.cid7162.ArtificialIntelligence,
        version=algorithm.version,
        source="fedfusion federated multimodal fusion network",
        parameters={"run_id": algorithm.run_id, "checkpoint_sha256": algorithm.checkpoint_sha256,
                    "model": algorithm.model},
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=label,
            segment_label=name,
            segmented_property_category=category,
            segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
            anatomic_regions=[codes.SCT.Brain],
        )
        for label, (name, category, kind) in SEGMENTS.items()
    ]
    frames = labels[np.asarray(source.planes, dtype=np.int64)].astype(np.uint8)
    return hd.seg.Segmentation(
        source_images=source.datasets,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="fedfusion",
        manufacturer_model_name=algorithm.model[:64],
        software_versions=algorithm.version,
        device_serial_number=algorithm.checkpoint_sha256[:16],
        content_label="FEDFUSION",
        content_description="fedfusion tumour sub-regions",
        series_description=series_description,
        omit_empty_frames=False,
    )


def read_segmentation(path: str | os.PathLike[str], source: SourceSeries) -> np.ndarray:
    """The label map (0..3) of a fedfusion DICOM SEG on ``source``'s grid ``(D, H, W)`` uint8.

    Planes of the grid no source frame lies on (slices the reader interpolated) stay 0.

    Raises:
        ValueError: the file is not a Segmentation of ``source``'s frames.
    """
    import highdicom as hd

    seg = hd.seg.segread(os.fspath(path))
    if len(source.datasets) == 1 and int(getattr(source.datasets[0], "NumberOfFrames", 1) or 1) > 1:
        frames = seg.get_pixels_by_source_frame(
            source_sop_instance_uid=source.frame_uids[0],
            source_frame_numbers=list(range(1, len(source.planes) + 1)),
            combine_segments=True,
        )
    else:
        frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=source.frame_uids, combine_segments=True)
    out = np.zeros(source.grid.shape, dtype=np.uint8)
    out[np.asarray(source.planes, dtype=np.int64)] = np.asarray(frames, dtype=np.uint8)
    return out
