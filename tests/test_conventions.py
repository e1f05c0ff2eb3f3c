"""Label conventions: files written as each public dataset distributes them keep every sub-region's voxels exactly,
on the native grid; ambiguous cases are reported, never guessed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nibabel")

from common.data.conventions import CORE, ENHANCING, OEDEMA, recognise, region_of_name  # noqa: E402
from common.data.geometry import save_nifti  # noqa: E402
from common.data.inspect import inspect_data  # noqa: E402
from common.data.site import list_cases, scan_case  # noqa: E402
from tests.readers_helpers import make_volume, simple_affine  # noqa: E402

SHAPE = (5, 9, 8)
AFFINE = simple_affine((2.0, 1.0, 1.5), (4.0, -7.0, 11.0))

#: source label value -> fedfusion sub-region, as each convention's documentation defines it
BRATS2021 = {0: 0, 1: CORE, 2: OEDEMA, 4: ENHANCING}
BRATS2023 = {0: 0, 1: CORE, 2: OEDEMA, 3: ENHANCING}
FEDFUSION = {0: 0, 1: OEDEMA, 2: CORE, 3: ENHANCING}


def _source_labels(values: list[int], seed: int) -> np.ndarray:
    """A label volume holding every one of ``values`` (scattered, so a swap of any two is visible)."""
    labels = np.random.default_rng(seed).choice(np.asarray(values, dtype=np.uint8), size=SHAPE)
    labels.flat[: len(values)] = values  # each value at least once
    return labels


def _assert_regions(seg: np.ndarray, source: np.ndarray, meaning: dict[int, int]) -> None:
    """Each fedfusion sub-region holds exactly the source voxels whose value means it."""
    assert seg.shape == source.shape
    for region in (OEDEMA, CORE, ENHANCING):
        expected = np.isin(source, [v for v, r in meaning.items() if r == region])
        np.testing.assert_array_equal(seg == region, expected, err_msg=f"sub-region {region}")
    assert set(np.unique(seg)) <= {0, OEDEMA, CORE, ENHANCING}


def _write_case(case: Path, stem: str, sep: str, tags: dict[str, str], source: np.ndarray) -> dict[str, np.ndarray]:
    """Write ``<stem><sep><tag>.nii.gz`` per tag (tag -> modality) and ``<stem><sep>seg.nii.gz``; returns the images
    by fedfusion modality."""
    case.mkdir(parents=True, exist_ok=True)
    images = {}
    for n, (tag, modality) in enumerate(tags.items()):
        images[modality] = make_volume(SHAPE, seed=n)
        save_nifti(images[modality], AFFINE, case / f"{stem}{sep}{tag}.nii.gz")
    save_nifti(source, AFFINE, case / f"{stem}{sep}seg.nii.gz")
    return images


BRATS21_TAGS = {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}
BRATS23_TAGS = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}


@pytest.mark.parametrize(("stem", "sep", "tags", "meaning", "expected"), [
    ("BraTS2021_00000", "_", BRATS21_TAGS, BRATS2021, "brats2021"),
    ("BraTS20_Training_001", "_", BRATS21_TAGS, BRATS2021, "brats2021"),
    ("BraTS19_2013_0_1", "_", BRATS21_TAGS, BRATS2021, "brats2021"),
    ("Brats18_CBICA_AAB_1", "_", BRATS21_TAGS, BRATS2021, "brats2021"),
    ("BraTS-GLI-00000-000", "-", BRATS23_TAGS, BRATS2023, "brats2023"),
    ("BraTS-MEN-00004-000", "-", BRATS23_TAGS, BRATS2023, "brats2023"),
    ("BraTS-MET-00001-000", "-", BRATS23_TAGS, BRATS2023, "brats2023"),
    ("BraTS-PED-00002-000", "-", BRATS23_TAGS, BRATS2023, "brats2023"),
    ("case-0001", "_", BRATS21_TAGS, FEDFUSION, "fedfusion"),
])
def test_each_convention_keeps_every_sub_region_on_the_native_grid(
    tmp_path: Path, stem: str, sep: str, tags: dict[str, str], meaning: dict[int, int], expected: str
) -> None:
    source = _source_labels(sorted(meaning), seed=len(stem))
    case = tmp_path / "site" / stem
    images = _write_case(case, stem, sep, tags, source)
    scan = scan_case(case)  # native grids: no resampling
    assert [p for p in scan.problems if p.severity == "error"] == []
    assert scan.convention == expected and scan.chosen_by == ("default" if expected == "fedfusion" else "names")
    seg, affine = scan.seg  # type: ignore[misc]
    np.testing.assert_allclose(affine, AFFINE)
    _assert_regions(seg, source, meaning)
    assert set(scan.volumes) == set(images)
    for modality, vol in images.items():
        np.testing.assert_array_equal(scan.volumes[modality][0], vol)


def test_label_values_alone_never_decide(tmp_path: Path) -> None:
    """Values 1..3 are read as BraTS 2023 under BraTS 2023 names and as fedfusion's under other names."""
    source = _source_labels([0, 1, 2, 3], seed=3)
    _write_case(tmp_path / "s" / "BraTS-GLI-00001-000", "BraTS-GLI-00001-000", "-", BRATS23_TAGS, source)
    _write_case(tmp_path / "s" / "case-0002", "case-0002", "_", BRATS23_TAGS, source)
    brats = scan_case(tmp_path / "s" / "BraTS-GLI-00001-000").seg[0]  # type: ignore[index]
    own = scan_case(tmp_path / "s" / "case-0002").seg[0]  # type: ignore[index]
    np.testing.assert_array_equal(brats == OEDEMA, source == 2)
    np.testing.assert_array_equal(own == OEDEMA, source == 1)


@pytest.mark.parametrize(("stem", "sep", "tags", "values", "bad", "hint"), [
    ("BraTS-GLI-00000-000", "-", BRATS23_TAGS, [0, 1, 2, 4], "[4]", "brats2024-gli"),
    ("BraTS2021_00000", "_", BRATS21_TAGS, [0, 1, 2, 3], "[3]", "fedfusion"),
    ("case-1", "_", BRATS21_TAGS, [0, 1, 2, 4], "[4]", "brats2021"),
])
def test_values_impossible_for_the_convention_are_reported(
    tmp_path: Path, stem: str, sep: str, tags: dict[str, str], values: list[int], bad: str, hint: str
) -> None:
    case = tmp_path / "site" / stem
    _write_case(case, stem, sep, tags, _source_labels(values, seed=1))
    scan = scan_case(case)
    assert scan.seg is None
    (problem,) = [p for p in scan.problems if p.kind == "bad-seg"]
    assert bad in problem.reason and hint in problem.reason and "fedfusion-site.toml" in problem.reason
    assert problem.path.endswith(f"{stem}{sep}seg.nii.gz")


def test_files_of_two_conventions_make_the_case_ambiguous(tmp_path: Path) -> None:
    case = tmp_path / "site" / "mixed"
    case.mkdir(parents=True)
    save_nifti(make_volume(SHAPE), AFFINE, case / "BraTS2021_00000_t1.nii.gz")
    save_nifti(_source_labels([0, 1, 2, 3], 0), AFFINE, case / "BraTS-GLI-00000-000-seg.nii.gz")
    report = inspect_data(tmp_path / "site", ["t1"])
    (c,) = report.sites[0].cases
    kinds = [p.kind for p in c.problems]
    assert "ambiguous-convention" in kinds and "missing-seg" not in kinds
    assert not c.has_seg and c.convention == "ambiguous" and c.modalities == ["t1"]
    assert "brats2021" in c.problems[kinds.index("ambiguous-convention")].reason


def test_a_stated_convention_applies_to_every_case_and_inspect_says_so(tmp_path: Path) -> None:
    """BraTS 2024 post-treatment glioma is named like BraTS 2023: only the site can say so; 4 (resection cavity)
    becomes background. The statement also covers files with fedfusion-style names."""
    site = tmp_path / "site-01"
    source = _source_labels([0, 1, 2, 3, 4], seed=5)
    _write_case(site / "BraTS-GLI-02000-000", "BraTS-GLI-02000-000", "-", BRATS23_TAGS, source)
    (site / "fedfusion-site.toml").write_text('convention = "brats2024-gli"\n')
    (site / "labels.csv").write_text("case_id,label\nBraTS-GLI-02000-000,1\n")
    scan = scan_case(site / "BraTS-GLI-02000-000")
    assert scan.convention == "brats2024-gli" and scan.chosen_by == "stated"
    _assert_regions(scan.seg[0], source, {**BRATS2023, 4: 0})  # type: ignore[index]

    report = inspect_data(tmp_path, ["t1", "flair"]).to_dict()
    (case,) = report["sites"][0]["cases"]
    assert case["convention"] == "brats2024-gli" and case["convention_from"] == "stated" and case["usable"]


def test_an_invalid_site_settings_file_is_reported_for_each_case(tmp_path: Path) -> None:
    site = tmp_path / "site-01"
    _write_case(site / "case-1", "case-1", "_", BRATS21_TAGS, _source_labels([0, 1], 0))
    (site / "fedfusion-site.toml").write_text('convention = "brats2019"\n')
    scan = scan_case(site / "case-1")
    assert scan.volumes == {} and scan.seg is None
    (problem,) = scan.problems
    assert problem.kind == "bad-site-settings" and "brats2019" in problem.reason and "brats2021" in problem.reason
    (site / "fedfusion-site.toml").write_text('labels = "brats2021"\n')
    assert "unknown key" in scan_case(site / "case-1").problems[0].reason


def _write_msd_site(site: Path, n_cases: int, with_json: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A Decathlon Task01 folder: 4D images (X, Y, Z, 4: FLAIR, T1w, t1gd, T2w) and labels, plus macOS '._' files as
    the distributed archive has them."""
    (site / "imagesTr").mkdir(parents=True)
    (site / "labelsTr").mkdir()
    (site / "imagesTs").mkdir()
    if with_json:
        (site / "dataset.json").write_text(json.dumps({
            "name": "BRATS", "tensorImageSize": "4D",
            "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
            "training": [{"image": f"./imagesTr/BRATS_{i + 1:03d}.nii.gz",
                          "label": f"./labelsTr/BRATS_{i + 1:03d}.nii.gz"} for i in range(n_cases)],
        }))
    cases = {}
    for i in range(n_cases):
        name = f"BRATS_{i + 1:03d}"
        image = np.stack([make_volume(SHAPE, seed=10 * i + c) for c in range(4)], axis=-1)
        labels = _source_labels([0, 1, 2, 3], seed=i)
        save_nifti(image, AFFINE, site / "imagesTr" / f"{name}.nii.gz")
        save_nifti(labels, AFFINE, site / "labelsTr" / f"{name}.nii.gz")
        (site / "imagesTr" / f"._{name}.nii.gz").write_bytes(b"\0" * 16)
        cases[name] = (image, labels)
    save_nifti(make_volume(SHAPE), AFFINE, site / "imagesTs" / "BRATS_900.nii.gz")
    return cases


@pytest.mark.parametrize("with_json", [True, False])
def test_decathlon_task01_layout(tmp_path: Path, with_json: bool) -> None:
    site = tmp_path / "Task01_BrainTumour"
    cases = _write_msd_site(site, 2, with_json)
    assert [p.name for p in list_cases(site)] == ["BRATS_001.nii.gz", "BRATS_002.nii.gz"]
    image, labels = cases["BRATS_002"]
    scan = scan_case(site / "imagesTr" / "BRATS_002.nii.gz")
    assert scan.case_id == "BRATS_002" and scan.convention == "msd-task01" and scan.chosen_by == "layout"
    assert [p for p in scan.problems if p.severity == "error"] == []
    for c, modality in enumerate(("flair", "t1", "t1ce", "t2")):
        vol, affine = scan.volumes[modality]
        np.testing.assert_array_equal(vol, image[..., c])
        np.testing.assert_allclose(affine, AFFINE)
    _assert_regions(scan.seg[0], labels, FEDFUSION)  # type: ignore[index]

    report = inspect_data(site, ["t1", "flair"], require_seg=True)
    assert [(c.case_id, c.convention, c.has_seg) for c in report.sites[0].cases] == [
        ("BRATS_001", "msd-task01", True), ("BRATS_002", "msd-task01", True)]


def test_decathlon_label_names_decide_the_sub_regions(tmp_path: Path) -> None:
    site = tmp_path / "msd"
    cases = _write_msd_site(site, 1)
    description = json.loads((site / "dataset.json").read_text())
    description["labels"] = {"0": "background", "1": "enhancing tumour", "2": "edema", "3": "necrosis"}
    (site / "dataset.json").write_text(json.dumps(description))
    scan = scan_case(site / "imagesTr" / "BRATS_001.nii.gz")
    _assert_regions(scan.seg[0], cases["BRATS_001"][1], {0: 0, 1: ENHANCING, 2: OEDEMA, 3: CORE})  # type: ignore[index]

    description["labels"]["3"] = "whole tumor"
    (site / "dataset.json").write_text(json.dumps(description))
    scan = scan_case(site / "imagesTr" / "BRATS_001.nii.gz")
    assert scan.seg is None and "flair" in scan.volumes
    assert any(p.kind == "ambiguous-convention" and "whole tumor" in p.reason for p in scan.problems)


def test_a_case_folder_convention_stated_for_a_decathlon_site_is_reported(tmp_path: Path) -> None:
    site = tmp_path / "msd"
    _write_msd_site(site, 1)
    (site / "fedfusion-site.toml").write_text('convention = "brats2021"\n')
    scan = scan_case(site / "imagesTr" / "BRATS_001.nii.gz")
    assert scan.seg is None and [p.kind for p in scan.problems] == ["ambiguous-convention"]


def test_decathlon_site_trains_through_the_dataset(tmp_path: Path) -> None:
    from common.data.dataset import CaseDataset

    site = tmp_path / "site-01"
    _write_msd_site(site, 2)
    (site / "labels.csv").write_text("case_id,label\nBRATS_001,0\nBRATS_002,1\n")
    ds = CaseDataset(site, ["t1", "t1ce", "t2", "flair"], spatial_size=(4, 8, 8), cache_dir=tmp_path / "cache")
    assert ds.cases == [("site-01", "BRATS_001"), ("site-01", "BRATS_002")]
    item = ds[1]
    assert item["case_id"] == "BRATS_002" and int(item["label"]) == 1 and item["mask"].tolist() == [1, 1, 1, 1]
    assert set(np.unique(item["seg"].numpy())) <= {0, 1, 2, 3}


def test_recognise_and_region_names() -> None:
    assert [c.name for c in recognise(["BraTS2021_00000_t1ce.nii.gz", "BraTS2021_00000_seg.nii.gz"])] == ["brats2021"]
    assert [c.name for c in recognise(["BraTS-SSA-00002-000-t2f.nii.gz"])] == ["brats2023"]
    assert [c.name for c in recognise(["c1_t1.nii.gz", "BraTS-GLI-00000-000-seg.nii.gz"])] == ["fedfusion",
                                                                                                   "brats2023"]
    assert recognise(["notes.nii.gz"]) == []
    assert region_of_name("Non-enhancing tumor core") == CORE
    assert region_of_name("Enhancing Tumor") == ENHANCING
    assert region_of_name("Peritumoral edema") == OEDEMA
    assert region_of_name("Whole tumor") is None and region_of_name("Tumor core") is None
    assert region_of_name("Segment 1", code=("SCT", "79654002")) == OEDEMA


def test_site_settings_linked_out_of_the_site_are_not_read(tmp_path: Path) -> None:
    site = tmp_path / "site-01"
    _write_case(site / "case-1", "case-1", "_", BRATS21_TAGS, _source_labels([0, 1], 0))
    outside = tmp_path / "elsewhere.toml"
    outside.write_text('convention = "brats2021"\n')
    (site / "fedfusion-site.toml").symlink_to(outside)
    (problem,) = scan_case(site / "case-1").problems
    assert problem.kind == "bad-site-settings" and "not a file inside the site folder" in problem.reason
