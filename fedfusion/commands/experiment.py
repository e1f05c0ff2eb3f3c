"""``fedfusion experiment NAME``: run a named experiment and write its table to docs/results.md."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from fedfusion.commands.help import BUDGETS_HELP, EXPERIMENTS_HELP

HELP = "Run a named experiment and write its table to docs/results.md. NAME: " + EXPERIMENTS_HELP


def command(
    name: Annotated[str, typer.Argument(help=EXPERIMENTS_HELP)],
    budget: Annotated[str, typer.Option("--budget", "-b", help=BUDGETS_HELP)] = "small",
    out: Annotated[Path, typer.Option("--out", help="Work folder for phantoms and run directories.")] = Path(
        "runs/experiments"),
    seed: Annotated[int, typer.Option("--seed", help="Seed of data, initialisation and site training.")] = 0,
    seeds: Annotated[Optional[int], typer.Option("--seeds", min=1, help="Seeds of the headline rows (default: the "
                                                 "budget's); the section says how many ran.")] = None,
    results: Annotated[Path, typer.Option("--results", help="Markdown file the table goes to (its own marked "
                                          "section; the rest of the file is kept).")] = Path("docs/results.md"),
    no_write: Annotated[bool, typer.Option("--no-write", help="Print the table only; leave the results file "
                                           "alone.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--quiet", help="Show per-run progress.")] = True,
) -> None:
    """Run experiment NAME (see simulations/experiments) and write its table between
    <!-- experiment-NAME:start --> and <!-- experiment-NAME:end --> in the results file."""
    from simulations import experiments
    from simulations.experiments.common import BUDGETS

    try:
        experiments.get(name)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="NAME") from exc
    if budget.strip().lower() not in BUDGETS:
        raise typer.BadParameter(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}",
                                 param_hint="--budget")
    argv = ["fedfusion", *sys.argv[1:]] if sys.argv and "experiment" in sys.argv else [
        "fedfusion", "experiment", name, "--budget", budget, "--seed", str(seed)]
    text = experiments.run(name, budget=budget, seed=seed, seeds=seeds, work=out.resolve(), results=results.resolve(),
                           command=shlex.join(argv), progress=progress, write=not no_write)
    if not no_write:
        typer.echo(text)
        typer.echo(f"\nwrote section experiment-{name} of {results}")
