"""``fedfusion export --format monai-bundle``: the bundle loads with MONAI's bundle API, its inference equals
``fedfusion predict``, and its metadata and model card state modalities, labels, data, privacy and metrics."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from common.evaluation import load_model
from fedfusion.bundle import BUNDLE_FILES, export_bundle
from fedfusion.cli import app
from models.config import SEG_LABELS
from models.modalities import subset_name
from tests.predict_helpers import BEST_ROUND, TinyRun, dice_of, make_tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    return make_tiny_run(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def bundle(run: TinyRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "fedfusion_tiny"
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(run.checkpoint), "--format", "monai-bundle",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_bundle_holds_metadata_config_weights_and_model_card(run: TinyRun, bundle: Path) -> None:
    assert all((bundle / f).is_file() for f in BUNDLE_FILES)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == len(run.model.modalities)
    assert image["channel_def"] == {str(i): m for i, m in enumerate(run.model.modalities)}
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {str(k): v for k, v in SEG_LABELS.items()}
    for key in ("version", "monai_version", "pytorch_version", "numpy_version"):
        assert meta[key]
    assert meta["fedfusion"]["model_config"] == run.model.to_dict()
    weights = torch.load(bundle / "models" / "model.pt", weights_only=True)
    reference, _, _ = load_model(run.checkpoint, "cpu")
    assert weights.keys() == reference.state_dict().keys()

    card = (bundle / "docs" / "README.md").read_text()
    assert "phantom: fedfusion phantoms" in card
    assert "| site-01 | 3 | yes | 4.500 |" in card and "| site-02 | 3 | yes | 7.500 |" in card
    assert f"round {BEST_ROUND} (server-eval)" in card
    assert f"| ct | 3 | {dice_of(('ct',), BEST_ROUND):.3f} |" in card
    assert f"| {subset_name(run.model.modalities)} |" in card


def test_monai_bundle_load_builds_the_network_with_the_weights(run: TinyRun, bundle: Path) -> None:
    from monai.bundle import load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns that parsing a config runs its code
        network = load(name=bundle.name, bundle_dir=bundle.parent, workflow_type="inference", device="cpu")
    reference, _, _ = load_model(run.checkpoint, "cpu")
    network.eval()
    image = torch.randn(2, len(run.model.modalities), *run.model.spatial_size)
    mask = torch.tensor([[1.0] * len(run.model.modalities), [0, 0, 0, 0, 1, 0]])
    with torch.no_grad():
        for got, want in zip(network(image, mask), reference(image, mask)):
            torch.testing.assert_close(got, want)


def test_bundle_inference_gives_what_fedfusion_predict_gives(run: TinyRun, bundle: Path, tmp_path: Path) -> None:
    from monai.bundle import run as bundle_run

    studies = tmp_path / "studies"
    held = sorted(p for p in (run.data / "heldout").iterdir() if p.is_dir())[0]
    shutil.copytree(held, studies / held.name)
    ct = next(p for p in held.iterdir() if p.is_dir() and "Head" in p.name)
    shutil.copytree(ct, studies / "ct-only" / ct.name)

    result = CliRunner().invoke(app, ["predict", "--checkpoint", str(run.checkpoint), "--studies", str(studies),
                                      "--out", str(tmp_path / "predict"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle_run(config_file=str(bundle / "configs" / "inference.json"),
                   meta_file=str(bundle / "configs" / "metadata.json"), logging_file=False,
                   bundle_root=str(bundle), dataset_dir=str(studies), output_dir=str(tmp_path / "bundle"))
    for name in (held.name, "ct-only"):
        ours = json.loads((tmp_path / "predict" / name / f"{name}_prediction.json").read_text())
        theirs = json.loads((tmp_path / "bundle" / name / f"{name}_prediction.json").read_text())
        assert theirs["malignancy_probability"] == pytest.approx(ours["malignancy_probability"], abs=1e-6)
        for key in ("modalities_used", "threshold", "decision", "expected_performance"):
            assert theirs[key] == ours[key], key
        labels = [np.asarray(nib.load(d / name / f"{name}_seg.nii.gz").dataobj)
                  for d in (tmp_path / "predict", tmp_path / "bundle")]
        assert np.array_equal(*labels)
        assert (tmp_path / "bundle" / name / f"{name}_seg.dcm").is_file()


def test_export_refuses_a_folder_that_is_not_a_bundle(run: TinyRun, bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no bundle"):
        export_bundle(run.checkpoint, tmp_path / "busy")
    with pytest.raises(ValueError, match="--overwrite"):
        export_bundle(run.checkpoint, bundle)
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(run.checkpoint), "--format", "onnx",
                                      "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "state-dict, monai-bundle" in result.output
