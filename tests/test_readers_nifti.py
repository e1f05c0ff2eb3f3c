"""NIfTI reader: nibabel's own test images renamed into the BraTS layout, aliases, 4D and bad segmentations."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import nibabel as nib
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform  # noqa: E402
from nibabel.testing import data_path  # noqa: E402

from common.data.geometry import CANONICAL_AXCODES, save_nifti  # noqa: E402
from common.data.nifti_reader import find_nifti_files  # noqa: E402
from common.data.site import load_case, scan_case  # noqa: E402
from tests.readers_helpers import make_seg, make_volume, simple_affine  # noqa: E402


def _nib_file(name: str) -> Path:
    path = Path(data_path) / name
    if not path.is_file():
        pytest.skip(f"nibabel test file {name} not installed")
    return path


def test_nibabel_anatomical_as_brats_case(tmp_path: Path) -> None:
    """anatomical.nii (LAS-ish, x-first) becomes the reference grid, reoriented slice-first without interpolation."""
    case = tmp_path / "case-7"
    case.mkdir()
    shutil.copy(_nib_file("anatomical.nii"), case / "case-7_t1.nii")  # plain .nii accepted
    img = nib.load(case / "case-7_t1.nii")
    data = load_case(case, ["t1", "t2"])
    assert list(data.images) == ["t1"]
    raw = np.asarray(img.dataobj, dtype=np.float32)
    transform = ornt_transform(io_orientation(img.affine), axcodes2ornt(CANONICAL_AXCODES))
    expected = apply_orientation(raw, transform)
    assert data.images["t1"].shape == expected.shape
    np.testing.assert_allclose(data.images["t1"], expected, atol=1e-3)
    assert nib.aff2axcodes(data.grid.affine) == CANONICAL_AXCODES


def test_second_modality_resampled_to_first(tmp_path: Path) -> None:
    case = tmp_path / "c"
    case.mkdir()
    shutil.copy(_nib_file("anatomical.nii"), case / "c_t1.nii")
    shutil.copy(_nib_file("standard.nii.gz"), case / "c_flair.nii.gz")
    data = load_case(case)
    assert set(data.images) == {"t1", "flair"}
    assert data.images["flair"].shape == data.images["t1"].shape
    assert data.images["flair"].dtype == np.float32


def test_4d_image_is_reported_not_raised(tmp_path: Path) -> None:
    case = tmp_path / "c"
    case.mkdir()
    shutil.copy(_nib_file("functional.nii"), case / "c_t2.nii")  # (x, y, z, time)
    shutil.copy(_nib_file("anatomical.nii"), case / "c_t1.nii")
    scan = scan_case(case)
    assert set(scan.volumes) == {"t1"}
    bad = [p for p in scan.problems if p.kind == "unreadable-file"]
    assert bad and "3D" in bad[0].reason and bad[0].path.endswith("c_t2.nii")


def test_brats_layout_with_seg_and_aliases(tmp_path: Path) -> None:
    case = tmp_path / "BraTS-0001"
    affine = simple_affine((2.0, 1.0, 1.0))
    seg = make_seg((6, 12, 12))
    vols = {m: make_volume((6, 12, 12), seed=i) for i, m in enumerate(("t1n", "t1c", "t2w", "t2f"))}
    case.mkdir()
    for tag, vol in vols.items():
        save_nifti(vol, affine, case / f"BraTS-0001-{tag}.nii.gz")
    save_nifti(seg, affine, case / "BraTS-0001-seg.nii.gz")
    (case / "BraTS-0001_dwi.nii.gz").write_bytes(b"")  # unknown tag: reported, ignored
    tags = {f.path.name: f.tag for f in find_nifti_files(case)}
    assert tags["BraTS-0001-t2f.nii.gz"] == "flair" and tags["BraTS-0001_dwi.nii.gz"] is None
    data = load_case(case)
    assert set(data.images) == {"t1", "t1ce", "t2", "flair"}
    np.testing.assert_array_equal(data.seg, seg)
    np.testing.assert_allclose(data.images["flair"], vols["t2f"], atol=1e-4)
    assert any(p.kind == "unknown-file" for p in data.problems)


def test_seg_with_brats2021_labels_is_reported(tmp_path: Path) -> None:
    case = tmp_path / "c"
    case.mkdir()
    affine = simple_affine()
    save_nifti(make_volume((4, 8, 8)), affine, case / "c_t1.nii.gz")
    seg = make_seg((4, 8, 8))
    seg[seg == 3] = 4
    save_nifti(seg, affine, case / "c_seg.nii.gz")
    data = load_case(case)
    assert data.seg is None
    bad = [p for p in data.problems if p.kind == "bad-seg"]
    assert bad and "[4]" in bad[0].reason
    assert os.path.basename(bad[0].path) == "c_seg.nii.gz"


def test_phantom_round_trip_nifti(tmp_path: Path) -> None:
    from simulations import phantoms
    from simulations import phantom_writers as writers
    case = phantoms.make_case(np.random.default_rng(1), "case-0002", shape=(8, 16, 16), modalities=("t1ce", "flair"))
    case_dir = tmp_path / "case-0002"
    writers.write_case_nifti(case, case_dir)
    data = load_case(case_dir)
    assert set(data.images) == {"t1ce", "flair"}
    np.testing.assert_array_equal(data.seg, case.seg)
    for m, vol in case.volumes.items():
        np.testing.assert_allclose(data.images[m], vol, atol=1e-3 * float(np.ptp(vol)) + 1e-4, err_msg=m)
