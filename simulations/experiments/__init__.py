"""Named experiments (``fedfusion experiment NAME``): each trains a grid of runs and writes a table to its own
marked section of docs/results.md (``<!-- experiment-NAME:start -->`` ... ``<!-- experiment-NAME:end -->``).

============  =====================================================================================================
name          what it compares
============  =====================================================================================================
``fusion``    the five fusion families vs single-modality baselines, trained on the pooled sites
``missing``   25-75 % missing modalities per site x plain vs modality-aware aggregation, with and without FedProx on the encoders
``planner``   the privacy planner's verdict on private runs at case counts it was not calibrated on
``privacy``   cases per site x target epsilon (1-8, inf = no DP) x from scratch / public pretraining
``settings``  local-only at each site vs federated vs centralized pooled (upper bound), same optimizer steps
============  =====================================================================================================

Budgets (:data:`simulations.experiments.common.BUDGETS`): ``tiny`` (smoke), ``small`` (default), ``standard`` (the
powered comparisons: ~1 h per experiment on 2 cores, 3 seeds for headline rows).
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: Experiment name -> (module under simulations.experiments, one-line description).
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "fusion": ("fusion", "five fusion families vs single-modality baselines, pooled training"),
    "missing": ("missing", "missing modalities per site (25-75 %) x plain/modality-aware aggregation x encoder FedProx"),
    "planner": ("planner", "the privacy planner's verdict on private runs it was not calibrated on"),
    "privacy": ("privacy", "cases per site x epsilon x scratch / public pretraining, DP-SGD"),
    "settings": ("settings", "local-only vs federated vs centralized pooled training"),
}


def get(name: str) -> ModuleType:
    """The experiment module (exposing ``NAME``, ``TITLE``, ``GRID`` where it has one, and ``run(ctx) -> str``).

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    key = name.strip().lower()
    if key not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    return importlib.import_module(f"{__name__}.{EXPERIMENTS[key][0]}")


def run(name: str, budget: str = "small", seed: int = 0, seeds: int | None = None, **context: object) -> str:
    """Run experiment ``name`` at ``budget`` with ``seed`` and return the Markdown it wrote.

    ``seeds`` overrides the budget's number of seeds for headline rows (the section says how many ran). Extra keyword
    arguments go to :class:`simulations.experiments.common.Context` (``work``, ``results``, ``command``,
    ``progress``, ``write``).
    """
    from dataclasses import replace

    from .common import Context, budget_of

    module = get(name)
    chosen = budget_of(budget)
    if seeds is not None:
        if int(seeds) < 1:
            raise ValueError(f"seeds must be >= 1, got {seeds}")
        chosen = replace(chosen, seeds=int(seeds))
    ctx = Context(budget=chosen, seed=int(seed), **context)  # type: ignore[arg-type]
    return module.run(ctx)
