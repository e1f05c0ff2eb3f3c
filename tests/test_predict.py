"""``fedfusion predict``: DICOM SEG round trip, outputs on the source grid, subset-specific expected metrics, batch
mode, and the inverse of the training preprocessing's resize."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from typer.testing import CliRunner

from common.data.dataset import preprocess_case
from common.data.geometry import Grid, save_nifti
from common.data.site import scan_case
from common.dicomseg import AlgorithmInfo, SEGMENTS, build_segmentation, find_source_series, read_segmentation
from common.evaluation import load_model
from common.predict import predict_study, restore_probabilities
from common.prediction_files import write_study_outputs
from common.provenance import DEFAULT_THRESHOLD, load_provenance
from fedfusion.cli import app
from tests.predict_helpers import BEST_ROUND, TinyRun, dice_of, make_tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    return make_tiny_run(tmp_path_factory.mktemp("predict"))


@pytest.fixture(scope="module")
def network(run: TinyRun) -> torch.nn.Module:
    model, _, _ = load_model(run.checkpoint, "cpu")
    return model


def _study(run: TinyRun, index: int = 0) -> Path:
    return sorted(p for p in (run.data / "heldout").iterdir() if p.is_dir())[index]


def _series_dir(study: Path, description_part: str) -> Path:
    return next(p for p in study.iterdir() if p.is_dir() and description_part in p.name)


def test_dicom_seg_round_trip_gives_the_prediction_back(run: TinyRun, network: torch.nn.Module,
                                                        tmp_path: Path) -> None:
    study = _study(run)
    prediction = predict_study(network, study)
    outputs = write_study_outputs(prediction, study, tmp_path, load_provenance(run.checkpoint), run.model)
    assert outputs.seg.path is not None and outputs.seg.modality == "t1", outputs.seg.note
    source = find_source_series(study, "t1", prediction.native["t1"])
    expected = prediction.labels_on(source.grid)
    assert np.array_equal(read_segmentation(outputs.seg.path, source), expected)
    assert np.array_equal(np.asarray(nib.load(outputs.nifti).dataobj), expected)

    ds = pydicom.dcmread(outputs.seg.path)
    t1_uid = pydicom.dcmread(next(_series_dir(study, "t1_mprage").iterdir())).SeriesInstanceUID
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == t1_uid
    provenance = load_provenance(run.checkpoint)
    segments = {int(s.SegmentNumber): s for s in ds.SegmentSequence}
    assert sorted(segments) == [1, 2, 3]
    for label, (name, category, kind) in SEGMENTS.items():
        item = segments[label]
        assert item.SegmentLabel == name
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == category.value
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == kind.value
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "fedfusion"
        assert algorithm.AlgorithmVersion == provenance.fedfusion_version
        assert provenance.sha256 in algorithm.AlgorithmParameters and "run_id=run" in algorithm.AlgorithmParameters


def test_every_segment_survives_the_round_trip(run: TinyRun, network: torch.nn.Module, tmp_path: Path) -> None:
    # a random network need not predict every label; a label map holding all of them must come back exactly too
    study = _study(run)
    grid = predict_study(network, study).native["flair"]
    source = find_source_series(study, "flair", grid)
    labels = np.zeros(grid.shape, dtype=np.uint8)
    labels[1:6, 3:12, 3:12] = 1
    labels[2:5, 5:10, 5:10] = 2
    labels[3, 6:8, 6:9] = 3
    seg = build_segmentation(labels, source, AlgorithmInfo("0.0", "r", "0" * 64, "test"))
    seg.save_as(tmp_path / "seg.dcm")
    assert np.array_equal(read_segmentation(tmp_path / "seg.dcm", source), labels)


def test_a_multi_frame_source_series_gets_its_seg(run: TinyRun, network: torch.nn.Module, tmp_path: Path) -> None:
    import highdicom as hd

    slices = [pydicom.dcmread(f) for f in sorted(_series_dir(_study(run), "t1_mprage").iterdir())]
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(slices, series_instance_uid=hd.UID(), series_number=2,
                                                        sop_instance_uid=hd.UID(), instance_number=1)
    enhanced.SeriesDescription = slices[0].SeriesDescription
    study = tmp_path / "enhanced"
    (study / "t1").mkdir(parents=True)
    enhanced.save_as(study / "t1" / "enhanced.dcm")
    prediction = predict_study(network, study)
    outputs = write_study_outputs(prediction, study, tmp_path / "out", load_provenance(run.checkpoint), run.model)
    assert outputs.seg.path is not None, outputs.seg.note
    source = find_source_series(study, "t1", prediction.native["t1"])
    assert len(source.datasets) == 1 and sorted(source.planes) == list(range(len(slices)))
    assert np.array_equal(read_segmentation(outputs.seg.path, source), prediction.labels_on(source.grid))


def test_a_series_highdicom_cannot_use_costs_the_seg_only(run: TinyRun, network: torch.nn.Module,
                                                          tmp_path: Path) -> None:
    study = tmp_path / "no-study-uid"
    (study / "t1").mkdir(parents=True)
    for path in sorted(_series_dir(_study(run), "t1_mprage").iterdir()):
        ds = pydicom.dcmread(path)
        del ds.StudyInstanceUID  # the readers do not need it; a Segmentation must copy it
        ds.save_as(study / "t1" / path.name)
    outputs = write_study_outputs(predict_study(network, study), study, tmp_path / "out",
                                  load_provenance(run.checkpoint), run.model)
    assert outputs.seg.path is None and "StudyInstanceUID" in outputs.seg.note
    assert outputs.nifti.is_file() and json.loads(outputs.json.read_text())["dicom_seg_note"] == outputs.seg.note


def test_outputs_lie_on_the_dicom_series_grid(run: TinyRun, network: torch.nn.Module, tmp_path: Path) -> None:
    study = _study(run, 1)
    outputs = write_study_outputs(predict_study(network, study), study, tmp_path, load_provenance(run.checkpoint),
                                  run.model)
    vol, affine = scan_case(study, ["t1"]).volumes["t1"]
    written = nib.load(outputs.nifti)
    assert written.shape == vol.shape
    np.testing.assert_allclose(written.affine, affine, atol=1e-4)
    assert outputs.summary["reference"]["modality"] == "t1"


def _reoriented_nifti_study(run: TinyRun, root: Path) -> tuple[Path, Path]:
    """The same held-out study as NIfTI twice: stored slice-first as read, and stored x-first in RAS order (as many
    NIfTI tools write), so the readers must reorient it."""
    scan = scan_case(_study(run), ["t1", "ct"])
    canonical, ras = root / "canonical", root / "ras"
    canonical.mkdir(parents=True)
    ras.mkdir(parents=True)
    for modality, (vol, affine) in scan.volumes.items():
        save_nifti(vol, affine, canonical / f"case_{modality}.nii.gz")
        img = nib.Nifti1Image(vol, affine).as_reoriented(nib.orientations.io_orientation(affine))
        save_nifti(np.asarray(img.dataobj), img.affine, ras / f"case_{modality}.nii.gz")
    return canonical, ras


def test_nifti_output_has_the_source_affine_and_shape_after_reorientation(run: TinyRun, network: torch.nn.Module,
                                                                          tmp_path: Path) -> None:
    canonical, ras = _reoriented_nifti_study(run, tmp_path / "in")
    provenance = load_provenance(run.checkpoint)
    out_ras = write_study_outputs(predict_study(network, ras), ras, tmp_path / "ras", provenance, run.model)
    source = nib.load(ras / "case_t1.nii.gz")
    written = nib.load(out_ras.nifti)
    assert nib.aff2axcodes(source.affine) == ("R", "A", "S") and written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
    assert out_ras.seg.path is None and "no DICOM input" in out_ras.summary["dicom_seg_note"]
    # the same voxels stored slice-first give the same labels once both are put on one orientation
    out_can = write_study_outputs(predict_study(network, canonical), canonical, tmp_path / "can", provenance,
                                  run.model)
    from_ras = nib.load(out_ras.nifti).as_reoriented(
        nib.orientations.ornt_transform(nib.orientations.io_orientation(written.affine),
                                        nib.orientations.io_orientation(nib.load(out_can.nifti).affine)))
    assert np.array_equal(np.asarray(from_ras.dataobj), np.asarray(nib.load(out_can.nifti).dataobj))
    assert out_ras.summary["malignancy_probability"] == pytest.approx(out_can.summary["malignancy_probability"])


def test_a_ct_only_study_gets_a_prediction_and_the_ct_row(run: TinyRun, network: torch.nn.Module,
                                                          tmp_path: Path) -> None:
    study = tmp_path / "ct-only"
    ct = _series_dir(_study(run), "Head")
    shutil.copytree(ct, study / ct.name)
    outputs = write_study_outputs(predict_study(network, study), study, tmp_path / "out",
                                  load_provenance(run.checkpoint), run.model)
    summary = json.loads(outputs.json.read_text())
    assert summary["modalities_used"] == ["ct"] and summary["subset"] == "ct"
    assert summary["modalities_missing"] == ["t1", "t1ce", "t2", "flair", "us"]
    expected = summary["expected_performance"]
    # the checkpoint is best.pt of round BEST_ROUND: its own round's row, not the last round's
    assert expected["subset"] == "ct" and expected["round"] == BEST_ROUND and expected["phase"] == "server-eval"
    assert expected["metrics"]["dice-whole"] == pytest.approx(dice_of(("ct",), BEST_ROUND))
    assert expected["heldout_role"] == "selection" and expected["heldout"] == str(run.data / "heldout")
    assert summary["threshold"] == DEFAULT_THRESHOLD and "no calibrated threshold" in summary["threshold_source"]
    assert summary["decision"] == ("malignant" if summary["malignancy_probability"] >= 0.5 else "benign")
    assert outputs.seg.modality == "ct" and summary["outputs"]["dicom_seg"] == "ct-only_seg.dcm"
    assert 0.0 <= summary["malignancy_probability"] <= 1.0


def test_a_calibrated_threshold_in_the_checkpoint_is_used(tmp_path: Path) -> None:
    run = make_tiny_run(tmp_path, threshold=0.3)
    provenance = load_provenance(run.checkpoint)
    assert provenance.threshold == 0.3 and "calibrated" in provenance.threshold_source
    assert [(p.site, p.round, p.epsilon) for p in provenance.privacy] == [("site-01", 3, 4.5), ("site-02", 3, 7.5)]
    assert provenance.data.startswith("phantom") and provenance.phantom is True


def test_batch_reports_an_unreadable_study_and_predicts_the_others(run: TinyRun, tmp_path: Path) -> None:
    studies = tmp_path / "studies"
    for i in (0, 1):
        shutil.copytree(_study(run, i), studies / f"study-{i}")
    (studies / "broken").mkdir()
    (studies / "broken" / "IM0001.dcm").write_bytes(b"not a dicom file")
    out = tmp_path / "out"
    args = ["predict", "--checkpoint", str(run.checkpoint), "--studies", str(studies), "--out", str(out),
            "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = {s["study"]: s for s in json.loads((out / "predictions.json").read_text())["studies"]}
    assert summary["broken"]["status"] == "failed" and any("not a DICOM file" in p for p in summary["broken"]["problems"])
    for name in ("study-0", "study-1"):
        assert summary[name]["status"] == "predicted"
        assert {f"{name}_seg.nii.gz", f"{name}_seg.dcm", f"{name}_prediction.json"} <= {
            p.name for p in (out / name).iterdir()}
    assert "broken: failed" in result.output.replace("\n", " ")

    shutil.rmtree(studies / "study-0")
    shutil.rmtree(studies / "study-1")
    result = CliRunner().invoke(app, [*args[:-4], "--out", str(tmp_path / "out2"), "--device", "cpu"])
    assert result.exit_code == 1, result.output


def test_restoring_undoes_the_training_resize() -> None:
    # preprocess_case's spatial step and restore_probabilities are a pair: an off-centre blob label map resized to the
    # model grid and restored (as one-hot probabilities) must come back in place (a convention mismatch, e.g. MONAI's
    # pixel-centre trilinear resize against torch's floor-nearest one, shifts the lesion by about one source voxel)
    shape, size = (20, 28, 36), (8, 16, 16)
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    r = np.sqrt(((k - 11.5) / 8) ** 2 + ((j - 16.5) / 11) ** 2 + ((i - 13.5) / 14) ** 2)
    seg = np.select([r < 0.35, r < 0.6, r < 0.9], [3, 2, 1], 0).astype(np.uint8)
    arrays = preprocess_case({"t1": r.astype(np.float32)}, seg, ["t1"], size)
    one_hot = torch.nn.functional.one_hot(torch.from_numpy(arrays["seg"]), 4).permute(3, 0, 1, 2).float()
    restored = restore_probabilities(one_hot, shape)
    assert restored.shape == (4, *shape)
    torch.testing.assert_close(restored.sum(0), torch.ones(shape))
    back = restored.argmax(0).numpy()
    whole, truth = back > 0, seg > 0
    assert 2 * np.sum(whole & truth) / (whole.sum() + truth.sum()) > 0.88
    offset = np.array(np.nonzero(whole)).mean(1) - np.array(np.nonzero(truth)).mean(1)
    assert np.abs(offset).max() < 0.5, offset


def test_a_study_of_no_model_modality_is_a_clear_error(run: TinyRun, network: torch.nn.Module,
                                                       tmp_path: Path) -> None:
    from common.data.site import CaseError

    (tmp_path / "empty" / "notes").mkdir(parents=True)
    with pytest.raises(CaseError, match="no readable image"):
        predict_study(network, tmp_path / "empty")


def test_grid_mapping_moves_whole_voxels(run: TinyRun, network: torch.nn.Module) -> None:
    prediction = predict_study(network, _study(run))
    on_reference = prediction.labels_on(prediction.grid)
    assert np.array_equal(on_reference, prediction.probabilities.argmax(0))
    # the same grid with the slice axis reversed: slice k of it is slice D-1-k of the reference
    shift = np.eye(4)
    shift[0, 3] = prediction.grid.shape[0] - 1
    flipped = Grid(prediction.grid.shape, prediction.grid.affine @ shift @ np.diag([-1.0, 1.0, 1.0, 1.0]))
    assert np.array_equal(prediction.labels_on(flipped), on_reference[::-1])
