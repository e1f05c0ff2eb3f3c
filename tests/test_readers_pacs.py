"""What a PACS exports: DICOM SEG objects as a case's segmentation, enhanced (multi-frame) MR/CT objects, and every
compressed transfer syntax pydicom's locally shipped test files carry, all through fedfusion's per-file reader."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from pydicom.data import get_testdata_file  # noqa: E402

from common.data.conventions import CORE, ENHANCING, OEDEMA  # noqa: E402
from common.data.limits import ReaderLimits  # noqa: E402
from common.data.site import load_case, scan_case  # noqa: E402
from tests.readers_helpers import make_seg, make_volume, simple_affine, write_series  # noqa: E402

SHAPE = (6, 12, 10)
AFFINE = simple_affine((2.0, 1.0, 1.0), (10.0, 20.0, 30.0))
SOP_CLASS = {"MR": "1.2.840.10008.5.1.4.1.1.4", "CT": "1.2.840.10008.5.1.4.1.1.2"}


def _write_source_series(folder: Path, vol: np.ndarray, description: str = "T2 AX", modality: str = "MR",
                         series_no: int = 1, slopes: list[float] | None = None) -> list["pydicom.Dataset"]:
    """A single-frame series with the SOP class of its modality (what PACS and highdicom expect) and one study;
    ``slopes`` re-quantises each slice with its own RescaleSlope (a per-frame rescale once converted)."""
    paths = write_series(folder, vol, AFFINE, description, modality, series_no=series_no)
    datasets = []
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SOP_CLASS[modality]
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.99"
        if slopes is not None:
            k = int(ds.InstanceNumber) - 1
            values = vol[k]
            slope = slopes[k]
            intercept = float(values.min()) + 30000.0 * slope
            ds.PixelData = np.round((values - intercept) / slope).astype(np.int16).tobytes()
            ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
        ds.save_as(path, enforce_file_format=True)
        datasets.append(ds)
    return sorted(datasets, key=lambda d: int(d.InstanceNumber))


def _segment(number: int, label: str, code: tuple[str, str] = ("108369006", "Neoplasm")) -> "hd.seg.SegmentDescription":
    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=label,
        segmented_property_category=hd.sr.CodedConcept("49755003", "SCT", "Morphologically Altered Structure"),
        segmented_property_type=hd.sr.CodedConcept(code[0], "SCT", code[1]),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )


def _write_seg(path: Path, sources: list["pydicom.Dataset"], label_map: np.ndarray,
               segments: list["hd.seg.SegmentDescription"], seg_type: str = "BINARY") -> "pydicom.Dataset":
    """A SEG of ``sources`` (in slice order) whose pixel values are segment numbers; empty frames are omitted, as
    highdicom and most exporters do."""
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=label_map, segmentation_type=seg_type, segment_descriptions=segments,
        series_instance_uid=hd.UID(), series_number=20, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="fedfusion tests", manufacturer_model_name="synthetic", software_versions="1",
        device_serial_number="0",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return seg


#: segment numbers in an order unlike fedfusion's, so only the names can place them
SEGMENTS = [(1, "Enhancing tumor", ("108369006", "Neoplasm")), (2, "Peritumoral edema", ("79654002", "Edema")),
            (3, "Necrosis", ("6574001", "Necrosis"))]
TO_SEGMENT = {ENHANCING: 1, OEDEMA: 2, CORE: 3}


def _seg_case(tmp_path: Path, segments: list[tuple[int, str, tuple[str, str]]] = SEGMENTS) -> tuple[Path, np.ndarray]:
    case = tmp_path / "site" / "case-1"
    sources = _write_source_series(case / "study" / "t2", make_volume(SHAPE))
    labels = make_seg(SHAPE)  # fedfusion sub-regions 0..3
    numbers = np.zeros_like(labels)
    for region, number in TO_SEGMENT.items():
        numbers[labels == region] = number
    _write_seg(case / "study" / "seg" / "seg.dcm", sources, numbers, [_segment(*s) for s in segments])
    return case, labels


def test_dicom_seg_is_the_cases_segmentation_on_its_source_grid(tmp_path: Path) -> None:
    case, labels = _seg_case(tmp_path)
    scan = scan_case(case, ["t2"])  # native grid
    assert [p for p in scan.problems if p.severity == "error"] == []
    seg, affine = scan.seg  # type: ignore[misc]
    np.testing.assert_array_equal(seg, labels)
    np.testing.assert_allclose(affine, scan.volumes["t2"][1], atol=1e-6)
    assert scan.convention == "dicom-seg" and scan.chosen_by == "segments"
    assert {(s.modality_tag, s.modality, s.status) for s in scan.series} == {("MR", "t2", "used"),
                                                                           ("SEG", "seg", "used")}
    data = load_case(case, ["t2"], require_seg=True)
    np.testing.assert_array_equal(data.seg, labels)  # the source grid is already slice-first: no resampling


def test_seg_is_placed_even_when_its_source_series_is_not_requested(tmp_path: Path) -> None:
    case, labels = _seg_case(tmp_path)
    _write_source_series(case / "study" / "flair", make_volume(SHAPE, seed=4), "AX FLAIR", series_no=2)
    scan = scan_case(case, ["flair"])
    assert set(scan.volumes) == {"flair"}
    np.testing.assert_array_equal(scan.seg[0], labels)  # type: ignore[index]


def test_unknown_segment_is_reported_and_the_seg_not_used(tmp_path: Path) -> None:
    case, _ = _seg_case(tmp_path, [*SEGMENTS[:2], (3, "Whole tumor", ("108369006", "Neoplasm"))])
    data = load_case(case, ["t2"])
    assert data.seg is None
    kinds = [p.kind for p in data.problems]
    assert "unknown-segment" in kinds and "missing-seg" not in kinds
    assert "Whole tumor" in data.problems[kinds.index("unknown-segment")].reason


def test_seg_of_a_series_that_is_not_in_the_case_is_reported(tmp_path: Path) -> None:
    case, _ = _seg_case(tmp_path)
    shutil.rmtree(case / "study" / "t2")
    _write_source_series(case / "study" / "other", make_volume(SHAPE), "T2 AX", series_no=7)
    scan = scan_case(case, ["t2"])
    assert scan.seg is None and "t2" in scan.volumes
    assert any(p.kind == "bad-seg" and "not in the case folder" in p.reason for p in scan.problems)


def test_seg_over_the_reader_limits_is_refused_before_decoding(tmp_path: Path) -> None:
    case, _ = _seg_case(tmp_path)
    seg_file = case / "study" / "seg" / "seg.dcm"
    header = pydicom.dcmread(seg_file, stop_before_pixels=True)
    seg_voxels = int(header.NumberOfFrames) * int(header.Rows) * int(header.Columns)
    assert seg_voxels > int(np.prod(SHAPE))
    scan = scan_case(case, ["t2"], limits=ReaderLimits(max_voxels=int(np.prod(SHAPE))))
    assert "t2" in scan.volumes and scan.seg is None
    assert any(p.kind == "limit-exceeded" and p.path == str(seg_file) for p in scan.problems)


# ------------------------------------------------------------------------------------------------------
# enhanced (multi-frame) objects
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("modality", "converter", "sop_class"), [
    ("MR", "LegacyConvertedEnhancedMRImage", None), ("CT", "LegacyConvertedEnhancedCTImage", None),
    # the same objects labelled Enhanced MR / Enhanced CT Image Storage: the reader goes by the functional groups
    ("MR", "LegacyConvertedEnhancedMRImage", "1.2.840.10008.5.1.4.1.1.4.1"),
    ("CT", "LegacyConvertedEnhancedCTImage", "1.2.840.10008.5.1.4.1.1.2.1")])
def test_enhanced_object_equals_the_single_frame_series_it_came_from(
    tmp_path: Path, modality: str, converter: str, sop_class: str | None
) -> None:
    vol = make_volume(SHAPE, lo=-500.0, hi=1500.0)
    slopes = [0.01 * (k + 1) for k in range(SHAPE[0])]  # a different rescale per slice -> per-frame functional groups
    sources = _write_source_series(tmp_path / "single" / "s", vol, "T2 AX", modality, slopes=slopes)
    enhanced = getattr(hd.legacy, converter)(sources, series_instance_uid=hd.UID(), series_number=5,
                                             sop_instance_uid=hd.UID(), instance_number=1)
    per_frame = enhanced.PerFrameFunctionalGroupsSequence
    assert len(per_frame) == SHAPE[0] and "PixelValueTransformationSequence" in per_frame[0]
    if sop_class is not None:
        enhanced.SOPClassUID = enhanced.file_meta.MediaStorageSOPClassUID = sop_class
    (tmp_path / "enhanced").mkdir()
    enhanced.save_as(tmp_path / "enhanced" / "enhanced.dcm")

    wanted = "ct" if modality == "CT" else "t2"
    single = scan_case(tmp_path / "single", [wanted])
    multi = scan_case(tmp_path / "enhanced", [wanted])
    assert [p for p in multi.problems if p.severity == "error"] == []
    np.testing.assert_array_equal(multi.volumes[wanted][0], single.volumes[wanted][0])
    np.testing.assert_allclose(multi.volumes[wanted][1], single.volumes[wanted][1], atol=1e-6)
    np.testing.assert_allclose(single.volumes[wanted][1], AFFINE, atol=1e-5)


def test_enhanced_object_with_a_dicom_seg_of_its_frames(tmp_path: Path) -> None:
    """A SEG drawn on an enhanced object's frames lands on the same voxels."""
    case = tmp_path / "site" / "case-1"
    sources = _write_source_series(tmp_path / "tmp-single", make_volume(SHAPE))
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(sources, series_instance_uid=hd.UID(), series_number=5,
                                                        sop_instance_uid=hd.UID(), instance_number=1)
    (case / "mr").mkdir(parents=True)
    enhanced.save_as(case / "mr" / "enhanced.dcm")
    labels = make_seg(SHAPE)
    positions = [float(g.PlanePositionSequence[0].ImagePositionPatient[2])
                 for g in enhanced.PerFrameFunctionalGroupsSequence]
    slices = [int(round((z - AFFINE[2, 3]) / AFFINE[2, 0])) for z in positions]  # frame -> slice k
    numbers = np.zeros((len(slices), *SHAPE[1:]), dtype=np.uint8)
    for f, k in enumerate(slices):
        for region, number in TO_SEGMENT.items():
            numbers[f][labels[k] == region] = number
    _write_seg(case / "seg" / "seg.dcm", [enhanced], numbers, [_segment(*s) for s in SEGMENTS])
    scan = scan_case(case, ["t2"])
    assert [p for p in scan.problems if p.severity == "error"] == []
    np.testing.assert_array_equal(scan.seg[0], labels)  # type: ignore[index]


# ------------------------------------------------------------------------------------------------------
# transfer syntaxes (only files the installed pydicom carries; nothing is downloaded)
# ------------------------------------------------------------------------------------------------------
def _as_case_file(name: str, case: Path) -> Path:
    """Copy pydicom test file ``name`` into ``case`` with the header fields a series needs (description, series
    UID, modality) added; the pixel data and its transfer syntax are kept as they are."""
    ds = pydicom.dcmread(get_testdata_file(name))
    syntax = ds.file_meta.TransferSyntaxUID
    ds.SeriesDescription = "codec test"
    ds.SeriesInstanceUID = ds.get("SeriesInstanceUID") or f"1.2.826.0.1.3680043.8.498.77.{len(name)}"
    ds.Modality = ds.get("Modality") or "OT"
    case.mkdir(parents=True, exist_ok=True)
    path = case / name
    ds.save_as(path)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    return path


def _read_one(case: Path, limits: ReaderLimits = ReaderLimits()) -> "object":
    return scan_case(case, ["t2"], series_mapping={"t2": "^codec test$"}, limits=limits)


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm",
                                  "MR_small_implicit.dcm"])
def test_lossless_syntaxes_equal_the_uncompressed_pixels(tmp_path: Path, name: str) -> None:
    reference = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.float32)
    _as_case_file(name, tmp_path / "case")
    scan = _read_one(tmp_path / "case")
    assert [p for p in scan.problems if p.severity == "error"] == []
    np.testing.assert_array_equal(scan.volumes["t2"][0], reference[None])


@pytest.mark.parametrize("name", ["JPGExtended.dcm", "JPEG2000.dcm", "JPEGLSNearLossless_16.dcm",
                                  "JPEGLSNearLossless_08.dcm", "image_dfl.dcm"])
def test_lossy_and_deflated_syntaxes_decode(tmp_path: Path, name: str) -> None:
    """Each decodes through the reader to what pydicom's plugins decode (lossy files have no other reference)."""
    ds = pydicom.dcmread(get_testdata_file(name))
    expected = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(
        ds.get("RescaleIntercept", 0))
    _as_case_file(name, tmp_path / "case")
    scan = _read_one(tmp_path / "case")
    assert [p for p in scan.problems if p.severity == "error"] == []
    np.testing.assert_array_equal(scan.volumes["t2"][0], expected.reshape(1, *expected.shape[-2:]))


def test_compressed_file_over_the_limits_is_refused_before_decoding(tmp_path: Path) -> None:
    path = _as_case_file("MR_small_jpeg_ls_lossless.dcm", tmp_path / "case")
    scan = _read_one(tmp_path / "case", ReaderLimits(max_voxels=64 * 64 - 1))
    assert scan.volumes == {}
    assert [(p.kind, p.path) for p in scan.problems if p.severity == "error"] == [("limit-exceeded", str(path))]


def test_non_conformant_jpeg_is_one_files_problem(tmp_path: Path) -> None:
    """pydicom's JPEG-lossy.dcm has invalid SOS parameters (its README: JPGExtended.dcm is the fixed version): no
    decoder reads it, and the reader says so for that file instead of failing the case."""
    path = _as_case_file("JPEG-lossy.dcm", tmp_path / "case")
    scan = _read_one(tmp_path / "case")
    assert scan.volumes == {}
    problems = [p for p in scan.problems if p.path == str(path)]
    assert problems and "cannot decode pixel data" in problems[0].reason
