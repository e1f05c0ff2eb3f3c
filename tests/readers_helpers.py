"""Small DICOM/NIfTI writers for the reader tests (built on pydicom's real CT_small.dcm as a template, so the
files carry realistic header fields, PatientName and friends included)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.data.geometry import dicom_geometry, save_nifti

#: Header strings of the template and the ones we stamp on: none may ever reach a dataset item.
PHI_STRINGS: tuple[str, ...] = ("CompressedSamples", "1CT1", "20040119", "JFK IMAGING", "Doe^Jane", "PID-4711",
                                "19700101", "St Elsewhere")


def _template() -> "object":
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-4711"
    ds.PatientBirthDate = "19700101"
    ds.InstitutionName = "St Elsewhere"
    return ds


def write_series(
    folder: Path,
    vol: np.ndarray,
    affine: np.ndarray,
    description: str,
    modality: str = "MR",
    uid_root: str = "1.2.826.0.1.3680043.8.498.",
    series_no: int = 1,
    skip_slices: Sequence[int] = (),
    slope: float | None = None,
) -> list[Path]:
    """Write ``vol`` ``(D, H, W)`` (RAS ``affine``) as a single-frame DICOM series; returns the file paths.

    Pixels are stored as int16 with RescaleSlope/Intercept chosen to cover the value range (``slope`` fixes it).
    Files are written in reverse slice order with shuffled names so the reader must sort by position.
    """
    from pydicom.uid import ExplicitVRLittleEndian

    folder.mkdir(parents=True, exist_ok=True)
    lo, hi = float(vol.min()), float(vol.max())
    if slope is None:
        slope = max(hi - lo, 1e-6) / 60000.0
    intercept = lo + 30000.0 * slope
    series_uid = f"{uid_root}{series_no}"
    paths = []
    for k in reversed(range(vol.shape[0])):
        if k in skip_slices:
            continue
        ds = copy.deepcopy(_template())
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        position, orientation, spacing, thickness = dicom_geometry(affine, k)
        stored = np.round((vol[k] - intercept) / slope).astype(np.int16)
        ds.Modality = modality
        ds.SeriesDescription = description
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = f"{series_uid}.{k + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.PixelSpacing = [f"{v:.6f}" for v in spacing]
        ds.SliceThickness = f"{thickness:.6f}"
        ds.Rows, ds.Columns = stored.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.RescaleSlope = f"{slope:.10g}"
        ds.RescaleIntercept = f"{intercept:.10g}"
        ds.PixelData = stored.tobytes()
        path = folder / f"IM{(k * 7919) % 1000:04d}_{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def simple_affine(spacing: Sequence[float] = (2.0, 1.0, 1.0), origin: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """An axial RAS affine for ``vol[k, j, i]``: k -> superior, j -> posterior, i -> left (DICOM axial)."""
    aff = np.zeros((4, 4))
    aff[2, 0] = spacing[0]  # k -> +S
    aff[1, 1] = -spacing[1]  # j -> -A (posterior)
    aff[0, 2] = -spacing[2]  # i -> -R (left)
    aff[:3, 3] = origin
    aff[3, 3] = 1.0
    return aff


def make_volume(shape: Sequence[int], seed: int = 0, lo: float = 0.0, hi: float = 1000.0) -> np.ndarray:
    """Smooth-ish random test volume ``(D, H, W)`` float32 in ``[lo, hi]``."""
    rng = np.random.default_rng(seed)
    d, h, w = shape
    z, y, x = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    vol = lo + (hi - lo) * (0.5 + 0.25 * np.sin(x / 2.0 + seed) * np.cos(y / 3.0) + 0.05 * z / max(d, 1))
    vol += rng.normal(0, (hi - lo) * 0.01, shape)
    return vol.astype(np.float32)


def make_seg(shape: Sequence[int]) -> np.ndarray:
    """A small lesion: oedema shell, core, enhancing rim labels 1..3 around the centre."""
    d, h, w = shape
    z, y, x = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    r = np.sqrt(((z - d / 2) / max(d / 4, 1)) ** 2 + ((y - h / 2) / (h / 4)) ** 2 + ((x - w / 2) / (w / 4)) ** 2)
    seg = np.zeros(shape, dtype=np.uint8)
    seg[r < 1.0] = 1
    seg[r < 0.7] = 3
    seg[r < 0.4] = 2
    return seg


def write_site(
    root: Path,
    cases: dict[str, dict[str, np.ndarray]],
    labels: dict[str, int],
    affine: np.ndarray,
    fmt: str = "dicom",
    descriptions: dict[str, str] | None = None,
    seg: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write a site folder: ``cases[case_id][modality] = vol``; ``seg[case_id]`` as ``<case>_seg.nii.gz``."""
    descriptions = descriptions or {"t1": "t1_mprage_sag", "t1ce": "AX T1 POST GD", "t2": "T2 TSE AX",
                                    "flair": "AX FLAIR", "ct": "HEAD 5mm", "us": "US"}
    tags = {"ct": "CT", "us": "US"}
    root.mkdir(parents=True, exist_ok=True)
    (root / "labels.csv").write_text("case_id,label\n" + "".join(f"{c},{v}\n" for c, v in labels.items()))
    for n, (case_id, vols) in enumerate(cases.items()):
        case_dir = root / case_id
        case_dir.mkdir(parents=True, exist_ok=True)
        for s, (m, vol) in enumerate(vols.items()):
            if fmt == "dicom":
                write_series(case_dir / "study" / f"series{s}", vol, affine, descriptions[m], tags.get(m, "MR"),
                             uid_root=f"1.2.826.0.1.3680043.8.498.{n + 1}.", series_no=s + 1)
            else:
                save_nifti(vol, affine, case_dir / f"{case_id}_{m}.nii.gz")
        if seg is not None and case_id in seg:
            save_nifti(seg[case_id], affine, case_dir / f"{case_id}_seg.nii.gz")
    return root
