"""``fedfusion report RUN``: (re)build ``RUN/report.md`` and ``RUN/figures/*.png`` from a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def command(
    run: Annotated[Path, typer.Argument(help="Run directory (config.json, metrics.jsonl, checkpoints/).")],
    data: Annotated[
        Optional[Path],
        typer.Option(
            "--data",
            help="Data root holding heldout/ (or the held-out folder itself) for the checkpoint-based modality "
            "contribution and the ROC curve. Default: the run config's test-dir / data-dir.",
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu or cuda[:i].")] = "auto",
) -> None:
    """Build the run report: global Dice per round, modality contribution, ROC, per-subset table, privacy spent
    per site and the paper's Table I/II layout."""
    from rich.console import Console

    from simulations.report import build_report

    console = Console()
    if data is not None and not data.is_dir():
        console.print(f"[red]fedfusion report: --data {data} is not a directory[/red]")
        raise typer.Exit(2)
    try:
        path = build_report(run, data_dir=data, device=device)
    except FileNotFoundError as exc:
        console.print(f"[red]fedfusion report: {exc}[/red]")
        raise typer.Exit(2) from exc
    figures = sorted((path.parent / "figures").glob("*.png"))
    console.print(f"report: {path} ({len(figures)} figures in {path.parent / 'figures'})")
