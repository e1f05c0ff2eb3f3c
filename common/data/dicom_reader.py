"""DICOM study reader: a case folder of DICOM files (any nesting) -> one volume per fedfusion modality.

Steps: walk the folder; read every file's header (``stop_before_pixels``) to group files into series by
SeriesInstanceUID and to catch corrupt, truncated and non-image files early; name each series' modality with a
:class:`~common.data.series_mapping.SeriesMapping`; read the pixels of the chosen series only; sort slices by
their position along the slice normal (ImagePositionPatient · (row × column)); apply RescaleSlope/Intercept;
stack ``vol[k, j, i]`` with the RAS affine of :func:`common.data.geometry.dicom_affine`.

Every file is untrusted: whatever is wrong with one file (corrupt, truncated, a header value that cannot be parsed,
over a :class:`~common.data.limits.ReaderLimits` bound) becomes a :class:`~common.data.problems.Problem` naming that
file (and the element), and the other files of the case are still read. Sizes are checked from the headers before
anything is inflated, decoded or allocated.

Enhanced (multi-frame) objects — Enhanced MR/CT and their Legacy Converted forms, dispatched by their functional
groups — are read frame by frame, each frame with its own plane position, orientation, pixel spacing and rescale
(PerFrameFunctionalGroupsSequence, else SharedFunctionalGroupsSequence). A DICOM Segmentation object (SEG) in the
case folder is the case's segmentation, placed on the grid of the series it references (:mod:`common.data.dicom_seg`).
Compressed transfer syntaxes decode through pydicom's plugins (pylibjpeg with libjpeg/openjpeg/rle, pyjpegls).

Header strings (names, IDs, dates, UIDs) never leave this module: callers get arrays, affines, the problems found,
a :class:`SeriesSummary` (folder, description, modality) for the site's own inspection report, and the case's
*patient keys*: each file's PatientID, keyed-hashed (:func:`patient_key`, HMAC-SHA256 with the caller's salt) right
where the header is read, so the site can group a patient's studies (its privacy unit) without the ID itself ever
leaving this module.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from models.modalities import MODALITIES

from .bounded_io import raw_deflate_size
from .case_files import list_case_files
from .dicom_seg import SegError, is_seg, referenced_uids, seg_labels_on_grid
from .dicom_values import BadHeaderValue, header_float, header_floats, header_int, header_orientation, header_value
from .geometry import dicom_affine
from .limits import DEFAULT_LIMITS, LimitExceeded, ReaderLimits, check_file_size, check_voxels
from .problems import ERROR, WARNING, Problem
from .series_mapping import IGNORE, SeriesMapping

log = logging.getLogger(__name__)

#: File name endings that are never DICOM and are skipped silently when walking a case folder.
NON_DICOM_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz", ".csv", ".json", ".toml", ".txt", ".md", ".npz", ".npy")
#: Endings (lower case) of files that should be DICOM: failing to read them is reported.
DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom", ".ima", ".dic")
#: Modality tag values of objects without an image (reported as non-image DICOM).
NON_IMAGE_MODALITIES = {"SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTRECORD", "REG", "DOC", "AU", "ECG"}
#: Modality tag values of image objects (a missing PixelData then means a truncated file).
IMAGE_MODALITIES = {"MR", "CT", "US", "PT", "NM", "CR", "DX", "MG", "XA", "RF", "OT", "SC", "RTDOSE"}
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: ``DicomSeries.modality`` of a series of segmentation objects.
SEG_TARGET = "seg"

#: Largest fraction of missing slices of a series that is filled by interpolation (else the series is dropped).
MAX_MISSING_FRACTION = 0.25


class SeriesError(ValueError):
    """A series that cannot be turned into a volume; ``problem`` says why."""

    def __init__(self, problem: Problem, extra: Sequence[Problem] = ()) -> None:
        super().__init__(str(problem))
        self.problem = problem
        #: problems found before giving up (e.g. the unreadable slices), reported alongside ``problem``
        self.extra = list(extra)

    @property
    def problems(self) -> list[Problem]:
        return [*self.extra, self.problem]


@dataclass
class _FileHeader:
    """What grouping needs from one file's header (internal; holds header values, never leaves the module)."""

    path: Path
    series_uid: str
    sop_uid: str
    modality_tag: str
    description: str
    instance: int
    frames: int
    voxels: int
    patient: str = ""  # keyed hash of PatientID (:func:`patient_key`), "" when the file has none
    sop_class: str = ""


def patient_key(patient_id: str, salt: bytes) -> str:
    """A site-local pseudonym of a patient identifier: HMAC-SHA256 of ``patient_id`` under ``salt`` (hex, 32 chars).

    The salt is the site's secret (its state directory): without it the key cannot be linked back to the ID by
    hashing candidate IDs. ``""`` for an empty identifier (the caller then treats the study as its own patient).
    """
    text = patient_id.strip()
    if not text:
        return ""
    return hmac.new(salt, b"fedfusion-patient\0" + text.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


@dataclass
class DicomSeries:
    """One series of a case (internal grouping result).

    Attributes:
        folder: folder of its first file, relative to the case folder.
        modality_tag: DICOM ``Modality``.
        description: SeriesDescription (or ProtocolName).
        modality: mapped fedfusion modality, :data:`IGNORE`, :data:`SEG_TARGET` (segmentation objects) or
            ``None`` (unknown).
        files: the series' files, in InstanceNumber order.
    """

    folder: str
    modality_tag: str
    description: str
    modality: str | None
    files: list[_FileHeader] = field(default_factory=list)


@dataclass(frozen=True)
class SeriesSummary:
    """A series as the inspection report shows it (no UIDs, no patient data).

    ``status``: ``used``, ``ignored`` (mapping says ignore), ``unknown`` (not mappable), ``duplicate`` (another
    series was used for the modality), ``not-requested`` (modality not asked for) or ``failed`` (unreadable).
    """

    folder: str
    description: str
    modality_tag: str
    modality: str | None
    files: int
    status: str


@dataclass
class _Plane:
    """One 2D image plane with its geometry (a single-frame file, or one frame of a multiframe file)."""

    array: np.ndarray  # (H, W) float32, rescaled
    position: np.ndarray | None  # (3,) LPS mm
    orientation: np.ndarray | None  # (6,)
    spacing: tuple[float, float] | None  # (between rows, between columns) mm
    thickness: float | None
    instance: int
    source: str


# ------------------------------------------------------------------------------------------------------
# walking and grouping
# ------------------------------------------------------------------------------------------------------
def _candidate_files(files: Iterable[Path]) -> list[Path]:
    return [p for p in files if not p.name.startswith(".") and not p.name.lower().endswith(NON_DICOM_SUFFIXES)]


def _should_be_dicom(path: Path) -> bool:
    low = path.name.lower()
    return low.endswith(DICOM_SUFFIXES) or "." not in low or low == "dicomdir"


def _is_deflated(fp: BinaryIO) -> bool:
    """Whether the Part-10 file in ``fp`` (at its start) has the Deflated transfer syntax; leaves ``fp`` just after
    its file meta group, where the deflated body starts.

    Raises:
        InvalidDicomError: when there is no DICOM preamble (as ``dcmread`` would).
    """
    from pydicom.filereader import read_dataset, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    read_preamble(fp, False)
    start = fp.tell()
    # The same two-step read of the file meta group that dcmread does (explicit VR, else implicit VR).
    for implicit in (False, True):
        fp.seek(start)
        try:
            meta = read_dataset(fp, is_implicit_VR=implicit, is_little_endian=True,
                                stop_when=lambda tag, vr, length: tag >> 16 != 2)
            return str(meta.get("TransferSyntaxUID", "") or "") == DeflatedExplicitVRLittleEndian
        except NotImplementedError:
            continue
    return False


def _read_dataset(path: Path, limits: ReaderLimits, pixels: bool) -> tuple[Any, int | None]:
    """Read ``path`` within the byte limit: file size first, and for the Deflated transfer syntax the inflated size
    (measured in small pieces, before pydicom inflates the body in one piece).

    Returns:
        ``(dataset, pixel_bytes)``: ``pixel_bytes`` = bytes left for the pixel data (``None`` when the file has
        none). With ``pixels=False`` the pixel data is not read (except for deflated files, whose body is read
        whole anyway; it is bounded by then).

    Raises:
        LimitExceeded, InvalidDicomError, or any pydicom/IO error for corrupt files.
    """
    import pydicom

    size = path.stat().st_size
    check_file_size(size, str(path), limits)
    with open(path, "rb") as fp:
        deflated = _is_deflated(fp)
        if deflated:
            raw_deflate_size(fp, limits.max_file_bytes, str(path))
        fp.seek(0)
        ds = pydicom.dcmread(fp, stop_before_pixels=not (pixels or deflated))
        position = fp.tell()  # pydicom leaves a plain file at the pixel data tag when it stops before it
    if deflated or pixels:
        return ds, (len(ds.PixelData) if "PixelData" in ds else None)
    # The remaining bytes hold the pixel data after an 8-12 byte element header.
    return ds, (max(size - position - 8, 0) if position < size else None)


def _is_encapsulated(transfer_syntax: Any) -> bool:
    try:
        return bool(transfer_syntax.is_compressed)
    except ValueError as exc:  # pydicom: "UID is not a transfer syntax"
        raise BadHeaderValue("TransferSyntaxUID", str(transfer_syntax), "a known transfer syntax") from exc


def _check_pixel_count(ds: Any, path: Path, limits: ReaderLimits) -> tuple[int, int, int]:
    """``(rows, columns, frames)`` of an image file, checked against the voxel and byte limits (header values only,
    so nothing is decoded or allocated for a file claiming billions of voxels)."""
    rows = header_int(ds, "Rows", 0, minimum=1)
    cols = header_int(ds, "Columns", 0, minimum=1)
    frames = header_int(ds, "NumberOfFrames", 1, minimum=1)
    spp = header_int(ds, "SamplesPerPixel", 1, minimum=1)
    bits = header_int(ds, "BitsAllocated", 16, minimum=1)
    check_voxels((frames, rows, cols), spp * max(bits, 8) // 8, f"{path} (NumberOfFrames x Rows x Columns)", limits)
    return rows, cols, frames


def read_header(
    path: Path, case_id: str = "", limits: ReaderLimits = DEFAULT_LIMITS, patient_salt: bytes = b""
) -> tuple[_FileHeader | None, Problem | None]:
    """Read one file's header; return ``(header, None)`` for an image slice or ``(None, problem)``.

    Never raises: whatever goes wrong with this file (unreadable, over a limit, a header value that cannot be
    parsed) is this file's problem only. Non-DICOM files with an unrelated extension give ``(None, None)`` (ignored
    silently). An unusable InstanceNumber gives ``(header, warning)``: the file is used, ordered by position.
    """
    from pydicom.errors import InvalidDicomError

    try:
        ds, pixel_bytes = _read_dataset(path, limits, pixels=False)
    except LimitExceeded as exc:
        return None, Problem(str(path), "limit-exceeded", f"{exc}; file skipped", ERROR, case_id)
    except InvalidDicomError as exc:
        if _should_be_dicom(path):
            return None, Problem(str(path), "unreadable-file", f"not a DICOM file ({exc})", ERROR, case_id)
        return None, None
    except Exception as exc:  # corrupt header: any pydicom/IO error
        return None, Problem(str(path), "unreadable-file", f"corrupt DICOM header ({exc})", ERROR, case_id)
    try:
        return _parse_header(ds, path, pixel_bytes, case_id, limits, patient_salt)
    except BadHeaderValue as exc:
        return None, Problem(str(path), "bad-header-value", f"{exc}; file skipped", ERROR, case_id)
    except LimitExceeded as exc:
        return None, Problem(str(path), "limit-exceeded", f"{exc}; file skipped", ERROR, case_id)
    except Exception as exc:  # a header this reader did not foresee costs this file only
        return None, Problem(str(path), "unreadable-file", f"unexpected error in the header ({exc!r}); file skipped",
                             ERROR, case_id)


def _parse_header(
    ds: Any, path: Path, pixel_bytes: int | None, case_id: str, limits: ReaderLimits, patient_salt: bytes = b""
) -> tuple[_FileHeader | None, Problem | None]:
    meta = getattr(ds, "file_meta", None)
    sop_class = str(header_value(meta, "MediaStorageSOPClassUID") or header_value(ds, "SOPClassUID") or "")
    modality_tag = str(header_value(ds, "Modality") or "").upper()
    if sop_class == _DICOMDIR_SOP_CLASS:
        return None, Problem(str(path), "non-image-dicom", "a DICOMDIR (directory index), no pixel data", ERROR, case_id)
    has_pixels = pixel_bytes is not None
    rows, cols = header_value(ds, "Rows"), header_value(ds, "Columns")
    if modality_tag in NON_IMAGE_MODALITIES:
        return None, Problem(
            str(path), "non-image-dicom", f"Modality {modality_tag} object without an image; skipped", ERROR, case_id
        )
    if not has_pixels or rows is None or cols is None:
        image_like = modality_tag in IMAGE_MODALITIES or rows is not None
        if image_like:
            return None, Problem(
                str(path), "truncated-file",
                "file ends before its pixel data (header incomplete or PixelData missing)", ERROR, case_id,
            )
        return None, Problem(
            str(path), "non-image-dicom", f"no PixelData (Modality {modality_tag or '?'}); skipped", ERROR, case_id
        )
    rows_n, cols_n, frames = _check_pixel_count(ds, path, limits)
    ts = header_value(meta, "TransferSyntaxUID")
    if ts is not None and not _is_encapsulated(ts):
        # Uncompressed pixel data: the file must hold every pixel.
        spp = header_int(ds, "SamplesPerPixel", 1, minimum=1)
        bits = header_int(ds, "BitsAllocated", 16, minimum=1)
        expected = rows_n * cols_n * spp * frames * bits // 8
        if pixel_bytes is not None and pixel_bytes < expected:
            return None, Problem(
                str(path), "truncated-file",
                f"pixel data truncated ({pixel_bytes} of {expected} bytes present)", ERROR, case_id,
            )
    series_uid = str(header_value(ds, "SeriesInstanceUID") or "")
    if not series_uid:
        return None, Problem(str(path), "unreadable-file", "no SeriesInstanceUID; cannot group the file", ERROR, case_id)
    description, element = str(header_value(ds, "SeriesDescription") or "").strip(), "SeriesDescription"
    if not description:
        description, element = str(header_value(ds, "ProtocolName") or "").strip(), "ProtocolName"
    if len(description) > limits.max_description_chars:
        # Checked before any regular expression sees it: matching cost grows with the square of the length.
        raise LimitExceeded(f"{element} is {len(description)} characters long, over the limit of "
                            f"{limits.max_description_chars} (ReaderLimits.max_description_chars; DICOM allows 64)")
    warning = None
    try:
        instance = header_int(ds, "InstanceNumber", 0)
    except BadHeaderValue as exc:
        instance = 0
        warning = Problem(str(path), "bad-header-value",
                          f"{exc}; file used, ordered by ImagePositionPatient", WARNING, case_id)
    patient = patient_key(str(header_value(ds, "PatientID") or ""), patient_salt)
    header = _FileHeader(
        path=path,
        series_uid=series_uid,
        sop_uid=str(header_value(ds, "SOPInstanceUID") or path.name),
        modality_tag=modality_tag,
        description=description,
        instance=instance,
        frames=frames,
        voxels=rows_n * cols_n * frames,
        patient=patient,
        sop_class=sop_class,
    )
    return header, warning


def scan_dicom(
    case_dir: Path,
    mapping: SeriesMapping,
    case_id: str = "",
    limits: ReaderLimits = DEFAULT_LIMITS,
    files: Sequence[Path] | None = None,
    patient_salt: bytes = b"",
) -> tuple[list[DicomSeries], list[Problem]]:
    """Group a case folder's DICOM files into series and map each series to a modality (headers only).

    Args:
        files: the case's files as :func:`common.data.case_files.list_case_files` gives them (its problems are then
            the caller's to report); ``None`` lists the folder here.
        patient_salt: keys the files' PatientIDs (:func:`patient_key`).

    Returns:
        ``(series, problems)``: series in folder order; problems for every file that was skipped.
    """
    case_dir = Path(case_dir)
    by_uid: dict[str, DicomSeries] = {}
    problems: list[Problem] = []
    if files is None:
        listing = list_case_files(case_dir, limits, case_id=case_id)
        problems.extend(listing.problems)
        files = listing.files
    seen_sop: set[str] = set()
    for path in _candidate_files(files):
        header, problem = read_header(path, case_id, limits, patient_salt)
        if problem is not None:
            problems.append(problem)
        if header is None:
            continue
        if header.sop_uid in seen_sop:
            problems.append(Problem(str(path), "unreadable-file", "duplicate of another file (same SOPInstanceUID); "
                                    "ignored", WARNING, case_id))
            continue
        seen_sop.add(header.sop_uid)
        series = by_uid.get(header.series_uid)
        if series is None:
            folder = os.path.relpath(path.parent, case_dir)
            series = DicomSeries(
                folder=folder,
                modality_tag=header.modality_tag,
                description=header.description,
                modality=(SEG_TARGET if is_seg(header.sop_class, header.modality_tag)
                          else mapping.identify(header.modality_tag, header.description)),
            )
            by_uid[header.series_uid] = series
        series.files.append(header)
    for series in by_uid.values():
        series.files.sort(key=lambda h: (h.instance, str(h.path)))
    return list(by_uid.values()), problems


# ------------------------------------------------------------------------------------------------------
# pixels and geometry
# ------------------------------------------------------------------------------------------------------
def _to_gray(arr: np.ndarray, photometric: str) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # RGB(A) (e.g. ultrasound): luminance
        arr = arr[..., :3].astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    arr = arr.astype(np.float32)
    if photometric == "MONOCHROME1":  # inverted grey scale
        arr = float(arr.max()) - arr
    return arr


def _rescale(item: object, fallback: tuple[float, float] = (1.0, 0.0)) -> tuple[float, float]:
    slope, intercept = header_float(item, "RescaleSlope"), header_float(item, "RescaleIntercept")
    return (
        slope if slope is not None else fallback[0],
        intercept if intercept is not None else fallback[1],
    )


def _first(seq_owner: object, name: str) -> object | None:
    seq = header_value(seq_owner, name)
    return seq[0] if seq else None


def _slice_spacing(item: object) -> float | None:
    return header_float(item, "SpacingBetweenSlices") or header_float(item, "SliceThickness")


def _read_planes(header: _FileHeader, case_id: str, limits: ReaderLimits = DEFAULT_LIMITS) -> list[_Plane]:
    """Read one file's pixels as planes.

    Raises:
        SeriesError: for this file only, whatever is wrong with it (unreadable, unsupported, over a limit, a header
            value that cannot be parsed), so the caller drops the one slice and goes on.
    """
    path = str(header.path)
    try:
        return _decode_planes(header, case_id, limits)
    except SeriesError:
        raise
    except BadHeaderValue as exc:
        raise SeriesError(Problem(path, "bad-header-value", f"{exc}; slice skipped", ERROR, case_id)) from exc
    except LimitExceeded as exc:
        raise SeriesError(Problem(path, "limit-exceeded", f"{exc}; slice skipped", ERROR, case_id)) from exc
    except Exception as exc:  # a file this reader did not foresee costs this slice only
        raise SeriesError(Problem(path, "unreadable-file", f"unexpected error reading the file ({exc!r}); slice "
                                  "skipped", ERROR, case_id)) from exc


def _decode_planes(header: _FileHeader, case_id: str, limits: ReaderLimits) -> list[_Plane]:
    path = header.path
    try:
        ds, _pixel_bytes = _read_dataset(path, limits, pixels=True)
    except LimitExceeded:
        raise
    except Exception as exc:
        raise SeriesError(Problem(str(path), "unreadable-file", f"cannot read the file ({exc})", ERROR,
                                  case_id)) from exc
    # Checked again on the file as read now (it may have changed since the header scan), before decoding.
    _check_pixel_count(ds, path, limits)
    try:
        if _is_multiframe(ds):
            return _multiframe_planes(ds, header, case_id)
        pixels = ds.pixel_array
    except (SeriesError, BadHeaderValue):
        raise
    except Exception as exc:
        kind = "truncated-file" if "less than expected" in str(exc) or "truncat" in str(exc).lower() else "unreadable-file"
        raise SeriesError(Problem(str(path), kind, f"cannot decode pixel data ({exc})", ERROR, case_id)) from exc
    photometric = str(header_value(ds, "PhotometricInterpretation") or "MONOCHROME2")
    position, orientation, spacing = _plane_geometry(ds)
    slope, intercept = _rescale(ds)
    arr = _to_gray(np.asarray(pixels), photometric) * slope + intercept
    return [
        _Plane(
            arr.astype(np.float32),
            np.asarray(position) if position else None,
            np.asarray(orientation) if orientation else None,
            (spacing[0], spacing[1]) if spacing else None,
            _slice_spacing(ds),
            header.instance,
            str(path),
        )
    ]


def _plane_geometry(ds: Any) -> tuple[list[float] | None, list[float] | None, list[float] | None]:
    """Top-level ``(ImagePositionPatient, ImageOrientationPatient, PixelSpacing or ImagerPixelSpacing)``."""
    spacing = header_floats(ds, "PixelSpacing", 2, positive=True) or header_floats(
        ds, "ImagerPixelSpacing", 2, positive=True)
    return header_floats(ds, "ImagePositionPatient", 3), header_orientation(ds), spacing


def _is_multiframe(ds: Any) -> bool:
    """Multi-frame objects, and every enhanced object (Enhanced MR/CT, Legacy Converted Enhanced), whose geometry
    lives in functional groups even when it has a single frame."""
    return header_int(ds, "NumberOfFrames", 1, minimum=1) > 1 or header_value(
        ds, "PerFrameFunctionalGroupsSequence") is not None or header_value(
        ds, "SharedFunctionalGroupsSequence") is not None


def _multiframe_planes(ds: Any, header: _FileHeader, case_id: str) -> list[_Plane]:
    """The frames of a multi-frame object as planes, decoded one frame at a time, each with its own geometry and
    rescale: per-frame functional group, else the shared one, else the top-level attributes (classic multiframe,
    e.g. NM, whose frames are parallel slices spaced along the normal)."""
    from pydicom.pixels import iter_pixels

    path = header.path
    photometric = str(header_value(ds, "PhotometricInterpretation") or "MONOCHROME2")
    frames = header_int(ds, "NumberOfFrames", 1, minimum=1)
    position, orientation, spacing = _plane_geometry(ds)
    thickness_f = _slice_spacing(ds)
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    per_frame = header_value(ds, "PerFrameFunctionalGroupsSequence")
    planes: list[_Plane] = []
    for f, arr in enumerate(iter_pixels(ds)):
        if f >= frames:
            break
        arr = np.asarray(arr)
        if not (arr.ndim == 2 or arr.ndim == 3 and arr.shape[-1] in (3, 4)):
            raise SeriesError(Problem(str(path), "unsupported-series", f"unexpected frame shape {arr.shape}", ERROR,
                                      case_id))
        group = per_frame[f] if per_frame is not None and f < len(per_frame) else None
        pos_item = _first(group, "PlanePositionSequence") or _first(shared, "PlanePositionSequence")
        ori_item = _first(group, "PlaneOrientationSequence") or _first(shared, "PlaneOrientationSequence")
        meas_item = _first(group, "PixelMeasuresSequence") or _first(shared, "PixelMeasuresSequence")
        pvt_item = _first(group, "PixelValueTransformationSequence") or _first(shared, "PixelValueTransformationSequence")
        f_pos = header_floats(pos_item, "ImagePositionPatient", 3) if pos_item is not None else None
        f_ori = header_orientation(ori_item) if ori_item is not None else orientation
        f_sp = header_floats(meas_item, "PixelSpacing", 2, positive=True) if meas_item is not None else spacing
        f_th = _slice_spacing(meas_item) if meas_item is not None else None
        if f_pos is None:
            if position and orientation and thickness_f:
                normal = np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:6]))
                f_pos = list(np.asarray(position) + f * thickness_f * normal)
            elif frames == 1 and position is None:
                f_pos = None  # a single frame without a position: stacked like a single-frame file
            else:
                raise SeriesError(Problem(
                    str(path), "unsupported-series",
                    f"multiframe file ({frames} frames) without per-frame plane positions (a cine or time series?); "
                    "export it as single-frame slices or NIfTI", ERROR, case_id,
                ))
        slope, intercept = _rescale(pvt_item, _rescale(ds))
        planes.append(_Plane(
            (_to_gray(arr, photometric) * slope + intercept).astype(np.float32),
            np.asarray(f_pos) if f_pos is not None else None,
            np.asarray(f_ori) if f_ori else None,
            (f_sp[0], f_sp[1]) if f_sp else None,
            f_th if f_th is not None else thickness_f,
            header.instance if frames == 1 else f,
            f"{path}#frame{f}",
        ))
    return planes


def stack_planes(
    planes: Sequence[_Plane], where: str, case_id: str = "", limits: ReaderLimits = DEFAULT_LIMITS
) -> tuple[np.ndarray, np.ndarray, list[Problem]]:
    """Stack 2D planes into ``vol[k, j, i]`` ``(D, H, W)`` float32 with its RAS affine (4x4, mm).

    Slices are ordered by position along the slice normal. Gaps of up to :data:`MAX_MISSING_FRACTION` of the
    slices are filled by linear interpolation between neighbours (reported as a warning); larger gaps, mixed
    orientation/spacing/size or duplicated positions raise :class:`SeriesError`. The depth the positions imply
    is checked (missing fraction, ``limits.max_voxels``) before the volume is allocated, so positions spread over
    an absurd extent cost nothing.
    """
    problems: list[Problem] = []
    shapes = {p.array.shape for p in planes}
    if len(shapes) != 1:
        raise SeriesError(Problem(where, "inconsistent-geometry", f"slices of different sizes {sorted(shapes)}",
                                  ERROR, case_id))
    orientations = [p.orientation for p in planes if p.orientation is not None]
    if orientations and not all(np.allclose(o, orientations[0], atol=1e-3) for o in orientations):
        raise SeriesError(Problem(where, "inconsistent-geometry",
                                  "ImageOrientationPatient differs between slices of the series", ERROR, case_id))
    spacings = [p.spacing for p in planes if p.spacing is not None]
    if spacings and not all(np.allclose(s, spacings[0], rtol=1e-3) for s in spacings):
        raise SeriesError(Problem(where, "inconsistent-geometry", "PixelSpacing differs between slices of the series",
                                  ERROR, case_id))
    orientation = orientations[0] if orientations else np.asarray([1.0, 0, 0, 0, 1.0, 0])
    spacing = spacings[0] if spacings else (1.0, 1.0)
    normal = np.cross(orientation[:3], orientation[3:6])
    thickness = next((p.thickness for p in planes if p.thickness), None) or 1.0

    if len(planes) == 1 or any(p.position is None for p in planes):
        ordered = sorted(planes, key=lambda p: p.instance)
        if len(planes) > 1:
            problems.append(Problem(where, "inconsistent-geometry",
                                    "no ImagePositionPatient; slices stacked by InstanceNumber, spacing = "
                                    f"SliceThickness {thickness:g} mm", WARNING, case_id))
        first = ordered[0].position if ordered[0].position is not None else np.zeros(3)
        vol = np.stack([p.array for p in ordered]).astype(np.float32)
        return vol, dicom_affine(first, orientation, spacing, normal * thickness), problems

    ordered = sorted(planes, key=lambda p: float(p.position @ normal))  # type: ignore[operator]
    s = np.asarray([float(p.position @ normal) for p in ordered])  # type: ignore[operator]
    diffs = np.diff(s)
    if not np.all(np.isfinite(diffs)):
        raise SeriesError(Problem(where, "inconsistent-geometry", "slice positions too far apart to compute with",
                                  ERROR, case_id))
    if np.any(diffs < 1e-3 * max(thickness, 1e-3)):
        raise SeriesError(Problem(where, "inconsistent-geometry",
                                  "several slices share one position (multiple echoes, phases or time points in one "
                                  "series?)", ERROR, case_id))
    step = float(np.min(diffs))
    ratio = diffs / step
    if np.any(np.abs(ratio - np.round(ratio)) > 0.1):
        raise SeriesError(Problem(where, "inconsistent-geometry",
                                  f"slice spacing varies within the series ({np.round(diffs, 3).tolist()} mm)",
                                  ERROR, case_id))
    steps = np.round(ratio)
    depth_claimed = float(np.sum(steps)) + 1.0  # as a float: an absurd extent must not overflow an integer
    height, width = ordered[0].array.shape
    missing_claimed = depth_claimed - len(ordered)
    if missing_claimed > MAX_MISSING_FRACTION * depth_claimed:
        raise SeriesError(Problem(where, "missing-slices",
                                  f"{missing_claimed:.0f} of {depth_claimed:.0f} slices missing (gaps in slice "
                                  "positions); series skipped", ERROR, case_id))
    if depth_claimed * height * width > limits.max_voxels:
        raise SeriesError(Problem(where, "limit-exceeded",
                                  f"slice positions span {depth_claimed:.0f} slices of {height} x {width}, over the "
                                  f"limit of {limits.max_voxels} voxels (ReaderLimits.max_voxels); series skipped",
                                  ERROR, case_id))
    index = np.concatenate([[0], np.cumsum(steps.astype(np.int64))])
    depth = int(index[-1]) + 1
    first, last = ordered[0].position, ordered[-1].position
    step_vec = (last - first) / (depth - 1)  # type: ignore[operator]
    residual = max(float(np.linalg.norm(p.position - (first + k * step_vec))) for p, k in zip(ordered, index))
    if residual > 0.1 * step:
        raise SeriesError(Problem(where, "inconsistent-geometry",
                                  f"slice positions do not lie on one line (off by {residual:.2f} mm)", ERROR, case_id))
    vol = np.zeros((depth, height, width), dtype=np.float32)
    vol[index] = np.stack([p.array for p in ordered])
    missing = depth - len(ordered)
    if missing:
        present = set(int(k) for k in index)
        for k in range(depth):
            if k in present:
                continue
            lo = max(i for i in present if i < k)
            hi = min(i for i in present if i > k)
            w = (k - lo) / (hi - lo)
            vol[k] = (1 - w) * vol[lo] + w * vol[hi]
        gaps = [k for k in range(depth) if k not in present]
        problems.append(Problem(where, "missing-slices",
                                f"{missing} of {depth} slices missing (slice indices {gaps}); filled by linear "
                                "interpolation", WARNING, case_id))
    return vol, dicom_affine(first, orientation, spacing, step_vec), problems


def read_series(
    series: DicomSeries, case_dir: Path, case_id: str = "", limits: ReaderLimits = DEFAULT_LIMITS
) -> tuple[np.ndarray, np.ndarray, list[Problem]]:
    """Read one series' pixels into ``(vol (D, H, W) float32, RAS affine 4x4, problems)``.

    Unreadable slices are dropped and reported (the gap is then handled by :func:`stack_planes`).

    Raises:
        SeriesError: when no volume can be built (or the series' headers claim more than ``limits.max_voxels``).
    """
    where = str(Path(case_dir) / series.folder)
    problems: list[Problem] = []
    voxels = sum(h.voxels for h in series.files)
    if voxels > limits.max_voxels:
        raise SeriesError(Problem(where, "limit-exceeded",
                                  f"{len(series.files)} files of {voxels} voxels in all, over the limit of "
                                  f"{limits.max_voxels} per series (ReaderLimits.max_voxels); series skipped",
                                  ERROR, case_id))
    multiframe = [h for h in series.files if h.frames > 1]
    if multiframe and len(series.files) > 1:
        raise SeriesError(Problem(where, "unsupported-series",
                                  f"series mixes {len(multiframe)} multiframe file(s) with other files", ERROR, case_id))
    planes: list[_Plane] = []
    for header in series.files:
        try:
            planes.extend(_read_planes(header, case_id, limits))
        except SeriesError as exc:
            problems.append(exc.problem)
    if not planes:
        raise SeriesError(Problem(where, "unsupported-series" if multiframe else "unreadable-file",
                                  "no readable slice in the series; series skipped", ERROR, case_id), problems)
    try:
        vol, affine, stack_problems = stack_planes(planes, where, case_id, limits)
    except SeriesError as exc:
        raise SeriesError(exc.problem, problems) from None
    return vol, affine, problems + stack_problems


@dataclass
class DicomCase:
    """What :func:`read_dicom_case` found, on native grids.

    Attributes:
        volumes: ``{modality: (vol (D, H, W) float32, RAS affine)}``.
        seg: ``(labels (D, H, W) uint8 in fedfusion's sub-regions, RAS affine)`` from a DICOM SEG, on the grid of
            the series it references; ``None`` without a usable SEG.
        series: every series found, as the inspection report shows it.
        problems: everything reported.
        patients: the keyed PatientIDs of the case's image files (:func:`patient_key`).
    """

    volumes: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    seg: tuple[np.ndarray, np.ndarray] | None = None
    series: list[SeriesSummary] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    patients: frozenset[str] = frozenset()


def read_dicom_case(
    case_dir: Path,
    mapping: SeriesMapping,
    modalities: Sequence[str] = MODALITIES,
    case_id: str = "",
    load_pixels: bool = True,
    limits: ReaderLimits = DEFAULT_LIMITS,
    files: Sequence[Path] | None = None,
    patient_salt: bytes = b"",
) -> DicomCase:
    """Read a case folder's DICOM series of the requested modalities, and its DICOM SEG, on their native grids.

    Args:
        case_dir: the case folder (DICOM files at any depth).
        mapping: SeriesDescription mapping (see :func:`common.data.series_mapping.load_series_mapping`).
        modalities: modalities to read pixels for; other mapped series are listed as ``not-requested``.
        case_id: site-local case id, stamped on problems.
        load_pixels: ``False`` to group and map only (no volumes returned; a SEG is still read, with the grid of
            the series it references, as NIfTI segmentations are).
        limits: what one file, series and the case folder may cost (see :mod:`common.data.limits`).
        files: the case's files from :func:`common.data.case_files.list_case_files` (``None``: listed here).
        patient_salt: the site's secret that keys PatientIDs (:func:`patient_key`).

    Returns:
        A :class:`DicomCase`. When several series map to one modality the one with the most frames is used, the
        others reported; likewise the first SEG (in folder order) that can be used. ``patients``: the keyed
        PatientIDs of every image file of the case (several when a folder mixes patients; empty when no file has
        one).
    """
    case_dir = Path(case_dir)
    all_series, problems = scan_dicom(case_dir, mapping, case_id, limits, files, patient_salt)
    patients = frozenset(h.patient for s in all_series for h in s.files if h.patient)
    if len(patients) > 1:
        problems.append(Problem(str(case_dir), "mixed-patients",
                                f"the case folder holds images of {len(patients)} different PatientIDs; they are "
                                "treated as one patient for privacy", WARNING, case_id))
    out = DicomCase(problems=problems, patients=patients)
    grids: dict[str, tuple[tuple[int, ...], np.ndarray]] = {}  # series UID -> (shape, affine) of series read
    by_modality: dict[str, list[DicomSeries]] = {}
    for series in all_series:
        if series.modality == SEG_TARGET:
            continue
        if series.modality is None:
            problems.append(Problem(
                str(case_dir / series.folder), "unknown-series",
                f"series '{series.description or '(no description)'}' (Modality {series.modality_tag or '?'}, "
                f"{len(series.files)} files) matches no modality; add a pattern with --series-map", ERROR, case_id,
            ))
            out.series.append(_summary(series, "unknown"))
        elif series.modality == IGNORE:
            out.series.append(_summary(series, "ignored"))
        elif series.modality not in modalities:
            out.series.append(_summary(series, "not-requested"))
        else:
            by_modality.setdefault(series.modality, []).append(series)
    for modality, candidates in by_modality.items():
        candidates = sorted(candidates, key=lambda s: (-sum(h.frames for h in s.files), s.folder))
        chosen = None
        for series in candidates:
            if chosen is not None:
                problems.append(Problem(
                    str(case_dir / series.folder), "duplicate-series",
                    f"another series was used for {modality}; '{series.description}' ignored", WARNING, case_id,
                ))
                out.series.append(_summary(series, "duplicate"))
                continue
            if not load_pixels:
                chosen = series
                out.series.append(_summary(series, "used"))
                continue
            volume = _read_series_guarded(series, case_dir, case_id, limits, problems)
            if volume is None:
                out.series.append(_summary(series, "failed"))
                continue  # fall back to the next series of the same modality
            out.volumes[modality] = volume
            grids[series.files[0].series_uid] = (volume[0].shape, volume[1])
            chosen = series
            out.series.append(_summary(series, "used"))
    _read_case_seg(out, all_series, grids, case_dir, case_id, limits)
    for p in problems:
        log.debug("%s", p)
    return out


def _read_series_guarded(
    series: DicomSeries, case_dir: Path, case_id: str, limits: ReaderLimits, problems: list[Problem]
) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`read_series`, with every failure (expected or not) reported in ``problems`` and ``None`` returned."""
    try:
        vol, affine, series_problems = read_series(series, case_dir, case_id, limits)
    except SeriesError as exc:
        problems.extend(exc.problems)
        return None
    except Exception as exc:  # a series this reader did not foresee costs this series only
        problems.append(Problem(str(case_dir / series.folder), "unreadable-file",
                                f"unexpected error building the series ({exc!r}); series skipped", ERROR, case_id))
        return None
    problems.extend(series_problems)
    return vol, affine


def _read_case_seg(
    out: DicomCase,
    all_series: Sequence[DicomSeries],
    grids: dict[str, tuple[tuple[int, ...], np.ndarray]],
    case_dir: Path,
    case_id: str,
    limits: ReaderLimits,
) -> None:
    """Read the case's SEG objects into ``out.seg`` (the first usable one; later ones are reported duplicates),
    each on the grid of the series it references (read here when it was not read for its modality)."""
    for series in (s for s in all_series if s.modality == SEG_TARGET):
        status = "failed"
        for header in series.files:
            if out.seg is not None:
                out.problems.append(Problem(str(header.path), "duplicate-series",
                                            "another DICOM SEG is already the case's segmentation; ignored", WARNING,
                                            case_id))
                status = "used" if status == "used" else "duplicate"
                continue
            try:
                out.seg = _read_seg_file(header, all_series, grids, case_dir, case_id, limits, out.problems)
                status = "used"
            except SegError as exc:
                out.problems.append(Problem(str(header.path), exc.kind, str(exc), ERROR, case_id))
            except (BadHeaderValue, LimitExceeded) as exc:
                out.problems.append(Problem(str(header.path), "bad-seg", f"{exc}; SEG not used", ERROR, case_id))
            except Exception as exc:  # a SEG this reader did not foresee costs this file only
                out.problems.append(Problem(str(header.path), "bad-seg", f"cannot read the SEG ({exc!r}); not used",
                                            ERROR, case_id))
        out.series.append(_summary(series, status))


def _read_seg_file(
    header: _FileHeader,
    all_series: Sequence[DicomSeries],
    grids: dict[str, tuple[tuple[int, ...], np.ndarray]],
    case_dir: Path,
    case_id: str,
    limits: ReaderLimits,
    problems: list[Problem],
) -> tuple[np.ndarray, np.ndarray]:
    """One SEG file as ``(labels, affine)`` on its referenced series' grid (SegError when it cannot be used)."""
    ds, _pixel_bytes = _read_dataset(header.path, limits, pixels=True)
    _check_pixel_count(ds, header.path, limits)  # frames x rows x columns, before anything is decoded
    series_uids, instance_uids = referenced_uids(ds)
    candidates = [s for s in all_series if s.modality != SEG_TARGET and (
        s.files[0].series_uid in series_uids or any(h.sop_uid in instance_uids for h in s.files))]
    if not candidates:
        raise SegError(f"{header.path}: the series this SEG segments is not in the case folder; put the SEG next to "
                       "its source series")
    source = candidates[0]
    uid = source.files[0].series_uid
    if uid not in grids:
        volume = _read_series_guarded(source, case_dir, case_id, limits, problems)
        if volume is None:
            raise SegError(f"{header.path}: its source series ({source.folder}) cannot be read; SEG not used")
        grids[uid] = (volume[0].shape, volume[1])
    shape, affine = grids[uid]
    return seg_labels_on_grid(ds, str(header.path), shape, affine), affine


def _summary(series: DicomSeries, status: str) -> SeriesSummary:
    return SeriesSummary(series.folder, series.description, series.modality_tag, series.modality,
                         len(series.files), status)
