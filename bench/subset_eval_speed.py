"""Wall time of the every-modality-subset held-out evaluation (``models.evaluation.evaluate_subsets``), per family.

Compares, on the same held-out cases and model (a trained checkpoint with ``--checkpoint``, else the run config's
model per family with ``--channels``: 3D, six modalities, 63 subsets):

* ``reference``: one full network forward per subset (``shared_encoding=False``), HD95 for the full set only: the
  evaluation before ``FusionNet.forward_subsets``, timed once, and what every other variant's metrics are checked
  against (max absolute difference printed);
* ``shared, workers k``: encoders once per batch, fusion + decoder per subset, the batch's subsets split over ``k``
  threads (``evaluate_subsets(workers=k)``), HD95 for the full set only (the server's ``eval-hd95 = "full"``).
  These are timed ``--repeats`` times, interleaved, and reported as medians.

Each OpenMP wait policy in ``--wait-policies`` runs in its own child process (the policy is read when torch loads
its OpenMP runtime): ``PASSIVE`` is what ``fedfusion simulate`` sets, so it is the simulated server's setting;
``ACTIVE`` is OpenMP's usual default (a deployed ServerApp without the variable). The held-out set is loaded and
resampled once before timing, as the server's cached dataset is. Wall time and process CPU time (all threads) are
printed; with ``--write`` the table goes to docs/benchmarks.md (section ``subset-eval``).

Usage::

    .venv/bin/python bench/subset_eval_speed.py --heldout DATA/heldout --checkpoint RUN/checkpoints/last.pt --write

Untrained networks predict speckle, which makes HD95 (edge distances) far slower than on trained predictions: time
with trained weights where the HD95 share matters.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SECTION = "subset-eval"


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time the variants in this process (its OpenMP wait policy fixed at start); one row per family and variant."""
    import torch

    from common.evaluation import heldout_loader, load_heldout, load_model
    from common.runconfig import default_model_config
    from models.evaluation import evaluate_subsets
    from models.fusion import FUSIONS
    from models.network import build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    trained = {}
    for path in args.checkpoint:
        ckpt_model, ckpt_cfg, _ = load_model(path, "cpu")
        trained[ckpt_cfg.family] = (path, ckpt_model, ckpt_cfg)
    families = [f.strip() for f in args.families.split(",") if f.strip()] if args.families else (
        list(trained) or list(FUSIONS))
    rows: list[dict[str, Any]] = []
    for family in families:
        if family in trained:
            path, model, cfg = trained[family]
            source = str(path)
        else:
            cfg = default_model_config(family=family, channels=tuple(int(c) for c in args.channels.split(",")))
            torch.manual_seed(0)
            model = build_model(cfg)
            source = "untrained, seed 0"
        ds = load_heldout(cfg, args.heldout)
        cases = [ds[i] for i in range(len(ds))]  # load + resample once (the server caches its dataset too)
        loader = heldout_loader(cases, args.batch_size)

        def timed(**kw: Any) -> tuple[float, float, dict[str, float]]:
            t0, c0 = time.perf_counter(), time.process_time()
            report = evaluate_subsets(model, loader, "cpu", hd95="full", **kw)
            return time.perf_counter() - t0, time.process_time() - c0, report.to_flat()

        _, _, ref = timed(shared_encoding=False)  # also warms the caches
        ref_secs, ref_cpu, _ = timed(shared_encoding=False)
        workers = [int(w) for w in args.workers.split(",")]
        walls: dict[int, list[float]] = {w: [] for w in workers}
        cpus: dict[int, list[float]] = {w: [] for w in workers}
        diffs: dict[int, float] = {w: 0.0 for w in workers}
        for _ in range(args.repeats):
            for w in workers:  # interleaved: a slow spell of the machine hits every variant alike
                secs, cpu, flat = timed(shared_encoding=True, workers=w)
                walls[w].append(secs)
                cpus[w].append(cpu)
                keys = [k for k in flat if k in ref and math.isfinite(flat[k]) and math.isfinite(ref[k])]
                diffs[w] = max(diffs[w], max(abs(flat[k] - ref[k]) for k in keys))
        common = dict(family=family, source=source, cases=len(cases), subsets=2 ** len(cfg.modalities) - 1,
                      threads=torch.get_num_threads(), policy=os.environ.get("OMP_WAIT_POLICY", "(unset)"))
        rows.append(dict(common, variant="reference", wall=ref_secs, cpu=ref_cpu, diff=0.0, n=1))
        for w in workers:
            rows.append(dict(common, variant=f"shared, workers {w}", wall=statistics.median(walls[w]),
                             cpu=statistics.median(cpus[w]), diff=diffs[w], n=args.repeats, workers=w,
                             walls=walls[w]))
            print(f"  {family} {common['policy']:8s} workers {w}: wall {rows[-1]['wall']:.2f} s "
                  f"(runs {', '.join(f'{x:.2f}' for x in walls[w])}), cpu {rows[-1]['cpu']:.2f} s, "
                  f"max |metric diff| vs reference {diffs[w]:.1e}", flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of all rows, with each shared variant's wall time against the same policy's ``workers 1``."""
    base = {(r["family"], r["policy"]): r["wall"] for r in rows if r.get("workers") == 1}
    out = ["| family | OMP_WAIT_POLICY | variant | wall s (median) | CPU s | wall / workers 1 | runs | "
           "max metric difference to the reference |",
           "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = base.get((r["family"], r["policy"]))
        ratio = f"{r['wall'] / b:.2f}" if b else "–"
        out.append(f"| {r['family']} | {r['policy']} | {r['variant']} | {r['wall']:.2f} | {r['cpu']:.2f} | "
                   f"{ratio} | {r['n']} | {r['diff']:.1e} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heldout", type=Path, required=True, help="site-layout held-out folder (case folders + labels)")
    p.add_argument("--checkpoint", type=Path, action="append", default=[],
                   help="trained checkpoint (models/checkpoint.py) used for its family instead of an untrained "
                        "model; repeatable")
    p.add_argument("--families", default="", help="comma-separated families (default: the checkpoints' families, "
                                                   "else every family)")
    p.add_argument("--channels", default="8,16,32", help="encoder widths of the untrained models")
    p.add_argument("--batch-size", type=int, default=None,
                   help="held-out cases per batch (default: the run config's eval-batch-size)")
    p.add_argument("--workers", default="1,2", help="comma-separated evaluate_subsets workers to time")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed runs per variant")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--wait-policies", default="PASSIVE,ACTIVE",
                   help="OpenMP wait policies, one child process each")
    p.add_argument("--write", action="store_true", help="write docs/benchmarks.md (section subset-eval)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch_size is None:
        from common.runconfig import defaults

        args.batch_size = int(defaults()["eval-batch-size"])

    if args.child:  # one policy, set by the parent before torch loaded
        print("ROWS " + json.dumps(measure(args)), flush=True)
        return 0

    load0 = os.getloadavg()
    rows: list[dict[str, Any]] = []
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--write"]
    for policy in [x.strip().upper() for x in args.wait_policies.split(",") if x.strip()]:
        print(f"OMP_WAIT_POLICY={policy} ...", flush=True)
        env = dict(os.environ, OMP_WAIT_POLICY=policy)
        done = subprocess.run([sys.executable, __file__, *forwarded, "--child"], env=env, check=True,
                              stdout=subprocess.PIPE, text=True)
        for line in done.stdout.splitlines():
            if line.startswith("ROWS "):
                rows += json.loads(line[5:])
            else:
                print(line, flush=True)
    load1 = os.getloadavg()
    text = table(rows)
    print(text)
    if args.write:
        from simulations.mdsections import write_section

        first = rows[0]
        header = (
            f"`bench/subset_eval_speed.py --heldout {args.heldout}"
            + "".join(f" --checkpoint {c}" for c in args.checkpoint)
            + f"` ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs shared with other jobs, "
            f"load average {load0[0]:.1f} at the start and {load1[0]:.1f} at the end; {first['cases']} held-out "
            f"cases, batch {args.batch_size}, {first['subsets']} subsets, HD95 on the full set only, torch threads "
            f"{first['threads']}; {first['source']}):"
        )
        body = [header, "", text, "",
                "*reference* = one full forward per subset (timed once); *shared, workers k* = encoders once per "
                "batch, fusion + decoder per subset, the subsets of a batch split over k threads "
                f"(`evaluate_subsets(workers=k)`), median of {args.repeats} interleaved runs. Each policy ran in its "
                "own process; ratios compare variants of one process only."]
        path = write_section(ROOT / "docs" / "benchmarks.md", SECTION, "\n".join(body) + "\n",
                             heading="## Held-out evaluation over every modality subset",
                             new_file_title="# Benchmarks")
        print(f"updated {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
