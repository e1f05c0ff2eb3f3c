"""NIfTI reader for the BraTS layout: ``<case>/<case>_<modality>.nii[.gz]`` plus ``<case>_seg.nii[.gz]``.

Modality tags: ``t1 t1ce t2 flair ct us`` and ``seg`` (fedfusion's names), plus the BraTS 2023 spellings
``t1n t1c t2w t2f`` as aliases. Only files directly in the case folder are read. Segmentation labels must be
fedfusion's (0 background, 1 oedema, 2 non-enhancing core, 3 enhancing rim); other values are reported (BraTS
2021 files use 1 = core, 2 = oedema, 4 = enhancing and must be relabelled by the site first).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.config import SEG_LABELS
from models.modalities import MODALITIES

from .case_files import list_case_files
from .geometry import load_nifti
from .limits import DEFAULT_LIMITS, LimitExceeded, ReaderLimits
from .problems import ERROR, WARNING, Problem

#: File tag -> fedfusion modality (or ``seg``).
NIFTI_TAGS: dict[str, str] = {
    **{m: m for m in MODALITIES},
    "seg": "seg",
    "t1n": "t1",
    "t1c": "t1ce",
    "t1gd": "t1ce",
    "t2w": "t2",
    "t2f": "flair",
}

_NAME = re.compile(r"^(?P<stem>.+)[_-](?P<tag>[A-Za-z0-9]+)\.nii(\.gz)?$")


@dataclass(frozen=True)
class NiftiFile:
    """One NIfTI file of a case: ``tag`` is a modality, ``seg``, or ``None`` (name maps to nothing)."""

    path: Path
    tag: str | None


def is_nifti(path: Path) -> bool:
    low = path.name.lower()
    return low.endswith(".nii") or low.endswith(".nii.gz")


def find_nifti_files(case_dir: Path, files: Sequence[Path] | None = None) -> list[NiftiFile]:
    """NIfTI files directly in ``case_dir`` with the modality/seg each name maps to.

    Args:
        files: the case's top-level files from :meth:`common.data.case_files.CaseFiles.top_level`; ``None`` lists
            the folder here (links out of the site and non-regular files are left out; :func:`read_nifti_case`
            reports them).
    """
    if files is None:
        files = list_case_files(Path(case_dir)).top_level()
    out = []
    for path in sorted(files):
        if path.name.startswith(".") or not is_nifti(path):
            continue
        match = _NAME.match(path.name)
        tag = NIFTI_TAGS.get(match.group("tag").lower()) if match else None
        out.append(NiftiFile(path, tag))
    return out


def read_seg(path: Path, limits: ReaderLimits = DEFAULT_LIMITS) -> tuple[np.ndarray, np.ndarray]:
    """Read a segmentation as ``(labels (D, H, W) uint8, RAS affine)``.

    Raises:
        LimitExceeded: (a ValueError) when the file is over ``limits``.
        ValueError: (message naming the file) when unreadable, not integer-valued, or with labels outside 0..3.
    """
    data, affine = load_nifti(path, limits)
    values = np.unique(data)
    if not np.all(np.equal(np.round(values), values)):
        raise ValueError(f"{path}: segmentation is not integer-valued")
    bad = sorted(int(v) for v in values if int(v) not in SEG_LABELS)
    if bad:
        raise ValueError(
            f"{path}: segmentation labels {bad} outside {sorted(SEG_LABELS)} "
            "(0 background, 1 oedema, 2 non-enhancing core, 3 enhancing); relabel the file "
            "(BraTS 2021 uses 1 core, 2 oedema, 4 enhancing)"
        )
    return data.astype(np.uint8), affine


def read_nifti_case(
    case_dir: Path,
    modalities: Sequence[str] = MODALITIES,
    case_id: str = "",
    load_pixels: bool = True,
    limits: ReaderLimits = DEFAULT_LIMITS,
    files: Sequence[Path] | None = None,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray] | None, list[NiftiFile],
           list[Problem]]:
    """Read a case folder's NIfTI images and segmentation on their native grids.

    Each file is read on its own: one unreadable, hostile or oversized file (see :mod:`common.data.limits`) is a
    problem for that file only.

    Args:
        files: the case's top-level files from :meth:`common.data.case_files.CaseFiles.top_level` (their listing
            problems are then the caller's to report); ``None`` lists the folder here.

    Returns:
        ``(volumes, seg, files, problems)``: ``volumes[modality] = (vol (D, H, W) float32, RAS affine)`` for the
        requested modalities found; ``seg`` = ``(labels uint8 (D, H, W), affine)`` or ``None``; all NIfTI files
        seen; problems (unreadable files, unknown names, bad segmentations, duplicates).
    """
    volumes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    seg: tuple[np.ndarray, np.ndarray] | None = None
    problems: list[Problem] = []
    if files is None:
        listing = list_case_files(Path(case_dir), limits, case_id=case_id)
        problems.extend(listing.problems)
        files = listing.top_level()
    nifti_files = find_nifti_files(case_dir, files)
    seen: set[str] = set()
    for f in nifti_files:
        if f.tag is None:
            problems.append(Problem(str(f.path), "unknown-file",
                                    "NIfTI name does not end in _<modality>.nii[.gz] "
                                    f"(modality one of {', '.join(NIFTI_TAGS)}); ignored", WARNING, case_id))
            continue
        if f.tag in seen:
            problems.append(Problem(str(f.path), "duplicate-series", f"another file already gives {f.tag}; ignored",
                                    WARNING, case_id))
            continue
        seen.add(f.tag)
        if f.tag != "seg" and (f.tag not in modalities or not load_pixels):
            continue
        try:
            if f.tag == "seg":
                seg = read_seg(f.path, limits)
            else:
                data, affine = load_nifti(f.path, limits)
                volumes[f.tag] = (np.asarray(data, dtype=np.float32), affine)
        except LimitExceeded as exc:
            # A segmentation keeps its kind (bad-seg) so the case is not also reported as having none.
            kind = "bad-seg" if f.tag == "seg" else "limit-exceeded"
            problems.append(Problem(str(f.path), kind, f"{exc}; file skipped", ERROR, case_id))
        except ValueError as exc:
            kind = "bad-seg" if f.tag == "seg" else "unreadable-file"
            problems.append(Problem(str(f.path), kind, str(exc), ERROR, case_id))
        except Exception as exc:  # e.g. a data type that is not a number: this file's problem only
            kind = "bad-seg" if f.tag == "seg" else "unreadable-file"
            problems.append(Problem(str(f.path), kind, f"{f.path}: cannot be used as an image ({exc!r})", ERROR,
                                    case_id))
    return volumes, seg, nifti_files, problems
