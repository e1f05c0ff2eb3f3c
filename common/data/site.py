"""Sites and cases on disk (layout of docs/architecture.md) and :func:`load_case`, the one case entry point.

```
DATA/                 a data root: site-* folders and heldout/
  site-01/            a site: labels.csv + one folder per case (folder name = site-local case id)
    labels.csv        case_id,label  (0 benign / 1 malignant)
    case-0001/        DICOM files at any depth and/or BraTS NIfTI files, <case>_seg.nii.gz
  heldout/            the server's held-out set, same layout as a site
```
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.layout import HELDOUT_NAME, LABELS_FILE
from models.config import CLASS_NAMES
from models.modalities import MODALITIES, canonical

from .case_files import is_inside, list_case_files
from .dicom_reader import SeriesSummary, read_dicom_case
from .geometry import Grid, reorient_grid, resample_to_grid
from .limits import DEFAULT_LIMITS, ReaderLimits
from .nifti_reader import read_nifti_case
from .problems import ERROR, WARNING, Problem
from .series_mapping import MappingSource, load_series_mapping

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
        and (d.name.startswith("site") or d.name == HELDOUT_NAME or (d / LABELS_FILE).is_file())
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
        return [SiteDir(path.name, path, path.name == HELDOUT_NAME)]
    children = _site_children(path)
    if children:
        return [SiteDir(d.name, d, d.name == HELDOUT_NAME) for d in children]
    if _has_case_folders(path):
        return [SiteDir(path.name, path, path.name == HELDOUT_NAME)]
    raise ValueError(
        f"{path} holds neither case folders nor site folders; a site is a folder with {LABELS_FILE} and one "
        "folder per case, a data root holds site-* folders and heldout/"
    )


def list_cases(site_dir: Path) -> list[Path]:
    """Case folders of a site (every non-hidden sub-folder), sorted by name."""
    return [d for d in sorted(Path(site_dir).iterdir()) if d.is_dir() and not d.name.startswith((".", "_"))]


def read_labels(site_dir: Path) -> tuple[dict[str, int], list[Problem]]:
    """Read ``labels.csv`` (columns ``case_id,label``; label 0/1 or ``benign``/``malignant``).

    Returns:
        ``(labels, problems)``; a missing or malformed file gives an empty dict and a ``bad-labels-file``
        problem, a bad row a ``missing-label`` problem for that case.
    """
    path = Path(site_dir) / LABELS_FILE
    problems: list[Problem] = []
    labels: dict[str, int] = {}
    if not path.is_file():
        return labels, [Problem(str(path), "bad-labels-file",
                                f"no {LABELS_FILE}; write one with a header line 'case_id,label'", ERROR)]
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


# ------------------------------------------------------------------------------------------------------
# one case
# ------------------------------------------------------------------------------------------------------
@dataclass
class CaseScan:
    """Everything found in one case folder, on native grids (no resampling).

    ``volumes[m] = (vol (D, H, W) float32, RAS affine)``; ``seg = (labels uint8 (D, H, W), affine)`` or ``None``;
    ``series``: DICOM series summaries and NIfTI files (as summaries with modality_tag ``NIfTI``).
    """

    case_id: str
    volumes: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    seg: tuple[np.ndarray, np.ndarray] | None = None
    series: list[SeriesSummary] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    found: list[str] = field(default_factory=list)  # modalities with a series/file, read or not


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
        native: ``{modality: Grid}``, each present modality's own grid as read (before resampling), so a result on
            ``grid`` can be mapped back onto a source series (``fedfusion predict``).
    """

    case_id: str
    images: dict[str, np.ndarray]
    seg: np.ndarray | None
    grid: Grid
    problems: list[Problem]
    native: dict[str, Grid] = field(default_factory=dict)


def scan_case(
    case_dir: Path,
    modalities: Sequence[str] = MODALITIES,
    series_mapping: MappingSource = None,
    load_pixels: bool = True,
    limits: ReaderLimits = DEFAULT_LIMITS,
) -> CaseScan:
    """Read a case folder (DICOM and/or NIfTI) without resampling; never raises for bad data.

    The folder is listed once (bounded, no links out of the site folder: :func:`list_case_files`) and every file
    is checked against ``limits`` before it is read.
    """
    case_dir = Path(case_dir)
    case_id = case_dir.name
    mods = canonical(modalities)
    mapping = load_series_mapping(series_mapping)
    scan = CaseScan(case_id)
    try:
        listing = list_case_files(case_dir, limits, case_id=case_id)
        nifti_vols, seg, nifti_files, nifti_problems = read_nifti_case(case_dir, mods, case_id, load_pixels, limits,
                                                                       listing.top_level())
        dicom_vols, summaries, dicom_problems = read_dicom_case(case_dir, mapping, mods, case_id, load_pixels, limits,
                                                                listing.files)
    except OSError as exc:  # folder vanished or unreadable
        scan.problems.append(Problem(str(case_dir), "unreadable-file", f"cannot read case folder: {exc}", ERROR,
                                     case_id))
        return scan
    scan.problems = [*listing.problems, *nifti_problems, *dicom_problems]
    scan.series = [*summaries, *(SeriesSummary(f.path.name, "", "NIfTI", f.tag, 1, "used" if f.tag else "unknown")
                                 for f in nifti_files)]
    scan.found = [m for m in mods if any(s.modality == m and s.status in ("used", "failed") for s in scan.series)]
    # An explicitly named NIfTI file wins over a DICOM series of the same modality.
    for m, vol in dicom_vols.items():
        if m in nifti_vols:
            scan.problems.append(Problem(str(case_dir), "duplicate-series",
                                         f"{m} given both as NIfTI and DICOM; the NIfTI file is used", WARNING, case_id))
        else:
            nifti_vols[m] = vol
    scan.volumes = {m: nifti_vols[m] for m in mods if m in nifti_vols}
    scan.seg = seg
    return scan


def load_case(
    case_dir: Path,
    modalities: Sequence[str] = MODALITIES,
    series_mapping: MappingSource = None,
    require_seg: bool = False,
    limits: ReaderLimits = DEFAULT_LIMITS,
) -> CaseData:
    """Read one case and resample every present modality (trilinear) and the segmentation (nearest) onto the
    reference grid: the segmentation's grid when present, else the first present modality's (canonical order),
    reoriented slice-first (see :data:`common.data.geometry.CANONICAL_AXCODES`).

    ``limits`` bounds what each file, series and the case folder may cost (see :mod:`common.data.limits`).

    Raises:
        CaseError: when none of ``modalities`` could be read (or, with ``require_seg``, there is no usable
            segmentation); its ``problems`` say why.
    """
    scan = scan_case(case_dir, modalities, series_mapping, limits=limits)
    problems = list(scan.problems)
    if not scan.volumes:
        problems.append(Problem(str(case_dir), "no-images",
                                f"no readable image of {', '.join(canonical(modalities))}", ERROR, scan.case_id))
        raise CaseError(f"{case_dir}: no readable image of the requested modalities", problems)
    if scan.seg is None:
        if not any(p.kind == "bad-seg" for p in problems):
            problems.append(Problem(str(case_dir), "missing-seg",
                                    f"no {scan.case_id}_seg.nii.gz in the case folder", ERROR, scan.case_id))
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
    return CaseData(scan.case_id, images, seg, grid, problems, native)
