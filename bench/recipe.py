"""Training-recipe bench: one centralized run on a fixed phantom cohort, summarised in one line.

    python bench/recipe.py --cohort standard --out runs/recipe/attention --set model-family=attention

generates the cohort once (``--root``, reused afterwards: same seed, same bytes), trains with
:func:`simulations.central.train_central` (the pooled reference, the sites' training loop) and prints the held-out
numbers that decide whether a recipe learns: Dice whole/core/enhancing and their mean for the full modality set,
accuracy, balanced accuracy, AUROC and the decision threshold, and -- with ``--final-subsets all`` -- the mean over
every modality subset and its ratio to the full set. ``OUT/summary.json`` holds the same numbers.

Cohorts (3 iid sites, all six modalities, 16x32x32 phantoms): ``quick`` 3 x 32 training + 48 held-out cases (screening),
``standard`` 3 x 64 training + 96 held-out cases (the issue's standard budget). ``--scenario`` picks another
site scenario (e.g. ``realistic``); a different cohort is written under its own folder.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

COHORTS: dict[str, dict[str, int]] = {
    "quick": {"cases_per_site": 32, "heldout_cases": 48},
    "standard": {"cases_per_site": 64, "heldout_cases": 96},
}
SITES = 3
SHAPE = (16, 32, 32)
REGIONS = ("whole", "core", "enhancing")


def cohort(root: Path, name: str, scenario: str, seed: int) -> Path:
    """The data root of cohort ``name`` under ``root``, generated on first use."""
    from simulations.phantom_writers import generate

    data = root / f"{name}-{scenario}-s{seed}"
    if not (data / "phantoms.json").is_file():
        generate(data, sites=SITES, seed=seed, scenario=scenario, shape=SHAPE, fmt="nifti", **COHORTS[name])
    return data


def summary(final: Any, seconds: float, steps: int) -> dict[str, float]:
    """The numbers the bench prints, from the last :class:`models.evaluation.SubsetReport`."""
    rows = final.rows
    full = rows["all"]
    out: dict[str, float] = {"steps": float(steps), "seconds": seconds}
    for r in REGIONS:
        out[f"dice-{r}"] = full[f"dice-{r}"]
    out["dice-mean-region"] = sum(full[f"dice-{r}"] for r in REGIONS) / len(REGIONS)
    for k in ("accuracy", "balanced-accuracy", "auroc", "threshold"):
        out[k] = full[k]
    if len(final.subsets) > 1:
        mean = rows["mean"]
        out["subsets"] = float(len(final.subsets))
        out["subset-mean-dice-whole"] = mean["dice-whole"]
        out["subset-mean-dice-mean-region"] = sum(mean[f"dice-{r}"] for r in REGIONS) / len(REGIONS)
        out["subset-ratio-dice-whole"] = mean["dice-whole"] / full["dice-whole"] if full["dice-whole"] else math.nan
        out["subset-ratio-mean-region"] = (
            out["subset-mean-dice-mean-region"] / out["dice-mean-region"] if out["dice-mean-region"] else math.nan)
        out["subset-mean-accuracy"] = mean["accuracy"]
        for s in final.subsets:
            if len(s) == 1:
                row = rows[s[0]]
                out[f"{s[0]}/dice-mean-region"] = sum(row[f"dice-{r}"] for r in REGIONS) / len(REGIONS)
                out[f"{s[0]}/accuracy"] = row["accuracy"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="run directory")
    parser.add_argument("--root", type=Path, default=Path("/tmp/fedfusion-recipe"), help="where cohorts are kept")
    parser.add_argument("--cohort", choices=sorted(COHORTS), default="quick")
    parser.add_argument("--scenario", default="iid")
    parser.add_argument("--data-seed", type=int, default=11)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="run config KEY=VALUE (repeatable)")
    parser.add_argument("--final-subsets", choices=("full", "all"), default="full")
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--augment", action="store_true")
    args = parser.parse_args(argv)

    from common.runconfig import parse_assignments
    from simulations.central import CentralSettings, train_central

    data = cohort(args.root, args.cohort, args.scenario, args.data_seed)
    settings = CentralSettings.from_run_config(
        data, args.out, parse_assignments(args.sets), epochs=args.epochs, device="cpu", eval_every=args.eval_every,
        final_subsets=args.final_subsets, hd95=False, threads=args.threads, progress=False, augment=args.augment,
    )
    result = train_central(settings)
    steps = int(sum(h["steps"] for h in result.history))
    numbers = summary(result.final, result.seconds, steps)
    record = {"argv": sys.argv[1:] if argv is None else argv, "data": str(data), **numbers}
    (Path(args.out) / "summary.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    head = ("steps", "seconds", "dice-whole", "dice-core", "dice-enhancing", "dice-mean-region", "accuracy",
            "balanced-accuracy", "auroc", "threshold")
    print(" ".join(f"{k}={numbers[k]:.3f}" if k not in ("steps", "seconds") else f"{k}={numbers[k]:.0f}"
                   for k in head))
    rest = {k: v for k, v in numbers.items() if k not in head}
    if rest:
        print(" ".join(f"{k}={v:.3f}" for k, v in rest.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
