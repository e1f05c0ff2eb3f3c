"""``fedfusion privacy-plan``: before agreeing to a run, what noise a site trains with, whether the model will
learn under it, and what the run costs the site's lifetime budget (:mod:`client.privacy.planner`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer


def command(
    cases: Annotated[int, typer.Option("--cases", help="The site's patients (privacy units; before the evaluation "
                                       "hold-out).")],
    epsilon: Annotated[Optional[float], typer.Option("--epsilon", help="Target epsilon of the run (run config "
                                                     "dp-target-epsilon).")] = None,
    delta: Annotated[Optional[float], typer.Option(help="delta (dp-delta).")] = None,
    batch: Annotated[Optional[int], typer.Option(help="Expected batch (batch-size).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Local epochs per round (local-epochs).")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="Rounds (num-server-rounds).")] = None,
    trainable: Annotated[Optional[str], typer.Option(help="all, shared, head or none, optionally +modality, e.g. "
                                                     "head+ct+us (dp-trainable).")] = None,
    multiplicity: Annotated[Optional[int], typer.Option(help="Augmented views per case (augment-multiplicity).")] = None,
    accountant: Annotated[Optional[str], typer.Option(help="rdp or prv (dp-accountant).")] = None,
    sites: Annotated[int, typer.Option(help="Sites whose updates are averaged each round.")] = 1,
    modalities: Annotated[Optional[str], typer.Option(help="The modalities the site has, comma-separated (default: "
                                                      "all of the model's); the others' encoders are not trained "
                                                      "there.")] = None,
    state: Annotated[Optional[Path], typer.Option("--state", help="The site's state directory: its policy and "
                                                  "ledger (read only) enter the budget.")] = None,
    client_dp: Annotated[bool, typer.Option("--client-dp", help="Also plan client-level DP (client-dp, "
                                            "client-dp-noise, client-dp-clip) over --sites.")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Any run config key: --set optimizer=sgd "
                                                      "(repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Print the noise multiplier (the site's own calibration), the noise per coordinate, the expected
    noise-to-signal ratio of the trained part, a verdict with its rule, and the site's lifetime budget."""
    from rich.console import Console

    from client.privacy.planner import plan, plan_client_level
    from common.runconfig import RunConfigError, parse_assignments

    err = Console(stderr=True)
    try:
        overrides: dict[str, object] = dict(parse_assignments(set_))
        named = {"dp-target-epsilon": epsilon, "dp-delta": delta, "batch-size": batch, "local-epochs": epochs,
                 "num-server-rounds": rounds, "dp-trainable": trainable, "augment-multiplicity": multiplicity,
                 "dp-accountant": accountant}
        overrides.update({k: v for k, v in named.items() if v is not None})
        if state is not None and not state.is_dir():
            raise ValueError(f"--state {state} is not a directory (a site's state directory holds its ledger)")
        mods = [m.strip() for m in modalities.split(",") if m.strip()] if modalities else None
        site = plan(overrides, patients=cases, sites=sites, state_dir=state, site_modalities=mods)
        client = plan_client_level({"client-dp": "server-side", **overrides}, sites=sites) if client_dp else None
    except (RunConfigError, ValueError) as exc:
        err.print(f"[red]fedfusion privacy-plan: {exc}[/red]")
        raise typer.Exit(2) from exc
    if as_json:
        typer.echo(json.dumps({"site": site.to_dict(), "client-level": client.to_dict() if client else None},
                              indent=2))
        return
    for line in site.lines() + (client.lines() if client else []):
        typer.echo(line)
