"""Write phantom cases as real DICOM series or BraTS-style NIfTI, and generate whole federations.

Layout (docs/architecture.md)::

    OUT/phantoms.json                      manifest: scenario, seed, shape, format, per-site modalities/cases/balance
    OUT/site-01/labels.csv                 case_id,label (rows left out for unlabelled cases; none at all when every
                                           case is: generate(unlabelled_fraction=...), mixed supervision)
    OUT/site-01/case-0001/005_t1_se_tra_post_Gd/IM0001.dcm ...   (DICOM: one folder per series, one file per slice)
    OUT/site-01/case-0001/case-0001_seg.nii.gz
    OUT/site-01/case-0002/case-0002_t1.nii.gz ... case-0002_seg.nii.gz                     (NIfTI layout)
    OUT/heldout/...                        held-out set the numbers are reported on: every modality, every case
    OUT/validation/...                     the server's model-selection set (same kind as heldout/)
    OUT/heldout-unseen/...                 held-out cohort from a scanner vendor no site has

DICOM files are Explicit VR Little Endian with file meta, MR/CT/US Image Storage, 16-bit pixels with
RescaleSlope/Intercept (CT: HU = stored - 1024; MR/US: slope chosen so the quantisation error is below
1/60000 of the series maximum, i.e. ``|read - volume| <= RescaleSlope / 2``), slice geometry from
:func:`common.data.geometry.dicom_geometry` (so :func:`common.data.geometry.dicom_affine` gives back
``case.affine``), vendor-style SeriesDescriptions and synthetic PHI (for de-identification tests). UIDs come
from :func:`pydicom.uid.generate_uid` with entropy from the seed, site and case: same seed, same UIDs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
import struct
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from common.layout import (COHORT_NAMES, DERIVED_CACHE, HELDOUT_NAME, PHANTOM_GENERATOR, PHANTOM_MANIFEST, SITE_PREFIX,
                           UNSEEN_NAME, VALIDATION_NAME)
from common.data.geometry import dicom_geometry, save_nifti
from models.atomic import atomic_write_text
from models.modalities import DICOM_MODALITY, MODALITIES, canonical

from .phantoms import DEFAULT_SITE, PhantomCase, SiteProfile, make_case
from .scenarios import heldout_profile, site_profiles, unseen_profile

#: Formats :func:`generate` writes.
FORMATS: tuple[str, ...] = ("dicom", "nifti")

MANIFEST = PHANTOM_MANIFEST
#: Marker of a generation in progress (a folder holding it may be regenerated without --overwrite).
PARTIAL_MARKER = ".phantoms-partial"

#: SeriesDescription per vendor and modality, as the scanner's protocol would name it ({dz} = slice thickness).
SERIES_DESCRIPTIONS: dict[str, dict[str, str]] = {
    "SIEMENS": {
        "t1": "t1_mprage_tra_iso", "t1ce": "t1_se_tra_post_Gd", "t2": "t2_tse_tra",
        "flair": "t2_tirm_tra_dark-fluid", "ct": "Head {dz:.1f} H30s", "us": "US 3D Intraop",
    },
    "GE MEDICAL SYSTEMS": {
        "t1": "AX T1 BRAVO", "t1ce": "AX T1 BRAVO +C", "t2": "AX T2 FSE", "flair": "AX T2 FLAIR",
        "ct": "HEAD STND {dz:.2f}mm", "us": "3D US VOLUME",
    },
    "Philips Medical Systems": {
        "t1": "T1W_3D_TFE", "t1ce": "T1W_3D_TFE post-Gd", "t2": "T2W_TSE", "flair": "T2W_FLAIR",
        "ct": "Brain {dz:.0f}mm UB", "us": "US Volume Brain",
    },
    "CANON_MEC": {
        "t1": "T1 SE AX", "t1ce": "T1 SE AX GAD", "t2": "T2 FSE AX", "flair": "FLAIR AX",
        "ct": "HEAD {dz:.1f} FC64", "us": "US 3D Abdomen",
    },
    "UIH": {
        "t1": "t1_gre_fsp_3d_tra", "t1ce": "t1_gre_fsp_3d_tra_+C", "t2": "t2_fse_tra", "flair": "t2_flair_tra",
        "ct": "Head {dz:.1f} B_SOFT_B", "us": "US 3D Neuro",
    },
}

_MODELS = {
    "SIEMENS": {"MR": "Skyra", "CT": "SOMATOM Definition AS", "US": "ACUSON Sequoia"},
    "GE MEDICAL SYSTEMS": {"MR": "SIGNA Premier", "CT": "Revolution CT", "US": "LOGIQ E10"},
    "Philips Medical Systems": {"MR": "Ingenia", "CT": "Brilliance 64", "US": "EPIQ 7"},
    "CANON_MEC": {"MR": "Vantage Orian", "CT": "Aquilion ONE", "US": "Aplio i800"},
    "UIH": {"MR": "uMR 780", "CT": "uCT 760", "US": "uSONIQUE"},
}
_KERNELS = {"SIEMENS": "H30s", "GE MEDICAL SYSTEMS": "STANDARD", "Philips Medical Systems": "UB", "CANON_MEC": "FC64",
            "UIH": "B_SOFT_B"}

#: SeriesNumber per modality (MR protocol order: post-contrast T1 last), also the series folder prefix.
SERIES_NUMBER: dict[str, int] = {"ct": 1, "t1": 2, "t2": 3, "flair": 4, "t1ce": 5, "us": 6}

#: MR sequence parameters: (ScanningSequence, SequenceVariant, TR ms, TE ms, TI ms or None, MRAcquisitionType).
_MR_SEQUENCE: dict[str, tuple[str, str, float, float, float | None, str]] = {
    "t1": ("GR\\IR", "SP\\MP", 2300.0, 2.3, 900.0, "3D"),
    "t1ce": ("SE", "SP", 550.0, 9.0, None, "2D"),
    "t2": ("SE", "SK\\SP", 5000.0, 95.0, None, "2D"),
    "flair": ("SE\\IR", "SK\\SP\\MP", 9000.0, 85.0, 2500.0, "2D"),
}

_SOP_CLASS = {"MR": "1.2.840.10008.5.1.4.1.1.4", "CT": "1.2.840.10008.5.1.4.1.1.2", "US": "1.2.840.10008.5.1.4.1.1.6.1"}

_FAMILY = ("Doe", "Roe", "Smith", "Novak", "Garcia", "Kowalski", "Müller", "Rossi", "Dubois", "Jansen", "Silva",
           "Nakamura", "Okafor", "Larsen", "Petrov", "Haddad")
_GIVEN = ("Jane", "John", "Alex", "Maria", "Sam", "Noor", "Ines", "Tomas", "Mei", "Lena", "Omar", "Ada", "Ravi",
          "Eva", "Jonas", "Zoe")

_UID_ROOT = "fedfusion-phantom"


def _ds(x: float) -> str:
    """A DICOM decimal string (at most 16 characters) for ``x``."""
    s = f"{float(x):.10g}"
    if len(s) > 16:
        s = f"{float(x):.8g}"
    return "0" if s == "-0" else s


def _uid(*parts: object) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[_UID_ROOT, *(str(p) for p in parts)]))


def _sanitize(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "series"


def series_description(modality: str, vendor: str, slice_thickness: float) -> str:
    """The SeriesDescription a ``vendor`` scanner writes for ``modality`` (never the internal modality name)."""
    return SERIES_DESCRIPTIONS[vendor][modality].format(dz=slice_thickness)


def _phi(uid_seed: int, site: SiteProfile, case_id: str) -> dict[str, str]:
    """Deterministic synthetic patient/study identity (to be removed by de-identification)."""
    digest = hashlib.sha256(f"{uid_seed}|{site.name}|{case_id}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    sex = "F" if rng.random() < 0.5 else "M"
    birth_year = int(rng.integers(1940, 2000))
    study_year = int(rng.integers(2018, 2025))
    return {
        "PatientName": f"{_FAMILY[rng.integers(len(_FAMILY))]}^{_GIVEN[rng.integers(len(_GIVEN))]}",
        "PatientID": f"P{int.from_bytes(digest[8:12], 'little') % 10**8:08d}",
        "PatientBirthDate": f"{birth_year}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
        "PatientSex": sex,
        "PatientAge": f"{study_year - birth_year:03d}Y",
        "StudyDate": f"{study_year}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
        "StudyTime": f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}",
        "AccessionNumber": f"A{int.from_bytes(digest[12:16], 'little') % 10**9:09d}",
        "ReferringPhysicianName": f"{_FAMILY[rng.integers(len(_FAMILY))]}^{_GIVEN[rng.integers(len(_GIVEN))]}^^Dr",
        "OperatorsName": f"{_FAMILY[rng.integers(len(_FAMILY))]}^{_GIVEN[rng.integers(len(_GIVEN))]}",
        "StudyID": str(int(rng.integers(1000, 99999))),
    }


def _stored_pixels(vol: np.ndarray, modality_tag: str) -> tuple[np.ndarray, str, str, int]:
    """(stored array, RescaleSlope, RescaleIntercept, PixelRepresentation) for a volume in physical units."""
    if modality_tag == "CT":
        # the usual CT encoding: unsigned 16 bit, HU = stored * 1 - 1024 (quantisation <= 0.5 HU)
        stored = np.clip(np.rint(vol.astype(np.float64) + 1024.0), 0, 65535).astype("<u2")
        return stored, "1", "-1024", 0
    vmax = float(np.max(vol)) if vol.size else 0.0
    if vmax <= 0.0:
        return np.zeros(vol.shape, dtype="<u2"), "1", "0", 0
    slope_text = f"{vmax / 60000.0:.6g}"  # parsed back by readers exactly as written
    slope = float(slope_text)
    stored = np.clip(np.rint(np.maximum(vol.astype(np.float64), 0.0) / slope), 0, 65535).astype("<u2")
    return stored, slope_text, "0", 0


def write_case_dicom(case: PhantomCase, case_dir: Path, site: SiteProfile | None = None, uid_seed: int = 0,
                     with_seg: bool = True) -> None:
    """Write each acquired modality of ``case`` as a DICOM series (one file per slice) plus the NIfTI seg.

    Series go to ``case_dir/<SeriesNumber:03d>_<SeriesDescription>/IM0001.dcm ...``; the segmentation to
    ``case_dir/<case_id>_seg.nii.gz``. ``site`` gives vendor, institution and protocol names (default profile
    otherwise); ``uid_seed`` (with the site name and case id) makes every UID deterministic.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    site = site or DEFAULT_SITE
    case_dir = Path(case_dir)
    case_dir.mkdir(parents=True, exist_ok=True)
    key = (uid_seed, site.name, case.case_id)
    phi = _phi(uid_seed, site, case.case_id)
    study_uid = _uid(*key, "study")
    frame_uids = {tag: _uid(*key, "frame", tag) for tag in ("MR", "CT", "US")}
    shape = next(iter(case.volumes.values())).shape if case.volumes else case.seg.shape
    D, H, W = shape
    positions = [dicom_geometry(case.affine, k)[0] for k in range(D)]
    _, orientation, pixel_spacing, thickness = dicom_geometry(case.affine, 0)
    normal = np.cross(orientation[:3], orientation[3:])

    for modality in MODALITIES:
        if modality not in case.volumes:
            continue
        vol = case.volumes[modality]
        if vol.shape != case.seg.shape:
            raise ValueError(f"{case.case_id}: {modality} volume shape {vol.shape} differs from seg {case.seg.shape}")
        tag = DICOM_MODALITY[modality]
        number = SERIES_NUMBER[modality]
        description = series_description(modality, site.vendor, thickness)
        series_uid = _uid(*key, "series", modality)
        stored, slope, intercept, representation = _stored_pixels(vol, tag)
        series_dir = case_dir / f"{number:03d}_{_sanitize(description)}"
        series_dir.mkdir(parents=True, exist_ok=True)

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = _SOP_CLASS[tag]
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "FEDFUSION_PH"
        ds = FileDataset(str(series_dir / "IM0001.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if tag != "US" else ["ORIGINAL", "PRIMARY"]
        ds.SOPClassUID = _SOP_CLASS[tag]
        for name in ("StudyDate", "StudyTime"):
            setattr(ds, name, phi[name])
        ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = phi["StudyDate"]
        ds.AccessionNumber = phi["AccessionNumber"]
        ds.Modality = tag
        ds.Manufacturer = site.vendor
        ds.InstitutionName = site.institution
        ds.ReferringPhysicianName = phi["ReferringPhysicianName"]
        ds.StationName = f"{site.name.upper().replace('-', '')[:12]}{tag}01"  # SH: at most 16 characters
        ds.StudyDescription = "BRAIN TUMOUR WORKUP"
        ds.SeriesDescription = description
        ds.OperatorsName = phi["OperatorsName"]
        ds.ManufacturerModelName = _MODELS[site.vendor][tag]
        ds.PatientName = phi["PatientName"]
        ds.PatientID = phi["PatientID"]
        ds.PatientBirthDate = phi["PatientBirthDate"]
        ds.PatientSex = phi["PatientSex"]
        ds.PatientAge = phi["PatientAge"]
        ds.BodyPartExamined = "HEAD"
        ds.SliceThickness = _ds(thickness)
        ds.SpacingBetweenSlices = _ds(thickness)
        if tag == "MR":
            seq, variant, tr, te, ti, acq = _MR_SEQUENCE[modality]
            ds.ScanningSequence = seq.split("\\")
            ds.SequenceVariant = variant.split("\\")
            ds.MRAcquisitionType = acq
            ds.RepetitionTime = _ds(tr)
            ds.EchoTime = _ds(te)
            if ti is not None:
                ds.InversionTime = _ds(ti)
            ds.MagneticFieldStrength = "3" if site.vendor in ("SIEMENS", "Philips Medical Systems") else "1.5"
            if modality == "t1ce":
                ds.ContrastBolusAgent = "Gadobutrol 0.1 mmol/kg"
        elif tag == "CT":
            ds.KVP = "120"
            ds.ConvolutionKernel = _KERNELS[site.vendor]
            ds.ContrastBolusAgent = "Iohexol"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = phi["StudyID"]
        ds.SeriesNumber = number
        ds.AcquisitionNumber = 1
        ds.ImageOrientationPatient = [_ds(v) for v in orientation]
        ds.FrameOfReferenceUID = frame_uids[tag]
        ds.PositionReferenceIndicator = ""
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = H
        ds.Columns = W
        ds.PixelSpacing = [_ds(v) for v in pixel_spacing]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = representation
        if tag == "CT":
            ds.WindowCenter, ds.WindowWidth = "40", "80"
        else:
            hi = float(np.percentile(vol, 99.5))
            ds.WindowCenter, ds.WindowWidth = _ds(hi / 2), _ds(max(hi, 1.0))
        ds.RescaleIntercept = intercept
        ds.RescaleSlope = slope
        if tag == "CT":
            ds.RescaleType = "HU"

        # one template per series, serialised once; per slice only five elements are encoded and spliced in
        encode = _SliceEncoder(ds)
        for k in range(D):
            data = encode(
                sop_uid=_uid(*key, "instance", modality, k),
                instance=k + 1,
                position=positions[k],
                location=float(np.dot(normal, positions[k])),
                pixels=stored[k].tobytes(),
            )
            (series_dir / f"IM{k + 1:04d}.dcm").write_bytes(data)

    if with_seg:
        save_nifti(case.seg.astype(np.uint8), case.affine, case_dir / f"{case.case_id}_seg.nii.gz")


def write_case_nifti(case: PhantomCase, case_dir: Path, with_seg: bool = True) -> None:
    """BraTS layout: ``case_dir/<case_id>_<modality>.nii.gz`` (float32) for each acquired modality, plus
    ``<case_id>_seg.nii.gz`` (uint8, unless ``with_seg`` is False), all with ``case.affine``."""
    case_dir = Path(case_dir)
    case_dir.mkdir(parents=True, exist_ok=True)
    for modality in MODALITIES:
        if modality in case.volumes:
            save_nifti(case.volumes[modality].astype(np.float32), case.affine,
                       case_dir / f"{case.case_id}_{modality}.nii.gz")
    if with_seg:
        save_nifti(case.seg.astype(np.uint8), case.affine, case_dir / f"{case.case_id}_seg.nii.gz")


# ---------------------------------------------------------------------------------------------------------------
# fast DICOM encoding: the series template is serialised by pydicom once; per slice five elements change
# ---------------------------------------------------------------------------------------------------------------

#: Tags that change from slice to slice, in ascending tag order (Explicit VR Little Endian writes sorted tags).
_PER_SLICE_TAGS: tuple[tuple[int, str], ...] = (
    (0x00080018, "UI"),  # SOPInstanceUID
    (0x00200013, "IS"),  # InstanceNumber
    (0x00200032, "DS"),  # ImagePositionPatient
    (0x00201041, "DS"),  # SliceLocation
    (0x7FE00010, "OW"),  # PixelData
)
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT"}


def _element(tag: int, vr: str, value: bytes) -> bytes:
    """One Explicit VR Little Endian data element (value already padded to even length)."""
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value


def _even(text: str, pad: bytes = b" ") -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


class _SliceEncoder:
    """Encodes the files of one series exactly as ``Dataset.save_as(..., enforce_file_format=True)`` would,
    at a fraction of the cost: the template's static elements are written by pydicom once, in the segments
    between the per-slice tags, and each slice splices in its own SOPInstanceUID, InstanceNumber,
    ImagePositionPatient, SliceLocation and PixelData (plus the file meta holding the instance UID)."""

    def __init__(self, template: Any) -> None:
        from pydicom.dataset import Dataset
        from pydicom.filebase import DicomBytesIO
        from pydicom.filewriter import write_dataset

        meta = template.file_meta
        self._sop_class = _even(str(meta.MediaStorageSOPClassUID), b"\0")
        self._meta_tail = (
            _element(0x00020010, "UI", _even(str(meta.TransferSyntaxUID), b"\0"))
            + _element(0x00020012, "UI", _even(str(meta.ImplementationClassUID), b"\0"))
            + _element(0x00020013, "SH", _even(str(meta.ImplementationVersionName)))
        )
        bounds = [t for t, _ in _PER_SLICE_TAGS] + [0xFFFFFFFF]
        segments: list[bytes] = []
        lower = -1
        for upper in bounds:
            part = Dataset()
            for elem in template:
                if lower < int(elem.tag) < upper:
                    part.add(elem)
            fp = DicomBytesIO()
            fp.is_little_endian = True
            fp.is_implicit_VR = False
            write_dataset(fp, part)
            segments.append(fp.getvalue())
            lower = upper
        self._segments = segments

    def __call__(self, sop_uid: str, instance: int, position: Sequence[float], location: float,
                 pixels: bytes) -> bytes:
        uid = _even(sop_uid, b"\0")
        meta = (
            _element(0x00020001, "OB", b"\x00\x01")
            + _element(0x00020002, "UI", self._sop_class)
            + _element(0x00020003, "UI", uid)
            + self._meta_tail
        )
        values = (
            uid,
            _even(str(int(instance))),
            _even("\\".join(_ds(v) for v in position)),
            _even(_ds(location)),
            pixels if len(pixels) % 2 == 0 else pixels + b"\0",
        )
        parts = [b"\0" * 128, b"DICM", _element(0x00020000, "UL", struct.pack("<I", len(meta))), meta]
        for segment, (tag, vr), value in zip(self._segments, _PER_SLICE_TAGS, values):
            parts.append(segment)
            parts.append(_element(tag, vr, value))
        parts.append(self._segments[-1])
        return b"".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# whole federations
# ---------------------------------------------------------------------------------------------------------------


def case_id(index: int) -> str:
    """Site-local case id of case ``index`` (0-based): ``case-0001``, ..."""
    return f"case-{index + 1:04d}"


def plan_site(site: SiteProfile, rng: np.random.Generator) -> list[tuple[str, int, tuple[str, ...]]]:
    """The cases of a site: ``(case_id, label, acquired modalities)``.

    The class balance is realised exactly (rounded; at least one case of each class when the site has two or
    more cases); each acquired series goes missing with ``site.missing_rate`` but every case keeps one.
    """
    n = site.n_cases
    n_mal = int(round(site.malignant_fraction * n))
    if n >= 2:
        n_mal = min(max(n_mal, 1), n - 1)
    labels = rng.permutation(np.array([1] * n_mal + [0] * (n - n_mal), dtype=int))
    plan = []
    for i in range(n):
        mods = tuple(m for m in site.modalities if rng.random() >= site.missing_rate)
        if not mods:
            mods = (site.modalities[int(rng.integers(len(site.modalities)))],)
        plan.append((case_id(i), int(labels[i]), mods))
    return plan


def partial_supervision(n_cases: int, unlabelled_fraction: float, unsegmented_fraction: float,
                        rng: np.random.Generator) -> tuple[set[int], set[int]]:
    """Which of a site's ``n_cases`` cases lack a label and which lack a segmentation: ``round(fraction * n)`` each,
    drawn without overlap (a case with neither would have nothing to train on), from ``rng``.

    Raises:
        ValueError: a fraction outside [0, 1], or fractions summing past 1.
    """
    for name, f in (("unlabelled_fraction", unlabelled_fraction), ("unsegmented_fraction", unsegmented_fraction)):
        if not 0.0 <= float(f) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {f}")
    if unlabelled_fraction + unsegmented_fraction > 1.0 + 1e-9:
        raise ValueError(f"unlabelled_fraction + unsegmented_fraction must be at most 1 (every case keeps a target), "
                         f"got {unlabelled_fraction} + {unsegmented_fraction}")
    n_unlabelled = int(round(unlabelled_fraction * n_cases))
    n_unsegmented = min(int(round(unsegmented_fraction * n_cases)), n_cases - n_unlabelled)
    order = [int(i) for i in rng.permutation(n_cases)]
    return set(order[:n_unlabelled]), set(order[n_unlabelled : n_unlabelled + n_unsegmented])


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse to clobber anything that is not an earlier phantom generation."""
    if (out / MANIFEST).exists():
        if not overwrite:
            raise FileExistsError(
                f"{out} already holds phantoms ({MANIFEST}); pass --overwrite to regenerate or choose another --out"
            )
        return
    if (out / PARTIAL_MARKER).exists():
        return  # an interrupted generation: ours to redo
    taken = [p.name for p in out.glob("*") if p.is_dir() and (p.name.startswith(SITE_PREFIX) or p.name in COHORT_NAMES)]
    if taken:
        raise FileExistsError(
            f"{out} already holds {', '.join(sorted(taken))} but no {MANIFEST}: it may be real data; "
            "choose an empty --out folder"
        )


def _clear_previous(out: Path) -> None:
    for p in out.glob("*"):
        if p.is_dir() and (p.name.startswith(SITE_PREFIX) or p.name in COHORT_NAMES):
            shutil.rmtree(p)
    # what simulations derived from the previous phantoms (common.layout.derived_cache_dir): stale now
    shutil.rmtree(out / DERIVED_CACHE, ignore_errors=True)
    (out / MANIFEST).unlink(missing_ok=True)


def generate(
    out: Path,
    sites: int = 3,
    cases_per_site: int = 20,
    seed: int = 0,
    scenario: str = "realistic",
    shape: Sequence[int] = (32, 64, 64),
    fmt: str = "dicom",
    heldout_cases: int = 12,
    progress: bool = False,
    overwrite: bool = False,
    missing_fraction: float | None = None,
    validation_cases: int | None = None,
    unseen_cases: int | None = None,
    unlabelled_fraction: float = 0.0,
    unsegmented_fraction: float = 0.0,
    modalities: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Generate a federation of phantom sites plus its held-out cohorts under ``out``; return the manifest.

    Args:
        out: folder to write (created); refuses a folder with earlier phantoms unless ``overwrite``, and a
            folder with site-like data that is not phantoms always.
        sites: number of hospital sites (``site-01`` ...).
        cases_per_site: cases per site (the ``realistic`` scenario varies it per site by +-30 %).
        seed: everything (anatomy, noise, labels, UIDs, PHI) is a function of it.
        scenario: one of :data:`simulations.scenarios.SCENARIOS`.
        shape: reference grid ``(D, H, W)``.
        fmt: ``dicom`` or ``nifti``.
        heldout_cases: cases of the held-out set the numbers are reported on (``heldout/``, all modalities); 0 writes
            none.
        validation_cases: cases of the model-selection set (``validation/``, like ``heldout/``); ``None``: as
            many as ``heldout_cases``; 0 writes none.
        unseen_cases: cases of the unseen-scanner cohort (``heldout-unseen/``,
            :func:`simulations.scenarios.unseen_profile`); ``None``: as many as ``heldout_cases``; 0 writes none.
        progress: show a rich progress bar.
        overwrite: replace an earlier phantom generation in ``out``.
        missing_fraction: if given, each site lacks this share of the modalities (site level, exact; see
            :func:`simulations.scenarios.with_missing_fraction`), overriding the scenario's modality choice.
        unlabelled_fraction, unsegmented_fraction: mixed supervision (docs/site.md): this share of each hospital
            site's cases is left out of its ``labels.csv`` / written without a segmentation (disjoint cases,
            :func:`partial_supervision`; a site whose every case is unlabelled gets no ``labels.csv`` at all). The
            held-out cohorts keep both targets. Default 0: nothing changes (same cases, same files).
        modalities: if given, every site and cohort acquires only these of its modalities (e.g. the four MRI
            sequences for a public cohort like BraTS, which has no CT or ultrasound); ``None``: the scenario's.

    Returns:
        the manifest, also written to ``out/phantoms.json``.
    """
    fmt = fmt.strip().lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown phantom format {fmt!r}; choose one of {', '.join(FORMATS)}")
    shape_t = tuple(int(s) for s in shape)
    if len(shape_t) != 3 or min(shape_t) < 8:
        raise ValueError(f"--shape must be three sizes D H W of at least 8 voxels each, got {tuple(shape)}")
    cohorts = _cohort_sizes(heldout_cases, validation_cases, unseen_cases)
    partial_supervision(0, unlabelled_fraction, unsegmented_fraction, np.random.default_rng(0))  # checks the fractions
    keep = _kept_modalities(modalities)
    profiles = site_profiles(scenario, sites, cases_per_site, seed, missing_fraction=missing_fraction)
    groups: list[tuple[int, SiteProfile]] = list(enumerate(profiles))
    # negative indices are cohorts; each group draws from stream ``index + 1`` (sites 1.., heldout 0 as in earlier
    # versions) or, for the newer cohorts, a stream far from any site's
    cohort_profiles = {HELDOUT_NAME: heldout_profile, VALIDATION_NAME: lambda n: heldout_profile(n, VALIDATION_NAME),
                       UNSEEN_NAME: unseen_profile}
    for k, (name, n) in enumerate(cohorts.items()):
        if n:
            groups.append((-1 - k, cohort_profiles[name](n)))
    if keep is not None:
        groups = [(index, _restricted(site, keep)) for index, site in groups]

    def stream(index: int) -> int:
        return index + 1 if index >= -1 else 100_000 - index

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_out(out, overwrite)
    (out / PARTIAL_MARKER).write_text("fedfusion phantom generation in progress\n")
    _clear_previous(out)

    plans = []
    for index, site in groups:
        plan_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 3, stream(index)]))
        plans.append((index, site, plan_site(site, plan_rng)))
    total = sum(len(p) for _, _, p in plans)

    manifest: dict[str, Any] = {
        "generator": PHANTOM_GENERATOR,
        "version": 1,
        "scenario": scenario,
        "missing_fraction": missing_fraction,
        "seed": int(seed),
        "shape": list(shape_t),
        "format": fmt,
        "modalities": list(keep or MODALITIES),
        # what was asked for, so that :func:`ensure` reuses this folder only for the same request
        "request": _request(sites, cases_per_site, seed, scenario, shape_t, fmt, cohorts, missing_fraction,
                            unlabelled_fraction, unsegmented_fraction, keep),
        "sites": {},
        "heldout": None,
        "cohorts": {},
    }

    def run(advance: Any) -> None:
        for index, site, plan in plans:
            site_dir = out / site.name
            site_dir.mkdir(parents=True, exist_ok=True)
            rows = []
            counts = {m: 0 for m in MODALITIES}
            unlabelled, unsegmented = set(), set()
            if index >= 0 and (unlabelled_fraction or unsegmented_fraction):
                # its own stream: the cases themselves are the same as without partial supervision
                unlabelled, unsegmented = partial_supervision(
                    len(plan), unlabelled_fraction, unsegmented_fraction,
                    np.random.default_rng(np.random.SeedSequence([int(seed), 4, stream(index)])))
            for ci, (cid, label, mods) in enumerate(plan):
                rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1, stream(index), ci]))
                case = make_case(rng, cid, shape_t, site=site, modalities=mods, label=label)
                if fmt == "dicom":
                    write_case_dicom(case, site_dir / cid, site=site, uid_seed=int(seed),
                                     with_seg=ci not in unsegmented)
                else:
                    write_case_nifti(case, site_dir / cid, with_seg=ci not in unsegmented)
                rows.append((cid, case.label))
                for m in case.volumes:
                    counts[m] += 1
                advance(site.name)
            labelled_rows = [row for ci, row in enumerate(rows) if ci not in unlabelled]
            if labelled_rows or not rows:
                with open(site_dir / "labels.csv", "w", newline="") as fh:
                    writer = csv.writer(fh, lineterminator="\n")
                    writer.writerow(["case_id", "label"])
                    writer.writerows(labelled_rows)
            n_mal = sum(label for _, label in rows)
            entry = {
                "modalities": list(site.modalities),
                "cases": len(rows),
                "malignant": n_mal,
                "benign": len(rows) - n_mal,
                "malignant_fraction": round(n_mal / len(rows), 4) if rows else 0.0,
                "cases_per_modality": {m: c for m, c in counts.items() if c},
                "cases_missing_series": sum(1 for _, _, mods in plan if len(mods) < len(site.modalities)),
                "missing_rate": round(site.missing_rate, 4),
                "vendor": site.vendor,
                "institution": site.institution,
                "spacing_mm": [round(s, 4) for s in site.spacing(shape_t)],
                "noise": round(site.noise, 4),
                "gain": {m: round(g, 4) for m, g in site.gain.items()},
            }
            if unlabelled or unsegmented:
                entry["unlabelled"] = sorted(rows[ci][0] for ci in unlabelled)
                entry["unsegmented"] = sorted(rows[ci][0] for ci in unsegmented)
            if index < 0:
                manifest["cohorts"][site.name] = entry
                if site.name == HELDOUT_NAME:
                    manifest["heldout"] = entry
            else:
                manifest["sites"][site.name] = entry

    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("[bold]phantoms[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), transient=False,
        ) as bar:
            task = bar.add_task("", total=total)
            run(lambda name: bar.update(task, advance=1, description=name))
    else:
        run(lambda name: None)

    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    (out / PARTIAL_MARKER).unlink(missing_ok=True)
    return manifest


def _cohort_sizes(heldout: int, validation: int | None, unseen: int | None) -> dict[str, int]:
    """Cases per held-out cohort, in :data:`common.layout.COHORT_NAMES` order (``None``: as many as ``heldout``)."""
    sizes = {HELDOUT_NAME: heldout, VALIDATION_NAME: heldout if validation is None else validation,
             UNSEEN_NAME: heldout if unseen is None else unseen}
    for name, n in sizes.items():
        if int(n) < 0:
            raise ValueError(f"cases of the {name}/ cohort must be 0 or more, got {n}")
    return {name: int(n) for name, n in sizes.items()}


def _kept_modalities(modalities: Sequence[str] | None) -> tuple[str, ...] | None:
    """``modalities`` in canonical order (``None`` stays ``None``: every modality the scenario gives).

    Raises:
        ValueError: an unknown or empty list, naming the valid modalities.
    """
    return None if modalities is None else canonical(str(m) for m in modalities)


def _restricted(site: SiteProfile, keep: tuple[str, ...]) -> SiteProfile:
    kept = tuple(m for m in site.modalities if m in keep)
    if not kept:
        raise ValueError(f"{site.name} acquires {', '.join(site.modalities)} and none of the requested modalities "
                         f"{', '.join(keep)}; choose a scenario whose sites have them (e.g. scanner-skew)")
    return replace(site, modalities=kept)


def _request(sites: int, cases_per_site: int, seed: int, scenario: str, shape: Sequence[int], fmt: str,
             cohorts: dict[str, int], missing_fraction: float | None, unlabelled_fraction: float = 0.0,
             unsegmented_fraction: float = 0.0, modalities: tuple[str, ...] | None = None) -> dict[str, Any]:
    out = {"sites": int(sites), "cases_per_site": int(cases_per_site), "seed": int(seed), "scenario": scenario,
           "shape": [int(s) for s in shape], "format": fmt.strip().lower(), "cohorts": dict(cohorts),
           "missing_fraction": missing_fraction}
    if unlabelled_fraction or unsegmented_fraction:  # absent at 0: earlier generations' requests stay equal
        out.update(unlabelled_fraction=float(unlabelled_fraction), unsegmented_fraction=float(unsegmented_fraction))
    if modalities is not None:  # absent when unrestricted, as above
        out["modalities"] = list(modalities)
    return out


def ensure(out: Path, *, sites: int = 3, cases_per_site: int = 20, seed: int = 0, scenario: str = "realistic",
           shape: Sequence[int] = (32, 64, 64), fmt: str = "dicom", heldout_cases: int = 12, progress: bool = False,
           missing_fraction: float | None = None, validation_cases: int | None = None,
           unseen_cases: int | None = None, unlabelled_fraction: float = 0.0,
           unsegmented_fraction: float = 0.0,
           modalities: Sequence[str] | None = None) -> tuple[dict[str, Any], bool]:
    """The phantoms of :func:`generate` for this request in ``out``: reused when a complete earlier generation there
    was asked for with the same arguments, (re)generated otherwise. Returns ``(manifest, reused)``."""
    out = Path(out)
    request = _request(sites, cases_per_site, seed, scenario, shape, fmt,
                       _cohort_sizes(heldout_cases, validation_cases, unseen_cases), missing_fraction,
                       unlabelled_fraction, unsegmented_fraction, _kept_modalities(modalities))
    if (out / MANIFEST).is_file() and not (out / PARTIAL_MARKER).exists():
        try:
            manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            manifest = {}
        if manifest.get("request") == request:
            return manifest, True
    manifest = generate(out, sites=sites, cases_per_site=cases_per_site, seed=seed, scenario=scenario, shape=shape,
                        fmt=fmt, heldout_cases=heldout_cases, progress=progress, overwrite=True,
                        missing_fraction=missing_fraction, validation_cases=validation_cases,
                        unseen_cases=unseen_cases, unlabelled_fraction=unlabelled_fraction,
                        unsegmented_fraction=unsegmented_fraction, modalities=modalities)
    return manifest, False
