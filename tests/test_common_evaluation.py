"""The shared held-out evaluator (common/evaluation.py): a checkpoint evaluated through it gives the server's
numbers for the same weights and cases; bad inputs are refused with a clear error."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from common.evaluation import (
    evaluate_checkpoint,
    heldout_loader,
    load_heldout,
    load_model,
    select_subsets,
)
from models.checkpoint import save_checkpoint
from common.runconfig import default_model_config
from models.contribution import mean_contribution, modality_contribution
from models.network import build_model
from server.evaluation import GlobalEvaluator
from tests.server_stubs import write_heldout

CFG = default_model_config(family="attention", modalities=("t1", "ct"), spatial_dims=3, spatial_size=(8, 16, 16),
                  channels=(4, 8), attention_heads=2)


@pytest.fixture(scope="module")
def checkpoint_and_heldout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval")
    heldout = write_heldout(root / "data" / "heldout", CFG.modalities, n_cases=3, shape=CFG.spatial_size, seed=2)
    torch.manual_seed(3)
    state = build_model(CFG).state_dict()
    save_checkpoint(root / "best.pt", state, CFG, round=4)
    return root / "best.pt", heldout, state


def _same(a: dict[str, float], b: dict[str, float]) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert (math.isnan(v) and math.isnan(b[k])) or v == b[k], k


def test_checkpoint_evaluation_equals_the_servers_on_the_same_state_dict(checkpoint_and_heldout) -> None:
    ckpt, heldout, state = checkpoint_and_heldout
    result = evaluate_checkpoint(ckpt, heldout, subsets="all", hd95="full", batch_size=2, device="cpu")
    server = GlobalEvaluator(CFG, heldout, device="cpu", batch_size=2, hd95="full").evaluate(state)
    assert server is not None
    flat = result.report.to_flat()
    # monotonicity-violations and the per-row metrics: bit-identical, not just close
    _same(flat, server.flat)
    assert "all/hd95-whole" in flat and "t1/hd95-whole" not in flat
    assert result.cases == 3 and result.config == CFG and result.extra["round"] == 4
    assert result.device == torch.device("cpu") and result.heldout == heldout


def test_named_subset_selections(checkpoint_and_heldout) -> None:
    ckpt, heldout, _ = checkpoint_and_heldout
    assert select_subsets("all", CFG.modalities) is None
    assert select_subsets("full", CFG.modalities) == [("t1", "ct")]
    assert select_subsets("full+singles", CFG.modalities) == [("t1", "ct"), ("t1",), ("ct",)]
    assert select_subsets("full+singles", ("t1",)) == [("t1",)]
    with pytest.raises(ValueError, match="choose one of all, full, full\\+singles"):
        select_subsets("some", CFG.modalities)
    report = evaluate_checkpoint(ckpt, heldout, subsets="full+singles", hd95=False, device="cpu").report
    assert report.subsets == [("t1", "ct"), ("t1",), ("ct",)]
    assert not any(k.startswith("hd95") for row in report.rows.values() for k in row)


def test_load_model_is_in_eval_mode_with_the_checkpoint_weights(checkpoint_and_heldout) -> None:
    ckpt, _, state = checkpoint_and_heldout
    model, cfg, extra = load_model(ckpt, "cpu")
    assert not model.training and cfg == CFG and extra == {"round": 4}
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_load_heldout_refuses_a_data_root(checkpoint_and_heldout) -> None:
    _, heldout, _ = checkpoint_and_heldout
    data_root = heldout.parent
    write_heldout(data_root / "site-01", CFG.modalities, n_cases=1, shape=CFG.spatial_size)
    with pytest.raises(ValueError, match="data root, not a held-out set; give its heldout/ folder"):
        load_heldout(CFG, data_root)
    with pytest.raises(ValueError, match="is not a folder"):
        load_heldout(CFG, data_root / "nowhere")


def test_heldout_loader_leaves_the_global_rng_alone(checkpoint_and_heldout) -> None:
    _, heldout, _ = checkpoint_and_heldout
    dataset = load_heldout(CFG, heldout)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    batches = list(heldout_loader(dataset, 2))
    assert [b["image"].shape[0] for b in batches] == [2, 1]
    assert torch.equal(torch.rand(3), expected)
    with pytest.raises(ValueError, match="batch size must be at least 1"):
        heldout_loader(dataset, 0)


def test_mean_contribution_over_batches_equals_one_batch_of_every_case(checkpoint_and_heldout) -> None:
    ckpt, heldout, _ = checkpoint_and_heldout
    model, cfg, _ = load_model(ckpt, "cpu")
    dataset = load_heldout(cfg, heldout)
    whole = next(iter(heldout_loader(dataset, len(dataset))))
    one = modality_contribution(model, whole["image"], whole["mask"], whole["seg"], whole["label"])
    means = mean_contribution(model, heldout_loader(dataset, 2), "cpu")
    assert list(means) == list(cfg.modalities)
    for m, per in means.items():
        assert set(per) == set(one[m]) - {"cases"}
        for k, v in per.items():
            assert v == pytest.approx(one[m][k], abs=1e-6), (m, k)


def test_checkpoint_evaluation_classifies_at_the_stored_threshold(checkpoint_and_heldout, tmp_path: Path) -> None:
    """`evaluate` (and the experiments) report a server checkpoint at the operating point its selection set chose."""
    _, heldout, state = checkpoint_and_heldout
    save_checkpoint(tmp_path / "calibrated.pt", state, CFG, round=4, threshold=0.0)
    row = evaluate_checkpoint(tmp_path / "calibrated.pt", heldout, subsets="full", hd95=False, device="cpu").report
    assert row.rows["all"]["threshold"] == 0.0 and row.rows["all"]["recall"] == 1.0  # everything called malignant
    plain = evaluate_checkpoint(checkpoint_and_heldout[0], heldout, subsets="full", hd95=False, device="cpu").report
    assert plain.rows["all"]["threshold"] == 0.5


def test_evaluation_at_a_given_threshold_and_one_chosen_on_a_selection_set(checkpoint_and_heldout,
                                                                            tmp_path: Path) -> None:
    """`threshold=` overrides the stored one; `selection_threshold` is the report's balanced-accuracy optimum on
    the selection cohort; a selection cohort of one class, and a threshold outside [0, 1], are refused by name."""
    from common.evaluation import selection_threshold

    ckpt, heldout, state = checkpoint_and_heldout
    save_checkpoint(tmp_path / "calibrated.pt", state, CFG, round=4, threshold=0.0)
    row = evaluate_checkpoint(tmp_path / "calibrated.pt", heldout, subsets="full", hd95=False, device="cpu",
                              threshold=1.0).report.rows["all"]
    assert row["threshold"] == 1.0 and row["recall"] == 0.0  # nothing called malignant: the given cut, not 0.0
    select = write_heldout(tmp_path / "select", CFG.modalities, n_cases=4, shape=CFG.spatial_size, seed=5)
    cut, cases = selection_threshold(ckpt, select, device="cpu")
    report = evaluate_checkpoint(ckpt, select, subsets="full", hd95=False, device="cpu").report
    assert cases == 4 and cut == report.operating_threshold
    with pytest.raises(ValueError, match=r"probability in \[0, 1\]"):
        evaluate_checkpoint(ckpt, heldout, subsets="full", hd95=False, device="cpu", threshold=1.5)
    one_class = write_heldout(tmp_path / "benign", CFG.modalities, n_cases=1, shape=CFG.spatial_size)
    with pytest.raises(ValueError, match="benign: its 1 cases do not hold both classes"):
        selection_threshold(ckpt, one_class, device="cpu")
