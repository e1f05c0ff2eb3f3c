#!/usr/bin/env python3
"""Make a deployment's key material without the `fedfusion` entry point (same code as `fedfusion certs`).

    python deploy/certs.py --out deploy/certs --hosts superlink.example.org,10.0.0.5 --supernodes 3
    python deploy/certs.py --out /etc/fedfusion --site-key site-01      # at a site: its own key pair only

See deploy/README.md for which file goes where; private keys (*.key) never leave the machine they belong to.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import typer  # noqa: E402

from fedfusion.commands.certs import command  # noqa: E402

if __name__ == "__main__":
    typer.run(command)
