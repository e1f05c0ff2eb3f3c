"""``fedfusion app-hash``: the SHA-256 a site pins (``fedfusion site --allow-app``) to run exactly one app version.

See :mod:`client.supernode_guard` and docs/site.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def command(
    app: Annotated[Path, typer.Argument(help="The app folder `flwr run` submits (e.g. build/app) or a .fab file.")],
) -> None:
    """Print the SHA-256 of the app's FAB: the digest the site's SuperNode checks before it runs a run's app."""
    from client.supernode_guard import app_sha256

    try:
        typer.echo(app_sha256(app))
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"fedfusion app-hash: {exc}", err=True)
        raise typer.Exit(2) from None
