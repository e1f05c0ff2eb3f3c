"""Reader for the Medical Segmentation Decathlon layout (Task01_BrainTumour as distributed).

```
SITE/                       e.g. Task01_BrainTumour/ (or a site-* folder holding the same)
  dataset.json              "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
                            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor",
                                       "3": "enhancing tumour"}
  imagesTr/BRATS_001.nii.gz one 4D file per case: (X, Y, Z, channel), channels in "modality" order
  labelsTr/BRATS_001.nii.gz its segmentation, values as "labels" names them
  imagesTs/                 test images without labels: not read
```

A case is one image under ``imagesTr/`` (case id: its name without ``.nii.gz``). Channel names are mapped to
fedfusion's modalities and label names to fedfusion's sub-regions by name (:func:`common.data.conventions.
modality_of_name`, :func:`~common.data.conventions.region_of_name`); without a dataset.json, Task01's channels and
labels apply. A label name that maps to no sub-region makes the segmentation unusable (reported); a channel name
that maps to no modality is reported and left out.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from models.modalities import MODALITIES

from .case_files import MSD_DATASET_JSON, MSD_LABELS, list_case_files
from .conventions import (CHOSEN_BY, MSD_CONVENTION, MSD_TASK01_CHANNELS, SEG_TAG, Convention, modality_of_name,
                          region_of_name)
from .geometry import load_nifti
from .limits import DEFAULT_LIMITS, LimitExceeded, ReaderLimits
from .nifti_reader import NiftiCase, NiftiFile
from .problems import ERROR, WARNING, Problem

#: Largest dataset.json read (Task01's, with its file lists, is about 60 kB).
MAX_DATASET_JSON_BYTES = 4 << 20


@dataclasses.dataclass(frozen=True)
class MsdDescription:
    """What a Decathlon site's dataset.json says: ``channels[c]`` = the name of channel ``c``; ``convention`` maps
    its label values to fedfusion's sub-regions (``None`` when a label name maps to none; ``problem`` says which)."""

    channels: tuple[str, ...]
    convention: Convention | None
    problem: str = ""


def read_dataset_json(path: Path) -> MsdDescription:
    """Read a Decathlon ``dataset.json`` (Task01's channels and labels when ``path`` does not exist).

    Raises:
        ValueError: naming the file when it is too large, not JSON, or its "modality"/"labels" are malformed.
    """
    if not os.path.exists(path):
        return MsdDescription(MSD_TASK01_CHANNELS, MSD_CONVENTION)
    if os.path.getsize(path) > MAX_DATASET_JSON_BYTES:
        raise ValueError(f"{path}: over {MAX_DATASET_JSON_BYTES} bytes; not a Decathlon dataset.json")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.loads(fh.read(MAX_DATASET_JSON_BYTES + 1))
        modality = data.get("modality", {str(i): n for i, n in enumerate(MSD_TASK01_CHANNELS)})
        labels = data.get("labels", {str(k): v for k, v in MSD_CONVENTION.label_names.items()})
        channels = tuple(str(modality[k]) for k in sorted(modality, key=int))
        label_names = {int(k): str(v) for k, v in labels.items()}
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, TypeError, KeyError) as exc:
        raise ValueError(f"{path}: not a readable Decathlon dataset.json ({exc}); it needs \"modality\" and "
                         "\"labels\" objects keyed by \"0\", \"1\", ...") from exc
    regions = {value: region_of_name(name) for value, name in label_names.items()}
    unknown = {v: label_names[v] for v, r in regions.items() if r is None}
    if unknown:
        return MsdDescription(channels, None, f"{path}: label name(s) {unknown} map to no fedfusion sub-region "
                                              "(oedema, non-enhancing core/necrosis, enhancing tumour)")
    convention = dataclasses.replace(MSD_CONVENTION, labels={v: int(r) for v, r in regions.items() if r is not None},
                                     label_names=label_names)
    return MsdDescription(channels, convention)


def read_msd_case(
    image: Path,
    modalities: Sequence[str] = MODALITIES,
    case_id: str = "",
    load_pixels: bool = True,
    limits: ReaderLimits = DEFAULT_LIMITS,
    files: Sequence[Path] | None = None,
) -> NiftiCase:
    """Read one Decathlon case (its 4D image under imagesTr/ and its label under labelsTr/) on its native grid.

    Args:
        files: the case's files from :func:`common.data.case_files.list_case_files` (its problems are then the
            caller's); ``None`` lists them here.

    Returns:
        A :class:`~common.data.nifti_reader.NiftiCase`: one volume per requested modality the channels give (each
        ``(X, Y, Z)`` with the file's affine), the segmentation in fedfusion's sub-regions.
    """
    image = Path(image)
    site = image.parent.parent
    out = NiftiCase(convention=MSD_CONVENTION.name, chosen_by="layout")
    if files is None:
        listing = list_case_files(image, limits, case_id=case_id)
        out.problems.extend(listing.problems)
        files = listing.files
    readable = set(files)
    description_path = site / MSD_DATASET_JSON
    try:
        description = read_dataset_json(description_path) if (description_path in readable or not os.path.lexists(
            description_path)) else None
    except ValueError as exc:
        out.problems.append(Problem(str(description_path), "bad-site-settings", f"{exc}; case not read", ERROR,
                                    case_id))
        return out
    if description is None:  # dataset.json exists but was refused by the listing (reported there)
        return out
    channel_modality: list[str | None] = []
    for c, name in enumerate(description.channels):
        m = modality_of_name(name)
        if m is None:
            out.problems.append(Problem(f"{image}[{c}]", "unknown-file", f"channel {c} ({name!r}) maps to no "
                                        f"modality of {', '.join(MODALITIES)}; not used", WARNING, case_id))
        elif m in channel_modality:
            out.problems.append(Problem(f"{image}[{c}]", "duplicate-series", f"channel {c} ({name!r}) gives {m} "
                                        "again; not used", WARNING, case_id))
            m = None
        channel_modality.append(m)
    out.files = [NiftiFile(image, m) for m in channel_modality]
    label = site / MSD_LABELS / image.name
    if label in readable:
        out.files.append(NiftiFile(label, SEG_TAG))
        if description.convention is None:
            out.problems.append(Problem(str(label), "ambiguous-convention", f"{description.problem}; segmentation "
                                        "not used", ERROR, case_id))
        else:
            try:
                data, affine = load_nifti(label, limits)
                out.seg = (description.convention.map_labels(data, str(label), CHOSEN_BY["layout"]), affine)
            except LimitExceeded as exc:
                out.problems.append(Problem(str(label), "bad-seg", f"{exc}; file skipped", ERROR, case_id))
            except ValueError as exc:
                out.problems.append(Problem(str(label), "bad-seg", str(exc), ERROR, case_id))
    wanted = [c for c, m in enumerate(channel_modality) if m is not None and m in modalities]
    if not (load_pixels and wanted) or image not in readable:
        return out
    try:
        data, affine = load_nifti(image, limits, channels=True)
        if data.shape[3] != len(description.channels):
            raise ValueError(f"{image}: {data.shape[3]} channel(s), but {description_path.name} names "
                             f"{len(description.channels)} ({', '.join(description.channels)})")
        for c in wanted:
            out.volumes[str(channel_modality[c])] = (np.ascontiguousarray(data[..., c], dtype=np.float32), affine)
    except LimitExceeded as exc:
        out.problems.append(Problem(str(image), "limit-exceeded", f"{exc}; file skipped", ERROR, case_id))
    except ValueError as exc:
        out.problems.append(Problem(str(image), "unreadable-file", str(exc), ERROR, case_id))
    except Exception as exc:  # a file this reader did not foresee costs this case's image only
        out.problems.append(Problem(str(image), "unreadable-file", f"{image}: cannot be used as an image ({exc!r})",
                                    ERROR, case_id))
    return out
