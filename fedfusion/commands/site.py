"""``fedfusion site``: a hospital's site daemon (checks the data, writes the privacy policy, runs the SuperNode).

See :mod:`client.daemon` and docs/site.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from client.daemon import DEFAULT_RUNTIME_PORT


def command(
    data: Annotated[Path, typer.Option("--data", help="The site folder: case folders + labels.csv.")],
    superlink: Annotated[str, typer.Option("--superlink", help="SuperLink Fleet API address HOST:PORT.")],
    state: Annotated[
        Optional[Path],
        typer.Option("--state", help="Site state folder (privacy ledger, policy, caches). Default: <data>-state."),
    ] = None,
    root_certificates: Annotated[
        Optional[Path], typer.Option("--root-certificates", help="CA certificate (PEM) that signed the SuperLink's.")
    ] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS (local tests only).")] = False,
    auth_private_key: Annotated[
        Optional[Path], typer.Option("--auth-private-key", help="This SuperNode's private key (node authentication).")
    ] = None,
    auth_public_key: Annotated[
        Optional[Path], typer.Option("--auth-public-key", help="Accepted for old scripts; Flower derives it.")
    ] = None,
    max_epsilon: Annotated[
        Optional[float], typer.Option("--max-epsilon", help="Lifetime epsilon ceiling of this site (policy).")
    ] = None,
    max_delta: Annotated[Optional[float], typer.Option("--max-delta", help="Largest delta accepted (policy).")] = None,
    min_noise_multiplier: Annotated[
        Optional[float], typer.Option("--min-noise-multiplier", help="Smallest noise multiplier accepted (policy).")
    ] = None,
    max_grad_norm: Annotated[
        Optional[float], typer.Option("--max-grad-norm", help="Largest clipping norm accepted (policy).")
    ] = None,
    allow_no_dp: Annotated[
        Optional[bool],
        typer.Option("--allow-no-dp/--no-allow-no-dp", help="Whether runs may train without DP (policy)."),
    ] = None,
    secure_mode: Annotated[
        Optional[bool],
        typer.Option("--secure-mode/--no-secure-mode",
                     help="Production lock: refuse a policy with reproducible-noise (policy)."),
    ] = None,
    allow_app: Annotated[
        Optional[list[str]],
        typer.Option("--allow-app", help="SHA-256 of an app (FAB) this site runs (`fedfusion app-hash APP`); "
                                         "repeat for several; replaces the policy's allowed-apps."),
    ] = None,
    series_map: Annotated[
        Optional[Path], typer.Option("--series-map", help="SeriesDescription -> modality rules (JSON/TOML).")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda[:N].")] = "auto",
    num_threads: Annotated[int, typer.Option("--num-threads", help="Torch CPU threads (0 = default).")] = 0,
    site_index: Annotated[
        Optional[int], typer.Option("--site-index", help="This site's number in the federation's logs.")
    ] = None,
    runtime_port: Annotated[
        int, typer.Option("--runtime-port", help="Local runtime API port (two SuperNodes on one machine).")
    ] = DEFAULT_RUNTIME_PORT,
    isolation: Annotated[
        Optional[str], typer.Option("--isolation", help="flower-supernode --isolation (subprocess | process).")
    ] = None,
    max_retries: Annotated[Optional[int], typer.Option("--max-retries", help="Reconnection attempts.")] = None,
    max_wait_time: Annotated[Optional[float], typer.Option("--max-wait-time", help="Reconnection time, s.")] = None,
    warm_cache: Annotated[
        bool,
        typer.Option("--warm-cache/--no-warm-cache",
                     help="Preprocess the site's cases at start-up for the shipped run config (state/preprocessed)."),
    ] = True,
    warm_clientapps: Annotated[
        bool,
        typer.Option("--warm-clientapps/--no-warm-clientapps",
                     help="Load torch, Opacus and MONAI once and fork each message's ClientApp process from here "
                          "(off: Flower starts a fresh interpreter per message)."),
    ] = True,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Check data, write the policy, print the SuperNode command; no start.")
    ] = False,
) -> None:
    """Check the site data (refuse to start without a usable case), then run Flower's SuperNode with fedfusion's
    node config until it stops; SIGINT/SIGTERM are forwarded."""
    import logging

    from client.daemon import DaemonError, SiteOptions, main_argv_summary, prepare, run

    logging.getLogger("fedfusion").setLevel(logging.INFO)
    opts = SiteOptions(
        data=data, superlink=superlink, state=state, root_certificates=root_certificates, insecure=insecure,
        auth_private_key=auth_private_key, auth_public_key=auth_public_key, series_map=series_map, device=device,
        num_threads=num_threads, site_index=site_index, runtime_port=runtime_port, isolation=isolation,
        max_retries=max_retries, max_wait_time=max_wait_time, max_epsilon=max_epsilon, max_delta=max_delta,
        min_noise_multiplier=min_noise_multiplier, max_grad_norm=max_grad_norm, allow_no_dp=allow_no_dp,
        secure_mode=secure_mode, allowed_apps=tuple(allow_app) if allow_app else None, warm_cache=warm_cache,
        warm_clientapps=warm_clientapps,
    )
    try:
        if dry_run:
            typer.echo(main_argv_summary(prepare(opts)))
            return
        code = run(opts)
    except DaemonError as exc:
        typer.echo(f"fedfusion site: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    raise typer.Exit(code)
