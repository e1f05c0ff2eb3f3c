"""DICOM reader: pydicom's own test files, series made with pydicom, slice order, gaps, bad files, mapping."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import pydicom
from pydicom.data import get_testdata_file  # noqa: E402

from common.data.dicom_reader import read_dicom_case  # noqa: E402
from common.data.geometry import Grid, dicom_affine, reorient_grid, resample_to_grid, save_nifti  # noqa: E402
from common.data.series_mapping import IGNORE, load_series_mapping  # noqa: E402
from common.data.site import CaseError, load_case, scan_case  # noqa: E402
from tests.readers_helpers import make_seg, make_volume, simple_affine, write_series  # noqa: E402


def _kinds(problems) -> set[str]:
    return {p.kind for p in problems}


def test_ct_small_reads_as_single_slice_volume_with_rescale(tmp_path: Path) -> None:
    case = tmp_path / "site" / "case-1" / "deep" / "er"
    case.mkdir(parents=True)
    src = get_testdata_file("CT_small.dcm")
    shutil.copy(src, case / "ct.dcm")
    ds = pydicom.dcmread(src)
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)

    data = load_case(tmp_path / "site" / "case-1", ["ct"])
    assert list(data.images) == ["ct"]
    assert data.images["ct"].shape == (1, 128, 128)
    np.testing.assert_allclose(data.images["ct"][0], expected)
    # affine: the position of pixel (row 0, col 0) is ImagePositionPatient (LPS -> RAS)
    ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
    np.testing.assert_allclose(data.grid.affine[:3, 3], ipp * np.array([-1, -1, 1]), atol=1e-4)
    assert data.seg is None and "missing-seg" in _kinds(data.problems)


def test_mr_small_needs_a_description_mapping(tmp_path: Path) -> None:
    case = tmp_path / "case-1"
    case.mkdir()
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.save_as(case / "plain.dcm")
    scan = scan_case(case)
    assert "unknown-series" in _kinds(scan.problems) and not scan.volumes

    ds2 = copy.deepcopy(ds)
    ds2.SeriesDescription = "t2_tse_tra_512"
    ds2.save_as(case / "plain.dcm")
    data = load_case(case)
    assert list(data.images) == ["t2"]
    np.testing.assert_allclose(data.images["t2"][0], ds.pixel_array.astype(np.float32))


def test_round_trip_series_sorted_by_position(tmp_path: Path) -> None:
    vol = make_volume((9, 12, 10), seed=3, lo=-50.0, hi=800.0)
    affine = simple_affine((2.5, 0.8, 0.9), origin=(10.0, -20.0, 5.0))
    write_series(tmp_path / "case-1" / "s1", vol, affine, "AX FLAIR")
    slope = (vol.max() - vol.min()) / 60000.0
    data = load_case(tmp_path / "case-1", ["flair"])
    assert data.images["flair"].shape == vol.shape
    np.testing.assert_allclose(data.images["flair"], vol, atol=slope)
    np.testing.assert_allclose(data.grid.affine, affine, atol=1e-4)


def test_oblique_series_resampled_onto_seg_grid(tmp_path: Path) -> None:
    case = tmp_path / "case-1"
    fine = simple_affine((2.0, 1.0, 1.0))
    seg = make_seg((8, 16, 16))
    case.mkdir()
    save_nifti(seg, fine, case / "case-1_seg.nii.gz")
    coarse = simple_affine((4.0, 2.0, 2.0))
    t2 = make_volume((4, 8, 8), seed=1)
    write_series(case / "t2", t2, coarse, "T2 TSE AX", series_no=2)
    data = load_case(case, ["t1", "t2"])
    assert data.seg is not None and data.seg.shape == (8, 16, 16)
    assert data.images["t2"].shape == (8, 16, 16)
    np.testing.assert_array_equal(data.seg, seg)
    # resampled values stay within the source range (trilinear interpolation)
    inside = data.images["t2"][data.images["t2"] != 0]
    assert inside.min() >= t2.min() - 1 and inside.max() <= t2.max() + 1


def test_one_missing_slice_is_interpolated_many_drop_the_series(tmp_path: Path) -> None:
    vol = make_volume((10, 8, 8), seed=2)
    affine = simple_affine()
    write_series(tmp_path / "a" / "s", vol, affine, "T2 TSE", skip_slices=(4,))
    data = load_case(tmp_path / "a", ["t2"])
    assert data.images["t2"].shape == (10, 8, 8)
    gaps = [p for p in data.problems if p.kind == "missing-slices"]
    assert gaps and gaps[0].severity == "warning"
    np.testing.assert_allclose(data.images["t2"][4], (vol[3] + vol[5]) / 2, atol=1.0)

    write_series(tmp_path / "b" / "s", vol, affine, "T2 TSE", skip_slices=(1, 2, 4, 6))
    with pytest.raises(CaseError) as info:
        load_case(tmp_path / "b", ["t2"])
    assert "missing-slices" in _kinds(info.value.problems)


def test_bad_files_are_reported_and_skipped(tmp_path: Path) -> None:
    case = tmp_path / "case-1"
    vol = make_volume((4, 8, 8))
    files = write_series(case / "good", vol, simple_affine(), "AX T1 POST GD")
    (case / "junk").mkdir()
    (case / "junk" / "random.dcm").write_bytes(np.random.default_rng(0).bytes(2048))
    raw = files[0].read_bytes()
    (case / "junk" / "cut.dcm").write_bytes(raw[: len(raw) // 2])
    shutil.copy(get_testdata_file("test-SR.dcm"), case / "junk" / "report.dcm")
    shutil.copy(get_testdata_file("DICOMDIR"), case / "DICOMDIR")
    (case / "notes.txt").write_text("not dicom, ignored silently")

    data = load_case(case, ["t1ce"])
    np.testing.assert_allclose(data.images["t1ce"], vol, atol=(vol.max() - vol.min()) / 60000)
    by_name = {Path(p.path).name: p.kind for p in data.problems}
    assert by_name["random.dcm"] == "unreadable-file"
    assert by_name["cut.dcm"] == "truncated-file"
    assert by_name["report.dcm"] == "non-image-dicom"
    assert by_name["DICOMDIR"] == "non-image-dicom"
    assert "notes.txt" not in by_name


def test_truncated_pixel_data_detected_when_decoding(tmp_path: Path) -> None:
    """A file whose header claims fewer rows than the pixel data: decoding fails, the series is reported."""
    case = tmp_path / "case-1"
    case.mkdir()
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows = 200  # more pixels claimed than present: pydicom cannot decode
    ds.save_as(case / "x.dcm")
    with pytest.raises(CaseError) as info:
        load_case(case, ["ct"])
    assert _kinds(info.value.problems) & {"truncated-file", "unreadable-file"}


def test_inconsistent_orientation_and_duplicate_positions(tmp_path: Path) -> None:
    vol = make_volume((4, 8, 8))
    files = write_series(tmp_path / "c1" / "s", vol, simple_affine(), "T2 AX")
    ds = pydicom.dcmread(files[0])
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(files[0])
    scan = scan_case(tmp_path / "c1", ["t2"])
    assert "inconsistent-geometry" in _kinds(scan.problems) and not scan.volumes

    files = write_series(tmp_path / "c2" / "s", vol, simple_affine(), "T2 AX")
    ds0, ds1 = pydicom.dcmread(files[0]), pydicom.dcmread(files[1])
    ds1.ImagePositionPatient = ds0.ImagePositionPatient
    ds1.save_as(files[1])
    scan = scan_case(tmp_path / "c2", ["t2"])
    assert any(p.kind == "inconsistent-geometry" and "share one position" in p.reason for p in scan.problems)


def test_multiframe_without_positions_is_unsupported_with_reason(tmp_path: Path) -> None:
    case = tmp_path / "case-1"
    case.mkdir()
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    frames = np.stack([ds.pixel_array, ds.pixel_array])
    ds.NumberOfFrames = 2
    ds.PixelData = frames.astype(np.int16).tobytes()
    del ds.ImagePositionPatient
    ds.save_as(case / "cine.dcm")
    scan = scan_case(case, ["ct"])
    assert not scan.volumes
    assert any(p.kind == "unsupported-series" and "multiframe" in p.reason for p in scan.problems)


def test_duplicate_series_uses_the_longest(tmp_path: Path) -> None:
    case = tmp_path / "case-1"
    write_series(case / "a", make_volume((3, 8, 8)), simple_affine(), "T2 short", series_no=1)
    long_vol = make_volume((6, 8, 8), seed=5)
    write_series(case / "b", long_vol, simple_affine(), "T2 long", series_no=2)
    data = load_case(case, ["t2"])
    assert data.images["t2"].shape == (6, 8, 8)
    assert "duplicate-series" in _kinds(data.problems)


@pytest.mark.parametrize(
    ("tag", "description", "expected"),
    [
        ("MR", "t1_mprage_sag_p2_iso", "t1"),
        ("MR", "AX T1 SE", "t1"),
        ("MR", "T1_FLASH_3D", "t1"),
        ("MR", "AX T1 POST GD", "t1ce"),
        ("MR", "T1 SE +C", "t1ce"),
        ("MR", "t1_mprage_contrast", "t1ce"),
        ("MR", "T2 TSE AX", "t2"),
        ("MR", "T2 FLAIR AX", "flair"),
        ("MR", "t2_tirm_tra_dark-fluid", "flair"),
        ("MR", "Sag FLAIR post gd", "flair"),
        ("MR", "3-plane localizer", IGNORE),
        ("MR", "ep2d_diff_DWI", None),
        ("CT", "HEAD 5mm STND", "ct"),
        ("US", "", "us"),
        ("OT", "whatever", None),
    ],
)
def test_default_series_mapping(tag: str, description: str, expected: str | None) -> None:
    assert load_series_mapping().identify(tag, description) == expected


def test_user_series_mapping_takes_precedence(tmp_path: Path) -> None:
    default = load_series_mapping()
    assert default.identify("MR", "AX BRAVO") == "t1"
    user = load_series_mapping({"t1ce": ["bravo"], "ignore": "ep2d_diff"})
    assert user.identify("MR", "AX BRAVO") == "t1ce"
    assert user.identify("MR", "ep2d_diff_DWI") == IGNORE
    assert user.identify("MR", "T2 TSE") == "t2"  # defaults still apply

    toml_file = tmp_path / "map.toml"
    toml_file.write_text('flair = ["SPC_DARKFL"]\n')
    assert load_series_mapping(toml_file).identify("MR", "t2_spc_darkfl_sag") == "flair"
    json_file = tmp_path / "map.json"
    json_file.write_text(json.dumps({"series-map": {"t2": "^PD/T2"}}))
    assert load_series_mapping(json_file).identify("MR", "PD/T2 dual echo") == "t2"

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"t1": "(unclosed"}))
    with pytest.raises(ValueError, match="bad.json"):
        load_series_mapping(bad)
    with pytest.raises(ValueError, match="unknown modality"):
        load_series_mapping({"pet": "PET"})


def test_user_mapping_applies_to_a_real_study(tmp_path: Path) -> None:
    case = tmp_path / "case-1"
    vol = make_volume((3, 8, 8))
    write_series(case / "s", vol, simple_affine(), "SITE_PROTO_7")
    found = read_dicom_case(case, load_series_mapping(), ["t1"], "case-1")
    assert found.series[0].status == "unknown" and "unknown-series" in _kinds(found.problems)
    found = read_dicom_case(case, load_series_mapping({"t1": "proto_7"}), ["t1"], "case-1")
    assert found.series[0].status == "used" and "t1" in found.volumes


def test_reorient_grid_moves_whole_voxels() -> None:
    vol = make_volume((5, 6, 7))
    affine = np.array([[0, 0, 1.5, 3], [2.0, 0, 0, -4], [0, -1.0, 0, 7], [0, 0, 0, 1]])  # k->A, j->I, i->R
    grid = reorient_grid(Grid(vol.shape, affine))
    moved = resample_to_grid(vol, affine, grid)
    assert grid.shape == (6, 5, 7)  # slice axis (S/I) first
    assert sorted(moved.ravel().tolist()) == pytest.approx(sorted(vol.ravel().tolist()), abs=1e-4)
    np.testing.assert_allclose(dicom_affine([0, 0, 0], [1, 0, 0, 0, 1, 0], [1, 1], [0, 0, 1]),
                               reorient_grid(Grid((2, 2, 2), dicom_affine([0, 0, 0], [1, 0, 0, 0, 1, 0],
                                                                          [1, 1], [0, 0, 1]))).affine)


def test_phantom_round_trip_dicom(tmp_path: Path) -> None:
    """phantom -> DICOM (simulations.phantom_writers) -> reader gives the volumes back within rescale precision."""
    from simulations import phantoms
    from simulations import phantom_writers as writers
    case = phantoms.make_case(np.random.default_rng(0), "case-0001", shape=(8, 16, 16),
                              modalities=("t1", "t2", "ct", "us"))
    case_dir = tmp_path / "site-01" / "case-0001"
    writers.write_case_dicom(case, case_dir, uid_seed=0)
    data = load_case(case_dir)
    assert set(data.images) == set(case.volumes)
    np.testing.assert_allclose(data.grid.affine, case.affine, atol=1e-3)
    np.testing.assert_array_equal(data.seg, case.seg)
    slopes: dict[str, float] = {}
    for path in case_dir.rglob("*"):
        if path.is_file() and not path.name.endswith((".nii", ".nii.gz")):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            m = load_series_mapping().identify(ds.get("Modality"), ds.get("SeriesDescription", ""))
            slopes[m] = max(slopes.get(m, 0.0), float(ds.get("RescaleSlope", 1) or 1))
    for m, vol in case.volumes.items():
        assert data.images[m].shape == vol.shape
        np.testing.assert_allclose(data.images[m], vol, atol=slopes[m] / 2 + 1e-3 * float(np.ptp(vol)) + 1e-4,
                                   err_msg=m)


def test_default_mapping_covers_every_phantom_vendor() -> None:
    from simulations import phantom_writers as writers
    from models.modalities import DICOM_MODALITY

    mapping = load_series_mapping()
    for vendor, names in writers.SERIES_DESCRIPTIONS.items():
        for modality, name in names.items():
            description = name.format(dz=2.5)
            assert mapping.identify(DICOM_MODALITY[modality], description) == modality, (vendor, description)


def test_enhanced_multiframe_with_per_frame_positions_is_a_volume(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    from common.data.geometry import dicom_geometry

    vol = make_volume((3, 8, 8), lo=0, hi=30000).astype(np.int16)
    affine = simple_affine((3.0, 1.0, 1.0))
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Modality, ds.SeriesDescription = "MR", "T2 TSE 3D"
    for tag in ("ImagePositionPatient", "RescaleSlope", "RescaleIntercept"):
        delattr(ds, tag)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 8, 8, 3
    shared = Dataset()
    orientation = Dataset()
    measures = Dataset()
    _, iop, spacing, thickness = dicom_geometry(affine, 0)
    orientation.ImageOrientationPatient = iop
    measures.PixelSpacing, measures.SliceThickness = spacing, thickness
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    shared.PixelMeasuresSequence = DicomSequence([measures])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for k in (2, 0, 1):  # frames stored out of order: the reader sorts by position
        item, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = dicom_geometry(affine, k)[0]
        item.PlanePositionSequence = DicomSequence([pos])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    ds.PixelData = np.stack([vol[2], vol[0], vol[1]]).tobytes()
    (tmp_path / "case-1").mkdir()
    ds.save_as(tmp_path / "case-1" / "enhanced.dcm")
    data = load_case(tmp_path / "case-1", ["t2"])
    np.testing.assert_allclose(data.images["t2"], vol.astype(np.float32))
    np.testing.assert_allclose(data.grid.affine, affine, atol=1e-4)
