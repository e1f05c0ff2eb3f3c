"""The server's run directory: config, per-round checkpoints (atomic), best model, and resume state.

Layout (see docs/architecture.md)::

    RUN/config.json            resolved run config (written at start, atomically)
    RUN/metrics.jsonl          models.runlog.MetricsLog
    RUN/checkpoints/last.pt    after every completed round
    RUN/checkpoints/best.pt    best global model by run config `best-metric`

``last.pt`` is a :func:`models.checkpoint.save_checkpoint` file whose ``extra`` holds ``round`` (the last
completed round), ``strategy_state`` (e.g. FedAdam's ``m_t``/``v_t``, the validator's norm history, the node ids
declined for a spent privacy budget), ``run_config``, ``best`` (metric, value, round) and, with ``server-ema``,
``ema`` (the moving average of the global weights, which ``best.pt`` holds).
Because a round's metrics are logged before its checkpoint is renamed into place, resuming from ``last.pt`` at
round ``r`` and dropping log entries of rounds ``> r`` never loses or doubles a round.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.atomic import atomic_write_text
from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import ModelConfig
from models.metrics import lower_is_better



def pick_metric(flat: Mapping[str, float], metric: str) -> tuple[str, float] | None:
    """Find ``metric`` in global eval metrics: exact key, else ``all/<metric>``, else ``mean/<metric>``.

    Returns the key found and its value, or ``None`` if absent or not finite.
    """
    for key in (metric, f"all/{metric}", f"mean/{metric}"):
        if key in flat:
            value = float(flat[key])
            return (key, value) if math.isfinite(value) else None
    return None


@dataclass
class ResumeState:
    """What a run directory's ``last.pt`` says about where the run stopped."""

    round: int
    state_dict: dict[str, torch.Tensor]
    model_config: ModelConfig
    strategy_state: dict[str, Any] = field(default_factory=dict)
    run_config: dict[str, Any] = field(default_factory=dict)
    best: dict[str, Any] | None = None
    ema: dict[str, torch.Tensor] | None = None


class RunDirectory:
    """Paths and atomic writes of one run directory."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.last = self.checkpoints / "last.pt"
        self.best_path = self.checkpoints / "best.pt"
        self.config = self.path / "config.json"
        self.metrics = self.path / "metrics.jsonl"

    def write_config(self, run_config: Mapping[str, Any]) -> None:
        atomic_write_text(self.config, json.dumps(dict(run_config), indent=2, sort_keys=True) + "\n")

    def save_round(
        self,
        server_round: int,
        state_dict: Mapping[str, torch.Tensor],
        model_config: ModelConfig,
        *,
        strategy_state: Mapping[str, Any],
        run_config: Mapping[str, Any],
        best: Mapping[str, Any] | None,
        ema: Mapping[str, torch.Tensor] | None = None,
        threshold: float | None = None,
    ) -> None:
        """Write ``last.pt`` for the completed ``server_round`` (atomic write-then-rename); ``ema``: the server's
        moving average of the global weights (:mod:`server.ema`), when the run keeps one; ``threshold``: the
        decision threshold calibrated on the selection set this round (``None``: none was)."""
        save_checkpoint(
            self.last,
            dict(state_dict),
            model_config,
            round=int(server_round),
            strategy_state=dict(strategy_state),
            run_config=dict(run_config),
            best=dict(best) if best else None,
            **({"ema": dict(ema)} if ema is not None else {}),
            **({"threshold": float(threshold)} if threshold is not None else {}),
        )

    def save_best(
        self,
        server_round: int,
        state_dict: Mapping[str, torch.Tensor],
        model_config: ModelConfig,
        *,
        metric: str,
        value: float,
        run_config: Mapping[str, Any],
        selected_on: str,
        threshold: float | None = None,
    ) -> None:
        """Write ``best.pt``; ``selected_on`` names the cohort the metric was measured on (the selection set, or the
        reporting held-out set when there is none); ``threshold``: the decision threshold calibrated there."""
        save_checkpoint(
            self.best_path,
            dict(state_dict),
            model_config,
            round=int(server_round),
            metric=metric,
            value=float(value),
            run_config=dict(run_config),
            selected_on=selected_on,
            **({"threshold": float(threshold)} if threshold is not None else {}),
        )

    def load_resume(self) -> ResumeState:
        """Read ``last.pt``.

        Raises:
            FileNotFoundError: when the run has no ``last.pt`` (nothing to resume), naming the path.
            ValueError: when ``last.pt`` is not a fedfusion server checkpoint.
        """
        if not self.last.is_file():
            raise FileNotFoundError(
                f"cannot resume {self.path}: {self.last} does not exist (the run never completed a round); "
                "start it afresh without `resume`"
            )
        state_dict, config, extra = load_checkpoint(self.last)
        if "round" not in extra:
            raise ValueError(f"{self.last} has no round number: it is not a fedfusion server checkpoint")
        return ResumeState(
            round=int(extra["round"]),
            state_dict=state_dict,
            model_config=config,
            strategy_state=dict(extra.get("strategy_state") or {}),
            run_config=dict(extra.get("run_config") or {}),
            best=extra.get("best"),
            ema=extra.get("ema"),
        )


def best_record(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What ``RUN/checkpoints/best.pt`` says of itself: ``round``, ``metric``, ``value``, ``selected_on`` (``None``
    when the run wrote none, or it cannot be read)."""
    try:
        _, _, extra = load_checkpoint(RunDirectory(run_dir).best_path)
    except (OSError, ValueError):
        return None
    return {k: extra.get(k) for k in ("round", "metric", "value", "selected_on")}


class BestTracker:
    """Keeps the best value of one global metric and says when a round beats it."""

    def __init__(self, metric: str, state: Mapping[str, Any] | None = None) -> None:
        self.metric = metric
        self.key: str | None = None
        self.value: float | None = None
        self.round: int | None = None
        if state and state.get("metric") == metric:
            self.key = state.get("key")
            self.value = state.get("value")
            self.round = state.get("round")

    def update(self, server_round: int, flat: Mapping[str, float]) -> bool:
        """Record ``flat``'s value of the metric; ``True`` if it is a new best."""
        found = pick_metric(flat, self.metric)
        if found is None:
            return False
        key, value = found
        better = (
            self.value is None
            or (value < self.value if lower_is_better(self.metric) else value > self.value)
        )
        if better:
            self.key, self.value, self.round = key, value, int(server_round)
        return better

    def state(self) -> dict[str, Any] | None:
        if self.value is None:
            return None
        return {"metric": self.metric, "key": self.key, "value": self.value, "round": self.round}
