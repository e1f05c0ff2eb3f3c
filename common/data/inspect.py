"""Inspection of a site (or a data root of sites): cases, modalities, label balance, which targets the cases carry
(segmentation, label, both, neither: mixed supervision, see :mod:`common.data.dataset`) and every problem found.

Used by ``fedfusion inspect`` and by the site daemon before it starts. It reads like the dataset does (so a case
usable here is usable for training) but keeps native grids (no resampling) and never raises for bad data.
The report names local paths and series descriptions: it is for the site's own operators and is never sent to
the server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from models.config import CLASS_NAMES
from models.modalities import MODALITIES, canonical

from .dicom_reader import SeriesSummary
from .limits import DEFAULT_LIMITS, ReaderLimits
from .case_files import case_id_of
from .problems import ERROR, INFO, SEG_PROBLEM_KINDS, Problem
from .series_mapping import MappingSource, load_series_mapping
from .site import (
    bad_label_rows,
    discover_sites,
    labels_unusable,
    list_cases,
    missing_seg_problem,
    read_labels,
    scan_case,
)


@dataclass
class CaseReport:
    """One case.

    Attributes:
        case_id: folder name.
        modalities: requested modalities readable in this case (canonical order).
        label: class label from labels.csv, or ``None``.
        has_seg: a usable segmentation is present (its values fit its label convention).
        usable: the dataset would use it (a requested modality and a target: a label or a segmentation; a
            segmentation in any case if required).
        series: DICOM series and NIfTI files found.
        problems: problems of this case.
        convention: the label convention the case's segmentation is read in (``fedfusion``, ``brats2021``,
            ``brats2023``, ``brats2024-gli``, ``msd-task01``, ``dicom-seg``, ``ambiguous``; ``""``: none applies).
        convention_from: how it was chosen, a key of :data:`common.data.conventions.CHOSEN_BY` (``stated`` in
            fedfusion-site.toml, ``names`` of the files, ``default`` (no BraTS names), ``layout`` (Decathlon),
            ``segments`` (DICOM SEG segment names)).
    """

    case_id: str
    modalities: list[str]
    label: int | None
    has_seg: bool
    usable: bool
    series: list[SeriesSummary] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    convention: str = ""
    convention_from: str = ""


@dataclass
class SiteReport:
    """One site (or the held-out set, ``heldout=True``)."""

    name: str
    path: str
    heldout: bool
    cases: list[CaseReport] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)  # site-level (labels.csv)

    @property
    def usable_cases(self) -> int:
        return sum(c.usable for c in self.cases)

    def target_counts(self) -> dict[str, int]:
        """Cases (all of the site's, usable or not) carrying a ``segmentation`` (with or without a label), a
        ``label`` (with or without a segmentation), ``both``, and ``neither`` (nothing to train on)."""
        seg = [c.has_seg for c in self.cases]
        lab = [c.label is not None for c in self.cases]
        return {"segmentation": sum(seg), "label": sum(lab), "both": sum(a and b for a, b in zip(seg, lab)),
                "neither": sum(not a and not b for a, b in zip(seg, lab))}

    def label_counts(self, usable_only: bool = True) -> dict[str, int]:
        """Cases per class name (``benign``/``malignant``), plus ``unlabelled``."""
        counts = {name: 0 for name in CLASS_NAMES}
        counts["unlabelled"] = 0
        for c in self.cases:
            if usable_only and not c.usable:
                continue
            counts[CLASS_NAMES[c.label] if c.label is not None else "unlabelled"] += 1
        return counts

    def modality_counts(self, modalities: Sequence[str]) -> dict[str, int]:
        """Usable cases carrying each modality."""
        return {m: sum(1 for c in self.cases if c.usable and m in c.modalities) for m in modalities}

    def all_problems(self) -> list[Problem]:
        return [*self.problems, *(p for c in self.cases for p in c.problems)]


@dataclass
class InspectReport:
    """Result of :func:`inspect_data`: ``usable_cases == 0`` means nothing can be trained or evaluated."""

    path: str
    modalities: tuple[str, ...]
    sites: list[SiteReport] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)  # root-level (e.g. not a site)

    @property
    def usable_cases(self) -> int:
        return sum(s.usable_cases for s in self.sites)

    @property
    def ok(self) -> bool:
        return self.usable_cases > 0

    def all_problems(self) -> list[Problem]:
        return [*self.problems, *(p for s in self.sites for p in s.all_problems())]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (what ``fedfusion inspect --json`` prints)."""
        return {
            "path": self.path,
            "modalities": list(self.modalities),
            "usable_cases": self.usable_cases,
            "problems": [p.to_dict() for p in self.problems],
            "sites": [
                {
                    "name": s.name,
                    "path": s.path,
                    "heldout": s.heldout,
                    "cases_total": len(s.cases),
                    "cases_usable": s.usable_cases,
                    "label_counts": s.label_counts(),
                    "target_counts": s.target_counts(),
                    "modality_counts": s.modality_counts(self.modalities),
                    "problems": [p.to_dict() for p in s.problems],
                    "cases": [
                        {
                            "case_id": c.case_id,
                            "modalities": c.modalities,
                            "label": c.label,
                            "has_seg": c.has_seg,
                            "convention": c.convention,
                            "convention_from": c.convention_from,
                            "usable": c.usable,
                            "series": [asdict(x) for x in c.series],
                            "problems": [p.to_dict() for p in c.problems],
                        }
                        for c in s.cases
                    ],
                }
                for s in self.sites
            ],
        }


def inspect_case(
    case_dir: Path,
    label: int | None,
    modalities: Sequence[str],
    series_mapping: MappingSource = None,
    require_seg: bool = False,
    read_pixels: bool = True,
    limits: ReaderLimits = DEFAULT_LIMITS,
    labels_file: bool = True,
    label_error: bool = False,
) -> CaseReport:
    """Inspect one case folder (``read_pixels=False``: headers only, faster, misses pixel-level problems).

    Args:
        labels_file: the site has a ``labels.csv`` (without one, an unlabelled case gets no note of its own).
        label_error: the case's ``labels.csv`` row (or the file) is unusable: the dataset skips the case.
    """
    case_dir = Path(case_dir)
    scan = scan_case(case_dir, modalities, series_mapping, load_pixels=read_pixels, limits=limits)
    problems = list(scan.problems)
    present = list(scan.volumes) if read_pixels else list(scan.found)
    if not present:
        problems.append(Problem(str(case_dir), "no-images",
                                f"no readable image of {', '.join(modalities)}", ERROR, scan.case_id))
    has_seg = scan.seg is not None
    labelled = label is not None and not label_error
    if not has_seg and not any(p.kind in SEG_PROBLEM_KINDS for p in problems):
        missing = missing_seg_problem(case_dir, scan.case_id)
        if labelled and not require_seg:  # trains its classification: a note
            missing = replace(missing, severity=INFO, reason=f"{missing.reason}; the case trains its classification "
                              "only")
        problems.append(missing)
    if label_error:
        problems.append(Problem(str(case_dir), "missing-label", "its labels.csv row (or the file) is unusable; the "
                                "case is skipped until it is fixed", ERROR, scan.case_id))
    elif label is None and labels_file:
        problems.append(Problem(str(case_dir), "missing-label", "case not in labels.csv: unlabelled, trains its "
                                "segmentation only", INFO, scan.case_id))
    if not has_seg and not labelled and not label_error:
        problems.append(Problem(str(case_dir), "no-targets", "neither a segmentation nor a label in labels.csv: "
                                "nothing to train on; skipped (add either)", ERROR, scan.case_id))
    usable = bool(present) and not label_error and (has_seg or labelled) and (has_seg or not require_seg)
    return CaseReport(scan.case_id, [m for m in modalities if m in present], label, has_seg, usable, scan.series,
                      problems, scan.convention, scan.chosen_by)


def inspect_data(
    path: Path | str,
    modalities: Sequence[str] = MODALITIES,
    series_mapping: MappingSource = None,
    require_seg: bool = False,
    read_pixels: bool = True,
    progress: Callable[[str, str], None] | None = None,
    limits: ReaderLimits = DEFAULT_LIMITS,
) -> InspectReport:
    """Inspect a site folder or a data root (site-* folders and heldout/).

    Args:
        path: site folder or data root.
        modalities: modalities that count (others are listed as ``not-requested``).
        series_mapping: SeriesDescription mapping source (see :func:`load_series_mapping`).
        require_seg: a case without a segmentation is not usable (default ``False``, as in :class:`CaseDataset`: a
            labelled case without one trains its classification).
        read_pixels: decode pixels too (finds truncated files and slice gaps); ``False`` reads headers only.
        progress: called with ``(site name, case id)`` before each case.
        limits: what one file, series and case folder may cost the readers (see :mod:`common.data.limits`).

    Returns:
        The report; never raises for bad data (an invalid series mapping still raises ValueError).
    """
    mods = canonical(modalities)
    mapping = load_series_mapping(series_mapping)  # bad mapping file: the caller's error, raise it
    report = InspectReport(str(path), mods)
    try:
        sites = discover_sites(Path(path))
    except (ValueError, OSError) as exc:
        report.problems.append(Problem(str(path), "bad-labels-file", str(exc), ERROR))
        return report
    for site in sites:
        site_report = SiteReport(site.name, str(site.path), site.heldout)
        labels, label_problems = read_labels(site.path)
        site_report.problems.extend(label_problems)
        broken, bad_rows = labels_unusable(label_problems), bad_label_rows(label_problems)
        labels_file = not any(p.kind == "no-labels-file" for p in label_problems)
        try:
            case_dirs = list_cases(site.path)
        except OSError as exc:
            site_report.problems.append(Problem(str(site.path), "unreadable-file", f"cannot list: {exc}", ERROR))
            case_dirs = []
        names = {case_id_of(d) for d in case_dirs}
        for case_id in sorted(set(labels) - names):
            site_report.problems.append(Problem(str(site.path / case_id), "label-without-case",
                                                f"labels.csv lists {case_id} but there is no such folder", "warning",
                                                case_id))
        for case_dir in case_dirs:
            case_id = case_id_of(case_dir)
            if progress is not None:
                progress(site.name, case_id)
            try:
                case_report = inspect_case(case_dir, labels.get(case_id), mods, mapping, require_seg, read_pixels,
                                           limits, labels_file, broken or case_id in bad_rows)
            except Exception as exc:  # a reader bug must not hide the rest of the report
                case_report = CaseReport(case_id, [], labels.get(case_id), False, False, [], [
                    Problem(str(case_dir), "unreadable-file", f"unexpected error: {exc!r}", ERROR, case_id)])
            site_report.cases.append(case_report)
        report.sites.append(site_report)
    return report
