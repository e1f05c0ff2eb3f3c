"""``fedfusion phantoms``: generate multi-site multimodal phantom studies (DICOM or NIfTI)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fedfusion.commands.help import SCENARIOS_HELP


def command(
    out: Annotated[Path, typer.Option("--out", help="Folder to write site-* folders, the held-out cohorts and "
                                      "phantoms.json.")],
    sites: Annotated[int, typer.Option(help="Number of hospital sites.")] = 3,
    cases_per_site: Annotated[int, typer.Option(help="Cases (patients) per site; 'realistic' varies it +-30%.")] = 20,
    seed: Annotated[int, typer.Option(help="Seed: same seed, same pixels, labels and UIDs.")] = 0,
    scenario: Annotated[
        str, typer.Option(help=SCENARIOS_HELP)
    ] = "realistic",
    shape: Annotated[
        tuple[int, int, int], typer.Option(help="Reference grid D H W (slices, rows, columns).")
    ] = (32, 64, 64),
    format_: Annotated[str, typer.Option("--format", help="dicom (one file per slice) or nifti (BraTS).")] = "dicom",
    heldout_cases: Annotated[int, typer.Option(help="Cases of heldout/, the set the numbers are reported on (all "
                                               "modalities).")] = 12,
    validation_cases: Annotated[Optional[int], typer.Option(help="Cases of validation/, the server's model-"
                                                            "selection set (default: as --heldout-cases).")] = None,
    unseen_cases: Annotated[Optional[int], typer.Option(help="Cases of heldout-unseen/, a cohort from a scanner "
                                                        "vendor no site has (default: as --heldout-cases).")] = None,
    unlabelled_fraction: Annotated[float, typer.Option(help="Share of each site's cases left out of its labels.csv "
                                                       "(mixed supervision; 1: no labels.csv).")] = 0.0,
    unsegmented_fraction: Annotated[float, typer.Option(help="Share of each site's cases written without a "
                                                        "segmentation (disjoint from the unlabelled ones).")] = 0.0,
    overwrite: Annotated[bool, typer.Option(help="Replace phantoms generated earlier in --out.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Generate phantom hospital sites: each case is one patient with a brain lesion (oedema, non-enhancing
    core, enhancing rim) rendered as T1, T1ce, T2, FLAIR, CT and ultrasound with scanner-like physics, plus a
    benign/malignant label. Sites differ by scenario; heldout/ (reported numbers), validation/ (model selection) and
    heldout-unseen/ (an unseen scanner) hold complete cases."""
    from rich.console import Console
    from rich.table import Table

    from models.modalities import MODALITIES
    from simulations.phantom_writers import generate

    console = Console()
    try:
        manifest = generate(
            out,
            sites=sites,
            cases_per_site=cases_per_site,
            seed=seed,
            scenario=scenario,
            shape=shape,
            fmt=format_,
            heldout_cases=heldout_cases,
            validation_cases=validation_cases,
            unseen_cases=unseen_cases,
            unlabelled_fraction=unlabelled_fraction,
            unsegmented_fraction=unsegmented_fraction,
            progress=progress,
            overwrite=overwrite,
        )
    except (ValueError, FileExistsError, OSError) as exc:
        console.print(f"[red]fedfusion phantoms: {exc}[/red]")
        raise typer.Exit(2) from exc

    table = Table(title=f"phantoms: scenario {manifest['scenario']}, seed {manifest['seed']}, "
                        f"{manifest['format']} {'x'.join(str(s) for s in manifest['shape'])}")
    table.add_column("site")
    table.add_column("cases", justify="right")
    table.add_column("benign / malignant", justify="right")
    table.add_column("modalities (cases with the series)")
    table.add_column("vendor")
    table.add_column("spacing mm")
    rows = list(manifest["sites"].items())
    rows += list(manifest.get("cohorts", {}).items())
    for name, entry in rows:
        per_mod = entry["cases_per_modality"]
        mods = " ".join(f"{m}:{per_mod[m]}" for m in MODALITIES if m in per_mod)
        table.add_row(
            name,
            str(entry["cases"]),
            f"{entry['benign']} / {entry['malignant']}",
            mods,
            entry["vendor"].split()[0].split("_")[0].title(),
            "x".join(f"{s:.1f}" for s in entry["spacing_mm"]),
        )
    console.print(table)
    console.print(f"written to {Path(out).resolve()} (manifest: phantoms.json)")
