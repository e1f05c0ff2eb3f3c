"""``fedfusion evaluate``: a checkpoint on a held-out set, for every modality subset."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from common.layout import HELDOUT_NAME, VALIDATION_NAME

if TYPE_CHECKING:
    from models.evaluation import SubsetReport


def command(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="A fedfusion checkpoint (.pt).")],
    data: Annotated[Path, typer.Option("--data", help=f"Data root (its {HELDOUT_NAME}/ is used) or a site folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the numbers as JSON instead of a table.")] = False,
    subsets: Annotated[str, typer.Option(help="all (every non-empty modality subset) or full.")] = "all",
    hd95: Annotated[bool, typer.Option(help="Compute HD95 (slower) for every evaluated subset.")] = True,
    batch_size: Annotated[int, typer.Option(help="Evaluation batch size.")] = 4,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:N.")] = "auto",
    select: Annotated[Path | None, typer.Option(
        "--select", help=f"A labelled selection folder (e.g. a data root's {VALIDATION_NAME}/), not the held-out "
        "one: the classifier's operating point is the balanced-accuracy-optimal threshold on it, and the held-out "
        "numbers are computed at that threshold. Default: the threshold the checkpoint stores, else 0.5.")] = None,
) -> None:
    """Rebuild the network from the checkpoint's model config, evaluate it on the held-out cases with the
    modalities outside each subset masked out, and print per-subset metrics with mean, worst and the share of
    monotonicity violations, and the decision threshold the classification metrics are at."""
    from rich.console import Console

    # wide enough for the per-subset table when piped (rich would otherwise fold it to 80 columns)
    console = Console(stderr=as_json, width=None if sys.stdout.isatty() else 200)
    if subsets not in ("all", "full"):
        console.print(f"[red]fedfusion evaluate: --subsets must be all or full, got {subsets!r}[/red]")
        raise typer.Exit(2)
    try:
        from common.data.site import discover_sites
        from common.evaluation import evaluate_checkpoint

        found = discover_sites(Path(data))
        held = [s.path for s in found if s.heldout]
        if held:
            target = held[0]
        elif len(found) == 1:
            target = found[0].path
        else:
            raise ValueError(f"{data} is a data root without {HELDOUT_NAME}/; give the held-out folder (or one site) "
                             "itself as --data")
        threshold, select_cases = None, 0
        if select is not None:
            from common.evaluation import selection_threshold

            if Path(select).resolve() == Path(target).resolve():
                raise ValueError(f"--select {select} is the held-out folder itself: choosing the operating point on "
                                 "the cases it is reported on makes the numbers optimistic; give another cohort")
            threshold, select_cases = selection_threshold(checkpoint, select, batch_size=batch_size, device=device)
        result = evaluate_checkpoint(checkpoint, target, subsets=subsets, hd95=hd95, batch_size=batch_size,
                                     device=device, threshold=threshold)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        console.print(f"[red]fedfusion evaluate: {exc}[/red]")
        raise typer.Exit(2) from exc
    from models.checkpoint import stored_threshold

    report, cfg = result.report, result.config
    if as_json:
        payload = {"checkpoint": str(checkpoint), "data": str(target), "cases": result.cases,
                   "model_config": cfg.to_dict(), "round": result.extra.get("round"),
                   "select": str(select) if select is not None else None, "select_cases": select_cases,
                   **report.to_dict()}
        typer.echo(json.dumps(payload, indent=2))
        return
    console.print(report.to_table(title=f"{checkpoint} on {target} ({result.cases} cases, {cfg.family} fusion)"))
    source = (f"chosen on {select} ({select_cases} cases)" if select is not None
              else "stored in the checkpoint" if stored_threshold(result.extra) is not None else "default")
    console.print(f"evaluated {len(report.subsets)} subsets in {report.seconds:.1f} s on {result.device}; "
                  f"classification at threshold {_threshold_of(report):.3f} ({source})")


def _threshold_of(report: SubsetReport) -> float:
    """The decision threshold the report's classification metrics are at (every row holds the same one)."""
    return float(next((r["threshold"] for r in report.rows.values() if "threshold" in r), float("nan")))
