#!/usr/bin/env python3
"""Copy the fedfusion Flower app to a folder for `flwr run FOLDER fedfusion` (without rewriting pyproject.toml).

    python deploy/scripts/stage_app.py build/app
    flwr run build/app fedfusion --run-config 'num-server-rounds=20 run-dir="/var/lib/fedfusion/runs/first"'

Flower 1.41's `flwr run .` migrates a `[tool.flwr.federations]` table of pyproject.toml to ~/.flwr/config.toml and
comments it out in pyproject.toml; it also packs every *.json/*.md below the folder. The staged copy holds only
pyproject.toml (without that table) and the app's Python packages. Re-run it after changing the code.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common.flwr_cli import stage_app  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if len(sys.argv) == 2 else 2)
    print(stage_app(Path(sys.argv[1]).resolve()))
