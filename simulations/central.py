"""Centralized training on the pooled sites: the non-federated, non-private upper bound.

All ``site-*`` folders of a data root are pooled into one dataset (never ``heldout/``); the network trains with the
same loop as a site (:func:`models.training.train_epoch`) and is evaluated on ``heldout/`` with
:func:`common.evaluation.evaluate_model`. The run directory follows docs/architecture.md: ``config.json``,
``metrics.jsonl`` (round = epoch; phase ``central-train`` / ``central-eval`` (the held-out set the numbers are
reported on) / ``central-select`` (the ``validation/`` selection set), scope ``global``; round 0 is the untrained
model when ``initial_eval``), ``checkpoints/last.pt`` and ``checkpoints/best.pt`` (best ``all/dice-whole`` on the
selection set; on the held-out set itself, with a warning, when the data root has no ``validation/``). The
selection set also sets the classifier's decision threshold (its balanced-accuracy optimum, stored in both
checkpoints as ``threshold``); the held-out numbers are computed at it, or at 0.5 without a selection set.

Evaluation cost: evaluating every modality subset is ``2^M - 1`` forwards per held-out case. By default the
per-epoch evaluations use only the full modality set (``eval_subsets="full"``) and the last epoch evaluates every
subset (``final_subsets="all"``).

Determinism: ``seed`` seeds model initialisation, the loader's shuffling, modality dropout and augmentation; on
CPU two runs with the same settings give the same metrics.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from common import runconfig
from common.layout import HELDOUT_NAME, VALIDATION_NAME, resolve_cohort_dir
from common.runconfig import TrainConfig
from models.config import ModelConfig

log = logging.getLogger(__name__)

#: Metric the best checkpoint is chosen by (a key of ``SubsetReport.to_flat()``). The federated server chooses by
#: the selection set's mean over the full set and each modality (run config ``best-metric``, ``select-subsets``);
#: central runs keep the full set, so the public checkpoints and the experiments' pooled rows stay those recorded
#: (the experiments score ``last.pt``).
BEST_METRIC = "all/dice-whole"


@dataclass
class CentralSettings:
    """Settings of one centralized run (all saved to ``RUN/config.json``).

    :meth:`from_run_config` takes the model, learning rate, batch size, seed and convolution path from the run config,
    so a pooled run and a federated run of the same config train the same network the same way.

    Attributes:
        data: data root holding ``site-*`` folders and ``heldout/`` (or a single site folder to train on).
        out: run directory.
        model: the network to train.
        epochs: training epochs.
        lr: learning rate (the schedule's peak).
        batch_size: training batch size (cases).
        seed: seed of everything random.
        conv_backward: ``fast`` or ``stock`` convolution path (run-config key ``conv-backward``,
            :mod:`models.fast_conv`).
        lr_schedule: learning-rate schedule over the run's steps (:data:`models.schedule.SCHEDULES`).
        lr_warmup: share of the run's steps spent warming the learning rate up linearly.
        balance_classes: logit-adjust the classification loss by the training cases' class shares
            (:class:`models.losses.MultiTaskLoss` ``class_prior``).
        optimizer: ``adam`` or ``sgd`` (None: :func:`models.training.make_optimizer`'s default, as at the sites).
        augment: random flips / intensity jitter of training cases.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        heldout: held-out folder (None: the data root's held-out set).
        eval_every: evaluate every this many epochs (the last epoch always); 0 = only after the last epoch.
        eval_subsets / final_subsets: ``full`` (the full modality set only) or ``all`` (every subset).
        hd95: HD95 in evaluations (True, False or ``"full"`` = full modality set only).
        initial_eval: evaluate the untrained model as round 0.
        threads: ``torch.set_num_threads`` (None: leave as is).
        max_batches: cap of batches per epoch (smoke tests); None = all.
        progress: rich progress display.
    """

    data: Path
    out: Path
    model: ModelConfig
    epochs: int
    lr: float
    lr_schedule: str
    lr_warmup: float
    balance_classes: bool
    batch_size: int
    seed: int
    conv_backward: str
    optimizer: str | None = None
    augment: bool = False
    device: str = "auto"
    heldout: Path | None = None
    eval_every: int = 1
    eval_subsets: str = "full"
    final_subsets: str = "all"
    hd95: bool | str = "full"
    initial_eval: bool = False
    threads: int | None = None
    max_batches: int | None = None
    progress: bool = True

    @classmethod
    def from_run_config(cls, data: Path, out: Path, run_config: Mapping[str, Any] | None = None, *,
                        epochs: int | None = None, **options: Any) -> "CentralSettings":
        """Settings from the run config (pyproject's defaults with ``run_config`` applied): its ``model-*``, ``lr``,
        ``lr-schedule``, ``lr-warmup``, ``balance-classes``, ``batch-size``, ``seed`` and ``conv-backward``; ``epochs``
        defaults to ``num-server-rounds x local-epochs`` (the passes over
        its data a site makes in the federated run). ``options`` set the other attributes.

        Raises:
            RunConfigError: a bad run config key or value, named.
        """
        rc = runconfig.load(run_config)
        train = TrainConfig.from_run_config(rc)
        return cls(data=Path(data), out=Path(out), model=runconfig.model_config(rc),
                   epochs=int(epochs) if epochs is not None else train.num_server_rounds * train.local_epochs,
                   lr=train.lr, lr_schedule=train.lr_schedule, lr_warmup=train.lr_warmup,
                   balance_classes=train.balance_classes, batch_size=train.batch_size, seed=train.seed,
                   conv_backward=train.conv_backward, **options)

    def to_json_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        out = {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
        return {**out, **runconfig.model_entries(self.model)}


@dataclass
class CentralResult:
    """What :func:`train_central` returns.

    Attributes:
        run_dir: the run directory.
        history: per epoch ``{"epoch", "loss", ..., "eval": flat eval metrics or {}}``.
        initial: flat metrics of the untrained model (``initial_eval``), else None.
        final: the last :class:`models.evaluation.SubsetReport`.
        best_value / best_epoch: best ``all/dice-whole`` and its epoch.
        seconds: wall time.
    """

    run_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    initial: dict[str, float] | None = None
    final: Any = None
    best_value: float = -math.inf
    best_epoch: int = 0
    seconds: float = 0.0


def selection_dir(data: Path, held_dir: Path) -> Path | None:
    """The selection cohort for central training: ``validation/`` of the data root, or, when ``data`` is one site
    folder (local-only training), of the root holding the held-out folder; never the held-out folder itself."""
    for root in (data, held_dir.parent):
        found = resolve_cohort_dir("", root, VALIDATION_NAME)
        if found is not None and found.resolve() != held_dir.resolve():
            return found
    return None


def split_data_root(data: Path, heldout: Path | None = None) -> tuple[list[Path], Path | None]:
    """(training site folders, held-out folder or None) of a data root or a single site folder."""
    from common.data.site import discover_sites

    found = discover_sites(Path(data))
    train = [s.path for s in found if not s.heldout]
    held = heldout
    if held is None:
        held = next((s.path for s in found if s.name == HELDOUT_NAME), None)
    if not train:
        raise ValueError(f"{data} has no training site folders (site-*); only {[s.name for s in found]}")
    return train, (Path(held) if held is not None else None)


def train_central(settings: CentralSettings) -> CentralResult:
    """Train on the pooled sites of ``settings.data`` and evaluate on the held-out set (see module docstring).

    Raises:
        ValueError / FileNotFoundError: bad settings or data, naming what and how to fix it.
    """
    import torch
    from torch.utils.data import DataLoader

    from common.data.dataset import CaseDataset
    from common.evaluation import evaluate_model, load_heldout
    from models.checkpoint import save_checkpoint
    from models.fast_conv import set_conv_backward
    from models.losses import MultiTaskLoss, label_prior
    from models.metrics import DEFAULT_THRESHOLD
    from models.network import build_model
    from models.runlog import MetricsLog
    from models.schedule import LRSchedule
    from models.training import make_optimizer, resolve_device, train_epoch

    t0 = time.perf_counter()
    s = settings
    if s.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {s.epochs}")
    if s.batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {s.batch_size}")
    if s.threads:
        torch.set_num_threads(int(s.threads))
    model_cfg = s.model
    modalities = model_cfg.modalities
    device = resolve_device(s.device)

    train_dirs, held_dir = split_data_root(Path(s.data), s.heldout)
    if held_dir is None:
        raise ValueError(
            f"no held-out set: {s.data} has no heldout/ folder; pass a held-out folder (--heldout) to evaluate on"
        )
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)
    train_ds = CaseDataset(train_dirs, modalities=modalities, spatial_size=model_cfg.spatial_size, augment=s.augment,
                           cache=True, seed=s.seed)
    held_ds = load_heldout(model_cfg, held_dir)
    # best.pt is chosen on the selection set, never on the set the numbers are reported on (when there is one)
    select_dir = selection_dir(Path(s.data), held_dir)
    select_ds = load_heldout(model_cfg, select_dir) if select_dir is not None else None
    if select_ds is None:
        log.warning("central training: no %s/ selection set in %s; best.pt is chosen on the held-out set itself "
                    "(its numbers are then optimistic)", VALIDATION_NAME, s.data)
    loader_gen = torch.Generator().manual_seed(s.seed)
    train_loader = DataLoader(train_ds, batch_size=s.batch_size, shuffle=True, generator=loader_gen,
                              pin_memory=device.type == "cuda")

    torch.manual_seed(s.seed)
    model = build_model(model_cfg, device)
    set_conv_backward(model, s.conv_backward)
    optimizer = make_optimizer(model, s.lr, *([s.optimizer] if s.optimizer else []))
    steps_per_epoch = len(train_loader) if s.max_batches is None else min(len(train_loader), s.max_batches)
    total_steps = s.epochs * steps_per_epoch
    schedule = LRSchedule.for_run(s.lr, total_steps, s.lr_schedule, s.lr_warmup)
    known = train_ds.known_labels()  # unlabelled cases' placeholder labels never count
    loss_fn = MultiTaskLoss(class_prior=label_prior(known) if s.balance_classes and known else None)
    dropout_gen = torch.Generator().manual_seed(s.seed + 1)
    metrics_log = MetricsLog(out / "metrics.jsonl")
    result = CentralResult(run_dir=out)
    log.info("central training: %d training cases from %s, %d held-out cases, %s on %s", len(train_ds),
             [p.name for p in train_dirs], len(held_ds), model_cfg.family, device)

    config = {"kind": "central", **s.to_json_dict(), "device-resolved": str(device),
              "train-sites": [p.name for p in train_dirs], "heldout-dir": str(held_dir),
              "select-dir": str(select_dir) if select_ds is not None else str(held_dir)}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def evaluate(subsets_kind: str, dataset: Any = held_ds, threshold: float = DEFAULT_THRESHOLD) -> Any:
        # heldout_loader leaves torch's global RNG alone: training's dropout draws the same with or without evals
        return evaluate_model(model, dataset, subsets=subsets_kind, hd95=s.hd95, batch_size=max(s.batch_size, 4),
                              device=device, threshold=threshold)

    progress = _progress(s.progress)
    with progress:
        task = progress.add_task("central", total=s.epochs, status="")
        step = 0
        if s.initial_eval:
            report = evaluate(s.eval_subsets)
            result.initial = report.to_flat()
            metrics_log.write(0, "central-eval", "global", result.initial)
        for epoch in range(1, s.epochs + 1):
            train = train_epoch(model, train_loader, optimizer, loss_fn, device,
                                modality_dropout=model_cfg.modality_dropout,
                                modality_dropout_mode=model_cfg.modality_dropout_mode, generator=dropout_gen,
                                max_batches=s.max_batches, schedule=schedule, start_step=step,
                                single_modality_loss=model_cfg.single_modality_loss)
            step += int(train["steps"])
            metrics_log.write(epoch, "central-train", "global", train)
            entry: dict[str, Any] = {"epoch": epoch, **train, "eval": {}}
            last = epoch == s.epochs
            # like the ServerApp: the selection set chooses best.pt and the classifier's operating point, and the
            # held-out numbers are computed at that threshold (without a selection set it stays the default)
            calibrated: dict[str, float] = {}
            if last or (s.eval_every > 0 and epoch % s.eval_every == 0):
                selected = evaluate("full", select_ds) if select_ds is not None else None
                if selected is not None and selected.operating_threshold is not None:
                    calibrated = {"threshold": selected.operating_threshold}
                report = evaluate(s.final_subsets if last else s.eval_subsets, threshold=calibrated.get("threshold", DEFAULT_THRESHOLD))
                flat = report.to_flat()
                metrics_log.write(epoch, "central-eval", "global", flat)
                entry["eval"] = flat
                result.final = report
                selection = flat
                if selected is not None:
                    selection = selected.to_flat()
                    metrics_log.write(epoch, "central-select", "global", selection)
                value = selection.get(BEST_METRIC, math.nan)
                if math.isfinite(value) and value > result.best_value:
                    result.best_value, result.best_epoch = value, epoch
                    save_checkpoint(out / "checkpoints" / "best.pt", model.state_dict(), model_cfg, epoch=epoch,
                                    round=epoch, metrics=flat, best_metric=BEST_METRIC,
                                    selected_on=VALIDATION_NAME if select_ds is not None else HELDOUT_NAME,
                                    **calibrated)
            save_checkpoint(out / "checkpoints" / "last.pt", model.state_dict(), model_cfg, epoch=epoch,
                            round=epoch, metrics=entry["eval"], optimizer=optimizer.state_dict(), **calibrated)
            result.history.append(entry)
            dice = entry["eval"].get(BEST_METRIC)
            progress.update(task, advance=1, status=f"loss {train['loss']:.3f}"
                            + (f"  dice-whole {dice:.3f}" if dice is not None else ""))
    result.seconds = time.perf_counter() - t0
    return result


class _NoProgress:
    def __enter__(self) -> "_NoProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *a: Any, **k: Any) -> int:
        return 0

    def update(self, *a: Any, **k: Any) -> None:
        return None


def _progress(enabled: bool) -> Any:
    if not enabled:
        return _NoProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("epochs"),
                    TimeElapsedColumn(), TextColumn("{task.fields[status]}"))
