#!/usr/bin/env python3
"""A whole deployment on this machine, for real: TLS SuperLink + node authentication + 3 site SuperNodes.

    .venv/bin/python deploy/scripts/loopback.py                 # phantoms in a temp dir, 2 rounds, then clean up
    .venv/bin/python deploy/scripts/loopback.py --workdir /tmp/ff-loopback --keep-workdir --rounds 3

Steps (each printed): make a CA, the SuperLink certificate (SANs localhost, 127.0.0.1) and one key pair per site;
start `fedfusion superlink` (Fleet API and, separately, Control API) with TLS, SuperNode authentication and a
SQLite database on free 127.0.0.1 ports;
register the three public keys (`flwr supernode register`); start each site (`fedfusion site`, or
`flower-supernode` if this checkout has no site daemon) on its own phantom site folder and state folder;
submit the app (`flwr run <staged app> fedfusion`); follow its log (`flwr log --stream`, in WORKDIR/logs/run-ID.log)
until the run finishes; print where the run directory (metrics.jsonl, report) is; stop every process. Logs of every
process are in WORKDIR/logs/.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fedfusion.loopback import (  # noqa: E402
    LoopbackFederation,
    make_phantoms,
    metrics_rounds,
    missing_binaries,
    tiny_run_config,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=None, help="working folder (default: a new temp folder)")
    p.add_argument("--data", type=Path, default=None, help="federation data with site-01..site-03 and heldout/ "
                   "(default: generate 4 phantom cases per site)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the run to finish")
    p.add_argument("--flower-supernode", action="store_true", help="start sites with flower-supernode, not fedfusion site")
    p.add_argument("--keep-workdir", action="store_true")
    args = p.parse_args(argv)

    if missing := missing_binaries():
        print(f"missing Flower executables: {', '.join(missing)} (run scripts/install.sh)", file=sys.stderr)
        return 2
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fedfusion-loopback-")
        args.workdir = Path(tmp.name)
    workdir = args.workdir.resolve()
    data = args.data or make_phantoms(workdir / "data")
    start = time.monotonic()
    try:
        with LoopbackFederation(workdir, data, 3, use_site_daemon=not args.flower_supernode) as fed:
            cfg = tiny_run_config(workdir, data, **{"num-server-rounds": args.rounds})
            run_id = fed.submit(cfg)
            print(f"[loopback] watch it:  FLWR_HOME={fed.flwr_home} flwr ls fedfusion   |   flwr log {run_id} fedfusion")
            status = fed.wait_finished(run_id, args.timeout)
            run_dir = Path(cfg["run-dir"])
            print(f"[loopback] run {run_id}: {status} after {time.monotonic() - start:.0f}s; "
                  f"rounds logged: {sorted(metrics_rounds(run_dir))}")
            ok = status == "finished:completed" and args.rounds in metrics_rounds(run_dir)
            if ok:
                report = run_dir / "report.md"
                if not report.exists():  # the coordinator's step: fedfusion report RUN_DIR
                    report = fed.build_report(run_dir)
                print(f"[loopback] run directory: {run_dir}  report: {report}")
            else:
                print(fed.run_log(run_id)[-4000:])
        print("[loopback] all processes stopped")
        return 0 if ok else 1
    finally:
        if args.keep_workdir or tmp is None:
            print(f"[loopback] kept {workdir}")
        elif tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
