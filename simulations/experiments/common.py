"""Shared machinery of the experiments: budgets, phantom data, federated / centralized runs, one evaluator, tables.

Every row of a table takes the same number of optimizer steps (:class:`Budget`), and every row is evaluated the
same way, whatever trained it (federation, one site alone, pooled data): the final model (``checkpoints/last.pt``,
nothing selected) on the phantom held-out set (every modality for every case), with all of the model's modalities,
each single modality and optionally every subset, and on the unseen-scanner cohort (:func:`evaluate_checkpoint`,
no HD95). Headline rows run several seeds (:attr:`Context.seeds`; :mod:`.stats` gives mean ± SD and paired
differences). The
federated runs therefore switch the server's own per-round held-out evaluation off (run config ``test-dir`` points
at a folder that does not exist; the server logs that and goes on): it would evaluate all 63 modality subsets with
HD95 after the last round, which costs more than the training at these sizes and is not what the tables show.

Virtual sites get a privacy policy (``RUN/site-state/SITE/privacy-policy.toml``) that admits the experiment's
settings: non-private runs (``allow-no-dp``; needed for the epsilon = inf row and the non-DP comparisons) and any
noise multiplier (``min-noise-multiplier = 0``, so large-epsilon rows are not declined), and DP noise drawn
reproducibly from the run's seed (``reproducible-noise = true``; a real site's noise comes from its OS CSPRNG).
Real sites keep their own policies; this only stands in for the sites' consent in a simulation.

Reproducibility: the seed fixes the phantoms (anatomy, labels, scanners), the model initialisation and every site's
training randomness (``seed`` run config key, through the virtual sites' ``reproducible-noise`` policy). Each
finished run caches its outcome (``RUN/outcome.json``) so an interrupted experiment resumes where it stopped; the
key is the row's fully resolved run config (pyproject's defaults included) and a fingerprint of the training and
evaluation source, so a changed default or a changed network retrains the row instead of serving a stale number.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
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

from common import runconfig
from common.layout import heldout_dir
from models.modalities import subset_name

from ..mdsections import write_section

log = logging.getLogger("fedfusion.experiment")

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results.md"


@dataclass(frozen=True)
class Budget:
    """How big every run of an experiment is (the same for all rows of one table).

    Every row of a table takes the same number of optimizer steps (not epochs): a federated run takes ``rounds x
    local_epochs x ceil(n_i / batch_size)`` steps at each site ``i`` (summed over the sites), a pooled run as many
    on the pooled cases, a local-only run as many on one site's cases (:func:`equal_step_epochs`).

    Attributes:
        name: ``tiny`` (smoke tests, ~1-2 min per experiment on 2 cores), ``small`` (minutes) or ``standard`` (the
            powered comparisons of docs/results.md: about an hour per experiment on 2 cores).
        sites / cases_per_site: phantom federation size (experiments may ask for more sites).
        heldout_cases / unseen_cases: the held-out set the numbers are reported on, and the unseen-scanner cohort.
        shape: phantom grid = model input ``(D, H, W)`` in voxels.
        rounds / local_epochs / batch_size: the federated schedule (and the batch of every row).
        seeds: seeds of the headline rows (the others run with the first).
        overrides: run-config keys that differ from pyproject.toml's (everything else is the run config's: lr,
            schedule, model widths, ...).
        eval_batch: held-out cases per forward pass.
    """

    name: str
    sites: int
    cases_per_site: int
    heldout_cases: int
    unseen_cases: int
    shape: tuple[int, int, int]
    rounds: int
    local_epochs: int
    batch_size: int
    seeds: int = 1
    overrides: tuple[tuple[str, Any], ...] = ()
    eval_batch: int = 8

    def describe(self) -> str:
        extra = ", ".join(f"{k} {v}" for k, v in self.overrides)
        return (
            f"budget `{self.name}`: {self.sites} sites x {self.cases_per_site} cases, {self.heldout_cases} held-out "
            f"and {self.unseen_cases} unseen-scanner cases, grid {'x'.join(map(str, self.shape))}, {self.rounds} "
            f"rounds x {self.local_epochs} local epoch(s) at batch {self.batch_size} (pooled and local-only rows: "
            f"the same optimizer steps), {self.seeds} seed(s) for headline rows"
            + (f"; {extra}" if extra else "; the run config's model and optimizer")
        )


BUDGETS: dict[str, Budget] = {
    "tiny": Budget("tiny", sites=2, cases_per_site=4, heldout_cases=4, unseen_cases=4, shape=(8, 16, 16), rounds=2,
                   local_epochs=1, batch_size=2, overrides=(("model-channels", "4,8"),), eval_batch=4),
    "small": Budget("small", sites=3, cases_per_site=16, heldout_cases=24, unseen_cases=12, shape=(16, 32, 32),
                    rounds=4, local_epochs=1, batch_size=4),
    "standard": Budget("standard", sites=3, cases_per_site=64, heldout_cases=96, unseen_cases=48,
                       shape=(16, 32, 32), rounds=11, local_epochs=1, batch_size=4, seeds=3),
}


def budget_of(name: str) -> Budget:
    """The named budget. Raises ValueError listing the known ones."""
    key = name.strip().lower()
    if key not in BUDGETS:
        raise ValueError(f"unknown budget {name!r}; choose one of {', '.join(BUDGETS)}")
    return BUDGETS[key]


@dataclass
class Context:
    """One experiment invocation: budget, seeds, where runs go, where the table goes, how it was started."""

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

    @property
    def seeds(self) -> tuple[int, ...]:
        """The seeds of headline rows (data, initialisation and training randomness); other rows use the first."""
        return tuple(self.seed + k for k in range(self.budget.seeds))


@dataclass
class Outcome:
    """One trained-and-evaluated run: its held-out metrics and what it cost.

    Attributes:
        label: row name (the same for every seed of a row).
        metrics: see :func:`evaluate_checkpoint`, plus run extras (``epsilon-spent``, ``optimizer-steps``, ...).
        seconds: wall time of training (simulation or centralized loop), excluding the evaluation.
        run_dir: the run directory.
        seed: the run's seed.
    """

    label: str
    metrics: dict[str, float]
    seconds: float
    run_dir: str
    seed: int = 0

    def get(self, key: str) -> float:
        return float(self.metrics.get(key, math.nan))


# ----------------------------------------------------------------------------------------------- data and runs
def phantoms(ctx: Context, scenario: str, *, seed: int | None = None, sites: int | None = None,
             cases: int | None = None, missing_fraction: float | None = None) -> Path:
    """The phantom federation of this budget and ``seed`` (default: the context's first; NIfTI, generated once and
    reused by every row of that seed): sites (``sites`` x ``cases``, default the budget's), the reporting held-out
    set and the unseen-scanner cohort."""
    from simulations.phantom_writers import ensure

    b = ctx.budget
    seed = ctx.seed if seed is None else int(seed)
    n = sites or b.sites
    k = cases or b.cases_per_site
    tag = f"-missing{int(round(missing_fraction * 100)):02d}" if missing_fraction is not None else ""
    data = ctx.work / "data" / (
        f"{scenario}{tag}-s{n}x{k}-h{b.heldout_cases}-u{b.unseen_cases}-{'x'.join(map(str, b.shape))}-seed{seed}"
    )
    # experiments evaluate the last checkpoint at equal steps (no checkpoint is selected); the validation/ cohort,
    # as large as the reporting set and drawn from its own stream, chooses only the classifier's operating point
    ensure(data, sites=n, cases_per_site=k, seed=seed, scenario=scenario, shape=b.shape,
           fmt="nifti", heldout_cases=b.heldout_cases, missing_fraction=missing_fraction,
           validation_cases=b.heldout_cases, unseen_cases=b.unseen_cases)
    return data


def base_overrides(ctx: Context, seed: int) -> dict[str, Any]:
    """Run config shared by every row of a budget (non-private, no federated evaluation; experiments override
    keys); everything not named here is pyproject.toml's."""
    b = ctx.budget
    return {
        "num-server-rounds": b.rounds,
        "local-epochs": b.local_epochs,
        "batch-size": b.batch_size,
        "model-spatial-size": ",".join(map(str, b.shape)),
        "seed": seed,
        "dp-enabled": False,
        "eval-every": 0,
        "fraction-evaluate": 0.0,
        "eval-batch-size": b.eval_batch,
        **dict(b.overrides),
    }


def training_cases(data: Path) -> list[int]:
    """Cases of each training site of a phantom data root (its manifest)."""
    manifest = json.loads((Path(data) / "phantoms.json").read_text(encoding="utf-8"))
    return [int(s["cases"]) for s in manifest["sites"].values()]


def federated_steps(budget: Budget, site_cases: Sequence[int]) -> int:
    """Optimizer steps of a federated run, summed over the sites (no site holds patients out: see
    :func:`permit_experiment_policies`)."""
    return sum(budget.rounds * budget.local_epochs * math.ceil(n / budget.batch_size) for n in site_cases)


def equal_step_epochs(steps: int, cases: int, batch_size: int) -> int:
    """Epochs over ``cases`` that take ``steps`` optimizer steps at ``batch_size`` (rounded to the nearest epoch)."""
    return max(1, round(steps / math.ceil(cases / batch_size)))


#: Source that shapes what a row trains and how it is scored: a cached outcome is reused only while these files
#: are unchanged (a changed loss or network must not be served from a run the old code trained).
_TRAINING_SOURCES: tuple[str, ...] = ("models", "common", "client", "server", "simulations/central.py",
                                      "simulations/simulate.py", "simulations/experiments/common.py")


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha1 over the training and evaluation source (:data:`_TRAINING_SOURCES`), file names and contents."""
    digest = hashlib.sha1()
    for entry in _TRAINING_SOURCES:
        path = ROOT / entry
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(str(file.relative_to(ROOT)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def _key(settings: Mapping[str, Any]) -> str:
    """Cache key of a row: its fully resolved settings (pyproject's defaults included, so a changed default
    invalidates the rows that ran under the old one) and the code that trained it."""
    payload = {"code": code_fingerprint(), **settings}
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def federated_key(data: Path, subsets: str, overrides: Mapping[str, Any],
                  project_dir: Path = runconfig.PROJECT_DIR) -> str:
    """Cache key of a federated row: ``overrides`` resolved against ``project_dir``'s pyproject.toml."""
    return _key({"kind": "federated", "data": str(data), "subsets": subsets,
                 **runconfig.load(overrides, project_dir)})


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
    return Outcome(label=data["label"], metrics=data["metrics"], seconds=data["seconds"], run_dir=data["run_dir"],
                   seed=int(data.get("seed", 0)))


def _store(run_dir: Path, key: str, outcome: Outcome) -> Outcome:
    (run_dir / "outcome.json").write_text(json.dumps({"key": key, **asdict(outcome)}, indent=2, default=str))
    return outcome


def permit_experiment_policies(run_dir: Path, data: Path) -> None:
    """Let the virtual sites of ``data`` accept non-private runs and any noise, draw their DP noise reproducibly
    from the run's seed, and answer no evaluation (so they keep no patient out of training: every row trains on
    the same cases; the experiment evaluates centrally on the held-out sets). See the module docstring."""
    from client.privacy.policy import write_policy_file
    from common.layout import simulated_state_dir, site_dirs

    for site in site_dirs(data):
        write_policy_file(simulated_state_dir(run_dir, site.name),
                          {"allow-no-dp": True, "min-noise-multiplier": 0.0, "reproducible-noise": True,
                           "allow-evaluation": False})


def _run_dir(ctx: Context, label: str, seed: int) -> Path:
    return ctx.work / "runs" / ctx.budget.name / label / f"seed{seed}"


def run_federated(ctx: Context, label: str, data: Path, overrides: Mapping[str, Any], *, seed: int | None = None,
                  subsets: str = "full+singles", extras: Callable[[Path], dict[str, float]] | None = None) -> Outcome:
    """Run (or reuse) a federated simulation of ``data`` with ``base_overrides`` + ``overrides`` and evaluate its
    last checkpoint (:func:`evaluate_checkpoint`)."""
    from simulations.simulate import simulate

    seed = ctx.seed if seed is None else int(seed)
    cfg = {**base_overrides(ctx, seed), **overrides}
    run_dir = _run_dir(ctx, label, seed)
    key = federated_key(data, subsets, cfg)
    cached = _cached(run_dir, key)
    if cached is not None:
        return cached
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a stale or interrupted run: start clean (site ledgers included)
    run_dir.mkdir(parents=True)
    permit_experiment_policies(run_dir, data)
    cfg["test-dir"] = str(run_dir / "no-server-eval")  # see the module docstring: the experiment evaluates
    log.info("federated run %s (seed %d): %s", label, seed, cfg)
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
    metrics = evaluate_checkpoint(ckpt, data, subsets=subsets, batch_size=ctx.budget.eval_batch)
    metrics.update(site_train_summary(run_dir))
    metrics["optimizer-steps"] = float(federated_steps(ctx.budget, training_cases(data)))
    if extras is not None:
        metrics.update(extras(run_dir))
    return _store(run_dir, key, Outcome(label, metrics, result.wall_seconds, str(run_dir), seed))


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


def run_central(ctx: Context, label: str, data: Path, *, seed: int | None = None, site: Path | None = None,
                overrides: Mapping[str, Any] | None = None, subsets: str = "full+singles") -> Outcome:
    """Train centrally on the pooled sites of ``data`` (or on ``site`` alone: local-only) for as many optimizer
    steps as the federated rows of this budget take, with their model, optimizer, lr and batch size
    (``overrides``: run-config keys of this row, e.g. the model family), and evaluate like them."""
    import torch

    from common.layout import site_dirs
    from simulations.central import CentralSettings, train_central

    b = ctx.budget
    seed = ctx.seed if seed is None else int(seed)
    cases = training_cases(data)
    steps = federated_steps(b, cases)
    trained_on = Path(site) if site is not None else Path(data)
    own = cases[[s.name for s in site_dirs(data)].index(trained_on.name)] if site is not None else sum(cases)
    epochs = equal_step_epochs(steps, own, b.batch_size)
    settings = CentralSettings.from_run_config(
        trained_on, _run_dir(ctx, label, seed), {**base_overrides(ctx, seed), **(overrides or {})},
        epochs=epochs, heldout=heldout_dir(data), eval_every=0, eval_subsets="full", final_subsets="full",
        hd95=False, progress=ctx.progress,
    )
    run_dir = Path(settings.out)
    key = _key({"kind": "central", "subsets": subsets, **settings.to_json_dict()})
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
    metrics = evaluate_checkpoint(run_dir / "checkpoints" / "last.pt", data, subsets=subsets,
                                  batch_size=b.eval_batch)
    metrics["optimizer-steps"] = float(epochs * math.ceil(own / b.batch_size))
    return _store(run_dir, key, Outcome(label, metrics, result.seconds, str(run_dir), seed))


# ------------------------------------------------------------------------------------------------- evaluation
#: Metrics kept per evaluated subset (models.metrics names).
KEPT = ("dice-whole", "dice-core", "dice-enhancing", "accuracy", "balanced-accuracy", "auroc", "f1", "recall",
        "specificity")
#: How every experiment row is evaluated (:func:`evaluate_checkpoint`), as its section says.
EVALUATION_NOTE = ("last checkpoint (none is selected); the classifier at the operating point chosen on a selection "
                   "cohort as large as the held-out set (`validation/`, its own draws: the threshold that maximises "
                   "balanced accuracy there, never tuned on the reported cases)")
#: The regions whose mean is the tables' "mean-region Dice".
MEAN_REGIONS = ("whole", "core", "enhancing")


def evaluate_checkpoint(ckpt: Path, data: Path, *, subsets: str = "full+singles", batch_size: int = 8,
                        device: str = "auto") -> dict[str, float]:
    """Held-out metrics of a checkpoint on a data root's reporting set (``heldout/``) and, when there is one, its
    unseen-scanner cohort (``heldout-unseen/``, all of the model's modalities).

    Keys: ``all/<metric>`` (all the model's modalities), ``<modality>/<metric>`` (one modality present),
    ``single-mean/dice-whole`` / ``single-worst/dice-whole`` (over the single modalities), ``all/mean-region-dice``
    (mean of whole, core and enhancing Dice), with ``subsets="all"`` also ``subsets-mean/dice-whole`` and
    ``subsets-mean/mean-region-dice`` (mean over every modality subset), ``unseen/<metric>``, ``held-out-cases``,
    ``all/threshold`` (the decision threshold the classification metrics are at: the balanced-accuracy optimum on
    the data root's selection cohort ``validation/`` when it has one).
    """
    from common.evaluation import evaluate_checkpoint as evaluate
    from common.evaluation import selection_threshold
    from common.layout import UNSEEN_NAME, VALIDATION_NAME

    data = Path(data)
    # the classifier's operating point: chosen on the selection cohort when the data has one (as the ServerApp
    # does), never on the reporting set; without one, what the checkpoint stores, else 0.5
    threshold: float | None = None
    if (data / VALIDATION_NAME).is_dir():
        threshold, _ = selection_threshold(ckpt, data / VALIDATION_NAME, batch_size=batch_size, device=device)
    result = evaluate(ckpt, heldout_dir(data), subsets=subsets, hd95=False, batch_size=batch_size, device=device,
                      threshold=threshold)
    mods = result.config.modalities
    rows = result.report.rows
    out: dict[str, float] = {}
    for k in KEPT:
        out[f"all/{k}"] = float(rows[subset_name(mods)].get(k, math.nan))
    out["all/mean-region-dice"] = _mean_region(rows[subset_name(mods)])
    dice_singles = []
    for m in mods if len(mods) > 1 else ():
        row = rows[subset_name((m,))]
        for k in ("dice-whole", "accuracy"):
            out[f"{m}/{k}"] = float(row.get(k, math.nan))
        out[f"{m}/mean-region-dice"] = _mean_region(row)
        dice_singles.append(out[f"{m}/dice-whole"])
    if dice_singles:
        out["single-mean/dice-whole"] = float(sum(dice_singles) / len(dice_singles))
        out["single-worst/dice-whole"] = float(min(dice_singles))
    if subsets == "all" and "mean" in rows:
        named = [r for name, r in rows.items() if name not in ("all", "mean", "worst")]
        out["subsets-mean/dice-whole"] = float(rows["mean"].get("dice-whole", math.nan))
        out["subsets-mean/mean-region-dice"] = float(sum(_mean_region(r) for r in named) / len(named))
    out["held-out-cases"] = float(result.cases)
    out["all/threshold"] = float(rows[subset_name(mods)].get("threshold", math.nan))
    if (data / UNSEEN_NAME).is_dir():
        unseen = evaluate(ckpt, data / UNSEEN_NAME, subsets="full", hd95=False, batch_size=batch_size, device=device,
                          threshold=threshold)
        row = unseen.report.rows[subset_name(mods)]
        for k in KEPT:
            out[f"unseen/{k}"] = float(row.get(k, math.nan))
        out["unseen/mean-region-dice"] = _mean_region(row)
    return out


def _mean_region(row: Mapping[str, Any]) -> float:
    values = [float(row.get(f"dice-{r}", math.nan)) for r in MEAN_REGIONS]
    return float(sum(values) / len(values))


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
            "few cases). The classification columns do not rank the rows here; `--budget standard` trains longer."
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
