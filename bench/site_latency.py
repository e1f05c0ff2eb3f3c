"""Deployed message latency: from a SuperNode receiving a message to its reply being sent, minus the compute.

Runs the loopback deployment (:class:`fedfusion.loopback.LoopbackFederation`: a TLS SuperLink, ``fedfusion site``
daemons, one real run submitted with ``flwr run``) once per mode and times every message the sites handle:

* ``warm``: ``fedfusion site`` as shipped (libraries loaded once in the daemon, each ClientApp process forked from
  it, :mod:`client.warm`; SuperExec polling every 0.25 s);
* ``cold``: ``fedfusion site --no-warm-clientapps`` with Flower's default 1 s SuperExec polling: a fresh
  ``flwr-clientapp`` interpreter per message, as before.

Receipt and reply come from the SuperNodes' own log lines ("Receiving: ... message", "Sent successfully"; the
daemons run with ``FLWR_LOG_LEVEL=DEBUG`` for their time stamps); the compute and the ClientApp handler's span
from the sites' phase timings (:mod:`common.timings`): local epochs (``train-seconds``) of a train message, the
forward pass over the held-out patients of an evaluate message. Split: *launch* (receipt to the handler starting:
SuperExec polling, process start, Flower's task pull, FAB, app import), *handler* minus compute (imports of the
task, runtime from the caches, ledger), *reply* (handler end to sent: Flower's push of the reply). Target
(issue 15): overhead <= 5 s. Results go to docs/benchmarks.md (section ``site-latency``).

Usage::

    .venv/bin/python bench/site_latency.py --work /tmp/site-latency
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import re
import shlex
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

SECTION = "site-latency"
#: issue 15's target: seconds from receipt to reply beyond the compute
TARGET = 5.0
MODES = {"warm": [], "cold": ["--no-warm-clientapps"]}
_LINE = re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR)\s+(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\s*:\s*(.*)$")
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # Flower colours its console lines at DEBUG level
_RECEIVE = re.compile(r"Receiving: (\S+) message")


@dataclass
class MessageTiming:
    """One message at one site (seconds)."""

    site: str
    kind: str
    total: float
    compute: float
    launch: float
    handler: float
    reply: float

    @property
    def overhead(self) -> float:
        return self.total - self.compute


def supernode_events(log: str) -> list[tuple[str, float, float]]:
    """``(message type, received, sent)`` epoch seconds of each message in a SuperNode's log, in order (it handles
    one message at a time: a reply is pushed before the next message is pulled)."""
    out: list[tuple[str, float, float]] = []
    pending: tuple[str, float] | None = None
    for line in log.splitlines():
        m = _LINE.match(_COLOUR.sub("", line).strip())
        if not m:
            continue
        t = _dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        text = m.group(2)
        r = _RECEIVE.search(text)
        if r:
            pending = (r.group(1), t)
        elif "Sent successfully" in text and pending is not None:
            out.append((pending[0], pending[1], t))
            pending = None
    return out


def message_timings(site: str, log: str, records: list[dict]) -> list[MessageTiming]:
    """Pair the SuperNode's messages with the ClientApp's handler timings of ``site`` (both in order, per kind)."""
    handlers: dict[str, list[dict]] = {}
    for r in sorted((r for r in records if r.get("who") == site), key=lambda r: float(r["start"])):
        if r["phase"].endswith("-message"):
            handlers.setdefault(r["phase"].removesuffix("-message"), []).append(r)
    computes = [r for r in records if r.get("who") == site and r["phase"] == "evaluate-compute"]
    out = []
    for kind, received, sent in supernode_events(log):
        short = kind.split(".")[-1]  # query.prepare -> prepare
        queue = handlers.get(short, [])
        if not queue:
            continue
        h = queue.pop(0)
        start, wall = float(h["start"]), float(h["wall"])
        compute = float(h.get("compute", 0.0))
        if short == "evaluate":
            compute = sum(float(c["wall"]) for c in computes if start <= float(c["start"]) <= start + wall)
        out.append(MessageTiming(site, short, sent - received, compute, start - received, wall - compute,
                                 sent - (start + wall)))
    return out


def run_mode(work: Path, data: Path, mode: str, run: dict, timeout: float) -> list[MessageTiming]:
    """One loopback federation in ``mode``; the timings of every message its sites handled."""
    from common import timings
    from fedfusion.loopback import LoopbackFederation, tiny_run_config

    tfile = work / f"{mode}-timings.jsonl"
    tfile.unlink(missing_ok=True)
    env = {timings.ENV: str(tfile), "FLWR_LOG_LEVEL": "DEBUG"}
    if mode == "cold":
        env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = "1.0"  # Flower's default, as before the daemon set 0.25 s
    # a fresh federation folder: the sites' privacy ledgers of an earlier bench run would decline the later rounds
    shutil.rmtree(work / mode, ignore_errors=True)
    fed = LoopbackFederation(work / mode, data, 2, site_flags=MODES[mode], env=env)
    with fed:
        run_id = fed.submit(tiny_run_config(fed.workdir, data, **run))
        status = fed.wait_finished(run_id, timeout)
        if not status.endswith(":completed"):
            raise RuntimeError(f"{mode}: run {run_id} ended {status}:\n{fed.logs()[-6000:]}")
        logs = {name: fed.procs.procs[name].output() for name in fed.site_names}
    records = timings.read(tfile)
    return [t for name, log in logs.items() for t in message_timings(name, log, records)]


def _row(mode: str, kind: str, items: list[MessageTiming]) -> str:
    def med(values: list[float]) -> str:
        return f"{statistics.median(values):.2f}"

    over = [t.overhead for t in items]
    return (f"| {mode} | {kind} | {len(items)} | {med([t.total for t in items])} | {med([t.compute for t in items])} | "
            f"{med(over)} | {max(over):.2f} | {med([t.launch for t in items])} | {med([t.handler for t in items])} | "
            f"{med([t.reply for t in items])} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases-per-site", type=int, default=12, help=">= 10 patients: the sites also evaluate")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--timeout", type=float, default=900.0, help="seconds a run may take")
    p.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary folder)")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from fedfusion.loopback import make_phantoms
    from simulations.mdsections import write_section

    work = args.work or Path(tempfile.mkdtemp(prefix="fedfusion-site-latency-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not (data / "site-02").is_dir():
        make_phantoms(data, sites=2, cases_per_site=args.cases_per_site, heldout_cases=2)
    # the loopback's tiny model with DP; batch = cases so a Poisson batch is never empty; server evaluation only
    # once, at the end (it is not the sites' latency)
    run = {"num-server-rounds": args.rounds, "batch-size": args.cases_per_site, "eval-every": 0, "eval-hd95": "none",
           "round-timeout": 600}
    load_before = os.getloadavg()[0]
    results = {mode: run_mode(work, data, mode, run, args.timeout) for mode in args.modes}
    load_after = os.getloadavg()[0]
    rows = []
    for mode, items in results.items():
        for kind in ("prepare", "train", "evaluate"):
            chosen = [t for t in items if t.kind == kind]
            if chosen:
                rows.append(_row(mode, kind, chosen))
    measured = [t.overhead for t in results.get("warm", []) if t.kind in ("train", "evaluate")]
    worst = max(measured) if measured else float("nan")
    lines = [
        f"`{shlex.join(['bench/site_latency.py', *(argv if argv is not None else sys.argv[1:])])}` "
        f"({_dt.date.today().isoformat()}, {platform.machine()}, {os.cpu_count()} CPUs shared with other jobs, load "
        f"average {load_before:.1f} at the start and {load_after:.1f} at the end; loopback deployment: TLS SuperLink, 2 "
        f"`fedfusion site` daemons x {args.cases_per_site} phantom cases, the loopback's tiny model with DP-SGD, "
        f"{args.rounds} rounds; seconds):",
        "",
        "| mode | message | n | receipt to reply (median) | compute (median) | overhead = receipt to reply - compute "
        "(median) | overhead (max) | launch (median) | handler - compute (median) | reply push (median) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Warm sites, train and evaluate messages: overhead at most {worst:.2f} s (target <= {TARGET:g} s: "
        f"{'met' if worst <= TARGET else 'missed'}). *launch* = the SuperNode's receipt to the ClientApp handler "
        "starting (SuperExec polling, process start or fork, Flower pulling the task and its FAB, loading the app); "
        "*handler - compute* = inside the handler beyond the local epochs or the held-out forward pass (importing "
        "fedfusion's task, the runtime from the on-disk caches, the privacy ledger); *reply push* = the handler's end "
        "to the SuperNode's \"Sent successfully\" (Flower pushes every array of the reply as its own object). A "
        "prepare message is the site's start-up work, moved before round 1 (its compute column is 0: all of it is "
        "start-up).",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        path = write_section(ROOT / "docs" / "benchmarks.md", SECTION, text,
                             heading="## Deployed message latency (loopback)", new_file_title="# Benchmarks")
        print(f"updated {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
