"""The torch Dataset over one or more sites: fixed-size multimodal tensors with an availability mask.

Each item (docs/architecture.md, "Dataset item") is a dict with exactly these keys::

    image      float32 (M, *spatial_size)  normalised per present channel; a missing modality is all zeros
    mask       float32 (M,)                1 = modality acquired and usable, 0 = missing
    seg        int64   (*spatial_size)     labels 0..3 (background, oedema, non-enhancing core, enhancing rim);
                                           all zeros (a placeholder) when ``has_seg`` is 0
    label      int64   ()                  case label, 0 benign / 1 malignant (labels.csv); 0 (a placeholder)
                                           when ``has_label`` is 0
    has_seg    float32 ()                  1 = ``seg`` is the case's segmentation, 0 = the case has none
    has_label  float32 ()                  1 = ``label`` is the case's label, 0 = the case is unlabelled
    case_id    str                         site-local case id (the case folder's name)

Mixed supervision: a case may carry a segmentation, a label or both (a public segmentation data set has no labels,
many hospital cases have a diagnosis but no segmentation). The flags say which targets are real; a placeholder
target is never used (:class:`models.losses.MultiTaskLoss` masks each part per case, the metrics skip it). A case
with neither is skipped (``no-targets``), and a site without ``labels.csv`` is valid: all its cases are unlabelled.

Nothing from DICOM headers and no path is ever put in an item.

Patients: several case folders (studies) may belong to one patient. :meth:`CaseDataset.patient_groups` groups the
cases by patient (keyed DICOM PatientIDs and the optional ``patient_id`` column of ``labels.csv``, both hashed
with the ``patient_salt`` as they are read; see :mod:`common.data.site`) so a DP site can make the patient, not the
study, its privacy unit. The keys stay in the dataset object (and the site's on-disk cache), never in an item.

Preprocessing (once per case, then cached): read the case (:func:`common.data.site.load_case`: all modalities on
the reference grid, slice-first), normalise each PRESENT modality on that grid by its kind
(:func:`common.data.intensity.normalise`: CT brain window then z-score over the head, MR z-score over the head,
US z-score over the field of view; missing channels stay exactly zero), for 2D models (``len(spatial_size) == 2``)
take the axial slice ``k`` through the lesion's centre of mass (the middle slice when the case has no lesion), and
resize with MONAI ``Resize`` (trilinear/bilinear with anti-aliasing for images, nearest for the segmentation). Augmentation (``augment=True``, per
``__getitem__``): random flips along every spatial axis applied identically to image and segmentation, and small
per-channel intensity scaling/shifts; missing channels are re-zeroed afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from models.atomic import atomic_write
from models.modalities import MODALITIES, canonical

from .case_files import case_id_of, list_case_files, site_of_case
from .limits import DEFAULT_LIMITS, ReaderLimits
from .problems import ERROR, INFO, Problem
from .series_mapping import MappingSource, load_series_mapping
from .site import (
    CaseError,
    bad_label_rows,
    discover_sites,
    labels_unusable,
    list_cases,
    load_case,
    read_labels,
    read_patient_ids,
)
from .site_settings import site_settings_fingerprint

log = logging.getLogger(__name__)

#: Bump when preprocessing changes so stale on-disk cache entries are not reused (3: patient keys stored, and label
#: conventions, so BraTS 2023 files cached with fedfusion's label meaning are rebuilt; 4: per-kind intensity
#: normalisation like nnU-Net; 5: ``has_seg`` stored, cases without a segmentation kept for classification).
CACHE_VERSION = 5


def _lesion_slice(seg: np.ndarray | None, depth: int) -> int:
    """Index ``k`` of the axial slice through the lesion's centre of mass, or the middle slice."""
    if seg is not None and np.any(seg > 0):
        return int(round(float(np.nonzero(seg > 0)[0].mean())))
    return depth // 2


def preprocess_case(
    images: dict[str, np.ndarray],
    seg: np.ndarray | None,
    modalities: Sequence[str],
    spatial_size: Sequence[int],
) -> dict[str, np.ndarray]:
    """Turn one case on its reference grid into fixed-size arrays.

    Args:
        images: ``{modality: (D, H, W) float32}`` on one grid (missing modalities absent).
        seg: ``(D, H, W)`` labels on the same grid, or ``None`` (then all background).
        modalities: channel order ``M``.
        spatial_size: ``(D, H, W)`` for 3D items or ``(H, W)`` for 2D items (axial slice, see module doc).

    Returns:
        ``{"image": (M, *spatial_size) float32, "mask": (M,) float32, "seg": (*spatial_size) int64,
        "has_seg": () float32}`` (``seg`` all zeros and ``has_seg`` 0 when ``seg`` was ``None``).
    """
    from monai.transforms import Resize

    from .intensity import normalise

    size = tuple(int(s) for s in spatial_size)
    shape = next(iter(images.values())).shape
    has_seg = np.float32(seg is not None)
    if seg is None:
        seg = np.zeros(shape, dtype=np.uint8)
    mask = np.asarray([1.0 if m in images else 0.0 for m in modalities], dtype=np.float32)
    stack = np.zeros((len(modalities), *shape), dtype=np.float32)
    for c, m in enumerate(modalities):
        if m in images:
            stack[c] = normalise(images[m], m)
    if len(size) == 2:
        k = _lesion_slice(seg, shape[0])
        stack, seg = stack[:, k], seg[k]
    interp = "trilinear" if len(size) == 3 else "bilinear"
    image = Resize(size, mode=interp, anti_aliasing=True)(torch.from_numpy(stack))
    seg_t = Resize(size, mode="nearest")(torch.from_numpy(seg.astype(np.float32))[None])
    image = torch.as_tensor(image).float()
    image[torch.from_numpy(mask <= 0)] = 0.0
    return {
        "image": image.numpy().astype(np.float32),
        "mask": mask,
        "seg": torch.as_tensor(seg_t)[0].round().numpy().astype(np.int64),
        "has_seg": np.asarray(has_seg, dtype=np.float32),
    }


def _plain(x: Any) -> torch.Tensor:
    """MONAI MetaTensor -> plain tensor, so no metadata (affine, file names) travels in an item."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


class CaseDataset(Dataset):
    """Cases of one or more sites as fixed-size multimodal tensors (see the module doc for the item).

    Args:
        site_dirs: site folders (pooled for centralized training). A data root given instead is expanded to its
            site-* folders, never its ``heldout/`` set (give ``heldout/`` itself to evaluate on it).
        modalities: channel order ``M`` (a subset of :data:`models.modalities.MODALITIES`, canonical order).
        spatial_size: ``(D, H, W)`` voxels for 3D models or ``(H, W)`` for 2D models (axial lesion slice).
        augment: random flips and intensity jitter per ``__getitem__`` (training only).
        cache: keep preprocessed arrays in memory (an epoch then re-reads nothing); with ``False`` every item is
            re-read from the source (or from ``cache_dir``).
        series_mapping: SeriesDescription mapping (dict, JSON/TOML path or SeriesMapping; see series_mapping).
        cache_dir: optional on-disk cache of preprocessed arrays (``.npz`` named by a hash of the case's file
            names, sizes and mtimes and of the preprocessing settings; holds arrays only).
        require_seg: skip cases without a usable segmentation. Default ``False`` (mixed supervision): a labelled
            case without one trains its classification only (``has_seg`` 0, placeholder ``seg`` of zeros).
        seed: seed of the augmentation random state.
        limits: what one file, series and case folder may cost the readers (see :mod:`common.data.limits`); the
            site's own choice, never taken from a run config.
        patient_salt: the secret that keys patient identifiers (a site passes its own, see
            :func:`common.data.dicom_reader.patient_key`); it only changes the keys, not the grouping.

    Unusable cases (unreadable, no requested modality, neither a label nor a segmentation, an invalid label row or
    an unusable ``labels.csv``) are skipped with a log line and listed in :attr:`problems`; iteration never raises
    for them (they are found at construction). Cases with one target only are used and noted (severity ``info``).

    Raises:
        ValueError: naming the folders when no usable case remains.
    """

    def __init__(
        self,
        site_dirs: Sequence[Path] | Path | str,
        modalities: Sequence[str] = MODALITIES,
        spatial_size: Sequence[int] = (16, 32, 32),
        augment: bool = False,
        cache: bool = True,
        series_mapping: MappingSource = None,
        cache_dir: Path | str | None = None,
        require_seg: bool = False,
        seed: int = 0,
        limits: ReaderLimits = DEFAULT_LIMITS,
        patient_salt: bytes = b"",
    ) -> None:
        if isinstance(site_dirs, (str, os.PathLike)):
            site_dirs = [Path(site_dirs)]
        self.modalities: tuple[str, ...] = canonical(modalities)
        self.spatial_size: tuple[int, ...] = tuple(int(s) for s in spatial_size)
        if len(self.spatial_size) not in (2, 3) or min(self.spatial_size) < 1:
            raise ValueError(f"spatial_size must be (D, H, W) or (H, W) positive sizes, got {spatial_size}")
        self.augment = augment
        self.cache = cache
        self.require_seg = require_seg
        self.limits = limits
        self.mapping = load_series_mapping(series_mapping)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.patient_salt = bytes(patient_salt)
        self.problems: list[Problem] = []
        #: (site name, case id) of every usable case, in item order (not part of items)
        self.cases: list[tuple[str, str]] = []
        self._case_dirs: list[Path] = []
        self._labels: list[int] = []  # 0 (placeholder) for unlabelled cases
        self._has_label: list[bool] = []
        self._has_seg: list[bool] = []
        self._masks: list[np.ndarray] = []
        self._patients: list[frozenset[str]] = []  # keyed patient identifiers of each case (may be empty)
        self._items: list[dict[str, np.ndarray] | None] = []

        sites = []
        for given in site_dirs:
            found = discover_sites(Path(given))
            if len(found) > 1 or found[0].path != Path(given):
                log.info("%s is a data root; using its sites %s (not heldout/)", given,
                         [s.name for s in found if not s.heldout])
                found = [s for s in found if not s.heldout]
            sites.extend(found)
        for site in sites:
            self._add_site(site.name, site.path)
        if not self.cases:
            raise ValueError(
                f"no usable case in {', '.join(str(s) for s in site_dirs)} for modalities "
                f"{', '.join(self.modalities)}; run `fedfusion inspect` on it to see why "
                f"({len(self.problems)} problems found)"
            )
        self._augment_transform = self._build_augment(seed) if augment else None

    # -- construction ---------------------------------------------------------------------------
    def _add_site(self, site_name: str, site_dir: Path) -> None:
        labels, label_problems = read_labels(site_dir)
        self._report(label_problems)
        broken, bad_rows = labels_unusable(label_problems), bad_label_rows(label_problems)
        has_labels_file = not any(p.kind == "no-labels-file" for p in label_problems)
        listed_patients = read_patient_ids(site_dir, self.patient_salt)
        for case_dir in list_cases(site_dir):
            case_id = case_id_of(case_dir)
            if broken or case_id in bad_rows:
                # a label the site meant to give but that cannot be read: not trained as if unlabelled
                self._report([Problem(str(case_dir), "missing-label", "its labels.csv row (or the file) is unusable; "
                                      "case skipped until it is fixed", ERROR, case_id)])
                continue
            has_label = case_id in labels
            if not has_label and has_labels_file:
                self._report([Problem(str(case_dir), "missing-label", "case not in labels.csv: unlabelled, trains "
                                      "its segmentation only", INFO, case_id)])
            try:
                arrays = self._load_arrays(case_dir, has_label=has_label)
            except CaseError as exc:
                self._report(exc.problems)
                log.warning("skipping case %s: %s", case_dir, exc)
                continue
            except Exception as exc:  # a reader bug must not stop a site from training on its other cases
                self._report([Problem(str(case_dir), "unreadable-file", f"unexpected error: {exc!r}", ERROR,
                                      case_id)])
                log.exception("skipping case %s after an unexpected error", case_dir)
                continue
            self.cases.append((site_name, case_id))
            self._case_dirs.append(case_dir)
            self._labels.append(labels.get(case_id, 0))
            self._has_label.append(has_label)
            self._has_seg.append(bool(arrays["has_seg"] > 0))
            self._masks.append(arrays["mask"])
            keys = {str(k) for k in arrays["patients"].tolist()}
            if case_id in listed_patients:
                keys.add(listed_patients[case_id])
            self._patients.append(frozenset(keys))
            self._items.append(arrays if self.cache else None)

    def _report(self, problems: Sequence[Problem]) -> None:
        for p in problems:
            if p.severity == ERROR:
                log.warning("%s", p)
            else:
                log.info("%s", p)
        self.problems.extend(problems)

    def _cache_key(self, case_dir: Path) -> str:
        """Hash of the case's readable files (names, sizes, mtimes) and the settings; raises CaseError when the
        folder is over the file limit (the same bounded listing the readers use)."""
        listing = list_case_files(case_dir, self.limits, case_id=case_id_of(case_dir))
        if any(p.kind == "limit-exceeded" for p in listing.problems):
            raise CaseError(f"{case_dir}: too many files", listing.problems)
        files = []
        for path in listing.files:
            st = path.stat()
            files.append((os.path.relpath(path, case_dir), st.st_size, st.st_mtime_ns))
        blob = json.dumps({
            "version": CACHE_VERSION,
            "case": str(case_dir.resolve()),
            "files": sorted(files),
            "modalities": self.modalities,
            "spatial_size": self.spatial_size,
            "mapping": self.mapping.fingerprint(),
            "require_seg": self.require_seg,
            # the stored patient keys depend on the salt (its digest only: the salt itself is a secret)
            "salt": hashlib.sha256(b"fedfusion-salt\0" + self.patient_salt).hexdigest()[:16],
            "site-settings": site_settings_fingerprint(site_of_case(case_dir)),  # the stated label convention
        })
        return hashlib.sha256(blob.encode()).hexdigest()

    def _load_arrays(self, case_dir: Path, report: bool = True, has_label: bool = True) -> dict[str, np.ndarray]:
        """Preprocessed arrays of one case (``image``, ``mask``, ``seg``, ``has_seg`` and the keyed patient
        identifiers ``patients``, a 1-D string array), from the disk cache when valid.

        Raises:
            CaseError: the case is unusable (no readable image; or no segmentation while ``require_seg`` or while
                the case has no label either: ``has_label`` says whether it has one).
        """
        path = None
        if self.cache_dir is not None:
            path = self.cache_dir / f"{self._cache_key(case_dir)}.npz"
            if path.is_file():
                try:
                    with np.load(path) as data:
                        cached = {k: data[k] for k in ("image", "mask", "seg", "has_seg", "patients")}
                    if has_label or cached["has_seg"] > 0:
                        return cached
                except Exception as exc:  # a damaged cache file is rebuilt, not fatal
                    log.info("rebuilding damaged cache entry %s (%s)", path, exc)
        case = load_case(case_dir, self.modalities, self.mapping, require_seg=self.require_seg, limits=self.limits,
                         patient_salt=self.patient_salt)
        problems = case.problems
        if case.seg is None:
            if not has_label:
                raise CaseError(f"{case_dir}: neither a segmentation nor a label", [*problems, Problem(
                    str(case_dir), "no-targets", "neither a segmentation nor a label in labels.csv: nothing to train "
                    "on; case skipped (add either)", ERROR, case_id_of(case_dir))])
            # a labelled case without a segmentation trains its classification: a note, not an error
            problems = [replace(p, severity=INFO, reason=f"{p.reason}; the case trains its classification only")
                        if p.kind == "missing-seg" else p for p in problems]
        if report:
            self._report(problems)
        arrays = preprocess_case(case.images, case.seg, self.modalities, self.spatial_size)
        arrays["patients"] = np.asarray(sorted(case.patients), dtype=np.str_).reshape(-1)
        if path is not None:  # atomic: a concurrent reader never sees half a file
            atomic_write(path, lambda fh: np.savez(fh, **arrays))
        return arrays

    def _build_augment(self, seed: int) -> Any:
        from monai.transforms import Compose, RandFlipd, RandScaleIntensityd, RandShiftIntensityd

        flips = [RandFlipd(keys=["image", "seg"], prob=0.5, spatial_axis=a) for a in range(len(self.spatial_size))]
        transform = Compose([
            *flips,
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5, channel_wise=True),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5, channel_wise=True),
        ])
        transform.set_random_state(seed=seed)
        return transform

    # -- Dataset API ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:
        arrays = self._items[index]
        if arrays is None:
            # cache=False: re-read (files were readable at construction)
            arrays = self._load_arrays(self._case_dirs[index], report=False)
        image = torch.from_numpy(np.array(arrays["image"], dtype=np.float32))
        mask = torch.from_numpy(np.array(arrays["mask"], dtype=np.float32))
        seg = torch.from_numpy(np.array(arrays["seg"], dtype=np.int64))
        has_seg = self._has_seg[index]
        if self._augment_transform is not None:
            out = self._augment_transform({"image": image, "seg": seg[None]})
            image = _plain(out["image"]).float()
            seg = _plain(out["seg"])[0].long()
            image = image * mask.view(-1, *([1] * len(self.spatial_size)))  # missing channels stay exactly 0
        return {
            "image": image.contiguous(),
            "mask": mask,
            "seg": seg.contiguous(),
            "label": torch.tensor(self._labels[index], dtype=torch.int64),
            "has_seg": torch.tensor(1.0 if has_seg else 0.0, dtype=torch.float32),
            "has_label": torch.tensor(1.0 if self._has_label[index] else 0.0, dtype=torch.float32),
            "case_id": self.cases[index][1],
        }

    # -- summaries ------------------------------------------------------------------------------
    def patient_groups(self) -> list[list[int]]:
        """Item indices grouped by patient, in order of each patient's first case.

        Cases sharing a patient key are one patient, transitively (a case folder that mixes two PatientIDs joins
        both patients' studies into one group: over-grouping only makes the privacy unit larger). A case without
        any key is a patient of its own (one study per patient, the phantoms' case).
        """
        parent = list(range(len(self.cases)))

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        first_with: dict[str, int] = {}
        for i, keys in enumerate(self._patients):
            for key in sorted(keys):
                j = first_with.setdefault(key, i)
                a, b = root(i), root(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
        groups: dict[int, list[int]] = {}
        for i in range(len(self.cases)):
            groups.setdefault(root(i), []).append(i)
        return [groups[r] for r in sorted(groups)]

    def group_key(self, group: Sequence[int]) -> str:
        """A stable key of the patient owning the cases ``group`` (one of :meth:`patient_groups`): its smallest
        keyed identifier, else its first case's ``site/case_id``. Site-local; never put in an item."""
        keys = sorted(k for i in group for k in self._patients[i])
        if keys:
            return keys[0]
        site, case_id = self.cases[min(group)]
        return f"{site}/{case_id}"

    def labels(self) -> list[int]:
        """The case labels in item order (read from labels.csv at construction; no item is loaded); 0, a
        placeholder, for unlabelled cases (see :meth:`has_label`)."""
        return list(self._labels)

    def has_label(self) -> list[bool]:
        """Per item (in order), whether the case has a label in labels.csv."""
        return list(self._has_label)

    def has_seg(self) -> list[bool]:
        """Per item (in order), whether the case has a usable segmentation."""
        return list(self._has_seg)

    def known_labels(self, indices: Sequence[int] | None = None) -> list[int]:
        """The labels of the labelled cases among ``indices`` (default all), in order: what class shares and
        priors are computed from (placeholders never count)."""
        chosen = range(len(self._labels)) if indices is None else indices
        return [self._labels[i] for i in chosen if self._has_label[i]]

    def target_counts(self, indices: Sequence[int] | None = None) -> dict[str, int]:
        """How many cases (of ``indices``, default all) carry a segmentation and/or a label: keys ``cases``,
        ``seg``, ``label``, ``both``."""
        chosen = list(range(len(self._labels)) if indices is None else indices)
        seg = [self._has_seg[i] for i in chosen]
        lab = [self._has_label[i] for i in chosen]
        return {"cases": len(chosen), "seg": sum(seg), "label": sum(lab),
                "both": sum(a and b for a, b in zip(seg, lab))}

    def modality_counts(self, indices: Sequence[int] | None = None) -> dict[str, int]:
        """How many usable cases (of ``indices``, default all) carry each modality (every modality of
        ``self.modalities`` is a key)."""
        chosen = range(len(self._masks)) if indices is None else indices
        masks = np.stack([self._masks[i] for i in chosen]) if len(chosen) else np.zeros((0, len(self.modalities)))
        return {m: int(masks[:, c].sum()) for c, m in enumerate(self.modalities)}

