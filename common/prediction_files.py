"""The files ``fedfusion predict`` (and a fedfusion MONAI bundle) write for one study.

``OUT/<study>_seg.nii.gz``
    labels 0..3 (``models.config.SEG_LABELS``) on the reference series' native grid, with its affine: the grid the
    readers computed for that DICOM series or the reference NIfTI file's own (not the training grid).
``OUT/<study>_seg.dcm``
    a DICOM Segmentation (:mod:`common.dicomseg`) on the first used modality with a DICOM series, referencing its
    instances; not written for a study without DICOM input (the JSON says why).
``OUT/<study>_prediction.json``
    P(malignant), the decision threshold and where it comes from, the decision, the modalities used, the model's
    expected metrics for exactly that modality subset (:class:`common.provenance.ExpectedPerformance`), the lesion
    volumes, the provenance (fedfusion version, run id, checkpoint SHA-256) and what the readers reported.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.data.geometry import Grid, save_nifti
from common.data.limits import DEFAULT_LIMITS, ReaderLimits
from common.data.series_mapping import MappingSource
from common.dicomseg import AlgorithmInfo, SourceSeriesError, build_segmentation, find_source_series
from common.predict import StudyPrediction
from common.provenance import ModelProvenance
from models.atomic import atomic_write_text
from models.config import CLASS_NAMES, ModelConfig
from models.modalities import subset_name

__all__ = ["SegOutcome", "StudyOutputs", "prediction_summary", "write_dicom_seg", "write_study_outputs"]


@dataclass
class SegOutcome:
    """The DICOM SEG of one study: ``path`` when written (on ``modality``'s series), else ``None`` and ``note``
    says why."""

    path: Path | None
    modality: str | None
    note: str


@dataclass
class StudyOutputs:
    """What was written for one study: the NIfTI, the JSON, the DICOM SEG outcome and the JSON's content."""

    study: str
    nifti: Path
    json: Path
    seg: SegOutcome
    summary: dict[str, Any] = field(default_factory=dict)


def write_dicom_seg(
    prediction: StudyPrediction,
    study_dir: str | os.PathLike[str],
    path: str | os.PathLike[str],
    algorithm: AlgorithmInfo,
    *,
    series_mapping: MappingSource = None,
    limits: ReaderLimits = DEFAULT_LIMITS,
) -> SegOutcome:
    """Write ``prediction`` as a DICOM SEG on the first used modality (canonical order) that has a DICOM series on
    the grid it was read on; a study without one gets no SEG and the outcome's note says why."""
    reasons = []
    for modality in prediction.modalities:
        try:
            source = find_source_series(study_dir, modality, prediction.native[modality], series_mapping, limits)
        except SourceSeriesError as exc:
            reasons.append(str(exc))
            continue
        try:
            seg = build_segmentation(prediction.labels_on(source.grid), source, algorithm)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            # headers highdicom cannot build a Segmentation from (a missing module attribute, an odd value) cost the
            # SEG only: the NIfTI and the JSON are still written, and the note says why
            return SegOutcome(None, modality, f"no DICOM SEG: highdicom cannot build one on the {modality} series "
                                              f"({type(exc).__name__}: {exc})")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        seg.save_as(os.fspath(path))
        return SegOutcome(Path(path), modality, f"DICOM SEG on the {modality} series ({len(source.planes)} frames)")
    if all(" has no DICOM series of " in r for r in reasons):
        return SegOutcome(None, None, "no DICOM SEG: the study has no DICOM input (a DICOM Segmentation must "
                                      "reference DICOM source images); the NIfTI segmentation is the output")
    return SegOutcome(None, None, f"no DICOM SEG: {'; '.join(reasons)}")


def _grid_dict(grid: Grid) -> dict[str, Any]:
    return {"shape": list(grid.shape), "affine": np.asarray(grid.affine, dtype=float).round(6).tolist()}


def prediction_summary(
    prediction: StudyPrediction,
    provenance: ModelProvenance,
    model: ModelConfig,
    labels: np.ndarray,
    outputs: dict[str, str | None],
    seg_note: str,
) -> dict[str, Any]:
    """The content of ``<study>_prediction.json`` (see the module doc).

    Args:
        prediction: the study's prediction.
        provenance: the checkpoint's (``common.provenance.load_provenance``, or a bundle's copy of it).
        model: the network's model config.
        labels: the labels written to the NIfTI (on ``prediction.source_grid``), for the lesion volumes.
        outputs: file names written (``nifti``, ``dicom_seg``; ``None`` = not written).
        seg_note: what happened to the DICOM SEG.
    """
    expected = provenance.expected(prediction.modalities)
    decision = CLASS_NAMES[int(prediction.probability >= provenance.threshold)]
    return {
        "study": prediction.study,
        "malignancy_probability": prediction.probability,
        "threshold": provenance.threshold,
        "threshold_source": provenance.threshold_source,
        "decision": decision,
        "modalities_used": list(prediction.modalities),
        "modalities_missing": [m for m in model.modalities if m not in prediction.modalities],
        "subset": subset_name(prediction.modalities),
        "expected_performance": asdict(expected) if expected is not None else None,
        "expected_performance_note": None if expected is not None else (
            f"the run logged no held-out evaluation of the {subset_name(prediction.modalities)} subset"
            + ("" if provenance.run_dir else " (no metrics.jsonl next to the checkpoint)")),
        "lesion_volumes_ml": prediction.volumes_ml(labels, prediction.source_grid),
        "reference": {"modality": prediction.reference_modality, **_grid_dict(prediction.source_grid)},
        "outputs": outputs,
        "dicom_seg_note": seg_note,
        "provenance": {
            "fedfusion_version": provenance.fedfusion_version,
            "run_id": provenance.run_id,
            "run_id_source": provenance.run_id_source,
            "checkpoint": provenance.checkpoint,
            "checkpoint_sha256": provenance.sha256,
            "checkpoint_round": provenance.round,
            "model": {"family": model.family, "modalities": list(model.modalities),
                      "spatial_size": list(model.spatial_size)},
        },
        "problems": [str(p) for p in prediction.problems],
    }


def write_study_outputs(
    prediction: StudyPrediction,
    study_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    provenance: ModelProvenance,
    model: ModelConfig,
    *,
    dicom_seg: bool = True,
    series_mapping: MappingSource = None,
    limits: ReaderLimits = DEFAULT_LIMITS,
) -> StudyOutputs:
    """Write the NIfTI, the DICOM SEG (when ``dicom_seg`` and the study has DICOM input) and the JSON of one study
    into ``out_dir`` (created); see the module doc for the files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = prediction.study
    labels = prediction.labels_on(prediction.source_grid)
    nifti = out / f"{name}_seg.nii.gz"
    save_nifti(labels, prediction.source_grid.affine, nifti)
    if dicom_seg:
        algorithm = AlgorithmInfo(version=provenance.fedfusion_version, run_id=provenance.run_id,
                                  checkpoint_sha256=provenance.sha256,
                                  model=f"fedfusion {model.family} fusion ({'+'.join(model.modalities)})")
        seg = write_dicom_seg(prediction, study_dir, out / f"{name}_seg.dcm", algorithm,
                              series_mapping=series_mapping, limits=limits)
    else:
        seg = SegOutcome(None, None, "no DICOM SEG: not asked for")
    outputs = {"nifti": nifti.name, "dicom_seg": seg.path.name if seg.path else None}
    summary = prediction_summary(prediction, provenance, model, labels, outputs, seg.note)
    path = out / f"{name}_prediction.json"
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
    return StudyOutputs(name, nifti, path, seg, summary)
