"""Predicting a list of studies, each on its own: a study that cannot be read or fails is reported, the others are
still predicted. ``fedfusion predict`` (with a progress bar) and a fedfusion MONAI bundle's evaluator
(:mod:`common.bundle_workflow`) both run their studies through :func:`predict_studies`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from common.data.limits import DEFAULT_LIMITS, ReaderLimits
from common.data.problems import ERROR
from common.data.series_mapping import MappingSource
from common.data.site import CaseError
from common.predict import Inferer, predict_study
from common.prediction_files import StudyOutputs, write_study_outputs
from common.provenance import ModelProvenance
from models.atomic import atomic_write_text

__all__ = ["BATCH_SUMMARY", "StudyResult", "predict_studies", "write_batch_summary"]

log = logging.getLogger(__name__)

#: The batch summary written next to the per-study folders.
BATCH_SUMMARY = "predictions.json"


@dataclass
class StudyResult:
    """One study of a batch: ``outputs`` when predicted, else ``error`` (and the readers' ``problems``)."""

    study: str
    out_dir: Path
    outputs: StudyOutputs | None = None
    error: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.outputs is not None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able line of the batch summary."""
        if self.outputs is None:
            return {"study": self.study, "status": "failed", "error": self.error, "problems": self.problems}
        s = self.outputs.summary
        return {"study": self.study, "status": "predicted", "folder": str(self.out_dir),
                "malignancy_probability": s["malignancy_probability"], "decision": s["decision"],
                "modalities_used": s["modalities_used"],
                "files": [p.name for p in (self.outputs.nifti, self.outputs.json, self.outputs.seg.path) if p]}


def predict_studies(
    network: nn.Module,
    targets: Sequence[tuple[Path, Path]],
    provenance: ModelProvenance,
    *,
    inferer: Inferer | None = None,
    series_mapping: MappingSource = None,
    dicom_seg: bool = True,
    limits: ReaderLimits = DEFAULT_LIMITS,
    before: Callable[[Path], None] | None = None,
    after: Callable[[StudyResult], None] | None = None,
) -> list[StudyResult]:
    """Predict every ``(study folder, output folder)`` of ``targets`` and write its files
    (:func:`common.prediction_files.write_study_outputs`).

    Args:
        network: the FusionNet, in eval mode (``network.config`` is its model config).
        targets: studies and where each one's files go.
        provenance: the checkpoint's (threshold, expected metrics, identity).
        inferer, series_mapping, limits: as :func:`common.predict.predict_study`.
        dicom_seg: write a DICOM SEG for studies with DICOM input.
        before, after: called with each study folder before it is read, and with its result (progress, printing).

    Returns:
        One result per target, in order; a failed study has ``error`` set, never raises for one.
    """
    results = []
    for study_dir, out_dir in targets:
        if before is not None:
            before(study_dir)
        result = StudyResult(study_dir.name, out_dir)
        try:
            prediction = predict_study(network, study_dir, series_mapping=series_mapping, limits=limits,
                                       inferer=inferer)
            result.outputs = write_study_outputs(prediction, study_dir, out_dir, provenance, network.config,
                                                 dicom_seg=dicom_seg, series_mapping=series_mapping, limits=limits)
        except CaseError as exc:
            result.problems = [str(p) for p in exc.problems if p.severity == ERROR]
            result.error = f"cannot be read: {exc}"
        except (ValueError, OSError) as exc:  # e.g. a SEG the study's headers cannot carry, a full disk
            result.error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # an unforeseen failure costs this study only (with its traceback in the log)
            log.exception("study %s failed", study_dir)
            result.error = f"{type(exc).__name__}: {exc}"
        results.append(result)
        if after is not None:
            after(result)
    return results


def write_batch_summary(results: Sequence[StudyResult], path: str | os.PathLike[str], model: str) -> None:
    """Write ``{"model", "studies": [StudyResult.to_dict(), ...]}`` to ``path`` (atomically; folder created)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"model": model, "studies": [r.to_dict() for r in results]}, indent=2) + "\n")
