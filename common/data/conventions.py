"""Label conventions: how a case's files are named and what its segmentation values mean, mapped to fedfusion's.

fedfusion's sub-regions (:data:`models.config.SEG_LABELS`): 0 background, 1 oedema, 2 non-enhancing core (necrosis
and non-enhancing tumour), 3 enhancing tumour. The public datasets number the same regions differently:

==============  ====================================================  ==============================  ==============
convention      files (recognised by their names)                     source labels                   fedfusion
==============  ====================================================  ==============================  ==============
fedfusion       ``<case>_<modality>.nii.gz``, ``<case>_seg.nii.gz``   1 oedema, 2 core, 3 enhancing   1, 2, 3
brats2021       ``BraTS2021_00000_t1ce.nii.gz``, ``BraTS20_Training_  1 NCR/NET, 2 ED, 4 ET           2, 1, 3
                001_flair.nii.gz``, ``Brats18_2013_2_1_seg.nii.gz``
                (BraTS 2017-2021; tags t1 t1ce t2 flair seg)
brats2023       ``BraTS-GLI-00000-000-t1n.nii.gz`` (GLI, MEN, MET,    1 NCR/NETC, 2 ED/SNFH, 3 ET     2, 1, 3
                PED, SSA; tags t1n t1c t2w t2f seg)
brats2024-gli   as brats2023 (post-treatment glioma; stated only)     1 NETC, 2 SNFH, 3 ET, 4 RC      2, 1, 3, 0
msd-task01      Medical Segmentation Decathlon layout: ``imagesTr/    dataset.json's label names      by name
                BRATS_001.nii.gz`` 4D, ``labelsTr/BRATS_001.nii.gz``  (Task01: 1 edema, 2 non-enh.    (1, 2, 3)
                                                                      tumour, 3 enhancing tumour)
==============  ====================================================  ==============================  ==============

Label values alone cannot tell BraTS 2023 from fedfusion's own numbering (both use 1..3), so the *names* decide: a
case whose files carry a BraTS case name (``BraTS2021_…``, ``BraTS-GLI-…``) follows that BraTS convention, any
other ``<case>_<modality>`` name keeps fedfusion's meaning. ``brats2024-gli`` is named exactly like BraTS 2023 and
is therefore only applied when a site states it (see :mod:`common.data.site_settings`); its resection cavity (4) is
not a tumour sub-region and becomes background. A case whose files follow two conventions, or whose segmentation
holds a value its convention does not have (a 4 under BraTS 2023, a 3 under BraTS 2021), is a reported problem.

Segment names (DICOM SEG ``SegmentLabel`` and coded property types, MSD ``dataset.json`` label names) are mapped
to sub-regions by :func:`region_of_name`; MSD channel names (``FLAIR``, ``T1w``, ``t1gd``, ``T2w``) by
:func:`modality_of_name`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from common.layout import SITE_SETTINGS_FILE
from models.modalities import MODALITIES

#: fedfusion's sub-region values (see :data:`models.config.SEG_LABELS`).
BACKGROUND, OEDEMA, CORE, ENHANCING = 0, 1, 2, 3
#: File tag that names a segmentation (every case-folder convention uses it).
SEG_TAG = "seg"
#: Layouts: one folder per case (``case-folders``) or the Decathlon's imagesTr/labelsTr folders (``msd``).
CASE_FOLDERS, MSD = "case-folders", "msd"


class ConventionError(ValueError):
    """A segmentation that does not fit its case's label convention; the message says how to fix it."""


@dataclass(frozen=True)
class Convention:
    """One label convention (see the module doc for the registry).

    Attributes:
        name: the key a site states (``convention = "brats2021"``) and ``inspect`` reports.
        title: human-readable name.
        layout: :data:`CASE_FOLDERS` or :data:`MSD`.
        case_name: regular expression a case name must match for the convention to be *recognised* from file names
            (``None``: never recognised from names; fedfusion's is the fallback, ``brats2024-gli`` is stated only).
        separator: regular expression between case name and tag (``_`` or ``-``).
        tags: file tag (lower case) -> fedfusion modality or ``seg``.
        labels: source label value -> fedfusion sub-region; a value not listed is impossible in this convention.
        label_names: source label value -> its name in the convention (for messages).
    """

    name: str
    title: str
    layout: str
    case_name: re.Pattern[str] | None
    separator: str
    tags: Mapping[str, str]
    labels: Mapping[int, int]
    label_names: Mapping[int, str] = field(default_factory=dict)

    def tag_of(self, file_name: str) -> str | None:
        """The modality (or ``seg``) a file of a case in this convention gives, or ``None`` when its name has no tag
        of this convention."""
        match = _last_tag(self.separator).match(file_name)
        return self.tags.get(match.group("tag").lower()) if match else None

    def names_file(self, file_name: str) -> bool:
        """Whether ``file_name`` is named like this convention's files (its case-name pattern and one of its tags)."""
        if self.case_name is None:
            return False
        match = _last_tag(self.separator).match(file_name)
        return bool(match and match.group("tag").lower() in self.tags and self.case_name.fullmatch(match.group("case")))

    def describe_labels(self) -> str:
        return ", ".join(f"{v} {self.label_names.get(v, '?')}" for v in sorted(self.labels))

    def map_labels(self, data: np.ndarray, where: str, chosen_by: str = "") -> np.ndarray:
        """Source label array -> fedfusion sub-regions (uint8, same shape).

        Args:
            chosen_by: how the case came to be read in this convention (one of :data:`CHOSEN_BY`'s texts), for
                the message.

        Raises:
            ConventionError: naming ``where``, the values this convention does not have, and what to do.
        """
        values = np.unique(data)
        if not np.all(np.equal(np.round(values), values)):
            raise ConventionError(f"{where}: segmentation is not integer-valued")
        bad = sorted(int(v) for v in values if int(v) not in self.labels)
        if bad:
            raise ConventionError(
                f"{where}: segmentation values {bad} do not exist in the {self.title} convention "
                f"({self.describe_labels()}){f' ({chosen_by})' if chosen_by else ''}; {_hint(bad, self)}"
            )
        lut = np.zeros(max(self.labels) + 1, dtype=np.uint8)
        for source, target in self.labels.items():
            lut[source] = target
        return lut[np.asarray(data).astype(np.int64)]


def _last_tag(separator: str) -> re.Pattern[str]:
    # Greedy case name: the tag is what follows the *last* separator (BraTS 2023 case names contain '-').
    return re.compile(rf"^(?P<case>.+)(?:{separator})(?P<tag>[A-Za-z0-9]+)\.nii(?:\.gz)?$", re.IGNORECASE)


def _hint(bad: Sequence[int], convention: Convention) -> str:
    others = [c.name for c in CONVENTIONS.values()
              if c.layout == convention.layout and c.name != convention.name and all(v in c.labels for v in bad)]
    states = f" (e.g. {', '.join(repr(o) for o in others)})" if others else ""
    return f"relabel the file, or state the site's convention{states} as convention = \"...\" in {SITE_SETTINGS_FILE}"


#: How a case's convention was chosen (reported by ``inspect``).
CHOSEN_BY: dict[str, str] = {
    "stated": f"stated in the site's {SITE_SETTINGS_FILE}",
    "names": "recognised from the file names",
    "default": "fedfusion's own: the file names are no BraTS names",
    "layout": "the site's imagesTr/labelsTr layout",
    "segments": "DICOM SEG segment names",
}

_BRATS_LABEL_NAMES_2021 = {0: "background", 1: "necrotic/non-enhancing core (NCR/NET)", 2: "oedema (ED)",
                           4: "enhancing tumour (ET)"}
_BRATS_LABEL_NAMES_2023 = {0: "background", 1: "necrotic core (NCR/NETC)", 2: "oedema (ED/SNFH)",
                           3: "enhancing tumour (ET)"}
_BRATS2023_CASE = re.compile(r"BraTS-[A-Za-z]{2,4}-\d+-\d+", re.IGNORECASE)

#: The registry, by name (the order is the order of the docs and of error messages).
CONVENTIONS: dict[str, Convention] = {
    c.name: c
    for c in (
        Convention(
            "fedfusion", "fedfusion", CASE_FOLDERS, None, "[_-]",
            {**{m: m for m in MODALITIES}, SEG_TAG: SEG_TAG,
             # BraTS 2023 / MSD spellings accepted as aliases of fedfusion's modality names
             "t1n": "t1", "t1c": "t1ce", "t1gd": "t1ce", "t2w": "t2", "t2f": "flair"},
            {0: BACKGROUND, 1: OEDEMA, 2: CORE, 3: ENHANCING},
            {0: "background", 1: "oedema", 2: "non-enhancing core", 3: "enhancing tumour"},
        ),
        Convention(
            "brats2021", "BraTS 2017-2021", CASE_FOLDERS,
            re.compile(r"BraTS(?:17|18|19|20|21|2017|2018|2019|2020|2021)_.+", re.IGNORECASE), "_",
            {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", SEG_TAG: SEG_TAG},
            {0: BACKGROUND, 1: CORE, 2: OEDEMA, 4: ENHANCING}, _BRATS_LABEL_NAMES_2021,
        ),
        Convention(
            "brats2023", "BraTS 2023 (GLI, MEN, MET, PED, SSA)", CASE_FOLDERS, _BRATS2023_CASE, "-",
            {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair", SEG_TAG: SEG_TAG},
            {0: BACKGROUND, 1: CORE, 2: OEDEMA, 3: ENHANCING}, _BRATS_LABEL_NAMES_2023,
        ),
        Convention(
            "brats2024-gli", "BraTS 2024 post-treatment glioma", CASE_FOLDERS, None, "-",
            {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair", SEG_TAG: SEG_TAG},
            {0: BACKGROUND, 1: CORE, 2: OEDEMA, 3: ENHANCING, 4: BACKGROUND},
            {0: "background", 1: "non-enhancing tumour core (NETC)", 2: "oedema (SNFH)", 3: "enhancing tumour (ET)",
             4: "resection cavity (RC, read as background)"},
        ),
        Convention(
            "msd-task01", "Medical Segmentation Decathlon Task01_BrainTumour", MSD, None, "",
            {}, {0: BACKGROUND, 1: OEDEMA, 2: CORE, 3: ENHANCING},
            {0: "background", 1: "edema", 2: "non-enhancing tumor", 3: "enhancing tumour"},
        ),
    )
}
#: The convention of a case whose names are none of the BraTS ones.
DEFAULT_CONVENTION = CONVENTIONS["fedfusion"]
#: The MSD convention (channels and labels from the site's dataset.json; these are Task01's when it has none).
MSD_CONVENTION = CONVENTIONS["msd-task01"]
#: Task01_BrainTumour's channel order (its dataset.json "modality": FLAIR, T1w, t1gd, T2w).
MSD_TASK01_CHANNELS: tuple[str, ...] = ("FLAIR", "T1w", "t1gd", "T2w")


def get_convention(name: str) -> Convention:
    """The registered convention called ``name`` (case-insensitive).

    Raises:
        ValueError: naming the unknown value and listing the known ones.
    """
    key = str(name).strip().lower()
    if key not in CONVENTIONS:
        raise ValueError(f"unknown label convention {name!r}; known conventions: {', '.join(CONVENTIONS)}")
    return CONVENTIONS[key]


def recognise(file_names: Sequence[str]) -> list[Convention]:
    """The conventions the given NIfTI file names of one case are named in (fedfusion's for names that match no
    BraTS convention but parse as ``<case>_<tag>``); more than one means the case is ambiguous. Names that parse in
    no convention are left out (they are reported as unknown files by the reader)."""
    found: list[Convention] = []
    for name in file_names:
        specific = [c for c in CONVENTIONS.values() if c.names_file(name)]
        if not specific and DEFAULT_CONVENTION.tag_of(name) is not None:
            specific = [DEFAULT_CONVENTION]
        for c in specific:
            if c not in found:
                found.append(c)
    return found


# ------------------------------------------------------------------------------------------------------
# names of segments, labels and channels
# ------------------------------------------------------------------------------------------------------
#: Sub-region of a segment or label *name* (lower case); checked in order, so "non-enhancing" is core before
#: "enhancing" is tested. Composite regions ("whole tumor", "tumor core") and anything else match nothing.
REGION_NAME_PATTERNS: tuple[tuple[int, re.Pattern[str]], ...] = (
    (BACKGROUND, re.compile(r"^\s*(background|bg|unlabell?ed)\s*$")),
    (CORE, re.compile(r"non.?enhanc|necro|\bncr\b|\bnet\b|\bnetc\b|\bnec\b")),
    (ENHANCING, re.compile(r"enhanc|\bet\b")),
    (OEDEMA, re.compile(r"o?edem|\bed\b|\bsnfh\b|peritumou?ral")),
)
#: SNOMED CT codes of segmented property types with one sub-region (used when the label text says nothing).
REGION_CODES: dict[tuple[str, str], int] = {
    ("SCT", "79654002"): OEDEMA,  # Edema
    ("SCT", "6574001"): CORE,  # Necrosis
}


def region_of_name(*names: str | None, code: tuple[str, str] | None = None) -> int | None:
    """The fedfusion sub-region a segment/label is named as: the first of ``names`` that maps (e.g. a DICOM
    SegmentLabel, then the property type's CodeMeaning), else the coded property type ``(scheme, value)``;
    ``None`` when nothing maps (an unknown or composite region)."""
    for name in names:
        text = (name or "").strip().lower()
        if not text:
            continue
        for region, pattern in REGION_NAME_PATTERNS:
            if pattern.search(text):
                return region
    if code is not None:
        scheme, value = code
        return REGION_CODES.get((scheme.strip().upper(), value.strip()))
    return None


#: Channel / sequence names (lower case) -> fedfusion modality (MSD dataset.json "modality" values and the like).
MODALITY_NAMES: dict[str, str] = {
    "flair": "flair", "t2f": "flair", "t2-flair": "flair",
    "t1": "t1", "t1w": "t1", "t1n": "t1",
    "t1gd": "t1ce", "t1ce": "t1ce", "t1c": "t1ce", "t1-gd": "t1ce",
    "t2": "t2", "t2w": "t2",
    "ct": "ct", "us": "us",
}


def modality_of_name(name: str) -> str | None:
    """fedfusion modality of a channel name (``FLAIR``, ``T1w``, ``t1gd``, ``T2w`` …), or ``None``."""
    return MODALITY_NAMES.get(str(name).strip().lower())
