"""Global evaluation in the ServerApp: per-subset table and metrics for every evaluated round, site metrics,
best checkpoint, and export."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from typer.testing import CliRunner

from fedfusion.cli import app as cli_app
from models.checkpoint import load_checkpoint
from models.config import ModelConfig
from models.modalities import subset_name, subsets
from models.network import build_model
from models.runlog import is_site_scope, iter_metrics
from server.server_app import run_server
from tests.server_stubs import LocalGrid, eval_metrics, site_metrics, write_heldout
from common.runconfig import default_model_config, model_entries

TINY = default_model_config(family="attention", modalities=("t1", "ct"), spatial_dims=3, spatial_size=(8, 16, 16),
                   channels=(4, 8))
SITES = {21: ({"t1": 3, "ct": 3}, 3, 0.2), 22: ({"t1": 1}, 1, 0.6)}  # cases, held-out patients, their dice


def stub_site(node_id: int, msg: Message) -> Message:
    cases, n_eval, dice = SITES[node_id]
    if msg.metadata.message_type.startswith("query"):  # prepare-sites before round 1 (server/prepare.py)
        return Message(content=RecordDict({"metrics": MetricRecord({"ready": 1.0, "can-evaluate": 1.0})}),
                       reply_to=msg)
    if msg.metadata.message_type.startswith("evaluate"):
        return Message(content=RecordDict({"metrics": MetricRecord(eval_metrics(n_eval, dice))}), reply_to=msg)
    rnd = int(msg.content["config"]["server-round"])
    rng = np.random.default_rng(node_id * 100 + rnd)
    arrays = {
        k: torch.from_numpy(np.ascontiguousarray(
            (v.numpy() + 1e-2 * rng.standard_normal(v.shape)).astype(v.numpy().dtype)
            if v.numpy().dtype.kind == "f" else v.numpy()))
        for k, v in msg.content["arrays"].items()
    }
    metrics = site_metrics(sum(cases.values()), cases)
    metrics.update({"epsilon-total": 0.7 * rnd, "epsilon-round": 0.7, "delta": 1e-5})
    return Message(content=RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


def _run(run_dir: Path, test_dir: Path, rounds: int, eval_every: int, **extra: object) -> None:
    torch.set_num_threads(1)
    config = {
        **model_entries(TINY), "num-server-rounds": rounds, "eval-every": eval_every, "run-dir": str(run_dir),
        "test-dir": str(test_dir), "min-train-nodes": 2, "min-evaluate-nodes": 2, "min-available-nodes": 2,
        "device": "cpu", **extra,
    }
    run_server(LocalGrid(sorted(SITES), stub_site),
               Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))


def test_every_evaluated_round_has_the_subset_table(tmp_path: Path, capsys) -> None:
    heldout = write_heldout(tmp_path / "heldout", TINY.modalities, n_cases=3)
    run_dir = tmp_path / "run"
    # evaluated: round 2 (cadence, on eval-subsets) and round 3 (the last: every subset)
    _run(run_dir, heldout, rounds=3, eval_every=2, **{"eval-subsets": "all"})
    records = list(iter_metrics(run_dir / "metrics.jsonl"))
    evaluated = {2, 3}
    rows = [subset_name(s) for s in subsets(TINY.modalities)] + ["all", "mean", "worst"]
    for rnd in (1, 2, 3):
        keys = {r["metric"] for r in records if r["round"] == rnd and r["phase"] == "server-eval"}
        if rnd in evaluated:
            for row in rows:
                assert {f"{row}/dice-whole", f"{row}/auroc"} <= keys, (rnd, row)
            assert "all/hd95-whole" in keys and "t1/hd95-whole" not in keys  # eval-hd95 default: full set only
        else:
            assert not keys
    log_text = (run_dir / "server.log").read_text()
    for rnd in evaluated:
        assert f"round {rnd} global evaluation per modality subset" in log_text
    assert log_text.count("held-out metrics per modality subset") == len(evaluated)
    assert "t1+ct" in log_text
    printed = capsys.readouterr().out
    assert "global model, round 2" in printed and "global model, round 3" in printed

    # site metrics: global metrics from the summed statistics (a mean over all held-out patients), per-site train
    # metrics with epsilon
    site_eval = [r for r in records if r["phase"] == "site-eval" and r["scope"] == "global"
                 and r["metric"] == "dice-whole"]
    assert len(site_eval) == 3
    assert abs(site_eval[0]["value"] - (3 * 0.2 + 1 * 0.6) / 4) < 1e-9
    eps = {(r["scope"], r["round"]): r["value"] for r in records
           if r["phase"] == "train" and r["metric"] == "epsilon-total" and is_site_scope(r["scope"])}
    assert eps == {(f"node-{n}", rnd): 0.7 * rnd for n in SITES for rnd in (1, 2, 3)}  # a stub grid has no names

    # best.pt is the evaluated round with the best all-modality Dice
    dice = {r["round"]: r["value"] for r in records if r["phase"] == "server-eval" and r["metric"] == "all/dice-whole"}
    _, _, extra = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert extra["round"] == max(dice, key=lambda k: dice[k])
    assert (run_dir / "config.json").is_file()
    # no selection set: the operating point is not tuned on the reporting set, it stays at the default
    assert "threshold" not in extra and "threshold" not in load_checkpoint(run_dir / "checkpoints" / "last.pt")[2]
    assert {r["value"] for r in records if r["phase"] == "server-eval" and r["metric"] == "all/threshold"} == {0.5}

    # export: plain state dict + model config that rebuild the network
    out = tmp_path / "model.pt"
    result = CliRunner().invoke(cli_app, ["export", "--checkpoint", str(run_dir / "checkpoints" / "best.pt"),
                                          "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "load_state_dict" in result.output
    payload = torch.load(out, weights_only=True)
    model = build_model(ModelConfig.from_dict(payload["model_config"]))
    model.load_state_dict(payload["state_dict"])  # strict: every name and shape matches


def test_missing_test_set_disables_global_evaluation_but_not_the_run(tmp_path: Path, caplog) -> None:
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="server"):
        _run(run_dir, tmp_path / "nowhere", rounds=1, eval_every=1)
    assert any("global evaluation disabled" in r.getMessage() for r in caplog.records)
    _, _, extra = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert extra["round"] == 1
    assert not (run_dir / "checkpoints" / "best.pt").exists()


def test_metrics_from_noise_free_sums_equal_the_exact_metrics() -> None:
    """The server's formulas: on exact statistics of one study per patient they give the held-out evaluator's
    numbers (AUROC exactly when no malignant and benign case share a histogram bin)."""
    from common.evalstats import STATISTIC_KEYS, metrics_from_sums, site_sums, sum_statistics
    from models.metrics import classification_metrics

    rng = np.random.default_rng(0)
    probs = np.concatenate([rng.uniform(0.0, 0.6, 20), rng.uniform(0.65, 1.0, 15)])
    probs[:5] = 0.7  # some benign cases scored high: not perfectly separable at 0.5
    labels = np.concatenate([np.zeros(20, dtype=int), np.ones(15, dtype=int)])
    dice = rng.random((35, 4))
    # two sites: cases 0..16 and 17..34, one study per patient
    sums = sum_statistics([site_sums(dice[:17], probs[:17], labels[:17], [[i] for i in range(17)]),
                           site_sums(dice[17:], probs[17:], labels[17:], [[i] for i in range(18)])])
    assert sums.shape == (len(STATISTIC_KEYS),)
    got = metrics_from_sums(sums)
    exact = classification_metrics(torch.from_numpy(probs), torch.from_numpy(labels))
    for key in ("accuracy", "recall", "specificity", "f1"):
        assert got[key] == pytest.approx(exact[key]), key
    assert got["dice-whole"] == pytest.approx(dice[:, 3].mean()) and got["cases"] == pytest.approx(35)
    assert abs(got["auroc"] - exact["auroc"]) <= 0.05  # binned: ties only within a bin of width 0.1
    assert got["sensitivity@0.0"] == 1.0 and got["specificity@1.0"] == 1.0


def test_best_is_chosen_on_the_selection_set_and_the_unseen_cohort_is_evaluated_last(tmp_path: Path) -> None:
    """The reporting set chooses nothing: best.pt follows the selection set's metric (server-select), records where it
    was chosen, and the unseen-scanner cohort is evaluated once, after the last round."""
    data = tmp_path / "data"
    write_heldout(data / "heldout", TINY.modalities, n_cases=3)
    write_heldout(data / "validation", TINY.modalities, n_cases=2)
    write_heldout(data / "heldout-unseen", TINY.modalities, n_cases=2)
    run_dir = tmp_path / "run"
    torch.set_num_threads(1)
    config = {**model_entries(TINY), "num-server-rounds": 2, "eval-every": 1, "run-dir": str(run_dir),
              "data-dir": str(data), "min-train-nodes": 2, "min-evaluate-nodes": 2, "min-available-nodes": 2,
              "device": "cpu"}  # best-metric and select-subsets: their defaults
    run_server(LocalGrid(sorted(SITES), stub_site),
               Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    records = list(iter_metrics(run_dir / "metrics.jsonl"))

    def rows(phase: str) -> dict[int, dict[str, float]]:
        out: dict[int, dict[str, float]] = {}
        for r in records:
            if r["phase"] == phase and r["scope"] == "global":
                out.setdefault(r["round"], {})[r["metric"]] = r["value"]
        return out

    select, report, unseen = rows("server-select"), rows("server-eval"), rows("server-eval-unseen")
    assert set(select) == {1, 2} and set(report) == {1, 2} and set(unseen) == {2}
    # the selection set: the full set and each single modality (select-subsets), and their mean, which picks best.pt
    singles = [f"{m}/dice-whole" for m in TINY.modalities]
    assert "all/dice-whole" in select[1] and all(k in select[1] for k in singles)
    assert not any(k.startswith(("mean/", "worst/")) for k in select[1])  # those would mean all 2**M - 1 subsets
    for rnd, row in select.items():
        assert row["subset-mean/dice-whole"] == pytest.approx(
            (row["all/dice-whole"] + sum(row[k] for k in singles)) / (1 + len(singles)))
    assert "all/dice-whole" in unseen[2] and not any(k.startswith(("t1/", "ct/")) for k in unseen[2])  # full set only
    _, _, extra = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    chosen = max(select, key=lambda rnd: select[rnd]["subset-mean/dice-whole"])
    assert extra["metric"] == "subset-mean/dice-whole"
    from fedfusion.commands.simulate import _best_line  # what `fedfusion simulate` prints at the end

    assert f"(round {chosen}, subset-mean/dice-whole = " in str(_best_line(run_dir))
    assert "on the validation/ set" in str(_best_line(run_dir)) and _best_line(tmp_path) is None
    assert extra["selected_on"] == "validation" and extra["round"] == chosen
    report_md = __import__("simulations.report", fromlist=["build_report"]).build_report(run_dir)
    text = report_md.read_text()
    assert "chosen on the separate selection set" in text and "unseen scanner (`heldout-unseen/`)" in text
    assert (f"`checkpoints/best.pt`: round {chosen}, chosen on the selection set by `subset-mean/dice-whole` "
            "(averaged over the subsets `full+singles`)") in text

    # The classifier's operating point is chosen on the selection set and the reported numbers use it: the
    # threshold in last.pt is the balanced-accuracy optimum of the last model on validation/, not of heldout/.
    from common.evaluation import evaluate_model, load_heldout, load_model

    model, cfg, last = load_model(run_dir / "checkpoints" / "last.pt", "cpu")
    on_validation = evaluate_model(model, load_heldout(cfg, data / "validation"), subsets="full", hd95=False,
                                   device="cpu")
    assert on_validation.operating_threshold is not None
    assert last["threshold"] == pytest.approx(on_validation.operating_threshold)
    assert report[2]["all/threshold"] == pytest.approx(last["threshold"])
    assert unseen[2]["all/threshold"] == pytest.approx(last["threshold"])
    assert extra["threshold"] == pytest.approx(report[chosen]["all/threshold"])  # best.pt: its own round's


def test_without_a_selection_set_best_is_chosen_by_the_same_subset_mean_on_the_reporting_set(tmp_path: Path) -> None:
    """No validation/ set: best.pt is chosen on the reporting set, by the select-subsets mean, evaluated there
    again when this round's eval-subsets (here the full set only) lack a subset of it."""
    heldout = write_heldout(tmp_path / "heldout", TINY.modalities, n_cases=3)
    run_dir = tmp_path / "run"
    _run(run_dir, heldout, rounds=2, eval_every=1, **{"eval-subsets": "full"})
    _, _, extra = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert extra["metric"] == "subset-mean/dice-whole" and extra["selected_on"] == "heldout"
    records = list(iter_metrics(run_dir / "metrics.jsonl"))
    assert not any(r["phase"] == "server-select" for r in records)  # nothing is logged as a selection set
    assert "t1/dice-whole" not in {r["metric"] for r in records if r["round"] == 1 and r["phase"] == "server-eval"}
    # ... yet round 1 was scored by the subset mean (the first scored round is always a new best)
    assert "round 1: new best subset-mean/dice-whole" in (run_dir / "server.log").read_text()
    last = {r["metric"]: r["value"] for r in records if r["round"] == 2 and r["phase"] == "server-eval"}
    mean_2 = np.mean([last[f"{s}/dice-whole"] for s in ("t1+ct", "t1", "ct")])
    assert extra["value"] == pytest.approx(mean_2) if extra["round"] == 2 else extra["value"] > mean_2


def test_the_default_selection_prefers_the_model_that_works_without_modalities() -> None:
    """A round that gains on the full set but cannot segment from one modality alone does not become best.pt by
    the default best-metric (the demo's round 1 against round 5 before the default changed)."""
    from common.runconfig import load
    from server.checkpointing import BestTracker
    from server.evaluation import subset_mean

    names = ["t1+ct", "t1", "ct"]
    early = {"all/dice-whole": 0.76, "t1+ct/dice-whole": 0.76, "t1/dice-whole": 0.55, "ct/dice-whole": 0.01,
             "t1/cases": 12.0}
    late = {"all/dice-whole": 0.74, "t1+ct/dice-whole": 0.74, "t1/dice-whole": 0.54, "ct/dice-whole": 0.37,
            "t1/cases": 12.0}
    by_default, by_full_set = BestTracker(load()["best-metric"]), BestTracker("dice-whole")
    for rnd, flat in ((1, early), (2, late)):
        scored = {**flat, **subset_mean(flat, names)}
        by_default.update(rnd, scored)
        by_full_set.update(rnd, scored)
    assert (by_default.round, by_full_set.round) == (2, 1)
    assert by_default.value == pytest.approx((0.74 + 0.54 + 0.37) / 3)
    assert "subset-mean/cases" not in subset_mean(early, names)  # bookkeeping is not averaged
    assert subset_mean(early, ["t1", "t2"]) is None  # a subset that was not evaluated: no mean
