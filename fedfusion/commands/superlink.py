"""``fedfusion superlink``: Flower's SuperLink with the Control API on an administrators-only listener.

See :mod:`fedfusion.superlink` and deploy/README.md.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from fedfusion.deployment import DEFAULT_CONTROL_ADDRESS


def command(
    fleet_address: Annotated[
        str, typer.Option("--fleet-address", help="HOST:PORT of the Fleet API listener the sites connect to.")
    ],
    control_address: Annotated[
        str, typer.Option("--control-address",
                          help="HOST:PORT of the Control (+ Runtime) API listener: administrators only.")
    ] = DEFAULT_CONTROL_ADDRESS,
    flower_args: Annotated[
        Optional[list[str]],
        typer.Argument(help="After --: flower-superlink's own options (TLS, --enable-supernode-auth, --database, "
                            "...), except --host/--port."),
    ] = None,
) -> None:
    """Run Flower's SuperLink: the Fleet API on --fleet-address, everything else on --control-address only."""
    from fedfusion.superlink import serve

    try:
        serve(flower_args or [], fleet_address=fleet_address, control_address=control_address)
    except ValueError as exc:
        typer.echo(f"fedfusion superlink: {exc}", err=True)
        raise typer.Exit(2) from None
