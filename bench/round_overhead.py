"""The federation's overhead per round: simulation wall time per round over the sites' summed local training time.

Runs one federated simulation (the real ServerApp and ClientApp on Flower's simulation engine) and prints, per
round and side by side: the round's wall time (from Flower's ``[ROUND r/R]`` log lines: configure, dispatch to Ray
actors, site training, replies, aggregation, site evaluation, checkpoint), the sum over sites of their local training
seconds (the ``train-seconds`` each site reports in its train reply: its local epochs only), the longest single site,
and the ratio ``round wall / summed training``. With P parallel site workers (one CPU each; P = cores) and no overhead
the ratio would be about 1/P; everything above that is the federation's cost (serialisation, Ray scheduling, data
loading on a site's first round, evaluation). Results go to docs/benchmarks.md (section ``round-overhead``).

Usage::

    .venv/bin/python bench/round_overhead.py                  # 4 sites x 8 cases, 3 rounds, no DP
    .venv/bin/python bench/round_overhead.py --dp --rounds 3  # with DP-SGD at the sites
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SECTION = "round-overhead"
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def round_walls(flower_log: Path) -> dict[int, float]:
    """Wall seconds of each round from a run's ``flower.log``: from ``[ROUND r/R]`` to the next round's line (or to
    ``Strategy execution finished`` for the last round)."""
    import datetime as dt

    starts: list[tuple[int, dt.datetime]] = []
    end: dt.datetime | None = None
    for line in Path(flower_log).read_text(encoding="utf-8", errors="replace").splitlines():
        m = _STAMP.match(line)
        if not m:
            continue
        t = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
        r = re.search(r"\[ROUND (\d+)/\d+\]", line)
        if r:
            starts.append((int(r.group(1)), t))
        elif "Strategy execution finished" in line:
            end = t
    out: dict[int, float] = {}
    for i, (rnd, t) in enumerate(starts):
        stop = starts[i + 1][1] if i + 1 < len(starts) else end
        if stop is not None:
            out[rnd] = (stop - t).total_seconds()
    return out


def site_train_seconds(metrics: Path) -> dict[int, list[float]]:
    """Per round, every site's ``train-seconds`` (phase ``train``, a site scope) from ``RUN/metrics.jsonl``."""
    from models.runlog import is_site_scope, iter_metrics

    out: dict[int, list[float]] = defaultdict(list)
    for rec in iter_metrics(metrics):
        if (rec["phase"] == "train" and is_site_scope(rec["scope"]) and rec["metric"] == "train-seconds"
                and rec["value"] is not None):
            out[int(rec["round"])].append(float(rec["value"]))
    return dict(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--cases-per-site", type=int, default=8)
    p.add_argument("--shape", type=int, nargs=3, default=(16, 32, 32), help="phantom grid = model input D H W")
    p.add_argument("--channels", default="4,8,16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dp", action="store_true", help="DP-SGD at the sites (target epsilon 8)")
    p.add_argument("--server-eval", action="store_true",
                   help="also run the server's held-out evaluation after the last round (off: not federation cost)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary folder)")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from simulations.experiments.common import permit_experiment_policies
    from simulations.mdsections import write_section
    from simulations.phantom_writers import ensure
    from simulations.simulate import simulate

    work = args.work or Path(tempfile.mkdtemp(prefix="fedfusion-round-overhead-"))
    data = work / "data"
    ensure(data, sites=args.sites, cases_per_site=args.cases_per_site, seed=args.seed, scenario="iid",
           shape=tuple(args.shape), fmt="nifti", heldout_cases=4)
    run = work / "run"
    permit_experiment_policies(run, data)
    overrides = {
        "num-server-rounds": args.rounds, "model-channels": args.channels,
        "model-spatial-size": ",".join(map(str, args.shape)), "dp-enabled": bool(args.dp), "seed": args.seed,
        "eval-every": 0, "batch-size": 4, "lr": 3e-3,
    }
    if not args.server_eval:
        overrides["test-dir"] = str(work / "no-server-eval")
    result = simulate(run, data=data, overrides=overrides, progress=False, report=False)
    walls = round_walls(run / "flower.log")
    trains = site_train_seconds(run / "metrics.jsonl")
    ncpu = os.cpu_count() or 1
    rows = []
    for rnd in sorted(walls):
        secs = trains.get(rnd, [])
        total = sum(secs)
        rows.append((rnd, walls[rnd], total, max(secs) if secs else float("nan"), len(secs),
                     walls[rnd] / total if total else float("nan")))
    steady = [r[5] for r in rows if r[0] > 1]
    lines = [
        f"`{shlex.join(['bench/round_overhead.py', *(argv if argv is not None else sys.argv[1:])])}` "
        f"({_dt.date.today().isoformat()}, {platform.machine()}, {ncpu} CPUs shared with other jobs, one CPU per "
        f"virtual site so {min(ncpu, args.sites)} sites train at a time; {args.sites} sites x {args.cases_per_site} "
        f"cases, grid {'x'.join(map(str, args.shape))}, channels ({args.channels}), "
        f"{'DP-SGD' if args.dp else 'no DP'}, {'with' if args.server_eval else 'without'} server held-out evaluation; "
        f"whole simulation {result.wall_seconds:.0f} s incl. Ray start, peak RSS {result.peak_rss_mb:.0f} MiB):",
        "",
        "| round | round wall s | summed site training s | longest site s | sites | wall / summed training |",
        "|---:|---:|---:|---:|---:|---:|",
        *[f"| {r} | {w:.1f} | {t:.1f} | {m:.1f} | {n} | {q:.2f} |" for r, w, t, m, n, q in rows],
        "",
        f"Ideal (no overhead, {min(ncpu, args.sites)} sites in parallel): ~{1 / min(ncpu, args.sites):.2f}. "
        + (f"Median ratio from round 2 on: {statistics.median(steady):.2f}. " if steady else "")
        + "A round's wall time also holds the sites' evaluation of the new global model (Flower's evaluate phase, "
        "fraction-evaluate 1.0) and the server's aggregation and checkpoint. "
        + "Round 1 also builds each site's runtime (reads and caches its cases, builds the model and, with DP, the "
        "Opacus engine) inside the ClientApp, which is not counted as training.",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        path = write_section(ROOT / "docs" / "benchmarks.md", SECTION, text,
                             heading="## Federation overhead per round (simulation)", new_file_title="# Benchmarks")
        print(f"updated {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
