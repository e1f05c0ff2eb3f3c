"""One reported data problem: a file or case the readers skipped or used with a caveat.

Problems name local file paths and, for unknown series, the SeriesDescription so a site can fix its data or its
series mapping. They stay on the site: nothing here is ever put in a dataset item or sent to the server.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

#: Stable problem kinds (the ``kind`` field), so tools can filter on them.
PROBLEM_KINDS: dict[str, str] = {
    "unreadable-file": "not a readable DICOM/NIfTI file (corrupt or not DICOM)",
    "truncated-file": "file ends before its pixel data does",
    "non-image-dicom": "DICOM object without pixel data (DICOMDIR, structured report, ...)",
    "missing-slices": "gaps in slice positions within a series",
    "inconsistent-geometry": "spacing, orientation or size differs within a series",
    "unknown-series": "series description not mapped to a modality",
    "unsupported-series": "series that cannot be turned into a volume",
    "duplicate-series": "more than one series for the same modality",
    "missing-label": "case not in labels.csv (or label invalid); an unlabelled case still trains its segmentation",
    "missing-seg": "case has no segmentation (<case>_seg.nii[.gz], a DICOM SEG, or a Decathlon labelsTr file); a "
                   "labelled case still trains its classification",
    "no-targets": "case has neither a segmentation nor a label: nothing to train or evaluate on; skipped",
    "no-labels-file": "the site has no labels.csv: every case is unlabelled (segmentation only)",
    "bad-seg": "segmentation unreadable, over a reader limit, with values its label convention does not have, or a "
               "DICOM SEG that cannot be placed on its source series",
    "unknown-segment": "DICOM SEG segment whose name maps to no fedfusion sub-region; the SEG is not used",
    "ambiguous-convention": "a case's files follow more than one label convention (or a stated convention does not "
                            "fit the layout); its segmentation is not used",
    "bad-site-settings": "fedfusion-site.toml or a Decathlon dataset.json unreadable or invalid; nothing is read",
    "bad-labels-file": "labels.csv malformed, unreadable or a link out of the site (its cases are then skipped)",
    "no-images": "case has no usable image of the requested modalities",
    "label-without-case": "labels.csv names a case folder that does not exist",
    "unknown-file": "NIfTI file whose name maps to no modality",
    "bad-header-value": "a DICOM header element holds a value that cannot be parsed (the problem names it)",
    "limit-exceeded": "file, series or case folder over a reader limit (common.data.limits.ReaderLimits)",
    "unsafe-path": "symbolic link out of the site folder, folder link, or not a regular file; not read",
    "mixed-patients": "a case folder holding images of several PatientIDs (treated as one patient for privacy)",
}

#: Problems that mean "there is a segmentation, but it cannot be used" (the case is then not also "missing-seg").
SEG_PROBLEM_KINDS = frozenset({"bad-seg", "unknown-segment", "ambiguous-convention", "bad-site-settings"})

ERROR = "error"  # the file/series/case was skipped
WARNING = "warning"  # used, with a caveat (e.g. one missing slice interpolated)
INFO = "info"  # nothing wrong: a note on what is used (e.g. an unlabelled case trains its segmentation only)


@dataclass(frozen=True)
class Problem:
    """A problem found while reading a site.

    Attributes:
        path: the file or folder concerned (local path, as a string).
        kind: one of :data:`PROBLEM_KINDS`.
        reason: human-readable explanation, including what was done about it.
        severity: ``"error"`` (skipped), ``"warning"`` (used with a caveat) or ``"info"`` (a note, e.g. a case
            that trains only the target it has).
        case_id: site-local case id (folder name), ``""`` for site-level problems.
    """

    path: str
    kind: str
    reason: str
    severity: str = ERROR
    case_id: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def __str__(self) -> str:
        return f"[{self.severity}] {self.kind}: {self.path}: {self.reason}"
