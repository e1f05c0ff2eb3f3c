"""The files of one case folder that the readers may open: regular files inside the site folder, and a bounded walk.

A case folder is untrusted input. Walking it:

- stops after :attr:`~common.data.limits.ReaderLimits.max_files_per_case` directory entries and then hands the
  readers *no* file (a partial case would be a silently wrong one): one ``limit-exceeded`` problem names the folder;
- never follows a symbolic link out of the site folder (e.g. to ``/etc/passwd`` or another site's data): such a link
  is skipped and reported as ``unsafe-path``. A link to a file inside the site folder is read; links to folders are
  never followed (they could loop) and are reported;
- never opens what is not a regular file (a FIFO would block the reader forever; devices and sockets are not data);
- skips hidden entries (names starting with ``.``), as before, and never descends into hidden folders.

Order is that of ``os.walk`` top-down with sorted names (a folder's files, then its sub-folders), so the DICOM
reader groups series in a stable order.

A case is a folder, except in the Medical Segmentation Decathlon layout (``SITE/imagesTr/BRATS_001.nii.gz`` with
``SITE/labelsTr/BRATS_001.nii.gz`` and ``SITE/dataset.json``), where a case is its image file under ``imagesTr/``:
its files are that image, its label file and the site's ``dataset.json``, under the same rules.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .limits import DEFAULT_LIMITS, ReaderLimits
from .problems import ERROR, WARNING, Problem


@dataclass(frozen=True)
class CaseFiles:
    """Result of :func:`list_case_files`.

    Attributes:
        case_dir: the case folder.
        files: readable regular files, walk order (links inside the site keep their link path).
        problems: entries skipped for safety, or the one problem saying the folder is over the file limit.
    """

    case_dir: Path
    files: tuple[Path, ...] = ()
    problems: tuple[Problem, ...] = field(default_factory=tuple)

    def top_level(self) -> list[Path]:
        """Files directly in the case folder (the NIfTI layout)."""
        return [p for p in self.files if p.parent == self.case_dir]


#: Decathlon layout: image folder, label folder and description file of a site.
MSD_IMAGES, MSD_LABELS, MSD_DATASET_JSON = "imagesTr", "labelsTr", "dataset.json"


def is_msd_case(case: Path) -> bool:
    """Whether ``case`` is a Decathlon case (an image file directly under an ``imagesTr`` folder)."""
    case = Path(case)
    return case.parent.name == MSD_IMAGES and case.name.lower().endswith((".nii", ".nii.gz"))


def site_of_case(case: Path) -> Path:
    """The site folder a case (folder, or Decathlon image file) belongs to."""
    case = Path(case)
    return case.parent.parent if is_msd_case(case) else case.parent


def case_id_of(case: Path) -> str:
    """The site-local case id: the folder name, or a Decathlon image's name without ``.nii[.gz]``."""
    case = Path(case)
    if is_msd_case(case):
        name = case.name
        return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[: -len(".nii")]
    return case.name


def is_inside(target: str, root: str) -> bool:
    """Whether the resolved path ``target`` is ``root`` or below it (both resolved with ``os.path.realpath``)."""
    return target == root or target.startswith(root.rstrip(os.sep) + os.sep)


def list_case_files(
    case_dir: Path, limits: ReaderLimits = DEFAULT_LIMITS, site_dir: Path | None = None, case_id: str = ""
) -> CaseFiles:
    """List the files of ``case_dir`` the readers may open (see the module doc for the rules).

    Args:
        case_dir: the case folder.
        limits: ``max_files_per_case`` bounds the walk.
        site_dir: links may point anywhere inside it; default the case folder's parent (the site folder).
        case_id: stamped on problems.

    Raises:
        OSError: when ``case_dir`` itself cannot be listed.
    """
    case_dir = Path(case_dir)
    root = os.path.realpath(site_dir if site_dir is not None else site_of_case(case_dir))
    if is_msd_case(case_dir):
        return _msd_case_files(case_dir, root, case_id)
    real_case = os.path.realpath(case_dir)
    if not is_inside(real_case, root):
        return CaseFiles(case_dir, (), (Problem(
            str(case_dir), "unsafe-path",
            f"the case folder leads to {real_case}, outside the site folder {root}; not read", ERROR, case_id),))
    files: list[Path] = []
    problems: list[Problem] = []
    scanned = 0
    stack = [str(case_dir)]
    while stack:
        folder = stack.pop()
        listing = []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    scanned += 1
                    if scanned > limits.max_files_per_case:
                        return CaseFiles(case_dir, (), (Problem(
                            str(case_dir), "limit-exceeded",
                            f"more than {limits.max_files_per_case} files and folders in the case folder "
                            "(ReaderLimits.max_files_per_case); case not read", ERROR, case_id),))
                    listing.append(entry)
        except OSError as exc:
            if folder == str(case_dir):
                raise
            problems.append(Problem(folder, "unreadable-file", f"cannot list folder: {exc}", ERROR, case_id))
            continue
        subfolders = []
        for entry in sorted(listing, key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if entry.is_symlink():
                problem = _link_problem(path, root, case_id)
                if problem is None:
                    files.append(path)
                else:
                    problems.append(problem)
            elif entry.is_dir(follow_symlinks=False):
                subfolders.append(entry.path)
            elif entry.is_file(follow_symlinks=False):
                files.append(path)
            else:
                problems.append(Problem(str(path), "unsafe-path",
                                        "not a regular file (FIFO, socket or device); not opened", ERROR, case_id))
        stack.extend(reversed(subfolders))
    return CaseFiles(case_dir, tuple(files), tuple(problems))


def _link_problem(path: Path, root: str, case_id: str) -> Problem | None:
    """Why the symbolic link ``path`` is not read, or ``None`` when it leads to a regular file inside ``root``."""
    target = os.path.realpath(path)
    if not is_inside(target, root):
        return Problem(str(path), "unsafe-path", f"symbolic link to {target}, outside the site folder {root}; not "
                       "followed", ERROR, case_id)
    if os.path.isdir(target):
        return Problem(str(path), "unsafe-path", "symbolic link to a folder; folder links are never followed (they "
                       "can loop); copy the files or link each file", WARNING, case_id)
    if not os.path.isfile(target):
        return Problem(str(path), "unsafe-path", "symbolic link to nothing readable (dangling, or not a regular "
                       "file); skipped", ERROR, case_id)
    return None


def _msd_case_files(image: Path, root: str, case_id: str) -> CaseFiles:
    """A Decathlon case's files: its image, its label (when present) and the site's dataset.json (when present)."""
    site = image.parent.parent
    files: list[Path] = []
    problems: list[Problem] = []
    for path in (image, site / MSD_LABELS / image.name, site / MSD_DATASET_JSON):
        if not os.path.lexists(path):
            continue
        if path.is_symlink():
            problem = _link_problem(path, root, case_id)
        elif path.is_file():
            problem = None
        else:
            problem = Problem(str(path), "unsafe-path", "not a regular file; not opened", ERROR, case_id)
        if problem is None:
            files.append(path)
        else:
            problems.append(problem)
    return CaseFiles(image, tuple(files), tuple(problems))
