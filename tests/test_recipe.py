"""Smoke test of the training recipe: a short centralized training on a fixed tiny phantom set learns the lesion's
sub-regions and the case label (the recipe of docs/benchmarks.md, "Training recipe"; the full-size numbers come
from bench/recipe.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    from simulations.central import CentralSettings, train_central
    from simulations.phantom_writers import generate

    root = tmp_path_factory.mktemp("recipe")
    data = root / "data"
    generate(data, sites=1, cases_per_site=24, seed=5, scenario="iid", shape=(16, 32, 32), fmt="nifti",
             heldout_cases=0)
    site = data / "site-01"
    # 2D lesion slices keep the test short; the run config's recipe (schedule, balanced losses) is what is tested
    settings = CentralSettings.from_run_config(
        data, root / "run", {"model-family": "attention", "model-spatial-dims": 2, "model-spatial-size": "32,32",
                             "batch-size": 4, "seed": 0},
        epochs=30, device="cpu", heldout=site, eval_every=0, final_subsets="full", hd95=False, threads=1,
        progress=False,
    )
    return train_central(settings)


def test_short_training_learns_sub_regions_and_the_label(tiny_run) -> None:
    row = tiny_run.final.rows["all"]
    # Before the recipe (4-channel last decoder block, plain voxel cross-entropy, global-average linear head) this
    # run predicted no core and no enhancing rim (Dice 0.00) and one class for every case (accuracy = base rate).
    assert row["dice-whole"] > 0.8, row
    assert row["dice-core"] > 0.6 and row["dice-enhancing"] > 0.6, row
    assert row["balanced-accuracy"] > 0.75 and row["auroc"] > 0.9, row
    assert row["threshold"] == 0.5
