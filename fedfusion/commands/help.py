"""Help texts of the CLI options that name a registered thing, derived from the registries (never re-listed).

Each registry is cheap to import (names only): :data:`models.fusion.FUSIONS`, :data:`server.strategies.STRATEGIES`,
:data:`simulations.scenarios.SCENARIOS`, :data:`simulations.experiments.EXPERIMENTS` and the experiment budgets.
"""

from __future__ import annotations

from models.fusion import FUSIONS
from server.strategies import STRATEGIES
from simulations.experiments import EXPERIMENTS
from simulations.experiments.common import BUDGETS
from simulations.scenarios import SCENARIOS

__all__ = ["BUDGETS_HELP", "EXPERIMENTS_HELP", "FAMILIES_HELP", "SCENARIOS_HELP", "STRATEGIES_HELP"]

FAMILIES_HELP = "Fusion family (run config model-family): " + ", ".join(FUSIONS) + "."
STRATEGIES_HELP = "Server strategy (run config strategy): " + "; ".join(
    f"{name} ({desc})" for name, (_builder, desc) in STRATEGIES.items()) + "."
SCENARIOS_HELP = "Phantom scenario: " + ", ".join(SCENARIOS) + "."
EXPERIMENTS_HELP = "Experiment: " + "; ".join(f"{name} ({desc})" for name, (_mod, desc) in EXPERIMENTS.items()) + "."
BUDGETS_HELP = "Budget: " + "; ".join(f"{name} ({b.describe()})" for name, b in BUDGETS.items()) + "."
