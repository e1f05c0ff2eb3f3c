"""CaseDataset: item contract, missing modalities, normalisation, augmentation, 2D slices, caching, no PHI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from common.data import site as site_module
from common.data.dataset import CaseDataset
from common.data.geometry import save_nifti
from tests.readers_helpers import PHI_STRINGS, make_seg, make_volume, simple_affine, write_site

SHAPE = (6, 12, 12)
MODS = ("t1", "t2", "flair", "ct")


@pytest.fixture
def readers_nifti_site(tmp_path: Path) -> Path:
    """A NIfTI site of 3 cases; case-b lacks flair and ct, case-c lacks t1."""
    seg = make_seg(SHAPE)
    cases = {
        "case-a": {m: make_volume(SHAPE, seed=i) for i, m in enumerate(MODS)},
        "case-b": {"t1": make_volume(SHAPE, seed=7), "t2": make_volume(SHAPE, seed=8)},
        "case-c": {"t2": make_volume(SHAPE, seed=9), "flair": make_volume(SHAPE, seed=10)},
    }
    return write_site(tmp_path / "site-01", cases, {"case-a": 1, "case-b": 0, "case-c": 1}, simple_affine(),
                      fmt="nifti", seg={c: seg for c in cases})


def test_item_contract_and_missing_modalities(readers_nifti_site: Path) -> None:
    ds = CaseDataset([readers_nifti_site], modalities=MODS, spatial_size=(4, 8, 8))
    assert len(ds) == 3
    assert ds.modality_counts() == {"t1": 2, "t2": 3, "flair": 2, "ct": 1}
    item = ds[[c for _, c in ds.cases].index("case-b")]
    assert set(item) == {"image", "mask", "seg", "label", "has_seg", "has_label", "case_id"}
    assert float(item["has_seg"]) == 1.0 and float(item["has_label"]) == 1.0 and item["has_seg"].shape == ()
    assert item["image"].dtype == torch.float32 and item["image"].shape == (4, 4, 8, 8)
    assert item["mask"].dtype == torch.float32 and item["mask"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert item["seg"].dtype == torch.int64 and item["seg"].shape == (4, 8, 8)
    assert item["label"].dtype == torch.int64 and item["label"].shape == () and int(item["label"]) == 0
    assert item["case_id"] == "case-b"
    assert torch.count_nonzero(item["image"][2:]) == 0  # missing channels exactly zero
    for c in (0, 1):  # present channels on a z scale (over the head mask, common/data/intensity.py), not raw
        channel = item["image"][c]
        assert bool(torch.isfinite(channel).all()) and abs(float(channel.mean())) < 3
        assert 0.3 < float(channel.std()) < 3
    assert set(torch.unique(item["seg"]).tolist()) <= {0, 1, 2, 3} and item["seg"].max() > 0


def test_augment_flips_image_and_seg_together(tmp_path: Path) -> None:
    seg = make_seg(SHAPE)
    t1 = (seg > 0).astype(np.float32) * 100 + 10  # image bright exactly where the lesion is
    root = write_site(tmp_path / "s", {"c1": {"t1": t1}}, {"c1": 1}, simple_affine(), fmt="nifti",
                      seg={"c1": seg})
    ds = CaseDataset([root], modalities=("t1", "t2"), spatial_size=SHAPE, augment=True, seed=1)
    base = CaseDataset([root], modalities=("t1", "t2"), spatial_size=SHAPE)[0]
    flipped = 0
    for _ in range(8):
        item = ds[0]
        lesion = item["seg"] > 0
        assert float(item["image"][0][lesion].min()) > float(item["image"][0][~lesion].max())
        assert torch.count_nonzero(item["image"][1]) == 0  # missing channel survives intensity jitter
        flipped += int(not torch.equal(item["seg"], base["seg"]))
    assert flipped > 0  # seg is symmetric only about the centre, so some flip shows


def test_2d_items_take_the_lesion_slice(tmp_path: Path) -> None:
    seg = np.zeros(SHAPE, dtype=np.uint8)
    seg[4, 3:8, 3:8] = 1  # lesion only in slice 4
    root = write_site(tmp_path / "s", {"c1": {"t1": make_volume(SHAPE)}}, {"c1": 0}, simple_affine(), fmt="nifti",
                      seg={"c1": seg})
    item = CaseDataset([root], modalities=("t1", "t2"), spatial_size=(12, 12))[0]
    assert item["image"].shape == (2, 12, 12) and item["seg"].shape == (12, 12)
    assert int(item["seg"].sum()) == 25


def test_bad_cases_are_skipped_and_listed(readers_nifti_site: Path, caplog: pytest.LogCaptureFixture) -> None:
    broken = readers_nifti_site / "case-x"
    broken.mkdir()
    (broken / "img.dcm").write_bytes(b"\x00" * 300)
    (readers_nifti_site / "case-nolabel").mkdir()
    save_nifti(make_volume(SHAPE), simple_affine(), readers_nifti_site / "case-nolabel" / "case-nolabel_t1.nii.gz")
    with open(readers_nifti_site / "labels.csv", "a") as fh:
        fh.write("case-x,1\n")
    with caplog.at_level("WARNING"):
        ds = CaseDataset([readers_nifti_site], modalities=MODS, spatial_size=(4, 8, 8))
    assert len(ds) == 3
    kinds = {(p.case_id, p.kind) for p in ds.problems}
    assert ("case-x", "unreadable-file") in kinds and ("case-x", "no-images") in kinds
    assert ("case-nolabel", "missing-label") in kinds
    assert "case-x" in caplog.text
    for i in range(len(ds)):
        ds[i]  # iteration never raises


def test_no_usable_case_raises_naming_the_folder(tmp_path: Path) -> None:
    site = tmp_path / "site-empty"
    (site / "case-1").mkdir(parents=True)
    (site / "case-1" / "x.dcm").write_bytes(b"garbage")
    (site / "labels.csv").write_text("case_id,label\ncase-1,0\n")
    with pytest.raises(ValueError, match="site-empty"):
        CaseDataset([site], spatial_size=(4, 8, 8))


def test_in_memory_and_disk_cache(readers_nifti_site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_dir = tmp_path / "cache"
    first = CaseDataset([readers_nifti_site], modalities=MODS, spatial_size=(4, 8, 8), cache_dir=cache_dir)
    assert len(list(cache_dir.glob("*.npz"))) == 3

    def no_reading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the source was re-read despite the cache")

    # in-memory: iterating reads nothing
    monkeypatch.setattr("common.data.dataset.load_case", no_reading)
    items = [first[i] for i in range(len(first))]
    # on-disk: a new dataset (e.g. next process) builds from the cache only
    second = CaseDataset([readers_nifti_site], modalities=MODS, spatial_size=(4, 8, 8), cache_dir=cache_dir,
                         cache=False)
    for a, i in zip(items, range(len(second))):
        b = second[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["seg"], b["seg"])
    monkeypatch.setattr("common.data.dataset.load_case", site_module.load_case)
    # a changed file invalidates its entry
    target = readers_nifti_site / "case-a" / "case-a_t1.nii.gz"
    save_nifti(make_volume(SHAPE, seed=99), simple_affine(), target)
    CaseDataset([readers_nifti_site], modalities=MODS, spatial_size=(4, 8, 8), cache_dir=cache_dir)
    assert len(list(cache_dir.glob("*.npz"))) == 4


def test_data_root_pools_sites_but_never_heldout(readers_nifti_site: Path, tmp_path: Path) -> None:
    seg = make_seg(SHAPE)
    write_site(tmp_path / "site-02", {"case-z": {"t1": make_volume(SHAPE)}}, {"case-z": 0}, simple_affine(),
               fmt="nifti", seg={"case-z": seg})
    write_site(tmp_path / "heldout", {"case-h": {"t1": make_volume(SHAPE)}}, {"case-h": 0}, simple_affine(),
               fmt="nifti", seg={"case-h": seg})
    pooled = CaseDataset([tmp_path], modalities=MODS, spatial_size=(4, 8, 8))
    assert sorted(s for s, _ in pooled.cases) == ["site-01"] * 3 + ["site-02"]
    held = CaseDataset([tmp_path / "heldout"], modalities=MODS, spatial_size=(4, 8, 8))
    assert held.cases == [("heldout", "case-h")]


def _strings(value: Any, out: list[str]) -> None:
    """Every string reachable from an item value (dicts, sequences, tensors' metadata)."""
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _strings(k, out)
            _strings(v, out)
    elif isinstance(value, (list, tuple, set)):
        for v in value:
            _strings(v, out)
    elif isinstance(value, torch.Tensor):
        assert type(value) is torch.Tensor, f"item carries a {type(value).__name__}, not a plain tensor"
        for attr in ("meta", "applied_operations"):
            if hasattr(value, attr):
                _strings(getattr(value, attr), out)
    elif hasattr(value, "__dict__"):
        _strings(vars(value), out)


@pytest.mark.parametrize("augment", [False, True])
def test_no_header_string_or_path_reaches_an_item(tmp_path: Path, augment: bool) -> None:
    seg = make_seg(SHAPE)
    root = write_site(tmp_path / "site-phi", {"case-0001": {"t1": make_volume(SHAPE), "ct": make_volume(SHAPE)}},
                      {"case-0001": 1}, simple_affine(), fmt="dicom", seg={"case-0001": seg})
    ds = CaseDataset([root], modalities=("t1", "ct"), spatial_size=(4, 8, 8), augment=augment)
    item = ds[0]
    assert set(item) == {"image", "mask", "seg", "label", "has_seg", "has_label", "case_id"}
    assert float(item["has_seg"]) == 1.0 and float(item["has_label"]) == 1.0 and item["has_seg"].shape == ()
    found: list[str] = []
    _strings(item, found)
    assert sorted(found) == sorted(["image", "mask", "seg", "label", "has_seg", "has_label", "case_id", "case-0001"])
    for s in found:
        assert str(tmp_path) not in s and "/" not in s
        assert not any(phi.lower() in s.lower() for phi in PHI_STRINGS)


def test_phantom_dicom_site_headers_stay_out_of_items(tmp_path: Path) -> None:
    """The phantom writer stamps synthetic PHI into headers; none of it (nor a path) reaches an item."""
    from simulations import phantoms
    from simulations import phantom_writers as writers
    import pydicom

    case = phantoms.make_case(np.random.default_rng(2), "case-0001", shape=(8, 16, 16), modalities=("t1", "ct"))
    site = tmp_path / "site-01"
    writers.write_case_dicom(case, site / "case-0001", uid_seed=3)
    (site / "labels.csv").write_text(f"case_id,label\ncase-0001,{case.label}\n")
    header_strings: set[str] = set()
    for path in (site / "case-0001").rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for key in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "InstitutionName"):
            if ds.get(key):
                header_strings.add(str(ds.get(key)))
    item = CaseDataset([site], modalities=("t1", "ct"), spatial_size=(8, 16, 16))[0]
    found: list[str] = []
    _strings(item, found)
    assert sorted(found) == sorted(["image", "mask", "seg", "label", "has_seg", "has_label", "case_id", "case-0001"])
    assert not any(h and h in s for h in header_strings for s in found)
    assert int(item["label"]) == case.label
