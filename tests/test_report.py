"""The run report (simulations/report.py): built from a synthetic run directory, with and without phases."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.modalities import MODALITIES, subset_name, subsets
from models.runlog import MetricsLog
from simulations.report import MONOTONICITY_TOLERANCE, build_report, leave_one_out, monotonicity_share
from tests.server_stubs import write_heldout
from common.runconfig import default_model_config, model_entries

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SITES = ("site-01", "site-02", "site-03")
ROUNDS = (0, 1, 2, 3)  # round 0 = the initial global model, as the server evaluates it before training
#: per-site modalities: site-02 lacks ultrasound and CT, site-03 lacks t1ce (missing modalities)
SITE_MODALITIES = {
    "site-01": MODALITIES,
    "site-02": ("t1", "t1ce", "t2", "flair"),
    "site-03": ("t1", "t2", "flair", "ct", "us"),
}


def _subset_metrics(rnd: int, rng: np.random.Generator) -> dict[str, float]:
    """Realistic server-eval flat metrics: every subset of the 6 modalities, Dice rising with rounds and with the
    informativeness of the modalities given, plus all / mean / worst and the monotonicity count."""
    info = dict(zip(MODALITIES, rng.uniform(0.1, 0.5, size=len(MODALITIES))))
    progress = 1.0 - math.exp(-0.8 * rnd)  # 0 at round 0, saturating
    flat: dict[str, float] = {}
    per_subset: dict[str, dict[str, float]] = {}
    for s in subsets(MODALITIES):
        strength = 1.0 - math.prod(1.0 - info[m] for m in s)
        vals: dict[str, float] = {}
        for region, scale in (("whole", 0.9), ("core", 0.7), ("enhancing", 0.6), ("oedema", 0.75)):
            d = float(np.clip(0.05 + scale * progress * strength + rng.normal(0, 0.01), 0, 1))
            vals[f"dice-{region}"] = d
            vals[f"iou-{region}"] = d / (2 - d)
            vals[f"precision-{region}"] = float(np.clip(d + rng.normal(0, 0.02), 0, 1))
            vals[f"hd95-{region}"] = float(20.0 * (1.0 - d) + 1.0)
        acc = float(np.clip(0.5 + 0.4 * progress * strength, 0, 1))
        vals.update(accuracy=acc, recall=acc - 0.02, specificity=acc + 0.01, f1=acc - 0.01, auroc=min(1.0, acc + 0.05))
        per_subset[subset_name(s)] = vals
    for name, vals in per_subset.items():
        flat.update({f"{name}/{k}": v for k, v in vals.items()})
    full = per_subset[subset_name(MODALITIES)]
    flat.update({f"all/{k}": v for k, v in full.items()})
    keys = list(full)
    flat.update({f"mean/{k}": float(np.mean([v[k] for v in per_subset.values()])) for k in keys})
    # worst = lowest, but highest for the lower-is-better HD95 (as models.evaluation does)
    flat.update({f"worst/{k}": float((max if k.startswith("hd95") else min)(v[k] for v in per_subset.values()))
                 for k in keys})
    violations, pairs = monotonicity_share(flat, MODALITIES)
    flat["monotonicity-violations"] = violations / pairs
    return flat


def make_run(run_dir: Path, *, seed: int = 0,
             site_modalities: dict[str, tuple[str, ...]] | None = None) -> dict[int, dict[str, float]]:
    """Write a synthetic run directory (config.json, metrics.jsonl, a tiny real checkpoint); return the
    server-eval metrics per round as written."""
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = default_model_config(family="attention", spatial_size=(8, 16, 16), channels=(4, 8))
    config = {
        "num-server-rounds": len(ROUNDS) - 1, "seed": seed, "local-epochs": 1, "lr": 0.01, "batch-size": 4,
        "proximal-mu": 0.0, "dp-enabled": True, "dp-target-epsilon": 8.0, "dp-delta": 1e-5,
        "dp-noise-multiplier": 0.0, "dp-max-grad-norm": 1.0, "strategy": "fedavg", "aggregation": "modality-aware",
        "data-dir": str(run_dir / "no-such-data"), "test-dir": "", "run-dir": str(run_dir), **model_entries(cfg),
    }
    (run_dir / "config.json").write_text(json.dumps(config, indent=1))
    log = MetricsLog(run_dir / "metrics.jsonl")
    evals: dict[int, dict[str, float]] = {}
    for rnd in ROUNDS:
        if rnd > 0:
            for i, site in enumerate(SITES):
                n = 8 + 2 * i
                metrics: dict[str, float] = {
                    "num-examples": n, "train-loss": 1.5 / rnd + 0.1 * i,
                    "epsilon-total": 2.0 * rnd + 0.3 * i, "epsilon-round": 2.0, "delta": 1e-5,
                }
                for m in MODALITIES:
                    has = m in (site_modalities or SITE_MODALITIES)[site]
                    metrics[f"has-{m}"] = float(has)
                    metrics[f"cases-{m}"] = n if has else 0
                log.write(rnd, "train", site, metrics)
                # the server's update validation: site-03's round-2 update is rejected
                accepted = 0.0 if (site, rnd) == ("site-03", 2) else 1.0
                log.write(rnd, "validation", site, {"accepted": accepted, "update-norm": 1.0 + i})
                log.write(rnd, "site-eval", site, {"num-examples": n, "dice-whole": 0.2 * rnd / 3, "accuracy": 0.6})
            log.write(rnd, "site-eval", "global", {"dice-whole": 0.2 * rnd / 3, "accuracy": 0.6})
            log.write(rnd, "train", "global", {"train-loss": 1.5 / rnd, "sites-accepted": 3.0 - (rnd == 2)})
        evals[rnd] = _subset_metrics(rnd, rng)
        log.write(rnd, "server-eval", "global", evals[rnd])
    from models.checkpoint import save_checkpoint
    from models.network import build_model

    state = build_model(cfg).state_dict()
    save_checkpoint(run_dir / "checkpoints" / "last.pt", state, cfg, round=ROUNDS[-1])
    save_checkpoint(run_dir / "checkpoints" / "best.pt", state, cfg, round=ROUNDS[-1])
    return evals


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict[str, float]]]:
    run_dir = tmp_path_factory.mktemp("run") / "run"
    evals = make_run(run_dir)
    return run_dir, evals


@pytest.fixture(scope="module")
def built_report(synthetic_run: tuple[Path, dict[int, dict[str, float]]]) -> tuple[Path, str]:
    run_dir, _ = synthetic_run
    path = build_report(run_dir, device="cpu")
    return path, path.read_text(encoding="utf-8")


def _assert_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    assert path.stat().st_size > 5_000, f"{path} is suspiciously small"
    with Image.open(path) as img:
        img.load()
        assert img.width >= 300 and img.height >= 200
        # not a blank canvas: the figure has drawn content in several colours
        assert len(img.convert("RGB").getcolors(maxcolors=1_000_000) or []) > 10


def test_report_has_every_section_and_figure(built_report: tuple[Path, str]) -> None:
    path, text = built_report
    assert path == path.parent / "report.md"
    for heading in (
        "## Run", "## Final numbers", "## Global Dice per round (paper Fig. 2)",
        "## Per-modality-subset evaluation", "## The paper's Table I / Table II",
        "## Modality contribution to the fused prediction (paper Fig. 3)",
        "## Classifier sensitivity / ROC over decision thresholds (paper Fig. 4)",
        "## Privacy spent per site per round", "## Sites",
    ):
        assert heading in text, heading
    assert "could not be built" not in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    for name in ("global_dice.png", "contribution_leave_one_out.png", "privacy.png", "subset_dice.png"):
        assert f"figures/{name}" in links, name
    for link in links:
        _assert_png(path.parent / link)
    # header: config summary and the trend line
    assert "fusion family: **attention**" in text
    assert "target ε = 8.000" in text
    assert "**rose** over the rounds" in text
    # without data the checkpoint-based parts say why they are missing instead of failing
    assert "held-out set not found" in text


def test_header_lists_the_single_modality_dice_that_moved(synthetic_run, built_report: tuple[Path, str]) -> None:
    """What the sites taught beyond the start shows per modality (an MRI-only public start cannot segment from
    CT alone; the demo's sites teach it), and only where it moved by more than 0.05."""
    _, evals = synthetic_run
    _, text = built_report
    line = next(x for x in text.splitlines() if x.startswith("- Dice (whole lesion) from one modality alone"))
    first, last = min(evals), max(evals)
    moved = 0
    for m in MODALITIES:
        a, b = evals[first][f"{m}/dice-whole"], evals[last][f"{m}/dice-whole"]
        assert (f"{m} {a:.3f} → {b:.3f}" in line) == (abs(b - a) > 0.05), m
        moved += abs(b - a) > 0.05
    assert moved >= 2


def test_the_all_modality_line_says_when_no_site_holds_every_modality(built_report: tuple[Path, str],
                                                                    tmp_path: Path) -> None:
    """The demo's sites hold MRI, T1 + CT and T2 + ultrasound: the all-modality Dice is the network's answer on an
    input no site trains on, and the report says so beside its trend (not when a site holds them all)."""
    _, text = built_report  # site-01 holds all six
    line = next(x for x in text.splitlines() if x.startswith("- global Dice (all modalities"))
    assert "no site holds" not in line
    demo = {"site-01": ("t1", "t1ce", "t2", "flair"), "site-02": ("t1", "ct"), "site-03": ("t2", "us")}
    make_run(tmp_path / "run", site_modalities=demo)
    text = build_report(tmp_path / "run", device="cpu").read_text(encoding="utf-8")
    line = next(x for x in text.splitlines() if x.startswith("- global Dice (all modalities"))
    assert ("no site holds all 6 modalities (the sites report t1+ct (1 site), t1+t1ce+t2+flair (1 site), t2+us "
            "(1 site)), so no site trains on this input") in line


def test_subset_table_lists_all_63_subsets_and_summary_rows(
    synthetic_run: tuple[Path, dict[int, dict[str, float]]], built_report: tuple[Path, str]
) -> None:
    _, evals = synthetic_run
    _, text = built_report
    section = text.split("## Per-modality-subset evaluation", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| subset")]
    names = [r.split("|")[1].strip() for r in rows]
    assert len(names) == 63 + 3
    assert names[-3:] == ["**all**", "**mean**", "**worst**"]
    final = evals[ROUNDS[-1]]
    first = rows[0].split("|")
    assert first[1].strip() == "t1"
    assert first[2].strip() == f"{final['t1/dice-whole']:.3f}"
    violations, pairs = monotonicity_share(final, MODALITIES)
    assert pairs == sum(len(MODALITIES) - len(s) for s in subsets(MODALITIES) if len(s) < len(MODALITIES))
    assert f"in {violations} of {pairs} subset pairs" in section


def test_paper_tables_rows(built_report: tuple[Path, str], synthetic_run) -> None:
    _, evals = synthetic_run
    _, text = built_report
    section = text.split("## The paper's Table I / Table II", 1)[1].split("\n## ", 1)[0]
    table1 = section.split("**Table I", 1)[1].split("**Table II", 1)[0]
    names = [line.split("|")[1].strip() for line in table1.splitlines() if line.startswith("| ")][1:]
    assert names == [*MODALITIES, "t1+t1ce+t2+flair", "all"]
    final = evals[ROUNDS[-1]]
    all_row = [line for line in table1.splitlines() if line.startswith("| all ")][0]
    assert f"{final['all/iou-whole']:.3f}" in all_row


def test_contribution_fallback_equals_leave_one_out(synthetic_run, built_report: tuple[Path, str]) -> None:
    _, evals = synthetic_run
    _, text = built_report
    final = evals[ROUNDS[-1]]
    contribution = leave_one_out(final, MODALITIES, "dice-whole")
    for m in MODALITIES:
        rest = subset_name([x for x in MODALITIES if x != m])
        expected = final["all/dice-whole"] - final[f"{rest}/dice-whole"]
        assert contribution[m] == pytest.approx(expected, abs=1e-12)
    section = text.split("(paper Fig. 3)", 1)[1].split("\n## ", 1)[0]
    for m in MODALITIES:
        row = [line for line in section.splitlines() if line.startswith(f"| {m} |")][0]
        cells = [c.strip() for c in row.split("|")[2:5]]
        rest = subset_name([x for x in MODALITIES if x != m])
        for cell, region in zip(cells, ("whole", "core", "enhancing")):
            assert cell == f"{final[f'all/dice-{region}'] - final[f'{rest}/dice-{region}']:.3f}"


def test_leave_one_out_single_modality_and_missing_subset() -> None:
    assert leave_one_out({"all/dice-whole": 0.5, "t1/dice-whole": 0.5}, ["t1"]) == {"t1": None}
    flat = {"all/dice-whole": 0.8, "t2/dice-whole": 0.6}  # t1 alone never evaluated
    assert leave_one_out(flat, ["t1", "t2"]) == {"t1": pytest.approx(0.2), "t2": None}


def test_privacy_table_has_every_site_and_round(built_report: tuple[Path, str]) -> None:
    _, text = built_report
    section = text.split("## Privacy spent per site per round", 1)[1].split("\n## ", 1)[0]
    for i, site in enumerate(SITES):
        row = [line for line in section.splitlines() if line.startswith(f"| {site} |")][0]
        values = [c.strip() for c in row.split("|")[2:-2]]
        assert values == [f"{2.0 * r + 0.3 * i:.2f}" for r in ROUNDS[1:]]


def test_sites_table_counts_and_rejections(built_report: tuple[Path, str]) -> None:
    _, text = built_report
    section = text.split("## Sites", 1)[1]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in section.split("Site-local evaluation")[0].splitlines() if line.startswith("| site-")}
    assert sorted(rows) == list(SITES)  # the "global" train scope is the server's summary, not a site
    for i, site in enumerate(SITES):
        assert rows[site][1] == str(8 + 2 * i)
        assert rows[site][3] == ", ".join(SITE_MODALITIES[site])
    assert rows["site-03"][5] == "2" and rows["site-01"][5] == "—"


@pytest.mark.parametrize(
    "keep",
    [
        pytest.param(set(), id="no-metrics"),
        pytest.param({"train"}, id="train-only"),
        pytest.param({"server-eval"}, id="server-eval-only"),
        pytest.param({"site-eval", "train"}, id="no-server-eval"),
    ],
)
def test_report_survives_missing_phases(
    synthetic_run: tuple[Path, dict[int, dict[str, float]]], tmp_path: Path, keep: set[str]
) -> None:
    src, _ = synthetic_run
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(src / "config.json", run / "config.json")
    lines = (src / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["phase"] in keep]
    if kept:
        (run / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    text = build_report(run, device="cpu").read_text()
    assert "could not be built" not in text
    assert "## Global Dice per round" in text and "## Privacy spent per site per round" in text
    if "server-eval" not in keep:
        assert "Server evaluation: not recorded in this run" in text
        assert "Leave-one-out from the logged per-subset metrics: not recorded in this run" in text
    else:
        assert (run / "figures" / "contribution_leave_one_out.png").is_file()
    if "train" not in keep:
        assert "Privacy accounting (epsilon-total per site): not recorded in this run" in text
        assert "Site training: not recorded in this run" in text
    else:
        _assert_png(run / "figures" / "privacy.png")
    assert "no checkpoint in checkpoints/" in text


def test_privacy_section_says_when_dp_is_off(synthetic_run, tmp_path: Path) -> None:
    """Sites without DP report epsilon 0; the report must not draw that as a privacy curve."""
    src, _ = synthetic_run
    run = tmp_path / "run"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("figures", "report.md", "checkpoints"))
    config = json.loads((run / "config.json").read_text())
    config["dp-enabled"] = False
    (run / "config.json").write_text(json.dumps(config))
    text = build_report(run, device="cpu").read_text()
    assert "Differential privacy was off in this run" in text
    assert "differential privacy (patient level): off" in text
    assert not (run / "figures" / "privacy.png").exists()


def test_privacy_section_states_which_sites_drew_reproducible_noise(synthetic_run, tmp_path: Path) -> None:
    """A site whose own policy made its noise reproducible (experiments) gives no guarantee against the server:
    the report says so, and says where the noise came from otherwise."""
    src, _ = synthetic_run
    for name, flagged in (("secure", ()), ("repro", ("site-02",))):
        run = tmp_path / name
        shutil.copytree(src, run, ignore=shutil.ignore_patterns("figures", "report.md", "checkpoints"))
        log = MetricsLog(run / "metrics.jsonl")
        for site in SITES:
            log.write(1, "train", site, {"dp-reproducible-noise": 1.0 if site in flagged else 0.0})
        section = build_report(run, device="cpu").read_text().split("## Privacy spent per site per round", 1)[1]
        section = section.split("\n## ", 1)[0]
        if flagged:
            assert "**Reproducible DP noise** at site-02:" in section and "not** a guarantee" in section
        else:
            assert "drawn by every site from its operating system's CSPRNG" in section
            assert "Reproducible" not in section


def test_privacy_section_shows_the_planners_prediction_for_each_phantom_site(synthetic_run, tmp_path: Path) -> None:
    """On a phantom data root the report puts `privacy-plan`'s verdict for the run's settings beside the curves,
    computed by the planner itself; a broken manifest costs that part only."""
    from client.privacy.planner import plan

    src, _ = synthetic_run
    run, data = tmp_path / "run", tmp_path / "data"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("figures", "report.md", "checkpoints"))
    config = json.loads((run / "config.json").read_text())
    config["data-dir"] = str(data)
    (run / "config.json").write_text(json.dumps(config))
    data.mkdir()
    sites = {s: {"cases": 12 + 8 * i, "modalities": sorted(SITE_MODALITIES[s])} for i, s in enumerate(SITES)}
    (data / "phantoms.json").write_text(json.dumps({"sites": sites}))
    section = build_report(run, device="cpu").read_text().split("### What the privacy planner predicted", 1)[1]
    for name, site in sites.items():
        p = plan(config, patients=site["cases"], sites=len(sites), site_modalities=site["modalities"])
        assert f"| {name} | {site['cases']} | {','.join(site['modalities'])} |" in section
        assert f"| {p.run_ratio:.2f} | {p.verdict} |" in section
    assert "the run starts from the seed (from scratch)" in section and "3.7" in section
    # an MRI-only public start with the CT and US encoders trained privately: planned per site
    from models.checkpoint import save_checkpoint
    from models.network import build_model
    from common.runconfig import model_config

    mri = tmp_path / "mri.pt"
    cfg = model_config(config)
    save_checkpoint(mri, build_model(cfg).state_dict(), cfg,
                    provenance={"kind": "fedfusion-pretrain", "mode": "supervised", "modalities": "t1,t1ce,t2,flair"})
    (run / "config.json").write_text(json.dumps({**config, "init-checkpoint": str(mri), "dp-trainable": "head+ct+us"}))
    section = build_report(run, device="cpu").read_text().split("### What the privacy planner predicted", 1)[1]
    section = section.split("\n#", 1)[0]
    assert "the start differs by site (column start)" in section
    rows = {line.split(" | ")[0].strip("| "): line for line in section.splitlines() if line.startswith("| site-")}
    assert "had no ct,us" in rows["site-01"] and "planned as from scratch" in rows["site-01"]
    assert rows["site-02"].endswith("| a trained checkpoint (init-checkpoint) |")  # MRI only: nothing untrained
    assert "planned as from scratch" in rows["site-03"]
    (data / "phantoms.json").write_text("{not json")
    text = build_report(run, device="cpu").read_text()
    assert "What the privacy planner predicts for this run: not computed" in text
    assert "## Privacy spent per site per round" in text and "privacy.png" in text


def test_report_of_an_empty_run_directory(tmp_path: Path) -> None:
    text = build_report(tmp_path, device="cpu").read_text()
    assert "config.json is missing" in text
    assert "metrics.jsonl is missing" in text
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_report(tmp_path / "nope")


def test_null_values_and_torn_last_line(synthetic_run, tmp_path: Path) -> None:
    """Non-finite metrics are logged as null and a crash can leave a torn line: both are shown, not fatal."""
    src, _ = synthetic_run
    run = tmp_path / "run"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("figures", "report.md", "checkpoints"))
    log = MetricsLog(run / "metrics.jsonl")
    log.write(ROUNDS[-1] + 1, "server-eval", "global", {"all/dice-whole": 0.9, "all/hd95-whole": float("inf")})
    for site in SITES:
        log.write(ROUNDS[-1] + 1, "train", site, {"epsilon-total": float("inf")})
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 9, "phase": "ser')
    text = build_report(run, device="cpu").read_text()
    assert "could not be built" not in text
    assert f"round {ROUNDS[-1] + 1}" in text


def test_monotonicity_matches_models_evaluation(synthetic_run) -> None:
    """The report's log-only monotonicity count follows the rule of models.evaluation.monotonicity."""
    from models import evaluation
    _, evals = synthetic_run
    assert MONOTONICITY_TOLERANCE == evaluation.MONOTONICITY_TOLERANCE
    for flat in evals.values():
        score = {tuple(s): flat[f"{subset_name(s)}/dice-whole"] for s in subsets(MODALITIES)}
        assert monotonicity_share(flat, MODALITIES) == evaluation.monotonicity(score, MODALITIES)
    # a hand-made violation: adding t2 to t1 lowers Dice by 0.1
    assert monotonicity_share({"t1/dice-whole": 0.5, "t1+t2/dice-whole": 0.4, "t2/dice-whole": 0.3},
                              ["t1", "t2"]) == (1, 2)


def test_cli_report_command(synthetic_run, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedfusion.cli import app

    src, _ = synthetic_run
    run = tmp_path / "run"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("figures", "report.md"))
    result = CliRunner().invoke(app, ["report", str(run), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (run / "report.md").is_file() and (run / "figures" / "global_dice.png").is_file()
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "absent")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_report_with_data_draws_roc_and_checkpoint_contribution(synthetic_run, tmp_path: Path) -> None:
    import torch

    torch.set_num_threads(1)
    src, _ = synthetic_run
    run = tmp_path / "run"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("figures", "report.md"))
    cfg = default_model_config(family="attention", spatial_size=(8, 16, 16), channels=(4, 8))
    data = tmp_path / "data"
    write_heldout(data / "heldout", cfg.modalities, n_cases=6, shape=cfg.spatial_size, seed=1)
    text = build_report(run, data_dir=data, device="cpu").read_text()
    section = text.split("(paper Fig. 4)", 1)[1].split("\n## ", 1)[0]
    assert "figures/roc.png" in section, section
    _assert_png(run / "figures" / "roc.png")
    contribution = text.split("(paper Fig. 3)", 1)[1].split("\n## ", 1)[0]
    assert "figures/contribution_checkpoint.png" in contribution, contribution
    _assert_png(run / "figures" / "contribution_checkpoint.png")
