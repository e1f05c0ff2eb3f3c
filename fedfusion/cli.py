"""The ``fedfusion`` command line.

Each subcommand lives in its own module under :mod:`fedfusion.commands` and exposes one typer-annotated
function named ``command``; heavy imports (torch, flwr) happen inside those functions so ``--help`` is fast.
"""

from __future__ import annotations

import importlib
import logging
import os

# Flower reads this at import time; fedfusion runs offline at hospitals and never phones home.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import typer

#: (subcommand name, module under fedfusion.commands, one-line help)
COMMANDS: list[tuple[str, str, str]] = [
    ("phantoms", "phantoms", "Generate multi-site multimodal phantom studies (DICOM or NIfTI)."),
    ("inspect", "inspect", "Check a site (or a folder of sites) and report cases, modalities and problems."),
    ("train-central", "train_central", "Train a fusion network on pooled sites (the centralized upper bound)."),
    ("evaluate", "evaluate", "Evaluate a checkpoint on a held-out set, for every modality subset."),
    ("site", "site", "Run a hospital's site daemon (a Flower SuperNode with fedfusion's ClientApp)."),
    ("superlink", "superlink", "Run the coordinator's SuperLink, its Control API on an administrators-only address."),
    ("app-hash", "app_hash", "Print the SHA-256 of an app (FAB) for a site to pin with `site --allow-app`."),
    ("privacy-plan", "privacy_plan", "Plan a site's DP: noise, noise-to-signal, will it learn, lifetime budget."),
    ("pretrain", "pretrain", "Pretrain a model on public data (supervised or self-supervised) for --init."),
    ("simulate", "simulate", "Run a local multi-site federated simulation end to end, with a report."),
    ("report", "report", "(Re)build the report of a run directory."),
    ("experiment", "experiment", "Run a named experiment and write its table to docs/results.md."),
    ("predict", "predict", "Segment and classify new studies: DICOM SEG, NIfTI on the source grid and a JSON."),
    ("export", "export", "Export a checkpoint as a plain state dict or a MONAI bundle."),
    ("certs", "certs", "Make the CA, SuperLink certificate and SuperNode keys for a deployment."),
]

app = typer.Typer(
    name="fedfusion",
    help="Federated multi-site training of multimodal fusion networks for medical imaging.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _register() -> None:
    for name, module, help_text in COMMANDS:
        qualified = f"fedfusion.commands.{module}"
        try:
            mod = importlib.import_module(qualified)
        except ModuleNotFoundError as exc:
            if exc.name == qualified:  # command not built yet in this checkout
                continue
            raise
        # a command module may derive a longer help from its registry (``HELP``); typer shows no argument help
        app.command(name=name, help=getattr(mod, "HELP", help_text))(mod.command)


_register()


def main() -> None:
    # fedfusion's own modules speak at INFO; third-party libraries (alembic, ray, ...) only when something is wrong.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("fedfusion", "client", "server", "models", "simulations"):
        logging.getLogger(name).setLevel(logging.INFO)
    # Flower's logger has its own console handler; propagating too would print every line twice.
    logging.getLogger("flwr").propagate = False
    app()


if __name__ == "__main__":
    main()
