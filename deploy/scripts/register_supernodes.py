#!/usr/bin/env python3
"""Register SuperNode public keys at a SuperLink (idempotent: an already registered key is fine).

    python deploy/scripts/register_supernodes.py --superlink superlink.example.org:9092 \
        --root-certificates certs/ca/ca.pem certs/supernodes/*/node.pub

Runs ``flwr supernode register KEY fedfusion`` for each key, with a Flower connection named ``fedfusion`` written
to ``$FLWR_HOME/config.toml`` (``--flwr-home``; default: keep an existing file, else ``~/.flwr``). Waits up to
``--wait`` seconds for the SuperLink to answer first (the compose file starts it right before this).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common import flwr_cli  # noqa: E402
from fedfusion import deployment as dep  # noqa: E402

ALREADY = "already in use"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("public_keys", nargs="+", type=Path, help="node.pub files (OpenSSH EC public keys)")
    p.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    p.add_argument("--root-certificates", type=Path, help="CA certificate (ca.pem) the SuperLink's certificate chains to")
    p.add_argument("--insecure", action="store_true", help="SuperLink without TLS (test networks only; prints a warning)")
    p.add_argument("--flwr-home", type=Path, default=None, help="FLWR_HOME to write the connection to")
    p.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the SuperLink to answer")
    args = p.parse_args(argv)

    flwr_home = args.flwr_home or Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    if args.insecure:
        dep.warn_insecure()
    elif args.root_certificates is None or not args.root_certificates.is_file():
        p.error("--root-certificates CA.pem is required (or --insecure on a test network)")
    flwr_cli.write_flwr_home(flwr_home, args.superlink, args.root_certificates, insecure=args.insecure)
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0"}

    deadline = time.monotonic() + args.wait
    while True:  # the SuperLink may still be starting
        try:
            flwr_cli.flwr_json(["flwr", "supernode", "ls", flwr_cli.CONNECTION_NAME, "--format", "json"], env, timeout=30)
            break
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet" until the deadline
            if time.monotonic() > deadline:
                print(f"SuperLink {args.superlink} did not answer within {args.wait:.0f}s: {exc}", file=sys.stderr)
                return 2
            time.sleep(2.0)

    failed = 0
    for key in args.public_keys:
        if not key.is_file():
            print(f"{key}: no such public key file", file=sys.stderr)
            failed += 1
            continue
        name = key.parent.name if key.name == "node.pub" else key.stem
        try:
            data = flwr_cli.flwr_json(
                ["flwr", "supernode", "register", str(key), flwr_cli.CONNECTION_NAME, "--name", name, "--format", "json"],
                env, timeout=60,
            )
            print(f"{name}: registered as node {data['node-id']}")
        except RuntimeError as exc:
            if ALREADY in str(exc):
                print(f"{name}: already registered")
            else:
                print(f"{name}: registration FAILED: {exc}", file=sys.stderr)
                failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
