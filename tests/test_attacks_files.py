"""Attacks with hostile files and checkpoints: each test plays the attacker with a small crafted file and checks that
the file costs only itself (one Problem naming it, the rest of the case still read) or is refused before anything
runs or is allocated. Sizes are tiny; "huge" claims live in headers only, and lowered ReaderLimits stand in for the
default caps where the real thing would take gigabytes to build."""

from __future__ import annotations

import gzip
import os
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR, tag_for_keyword
from typer.testing import CliRunner

from common.data.dataset import CaseDataset
from common.data.geometry import dicom_geometry, save_nifti
from common.data.inspect import inspect_data
from common.data.limits import ReaderLimits
from common.data.site import CaseError, load_case, scan_case
from models.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from common.runconfig import default_model_config
from tests.readers_helpers import make_seg, make_volume, simple_affine, write_series

MIB = 1 << 20
SHAPE = (6, 8, 8)
BROKEN = 2  # the slice index the attacker breaks (an inner one, so the gap can be interpolated)


# ------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------
@contextmanager
def peak_memory() -> Iterator[list[int]]:
    """Peak bytes traced (Python and numpy allocations) inside the block, in ``out[0]`` afterwards."""
    out = [0]
    tracemalloc.start()
    try:
        yield out
    finally:
        out[0] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def _set_raw(path: Path, keyword: str, raw: str) -> None:
    """Overwrite the stored value of ``keyword`` (explicit VR little endian) with ``raw``, space-padded to the
    stored length: pydicom refuses to write invalid IS/DS values itself."""
    tag = tag_for_keyword(keyword)
    assert tag is not None
    data = bytearray(path.read_bytes())
    at = data.index(struct.pack("<HH", tag >> 16, tag & 0xFFFF) + dictionary_VR(tag).encode(), 132)
    length = struct.unpack_from("<H", data, at + 6)[0]
    assert len(raw) <= length, (keyword, raw, length)
    data[at + 8: at + 8 + length] = raw.encode().ljust(length)
    path.write_bytes(bytes(data))


def _rewrite(path: Path, **values: Any) -> None:
    """Set (``None``: delete) header elements of a DICOM file."""
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)


def _slice_file(files: list[Path], k: int) -> Path:
    return next(p for p in files if p.name.endswith(f"_{k}.dcm"))


def _problems(problems: list[Any], kind: str) -> list[Any]:
    return [p for p in problems if p.kind == kind]


def _assert_only_problem(problems: list[Any], kind: str, path: Path, words: str) -> None:
    """Exactly one problem of ``kind``; it names ``path`` and its reason contains ``words``."""
    (problem,) = _problems(problems, kind)
    assert problem.path == str(path) and words in problem.reason, problem


def _ct_small(path: Path, **values: Any) -> Path:
    """pydicom's CT_small.dcm (a real 128 x 128 CT slice) with ``values`` set, written to ``path``."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _two_series_case(case: Path) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """A case with an intact T2 series and a FLAIR series (returned files) for the attacker to break."""
    flair, t2 = make_volume(SHAPE, seed=1), make_volume(SHAPE, seed=2)
    write_series(case / "t2", t2, simple_affine(), "T2 TSE AX", series_no=1)
    files = write_series(case / "flair", flair, simple_affine(), "AX FLAIR", series_no=2)
    return flair, t2, files


def _gzip_zeros(fh: Any, n_bytes: int) -> None:
    chunk = bytes(MIB)
    while n_bytes > 0:
        fh.write(chunk[: min(n_bytes, MIB)])
        n_bytes -= MIB


# ------------------------------------------------------------------------------------------------------
# 1. one malformed DICOM file costs only itself
# ------------------------------------------------------------------------------------------------------
BAD_VALUES: list[tuple[str, dict[str, Any], str]] = [
    # (element, header changes first (room for the value; None deletes), the attacker's bytes)
    ("NumberOfFrames", {"NumberOfFrames": 1}, "1A"),  # IS, read while grouping (header stage)
    ("SliceThickness", {"SpacingBetweenSlices": None}, "garbage"),  # DS, read with the pixels
    ("SpacingBetweenSlices", {}, "garbage"),
    ("RescaleSlope", {"RescaleSlope": "1.0000000"}, "abc"),
    ("PixelSpacing", {}, "x\\1"),
    ("ImagePositionPatient", {}, "a\\b\\c"),
    ("ImageOrientationPatient", {}, "1\\0\\0\\1\\0\\0"),  # parallel rows and columns: a singular affine
]


@pytest.mark.parametrize(("keyword", "prepare", "bad"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_header_value_in_one_slice_costs_only_that_slice(
    tmp_path: Path, keyword: str, prepare: dict[str, Any], bad: str
) -> None:
    case = tmp_path / "case-1"
    flair, t2, files = _two_series_case(case)
    victim = _slice_file(files, BROKEN)
    if prepare:
        _rewrite(victim, **prepare)
    _set_raw(victim, keyword, bad)

    data = load_case(case, ["t2", "flair"])

    tol = (float(flair.max()) - float(flair.min())) / 60000 * 2
    np.testing.assert_allclose(data.images["t2"], t2, atol=tol)  # the good series, untouched
    assert data.images["flair"].shape == SHAPE  # the bad slice is a gap, filled like any missing slice
    kept = [k for k in range(SHAPE[0]) if k != BROKEN]
    np.testing.assert_allclose(data.images["flair"][kept], flair[kept], atol=tol)
    bad_value = _problems(data.problems, "bad-header-value")
    assert [p.path for p in bad_value] == [str(victim)] and keyword in bad_value[0].reason
    assert any(p.kind == "missing-slices" and p.severity == "warning" for p in data.problems)


def test_bad_instance_number_is_reported_and_the_slice_still_used(tmp_path: Path) -> None:
    case = tmp_path / "case-1"
    flair, _t2, files = _two_series_case(case)
    victim = _slice_file(files, BROKEN)
    _set_raw(victim, "InstanceNumber", "1A")
    data = load_case(case, ["flair"])
    np.testing.assert_allclose(data.images["flair"], flair, atol=(float(flair.max()) - float(flair.min())) / 30000)
    warning = _problems(data.problems, "bad-header-value")
    assert [(p.path, p.severity) for p in warning] == [(str(victim), "warning")]
    assert "InstanceNumber" in warning[0].reason


def test_inspect_names_the_bad_file_instead_of_an_unexpected_error_for_the_case(tmp_path: Path) -> None:
    site = tmp_path / "site-01"
    case = site / "case-1"
    _two_series_case(case)
    save_nifti(make_seg(SHAPE), simple_affine(), case / "case-1_seg.nii.gz")
    (site / "labels.csv").write_text("case_id,label\ncase-1,1\n")
    victim = _slice_file(sorted((case / "flair").iterdir()), BROKEN)
    _rewrite(victim, NumberOfFrames=1)
    _set_raw(victim, "NumberOfFrames", "1A")

    report = inspect_data(site, ["t2", "flair"])
    (case_report,) = report.sites[0].cases
    assert case_report.usable and case_report.modalities == ["t2", "flair"]
    assert not any("unexpected error" in p.reason for p in report.all_problems())
    _assert_only_problem(case_report.problems, "bad-header-value", victim, "NumberOfFrames")


def test_a_file_that_trips_an_unforeseen_reader_error_costs_only_its_series(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stands in for a crafted file that hits a bug in stacking: the other series of the case still load."""
    import common.data.dicom_reader as dicom_reader

    case = tmp_path / "case-1"
    _flair, t2, _files = _two_series_case(case)
    real = dicom_reader.stack_planes

    def stack(planes: Any, where: str, *args: Any) -> Any:
        if where.endswith("flair"):
            raise RuntimeError("reader bug")
        return real(planes, where, *args)

    monkeypatch.setattr(dicom_reader, "stack_planes", stack)
    data = load_case(case, ["t2", "flair"])
    assert list(data.images) == ["t2"]
    _assert_only_problem(data.problems, "unreadable-file", case / "flair", "reader bug")


# ------------------------------------------------------------------------------------------------------
# 2. a checkpoint carrying pickled code is refused, never run
# ------------------------------------------------------------------------------------------------------
class _RunsCode:
    """Unpickling this calls ``exec`` with the code given (what an attacker's checkpoint would do)."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (exec, (self.code,))


def _hostile_checkpoint(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_config": default_model_config().to_dict(),
        "state_dict": {},
        "extra": {"round": 3, "strategy_state": _RunsCode(f"open({str(marker)!r}, 'w').write('pwned')")},
    }
    torch.save(payload, path)
    return path


def _via_cli(*args: str) -> Callable[[Path, Path], None]:
    def run(ckpt: Path, tmp: Path) -> None:
        from fedfusion.cli import app

        result = CliRunner().invoke(app, [a.format(ckpt=ckpt, tmp=tmp) for a in args])
        assert result.exit_code == 2, result.output
        # Rich may wrap the long message: compare without line breaks
        assert "refused" in result.output and ckpt.name in result.output.replace("\n", "")
        raise ValueError(result.output)

    return run


def _resume(ckpt: Path, _tmp: Path) -> None:
    from server.checkpointing import RunDirectory

    RunDirectory(ckpt.parent.parent).load_resume()


def _export(ckpt: Path, tmp: Path) -> None:
    from fedfusion.commands.export import export_checkpoint

    export_checkpoint(ckpt, tmp / "model.pt")


ENTRY_POINTS: dict[str, Callable[[Path, Path], Any]] = {
    "load_checkpoint": lambda ckpt, _tmp: load_checkpoint(ckpt),
    "resume": _resume,
    "export": _export,
    "cli-export": _via_cli("export", "--checkpoint", "{ckpt}", "--out", "{tmp}/model.pt"),
    "cli-evaluate": _via_cli("evaluate", "--checkpoint", "{ckpt}", "--data", "{tmp}"),
    "cli-predict": _via_cli("predict", "--checkpoint", "{ckpt}", "--study", "{tmp}", "--out", "{tmp}/out"),
    "cli-export-bundle": _via_cli("export", "--checkpoint", "{ckpt}", "--format", "monai-bundle", "--out", "{tmp}/b"),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_checkpoint_with_pickled_code_is_refused_and_never_run(tmp_path: Path, entry: str) -> None:
    marker = tmp_path / "marker"
    ckpt = _hostile_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", marker)
    with pytest.raises(ValueError) as info:
        ENTRY_POINTS[entry](ckpt, tmp_path)
    assert not marker.exists(), "the checkpoint's code ran"
    if not entry.startswith("cli-"):
        assert str(ckpt) in str(info.value) and "refused" in str(info.value)


def test_checkpoints_fedfusion_writes_hold_only_weights_only_types(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"w": torch.ones(2)}, default_model_config(), round=1, metrics={"dice": np.float64(0.5)},
                    history=[np.float32(1.5)])
    payload = torch.load(path, weights_only=True)
    assert payload["extra"]["metrics"]["dice"] == 0.5 and type(payload["extra"]["metrics"]["dice"]) is float
    with pytest.raises(TypeError, match=r"\['m_t'\]"):
        save_checkpoint(tmp_path / "d.pt", {}, default_model_config(), m_t=np.zeros(3))


def test_fedadam_moments_round_trip_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    from flwr.serverapp.strategy import FedAdam

    from server.checkpointing import RunDirectory
    from server.strategy import FedFusionStrategy, find_optimizer
    from server.validation import UpdateValidator

    def strategy() -> FedFusionStrategy:
        adam = FedAdam()
        return FedFusionStrategy(adam, adam, validator=UpdateValidator())

    before = strategy()
    opt = find_optimizer(before)
    assert opt is not None
    rng = np.random.default_rng(0)
    opt.m_t = {"a": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    opt.v_t = {k: v * v for k, v in opt.m_t.items()}
    before.declined = {7, 3}
    before.validator.history = [1.5, 2.5]
    run = RunDirectory(tmp_path / "run")
    run.save_round(1, {"w": torch.zeros(2)}, default_model_config(), strategy_state=before.get_state(), run_config={},
                   best=None)
    torch.load(run.last, weights_only=True)  # loads without allowing any global

    after = strategy()
    after.set_state(run.load_resume().strategy_state)
    restored = find_optimizer(after)
    assert restored is not None and restored.m_t is not None and restored.v_t is not None
    for name in ("a", "b"):
        assert isinstance(restored.m_t[name], np.ndarray) and restored.m_t[name].dtype == np.float32
        np.testing.assert_array_equal(restored.m_t[name], opt.m_t[name])
        np.testing.assert_array_equal(restored.v_t[name], opt.v_t[name])
    assert after.declined == {3, 7} and after.validator.history == [1.5, 2.5]


# ------------------------------------------------------------------------------------------------------
# 3. readers bound what they spend before spending it
# ------------------------------------------------------------------------------------------------------
def _nifti_header_only(path: Path, shape: tuple[int, ...], nifti2: bool) -> Path:
    hdr = nib.Nifti2Header() if nifti2 else nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    offset = 544 if nifti2 else 352
    hdr["vox_offset"] = offset
    path.write_bytes(hdr.binaryblock + b"\0" * (offset - len(hdr.binaryblock)) + b"\0" * 64)  # a tiny body
    return path


@pytest.mark.parametrize("nifti2", [False, True], ids=["nifti1", "nifti2"])
def test_nifti_header_claiming_absurd_voxels_is_refused_unread(tmp_path: Path, nifti2: bool) -> None:
    case = tmp_path / "case-1"
    case.mkdir()
    shape = (10**5,) * 3 if nifti2 else (32767,) * 3  # NIfTI-1 dimensions are int16
    victim = _nifti_header_only(case / "case-1_t1.nii", shape, nifti2)
    save_nifti(make_volume(SHAPE), simple_affine(), case / "case-1_t2.nii.gz")
    with peak_memory() as peak:
        scan = scan_case(case, ["t1", "t2"])
    assert peak[0] < 16 * MIB
    assert list(scan.volumes) == ["t2"]
    _assert_only_problem(scan.problems, "limit-exceeded", victim, "voxels")


def test_gzip_nifti_bigger_than_the_byte_limit_is_refused_from_its_header(tmp_path: Path) -> None:
    """A ~10 KB .nii.gz whose header (truthfully) describes 8 MiB of voxels; the site allows 1 MiB per file."""
    case = tmp_path / "case-1"
    case.mkdir()
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((128, 128, 128))
    hdr.set_data_dtype(np.float32)
    hdr["vox_offset"] = 352
    victim = case / "case-1_t1.nii.gz"
    with gzip.open(victim, "wb") as fh:
        fh.write(hdr.binaryblock + b"\0" * 4)
        _gzip_zeros(fh, 128**3 * 4)
    assert victim.stat().st_size < 64 * 1024
    with peak_memory() as peak:
        scan = scan_case(case, ["t1"], limits=ReaderLimits(max_file_bytes=MIB))
    assert peak[0] < 4 * MIB and not scan.volumes
    _assert_only_problem(scan.problems, "limit-exceeded", victim, "bytes")


def test_gzip_bomb_in_a_nifti_extension_is_stopped_while_inflating(tmp_path: Path) -> None:
    """A tiny 4x4x4 image whose header extension claims (and inflates to) 16 MiB: nibabel would read it whole."""
    case = tmp_path / "case-1"
    case.mkdir()
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4, 4, 4))
    hdr.set_data_dtype(np.float32)
    hdr["vox_offset"] = 352 + 16
    victim = case / "case-1_t1.nii.gz"
    with gzip.open(victim, "wb") as fh:
        fh.write(hdr.binaryblock + bytes([1, 0, 0, 0]) + struct.pack("<ii", 16 * MIB, 0))
        _gzip_zeros(fh, 16 * MIB)
    save_nifti(make_volume(SHAPE), simple_affine(), case / "case-1_t2.nii.gz")
    with peak_memory() as peak:
        scan = scan_case(case, ["t1", "t2"], limits=ReaderLimits(max_file_bytes=MIB))
    assert peak[0] < 4 * MIB
    assert list(scan.volumes) == ["t2"]
    _assert_only_problem(scan.problems, "limit-exceeded", victim, "decompressed")


def test_deflated_dicom_bomb_is_refused_before_it_is_inflated(tmp_path: Path) -> None:
    """Deflated Explicit VR: pydicom inflates the whole body in one piece; this one inflates to 8 MiB from ~10 KB."""
    case = tmp_path / "case-1"
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.add_new(0x00091010, "OB", bytes(8 * MIB))  # a private element full of zeros
    case.mkdir()
    victim = case / "bomb.dcm"
    ds.save_as(victim, enforce_file_format=True)
    del ds
    assert victim.stat().st_size < 64 * 1024
    with peak_memory() as peak:
        scan = scan_case(case, ["ct"], limits=ReaderLimits(max_file_bytes=MIB))
    assert peak[0] < 4 * MIB and not scan.volumes
    _assert_only_problem(scan.problems, "limit-exceeded", victim, "inflates")


def test_deflated_dicom_within_the_limits_is_read(tmp_path: Path) -> None:
    """The byte check does not cost valid deflated files (which the reader used to call truncated)."""
    ds = pydicom.dcmread(get_testdata_file("image_dfl.dcm"))
    ds.Modality = "CT"
    (tmp_path / "case-1").mkdir()
    ds.save_as(tmp_path / "case-1" / "dfl.dcm")
    data = load_case(tmp_path / "case-1", ["ct"])
    np.testing.assert_allclose(data.images["ct"][0], ds.pixel_array.astype(np.float32))


def _encapsulated(path: Path, **values: Any) -> Path:
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.RLELossless
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.PixelData = encapsulate([bytes(64)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("encapsulated", [False, True], ids=["native", "rle"])
def test_dicom_claiming_billions_of_voxels_is_refused_before_decoding(tmp_path: Path, encapsulated: bool) -> None:
    case = tmp_path / "case-1"
    claim = {"Rows": 65535, "Columns": 65535, "NumberOfFrames": 1000}
    victim = _encapsulated(case / "big.dcm", **claim) if encapsulated else _ct_small(case / "big.dcm", **claim)
    good = make_volume(SHAPE)
    write_series(case / "t1", good, simple_affine(), "t1_mprage_sag")
    with peak_memory() as peak:
        data = load_case(case, ["t1", "ct"])
    assert peak[0] < 32 * MIB
    assert list(data.images) == ["t1"]
    _assert_only_problem(data.problems, "limit-exceeded", victim, "voxels")


def test_slice_positions_spanning_an_absurd_extent_allocate_nothing(tmp_path: Path) -> None:
    """Four 8x8 slices, the last one placed a million slices away: stacking would allocate 256 MB of gap."""
    case = tmp_path / "case-1"
    affine = simple_affine()
    files = write_series(case / "s", make_volume((4, 8, 8)), affine, "AX FLAIR")
    far, _ori, _sp, _th = dicom_geometry(affine, 10**6)
    _rewrite(_slice_file(files, 3), ImagePositionPatient=[f"{v:.6f}" for v in far])
    with peak_memory() as peak, pytest.raises(CaseError) as info:
        load_case(case, ["flair"])
    assert peak[0] < 16 * MIB
    assert _problems(info.value.problems, "missing-slices")


def test_slice_gap_over_the_voxel_limit_is_refused_before_stacking(tmp_path: Path) -> None:
    """Seven slices present, one missing: the stacked 8 x 8 x 8 volume is over a 480-voxel limit."""
    case = tmp_path / "case-1"
    write_series(case / "s", make_volume((8, 8, 8)), simple_affine(), "AX FLAIR", skip_slices=(3,))
    with pytest.raises(CaseError) as info:
        load_case(case, ["flair"], limits=ReaderLimits(max_voxels=480))
    (problem,) = _problems(info.value.problems, "limit-exceeded")
    assert "8 slices" in problem.reason and "480" in problem.reason


def test_series_over_the_voxel_limit_is_refused_before_its_pixels_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import common.data.dicom_reader as dicom_reader

    case = tmp_path / "case-1"
    write_series(case / "s", make_volume((6, 8, 8)), simple_affine(), "AX FLAIR")
    decoded: list[Path] = []
    real = dicom_reader._read_planes
    monkeypatch.setattr(dicom_reader, "_read_planes", lambda h, *a: decoded.append(h.path) or real(h, *a))
    with pytest.raises(CaseError) as info:
        load_case(case, ["flair"], limits=ReaderLimits(max_voxels=300))
    assert _problems(info.value.problems, "limit-exceeded") and not decoded


def test_endless_series_description_is_refused_before_regex_matching(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'xT1' * 8000 makes the default T1 pattern backtrack for seconds (24 000 characters; DICOM allows 64)."""
    from common.data.series_mapping import SeriesMapping

    case = tmp_path / "case-1"
    files = write_series(case / "evil", make_volume((2, 8, 8)), simple_affine(), "xT1" * 8000, series_no=1)
    flair = make_volume(SHAPE)
    write_series(case / "flair", flair, simple_affine(), "AX FLAIR", series_no=2)
    seen: list[int] = []
    real = SeriesMapping.identify
    monkeypatch.setattr(SeriesMapping, "identify", lambda self, tag, text: seen.append(len(text or "")) or
                        real(self, tag, text))
    data = load_case(case, ["t1", "flair"])
    assert list(data.images) == ["flair"]
    assert seen and max(seen) <= ReaderLimits().max_description_chars
    refused = _problems(data.problems, "limit-exceeded")
    assert sorted(p.path for p in refused) == sorted(str(f) for f in files)
    assert all("SeriesDescription" in p.reason for p in refused)


def _site_with_a_victim_case(root: Path) -> tuple[Path, Path]:
    """site-01/case-1 (the victim, NIfTI t2 + seg) and site-02/case-9 (another site's data: a CT slice, a t1)."""
    site, other = root / "site-01", root / "site-02"
    (site / "case-1").mkdir(parents=True)
    save_nifti(make_volume(SHAPE), simple_affine(), site / "case-1" / "case-1_t2.nii.gz")
    (other / "case-9").mkdir(parents=True)
    _ct_small(other / "case-9" / "ct.dcm")
    save_nifti(make_volume(SHAPE, seed=5), simple_affine(), other / "case-9" / "case-9_t1.nii.gz")
    return site, other


def test_symlinks_out_of_the_site_folder_are_not_followed(tmp_path: Path) -> None:
    site, other = _site_with_a_victim_case(tmp_path)
    case = site / "case-1"
    links = {
        case / "passwd.dcm": Path("/etc/passwd"),
        case / "stolen.dcm": other / "case-9" / "ct.dcm",
        case / "case-1_t1.nii.gz": other / "case-9" / "case-9_t1.nii.gz",
        case / "other-site": other / "case-9",
    }
    for link, target in links.items():
        link.symlink_to(target)
    data = load_case(case, ["t1", "t2", "ct"])
    assert list(data.images) == ["t2"]  # nothing of site-02 (nor /etc) was read
    unsafe = _problems(data.problems, "unsafe-path")
    assert sorted(p.path for p in unsafe) == sorted(str(p) for p in links)
    assert all(p.severity == "error" and "outside the site folder" in p.reason for p in unsafe)
    report = inspect_data(site, ["t1", "t2", "ct"], require_seg=False)
    assert {p.path for p in report.all_problems() if p.kind == "unsafe-path"} == {str(p) for p in links}


def test_labels_file_linked_out_of_the_site_folder_is_not_read(tmp_path: Path) -> None:
    """labels.csv -> /etc/passwd: reading it would put the file's first line into the inspection report."""
    from common.data.site import read_labels

    site = tmp_path / "site-01"
    site.mkdir()
    (site / "labels.csv").symlink_to("/etc/passwd")
    labels, problems = read_labels(site)
    assert labels == {}
    (problem,) = problems
    assert problem.kind == "unsafe-path" and "outside the site folder" in problem.reason
    assert "root:" not in problem.reason


def test_symlink_inside_the_site_folder_is_still_read(tmp_path: Path) -> None:
    site = tmp_path / "site-01"
    shared = _ct_small(site / "case-2" / "ct.dcm")
    (site / "case-1").mkdir()
    (site / "case-1" / "ct.dcm").symlink_to(Path("..") / "case-2" / "ct.dcm")
    data = load_case(site / "case-1", ["ct"])
    ds = pydicom.dcmread(shared)
    np.testing.assert_allclose(data.images["ct"][0],
                               ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    assert not _problems(data.problems, "unsafe-path")


def test_fifo_in_a_case_folder_is_reported_not_opened(tmp_path: Path) -> None:
    """Opening a FIFO for reading blocks until a writer comes: the reader would hang forever."""
    case = tmp_path / "case-1"
    good = make_volume(SHAPE)
    write_series(case / "s", good, simple_affine(), "AX FLAIR")
    os.mkfifo(case / "s" / "IM9999.dcm")
    data = load_case(case, ["flair"])
    assert data.images["flair"].shape == SHAPE
    _assert_only_problem(data.problems, "unsafe-path", case / "s" / "IM9999.dcm", "not a regular file")


def test_case_folder_with_more_files_than_the_limit_is_reported_not_walked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import common.data.dicom_reader as dicom_reader

    site = tmp_path / "site-01"
    good = site / "case-good"
    good.mkdir(parents=True)
    save_nifti(make_volume(SHAPE), simple_affine(), good / "case-good_t1.nii.gz")
    save_nifti(make_seg(SHAPE), simple_affine(), good / "case-good_seg.nii.gz")
    flood = site / "case-flood"
    for d in range(4):
        (flood / f"d{d}").mkdir(parents=True)
        for n in range(20):
            (flood / f"d{d}" / f"IM{n:05d}").write_bytes(b"")
    (site / "labels.csv").write_text("case_id,label\ncase-good,0\ncase-flood,1\n")
    opened: list[Path] = []
    real = dicom_reader.read_header
    monkeypatch.setattr(dicom_reader, "read_header", lambda path, *a: opened.append(path) or real(path, *a))
    limits = ReaderLimits(max_files_per_case=50)

    ds = CaseDataset(site, ["t1"], cache_dir=tmp_path / "cache", limits=limits)
    assert [c for _s, c in ds.cases] == ["case-good"]
    (skipped,) = _problems(ds.problems, "limit-exceeded")
    assert skipped.path == str(flood) and "50" in skipped.reason

    report = inspect_data(site, ["t1"], limits=limits)
    flood_report = next(c for c in report.sites[0].cases if c.case_id == "case-flood")
    assert not flood_report.usable and _problems(flood_report.problems, "limit-exceeded")
    assert not opened


def test_nifti_with_a_singular_affine_costs_only_itself(tmp_path: Path) -> None:
    """A zero slice step in the sform: reorienting or resampling such a grid raised for the whole case."""
    case = tmp_path / "case-1"
    case.mkdir()
    flat = simple_affine()
    flat[:3, 0] = 0.0  # every slice at the same place
    img = nib.Nifti1Image(make_volume(SHAPE), None)
    img.header.set_qform(None, code=0)
    img.header.set_sform(flat, code=1)  # the sform is stored as given (a qform could not hold it)
    nib.save(img, case / "case-1_t1.nii.gz")
    save_nifti(make_volume(SHAPE), simple_affine(), case / "case-1_t2.nii.gz")
    data = load_case(case, ["t1", "t2"])
    assert list(data.images) == ["t2"]
    (problem,) = _problems(data.problems, "unreadable-file")
    assert problem.path.endswith("case-1_t1.nii.gz") and "singular" in problem.reason


def test_reader_limits_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="max_voxels"):
        ReaderLimits(max_voxels=0)
