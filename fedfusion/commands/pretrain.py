"""``fedfusion pretrain``: a round-0 checkpoint from public data, for ``simulate --init`` / run config
``init-checkpoint`` (:mod:`simulations.pretrain`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def command(
    data: Annotated[Path, typer.Option("--data", help="Public data root (site-* folders, heldout/ for supervised); "
                                       "with --phantoms, where the public phantom cohort is written.")],
    out: Annotated[Path, typer.Option("--out", help="Checkpoint to write (.pt); its training run goes beside it "
                                      "(<name>-run/).")],
    mode: Annotated[str, typer.Option(help="supervised (labels and segmentations) or masked (self-supervised "
                                      "masked-volume reconstruction of the encoders, no labels).")] = "supervised",
    phantoms: Annotated[bool, typer.Option("--phantoms", help="Generate a public phantom cohort in --data (another "
                                           "seed and scanners than any site).")] = False,
    public_sites: Annotated[Optional[int], typer.Option(help="--phantoms: public sites (folders) to generate "
                                                        "(default: the cohort `fedfusion simulate` pretrains on).")] = None,
    cases: Annotated[Optional[int], typer.Option(help="--phantoms: cases per public site (default: as for "
                                                 "public-sites).")] = None,
    public_seed: Annotated[Optional[int], typer.Option(help="--phantoms: seed of the public cohort (must differ "
                                                       "from the run config's seed, the sites').")] = None,
    public_modalities: Annotated[Optional[str], typer.Option(help="--phantoms: the public cohort's modalities, "
                                                             "comma-separated (default: all six; t1,t1ce,t2,flair "
                                                             "for an MRI-only cohort like BraTS).")] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the public cases.")] = 10,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Run config key (model, lr, batch size): --set "
                                                      "lr=0.003 (repeatable).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="torch threads (default: torch's choice).")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress.")] = True,
) -> None:
    """Pretrain the run config's network on public data and write a checkpoint with its provenance; start a
    federation from it with `fedfusion simulate --init OUT` (and freeze what it learnt with --set
    dp-trainable=shared)."""
    from rich.console import Console

    from common import runconfig
    from common.runconfig import RunConfigError, parse_assignments
    from simulations.pretrain import (PUBLIC_CASES, PUBLIC_SEED, PUBLIC_SITES, PretrainSettings, pretrain,
                                      public_phantoms)

    console = Console()
    try:
        overrides = dict(parse_assignments(set_))
        request = None
        if phantoms:
            seed = PUBLIC_SEED if public_seed is None else public_seed
            public_sites = PUBLIC_SITES if public_sites is None else public_sites
            cases = PUBLIC_CASES if cases is None else cases
            rc = runconfig.load(overrides)
            kept = None if public_modalities is None else [m for m in public_modalities.split(",") if m.strip()]
            manifest = public_phantoms(data, sites=public_sites, cases=cases, seed=seed,
                                       federation_seed=int(rc["seed"]), modalities=kept, progress=progress)
            request = {"sites": public_sites, "cases": cases, "seed": seed}
            if kept is not None:
                request["modalities"] = ",".join(manifest["modalities"])
        result = pretrain(PretrainSettings(data=data, out=out, mode=mode, run_config=overrides, epochs=epochs,
                                           threads=threads, progress=progress, phantoms=request))
    except (RunConfigError, ValueError, FileNotFoundError) as exc:
        console.print(f"[red]fedfusion pretrain: {exc}[/red]")
        raise typer.Exit(2) from exc
    console.print(f"[bold green]done[/bold green] in {result.seconds:.0f} s: {result.checkpoint} (sha256 "
                  f"{result.sha256})")
    console.print("provenance: " + ", ".join(f"{k} {v}" for k, v in result.provenance.items() if k != "phantoms"))
