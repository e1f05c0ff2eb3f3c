"""DICOM Segmentation objects (SEG) as a case's segmentation, placed on the grid of the series they segment.

A PACS exports annotations as a SEG: one multi-frame object whose frames are masks of numbered segments, each frame
lying on a plane of the source series (its per-frame PlanePositionSequence) and each segment described by a
SegmentLabel and a coded SegmentedPropertyType. fedfusion reads it with highdicom (which validates the object and
parses the segment descriptions) and places it frame by frame:

1. the source series is the one named by the SEG's ReferencedSeriesSequence (or, failing that, the series holding
   the instances its frames are derived from); the caller gives that series' voxel grid;
2. every segment is mapped to a fedfusion sub-region by its name (:func:`common.data.conventions.region_of_name`:
   "Edema"/"Oedema"/"SNFH" -> 1, "Necrosis"/"Necrotic core"/"Non-enhancing tumor" -> 2, "Enhancing tumor"/"ET" -> 3;
   SNOMED CT 79654002 Edema and 6574001 Necrosis by code). A segment that maps to nothing (e.g. "Whole tumor",
   "Resection cavity") makes the SEG unusable, reported as ``unknown-segment``;
3. every frame must lie on a slice of that grid (same rows, columns, orientation and pixel spacing; its position a
   whole slice index, within 1/100 voxel); its mask (BINARY: pixel set; FRACTIONAL: at least half the maximum;
   LABELMAP: the pixel value is the segment number) is written into that slice. Two segments claiming one voxel
   with different sub-regions is an error.

Sizes are bounded before decoding by the caller (frames x rows x columns against ReaderLimits), and frames are
decoded one at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .conventions import BACKGROUND, region_of_name
from .dicom_values import header_float, header_floats, header_int, header_orientation, header_value
from .geometry import LPS_TO_RAS

#: SOP classes read as segmentations: Segmentation Storage and Label Map Segmentation Storage.
SEG_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation Storage",
}
#: Largest distance (in voxels) of a frame from a slice of the referenced grid.
POSITION_TOLERANCE = 0.01


class SegError(ValueError):
    """A SEG that cannot be used; ``kind`` is the problem kind (``bad-seg`` or ``unknown-segment``)."""

    def __init__(self, message: str, kind: str = "bad-seg") -> None:
        super().__init__(message)
        self.kind = kind


def is_seg(sop_class: str, modality_tag: str) -> bool:
    """Whether a file is a segmentation object (by SOP class, or Modality ``SEG`` for files without one)."""
    return sop_class in SEG_SOP_CLASSES or modality_tag.upper() == "SEG"


def referenced_uids(ds: Any) -> tuple[list[str], list[str]]:
    """``(series UIDs, SOP instance UIDs)`` a SEG refers to: its ReferencedSeriesSequence, and the source
    instances of its frames (DerivationImageSequence -> SourceImageSequence) for SEGs without the former."""
    series = [str(header_value(item, "SeriesInstanceUID") or "")
              for item in (header_value(ds, "ReferencedSeriesSequence") or [])]
    instances: list[str] = []
    for group in header_value(ds, "PerFrameFunctionalGroupsSequence") or []:
        for derivation in header_value(group, "DerivationImageSequence") or []:
            for source in header_value(derivation, "SourceImageSequence") or []:
                uid = str(header_value(source, "ReferencedSOPInstanceUID") or "")
                if uid and uid not in instances:
                    instances.append(uid)
    return [s for s in series if s], instances


def segment_regions(seg: Any, where: str) -> dict[int, int]:
    """Segment number -> fedfusion sub-region for every segment of a highdicom ``Segmentation``.

    Raises:
        SegError: (kind ``unknown-segment``) naming every segment whose label and property type map to nothing.
    """
    regions: dict[int, int] = {}
    unknown: list[str] = []
    for number in seg.segment_numbers:
        desc = seg.get_segment_description(number)
        label = str(getattr(desc, "SegmentLabel", "") or "")
        try:
            prop = desc.segmented_property_type
            meaning, code = str(prop.meaning), (str(prop.scheme_designator), str(prop.value))
        except (AttributeError, IndexError, KeyError, ValueError):
            meaning, code = "", None
        region = region_of_name(label, meaning, code=code)
        if region is None:
            unknown.append(f"{number} {label or meaning or '(unnamed)'!r}" + (f" ({code[0]} {code[1]} {meaning})"
                                                                              if code else ""))
        else:
            regions[int(number)] = region
    if unknown:
        raise SegError(
            f"{where}: segment(s) {'; '.join(unknown)} name no fedfusion sub-region (oedema, non-enhancing core / "
            "necrosis, enhancing tumour); segmentation not used. Export only those segments, named e.g. 'Edema', "
            "'Necrosis', 'Enhancing tumor'", kind="unknown-segment")
    return regions


def _item(group: Any, shared: Any, name: str) -> Any | None:
    for owner in (group, shared):
        seq = header_value(owner, name)
        if seq:
            return seq[0]
    return None


def _frame_slice(group: Any, shared: Any, index_of: np.ndarray, axes: np.ndarray, depth: int, f: int,
                 where: str) -> int:
    """Slice index ``k`` of the referenced grid that SEG frame ``f`` lies on (SegError when it lies on none)."""
    position_item = _item(group, None, "PlanePositionSequence") or _item(None, shared, "PlanePositionSequence")
    position = header_floats(position_item, "ImagePositionPatient", 3) if position_item is not None else None
    orientation_item = _item(group, shared, "PlaneOrientationSequence")
    orientation = header_orientation(orientation_item) if orientation_item is not None else None
    measures = _item(group, shared, "PixelMeasuresSequence")
    spacing = header_floats(measures, "PixelSpacing", 2, positive=True) if measures is not None else None
    if position is None or orientation is None or spacing is None:
        raise SegError(f"{where}: frame {f + 1} has no plane position, orientation or pixel spacing; cannot place "
                       "it on the referenced series")
    row_step = np.asarray(orientation[:3]) * spacing[1]  # along a row: the column index i
    col_step = np.asarray(orientation[3:]) * spacing[0]  # down a column: the row index j
    if not (np.allclose(row_step, axes[:, 2], atol=1e-3 * max(spacing)) and
            np.allclose(col_step, axes[:, 1], atol=1e-3 * max(spacing))):
        raise SegError(f"{where}: frame {f + 1}'s orientation or pixel spacing differs from the referenced series'; "
                       "the SEG must be drawn on that series' slices")
    k, j, i = (index_of @ np.asarray([*position, 1.0]))[:3]
    slice_k = int(round(k))
    if max(abs(k - slice_k), abs(j), abs(i)) > POSITION_TOLERANCE or not 0 <= slice_k < depth:
        raise SegError(f"{where}: frame {f + 1} at {np.round(position, 3).tolist()} mm lies on no slice of the "
                       f"referenced series (slice index {k:.2f}, offset {j:.2f} rows, {i:.2f} columns)")
    return slice_k


def seg_labels_on_grid(ds: Any, where: str, shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """The SEG dataset ``ds`` (pixels included, already size-checked) as fedfusion sub-regions on a series' grid.

    Args:
        where: the file, for messages.
        shape: ``(D, H, W)`` of the referenced series' volume.
        affine: its RAS affine (index ``(k, j, i)`` -> mm).

    Returns:
        ``(D, H, W)`` uint8, 0 background, 1 oedema, 2 non-enhancing core, 3 enhancing.

    Raises:
        SegError: for a SEG that highdicom refuses, an unknown segment, a frame off the grid or overlapping
            segments of different sub-regions.
    """
    import highdicom as hd
    from pydicom.pixels import iter_pixels

    try:
        seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
        seg_type = seg.segmentation_type.value
    except Exception as exc:  # highdicom refuses a non-conformant SEG: this file's problem
        raise SegError(f"{where}: not a valid DICOM Segmentation ({exc})") from exc
    regions = segment_regions(seg, where)
    depth, height, width = (int(n) for n in shape)
    rows, cols = header_int(ds, "Rows", 0, minimum=1), header_int(ds, "Columns", 0, minimum=1)
    if (rows, cols) != (height, width):
        raise SegError(f"{where}: frames of {rows} x {cols} pixels, but the referenced series' slices are "
                       f"{height} x {width}")
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=float)
    index_of = np.linalg.inv(lps)
    shared = _item(ds, None, "SharedFunctionalGroupsSequence")
    per_frame = header_value(ds, "PerFrameFunctionalGroupsSequence") or []
    frames = header_int(ds, "NumberOfFrames", 1, minimum=1)
    if len(per_frame) != frames:
        raise SegError(f"{where}: {len(per_frame)} per-frame functional groups for {frames} frames")
    threshold = 0.5 * (header_float(ds, "MaximumFractionalValue", positive=True) or 255.0)
    lut = np.zeros(max([*regions, 0]) + 1, dtype=np.uint8)
    for number, region in regions.items():
        lut[number] = region
    out = np.zeros((depth, height, width), dtype=np.uint8)
    for f, frame in enumerate(iter_pixels(ds)):
        group = per_frame[f]
        k = _frame_slice(group, shared, index_of, lps[:3, :3], depth, f, where)
        frame = np.asarray(frame)
        if seg_type == "LABELMAP":
            values = frame.astype(np.int64)
            if values.max(initial=0) >= len(lut):
                raise SegError(f"{where}: frame {f + 1} holds value {int(values.max())}, not a segment number")
            labels = lut[values]
        else:
            identification = _item(group, None, "SegmentIdentificationSequence")
            number = header_int(identification, "ReferencedSegmentNumber", 0, minimum=1)
            if number not in regions:
                raise SegError(f"{where}: frame {f + 1} refers to segment {number}, which the SEG does not describe")
            mask = frame >= threshold if seg_type == "FRACTIONAL" else frame > 0
            labels = np.where(mask, np.uint8(regions[number]), np.uint8(BACKGROUND))
        current = out[k]
        clash = (labels != BACKGROUND) & (current != BACKGROUND) & (labels != current)
        if np.any(clash):
            raise SegError(f"{where}: segments of different sub-regions overlap in {int(clash.sum())} voxel(s) of "
                           f"slice {k}; fedfusion needs one sub-region per voxel")
        np.copyto(current, labels, where=labels != BACKGROUND)
    return out
