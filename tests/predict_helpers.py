"""Shared set-up of the prediction and bundle tests: tiny DICOM phantoms and a tiny trained-looking run directory
(checkpoint + config.json + metrics.jsonl with per-subset held-out rows and per-site privacy rows)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from common.runconfig import default_model_config
from models.checkpoint import save_checkpoint
from models.config import ModelConfig
from models.modalities import subset_name, subsets
from models.network import build_model
from models.runlog import MetricsLog
from simulations.phantom_writers import generate

SHAPE = (8, 16, 16)
TINY: ModelConfig = default_model_config(family="attention", spatial_size=SHAPE, channels=(4, 8))
#: the run's held-out Dice of subset s at round r (distinct per subset and round, so a wrong row is caught)
FINAL_ROUND = 3
BEST_ROUND = 2


def dice_of(subset: tuple[str, ...], rnd: int) -> float:
    return round(0.1 * rnd + 0.01 * len(subset) + 0.001 * len(subset_name(subset)), 6)


@dataclass
class TinyRun:
    data: Path          # phantom data root (site-01, heldout)
    run_dir: Path
    checkpoint: Path    # RUN/checkpoints/best.pt (round BEST_ROUND)
    model: ModelConfig


def make_tiny_run(root: Path, threshold: float | None = None) -> TinyRun:
    """Phantoms (1 site x 1 case, 3 held-out DICOM studies of every modality) and a run directory whose best.pt
    (random weights, seed 0) comes from round ``BEST_ROUND`` of ``FINAL_ROUND``."""
    data = root / "data"
    generate(data, sites=1, cases_per_site=1, seed=0, shape=SHAPE, fmt="dicom", heldout_cases=3)
    run_dir = root / "run"
    torch.manual_seed(0)
    model = build_model(TINY)
    run_config = {"data-dir": str(data), "test-dir": "", "run-dir": str(run_dir), "best-metric": "all/dice-whole"}
    extra = {"round": BEST_ROUND, "metric": "all/dice-whole", "value": 0.5, "run_config": run_config}
    if threshold is not None:
        extra["threshold"] = threshold
    save_checkpoint(run_dir / "checkpoints" / "best.pt", model.state_dict(), TINY, **extra)
    log = MetricsLog(run_dir / "metrics.jsonl")
    for rnd in range(1, FINAL_ROUND + 1):
        for site, eps in (("site-01", 1.5), ("site-02", 2.5)):
            log.write(rnd, "train", site, {"num-examples": 4, "dp-enabled": 1.0, "epsilon-total": eps * rnd,
                                           "delta": 1e-5})
        flat = {}
        for s in subsets(TINY.modalities):
            flat[f"{subset_name(s)}/dice-whole"] = dice_of(s, rnd)
            flat[f"{subset_name(s)}/accuracy"] = 0.5 + 0.01 * rnd
            flat[f"{subset_name(s)}/cases"] = 3.0
        log.write(rnd, "server-eval", "global", flat)
    return TinyRun(data, run_dir, run_dir / "checkpoints" / "best.pt", TINY)
