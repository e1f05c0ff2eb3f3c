"""Inspection report and `fedfusion inspect`: sites, held-out set, label balance, every problem, exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.data.inspect import inspect_data
from tests.readers_helpers import make_seg, make_volume, simple_affine, write_series, write_site

SHAPE = (4, 8, 8)


@pytest.fixture
def readers_messy_root(tmp_path: Path) -> Path:
    """A data root: site-01 with good and bad cases, heldout/ with one good case."""
    from pydicom import data as pydicom_data
    seg = make_seg(SHAPE)
    aff = simple_affine()
    root = tmp_path / "data"
    site = write_site(root / "site-01", {"case-good": {"t1": make_volume(SHAPE), "ct": make_volume(SHAPE)},
                                         "case-noseg": {"t2": make_volume(SHAPE)}},
                      {"case-good": 1, "case-noseg": 0, "case-gone": 1}, aff, fmt="dicom",
                      seg={"case-good": seg})
    bad = site / "case-bad"
    files = write_series(bad / "s1", make_volume((6, 8, 8)), aff, "T2 TSE", skip_slices=(2,), series_no=9)
    write_series(bad / "s2", make_volume(SHAPE), aff, "SITE_PROTO_7", series_no=10,
                 uid_root="1.2.826.0.1.3680043.8.498.77.")
    (bad / "junk.dcm").write_bytes(b"\x01\x02" * 400)
    raw = files[0].read_bytes()
    (bad / "cut.dcm").write_bytes(raw[: len(raw) // 2])
    shutil.copy(pydicom_data.get_testdata_file("DICOMDIR"), bad / "DICOMDIR")
    (site / "case-unlabelled").mkdir()
    write_series(site / "case-unlabelled" / "s", make_volume(SHAPE), aff, "AX FLAIR", series_no=3,
                 uid_root="1.2.826.0.1.3680043.8.498.88.")
    with open(site / "labels.csv", "a") as fh:
        fh.write("case-bad,0\n")
    write_site(root / "heldout", {"case-h1": {"flair": make_volume(SHAPE)}}, {"case-h1": 1}, aff, fmt="nifti",
               seg={"case-h1": seg})
    return root


def test_report_lists_sites_cases_and_every_problem(readers_messy_root: Path) -> None:
    report = inspect_data(readers_messy_root)
    assert [(s.name, s.heldout) for s in report.sites] == [("heldout", True), ("site-01", False)]
    site = report.sites[1]
    cases = {c.case_id: c for c in site.cases}
    assert set(cases) == {"case-good", "case-noseg", "case-bad", "case-unlabelled"}
    assert cases["case-good"].usable and cases["case-good"].modalities == ["t1", "ct"]
    # mixed supervision: a labelled case without a segmentation trains its classification
    assert cases["case-noseg"].usable and not cases["case-noseg"].has_seg
    assert cases["case-unlabelled"].label is None and not cases["case-unlabelled"].usable  # neither target
    assert cases["case-bad"].modalities == ["t2"]  # one slice interpolated, still readable
    kinds = {(p.case_id, p.kind) for p in site.all_problems()}
    for expected in [("case-bad", "unreadable-file"), ("case-bad", "truncated-file"),
                     ("case-bad", "non-image-dicom"), ("case-bad", "missing-slices"),
                     ("case-bad", "unknown-series"), ("case-noseg", "missing-seg"),
                     ("case-unlabelled", "missing-label"), ("case-unlabelled", "no-targets"),
                     ("case-gone", "label-without-case")]:
        assert expected in kinds, expected
    unknown = next(p for p in site.all_problems() if p.kind == "unknown-series")
    assert "SITE_PROTO_7" in unknown.reason
    assert site.label_counts() == {"benign": 2, "malignant": 1, "unlabelled": 0}
    assert site.target_counts() == {"segmentation": 1, "label": 3, "both": 1, "neither": 1}
    assert report.usable_cases == 4 and report.ok
    strict = inspect_data(readers_messy_root, require_seg=True)  # the old rule: segmented cases only
    assert strict.usable_cases == 2

    mapped = inspect_data(readers_messy_root / "site-01", series_mapping={"t1": "proto_7"})
    assert "t1" in {c.case_id: c for c in mapped.sites[0].cases}["case-bad"].modalities


def test_cli_json_and_exit_codes(readers_messy_root: Path, tmp_path: Path) -> None:
    from fedfusion.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["inspect", str(readers_messy_root), "--json", "--modalities", "t1,t2",
                                 "--modalities", "flair"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["modalities"] == ["t1", "t2", "flair"] and data["usable_cases"] == 4
    site = next(s for s in data["sites"] if s["name"] == "site-01")
    assert site["target_counts"] == {"segmentation": 1, "label": 3, "both": 1, "neither": 1}
    strict = runner.invoke(app, ["inspect", str(readers_messy_root), "--json", "--require-seg", "--no-plan"])
    assert json.loads(strict.stdout)["usable_cases"] == 2
    held = next(s for s in data["sites"] if s["name"] == "heldout")
    assert held["heldout"] and held["cases_usable"] == 1

    text = runner.invoke(app, ["inspect", str(readers_messy_root)])
    assert text.exit_code == 0 and "held-out" in text.stdout and "truncated-file" in text.stdout

    mapping = tmp_path / "map.toml"
    mapping.write_text('t2 = "PROTO_7"\n')
    result = runner.invoke(app, ["inspect", str(readers_messy_root / "site-01"), "--json", "--series-map",
                                 str(mapping)])
    kinds = {p["kind"] for s in json.loads(result.stdout)["sites"] for c in s["cases"] for p in c["problems"]}
    assert "unknown-series" not in kinds and "duplicate-series" in kinds

    empty = tmp_path / "site-empty"
    (empty / "case-1").mkdir(parents=True)
    (empty / "case-1" / "a.dcm").write_bytes(b"nope")
    (empty / "labels.csv").write_text("case_id,label\ncase-1,1\n")
    result = runner.invoke(app, ["inspect", str(empty)])
    assert result.exit_code == 1
    assert runner.invoke(app, ["inspect", str(empty), "--modalities", "pet"]).exit_code == 2
