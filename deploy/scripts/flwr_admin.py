#!/usr/bin/env python3
"""Run a ``flwr`` command against the SuperLink's Control API (administrators only), with the connection written.

    python deploy/scripts/flwr_admin.py --superlink 127.0.0.1:9093 --root-certificates ca.pem -- flwr ls fedfusion

Writes the ``fedfusion`` connection to ``$FLWR_HOME/config.toml`` (``--flwr-home``; default ``$FLWR_HOME`` or
``~/.flwr``), then replaces itself with the given command. The compose file's ``admin`` service runs it inside the
SuperLink's network namespace, where the Control API listens on loopback (see deploy/README.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common import flwr_cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" not in args or args.index("--") == len(args) - 1:
        print(__doc__, file=sys.stderr)
        return 2
    split = args.index("--")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--superlink", required=True, help="HOST:PORT of the Control API")
    p.add_argument("--root-certificates", type=Path, required=True, help="the deployment's ca.pem")
    p.add_argument("--flwr-home", type=Path, default=None, help="FLWR_HOME to write the connection to")
    ours = p.parse_args(args[:split])
    home = ours.flwr_home or Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    flwr_cli.write_flwr_home(home, ours.superlink, ours.root_certificates)
    os.environ["FLWR_HOME"] = str(home)
    command = args[split + 1:]
    os.execvp(command[0], command)
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
