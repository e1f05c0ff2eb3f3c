"""``fedfusion inspect DIR``: check a site or a data root before training; the CLI only formats the report of
:func:`common.data.inspect.inspect_data`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer


def command(
    directory: Annotated[Path, typer.Argument(help="A site folder (case folders, optional labels.csv) or a data "
                                              "root.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    modalities: Annotated[
        Optional[list[str]],
        typer.Option("--modalities", help="Modalities to check, comma-separated or repeated (default: all)."),
    ] = None,
    series_map: Annotated[
        Optional[Path],
        typer.Option("--series-map", help="JSON/TOML file {modality: regex or [regex, ...]} for SeriesDescription."),
    ] = None,
    headers_only: Annotated[
        bool, typer.Option("--headers-only", help="Read DICOM headers only (faster; misses pixel-level problems).")
    ] = False,
    require_seg: Annotated[
        bool, typer.Option("--require-seg/--allow-missing-seg",
                           help="Count only cases with a segmentation as usable (default: a labelled case without "
                                "one is usable, it trains its classification).")
    ] = False,
    state: Annotated[
        Optional[Path],
        typer.Option("--state", help="A site's state folder: also build its preprocessed cache there for the shipped "
                                     "run config (what `fedfusion site` does at start-up)."),
    ] = None,
    plan: Annotated[
        bool, typer.Option("--plan/--no-plan", help="Show each site's privacy plan for its case count under the run "
                           "config's defaults (fedfusion privacy-plan).")
    ] = True,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Run config key for the plan: --set "
                                                      "dp-target-epsilon=3 (repeatable).")] = None,
) -> None:
    """Report cases, modalities, label balance, which targets the cases carry (segmentation, label, both,
    neither) and every problem, and what epsilon each site's case count affords
    (privacy plan); exit 1 when no usable case remains."""
    from rich.console import Console

    from common.data.inspect import inspect_data
    from models.modalities import MODALITIES, canonical

    err = Console(stderr=True)
    try:
        mods = canonical([m for arg in modalities for m in arg.split(",") if m.strip()]) if modalities else MODALITIES
        report = inspect_data(directory, mods, series_map, require_seg=require_seg,
                              read_pixels=not headers_only)
        plans = _plans(report, set_) if plan else {}
    except ValueError as exc:  # bad --modalities, --series-map or --set
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps({**report.to_dict(), "privacy-plans": {k: p.to_dict() for k, p in plans.items()}},
                              indent=2))
    else:
        _print_report(report, Console())
        for name, p in plans.items():
            typer.echo(f"privacy plan of {name} (run config defaults{' and --set' if set_ else ''}; "
                       f"`fedfusion privacy-plan --cases {p.patients} --state SITE-STATE` adds its ledger):")
            for line in p.lines():
                typer.echo(f"  {line}")
    if not report.ok:
        err.print(f"[red]no usable case in {directory}[/red]")
        raise typer.Exit(1)
    if state is not None:
        _warm_cache(directory, state, series_map, err)


def _warm_cache(directory: Path, state: Path, series_map: Optional[Path], err: "object") -> None:
    """Build the site's preprocessed cache in ``state`` (client.prepare.warm_site_cache)."""
    from client.prepare import warm_site_cache
    from client.site import SiteDecline

    try:
        n = warm_site_cache(directory.expanduser().resolve(), state.expanduser().resolve(),
                            series_map.expanduser().resolve() if series_map else None)
    except SiteDecline as exc:
        err.print(f"[red]preprocessed cache not built:[/red] {exc.reason}")  # type: ignore[attr-defined]
        raise typer.Exit(1) from None
    err.print(f"preprocessed cache: {n} cases in {state / 'preprocessed'}")  # type: ignore[attr-defined]


def _plans(report: "object", assignments: list[str] | None) -> dict[str, "object"]:
    """The privacy plan of every training site of ``report`` with usable cases (cases counted as patients: an upper
    bound when a patient has several studies), for the modalities it has; the sites of a data root are the ``S``
    averaged each round."""
    from client.privacy.planner import plan
    from common.data.inspect import InspectReport
    from common.runconfig import parse_assignments
    from models.modalities import MODALITIES

    assert isinstance(report, InspectReport)
    sites = [s for s in report.sites if not s.heldout and s.usable_cases > 0]
    overrides = parse_assignments(assignments)
    out = {}
    for site in sites:
        present = [m for m, n in site.modality_counts(MODALITIES).items() if n > 0]
        out[site.name] = plan(overrides, patients=site.usable_cases, sites=len(sites), site_modalities=present)
    return out


def _print_report(report: "object", console: "object") -> None:
    from rich.markup import escape
    from rich.table import Table

    from common.data.inspect import InspectReport

    assert isinstance(report, InspectReport)
    mods = report.modalities
    for p in report.problems:
        console.print(f"[red]{p.kind}[/red] {escape(p.path)}: {escape(p.reason)}")  # type: ignore[attr-defined]
    for site in report.sites:
        title = escape(f"{site.name}{'  (held-out set)' if site.heldout else ''}  {site.path}")
        table = Table(title=title, title_justify="left")
        table.add_column("case")
        for m in mods:
            table.add_column(m, justify="center")
        table.add_column("seg", justify="center")
        table.add_column("convention")
        table.add_column("label")
        table.add_column("usable", justify="center")
        table.add_column("problems", justify="right")
        for c in site.cases:
            table.add_row(
                escape(c.case_id),
                *("[green]✓[/green]" if m in c.modalities else "·" for m in mods),
                "[green]✓[/green]" if c.has_seg else "[red]✗[/red]",
                escape(_convention_cell(c.convention, c.convention_from)),
                "?" if c.label is None else str(c.label),
                "[green]yes[/green]" if c.usable else "[red]no[/red]",
                str(sum(p.severity == "error" for p in c.problems)) if c.problems else "",
            )
        console.print(table)  # type: ignore[attr-defined]
        counts = site.label_counts()
        mod_counts = site.modality_counts(mods)
        console.print(  # type: ignore[attr-defined]
            f"  usable cases: {site.usable_cases}/{len(site.cases)}   labels: "
            + ", ".join(f"{k} {v}" for k, v in counts.items() if v or k != "unlabelled")
            + "   modalities: " + ", ".join(f"{m} {n}" for m, n in mod_counts.items())
        )
        console.print(  # type: ignore[attr-defined]
            "  targets: " + ", ".join(f"{k} {v}" for k, v in site.target_counts().items())
            + ("   (no labels.csv: every case is unlabelled)"
               if any(p.kind == "no-labels-file" for p in site.problems) else "")
        )
        problems = site.all_problems()
        if problems:
            ptable = Table(title=escape(f"{site.name}: {len(problems)} problem(s)"), title_justify="left")
            ptable.add_column("severity")
            ptable.add_column("kind")
            ptable.add_column("path", overflow="fold")
            ptable.add_column("reason", overflow="fold")
            for p in problems:
                colour = {"error": "red", "warning": "yellow"}.get(p.severity, "blue")
                ptable.add_row(f"[{colour}]{p.severity}[/{colour}]", p.kind, escape(p.path), escape(p.reason))
            console.print(ptable)  # type: ignore[attr-defined]
    console.print(  # type: ignore[attr-defined]
        f"[bold]{report.usable_cases} usable case(s)[/bold] in {len(report.sites)} site folder(s)"
    )


def _convention_cell(convention: str, chosen_by: str) -> str:
    """The table's convention column: the name and how it was chosen (see ``CaseReport.convention_from``)."""
    if not convention:
        return "·"
    return f"{convention} ({chosen_by})" if chosen_by else convention
