"""The objects a fedfusion MONAI bundle's ``configs/inference.json`` builds (``fedfusion export --format
monai-bundle``): MONAI's ``ConfigParser`` instantiates them by their dotted names, so their names and arguments are
part of every exported bundle.

- :func:`study_folders`: the bundle's ``dataset``: the study folders under ``dataset_dir`` (or that folder itself
  when it is one study);
- :func:`bundle_provenance`: the model's provenance as the export stored it in ``configs/metadata.json``;
- :class:`StudyEvaluator`: the bundle's ``evaluator``: ``run()`` predicts every study exactly as ``fedfusion
  predict --studies`` does (:func:`common.predict_batch.predict_studies`) and writes the same files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from common.data.site import list_cases
from common.predict import Inferer
from common.predict_batch import BATCH_SUMMARY, StudyResult, predict_studies, write_batch_summary
from common.provenance import ModelProvenance

__all__ = ["METADATA_KEY", "StudyEvaluator", "bundle_provenance", "study_folders"]

#: The key of fedfusion's own entries in a bundle's metadata.json.
METADATA_KEY = "fedfusion"


def study_folders(dataset_dir: str | os.PathLike[str]) -> list[Path]:
    """The studies of ``dataset_dir``: its sub-folders (a folder of studies) or, when it has none, the folder itself.

    Raises:
        ValueError: ``dataset_dir`` is not a folder (e.g. the bundle was run without ``--dataset_dir``).
    """
    root = Path(dataset_dir)
    if not str(dataset_dir).strip() or not root.is_dir():
        raise ValueError(f"dataset_dir {str(dataset_dir)!r} is not a folder; run the bundle with --dataset_dir "
                         "<a study folder or a folder of study folders>")
    return list_cases(root) or [root]


def bundle_provenance(bundle_root: str | os.PathLike[str]) -> ModelProvenance:
    """The provenance stored in ``<bundle_root>/configs/metadata.json`` under :data:`METADATA_KEY`.

    Read here with ``json`` rather than referenced through the config parser, which would evaluate any of its
    strings that start with ``$`` or ``@``.

    Raises:
        ValueError: the metadata holds no fedfusion provenance (not a fedfusion bundle).
    """
    path = Path(bundle_root) / "configs" / "metadata.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    entry = meta.get(METADATA_KEY, {}) if isinstance(meta, dict) else {}
    if "provenance" not in entry:
        raise ValueError(f"{path} holds no '{METADATA_KEY}' provenance; is this a bundle fedfusion exported?")
    return ModelProvenance.from_dict(entry["provenance"])


class StudyEvaluator:
    """Predicts a bundle's studies and writes ``fedfusion predict``'s files under ``output_dir/<study>/``.

    Args:
        network: the bundle's network (weights loaded, on its device).
        dataset: study folders (:func:`study_folders`).
        output_dir: where the per-study folders and the batch summary go.
        provenance: :func:`bundle_provenance`.
        inferer: e.g. MONAI ``SimpleInferer`` (called as ``inferer(image, network, mask)``).
        dicom_seg: write a DICOM SEG for studies with DICOM input.
    """

    def __init__(self, network: nn.Module, dataset: Sequence[str | os.PathLike[str]], output_dir: str | os.PathLike[str],
                 provenance: ModelProvenance, inferer: Inferer | None = None, dicom_seg: bool = True) -> None:
        self.network = network
        self.dataset = [Path(d) for d in dataset]
        self.output_dir = Path(output_dir)
        self.provenance = provenance
        self.inferer = inferer
        self.dicom_seg = dicom_seg

    def run(self) -> list[StudyResult]:
        """Predict every study; write ``output_dir/predictions.json``.

        Raises:
            RuntimeError: no study could be predicted (the summary says why for each).
        """
        self.network.eval()
        targets = [(d, self.output_dir / d.name) for d in self.dataset]
        results = predict_studies(self.network, targets, self.provenance, inferer=self.inferer,
                                  dicom_seg=self.dicom_seg)
        write_batch_summary(results, self.output_dir / BATCH_SUMMARY, f"bundle ({self.provenance.sha256[:12]})")
        if targets and not any(r.ok for r in results):
            raise RuntimeError(f"no study could be predicted; see {self.output_dir / BATCH_SUMMARY}: "
                               + "; ".join(f"{r.study}: {r.error}" for r in results[:5]))
        return results
