"""Many virtual sites on one machine: 50 sites for 1 round, with peak memory and the split of the round's time.

Tiny phantoms (default 50 sites x 4 cases on a 16x32x32 grid) and a tiny model (channels 4,8 at 8x16x16) so the
measurement is about the federation (Ray actors, site runtimes, message traffic, aggregation of 50 replies), not
about the network. The server evaluates the global model on a small held-out set (4 cases, every modality subset)
after the round, as a real run does. Peak memory is the resident memory of the whole process tree (driver + Ray
workers, sampled every 0.5 s; :class:`simulations.observer.SimulationResult`). The round's wall time is compared
with its ideal (summed site training over the sites that train at once) and split into phases
(:mod:`simulations.round_phases`). Targets (issue 15): wall <= 1.5 x ideal, peak RSS <= 3 GiB. Results go to
docs/benchmarks.md (section ``scale``).

Usage::

    .venv/bin/python bench/scale.py                   # 50 sites, 1 round, DP-SGD at every site
    .venv/bin/python bench/scale.py --sites 10 --no-dp
    .venv/bin/python bench/scale.py --sites 200 --fraction-train 0.25 --no-write
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

SECTION = "scale"
#: issue 15's targets: round wall / ideal, and peak resident memory of the process tree
WALL_TARGET, RSS_TARGET_MIB = 1.5, 3 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, default=50)
    p.add_argument("--cases-per-site", type=int, default=4)
    p.add_argument("--shape", type=int, nargs=3, default=(16, 32, 32), help="phantom grid D H W")
    p.add_argument("--model-size", default="8,16,16", help="model input D,H,W (run config model-spatial-size)")
    p.add_argument("--channels", default="4,8")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--heldout-cases", type=int, default=4)
    p.add_argument("--fraction-train", type=float, default=1.0, help="run config fraction-train (sites per round)")
    p.add_argument("--dp", action=argparse.BooleanOptionalAction, default=True, help="DP-SGD at the sites")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="any other run config key (repeatable)")
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

    work = args.work or Path(tempfile.mkdtemp(prefix="fedfusion-scale-"))
    data = work / "data"
    t0 = time.perf_counter()
    _, reused = ensure(data, sites=args.sites, cases_per_site=args.cases_per_site, seed=args.seed, scenario="iid",
                       shape=tuple(args.shape), fmt="nifti", heldout_cases=args.heldout_cases)
    gen_s = time.perf_counter() - t0
    # 1 round at epsilon 8 needs less noise than the default site policy's floor: run_timed lets the virtual sites
    # accept it (simulations.experiments.common.permit_experiment_policies)
    overrides = {
        "num-server-rounds": args.rounds, "model-channels": args.channels, "model-spatial-size": args.model_size,
        "dp-enabled": bool(args.dp), "seed": args.seed, "batch-size": 2, "lr": 3e-3, "eval-batch-size": 4,
        "fraction-train": args.fraction_train,
        # a round needs this share of the sites, not all of them (Flower's FedAvg samples max(fraction, min))
        "min-train-nodes": max(1, min(args.sites, int(args.sites * args.fraction_train))),
    }
    overrides.update(parse_assignments(args.extra))
    timed = run_timed(work / "run", data, overrides)
    parallel = parallel_sites(args.sites)
    result, splits = timed.result, timed.splits
    total_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    ratios = [s.ratio(parallel) for s in splits]
    worst = max(ratios) if ratios else float("nan")
    lines = [
        f"`{shlex.join(['bench/scale.py', *(argv if argv is not None else sys.argv[1:])])}` "
        f"({_dt.date.today().isoformat()}, {platform.machine()}, {os.cpu_count()} CPUs shared with other jobs, "
        f"{total_gib:.0f} GiB RAM, load average {timed.load_before:.1f} at the start and {timed.load_after:.1f} at "
        f"the end; {args.sites} sites x {args.cases_per_site} cases on a {'x'.join(map(str, args.shape))} grid, "
        f"model channels ({args.channels}) at {args.model_size}, "
        f"{'DP-SGD (target epsilon 8)' if args.dp else 'no DP'}, fraction-train {args.fraction_train:g}, server "
        f"evaluation on {args.heldout_cases} held-out cases after the last round):",
        "",
        "| sites | rounds | sites trained per round | whole simulation s | before round 1 s (of it: prepare) | "
        "peak RSS, process tree MiB | phantom generation s |",
        "|---:|---:|---|---:|---:|---:|---:|",
        f"| {args.sites} | {args.rounds} | {', '.join(str(len(s.train_seconds)) for s in splits) or 'n/a'} | "
        f"{result.wall_seconds:.0f} | {timed.startup:.0f} ({timed.prepare:.0f}) | {result.peak_rss_mb:.0f} | "
        f"{'reused' if reused else f'{gen_s:.0f}'} |",
        "",
        *render_splits(splits, parallel),
        "",
        f"Round wall / ideal: worst {worst:.2f} (target <= {WALL_TARGET}: "
        f"{'met' if worst <= WALL_TARGET else 'missed'}); peak RSS {result.peak_rss_mb:.0f} MiB (target <= "
        f"{RSS_TARGET_MIB} MiB: {'met' if result.peak_rss_mb <= RSS_TARGET_MIB else 'missed'}). Ideal = the sites' "
        f"summed local training / {parallel} (Ray workers, one CPU each, take the sites in turn). Before round 1 the "
        "ServerApp asks every site to prepare (client/prepare.py: imports, cases, network, DP noise plan, Opacus); "
        "a site served by a worker that does not hold its runtime builds it again in the round (runtime build and "
        "DP plan + Opacus columns). Each worker keeps site runtimes within FEDFUSION_SITE_CACHE_MB (default 512 "
        "MiB; client/runtime_cache.py), least recently used out first, so memory does not grow with the number of "
        "sites. The peak covers the driver (with the ServerApp), the Ray processes and both workers. Columns as in "
        "the round-overhead section.",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        path = write_section(ROOT / "docs" / "benchmarks.md", SECTION, text,
                             heading="## Many virtual sites (simulation scale)", new_file_title="# Benchmarks")
        print(f"updated {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
