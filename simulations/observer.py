"""What every federated run is watched with, whichever engine runs it: the Ray backend resources, wall clock,
whole-process-tree peak memory, the progress display, and the final global metrics.

Shared by Flower's in-process simulation engine (:mod:`simulations.simulate`) and the ``flwr run`` path
(:mod:`simulations.flwr_run`), so neither imports the other for it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.processes import tree_rss_mb
from common.runconfig import ConfigValue
from models.runlog import is_site_scope, iter_metrics

__all__ = ["RunObserver", "SimulationResult", "backend_config", "final_global_metrics", "parallel_sites"]


@dataclass
class SimulationResult:
    """What a finished simulation left behind."""

    run_dir: Path
    rounds: int
    num_sites: int
    wall_seconds: float
    peak_rss_mb: float
    final_metrics: dict[str, float] = field(default_factory=dict)
    report: Path | None = None


def backend_config(num_sites: int, cpus_per_site: float | None = None) -> dict[str, Any]:
    """Ray backend resources for this machine: one CPU per virtual site by default (so at most ``nproc``
    sites train at once and none oversubscribes the CPU), and a fair GPU share per site when GPUs exist."""
    import torch

    ncpu = os.cpu_count() or 1
    cpus = float(cpus_per_site or 1)
    ngpu = torch.cuda.device_count()
    # A site's share of one GPU: let up to 4 sites share a device (small models), never more than exist.
    gpus = min(1.0, ngpu / min(num_sites, 4 * ngpu)) if ngpu else 0.0
    return {
        "client_resources": {"num_cpus": cpus, "num_gpus": gpus},
        "init_args": {
            "num_cpus": ncpu,
            "num_gpus": ngpu,
            "include_dashboard": False,
            "logging_level": logging.ERROR,
            "log_to_driver": False,
        },
    }


def parallel_sites(num_sites: int, cpus_per_site: float | None = None) -> int:
    """Virtual sites that train at once on this machine under :func:`backend_config` (one Ray worker per
    ``cpus_per_site`` CPUs, at most one per site)."""
    return max(1, min(num_sites, int((os.cpu_count() or 1) // float(cpus_per_site or 1))))


def _peak_rss_mb() -> float:
    """Peak resident memory of this process and its (Ray worker) children, MiB."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024.0


class _MemorySampler(threading.Thread):
    """Samples the resident memory of the whole process tree (Ray workers included) to find the peak."""

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak_mb = 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak_mb = max(self.peak_mb, tree_rss_mb())
            self._stop_event.wait(self.interval)

    def stop(self) -> float:
        self._stop_event.set()
        self.peak_mb = max(self.peak_mb, tree_rss_mb())
        return self.peak_mb


def _progress_watcher(metrics_path: Path, rounds: int, num_sites: int, stop: threading.Event) -> None:
    """Show round, phase, sites done and the current global Dice by tailing the metrics log."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]round {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        transient=False,
    ) as progress:
        task = progress.add_task("rounds", total=rounds, status="starting sites…")
        while not stop.wait(1.0):
            last_round, phase, dice, sites = 0, "starting", None, 0
            per_round_sites: dict[int, set[str]] = {}
            for rec in iter_metrics(metrics_path):
                phase = rec["phase"]
                if rec["phase"] == "train" and is_site_scope(rec["scope"]):
                    per_round_sites.setdefault(rec["round"], set()).add(rec["scope"])
                if rec["phase"] == "server-eval" and rec["metric"] == "all/dice-whole":
                    last_round, dice = rec["round"], rec["value"]
            if per_round_sites:
                r = max(per_round_sites)
                sites = len(per_round_sites[r])
            dice_txt = f"global Dice {dice:.3f}" if isinstance(dice, float) else "global Dice —"
            progress.update(
                task,
                completed=last_round,
                status=f"{phase} · sites done {sites}/{num_sites} · {dice_txt}",
            )


class RunObserver:
    """Wall clock, whole-process-tree peak memory and (optionally) the progress display around one federated run;
    the same for both engines. Use as a context manager, then :meth:`result`."""

    def __init__(self, run_config: Mapping[str, ConfigValue], num_sites: int, progress: bool) -> None:
        self.run_dir = Path(str(run_config["run-dir"])).resolve()
        self.rounds = int(run_config["num-server-rounds"])
        self.num_sites = num_sites
        self.progress = progress
        self.wall_seconds = 0.0
        self.peak_rss_mb = 0.0
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._sampler = _MemorySampler()
        self._t0 = 0.0

    def __enter__(self) -> "RunObserver":
        if self.progress:
            self._watcher = threading.Thread(
                target=_progress_watcher,
                args=(self.run_dir / "metrics.jsonl", self.rounds, self.num_sites, self._stop),
                daemon=True,
            )
            self._watcher.start()
        self._sampler.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_seconds = time.perf_counter() - self._t0
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        self.peak_rss_mb = max(self._sampler.stop(), _peak_rss_mb())

    def result(self) -> SimulationResult:
        return SimulationResult(
            run_dir=self.run_dir,
            rounds=self.rounds,
            num_sites=self.num_sites,
            wall_seconds=self.wall_seconds,
            peak_rss_mb=self.peak_rss_mb,
            final_metrics=final_global_metrics(self.run_dir / "metrics.jsonl"),
        )


def final_global_metrics(metrics_path: Path) -> dict[str, float]:
    last: dict[str, float] = {}
    last_round = -1
    for rec in iter_metrics(metrics_path):
        if rec["phase"] != "server-eval" or rec["scope"] != "global" or rec["value"] is None:
            continue
        if rec["round"] > last_round:
            last_round, last = rec["round"], {}
        last[rec["metric"]] = rec["value"]
    return last
