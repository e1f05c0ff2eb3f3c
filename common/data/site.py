"""Sites and cases on disk (layout of docs/architecture.md) and :func:`load_case`, the one case entry point.

```
DATA/                 a data root: site-* folders and heldout/
  site-01/            a site: one folder per case (folder name = site-local case id), optionally labels.csv
    labels.csv        optional: case_id,label[,patient_id]  (0 benign / 1 malignant; patient_id optional, see below)
    fedfusion-site.toml   optional: what the site states about its data (label convention; site_settings.py)
    case-0001/        DICOM files at any depth (a DICOM SEG among them) and/or NIfTI files, <case>_seg.nii.gz
  heldout/            the server's held-out set, same layout as a site
```

A site may also be a Medical Segmentation Decathlon folder (``imagesTr/``, ``labelsTr/``, ``dataset.json``): its
cases are then the image files under ``imagesTr/`` (:mod:`common.data.msd_reader`). What a segmentation's values
mean follows the case's label convention (:mod:`common.data.conventions`).

A patient may have several studies (case folders). The site groups them by patient, its privacy unit: DICOM
studies by their PatientID (keyed-hashed in :mod:`common.data.dicom_reader`), NIfTI studies by the optional
``patient_id`` column of ``labels.csv`` (:func:`read_patient_ids`); a study with neither is its own patient.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.layout import COHORT_NAMES, LABELS_FILE
from models.config import CLASS_NAMES
from models.modalities import MODALITIES, canonical

from .case_files import MSD_IMAGES, case_id_of, is_inside, is_msd_case, list_case_files, site_of_case
from .conventions import MSD, Convention, get_convention
from .dicom_reader import DicomCase, SeriesSummary, patient_key, read_dicom_case
from .geometry import Grid, reorient_grid, resample_to_grid
from .limits import DEFAULT_LIMITS, ReaderLimits
from .msd_reader import read_msd_case
from .nifti_reader import NiftiCase, is_nifti, read_nifti_case
from .problems import ERROR, INFO, SEG_PROBLEM_KINDS, WARNING, Problem
from .series_mapping import MappingSource, load_series_mapping
from .site_settings import read_site_settings

#: ``CaseScan.convention`` of a case whose segmentation is a DICOM SEG (segments mapped by name).
DICOM_SEG_CONVENTION = "dicom-seg"

log = logging.getLogger(__name__)



class CaseError(ValueError):
    """A case that yields no usable data; ``problems`` lists why."""

    def __init__(self, message: str, problems: Sequence[Problem]) -> None:
        super().__init__(message)
        self.problems = list(problems)


# ------------------------------------------------------------------------------------------------------
# discovery
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SiteDir:
    """A site folder: ``name`` (folder name), ``path``, and whether it is the server's held-out set."""

    name: str
    path: Path
    heldout: bool = False


def _has_case_folders(path: Path) -> bool:
    for sub in path.iterdir():
        if sub.is_dir() and not sub.name.startswith("."):
            for child in sub.rglob("*"):
                if child.is_file() and not child.name.startswith("."):
                    return True
    return False



def _site_children(path: Path) -> list[Path]:
    return [
        d for d in sorted(path.iterdir())
        if d.is_dir() and not d.name.startswith(".")
        and (d.name.startswith("site") or d.name in COHORT_NAMES or (d / LABELS_FILE).is_file())
    ]


def discover_sites(path: Path) -> list[SiteDir]:
    """Sites under ``path``: ``[path]`` itself when it is a site, else its site-* / heldout children.

    Raises:
        ValueError: naming ``path`` when it is neither a site nor a folder of sites.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder; give a site folder (case folders + {LABELS_FILE}) "
                         "or a data root holding site-* folders")
    if (path / LABELS_FILE).is_file():
        return [SiteDir(path.name, path, path.name in COHORT_NAMES)]
    children = _site_children(path)
    if children:
        return [SiteDir(d.name, d, d.name in COHORT_NAMES) for d in children]
    if _has_case_folders(path):
        return [SiteDir(path.name, path, path.name in COHORT_NAMES)]
    raise ValueError(
        f"{path} holds neither case folders nor site folders; a site is a folder with {LABELS_FILE} and one "
        "folder per case, a data root holds site-* folders and heldout/"
    )


def list_cases(site_dir: Path) -> list[Path]:
    """Cases of a site, sorted by name: every non-hidden sub-folder, or, in the Decathlon layout (an ``imagesTr``
    folder), every non-hidden ``.nii[.gz]`` file under ``imagesTr/`` (case id: :func:`case_id_of`)."""
    images = Path(site_dir) / MSD_IMAGES
    if images.is_dir():
        return [p for p in sorted(images.iterdir())
                if not p.name.startswith((".", "_")) and is_nifti(p) and not p.is_dir()]
    return [d for d in sorted(Path(site_dir).iterdir()) if d.is_dir() and not d.name.startswith((".", "_"))]


def read_labels(site_dir: Path) -> tuple[dict[str, int], list[Problem]]:
    """Read ``labels.csv`` (columns ``case_id,label``; label 0/1 or ``benign``/``malignant``).

    The file is optional: a site without it (a public segmentation data set) has only unlabelled cases, which train
    their segmentation (docs/site.md, "What a site folder may hold").

    Returns:
        ``(labels, problems)``; a missing file gives an empty dict and a ``no-labels-file`` note (severity
        ``info``); a malformed or unsafe one an empty dict and a ``bad-labels-file`` error (:func:`labels_unusable`:
        its cases are not trained, rather than silently trained as unlabelled); a bad row a ``missing-label``
        error for that case.
    """
    path = Path(site_dir) / LABELS_FILE
    problems: list[Problem] = []
    labels: dict[str, int] = {}
    if not os.path.lexists(path):
        return labels, [Problem(str(path), "no-labels-file",
                                f"no {LABELS_FILE}: every case is unlabelled and trains its segmentation only; write "
                                "one with a header line 'case_id,label' to train classification too", INFO)]
    if not path.is_file():
        return labels, [Problem(str(path), "bad-labels-file",
                                f"{LABELS_FILE} is not a regular file (or a dangling link); replace it with a CSV "
                                "file with a header line 'case_id,label'", ERROR)]
    target = os.path.realpath(path)
    if not is_inside(target, os.path.realpath(site_dir)):
        return labels, [Problem(str(path), "unsafe-path",
                                f"{LABELS_FILE} is a link to {target}, outside the site folder; not read", ERROR)]
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip().lower() for f in (reader.fieldnames or [])]
            if "case_id" not in fields or "label" not in fields:
                return labels, [Problem(str(path), "bad-labels-file",
                                        f"header is {reader.fieldnames}; expected columns 'case_id,label'", ERROR)]
            for n, row in enumerate(reader, start=2):
                row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
                case_id, raw = row.get("case_id", ""), row.get("label", "").lower()
                if not case_id:
                    continue
                if raw in CLASS_NAMES:
                    value = CLASS_NAMES.index(raw)
                else:
                    try:
                        value = int(float(raw))
                    except ValueError:
                        value = -1
                if value not in range(len(CLASS_NAMES)):
                    problems.append(Problem(str(path), "missing-label",
                                            f"line {n}: label {raw!r} for {case_id} is not one of 0..."
                                            f"{len(CLASS_NAMES) - 1} or {'/'.join(CLASS_NAMES)}", ERROR, case_id))
                    continue
                labels[case_id] = value
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return {}, [Problem(str(path), "bad-labels-file", f"cannot read: {exc}", ERROR)]
    return labels, problems


def labels_unusable(problems: Sequence[Problem]) -> bool:
    """Whether :func:`read_labels`' ``problems`` say ``labels.csv`` exists but cannot be used (then no case of the
    site is trained: a broken file must not turn labelled cases into unlabelled ones unnoticed)."""
    return any(p.kind in ("bad-labels-file", "unsafe-path") and p.severity == ERROR and not p.case_id
               for p in problems)


def bad_label_rows(problems: Sequence[Problem]) -> set[str]:
    """Case ids whose ``labels.csv`` row holds an invalid label (not trained: the row says the case is labelled)."""
    return {p.case_id for p in problems if p.kind == "missing-label" and p.case_id}


#: Optional ``labels.csv`` column naming each study's patient (NIfTI sites: they have no DICOM PatientID).
PATIENT_COLUMN = "patient_id"


def read_patient_ids(site_dir: Path, salt: bytes = b"") -> dict[str, str]:
    """``{case_id: patient key}`` from the optional ``patient_id`` column of ``labels.csv``.

    Values are keyed-hashed with ``salt`` (:func:`common.data.dicom_reader.patient_key`) as soon as they are read,
    like DICOM PatientIDs. Cases with an empty cell, and every case when the column (or the file) is missing, are
    left out; problems with the file itself are reported by :func:`read_labels`.
    """
    path = Path(site_dir) / LABELS_FILE
    out: dict[str, str] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if PATIENT_COLUMN not in [f.strip().lower() for f in (reader.fieldnames or [])]:
                return out
            for row in reader:
                row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
                key = patient_key(row.get(PATIENT_COLUMN, ""), salt)
                if row.get("case_id") and key:
                    out[row["case_id"]] = key
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}
    return out


# ------------------------------------------------------------------------------------------------------
# one case
# ------------------------------------------------------------------------------------------------------
@dataclass
class CaseScan:
    """Everything found in one case folder, on native grids (no resampling).

    ``volumes[m] = (vol (D, H, W) float32, RAS affine)``; ``seg = (labels uint8 (D, H, W), affine)`` or ``None``;
    ``series``: DICOM series summaries and NIfTI files (as summaries with modality_tag ``NIfTI``).
    ``convention``: the label convention the segmentation was read in (a name of
    :data:`common.data.conventions.CONVENTIONS`, :data:`DICOM_SEG_CONVENTION`, ``ambiguous``, or ``""`` when the
    case has no NIfTI file and no SEG); ``chosen_by``: how (a key of :data:`common.data.conventions.CHOSEN_BY`).
    """

    case_id: str
    volumes: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    seg: tuple[np.ndarray, np.ndarray] | None = None
    series: list[SeriesSummary] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    found: list[str] = field(default_factory=list)  # modalities with a series/file, read or not
    patients: frozenset[str] = frozenset()  # keyed DICOM PatientIDs of the case's images
    convention: str = ""
    chosen_by: str = ""


@dataclass
class CaseData:
    """A case on one reference grid.

    Attributes:
        case_id: site-local case id (the folder name).
        images: ``{modality: (D, H, W) float32}`` for the modalities present, all on ``grid``.
        seg: ``(D, H, W)`` uint8 labels 0..3 on ``grid``, or ``None`` when the case has no segmentation.
        grid: reference grid (the segmentation's, else the first present modality's), reoriented to
            :data:`common.data.geometry.CANONICAL_AXCODES` so ``images[m][k]`` is an axial slice.
        problems: everything reported while reading.
        patients: keyed DICOM PatientIDs of the case's images (empty for NIfTI or without PatientID).
        native: ``{modality: Grid}``, each present modality's own grid as read (before resampling), so a result on
            ``grid`` can be mapped back onto a source series (``fedfusion predict``).
    """

    case_id: str
    images: dict[str, np.ndarray]
    seg: np.ndarray | None
    grid: Grid
    problems: list[Problem]
    patients: frozenset[str] = frozenset()
    native: dict[str, Grid] = field(default_factory=dict)


def scan_case(
    case_dir: Path,
    modalities: Sequence[str] = MODALITIES,
    series_mapping: MappingSource = None,
    load_pixels: bool = True,
    limits: ReaderLimits = DEFAULT_LIMITS,
    convention: str | Convention | None = None,
    patient_salt: bytes = b"",
) -> CaseScan:
    """Read a case (folder, or Decathlon image file) with DICOM and/or NIfTI data without resampling; never raises
    for bad data.

    The folder is listed once (bounded, no links out of the site folder: :func:`list_case_files`) and every file
    is checked against ``limits`` before it is read.

    Args:
        convention: the label convention to read the case in; ``None`` (default): the one its site states in
            ``fedfusion-site.toml`` (:mod:`common.data.site_settings`), else the one its file names follow.
        patient_salt: keys the DICOM PatientIDs (:func:`common.data.dicom_reader.patient_key`).
    """
    case_dir = Path(case_dir)
    case_id = case_id_of(case_dir)
    mods = canonical(modalities)
    mapping = load_series_mapping(series_mapping)
    scan = CaseScan(case_id)
    try:
        stated = (get_convention(convention) if isinstance(convention, str) else convention) \
            if convention is not None else read_site_settings(site_of_case(case_dir)).convention
    except ValueError as exc:
        scan.problems.append(Problem(str(case_dir), "bad-site-settings", f"{exc}; case not read", ERROR, case_id))
        return scan
    msd = is_msd_case(case_dir)
    if stated is not None and (stated.layout == MSD) != msd:
        scan.problems.append(Problem(
            str(case_dir), "ambiguous-convention",
            f"the site states the {stated.title} convention, but this case is "
            f"{'a Decathlon image file' if msd else 'a case folder'}; case not read. State a convention of the "
            "site's layout", ERROR, case_id))
        return scan
    try:
        listing = list_case_files(case_dir, limits, case_id=case_id)
        if msd:
            nifti = read_msd_case(case_dir, mods, case_id, load_pixels, limits, listing.files)
            dicom = None
        else:
            nifti = read_nifti_case(case_dir, mods, case_id, load_pixels, limits, listing.top_level(), stated)
            dicom = read_dicom_case(case_dir, mapping, mods, case_id, load_pixels, limits, listing.files,
                                    patient_salt)
    except OSError as exc:  # folder vanished or unreadable
        scan.problems.append(Problem(str(case_dir), "unreadable-file", f"cannot read case folder: {exc}", ERROR,
                                     case_id))
        return scan
    scan.problems = [*listing.problems, *nifti.problems, *(dicom.problems if dicom else [])]
    scan.patients = dicom.patients if dicom else frozenset()
    scan.series = [*(dicom.series if dicom else []),
                   *(SeriesSummary(f.path.name, "", "NIfTI", f.tag, 1, "used" if f.tag else "unknown")
                     for f in nifti.files)]
    scan.found = [m for m in mods if any(s.modality == m and s.status in ("used", "failed") for s in scan.series)]
    _merge_dicom(scan, nifti, dicom, case_dir)
    return scan


def _merge_dicom(scan: CaseScan, nifti: NiftiCase, dicom: DicomCase | None, case_dir: Path) -> None:
    """Fill ``scan``'s volumes, segmentation and convention; an explicitly named NIfTI file wins over a DICOM
    series (or SEG) giving the same thing."""
    volumes = dict(nifti.volumes)
    seg, convention, chosen_by = nifti.seg, nifti.convention, nifti.chosen_by
    dicom_volumes = dicom.volumes if dicom is not None else {}
    dicom_seg = dicom.seg if dicom is not None else None
    for m, vol in dicom_volumes.items():
        if m in volumes:
            scan.problems.append(Problem(str(case_dir), "duplicate-series",
                                         f"{m} given both as NIfTI and DICOM; the NIfTI file is used", WARNING,
                                         scan.case_id))
        else:
            volumes[m] = vol
    if dicom_seg is not None:
        if seg is not None:
            scan.problems.append(Problem(str(case_dir), "duplicate-series", "segmentation given both as NIfTI and "
                                         "DICOM SEG; the NIfTI file is used", WARNING, scan.case_id))
        else:
            seg, convention, chosen_by = dicom_seg, DICOM_SEG_CONVENTION, "segments"
    scan.volumes = {m: volumes[m] for m in MODALITIES if m in volumes}
    scan.seg = seg
    scan.convention, scan.chosen_by = convention, chosen_by


def missing_seg_problem(case_dir: Path, case_id: str) -> Problem:
    """The ``missing-seg`` problem of a case without any segmentation."""
    return Problem(str(case_dir), "missing-seg", f"no segmentation: neither {case_id}_seg.nii.gz nor a DICOM SEG in "
                   "the case folder (nor a labelsTr file in the Decathlon layout)", ERROR, case_id)


def load_case(
    case_dir: Path,
    modalities: Sequence[str] = MODALITIES,
    series_mapping: MappingSource = None,
    require_seg: bool = False,
    limits: ReaderLimits = DEFAULT_LIMITS,
    convention: str | Convention | None = None,
    patient_salt: bytes = b"",
) -> CaseData:
    """Read one case and resample every present modality (trilinear) and the segmentation (nearest) onto the
    reference grid: the segmentation's grid when present, else the first present modality's (canonical order),
    reoriented slice-first (see :data:`common.data.geometry.CANONICAL_AXCODES`).

    ``limits`` bounds what each file, series and the case folder may cost (see :mod:`common.data.limits`);
    ``convention`` overrides the site's label convention (see :func:`scan_case`); ``patient_salt`` keys the DICOM
    PatientIDs (:func:`common.data.dicom_reader.patient_key`).

    Raises:
        CaseError: when none of ``modalities`` could be read (or, with ``require_seg``, there is no usable
            segmentation); its ``problems`` say why.
    """
    scan = scan_case(case_dir, modalities, series_mapping, limits=limits, convention=convention,
                     patient_salt=patient_salt)
    problems = list(scan.problems)
    if not scan.volumes:
        problems.append(Problem(str(case_dir), "no-images",
                                f"no readable image of {', '.join(canonical(modalities))}", ERROR, scan.case_id))
        raise CaseError(f"{case_dir}: no readable image of the requested modalities", problems)
    if scan.seg is None:
        if not any(p.kind in SEG_PROBLEM_KINDS for p in problems):
            problems.append(missing_seg_problem(case_dir, scan.case_id))
        if require_seg:
            raise CaseError(f"{case_dir}: no usable segmentation", problems)
    if scan.seg is not None:
        ref_shape, ref_affine = scan.seg[0].shape, scan.seg[1]
    else:
        first = next(iter(scan.volumes.values()))
        ref_shape, ref_affine = first[0].shape, first[1]
    grid = reorient_grid(Grid((int(ref_shape[0]), int(ref_shape[1]), int(ref_shape[2])), ref_affine))
    images = {m: resample_to_grid(vol, affine, grid, order=1) for m, (vol, affine) in scan.volumes.items()}
    seg = resample_to_grid(scan.seg[0], scan.seg[1], grid, order=0) if scan.seg is not None else None
    native = {m: Grid((int(v.shape[0]), int(v.shape[1]), int(v.shape[2])), affine)
              for m, (v, affine) in scan.volumes.items()}
    return CaseData(scan.case_id, images, seg, grid, problems, scan.patients, native)
