"""Shared machinery of the experiments: budgets, phantom data, federated / centralized runs, one evaluator, tables.

Every experiment row is evaluated the same way, whatever trained it (federation, one site alone, pooled data):
the final model (``checkpoints/last.pt``) on the phantom held-out set (every modality for every case), once with
all of the model's modalities and once with each single modality (:func:`evaluate_checkpoint`, no HD95). The
federated runs therefore switch the server's own per-round held-out evaluation off (run config ``test-dir`` points
at a folder that does not exist; the server logs that and goes on): it would evaluate all 63 modality subsets with
HD95 after the last round, which costs more than the training at these sizes and is not what the tables show.

Virtual sites get a privacy policy (``RUN/site-state/SITE/privacy-policy.toml``) that admits the experiment's
settings: non-private runs (``allow-no-dp``; needed for the epsilon = inf row and the non-DP comparisons) and any
noise multiplier (``min-noise-multiplier = 0``, so large-epsilon rows are not declined), and DP noise drawn
reproducibly from the run's seed (``reproducible-noise = true``; a real site's noise comes from its OS CSPRNG).
Real sites keep their own policies; this only stands in for the sites' consent in a simulation.

Reproducibility: the seed fixes the phantoms (anatomy, labels, scanners), the model initialisation and every site's
training randomness (``seed`` run config key, through the virtual sites' ``reproducible-noise`` policy); each finished run caches its outcome (``RUN/outcome.json``, keyed by the
run's settings) so an interrupted experiment resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import math
import platform
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.layout import heldout_dir
from models.modalities import MODALITIES, canonical, subset_name

from ..mdsections import write_section

log = logging.getLogger("fedfusion.experiment")

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results.md"


@dataclass(frozen=True)
class Budget:
    """How big every run of an experiment is (the same for all rows of one table).

    Attributes:
        name: ``tiny`` (smoke tests, ~1-2 min per experiment on 2 cores), ``small`` (default, minutes) or ``full``.
        sites / cases_per_site / heldout_cases: phantom federation size (experiments may ask for more sites).
        shape: phantom grid = model input ``(D, H, W)`` in voxels.
        channels: encoder widths per level (run config ``model-channels``).
        rounds / local_epochs: federated rounds and local epochs per round; local-only and centralized runs train
            ``rounds * local_epochs`` epochs (the same number of passes over their data).
        lr / batch_size: Adam learning rate and batch size (cases), everywhere.
        eval_batch: held-out cases per forward pass in :func:`evaluate_checkpoint`.
    """

    name: str
    sites: int
    cases_per_site: int
    heldout_cases: int
    shape: tuple[int, int, int]
    channels: str
    rounds: int
    local_epochs: int
    lr: float
    batch_size: int
    eval_batch: int = 8

    def describe(self) -> str:
        return (
            f"budget `{self.name}`: {self.cases_per_site} cases per site, {self.heldout_cases} held-out cases, grid "
            f"{'x'.join(map(str, self.shape))}, channels ({self.channels}), {self.rounds} rounds x "
            f"{self.local_epochs} local epoch(s), Adam lr {self.lr:g}, batch {self.batch_size}"
        )


BUDGETS: dict[str, Budget] = {
    "tiny": Budget("tiny", sites=2, cases_per_site=4, heldout_cases=4, shape=(8, 16, 16), channels="4,8",
                   rounds=2, local_epochs=1, lr=3e-3, batch_size=2, eval_batch=4),
    "small": Budget("small", sites=3, cases_per_site=8, heldout_cases=8, shape=(16, 32, 32), channels="4,8,16",
                    rounds=4, local_epochs=1, lr=3e-3, batch_size=4),
    "full": Budget("full", sites=4, cases_per_site=16, heldout_cases=16, shape=(16, 32, 32), channels="8,16,32",
                   rounds=10, local_epochs=2, lr=3e-3, batch_size=4),
}


def budget_of(name: str) -> Budget:
    """The named budget. Raises ValueError listing the known ones."""
    key = name.strip().lower()
    if key not in BUDGETS:
        raise ValueError(f"unknown budget {name!r}; choose one of {', '.join(BUDGETS)}")
    return BUDGETS[key]


@dataclass
class Context:
    """One experiment invocation: budget, seed, where runs go, where the table goes, how it was started."""

    budget: Budget
    seed: int = 0
    work: Path = ROOT / "runs" / "experiments"
    results: Path = RESULTS
    command: str = ""
    progress: bool = False
    write: bool = True
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.work = Path(self.work)
        self.results = Path(self.results)


@dataclass
class Outcome:
    """One trained-and-evaluated row: its held-out metrics and what it cost.

    Attributes:
        label: row name.
        metrics: ``all/<metric>`` (all model modalities present), ``<modality>/<metric>`` (one modality present),
            ``single-mean/dice-whole`` and ``single-worst/dice-whole`` (over the single modalities; only for models
            with more than one modality), plus run extras (``epsilon-spent``, ``noise-multiplier``, ...).
        seconds: wall time of training (simulation or centralized loop), excluding the evaluation.
        run_dir: the run directory.
    """

    label: str
    metrics: dict[str, float]
    seconds: float
    run_dir: str

    def get(self, key: str) -> float:
        return float(self.metrics.get(key, math.nan))


# ----------------------------------------------------------------------------------------------- data and runs
def phantoms(ctx: Context, scenario: str, *, sites: int | None = None,
             missing_fraction: float | None = None) -> Path:
    """Phantom federation for this budget and seed (NIfTI, generated once and reused by every row)."""
    from simulations.phantom_writers import ensure

    b = ctx.budget
    n = sites or b.sites
    tag = f"-missing{int(round(missing_fraction * 100)):02d}" if missing_fraction is not None else ""
    data = ctx.work / "data" / (
        f"{scenario}{tag}-s{n}x{b.cases_per_site}-h{b.heldout_cases}-{'x'.join(map(str, b.shape))}-seed{ctx.seed}"
    )
    ensure(data, sites=n, cases_per_site=b.cases_per_site, seed=ctx.seed, scenario=scenario, shape=b.shape,
           fmt="nifti", heldout_cases=b.heldout_cases, missing_fraction=missing_fraction)
    return data


def base_overrides(ctx: Context) -> dict[str, Any]:
    """Run config shared by every federated row of a budget (non-private; experiments override keys)."""
    b = ctx.budget
    return {
        "num-server-rounds": b.rounds,
        "local-epochs": b.local_epochs,
        "lr": b.lr,
        "batch-size": b.batch_size,
        "model-channels": b.channels,
        "model-spatial-size": ",".join(map(str, b.shape)),
        "seed": ctx.seed,
        "dp-enabled": False,
        "eval-every": 0,
        "eval-batch-size": b.eval_batch,
    }


def _key(settings: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached(run_dir: Path, key: str) -> Outcome | None:
    path = run_dir / "outcome.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if data.get("key") != key:
        return None
    log.info("reusing finished run %s", run_dir)
    return Outcome(label=data["label"], metrics=data["metrics"], seconds=data["seconds"], run_dir=data["run_dir"])


def _store(run_dir: Path, key: str, outcome: Outcome) -> Outcome:
    (run_dir / "outcome.json").write_text(json.dumps({"key": key, **asdict(outcome)}, indent=2, default=str))
    return outcome


def permit_experiment_policies(run_dir: Path, data: Path) -> None:
    """Let the virtual sites of ``data`` accept non-private runs and any noise, and draw their DP noise reproducibly
    from the run's seed (see the module docstring)."""
    from simulations.simulate import permit_virtual_sites

    permit_virtual_sites(run_dir, data, allow_no_dp=True, min_noise_multiplier=0.0, reproducible_noise=True)


def run_federated(ctx: Context, label: str, data: Path, overrides: Mapping[str, Any],
                  extras: Callable[[Path], dict[str, float]] | None = None) -> Outcome:
    """Run (or reuse) a federated simulation of ``data`` with ``base_overrides`` + ``overrides`` and evaluate it."""
    from simulations.simulate import simulate

    cfg = {**base_overrides(ctx), **overrides}
    run_dir = ctx.work / "runs" / ctx.budget.name / label
    key = _key({"kind": "federated", "data": str(data), **cfg})
    cached = _cached(run_dir, key)
    if cached is not None:
        return cached
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a stale or interrupted run: start clean (site ledgers included)
    run_dir.mkdir(parents=True)
    permit_experiment_policies(run_dir, data)
    cfg["test-dir"] = str(run_dir / "no-server-eval")  # see the module docstring: the experiment evaluates
    log.info("federated run %s: %s", label, cfg)
    for attempt in (1, 2):
        with _quiet_flower(not ctx.progress):
            result = simulate(run_dir, data=data, overrides=cfg, progress=ctx.progress, report=False)
        failed = failed_site_replies(run_dir)
        if not failed:
            break
        # A site crash (not a privacy decline) makes the row meaningless; one retry covers transient failures
        # (e.g. a source file being edited while Ray workers import it), a second failure is reported.
        log.warning("federated run %s: %d failed site replies (see %s); %s", label, failed,
                    run_dir / "server.log", "retrying once" if attempt == 1 else "giving up")
        if attempt == 2:
            raise RuntimeError(f"federated run {label}: {failed} site replies failed twice; see "
                               f"{run_dir / 'server.log'} and the sites' logs")
        shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        permit_experiment_policies(run_dir, data)
    ckpt = run_dir / "checkpoints" / "last.pt"
    if not ckpt.exists():
        raise RuntimeError(f"federated run {label} left no checkpoint ({ckpt}); see {run_dir / 'flower.log'}")
    metrics = evaluate_checkpoint(ckpt, heldout_dir(data), batch_size=ctx.budget.eval_batch)
    metrics.update(site_train_summary(run_dir))
    if extras is not None:
        metrics.update(extras(run_dir))
    return _store(run_dir, key, Outcome(label, metrics, result.wall_seconds, str(run_dir)))


@contextlib.contextmanager
def _quiet_flower(quiet: bool) -> Iterator[None]:
    """Keep Flower's console lines off while a quiet experiment runs (they still go to ``RUN/flower.log``)."""
    import flwr.common.logger  # noqa: F401 - installs Flower's console handler, which we then quiet

    handlers = [h for h in logging.getLogger("flwr").handlers if not isinstance(h, logging.FileHandler)]
    levels = [h.level for h in handlers]
    if quiet:
        for h in handlers:
            h.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for h, level in zip(handlers, levels):
            h.setLevel(level)


def run_central(ctx: Context, label: str, data: Path, *, family: str = "attention",
                modalities: Sequence[str] = MODALITIES, modality_dropout: float = 0.25,
                heldout: Path | None = None) -> Outcome:
    """Train on ``data`` (a data root: pooled sites; or one site folder: local-only) for ``rounds * local_epochs``
    epochs with the federated rows' optimizer, lr, batch size and model, and evaluate like them."""
    import torch

    from simulations.central import CentralSettings, train_central

    b = ctx.budget
    heldout = heldout or heldout_dir(data)
    model_keys = {"model-family": family, "model-modalities": ",".join(canonical(modalities)),
                  "model-modality-dropout": modality_dropout}
    settings = CentralSettings.from_run_config(
        data, ctx.work / "runs" / b.name / label, {**base_overrides(ctx), **model_keys},
        epochs=b.rounds * b.local_epochs, optimizer="adam", heldout=heldout, eval_every=0, eval_subsets="full",
        final_subsets="full", hd95=False, progress=ctx.progress,
    )
    run_dir = Path(settings.out)
    key = _key({"kind": "central", **settings.to_json_dict()})
    cached = _cached(run_dir, key)
    if cached is not None:
        return cached
    if run_dir.exists():
        shutil.rmtree(run_dir)
    threads = torch.get_num_threads()
    try:
        result = train_central(settings)
    finally:
        torch.set_num_threads(threads)
    metrics = evaluate_checkpoint(run_dir / "checkpoints" / "last.pt", heldout, batch_size=b.eval_batch)
    return _store(run_dir, key, Outcome(label, metrics, result.seconds, str(run_dir)))


# ------------------------------------------------------------------------------------------------- evaluation
#: Metrics kept per evaluated subset (models.metrics names).
KEPT = ("dice-whole", "dice-core", "dice-enhancing", "accuracy", "auroc", "f1", "recall", "specificity")


def evaluate_checkpoint(ckpt: Path, heldout: Path, *, batch_size: int = 8, device: str = "auto") -> dict[str, float]:
    """Held-out metrics of a checkpoint: all model modalities, and each single modality (see :class:`Outcome`)."""
    from common.evaluation import evaluate_checkpoint as evaluate

    result = evaluate(ckpt, heldout, subsets="full+singles", hd95=False, batch_size=batch_size, device=device)
    mods = result.config.modalities
    rows = result.report.rows
    out: dict[str, float] = {}
    for k in KEPT:
        out[f"all/{k}"] = float(rows[subset_name(mods)].get(k, math.nan))
    dice_singles = []
    for m in mods if len(mods) > 1 else ():
        row = rows[subset_name((m,))]
        for k in ("dice-whole", "accuracy"):
            out[f"{m}/{k}"] = float(row.get(k, math.nan))
        dice_singles.append(out[f"{m}/dice-whole"])
    if dice_singles:
        out["single-mean/dice-whole"] = float(sum(dice_singles) / len(dice_singles))
        out["single-worst/dice-whole"] = float(min(dice_singles))
    out["held-out-cases"] = float(result.cases)
    return out


def failed_site_replies(run_dir: Path) -> int:
    """Train replies the server rejected (site errors, invalid updates) over all rounds of a run."""
    from models.runlog import iter_metrics

    per_round: dict[int, float] = {}
    for rec in iter_metrics(Path(run_dir) / "metrics.jsonl"):
        if rec["phase"] == "train" and rec["scope"] == "global" and rec["metric"] == "sites-rejected":
            per_round[rec["round"]] = max(per_round.get(rec["round"], 0.0), float(rec["value"] or 0.0))
    return int(sum(per_round.values()))


def site_train_summary(run_dir: Path) -> dict[str, float]:
    """From a federated run's metrics log: the last round's highest epsilon spent by a site, its noise multiplier,
    the sites that trained in the last round, and the sites' summed local training seconds over all rounds."""
    from models.runlog import is_site_scope, iter_metrics

    last: dict[str, dict[str, float]] = {}
    last_round = 0
    train_seconds = 0.0
    for rec in iter_metrics(Path(run_dir) / "metrics.jsonl"):
        if rec["phase"] != "train" or not is_site_scope(rec["scope"]) or rec["value"] is None:
            continue
        if rec["metric"] == "train-seconds":
            train_seconds += float(rec["value"])
        if rec["round"] > last_round:
            last_round, last = rec["round"], {}
        last.setdefault(rec["scope"], {})[rec["metric"]] = float(rec["value"])
    # a site that trained sent num-examples; a declining site's record holds only its reason's numbers
    trained = [m for m in last.values() if m.get("declined", 0.0) == 0.0 and "num-examples" in m]
    out = {"sites-trained-last-round": float(len(trained)), "last-round": float(last_round)}
    if trained:
        out["epsilon-spent"] = max(m.get("epsilon-total", 0.0) for m in trained)
        out["noise-multiplier"] = max(m.get("noise-multiplier", 0.0) for m in trained)
        losses = [m["train-loss"] for m in trained if "train-loss" in m]  # sites no longer send it (docs/site.md)
        if losses:
            out["train-loss-last"] = sum(losses) / len(losses)
    if train_seconds:
        out["site-train-seconds"] = train_seconds
    return out


# ----------------------------------------------------------------------------------------------------- tables
def fmt(v: float | None, digits: int = 3) -> str:
    """A table cell: ``n/a`` for missing or non-finite values."""
    if v is None or not isinstance(v, (int, float)) or not math.isfinite(v):
        return "n/a"
    return f"{v:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align_right_from: int = 1) -> str:
    """A GitHub Markdown table; columns from ``align_right_from`` on are right-aligned (numbers)."""
    sep = ["---" if i < align_right_from else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def section_name(experiment: str) -> str:
    """The docs/results.md section an experiment owns."""
    return f"experiment-{experiment}"


def provenance(ctx: Context, experiment: str, train_seconds: float | None = None) -> str:
    """The line that says how, when and at what budget a table was made (``train_seconds``: the rows' summed
    training time, which stays true when finished rows were reused from their cached outcomes)."""
    import torch

    minutes = (train_seconds if train_seconds is not None else time.time() - ctx.started) / 60.0
    command = ctx.command or f"fedfusion experiment {experiment} --budget {ctx.budget.name} --seed {ctx.seed}"
    return (
        f"Generated {_dt.date.today().isoformat()} by `{command}` (seed {ctx.seed}; {ctx.budget.describe()}; "
        f"rows trained in {minutes:.0f} min in all on {platform.machine()} with torch {torch.__version__.split('+')[0]}, "
        f"{'CUDA' if torch.cuda.is_available() else 'CPU only'}). Phantom data: numbers say how the methods compare "
        "on synthetic multimodal phantoms, nothing about clinical accuracy."
    )


def write_result(ctx: Context, experiment: str, title: str, body: str,
                 outcomes: Sequence[Outcome] | None = None) -> Path | None:
    """Write an experiment's section (title, provenance, body) to ``ctx.results`` unless ``ctx.write`` is off."""
    seconds = sum(o.seconds for o in outcomes) if outcomes else None
    text = f"## {title}\n\n{provenance(ctx, experiment, seconds)}\n\n{body.strip()}\n"
    if not ctx.write:
        print(text)
        return None
    return write_section(ctx.results, section_name(experiment), text)


def budget_notes(outcomes: Sequence[Outcome]) -> list[str]:
    """Say which columns cannot rank the rows at this budget (computed from the rows, so it disappears when the
    models do learn those targets)."""
    out: list[str] = []
    accs = [o.get("all/accuracy") for o in outcomes]
    if accs and all(math.isfinite(a) and abs(a - 0.5) < 1e-6 for a in accs):
        out.append(
            "- No row's classifier has left a constant prediction at this budget: accuracy is 0.500 everywhere, the "
            "base rate of the balanced held-out set (AUROC, computed from the probabilities, still varies but on "
            "few cases). The classification columns do not rank the rows here; `--budget full` trains longer."
        )
    sub = [max(o.get("all/dice-core"), o.get("all/dice-enhancing")) for o in outcomes]
    if sub and all(math.isfinite(s) and s < 0.1 for s in sub):
        out.append(
            "- Sub-region Dice (core, enhancing rim) stays below 0.1 in every row: the small regions are not learnt "
            "yet at this budget, so whole-tumour Dice is the column that separates the rows."
        )
    return out


def modality_reliance(ckpt: Path, heldout: Path, *, batch_size: int = 8) -> dict[str, float]:
    """Whole-tumour Dice drop on the held-out set when each modality is masked out of the full input
    (:func:`models.contribution.mean_contribution`, ``dice_drop`` against the true segmentation; mean over
    cases). Empty for one-modality models."""
    import torch

    from common.evaluation import heldout_loader, load_heldout, load_model
    from models.contribution import mean_contribution

    model, cfg, _ = load_model(ckpt, "cpu")
    if len(cfg.modalities) < 2:
        return {}
    loader = heldout_loader(load_heldout(cfg, heldout), batch_size)
    with torch.inference_mode():
        means = mean_contribution(model, loader, "cpu")
    return {m: per["dice_drop"] for m, per in means.items()}


def foreground_ratio(ckpt: Path, heldout: Path, *, batch_size: int = 8) -> float:
    """Predicted over true lesion volume (voxels with any label > 0) on the held-out set with all the model's
    modalities: 0 = the network predicts no lesion at all (the all-background solution cross-entropy favours
    early at a few % foreground), 1 = the right amount (not necessarily in the right place)."""
    from common.evaluation import heldout_loader, load_heldout, load_model
    from models.evaluation import predict

    model, cfg, _ = load_model(ckpt, "cpu")
    pred = predict(model, heldout_loader(load_heldout(cfg, heldout), batch_size), "cpu")
    true = float((pred.seg_true > 0).sum())
    return float((pred.seg_pred > 0).sum()) / true if true else math.nan
