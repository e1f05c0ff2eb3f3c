"""NIfTI reader for case folders: ``<case>/<case>_<modality>.nii[.gz]`` plus a ``<case>_seg.nii[.gz]``.

Which names give which modality, and what the segmentation's values mean, is the case's label convention
(:mod:`common.data.conventions`): stated by the site (``fedfusion-site.toml``), else recognised from the file names
(BraTS 2017-2021 ``BraTS2021_00000_t1ce.nii.gz``, BraTS 2023 ``BraTS-GLI-00000-000-t2f.nii.gz``, otherwise
fedfusion's own names ``t1 t1ce t2 flair ct us seg`` with the aliases ``t1n t1c t1gd t2w t2f``). The segmentation is
returned in fedfusion's sub-regions (0 background, 1 oedema, 2 non-enhancing core, 3 enhancing). A case whose files
follow two conventions, or whose segmentation holds a value its convention does not have, is reported and its
segmentation is not used. Only files directly in the case folder are read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.layout import SITE_SETTINGS_FILE
from models.modalities import MODALITIES

from .case_files import list_case_files
from .conventions import CHOSEN_BY, DEFAULT_CONVENTION, SEG_TAG, Convention, recognise
from .geometry import load_nifti
from .limits import DEFAULT_LIMITS, LimitExceeded, ReaderLimits
from .problems import ERROR, WARNING, Problem

#: File tag -> fedfusion modality (or ``seg``) for names in fedfusion's convention (aliases included).
NIFTI_TAGS: dict[str, str] = dict(DEFAULT_CONVENTION.tags)
#: ``convention`` reported for a case whose files follow more than one convention.
AMBIGUOUS = "ambiguous"


@dataclass(frozen=True)
class NiftiFile:
    """One NIfTI file of a case: ``tag`` is a modality, ``seg``, or ``None`` (name maps to nothing)."""

    path: Path
    tag: str | None


@dataclass
class NiftiCase:
    """What :func:`read_nifti_case` found, on native grids.

    Attributes:
        volumes: ``{modality: (vol float32, RAS affine)}`` for the requested modalities found.
        seg: ``(labels uint8 in fedfusion's sub-regions, affine)`` or ``None``.
        files: every NIfTI file seen, with the modality/seg its name gives.
        problems: unreadable files, unknown names, bad or ambiguous segmentations, duplicates.
        convention: name of the convention the case is read in (``""`` without NIfTI files, :data:`AMBIGUOUS`).
        chosen_by: how it was chosen (a key of :data:`common.data.conventions.CHOSEN_BY`).
    """

    volumes: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    seg: tuple[np.ndarray, np.ndarray] | None = None
    files: list[NiftiFile] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    convention: str = ""
    chosen_by: str = ""


def is_nifti(path: Path) -> bool:
    low = path.name.lower()
    return low.endswith(".nii") or low.endswith(".nii.gz")


def find_nifti_files(
    case_dir: Path, files: Sequence[Path] | None = None, convention: Convention = DEFAULT_CONVENTION
) -> list[NiftiFile]:
    """NIfTI files directly in ``case_dir`` with the modality/seg each name maps to in ``convention``.

    Args:
        files: the case's top-level files from :meth:`common.data.case_files.CaseFiles.top_level`; ``None`` lists
            the folder here (links out of the site and non-regular files are left out; :func:`read_nifti_case`
            reports them).
    """
    if files is None:
        files = list_case_files(Path(case_dir)).top_level()
    return [NiftiFile(path, convention.tag_of(path.name))
            for path in sorted(files) if not path.name.startswith(".") and is_nifti(path)]


def read_seg(
    path: Path, limits: ReaderLimits = DEFAULT_LIMITS, convention: Convention = DEFAULT_CONVENTION, chosen_by: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Read a segmentation as ``(labels (D, H, W) uint8 in fedfusion's sub-regions, RAS affine)``.

    Args:
        convention: what the file's values mean (see :mod:`common.data.conventions`).
        chosen_by: how the convention was chosen (a :data:`common.data.conventions.CHOSEN_BY` text), for messages.

    Raises:
        LimitExceeded: (a ValueError) when the file is over ``limits``.
        ValueError: (message naming the file) when unreadable, not integer-valued, or holding values the convention
            does not have (:class:`common.data.conventions.ConventionError`).
    """
    data, affine = load_nifti(path, limits)
    return convention.map_labels(data, str(path), chosen_by), affine


def _case_convention(
    nifti_paths: Sequence[Path], stated: Convention | None, case_dir: Path, case_id: str
) -> tuple[Convention, str, Problem | None]:
    """``(convention, chosen-by key, problem)`` for a case's NIfTI files: the stated one, else the one their names
    follow; a problem (and fedfusion's names for the modalities) when the names follow several."""
    if stated is not None:
        return stated, "stated", None
    found = recognise([p.name for p in nifti_paths])
    if len(found) > 1:
        by_file = "; ".join(f"{p.name}: {', '.join(c.name for c in recognise([p.name]))}" for p in nifti_paths
                            if recognise([p.name]))
        return DEFAULT_CONVENTION, "", Problem(
            str(case_dir), "ambiguous-convention",
            f"the case's files follow several label conventions ({', '.join(c.name for c in found)}: {by_file}); "
            "its segmentation is not used. Name all files of the case in one convention, or state the site's "
            f"convention in its {SITE_SETTINGS_FILE}", ERROR, case_id)
    if found and found[0] is not DEFAULT_CONVENTION:
        return found[0], "names", None
    return DEFAULT_CONVENTION, "default", None


def read_nifti_case(
    case_dir: Path,
    modalities: Sequence[str] = MODALITIES,
    case_id: str = "",
    load_pixels: bool = True,
    limits: ReaderLimits = DEFAULT_LIMITS,
    files: Sequence[Path] | None = None,
    convention: Convention | None = None,
) -> NiftiCase:
    """Read a case folder's NIfTI images and segmentation on their native grids.

    Each file is read on its own: one unreadable, hostile or oversized file (see :mod:`common.data.limits`) is a
    problem for that file only.

    Args:
        files: the case's top-level files from :meth:`common.data.case_files.CaseFiles.top_level` (their listing
            problems are then the caller's to report); ``None`` lists the folder here.
        convention: the convention the site states (``None``: recognised from the file names).

    Returns:
        A :class:`NiftiCase`; its segmentation is in fedfusion's sub-regions.
    """
    out = NiftiCase()
    if files is None:
        listing = list_case_files(Path(case_dir), limits, case_id=case_id)
        out.problems.extend(listing.problems)
        files = listing.top_level()
    paths = [p for p in sorted(files) if not p.name.startswith(".") and is_nifti(p)]
    if not paths:
        return out
    applied, chosen_by, ambiguity = _case_convention(paths, convention, Path(case_dir), case_id)
    out.convention, out.chosen_by = (AMBIGUOUS, "") if ambiguity else (applied.name, chosen_by)
    if ambiguity is not None:
        out.problems.append(ambiguity)
    out.files = find_nifti_files(case_dir, paths, applied)
    seen: set[str] = set()
    for f in out.files:
        if f.tag is None:
            out.problems.append(Problem(
                str(f.path), "unknown-file",
                f"NIfTI name does not end in <case>_<tag>.nii[.gz] with a tag of the {applied.title} convention "
                f"({', '.join(applied.tags)}); ignored", WARNING, case_id))
            continue
        if f.tag in seen:
            out.problems.append(Problem(str(f.path), "duplicate-series", f"another file already gives {f.tag}; "
                                        "ignored", WARNING, case_id))
            continue
        seen.add(f.tag)
        if f.tag == SEG_TAG and ambiguity is not None:
            continue
        if f.tag != SEG_TAG and (f.tag not in modalities or not load_pixels):
            continue
        try:
            if f.tag == SEG_TAG:
                out.seg = read_seg(f.path, limits, applied, CHOSEN_BY.get(chosen_by, ""))
            else:
                data, affine = load_nifti(f.path, limits)
                out.volumes[f.tag] = (np.asarray(data, dtype=np.float32), affine)
        except LimitExceeded as exc:
            # A segmentation keeps its kind (bad-seg) so the case is not also reported as having none.
            kind = "bad-seg" if f.tag == SEG_TAG else "limit-exceeded"
            out.problems.append(Problem(str(f.path), kind, f"{exc}; file skipped", ERROR, case_id))
        except ValueError as exc:
            kind = "bad-seg" if f.tag == SEG_TAG else "unreadable-file"
            out.problems.append(Problem(str(f.path), kind, str(exc), ERROR, case_id))
        except Exception as exc:  # e.g. a data type that is not a number: this file's problem only
            kind = "bad-seg" if f.tag == SEG_TAG else "unreadable-file"
            out.problems.append(Problem(str(f.path), kind, f"{f.path}: cannot be used as an image ({exc!r})", ERROR,
                                        case_id))
    return out
