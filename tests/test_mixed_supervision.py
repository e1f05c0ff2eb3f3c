"""Mixed supervision at a site: cases with a segmentation, a label, both or neither; a site without labels.csv.

Dataset flags and placeholders, the per-case masked loss (exact zeros for missing targets, per-case gradients under
Opacus equal to single-case gradients), metrics over the cases with targets (held-out rows and the site's DP
evaluation statistics), ``fedfusion inspect`` counts, and the real ClientApp ``train`` handler with DP on and off.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from client.client_app import train
from client.privacy.engine import CasesOnly, make_private
from client.runtime import clear_cache
from common.data import CaseDataset
from common.data.inspect import inspect_data
from models.losses import MultiTaskLoss
from models.network import build_model
from tests.client_helpers import TINY, context, initial_state, message, run_config
from tests.readers_helpers import make_seg, make_volume, simple_affine, write_site

SHAPE = (8, 16, 16)
MODS = ("t1", "t2")


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    clear_cache()


@pytest.fixture
def mixed_site(tmp_path: Path) -> Path:
    """case-both (seg + label), case-label (label only), case-seg (seg only), case-none (neither)."""
    seg = make_seg(SHAPE)
    cases = {c: {"t1": make_volume(SHAPE, seed=i), "t2": make_volume(SHAPE, seed=10 + i)}
             for i, c in enumerate(("case-both", "case-label", "case-seg", "case-none"))}
    return write_site(tmp_path / "site-01", cases, {"case-both": 1, "case-label": 0}, simple_affine(), fmt="nifti",
                      seg={"case-both": seg, "case-seg": seg})


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two phantom sites with a quarter of the cases unlabelled and a quarter unsegmented, and a third federation
    whose sites have no labels.csv at all."""
    from simulations.phantom_writers import generate

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("mixed")
    generate(root / "mixed", sites=2, cases_per_site=4, seed=3, scenario="iid", shape=(16, 32, 32), fmt="nifti",
             heldout_cases=0, unlabelled_fraction=0.25, unsegmented_fraction=0.25)
    generate(root / "unlabelled", sites=1, cases_per_site=4, seed=4, scenario="iid", shape=(16, 32, 32),
             fmt="nifti", heldout_cases=0, unlabelled_fraction=1.0)
    return root


# -- dataset -------------------------------------------------------------------------------------------------------
def test_items_carry_target_flags_and_placeholders(mixed_site: Path, tmp_path: Path) -> None:
    ds = CaseDataset([mixed_site], MODS, spatial_size=SHAPE, cache_dir=tmp_path / "cache")
    by_id = {ds[i]["case_id"]: ds[i] for i in range(len(ds))}
    assert set(by_id) == {"case-both", "case-label", "case-seg"}  # neither target: skipped
    for case_id, (seg_flag, label_flag) in {"case-both": (1.0, 1.0), "case-label": (0.0, 1.0),
                                             "case-seg": (1.0, 0.0)}.items():
        item = by_id[case_id]
        assert item["has_seg"].dtype == torch.float32 and item["has_seg"].shape == ()
        assert (float(item["has_seg"]), float(item["has_label"])) == (seg_flag, label_flag), case_id
    assert int(by_id["case-label"]["seg"].count_nonzero()) == 0  # placeholder segmentation
    assert int(by_id["case-seg"]["label"]) == 0 and int(by_id["case-seg"]["seg"].count_nonzero()) > 0
    assert ds.target_counts() == {"cases": 3, "seg": 2, "label": 2, "both": 1}
    assert ds.known_labels() == [1, 0]
    problems = {(p.case_id, p.kind): p.severity for p in ds.problems}
    assert problems[("case-none", "no-targets")] == "error"
    assert problems[("case-label", "missing-seg")] == "info" and problems[("case-seg", "missing-label")] == "info"
    # the on-disk cache gives back the same flags
    again = CaseDataset([mixed_site], MODS, spatial_size=SHAPE, cache_dir=tmp_path / "cache")
    assert again.has_seg() == ds.has_seg() and again.has_label() == ds.has_label()
    # the old rule on request: only segmented cases
    assert len(CaseDataset([mixed_site], MODS, spatial_size=SHAPE, require_seg=True)) == 2


def test_a_site_without_labels_csv_is_valid(mixed_site: Path) -> None:
    (mixed_site / "labels.csv").unlink()
    ds = CaseDataset([mixed_site], MODS, spatial_size=SHAPE)
    assert sorted(c for _, c in ds.cases) == ["case-both", "case-seg"]  # segmentation-only training
    assert ds.has_label() == [False, False] and ds.known_labels() == []
    kinds = {(p.kind, p.severity) for p in ds.problems}
    assert ("no-labels-file", "info") in kinds and not any(p.kind == "missing-label" for p in ds.problems)


def test_a_broken_labels_file_is_not_read_as_unlabelled(mixed_site: Path) -> None:
    (mixed_site / "labels.csv").write_text("case,diagnosis\ncase-both,1\n")  # wrong header: the labels are unknown
    with pytest.raises(ValueError, match="no usable case"):
        CaseDataset([mixed_site], MODS, spatial_size=SHAPE)
    site = inspect_data(mixed_site, MODS).sites[0]
    assert site.usable_cases == 0 and any(p.kind == "bad-labels-file" for p in site.problems)


# -- loss ----------------------------------------------------------------------------------------------------------
def _logits(b: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seg_logits = torch.randn(b, 4, 4, 6, 6, generator=g, requires_grad=True)
    cls_logits = torch.randn(b, 2, generator=g, requires_grad=True)
    seg = torch.randint(0, 4, (b, 4, 6, 6), generator=g)
    label = torch.randint(0, 2, (b,), generator=g)
    return seg_logits, cls_logits, seg, label


def test_masked_targets_get_exactly_zero_gradient() -> None:
    loss_fn = MultiTaskLoss(class_prior=(0.3, 0.7))
    seg_logits, cls_logits, seg, label = _logits(3)
    has_seg, has_label = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 0.0])
    total, parts = loss_fn(seg_logits, cls_logits, seg, label, has_seg=has_seg, has_label=has_label)
    g_seg, g_cls = torch.autograd.grad(total, [seg_logits, cls_logits])
    assert torch.count_nonzero(g_seg[1]) == 0 and torch.count_nonzero(g_cls[2]) == 0
    assert torch.count_nonzero(g_seg[0]) > 0 and torch.count_nonzero(g_cls[1]) > 0
    assert parts["seg-cases"] == 2 and parts["cls-cases"] == 2
    # changing the placeholders (an unlabelled case's label, an unsegmented case's map) changes nothing at all
    label2, seg2 = label.clone(), seg.clone()
    label2[2], seg2[1] = 1 - label2[2], (seg2[1] + 1) % 4
    total2, _ = loss_fn(seg_logits, cls_logits, seg2, label2, has_seg=has_seg, has_label=has_label)
    assert torch.equal(total, total2)
    assert all(torch.equal(a, b) for a, b in zip((g_seg, g_cls), torch.autograd.grad(total2, [seg_logits, cls_logits])))


def test_batch_loss_is_the_mean_of_single_case_losses_and_empty_parts_are_zero() -> None:
    loss_fn = MultiTaskLoss()
    seg_logits, cls_logits, seg, label = _logits(4, seed=1)
    has_seg, has_label = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 1.0, 0.0])
    total, _ = loss_fn(seg_logits, cls_logits, seg, label, has_seg=has_seg, has_label=has_label)
    singles = [loss_fn(seg_logits[i:i + 1], cls_logits[i:i + 1], seg[i:i + 1], label[i:i + 1],
                       has_seg=has_seg[i:i + 1], has_label=has_label[i:i + 1])[0] for i in range(4)]
    torch.testing.assert_close(total, torch.stack(singles).mean())
    assert float(singles[3]) == 0.0  # neither target: the case adds nothing
    loss_fn.reduction = "none"  # Opacus's ghost-clipping protocol: the same per-case losses
    torch.testing.assert_close(loss_fn(seg_logits, cls_logits, seg, label, has_seg=has_seg, has_label=has_label),
                               torch.stack(singles) * 1.0)
    loss_fn.reduction = "mean"
    none = torch.zeros(4)
    total, parts = loss_fn(seg_logits, cls_logits, seg, label, has_seg=none, has_label=has_label)
    assert math.isfinite(float(total)) and float(parts["seg"]) == 0.0 and float(parts["seg-cases"]) == 0.0
    with pytest.raises(ValueError, match="has_label must be"):
        loss_fn(seg_logits, cls_logits, seg, label, has_label=torch.ones(3))


def test_opacus_per_case_gradients_are_single_case_gradients() -> None:
    """Under DP-SGD each case's gradient depends on that case alone: Opacus's per-sample gradients of a batch with
    mixed targets equal the gradients of each case's own loss computed alone with plain autograd."""
    torch.manual_seed(0)
    model = build_model(TINY.replace(dropout=0.0))
    reference = copy.deepcopy(model)
    loss_fn = MultiTaskLoss()
    g = torch.Generator().manual_seed(2)
    m = len(TINY.modalities)
    batch = {"image": torch.randn(3, m, *TINY.spatial_size, generator=g), "mask": torch.ones(3, m),
             "seg": torch.randint(0, 4, (3, *TINY.spatial_size), generator=g), "label": torch.tensor([1, 0, 1]),
             "has_seg": torch.tensor([1.0, 0.0, 1.0]), "has_label": torch.tensor([0.0, 1.0, 1.0])}
    cases = [{k: v[i] for k, v in batch.items()} for i in range(3)]
    parts = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.utils.data.DataLoader(cases),
                         loss_fn, noise_multiplier=1.0, max_grad_norm=1.0)
    seg_logits, cls_logits = parts.module(batch["image"], batch["mask"])
    total, _ = loss_fn(seg_logits, cls_logits, batch["seg"], batch["label"], has_seg=batch["has_seg"],
                       has_label=batch["has_label"])
    total.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    own = [p for p in reference.parameters() if p.requires_grad]
    for i in range(3):
        s, c = reference(batch["image"][i:i + 1], batch["mask"][i:i + 1])
        single, _ = loss_fn(s, c, batch["seg"][i:i + 1], batch["label"][i:i + 1],
                            has_seg=batch["has_seg"][i:i + 1], has_label=batch["has_label"][i:i + 1])
        grads = torch.autograd.grad(single, own, allow_unused=True)
        for p, grad in zip(params, grads):
            expected = torch.zeros_like(p) if grad is None else grad
            torch.testing.assert_close(p.grad_sample[i], expected, rtol=1e-4, atol=1e-6)


def test_cases_only_fills_flags_for_items_without_them() -> None:
    items = [{"image": torch.zeros(1, 2, 2), "mask": torch.ones(1), "seg": torch.zeros(2, 2, dtype=torch.long),
              "label": torch.tensor(1)}]
    out = CasesOnly(items)[0]
    assert float(out["has_seg"]) == 1.0 and float(out["has_label"]) == 1.0 and out["has_label"].shape == ()


# -- metrics -------------------------------------------------------------------------------------------------------
def test_heldout_metrics_are_over_the_cases_with_targets(mixed_site: Path) -> None:
    from common.evaluation import evaluate_model
    from models.evaluation import predict
    from models.metrics import segmentation_metrics

    torch.manual_seed(0)
    cfg = TINY.replace(modalities=MODS, spatial_size=SHAPE)
    model = build_model(cfg).eval()
    ds = CaseDataset([mixed_site], MODS, spatial_size=SHAPE)
    report = evaluate_model(model, ds, subsets="full", hd95="none", batch_size=2, device="cpu")
    row = report.rows["all"]
    assert (row["cases"], row["cases-seg"], row["cases-label"]) == (3.0, 2.0, 2.0)
    pred = predict(model, torch.utils.data.DataLoader(ds, batch_size=2), "cpu")
    on = pred.has_seg
    assert on.tolist() == ds.has_seg()
    manual = segmentation_metrics(pred.seg_pred[on], pred.seg_true[on], hd95=False)["dice-whole"].mean()
    assert row["dice-whole"] == pytest.approx(float(manual), abs=1e-6)
    assert not report.notes

    (mixed_site / "labels.csv").unlink()  # an evaluation set without any label: NaN and a note, no crash
    unlabelled = CaseDataset([mixed_site], MODS, spatial_size=SHAPE)
    report = evaluate_model(model, unlabelled, subsets="full", hd95="none", batch_size=2, device="cpu")
    assert report.rows["all"]["cases-label"] == 0.0 and math.isnan(report.rows["all"]["accuracy"])
    assert any("no evaluated case carries a label" in n for n in report.notes)


def test_site_statistics_count_segmented_and_labelled_patients() -> None:
    from common.evalstats import SENSITIVITY, STATISTIC_KEYS, metrics_from_sums, site_sums

    dice = np.array([[1.0] * 4, [0.0] * 4, [0.5] * 4])
    probs, labels = np.array([0.9, 0.2, 0.7]), np.array([1, 0, 1])
    has_seg, has_label = np.array([True, False, True]), np.array([False, True, True])
    sums = site_sums(dice, probs, labels, [[0], [1], [2]], has_seg=has_seg, has_label=has_label)
    assert sums.shape == (len(STATISTIC_KEYS),)
    got = metrics_from_sums(sums)
    assert (got["cases"], got["cases-seg"], got["cases-label"]) == (3.0, 2.0, 2.0)
    assert got["dice-whole"] == pytest.approx(0.75)  # the unsegmented case's placeholder Dice of 0 is not counted
    assert got["accuracy"] == pytest.approx(1.0)  # 0.2 -> benign (right), 0.7 -> malignant (right)
    # one patient with mixed studies still moves the vector by at most SENSITIVITY
    one = site_sums(np.ones((3, 4)), np.full(3, 0.99), np.ones(3, dtype=int), [[0, 1, 2]],
                    has_seg=np.array([True, False, False]), has_label=np.array([False, True, True]))
    assert np.linalg.norm(one) <= SENSITIVITY + 1e-12
    none = metrics_from_sums(site_sums(dice, probs, labels, [[0], [1], [2]], has_label=np.zeros(3, dtype=bool)))
    assert none["cases-label"] == 0.0 and math.isnan(none["accuracy"]) and math.isnan(none["auroc"])


# -- inspect -------------------------------------------------------------------------------------------------------
def test_inspect_counts_targets_per_site(mixed_site: Path, phantoms: Path) -> None:
    from fedfusion.cli import app

    site = inspect_data(mixed_site, MODS).sites[0]
    assert site.target_counts() == {"segmentation": 2, "label": 2, "both": 1, "neither": 1}
    assert site.usable_cases == 3
    manifest = json.loads((phantoms / "mixed" / "phantoms.json").read_text())
    entry = manifest["sites"]["site-01"]
    assert len(entry["unlabelled"]) == 1 and len(entry["unsegmented"]) == 1
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", str(phantoms / "mixed"), "--json", "--no-plan"])
    assert result.exit_code == 0, result.output
    counts = {s["name"]: s["target_counts"] for s in json.loads(result.stdout)["sites"]}
    assert counts["site-01"] == {"segmentation": 3, "label": 3, "both": 2, "neither": 0}
    text = runner.invoke(app, ["inspect", str(phantoms / "unlabelled" / "site-01"), "--no-plan"])
    assert text.exit_code == 0, text.output
    assert "segmentation 4, label 0, both 0, neither 0" in text.stdout and "no labels.csv" in text.stdout


# -- the real ClientApp train handler ------------------------------------------------------------------------------
@pytest.mark.parametrize("dp", [True, False])
@pytest.mark.parametrize("federation", ["mixed", "unlabelled"])
def test_a_site_with_mixed_supervision_trains_and_replies(phantoms: Path, tmp_path: Path, dp: bool,
                                                          federation: str) -> None:
    site = phantoms / federation / "site-01"
    assert (site / "labels.csv").exists() == (federation == "mixed")
    node = {"data-dir": str(site), "state-dir": str(tmp_path / "state"), "allow-no-dp": True}
    state = initial_state()
    reply = train(message("train", state), context(node, run_config(**{"dp-enabled": dp})))
    assert not reply.has_error(), reply.error
    new = reply.content["arrays"].to_torch_state_dict()
    assert all(torch.isfinite(v).all() for v in new.values() if v.is_floating_point())
    assert any(not torch.equal(new[k], state[k]) for k in state)
    metrics = dict(reply.content["metrics"])
    assert metrics["dp-enabled"] == (1.0 if dp else 0.0)
    assert (metrics["epsilon-total"] > 0) == dp


def test_phantom_partial_supervision_is_disjoint_and_checked() -> None:
    from simulations.phantom_writers import partial_supervision

    unlabelled, unsegmented = partial_supervision(10, 0.3, 0.5, np.random.default_rng(0))
    assert len(unlabelled) == 3 and len(unsegmented) == 5 and not unlabelled & unsegmented
    assert partial_supervision(4, 0.0, 0.0, np.random.default_rng(0)) == (set(), set())
    with pytest.raises(ValueError, match="at most 1"):
        partial_supervision(10, 0.6, 0.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unsegmented_fraction must be in"):
        partial_supervision(10, 0.0, 1.5, np.random.default_rng(0))
