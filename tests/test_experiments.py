"""Experiments' building blocks: registry, CLI, marked sections, missing-modality phantoms, log parsers, and the
shared evaluator on a tiny checkpoint. (A whole experiment, even at the ``tiny`` budget, starts Ray several times
and takes over a minute on 2 cores; it is run by hand: ``fedfusion experiment fusion --budget tiny``.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulations import experiments
from simulations.experiments.common import BUDGETS, budget_of, markdown_table, section_name, site_train_summary
from simulations.mdsections import markers, read_section, write_section
from common.runconfig import default_model_config


# ------------------------------------------------------------------------------------------------- registry
def test_registry_names_modules_and_grids() -> None:
    assert set(experiments.EXPERIMENTS) == {"fusion", "missing", "planner", "privacy", "settings"}
    for name in experiments.EXPERIMENTS:
        mod = experiments.get(name)
        assert mod.NAME == name and callable(mod.run) and mod.TITLE
        if hasattr(mod, "GRID"):  # every budget has a grid
            assert set(mod.GRID) == set(BUDGETS)
    with pytest.raises(ValueError, match="unknown experiment 'nope'; choose one of fusion"):
        experiments.get("nope")
    with pytest.raises(ValueError, match="unknown budget"):
        budget_of("huge")
    assert budget_of(" Small ").name == "small"


def test_planner_experiment_counts_agreement_of_both_rule_versions() -> None:
    from client.privacy.planner import LEARNS_IF_RUN_RATIO_AT_MOST, verdict
    from client.privacy.policy import SitePolicy
    from simulations.experiments.common import Outcome
    from simulations.experiments.planner import GRID, render

    def out(dice: float, seed: int = 0) -> list[Outcome]:
        return [Outcome("r", {"all/mean-region-dice": dice, "noise-multiplier": 1.0, "epsilon-spent": 8.0}, 1.0, "",
                        seed=seed)]

    # the standard cells were chosen on each side of version 2's threshold, where version 1 says "will not learn"
    # ... within what a fresh site's policy accepts (a cell above it is refused by every site)
    assert {n for n, _, s in GRID["standard"] if s == "scratch"} == {48, 80, 96}
    assert {s for *_, s in GRID["standard"]} == {"scratch", "masked"}
    assert all(eps <= SitePolicy().max_epsilon for cells in GRID.values() for _, eps, _ in cells)
    inf = float("inf")
    results = {(48, inf, "scratch"): out(0.6), (48, 30.0, "scratch"): out(0.4), (48, 5.0, "scratch"): out(0.2),
               (96, inf, "scratch"): out(0.6), (96, 8.0, "scratch"): out(0.1)}
    plans = {(48, 30.0, "scratch"): (2.1, verdict(2.1)), (48, 5.0, "scratch"): (6.2, verdict(6.2)),
             (96, 8.0, "scratch"): (2.2, verdict(2.2))}
    assert 2.1 <= LEARNS_IF_RUN_RATIO_AT_MOST < 6.2
    text = render(results, plans)
    # measured: 0.67 learns (v2 yes, v1 no), 0.33 does not (both yes), 0.17 does not (v2 no, v1 yes)
    assert "agrees with the measurement in 2 of 3 cells" in text and "version 1 (r_run ≤ 1) in 2 of 3" in text
    assert "| 48 | scratch | 30 |" in text
    assert "| 0.67 | 2.10 | learns | will not learn | learns | yes | no |" in text
    # a cell no site trained (the sites' policy refused it) is not a measurement
    results[(96, 2.0, "scratch")] = [Outcome("r", {"all/mean-region-dice": 0.05}, 1.0, "")]
    plans[(96, 2.0, "scratch")] = (6.0, verdict(6.0))
    text = render(results, plans)
    assert "no site trained" in text and "in 2 of 3 cells" in text
    # a self-supervised cell is measured against the non-private run from the same start, not the scratch one
    results |= {(48, inf, "masked"): out(0.2), (48, 5.0, "masked"): out(0.15)}
    plans[(48, 5.0, "masked")] = (1.8, verdict(1.8))
    text = render(results, plans)
    assert "| 48 | self-supervised | 5 | 1 |" in text and "| 0.75 | 1.80 | learns |" in text and "in 3 of 4 cells" in text
    # a cell on several seeds is judged on the mean of its per-seed ratios, and says when the seeds split
    results |= {(48, 1.0, "masked"): out(0.08) + out(0.13, seed=1), (48, inf, "masked"): out(0.2) + out(0.2, seed=1)}
    plans[(48, 1.0, "masked")] = (6.7, verdict(6.7))
    text = render(results, plans)
    assert "| 48 | self-supervised | 1 | 2 |" in text and "| 0.53 ± 0.18 | 6.70 | will not learn |" in text
    assert "learns (seeds split: 1 of 2 learn) | no |" in text and "0.40 (seed 0), 0.65 (seed 1)" in text


def test_missing_grid_has_the_target_fractions_and_both_aggregations() -> None:
    from simulations.experiments.missing import AGGREGATIONS, GRID, HEADLINE, TARGETS

    for name in ("small", "standard"):
        fractions, sites = GRID[name]
        assert set(HEADLINE) <= set(fractions) and max(fractions) == 0.75 and sites >= 4
    assert set(AGGREGATIONS) == {"plain", "modality-aware"} and set(TARGETS) <= set(HEADLINE)


def test_missing_findings_compare_aggregations_within_a_variant_and_fedprox_against_none() -> None:
    from simulations.experiments.common import Outcome
    from simulations.experiments.missing import PROXIMAL_MU, PROXIMAL_SCOPE, VARIANTS, findings

    suffix, keys, headline_only = VARIANTS["encoder FedProx"]
    assert keys == {"proximal-mu": PROXIMAL_MU, "proximal-scope": PROXIMAL_SCOPE} and PROXIMAL_MU > 0
    assert PROXIMAL_SCOPE == "encoders" and headline_only and suffix

    def rows(values: list[float], drift: float, auroc: float = 0.8) -> list[Outcome]:
        return [Outcome("x", {"all/mean-region-dice": v, "all/auroc": auroc, "all/accuracy": auroc - 0.1,
                              "encoder-drift": drift}, 1.0, "", seed) for seed, v in enumerate(values)]

    results = {
        (0.5, "plain", ""): rows([0.70, 0.72, 0.71], 0.3),
        (0.5, "modality-aware", ""): rows([0.69, 0.70, 0.70], 0.6),
        (0.5, "plain", "encoder FedProx"): rows([0.73, 0.74, 0.74], 0.2),
        (0.5, "modality-aware", "encoder FedProx"): rows([0.75, 0.76, 0.75], 0.2, auroc=0.78),
    }
    text = "\n".join(findings((0.5,), results))
    mu = f"μ = {PROXIMAL_MU:g}"
    # without the proximal term: -0.013 against the +0.03 target; with it for both rows: +0.017, missed
    assert "50% missing: modality-aware minus plain mean-region Dice -0.013" in text
    assert "missed by 0.043" in text
    assert f"50% missing (both with encoder FedProx, {mu}): modality-aware minus plain mean-region Dice 0.017" in text
    assert "missed by 0.013" in text
    # the method against the baseline: modality-aware with the term minus plain without it, +0.043: met
    assert (f"50% missing: modality-aware with encoder FedProx ({mu}) minus plain FedAvg without it: "
            "mean-region Dice 0.043") in text
    assert "target ≥ +0.03: met; AUROC -0.020 ± 0.000" in text and "accuracy -0.020 ± 0.000" in text
    assert f"50% missing, modality-aware: encoder FedProx ({mu}) minus none: mean-region Dice 0.057" in text
    assert "AUROC -0.020 ± 0.000" in text and "encoder drift 0.60 → 0.20" in text


def test_every_row_takes_the_same_optimizer_steps() -> None:
    """Federated (summed over sites), pooled and local-only rows of a budget take the same steps, not epochs."""
    from simulations.experiments.common import equal_step_epochs, federated_steps

    b = BUDGETS["standard"]
    sites = [b.cases_per_site] * b.sites
    steps = federated_steps(b, sites)
    assert steps >= 500  # the powered budget's pooled reference
    pooled = equal_step_epochs(steps, sum(sites), b.batch_size)
    local = equal_step_epochs(steps, sites[0], b.batch_size)
    assert pooled * -(-sum(sites) // b.batch_size) == steps == local * -(-sites[0] // b.batch_size)
    assert local == b.sites * pooled


def test_rows_over_seeds_mean_sd_and_paired_differences() -> None:
    from simulations.experiments.common import Outcome
    from simulations.experiments.stats import against, cell, paired, summarise, verdict

    def rows(values: list[float]) -> list[Outcome]:
        return [Outcome("r", {"m": v}, 0.0, "", seed) for seed, v in enumerate(values)]

    a, b = rows([0.80, 0.82, 0.84]), rows([0.70, 0.71, 0.75])
    s = summarise(a, "m")
    assert s.n == 3 and abs(s.mean - 0.82) < 1e-12 and abs(s.sd - 0.02) < 1e-12 and cell(s) == "0.820 ± 0.020"
    d = paired(a, b, "m")
    assert d.n == 3 and abs(d.mean - 0.1) < 1e-12
    assert verdict(d) == "better" and verdict(d, margin=0.05) == "better" and verdict(d, margin=0.2) == "worse"
    noisy = paired(rows([0.8, 0.6, 0.9]), rows([0.7, 0.7, 0.7]), "m")  # +0.1, -0.1, +0.2
    assert verdict(noisy) == "tie" and "within two standard errors" in against(noisy)
    assert paired(a, rows([0.5]), "m").n == 1 and cell(summarise(rows([0.5]), "m")) == "0.500"
    one = paired(a, rows([0.5]), "m")  # a single seed has no noise estimate: never called better or worse
    assert verdict(one) == "one seed" and "not tested" in against(one)
    assert summarise([Outcome("r", {}, 0.0, "")], "m").n == 0 and verdict(paired([], b, "m")) == "n/a"


def test_cli_lists_experiment_and_rejects_unknown_names() -> None:
    from typer.testing import CliRunner

    from fedfusion.cli import app

    runner = CliRunner()
    assert "--budget" in runner.invoke(app, ["experiment", "--help"]).output
    bad = runner.invoke(app, ["experiment", "nope", "--budget", "tiny"])
    assert bad.exit_code != 0 and "unknown experiment" in bad.output
    bad = runner.invoke(app, ["experiment", "fusion", "--budget", "huge"])
    assert bad.exit_code != 0 and "unknown budget" in bad.output


# ------------------------------------------------------------------------------------------- marked sections
def test_write_section_replaces_only_its_own_section(tmp_path: Path) -> None:
    path = tmp_path / "results.md"
    write_section(path, "paper-tables", "paper table v1")
    write_section(path, section_name("fusion"), "## fusion\n\nrow A", heading="<!-- heading kept -->")
    text = path.read_text()
    assert text.startswith("# fedfusion results\n") and "<!-- heading kept -->" in text
    assert text.index(markers("paper-tables")[0]) < text.index(markers("experiment-fusion")[0])
    path.write_text(text + "\nhand-written notes stay\n")

    write_section(path, "experiment-fusion", "## fusion\n\nrow B")
    text = path.read_text()
    assert read_section(path, "experiment-fusion") == "## fusion\n\nrow B" and "row A" not in text
    assert read_section(path, "paper-tables") == "paper table v1"
    assert "hand-written notes stay" in text and text.count("<!-- heading kept -->") == 1
    # A body that already carries its markers (bench/paper_tables.py style) is not double-marked.
    start, end = markers("paper-tables")
    write_section(path, "paper-tables", f"{start}\npaper table v2\n{end}\n")
    assert path.read_text().count(start) == 1 and read_section(path, "paper-tables") == "paper table v2"
    assert read_section(path, "experiment-missing") is None
    with pytest.raises(ValueError, match="section name"):
        markers("Bad Name")


def test_markdown_table_shape() -> None:
    table = markdown_table(["a", "b"], [["x", "1.000"]]).splitlines()
    assert table == ["| a | b |", "| --- | ---: |", "| x | 1.000 |"]


# ------------------------------------------------------------------------------------ missing-modality phantoms
@pytest.mark.parametrize("n_sites", [3, 4])
def test_missing_fraction_is_realised_per_site_and_covers_modalities(n_sites: int) -> None:
    from models.modalities import MODALITIES
    from simulations.scenarios import site_profiles

    for fraction in (0.0, 0.25, 0.5, 0.75):
        sites = site_profiles("iid", n_sites, 5, seed=1, missing_fraction=fraction)
        kept = [len(s.modalities) for s in sites]
        realised = 1 - sum(kept) / (len(MODALITIES) * n_sites)
        assert abs(realised - fraction) <= 0.5 / n_sites + 1e-9  # rounding of N*M*(1-f) slots only
        assert max(kept) - min(kept) <= 1 and min(kept) >= 1
        assert all(s.missing_rate == 0.0 for s in sites)
        covered = set().union(*(s.modalities for s in sites))
        assert len(covered) == min(len(MODALITIES), sum(kept))
    assert [s.modalities for s in site_profiles("iid", 4, 5, missing_fraction=0.75)] == [
        ("t1", "t1ce"), ("t2", "flair"), ("ct",), ("us",)]
    with pytest.raises(ValueError, match="missing fraction"):
        site_profiles("iid", 3, 5, missing_fraction=1.0)


def test_site_train_summary_reads_last_round_privacy(tmp_path: Path) -> None:
    recs = []
    for rnd, eps in ((1, 2.0), (2, 4.0)):
        for site, extra in (("site-1", 0.0), ("site-2", 0.5)):
            for metric, value in (("num-examples", 10.0), ("epsilon-total", eps + extra),
                                  ("noise-multiplier", 1.5), ("train-seconds", 2.0)):
                recs.append({"round": rnd, "phase": "train", "scope": site, "metric": metric, "value": value})
    recs.append({"round": 2, "phase": "train", "scope": "site-3", "metric": "declined", "value": 1.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    s = site_train_summary(tmp_path)
    assert s["epsilon-spent"] == 4.5 and s["noise-multiplier"] == 1.5 and s["sites-trained-last-round"] == 2
    assert s["site-train-seconds"] == 8.0 and s["last-round"] == 2


# --------------------------------------------------------------------------------------------- shared evaluator
def test_evaluate_checkpoint_reports_full_single_subset_and_unseen_rows(tmp_path: Path) -> None:
    import torch

    torch.set_num_threads(1)
    from models.checkpoint import save_checkpoint
    from models.network import build_model
    from simulations.experiments.common import evaluate_checkpoint
    from simulations.phantom_writers import generate

    generate(tmp_path / "data", sites=1, cases_per_site=1, seed=0, scenario="iid", shape=(8, 16, 16), fmt="nifti",
             heldout_cases=2)
    cfg = default_model_config(family="attention", modalities=("t1", "ct"), spatial_dims=3, spatial_size=(8, 16, 16),
                      channels=(4, 8), attention_heads=2)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "last.pt", build_model(cfg).state_dict(), cfg, round=1)
    m = evaluate_checkpoint(tmp_path / "last.pt", tmp_path / "data", batch_size=2, device="cpu", subsets="all")
    assert m["held-out-cases"] == 2
    for key in ("all/dice-whole", "all/accuracy", "t1/dice-whole", "ct/dice-whole", "all/mean-region-dice",
                "subsets-mean/mean-region-dice", "unseen/dice-whole", "unseen/mean-region-dice"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["all/mean-region-dice"] == pytest.approx((m["all/dice-whole"] + m["all/dice-core"]
                                                       + m["all/dice-enhancing"]) / 3)
    assert m["single-mean/dice-whole"] == pytest.approx((m["t1/dice-whole"] + m["ct/dice-whole"]) / 2)
    assert m["single-worst/dice-whole"] == min(m["t1/dice-whole"], m["ct/dice-whole"])
    # the operating point comes from the selection cohort, never from the reporting set
    from common.evaluation import evaluate_checkpoint as evaluate_at
    from common.evaluation import selection_threshold

    chosen, _ = selection_threshold(tmp_path / "last.pt", tmp_path / "data" / "validation", device="cpu")
    assert m["all/threshold"] == chosen
    at = evaluate_at(tmp_path / "last.pt", tmp_path / "data" / "heldout", subsets="full", hd95=False, device="cpu",
                     threshold=chosen).report.rows["all"]
    assert m["all/balanced-accuracy"] == at["balanced-accuracy"] and m["all/accuracy"] == at["accuracy"]
    import shutil

    shutil.rmtree(tmp_path / "data" / "validation")
    plain = evaluate_checkpoint(tmp_path / "last.pt", tmp_path / "data", batch_size=2, device="cpu")
    assert plain["all/threshold"] == 0.5


# ---------------------------------------------------------------------- small DP sites (found by bench/scale.py)
def test_poisson_loader_builds_an_empty_first_batch_of_dict_items() -> None:
    """50 sites x 4 cases: ~6 % of sites drew an empty first Poisson batch and Opacus failed on dict items."""
    import torch
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader, Dataset

    from client.privacy.engine import seed_empty_batch_template

    class Cases(Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"image": torch.ones(2, 4, 4), "label": torch.tensor(1)}

    loader = DPDataLoader.from_data_loader(DataLoader(Cases(), batch_size=2),
                                           generator=torch.Generator().manual_seed(0))
    loader.batch_sampler.sample_rate = 1e-12  # every Poisson batch is empty
    seed_empty_batch_template(loader)
    batch = next(iter(loader))
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (0, 2, 4, 4) and batch["label"].dtype == torch.int64


def test_seeds_override_is_checked_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        experiments.run("settings", budget="tiny", seeds=0, work=tmp_path, write=False)
    assert not any(tmp_path.iterdir())  # nothing generated or trained


def test_cached_rows_are_keyed_by_the_resolved_run_config(tmp_path: Path) -> None:
    """A row cached under one pyproject default is not served once the default changes (the key resolves the
    overrides against pyproject.toml), while naming the default explicitly is the same row."""
    from common.runconfig import PROJECT_DIR, defaults
    from simulations.experiments.common import federated_key

    data = tmp_path / "phantoms"
    assert federated_key(data, "full", {}) == federated_key(data, "full", {"lr": defaults()["lr"]})
    assert federated_key(data, "full", {}) != federated_key(data, "full", {"lr": 0.5})
    other = tmp_path / "project"
    other.mkdir()
    text = (PROJECT_DIR / "pyproject.toml").read_text(encoding="utf-8")
    line = next(ln for ln in text.splitlines() if ln.startswith("optimizer-state ="))
    flipped = "keep" if '"reset"' in line else "reset"
    (other / "pyproject.toml").write_text(text.replace(line, f'optimizer-state = "{flipped}"'), encoding="utf-8")
    assert federated_key(data, "full", {}, other) != federated_key(data, "full", {})
