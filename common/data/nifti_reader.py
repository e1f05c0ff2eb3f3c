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

from .geometry import load_nifti
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


def find_nifti_files(case_dir: Path) -> list[NiftiFile]:
    """NIfTI files directly in ``case_dir`` with the modality/seg each name maps to."""
    out = []
    for path in sorted(Path(case_dir).iterdir()):
        if not path.is_file() or path.name.startswith(".") or not is_nifti(path):
            continue
        match = _NAME.match(path.name)
        tag = NIFTI_TAGS.get(match.group("tag").lower()) if match else None
        out.append(NiftiFile(path, tag))
    return out


def read_seg(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a segmentation as ``(labels (D, H, W) uint8, RAS affine)``.

    Raises:
        ValueError: (message naming the file) when unreadable, not integer-valued, or with labels outside 0..3.
    """
    data, affine = load_nifti(path)
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
    case_dir: Path, modalities: Sequence[str] = MODALITIES, case_id: str = "", load_pixels: bool = True
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray] | None, list[NiftiFile],
           list[Problem]]:
    """Read a case folder's NIfTI images and segmentation on their native grids.

    Returns:
        ``(volumes, seg, files, problems)``: ``volumes[modality] = (vol (D, H, W) float32, RAS affine)`` for the
        requested modalities found; ``seg`` = ``(labels uint8 (D, H, W), affine)`` or ``None``; all NIfTI files
        seen; problems (unreadable files, unknown names, bad segmentations, duplicates).
    """
    volumes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    seg: tuple[np.ndarray, np.ndarray] | None = None
    problems: list[Problem] = []
    files = find_nifti_files(case_dir)
    seen: set[str] = set()
    for f in files:
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
                seg = read_seg(f.path)
            else:
                data, affine = load_nifti(f.path)
                volumes[f.tag] = (np.asarray(data, dtype=np.float32), affine)
        except ValueError as exc:
            kind = "bad-seg" if f.tag == "seg" else "unreadable-file"
            problems.append(Problem(str(f.path), kind, str(exc), ERROR, case_id))
    return volumes, seg, files, problems
