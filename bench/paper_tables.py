"""Analogues of the paper's Table I (segmentation) and Table II (classification) on phantom data.

Every row trains with the same data, seed and budget (:mod:`simulations.central`, pooled sites, no DP, no
federation) and is evaluated on the same held-out set with all of the row's modalities present:

* unimodal baselines: MRI only (t1, t1ce, t2, flair), CT only, US only — built as ``input`` (early) fusion, i.e. a
  plain multi-channel network over the row's modalities;
* each fusion family (input, single, hierarchical, attention, output) on all six modalities.

Results go to the console and to ``docs/results.md`` between ``<!-- paper-tables:start -->`` and
``<!-- paper-tables:end -->`` (other experiments own other sections of that file), with the command and the date.

Usage (defaults sized for ~10 minutes on 2 CPU cores; use bigger numbers for more meaningful tables)::

    .venv/bin/python bench/paper_tables.py
    .venv/bin/python bench/paper_tables.py --epochs 30 --cases-per-site 24 --shape 32 64 64
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

START = "<!-- paper-tables:start -->"
END = "<!-- paper-tables:end -->"

MRI = ("t1", "t1ce", "t2", "flair")
ALL = ("t1", "t1ce", "t2", "flair", "ct", "us")
from models.fusion import FUSIONS  # noqa: E402

FAMILIES = tuple(FUSIONS)  # the registry

#: (row label, fusion family, modalities)
BASELINES: list[tuple[str, str, tuple[str, ...]]] = [
    ("MRI only", "input", MRI),
    ("CT only", "input", ("ct",)),
    ("US only", "input", ("us",)),
]

TABLE1 = [(f"{k}-{r}", f"{label} {r}") for r in ("whole", "core", "enhancing")
          for k, label in (("dice", "Dice"), ("iou", "IoU"), ("precision", "Prec."))]
TABLE2 = [("accuracy", "Accuracy"), ("recall", "Recall"), ("f1", "F1"), ("specificity", "Specificity"),
          ("auroc", "AUROC")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="existing data root (default: generate phantoms)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "paper-tables", help="phantoms + run directories")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--cases-per-site", type=int, default=12)
    p.add_argument("--heldout-cases", type=int, default=12)
    p.add_argument("--scenario", default="iid", help="phantom scenario (iid: every site has every modality)")
    p.add_argument("--shape", type=int, nargs=3, default=(16, 32, 32), help="phantom grid D H W")
    p.add_argument("--input-size", type=int, nargs="+", default=None,
                   help="model input the volumes are resampled to: D H W (3D model) or H W (2D model on the axial "
                        "slice through the lesion, see common/data/dataset.py); default: --shape")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--channels", default="8,16,32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--families", default=",".join(FAMILIES), help="fusion families to run on all modalities")
    p.add_argument("--no-baselines", action="store_true", help="skip the MRI/CT/US-only rows")
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "results.md")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/results.md alone")
    p.add_argument("--reuse", action="store_true",
                   help="reuse a row's finished run in --work (same settings, all epochs logged) instead of training")
    return p.parse_args(argv)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.3f}"


def _fmt_secs(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:.0f}"


def markdown(rows: list[tuple[str, str, dict[str, float], float]], args: argparse.Namespace, command: str,
             n_train: int, n_held: int) -> str:
    date = _dt.date.today().isoformat()
    lines = [
        START,
        "## Paper tables on phantoms (Table I segmentation, Table II classification)",
        "",
        f"Generated {date} by `{command}`.",
        "",
        f"Centralized training (pooled sites, no DP, no federation), {n_train} training cases from {args.sites} "
        f"phantom sites (scenario `{args.scenario}`), {n_held} held-out cases, phantom grid {tuple(args.shape)} "
        f"resampled to {tuple(args.input_size) if args.input_size else tuple(args.shape)}, "
        f"{args.epochs} epochs, Adam lr {args.lr:g}, batch {args.batch_size}, channels ({args.channels}), seed "
        f"{args.seed}. Every row has the same data and budget and is evaluated with all of its modalities present; "
        "unimodal rows are early-fusion networks over their modalities. Metrics are means over held-out cases "
        "(docs: models/metrics.py); numbers are from synthetic phantoms and say nothing about clinical accuracy.",
        "",
        "### Table I — segmentation",
        "",
        "| model | modalities | " + " | ".join(label for _, label in TABLE1) + " |",
        "|---|---|" + "---:|" * len(TABLE1),
    ]
    for label, mods, m, _ in rows:
        lines.append(f"| {label} | {mods} | " + " | ".join(_fmt(m.get(k)) for k, _ in TABLE1) + " |")
    lines += [
        "",
        "### Table II — classification (malignant vs benign, threshold 0.5)",
        "",
        "| model | modalities | " + " | ".join(label for _, label in TABLE2) + " | train s |",
        "|---|---|" + "---:|" * (len(TABLE2) + 1),
    ]
    for label, mods, m, secs in rows:
        lines.append(f"| {label} | {mods} | " + " | ".join(_fmt(m.get(k)) for k, _ in TABLE2) + f" | {_fmt_secs(secs)} |")
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Create or replace the ``paper-tables`` section of ``path``, keeping everything else (the one marked-section
    writer all generated docs share: :func:`simulations.mdsections.write_section`, atomic and locked)."""
    from simulations.mdsections import write_section as write_marked

    write_marked(path, "paper-tables", section)


def _finished_run(settings: object) -> tuple[dict[str, float], int, float] | None:
    """(all-modality metrics, training cases, seconds) of a finished run with the same settings, else None."""
    import json

    from models.runlog import iter_metrics

    out = Path(settings.out)  # type: ignore[attr-defined]
    try:
        config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    try:
        seconds = float((out / "seconds.txt").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        seconds = math.nan  # a run from before seconds.txt was written
    wanted = settings.to_json_dict()  # type: ignore[attr-defined]
    if any(config.get(k) != v for k, v in wanted.items() if k not in ("progress", "threads", "device")):
        return None
    records = list(iter_metrics(out / "metrics.jsonl"))
    epochs = int(wanted["epochs"])
    final = {r["metric"]: r["value"] for r in records if r["round"] == epochs and r["phase"] == "central-eval"}
    train = {r["metric"]: r["value"] for r in records if r["round"] == epochs and r["phase"] == "central-train"}
    if not final or "num-examples" not in train:
        return None
    metrics = {k.split("/", 1)[1]: (math.nan if v is None else float(v)) for k, v in final.items()
               if k.startswith("all/")}
    return metrics, int(train["num-examples"]), seconds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from rich.console import Console
    from rich.table import Table

    from simulations.central import CentralSettings, train_central

    console = Console()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = args.data
    if data is None:
        from simulations.phantom_writers import ensure

        data = args.work / f"data-{args.scenario}-s{args.sites}x{args.cases_per_site}-h{args.heldout_cases}-" \
                           f"{'x'.join(map(str, args.shape))}-seed{args.seed}"
        _, reused = ensure(data, sites=args.sites, cases_per_site=args.cases_per_site, seed=args.seed,
                           scenario=args.scenario, shape=tuple(args.shape), fmt="nifti",
                           heldout_cases=args.heldout_cases)
        console.print(f"{'reusing' if reused else 'generated'} phantoms in {data}")
    plan = [] if args.no_baselines else list(BASELINES)
    fams = [f.strip() for f in args.families.split(",") if f.strip()]
    plan += [(f"{f} fusion", f, ALL) for f in fams]
    input_size = tuple(args.input_size) if args.input_size else tuple(args.shape)
    if len(input_size) not in (2, 3):
        raise SystemExit(f"--input-size takes H W (2D) or D H W (3D), got {input_size}")
    rows: list[tuple[str, str, dict[str, float], float]] = []
    n_train = n_held = 0
    t0 = time.perf_counter()
    for label, family, mods in plan:
        console.rule(f"{label} ({family}, {'+'.join(mods)})")
        model_keys = {"model-family": family, "model-modalities": ",".join(mods), "model-channels": args.channels,
                      "model-spatial-dims": len(input_size), "model-spatial-size": ",".join(map(str, input_size)),
                      "lr": args.lr, "batch-size": args.batch_size, "seed": args.seed}
        settings = CentralSettings.from_run_config(
            Path(data), args.work / "runs" / label.replace(" ", "-"), model_keys, epochs=args.epochs,
            device=args.device, eval_every=0, final_subsets="full", hd95="full", progress=True,
        )
        reused = _finished_run(settings) if args.reuse else None
        if reused is not None:
            metrics, examples, seconds = reused
            console.print(f"reusing the finished run {settings.out}")
        else:
            res = train_central(settings)
            flat = res.final.to_flat()
            metrics = {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith("all/")}
            examples, seconds = int(res.history[-1]["num-examples"]), res.seconds
            (Path(settings.out) / "seconds.txt").write_text(f"{seconds:.1f}\n", encoding="utf-8")
        n_held = int(metrics.get("cases", 0))
        n_train = max(n_train, examples)
        rows.append((label, "+".join(mods), metrics, seconds))
        console.print(f"{label}: dice-whole {_fmt(metrics.get('dice-whole'))}, accuracy "
                      f"{_fmt(metrics.get('accuracy'))} in {_fmt_secs(seconds)} s")
    for title, cols in (("Table I: segmentation", TABLE1), ("Table II: classification", TABLE2)):
        table = Table(title=title)
        table.add_column("model")
        for _, c in cols:
            table.add_column(c, justify="right")
        for label, _, m, _ in rows:
            table.add_row(label, *[_fmt(m.get(k)) for k, _ in cols])
        console.print(table)
    given = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--reuse"]  # same numbers as training
    command = "python bench/paper_tables.py" + (" " + shlex.join(given) if given else "")
    if not args.no_write:
        write_section(args.results, markdown(rows, args, command, n_train, n_held))
        console.print(f"wrote the paper-tables section of {args.results}")
    console.print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
