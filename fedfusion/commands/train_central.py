"""``fedfusion train-central``: train a fusion network on pooled sites (the centralized upper bound)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from fedfusion.commands.help import FAMILIES_HELP


def command(
    data: Annotated[Path, typer.Option("--data", help="Data root with site-* folders and heldout/.")],
    out: Annotated[Path, typer.Option("--out", help="Run directory (config, metrics.jsonl, checkpoints).")],
    fusion: Annotated[Optional[str], typer.Option("--fusion", help=FAMILIES_HELP)] = None,
    modalities: Annotated[Optional[str], typer.Option(help="Comma-separated model modalities (run config "
                                                      "model-modalities).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs (default: num-server-rounds x "
                                                  "local-epochs, the passes a site makes in the federated run).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (run config lr).")] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="adam or sgd (default: the sites' optimizer).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Training batch size (run config batch-size).")] = None,
    channels: Annotated[Optional[str], typer.Option(help="Encoder widths per level (run config model-channels).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of initialisation, shuffling, dropout (run config seed).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Any run config key: --set model-spatial-size=16,32,32 "
                                                      "(repeatable).")] = None,
    augment: Annotated[bool, typer.Option(help="Random flips / intensity jitter of training cases.")] = False,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:N.")] = "auto",
    heldout: Annotated[Optional[Path], typer.Option(help="Held-out folder (default DATA/heldout).")] = None,
    eval_every: Annotated[int, typer.Option(help="Evaluate every N epochs (0: only at the end).")] = 1,
    eval_subsets: Annotated[str, typer.Option(help="Per-epoch evaluation subsets: full or all.")] = "full",
    final_subsets: Annotated[str, typer.Option(help="Last-epoch evaluation subsets: full or all.")] = "all",
    threads: Annotated[Optional[int], typer.Option(help="torch threads (default: torch's choice).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train on all site-* folders of DATA pooled, evaluate on DATA/heldout, log to OUT/metrics.jsonl and save
    OUT/checkpoints/{last,best}.pt. Model, lr, batch size and seed default to the run config (pyproject.toml), the
    same network a federated run trains."""
    from rich.console import Console

    from common.runconfig import RunConfigError, parse_assignments
    from simulations.central import CentralSettings, train_central

    console = Console(width=None if sys.stdout.isatty() else 200)
    try:
        overrides: dict[str, object] = dict(parse_assignments(set_))
        named = {"model-family": fusion, "model-modalities": modalities, "lr": lr, "batch-size": batch_size,
                 "model-channels": channels, "seed": seed}
        overrides.update({k: v for k, v in named.items() if v is not None})
        settings = CentralSettings.from_run_config(
            data, out, overrides, epochs=epochs, optimizer=optimizer, augment=augment, device=device,
            heldout=heldout, eval_every=eval_every, eval_subsets=eval_subsets, final_subsets=final_subsets,
            threads=threads, progress=progress,
        )
        result = train_central(settings)
    except (RunConfigError, ValueError, FileNotFoundError) as exc:
        console.print(f"[red]fedfusion train-central: {exc}[/red]")
        raise typer.Exit(2) from exc
    if result.final is not None:
        console.print(result.final.to_table(title=f"held-out, epoch {settings.epochs}"))
    console.print(
        f"[bold green]done[/bold green] in {result.seconds:.0f} s; best all/dice-whole {result.best_value:.3f} at "
        f"epoch {result.best_epoch}; run directory {out}"
    )
