"""The federation's overhead per round: simulation wall time per round against its ideal, and where it goes.

Runs one federated simulation (the real ServerApp and ClientApp on Flower's simulation engine) and prints, per
round and side by side: the round's wall time (from Flower's ``[ROUND r/R]`` log lines), its *ideal* (the sites'
summed local training seconds, the ``train-seconds`` of their train replies, over the number of sites that train at
once: one per CPU), their ratio, and the split of the wall time into phases (:mod:`simulations.round_phases`:
train phase, sites' evaluate phase, the server's own work; inside the sites' handlers: imports, runtime build, DP
plan and Opacus, local epochs, the rest). The start-up before round 1 (Ray, the apps, the sites' prepare step) is
reported on its own line. Targets (issue 15): round 1 wall / ideal <= 1.5, later rounds <= 1.10. Results go to
docs/benchmarks.md (section ``round-overhead``).

Usage::

    .venv/bin/python bench/round_overhead.py                  # 4 sites x 8 cases, 6 rounds (5 later ones to judge), no DP
    .venv/bin/python bench/round_overhead.py --dp --rounds 3  # with DP-SGD at the sites
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

SECTION = "round-overhead"
#: issue 15's targets for wall / ideal: round 1, and every later round
ROUND1_TARGET, LATER_TARGET = 1.5, 1.10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--cases-per-site", type=int, default=8)
    p.add_argument("--shape", type=int, nargs=3, default=(16, 32, 32), help="phantom grid = model input D H W")
    p.add_argument("--channels", default="4,8,16")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--dp", action="store_true", help="DP-SGD at the sites (target epsilon 8)")
    p.add_argument("--server-eval", action="store_true",
                   help="also run the server's held-out evaluation after the last round (off: not federation cost)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="any other run config key (repeatable), e.g. --set prepare-sites=false")
    p.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary folder)")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from federation_run import run_timed

    from common.runconfig import parse_assignments
    from simulations.mdsections import write_section
    from simulations.observer import parallel_sites
    from simulations.phantom_writers import ensure
    from simulations.round_phases import render_splits

    work = args.work or Path(tempfile.mkdtemp(prefix="fedfusion-round-overhead-"))
    data = work / "data"
    ensure(data, sites=args.sites, cases_per_site=args.cases_per_site, seed=args.seed, scenario="iid",
           shape=tuple(args.shape), fmt="nifti", heldout_cases=4)
    overrides = {
        "num-server-rounds": args.rounds, "model-channels": args.channels,
        "model-spatial-size": ",".join(map(str, args.shape)), "dp-enabled": bool(args.dp), "seed": args.seed,
        "eval-every": 0, "batch-size": 4, "lr": 3e-3,
    }
    if not args.server_eval:
        # every server cohort off: the reporting set, and the selection and unseen-scanner sets that the last round
        # evaluates too (left on, they were 6.7 s of the last round's server phase)
        for key in ("test-dir", "select-dir", "unseen-dir"):
            overrides[key] = str(work / "no-server-eval")
    overrides.update(parse_assignments(args.extra))
    timed = run_timed(work / "run", data, overrides)
    parallel = parallel_sites(args.sites)
    splits = timed.splits
    first = [s.ratio(parallel) for s in splits if s.round == 1]
    later = [s.ratio(parallel) for s in splits if s.round > 1]
    verdict = []
    if first:
        verdict.append(f"round 1: {first[0]:.2f} (target <= {ROUND1_TARGET}: {'met' if first[0] <= ROUND1_TARGET else 'missed'})")
    if later:
        worst = max(later)
        verdict.append(f"later rounds: median {statistics.median(later):.2f}, worst {worst:.2f} (target <= "
                       f"{LATER_TARGET}: {'met' if worst <= LATER_TARGET else 'missed'})")
    lines = [
        f"`{shlex.join(['bench/round_overhead.py', *(argv if argv is not None else sys.argv[1:])])}` "
        f"({_dt.date.today().isoformat()}, {platform.machine()}, {parallel} CPUs shared with other jobs, load "
        f"average {timed.load_before:.1f} at the start and {timed.load_after:.1f} at the end; one CPU per virtual "
        f"site so {parallel} sites train at a time; {args.sites} sites x {args.cases_per_site} cases, grid "
        f"{'x'.join(map(str, args.shape))}, channels ({args.channels}), {'DP-SGD' if args.dp else 'no DP'}, "
        f"{'with' if args.server_eval else 'without'} server held-out evaluation; whole simulation "
        f"{timed.result.wall_seconds:.0f} s, of which {timed.startup:.1f} s before round 1 (Ray, the apps, the "
        f"sites' prepare step: {timed.prepare:.1f} s); peak RSS {timed.result.peak_rss_mb:.0f} MiB):",
        "",
        *render_splits(splits, parallel),
        "",
        f"wall / ideal: {'; '.join(verdict) or 'no round finished'}. Ideal = the sites' summed local training "
        f"(train-seconds) / {parallel} sites in parallel. Phases: *train* = messages out, site training, replies, "
        "aggregation; *site-eval* = Flower's evaluate phase; *server* = the ServerApp's held-out evaluation and "
        "checkpoint. The *sites:* columns sum the sites' ClientApp handler time (wall, summed over sites, so up to "
        f"{parallel}x a phase): imports of a fresh worker, runtime build (cases from the preprocessed cache, "
        "network, split), DP plan + Opacus engine (or the plain optimizer), local epochs, the rest of the train "
        "handler (loading the received weights, copying the new ones out, the privacy ledger), and whole evaluate "
        "handlers; what a phase holds beyond them is Flower's and Ray's (message queues, serialisation, "
        "scheduling) and waiting for the slowest site.",
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
