"""``fedfusion train-central``: train a fusion network on pooled sites (the centralized upper bound)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer


def command(
    data: Annotated[Path, typer.Option("--data", help="Data root with site-* folders and heldout/.")],
    out: Annotated[Path, typer.Option("--out", help="Run directory (config, metrics.jsonl, checkpoints).")],
    fusion: Annotated[str, typer.Option("--fusion", help="Fusion family: input, single, hierarchical, attention, "
                                        "output.")] = "attention",
    modalities: Annotated[str, typer.Option(help="Comma-separated model modalities.")] = "t1,t1ce,t2,flair,ct,us",
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 10,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-3,
    optimizer: Annotated[str, typer.Option(help="adam or sgd.")] = "adam",
    batch_size: Annotated[int, typer.Option(help="Training batch size (cases).")] = 4,
    spatial_size: Annotated[tuple[int, int, int], typer.Option(help="D H W the cases are resized to.")] = (16, 32,
                                                                                                          32),
    channels: Annotated[str, typer.Option(help="Encoder widths per level, comma-separated.")] = "8,16,32",
    modality_dropout: Annotated[Optional[float], typer.Option(help="Training modality dropout (default: model "
                                                              "config default).")] = None,
    augment: Annotated[bool, typer.Option(help="Random flips / intensity jitter of training cases.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of initialisation, shuffling, dropout.")] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:N.")] = "auto",
    heldout: Annotated[Optional[Path], typer.Option(help="Held-out folder (default DATA/heldout).")] = None,
    eval_every: Annotated[int, typer.Option(help="Evaluate every N epochs (0: only at the end).")] = 1,
    eval_subsets: Annotated[str, typer.Option(help="Per-epoch evaluation subsets: full or all.")] = "full",
    final_subsets: Annotated[str, typer.Option(help="Last-epoch evaluation subsets: full or all.")] = "all",
    threads: Annotated[Optional[int], typer.Option(help="torch threads (default: torch's choice).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train on all site-* folders of DATA pooled, evaluate on DATA/heldout, log to OUT/metrics.jsonl and save
    OUT/checkpoints/{last,best}.pt."""
    from rich.console import Console

    from simulations.central import CentralSettings, train_central

    console = Console(width=None if sys.stdout.isatty() else 200)
    try:
        settings = CentralSettings(
            data=data, out=out, family=fusion.strip().lower(),
            modalities=tuple(m for m in modalities.split(",") if m.strip()), epochs=epochs, lr=lr,
            optimizer=optimizer, batch_size=batch_size, spatial_size=tuple(spatial_size),
            channels=tuple(int(c) for c in channels.split(",") if c.strip()), modality_dropout=modality_dropout,
            augment=augment, seed=seed, device=device, heldout=heldout, eval_every=eval_every,
            eval_subsets=eval_subsets, final_subsets=final_subsets, threads=threads, progress=progress,
        )
        result = train_central(settings)
    except (ValueError, FileNotFoundError) as exc:
        console.print(f"[red]fedfusion train-central: {exc}[/red]")
        raise typer.Exit(2) from exc
    if result.final is not None:
        console.print(result.final.to_table(title=f"held-out, epoch {settings.epochs}"))
    console.print(
        f"[bold green]done[/bold green] in {result.seconds:.0f} s; best all/dice-whole {result.best_value:.3f} at "
        f"epoch {result.best_epoch}; run directory {out}"
    )
