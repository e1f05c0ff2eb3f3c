"""One timed federated simulation for the federation benches (``round_overhead.py``, ``scale.py``).

Runs :func:`simulations.simulate.simulate` in a fresh run directory with the phase timings on
(:mod:`common.timings`), then reads where each round's wall time went (:mod:`simulations.round_phases`). Also
notes the load average before and after: the benches run on machines shared with other jobs, and the ratios they
report (wall / ideal, both measured in the same run) are what stays comparable from one run to the next.
"""

from __future__ import annotations

import os

# before torch loads libgomp, as `fedfusion simulate` does: the ServerApp's evaluation threads must not spin on
# cores the sites (and other jobs) need. The benches import this module before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import shutil  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from common import timings  # noqa: E402
from simulations.observer import SimulationResult  # noqa: E402
from simulations.round_phases import RoundSplit, read_round_splits, startup_seconds  # noqa: E402

__all__ = ["TimedRun", "run_timed"]


@dataclass
class TimedRun:
    """A finished simulation and where its time went."""

    result: SimulationResult
    splits: list[RoundSplit]
    startup: float
    prepare: float
    load_before: float
    load_after: float
    timings_file: Path



def run_timed(run_dir: Path, data: Path, overrides: Mapping[str, Any], *, permit: bool = True,
              **simulate_args: Any) -> TimedRun:
    """Simulate the federation of ``data`` with run config ``overrides`` in ``run_dir`` (emptied first: no privacy
    ledger carries over from an earlier bench run); the run writes its phase timings to ``RUN/timings.jsonl``."""
    from simulations.experiments.common import permit_experiment_policies
    from simulations.simulate import TIMINGS_FILE, simulate

    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    if permit:
        permit_experiment_policies(run_dir, data)
    load_before = os.getloadavg()[0]
    os.environ.pop(timings.ENV, None)  # the run's own file, not one a caller's environment names
    result = simulate(run_dir, data=data, overrides=dict(overrides), progress=False, report=False, **simulate_args)
    timings_file = run_dir / TIMINGS_FILE
    splits = read_round_splits(run_dir, timings_file)
    startup, prepare = startup_seconds(splits, timings_file)
    return TimedRun(result=result, splits=splits, startup=startup, prepare=prepare, load_before=load_before,
                    load_after=os.getloadavg()[0], timings_file=timings_file)
