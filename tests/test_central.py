"""A short centralized run on tiny phantoms learns, logs, checkpoints, and `fedfusion evaluate` reads it back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

MODS = ("t1", "t2", "ct")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from simulations.phantom_writers import generate

    out = tmp_path_factory.mktemp("central") / "data"
    generate(out, sites=2, cases_per_site=8, seed=3, scenario="iid", shape=(16, 32, 32), fmt="nifti",
             heldout_cases=6)
    return out


@pytest.fixture(scope="module")
def central_run(phantoms: Path, tmp_path_factory: pytest.TempPathFactory):
    from simulations.central import CentralSettings, train_central

    out = tmp_path_factory.mktemp("central") / "run"
    settings = CentralSettings.from_run_config(
        phantoms, out, {"model-family": "input", "model-modalities": ",".join(MODS), "lr": 3e-3, "batch-size": 2,
                        "model-spatial-size": "16,32,32", "model-channels": "8,16", "seed": 0},
        epochs=10, device="cpu", eval_every=5, hd95=False, initial_eval=True, threads=1, progress=False,
    )
    return settings, train_central(settings)


def test_central_training_learns(central_run) -> None:
    _, result = central_run
    before = result.initial["all/dice-whole"]
    after = result.final.rows["all"]["dice-whole"]
    assert after > before + 0.2, f"dice-whole {before:.3f} -> {after:.3f}"
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    # the last epoch evaluates every subset
    assert len(result.final.subsets) == 2 ** len(MODS) - 1


def test_central_run_directory(central_run) -> None:
    from models.checkpoint import load_checkpoint
    from models.runlog import iter_metrics

    settings, result = central_run
    run = Path(settings.out)
    config = json.loads((run / "config.json").read_text())
    assert config["model-family"] == "input" and config["train-sites"] == ["site-01", "site-02"]
    records = list(iter_metrics(run / "metrics.jsonl"))
    evals = {r["round"] for r in records if r["phase"] == "central-eval" and r["metric"] == "all/dice-whole"}
    assert evals == {0, 5, 10}
    assert all(r["scope"] == "global" for r in records)
    _, cfg, extra = load_checkpoint(run / "checkpoints" / "last.pt")
    assert cfg.modalities == MODS and extra["epoch"] == 10
    _, _, best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["epoch"] == result.best_epoch


def test_central_operating_point_comes_from_the_selection_set(central_run, phantoms: Path) -> None:
    """As in the ServerApp: the threshold is the balanced-accuracy optimum on validation/, the held-out numbers are
    computed at it, and the checkpoints store it for evaluate and predict."""
    from common.evaluation import evaluate_model, load_heldout, load_model
    from models.runlog import iter_metrics

    settings, _ = central_run
    run = Path(settings.out)
    model, cfg, extra = load_model(run / "checkpoints" / "last.pt", "cpu")
    expected = evaluate_model(model, load_heldout(cfg, phantoms / "validation"), subsets="full", hd95=False,
                              device="cpu").operating_threshold
    assert expected is not None  # the fixture's selection set holds both classes
    assert extra["threshold"] == pytest.approx(expected)
    reported = {r["round"]: r["value"] for r in iter_metrics(run / "metrics.jsonl")
                if r["phase"] == "central-eval" and r["metric"] == "all/threshold"}
    assert reported[10] == pytest.approx(expected) and reported[0] == 0.5  # round 0: nothing calibrated yet


def test_central_is_deterministic(central_run, phantoms: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    from simulations.central import train_central

    settings, result = central_run
    # the same epochs: the learning-rate schedule spans the run, so a shorter run's first epoch differs
    again = train_central(replace(settings, out=tmp_path / "again", initial_eval=False, eval_every=0))
    assert again.history[0]["loss"] == pytest.approx(result.history[0]["loss"], rel=1e-6)


def test_evaluate_command_json(central_run, phantoms: Path) -> None:
    from typer.testing import CliRunner

    from fedfusion.cli import app

    settings, result = central_run
    ckpt = Path(settings.out) / "checkpoints" / "last.pt"
    res = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(ckpt), "--data", str(phantoms), "--json",
                                   "--subsets", "full", "--no-hd95", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["subsets"] == ["+".join(MODS)]
    assert data["rows"]["all"]["dice-whole"] == pytest.approx(result.final.rows["all"]["dice-whole"], abs=1e-6)
    bad = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(ckpt) + ".missing", "--data", str(phantoms)])
    assert bad.exit_code != 0 and "does not exist" in " ".join(bad.output.split())


def test_evaluate_command_chooses_the_operating_point_on_a_selection_folder(central_run, phantoms: Path) -> None:
    """`evaluate --select`: the threshold is the balanced-accuracy optimum on the selection folder (a checkpoint's
    stored one is overridden), the held-out numbers are at it, and the held-out folder itself is refused."""
    from typer.testing import CliRunner

    from common.evaluation import evaluate_model, load_heldout, load_model
    from fedfusion.cli import app

    settings, _ = central_run
    ckpt = Path(settings.out) / "checkpoints" / "last.pt"
    model, cfg, _ = load_model(ckpt, "cpu")
    heldout = load_heldout(cfg, phantoms / "heldout")
    # the held-out folder as the selection set, by hand: a different operating point from the validation one
    on_heldout = evaluate_model(model, heldout, subsets="full", hd95=False, device="cpu").operating_threshold
    select = phantoms.parent / "select-copy"
    if not select.exists():
        import shutil

        shutil.copytree(phantoms / "heldout", select)  # the held-out cases under another path: the threshold is known
    args = ["evaluate", "--checkpoint", str(ckpt), "--data", str(phantoms), "--json", "--subsets", "full",
            "--no-hd95", "--device", "cpu"]
    res = CliRunner().invoke(app, [*args, "--select", str(select)])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["select"] == str(select) and data["select_cases"] == 6
    assert data["rows"]["all"]["threshold"] == pytest.approx(on_heldout)
    expected = evaluate_model(model, heldout, subsets="full", hd95=False, device="cpu", threshold=on_heldout)
    assert data["rows"]["all"]["balanced-accuracy"] == pytest.approx(expected.rows["all"]["balanced-accuracy"])
    same = CliRunner().invoke(app, [*args, "--select", str(phantoms / "heldout")])
    assert same.exit_code == 2 and "is the held-out folder itself" in " ".join(same.output.split())
    text = CliRunner().invoke(app, [a for a in args if a != "--json"] + ["--select", str(select)])
    assert text.exit_code == 0 and f"chosen on {select}" in " ".join(text.output.split())


def test_selection_cohort_is_found_beside_an_explicit_held_out_folder(tmp_path: Path) -> None:
    # the experiments pass heldout= explicitly and local-only rows train on one site folder: the data root's
    # validation/ still chooses best.pt and the threshold, and the held-out folder is never its own selection set
    from simulations.central import selection_dir

    root = tmp_path / "data"
    for name in ("site-01", "heldout", "validation"):
        (root / name).mkdir(parents=True)
    assert selection_dir(root, root / "heldout") == root / "validation"
    assert selection_dir(root / "site-01", root / "heldout") == root / "validation"
    assert selection_dir(root, root / "validation") is None
    (root / "validation").rmdir()
    assert selection_dir(root, root / "heldout") is None
