"""Phantom generator: anatomy, complementary contrasts, scenarios, on-disk layout, real DICOM, determinism."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from common.data.geometry import dicom_affine, load_nifti
from models.modalities import DICOM_MODALITY, MODALITIES
from simulations.phantom_writers import (
    SERIES_DESCRIPTIONS,
    generate,
    plan_site,
    write_case_dicom,
    write_case_nifti,
)
from simulations.phantoms import SiteProfile, make_case, sample_lesion
from simulations.scenarios import SCENARIOS, site_profiles

SHAPE = (16, 32, 32)
SOP_CLASS = {"MR": "1.2.840.10008.5.1.4.1.1.4", "CT": "1.2.840.10008.5.1.4.1.1.2", "US": "1.2.840.10008.5.1.4.1.1.6.1"}


@pytest.fixture(scope="module")
def dicom_fed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fed") / "data"
    generate(out, sites=3, cases_per_site=4, seed=7, scenario="realistic", shape=SHAPE, fmt="dicom", heldout_cases=2)
    return out


def _series_dirs(case_dir: Path) -> list[Path]:
    return sorted(p for p in case_dir.iterdir() if p.is_dir())


def _read_labels(site_dir: Path) -> dict[str, int]:
    with open(site_dir / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and list(rows[0]) == ["case_id", "label"]
    return {r["case_id"]: int(r["label"]) for r in rows}


# ------------------------------------------------------------------------------------------------ the case


def test_make_case_is_deterministic_and_subset_independent() -> None:
    a = make_case(np.random.default_rng(11), "case-0001", shape=SHAPE)
    b = make_case(np.random.default_rng(11), "case-0001", shape=SHAPE)
    c = make_case(np.random.default_rng(11), "case-0001", shape=SHAPE, modalities=("flair", "us"))
    assert set(a.volumes) == set(MODALITIES) and set(c.volumes) == {"flair", "us"}
    for m in MODALITIES:
        assert a.volumes[m].shape == SHAPE and a.volumes[m].dtype == np.float32
        np.testing.assert_array_equal(a.volumes[m], b.volumes[m])
    for m in c.volumes:  # a missing series does not change the others
        np.testing.assert_array_equal(a.volumes[m], c.volumes[m])
    np.testing.assert_array_equal(a.seg, c.seg)
    assert a.seg.dtype == np.uint8 and set(np.unique(a.seg)) <= {0, 1, 2, 3}
    assert a.label in (0, 1) and a.affine.shape == (4, 4)
    # physical units: CT in HU (air -1000, bone > 700), US echo 0..255, MR magnitudes >= 0
    assert a.volumes["ct"].min() <= -900 and a.volumes["ct"].max() >= 700
    assert 0 <= a.volumes["us"].min() and a.volumes["us"].max() <= 255
    assert min(float(a.volumes[m].min()) for m in ("t1", "t1ce", "t2", "flair")) >= 0
    d = make_case(np.random.default_rng(12), "case-0001", shape=SHAPE)
    assert not np.array_equal(a.volumes["t1"], d.volumes["t1"])


def test_segmentation_has_three_nested_subregions() -> None:
    six = ndimage.generate_binary_structure(3, 1)
    for seed in range(5):
        case = make_case(np.random.default_rng(seed), "case-0001", shape=SHAPE)
        seg = case.seg
        assert all((seg == lab).sum() > 0 for lab in (1, 2, 3)), np.bincount(seg.ravel())
        # core (2) is enclosed by the enhancing rim (3), which is enclosed by oedema (1)
        around_core = ndimage.binary_dilation(seg == 2, six) & (seg != 2)
        assert set(np.unique(seg[around_core])) <= {3}
        around_lesion_core = ndimage.binary_dilation((seg == 2) | (seg == 3), six) & (seg == 0)
        assert not around_lesion_core.any()


def test_forced_label_and_label_depends_on_several_properties() -> None:
    rng = np.random.default_rng(0)
    assert make_case(rng, "case-0001", shape=SHAPE, label=1).label == 1
    assert make_case(rng, "case-0002", shape=SHAPE, label=0).label == 0
    with pytest.raises(ValueError, match="label"):
        sample_lesion(rng, label=2)
    lesions = [sample_lesion(rng) for _ in range(600)]
    y = np.array([les.label for les in lesions])
    p = np.array([les.p for les in lesions])
    assert 0.3 < y.mean() < 0.7
    # every property carries part of the class signal (calcification argues for benign), none all of it
    for i, sign in enumerate((1, 1, -1, 1)):
        acc = ((sign * (p[:, i] - 0.5) > 0) == y).mean()
        assert 0.55 < acc < 0.85, (i, acc)


def _cnr(vol: np.ndarray, a: np.ndarray, *around: np.ndarray) -> float:
    """Contrast-to-noise ratio of region ``a`` against the mean of the medians of the regions ``around`` it."""
    va = vol[a]
    others = [vol[b] for b in around]
    reference = np.mean([np.median(vb) for vb in others])
    spread = np.sqrt((va.var() + np.mean([vb.var() for vb in others])) / 2 + 1e-6)
    return float(abs(np.median(va) - reference) / spread)


def test_contrasts_are_complementary() -> None:
    """Measured on generated volumes: the enhancing rim stands out on T1ce and hardly on T2/FLAIR; oedema
    stands out on FLAIR and hardly on T1ce; core vs oedema separates on T1."""
    six = ndimage.generate_binary_structure(3, 1)
    cnr: dict[tuple[str, str], list[float]] = {}
    for seed in range(4):
        case = make_case(np.random.default_rng(100 + seed), "case-0001", shape=SHAPE)
        seg = case.seg
        rim = seg == 3
        rim_near = ndimage.binary_dilation(rim, six)
        lesion = seg > 0
        ring = ndimage.binary_dilation(lesion, six, iterations=2) & ~lesion
        for m, vol in case.volumes.items():
            cnr.setdefault((m, "rim"), []).append(_cnr(vol, rim, rim_near & (seg == 1), rim_near & (seg == 2)))
            cnr.setdefault((m, "oedema"), []).append(_cnr(vol, seg == 1, ring))
            cnr.setdefault((m, "core-oedema"), []).append(_cnr(vol, seg == 2, seg == 1))
    mean = {k: float(np.mean(v)) for k, v in cnr.items()}
    assert mean[("t1ce", "rim")] > 0.7
    assert mean[("t1ce", "rim")] > 3 * max(mean[("t2", "rim")], mean[("flair", "rim")])
    assert mean[("flair", "oedema")] > 1.5
    assert mean[("flair", "oedema")] > 3 * mean[("t1ce", "oedema")]
    assert mean[("t1", "core-oedema")] > 2 * mean[("us", "core-oedema")]


# ------------------------------------------------------------------------------------------------ scenarios


def test_scenarios_differ_as_named() -> None:
    iid = site_profiles("iid", 3, 5, seed=1)
    assert all(s.modalities == MODALITIES and s.n_cases == 5 for s in iid)
    skew = site_profiles("modality-skew", 4, 5, seed=1)
    assert len({s.modalities for s in skew}) == 4
    labels = site_profiles("label-skew", 3, 5, seed=1)
    assert len({s.malignant_fraction for s in labels}) == 3
    real = site_profiles("realistic", 3, 20, seed=1)
    assert len({s.modalities for s in real}) == 3 and any(s.missing_rate > 0 for s in real)
    assert len({s.spacing() for s in real}) == 3 and len({s.vendor for s in real}) == 3
    assert site_profiles("realistic", 3, 20, seed=1) == real  # deterministic
    assert set(SCENARIOS) >= {"iid", "modality-skew", "label-skew", "realistic"}
    with pytest.raises(ValueError, match="unknown phantom scenario"):
        site_profiles("chaos", 3, 5)


def test_plan_site_class_balance_and_missing_series() -> None:
    site = SiteProfile(name="site-01", n_cases=10, malignant_fraction=0.3, missing_rate=0.5,
                       modalities=("t1", "t2", "ct"))
    plan = plan_site(site, np.random.default_rng(0))
    assert [cid for cid, _, _ in plan] == [f"case-{i:04d}" for i in range(1, 11)]
    assert sum(label for _, label, _ in plan) == 3
    assert all(mods and set(mods) <= {"t1", "t2", "ct"} for _, _, mods in plan)
    assert any(len(mods) < 3 for _, _, mods in plan)
    skewed = plan_site(SiteProfile(n_cases=4, malignant_fraction=0.0), np.random.default_rng(0))
    assert {label for _, label, _ in skewed} == {0, 1}  # never a single-class site


# ------------------------------------------------------------------------------------------------ on disk


def test_federation_layout_manifest_and_labels(dicom_fed: Path) -> None:
    manifest = json.loads((dicom_fed / "phantoms.json").read_text())
    assert manifest["scenario"] == "realistic" and manifest["seed"] == 7 and manifest["format"] == "dicom"
    assert manifest["shape"] == list(SHAPE)
    assert sorted(manifest["sites"]) == ["site-01", "site-02", "site-03"]
    site_mods = [tuple(e["modalities"]) for e in manifest["sites"].values()]
    assert len(set(site_mods)) == 3  # modality skew
    assert not (dicom_fed / ".phantoms-partial").exists()
    for name, entry in [*manifest["sites"].items(), ("heldout", manifest["heldout"])]:
        site_dir = dicom_fed / name
        labels = _read_labels(site_dir)
        cases = sorted(p.name for p in site_dir.iterdir() if p.is_dir())
        assert sorted(labels) == cases and len(cases) == entry["cases"]
        assert sum(labels.values()) == entry["malignant"]
        assert 0 < entry["malignant"] < entry["cases"]  # not degenerate
        for cid in cases:
            assert (site_dir / cid / f"{cid}_seg.nii.gz").is_file()
    heldout = dicom_fed / "heldout"
    assert manifest["heldout"]["cases_per_modality"] == {m: 2 for m in MODALITIES}
    for case_dir in sorted(p for p in heldout.iterdir() if p.is_dir()):
        tags = set()
        for series in _series_dirs(case_dir):
            ds = pydicom.dcmread(next(series.glob("*.dcm")), stop_before_pixels=True)
            tags.add((ds.Modality, ds.SeriesDescription))
        assert len(tags) == len(MODALITIES)  # every modality, each its own series


def test_held_out_cohorts_selection_reporting_and_an_unseen_scanner(dicom_fed: Path) -> None:
    """heldout/ and validation/ are distinct cases of the federation's reference scanner; heldout-unseen/ is a vendor
    no site has, whose series the readers still recognise."""
    from common.data.inspect import inspect_data
    from simulations.phantoms import UNSEEN_VENDOR

    manifest = json.loads((dicom_fed / "phantoms.json").read_text())
    assert sorted(manifest["cohorts"]) == ["heldout", "heldout-unseen", "validation"]
    vendors = {e["vendor"] for e in manifest["sites"].values()}
    assert manifest["cohorts"]["heldout-unseen"]["vendor"] == UNSEEN_VENDOR not in vendors
    assert manifest["cohorts"]["validation"]["vendor"] == manifest["cohorts"]["heldout"]["vendor"]

    def pixels(cohort: str) -> set[bytes]:
        return {pydicom.dcmread(f).PixelData for f in sorted((dicom_fed / cohort).rglob("*.dcm"))[:6]}

    assert not pixels("heldout") & pixels("validation")  # different patients, not copies
    report = inspect_data(dicom_fed / "heldout-unseen")
    assert report.usable_cases == manifest["cohorts"]["heldout-unseen"]["cases"]
    assert {s.name for s in report.sites} == {"heldout-unseen"} and report.sites[0].heldout


def test_dicom_files_are_real_dicom_with_expected_tags(dicom_fed: Path) -> None:
    case_dirs = sorted(p for p in (dicom_fed / "heldout").iterdir() if p.is_dir())
    series_uids: set[str] = set()
    study_uids: set[str] = set()
    for case_dir in case_dirs:
        case_study = set()
        for series in _series_dirs(case_dir):
            files = sorted(series.glob("*.dcm"))
            assert len(files) == SHAPE[0]
            dss = [pydicom.dcmread(f) for f in files]
            ds = dss[0]
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert ds.SOPClassUID == SOP_CLASS[ds.Modality] == ds.file_meta.MediaStorageSOPClassUID
            assert ds.Modality in ("MR", "CT", "US")
            assert ds.SeriesDescription.lower() not in MODALITIES
            assert {d.SeriesInstanceUID for d in dss} == {ds.SeriesInstanceUID}
            assert len({d.SOPInstanceUID for d in dss}) == len(dss)
            assert [int(d.InstanceNumber) for d in dss] == list(range(1, len(dss) + 1))
            series_uids.add(ds.SeriesInstanceUID)
            case_study.add(ds.StudyInstanceUID)
            assert (ds.Rows, ds.Columns) == SHAPE[1:] and ds.BitsAllocated == 16
            assert len(ds.ImagePositionPatient) == 3 and len(ds.ImageOrientationPatient) == 6
            assert len(ds.PixelSpacing) == 2 and float(ds.SliceThickness) > 0
            assert float(ds.RescaleSlope) > 0
            if ds.Modality == "CT":
                assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
                hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                assert hu.min() >= -1024
            for tag in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "InstitutionName",
                        "ReferringPhysicianName"):
                assert str(ds.get(tag, "")).strip(), tag
            step = np.subtract(dss[1].ImagePositionPatient, ds.ImagePositionPatient)
            affine = dicom_affine(ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing, step)
            _, seg_affine = load_nifti(case_dir / f"{case_dir.name}_seg.nii.gz")
            np.testing.assert_allclose(affine, seg_affine, atol=1e-4)
        assert len(case_study) == 1
        study_uids |= case_study
    assert len(study_uids) == len(case_dirs)
    assert len(series_uids) == len(case_dirs) * len(MODALITIES)


def test_dicom_round_trip_values_and_fast_encoder(tmp_path: Path) -> None:
    case = make_case(np.random.default_rng(3), "case-0003", shape=(8, 16, 16))
    site = SiteProfile(name="site-02", vendor="Philips Medical Systems")
    write_case_dicom(case, tmp_path / "case-0003", site=site, uid_seed=5)
    seen = set()
    for series in _series_dirs(tmp_path / "case-0003"):
        files = sorted(series.glob("*.dcm"))
        dss = [pydicom.dcmread(f) for f in files]
        modality = next(m for m, d in SERIES_DESCRIPTIONS[site.vendor].items()
                        if d.format(dz=float(dss[0].SliceThickness)) == dss[0].SeriesDescription)
        assert DICOM_MODALITY[modality] == dss[0].Modality
        seen.add(modality)
        slope, intercept = float(dss[0].RescaleSlope), float(dss[0].RescaleIntercept)
        vol = np.stack([d.pixel_array * slope + intercept for d in dss])
        np.testing.assert_allclose(vol, case.volumes[modality], atol=slope / 2 + 1e-3)
        # the spliced fast encoder writes exactly what pydicom's own writer writes
        buf = io.BytesIO()
        dss[1].save_as(buf, enforce_file_format=True)
        assert buf.getvalue() == files[1].read_bytes()
    assert seen == set(MODALITIES)


def test_generation_is_deterministic(tmp_path: Path) -> None:
    kwargs = dict(sites=2, cases_per_site=2, scenario="realistic", shape=(8, 16, 16), fmt="dicom", heldout_cases=1)
    a = generate(tmp_path / "a", seed=3, **kwargs)
    b = generate(tmp_path / "b", seed=3, **kwargs)
    c = generate(tmp_path / "c", seed=4, **kwargs)
    assert a == b

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.dcm"))}

    fa, fb, fc = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert fa and fa == fb  # same pixels, same UIDs, same PHI: byte-identical
    assert fa != fc  # another seed, other data


def test_nifti_layout_and_modality_skew(tmp_path: Path) -> None:
    out = tmp_path / "nii"
    manifest = generate(out, sites=3, cases_per_site=2, seed=0, scenario="modality-skew", shape=(8, 16, 16),
                        fmt="nifti", heldout_cases=1)
    mods = {name: set(e["modalities"]) for name, e in manifest["sites"].items()}
    assert mods["site-01"] == {"t1", "t1ce", "t2", "flair"} and mods["site-02"] == {"t1", "ct"}
    assert mods["site-03"] == {"t2", "us"}
    for name, expected in [*mods.items(), ("heldout", set(MODALITIES))]:
        for case_dir in sorted(p for p in (out / name).iterdir() if p.is_dir()):
            cid = case_dir.name
            names = {p.name for p in case_dir.iterdir()}
            assert names == {f"{cid}_{m}.nii.gz" for m in expected} | {f"{cid}_seg.nii.gz"}
            vol, affine = load_nifti(case_dir / f"{cid}_{sorted(expected)[0]}.nii.gz")
            seg, seg_affine = load_nifti(case_dir / f"{cid}_seg.nii.gz")
            assert vol.shape == seg.shape == (8, 16, 16) and vol.dtype == np.float32
            np.testing.assert_allclose(affine, seg_affine)


def test_write_case_nifti_names(tmp_path: Path) -> None:
    case = make_case(np.random.default_rng(0), "case-0042", shape=(8, 16, 16), modalities=("t1ce", "us"))
    write_case_nifti(case, tmp_path / "case-0042")
    assert sorted(p.name for p in (tmp_path / "case-0042").iterdir()) == [
        "case-0042_seg.nii.gz", "case-0042_t1ce.nii.gz", "case-0042_us.nii.gz",
    ]


def test_generate_refuses_bad_input_and_foreign_folders(tmp_path: Path) -> None:
    small = dict(sites=1, cases_per_site=2, shape=(8, 16, 16), heldout_cases=0)
    with pytest.raises(ValueError, match="format"):
        generate(tmp_path / "x", fmt="png", **small)
    with pytest.raises(ValueError, match="shape"):
        generate(tmp_path / "x", sites=1, cases_per_site=1, shape=(4, 16, 16))
    out = tmp_path / "fed"
    manifest = generate(out, **small)
    assert manifest["heldout"] is None and not (out / "heldout").exists()
    with pytest.raises(FileExistsError, match="--overwrite"):
        generate(out, **small)
    generate(out, overwrite=True, **small)
    real = tmp_path / "hospital"
    (real / "site-01").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="real data"):
        generate(real, **small)
    assert (real / "site-01").is_dir()


def test_cli_prints_summary(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedfusion.cli import app

    result = CliRunner().invoke(app, [
        "phantoms", "--out", str(tmp_path / "d"), "--sites", "2", "--cases-per-site", "2", "--seed", "1",
        "--scenario", "modality-skew", "--shape", "8", "16", "16", "--format", "nifti", "--heldout-cases", "1",
        "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    assert "site-01" in result.output and "heldout" in result.output
    assert (tmp_path / "d" / "phantoms.json").is_file()
    bad = CliRunner().invoke(app, ["phantoms", "--out", str(tmp_path / "e"), "--scenario", "nope"])
    assert bad.exit_code == 2 and "unknown phantom scenario" in bad.output
