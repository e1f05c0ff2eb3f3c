"""Many virtual sites on one machine: 50 sites for 1 round, with peak memory and time per round.

Tiny phantoms (default 50 sites x 4 cases on a 16x32x32 grid) and a tiny model (channels 4,8 at 8x16x16) so the
measurement is about the federation (Ray actors, one ClientApp runtime per site, message traffic, aggregation of 50
replies), not about the network. The server evaluates the global model on a small held-out set (4 cases, every
modality subset) after the round, as a real run does. Peak memory is the resident memory of the whole process tree
(driver + Ray workers, sampled every 0.5 s; :class:`simulations.observer.SimulationResult`). Results go to
docs/benchmarks.md (section ``scale``).

Usage::

    .venv/bin/python bench/scale.py                   # 50 sites, 1 round, DP-SGD at every site
    .venv/bin/python bench/scale.py --sites 10 --no-dp
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, default=50)
    p.add_argument("--cases-per-site", type=int, default=4)
    p.add_argument("--shape", type=int, nargs=3, default=(16, 32, 32), help="phantom grid D H W")
    p.add_argument("--model-size", default="8,16,16", help="model input D,H,W (run config model-spatial-size)")
    p.add_argument("--channels", default="4,8")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--heldout-cases", type=int, default=4)
    p.add_argument("--dp", action=argparse.BooleanOptionalAction, default=True, help="DP-SGD at the sites")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary folder)")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from round_overhead import round_walls, site_train_seconds

    from simulations.experiments.common import permit_experiment_policies
    from simulations.mdsections import write_section
    from simulations.phantom_writers import ensure
    from simulations.simulate import simulate

    work = args.work or Path(tempfile.mkdtemp(prefix="fedfusion-scale-"))
    data = work / "data"
    t0 = time.perf_counter()
    _, reused = ensure(data, sites=args.sites, cases_per_site=args.cases_per_site, seed=args.seed, scenario="iid",
                       shape=tuple(args.shape), fmt="nifti", heldout_cases=args.heldout_cases)
    gen_s = time.perf_counter() - t0
    run = work / "run"
    # 1 round at epsilon 8 needs less noise than the default site policy's floor; let the virtual sites accept it.
    permit_experiment_policies(run, data)
    overrides = {
        "num-server-rounds": args.rounds, "model-channels": args.channels, "model-spatial-size": args.model_size,
        "dp-enabled": bool(args.dp), "seed": args.seed, "batch-size": 2, "lr": 3e-3, "eval-batch-size": 4,
    }
    result = simulate(run, data=data, overrides=overrides, progress=False, report=False)
    walls = round_walls(run / "flower.log")
    trains = site_train_seconds(run / "metrics.jsonl")
    trained = {r: len(v) for r, v in trains.items()}
    ncpu = os.cpu_count() or 1
    total_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    per_round = [walls[r] for r in sorted(walls)]
    lines = [
        f"`{shlex.join(['bench/scale.py', *(argv if argv is not None else sys.argv[1:])])}` "
        f"({_dt.date.today().isoformat()}, {platform.machine()}, {ncpu} CPUs shared with other jobs, "
        f"{total_gib:.0f} GiB RAM; {args.sites} sites x {args.cases_per_site} cases on a "
        f"{'x'.join(map(str, args.shape))} grid, model channels ({args.channels}) at {args.model_size}, "
        f"{'DP-SGD (target epsilon 8)' if args.dp else 'no DP'}, server evaluation on {args.heldout_cases} held-out "
        "cases after the last round):",
        "",
        "| sites | rounds | sites trained per round | time per round s | summed site training s per round | "
        "whole simulation s (incl. Ray start) | peak RSS, process tree MiB | phantom generation s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {args.sites} | {args.rounds} | {', '.join(str(trained.get(r, 0)) for r in sorted(walls)) or 'n/a'} | "
        f"{', '.join(f'{w:.0f}' for w in per_round) or 'n/a'} | "
        f"{', '.join(f'{sum(trains.get(r, [])):.0f}' for r in sorted(walls)) or 'n/a'} | {result.wall_seconds:.0f} | "
        f"{result.peak_rss_mb:.0f} | {'reused' if reused else f'{gen_s:.0f}'} |",
        "",
        f"A round here is {min(ncpu, args.sites)} Ray workers (one CPU each) taking the {args.sites} sites in turn: "
        "each site's first message builds its runtime (reads its cases, builds the model and the Opacus engine), "
        "trains, and replies; then every site evaluates the new global model, the server aggregates the replies "
        "and evaluates on the held-out set (all 63 modality subsets). A worker keeps the runtime of every site it "
        "served (client/runtime.py caches them per site), so memory grows with the sites per worker; the peak covers "
        "the driver, the server and both workers.",
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
