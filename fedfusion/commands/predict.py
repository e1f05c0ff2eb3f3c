"""``fedfusion predict``: run a trained model on new studies -> DICOM SEG, NIfTI on the source grid, and a JSON.

The work is in the shared layer: :mod:`common.predict` (read, preprocess, run, map back), :mod:`common.dicomseg`
(the DICOM Segmentation), :mod:`common.prediction_files` (the files per study) and :mod:`common.provenance` (the
threshold, expected metrics and identity read from the checkpoint and its run directory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer


def _targets(study: Path | None, studies: Path | None, out: Path) -> list[tuple[Path, Path]]:
    """``(study folder, output folder)`` pairs: ``--study`` writes into ``out``, ``--studies`` into ``out/<study>``.

    Raises:
        ValueError: a missing folder, or a ``--studies`` folder without study folders.
    """
    from common.data.site import list_cases

    if study is not None:
        if not study.is_dir():
            raise ValueError(f"study {study} is not a folder; give a folder of DICOM series and/or NIfTI files")
        return [(study, out)]
    assert studies is not None
    if not studies.is_dir():
        raise ValueError(f"--studies {studies} is not a folder; give a folder holding one folder per study")
    targets = [(d, out / d.name) for d in list_cases(studies)]
    if not targets:
        raise ValueError(f"{studies} holds no study folders; give a folder holding one folder per study")
    return targets


def _result_line(result: Any) -> str:
    """One console line (rich markup) per study."""
    from rich.markup import escape

    if result.outputs is None:
        details = "; ".join(result.problems[:5]) or result.error or ""
        return f"[red]{escape(result.study)}: failed[/red]: {escape(details)}"
    s = result.outputs.summary
    expected = s["expected_performance"]
    dice = "" if expected is None else f", expected dice-whole {expected['metrics'].get('dice-whole')}"
    return escape(f"{result.study}: P(malignant) {s['malignancy_probability']:.3f} -> {s['decision']} (threshold "
                  f"{s['threshold']:g}), modalities {s['subset']}{dice}; {result.outputs.seg.note}")


def command(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", "-c", help="A fedfusion checkpoint (RUN/checkpoints/best.pt).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (batch mode: one sub-folder per study).")],
    study: Annotated[Optional[Path], typer.Option("--study", help="One study folder (DICOM series and/or NIfTI files).")] = None,
    studies: Annotated[Optional[Path], typer.Option("--studies", help="A folder of study folders (batch mode).")] = None,
    series_map: Annotated[
        Optional[Path],
        typer.Option("--series-map", help="JSON/TOML file {modality: regex or [regex, ...]} for SeriesDescription."),
    ] = None,
    dicom_seg: Annotated[bool, typer.Option(help="Write a DICOM SEG for studies with DICOM input.")] = True,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:N.")] = "auto",
) -> None:
    """Segment and classify new studies with a trained model: writes, per study, a DICOM Segmentation referencing
    the source series (DICOM input only), the segmentation as NIfTI on the source grid, and a JSON with
    P(malignant), the decision threshold, the modalities used and the run's held-out metrics for exactly that
    modality subset. Exit code 0 when at least one study was predicted, 1 when none was, 2 for bad arguments."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if (study is None) == (studies is None):
        console.print("[red]fedfusion predict: give exactly one of --study DIR or --studies DIR[/red]")
        raise typer.Exit(2)
    try:
        from common.data.series_mapping import load_series_mapping
        from common.evaluation import load_model
        from common.predict_batch import BATCH_SUMMARY, predict_studies, write_batch_summary
        from common.provenance import load_provenance

        network, cfg, extra = load_model(checkpoint, device)
        provenance = load_provenance(checkpoint, extra)
        mapping = load_series_mapping(series_map)
        targets = _targets(study, studies, out)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        console.print(f"[red]fedfusion predict: {escape(str(exc))}[/red]")
        raise typer.Exit(2) from exc
    console.print(escape(f"model: {cfg.family} fusion of {', '.join(cfg.modalities)}; run {provenance.run_id}; "
                         f"threshold {provenance.threshold:g} ({provenance.threshold_source})"))
    with Progress(TextColumn("[bold]predict[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("", total=len(targets))
        results = predict_studies(
            network, targets, provenance, series_mapping=mapping, dicom_seg=dicom_seg,
            before=lambda d: bar.update(task, description=escape(d.name)),
            after=lambda r: (console.print(_result_line(r)), bar.advance(task)),
        )
    if studies is not None:
        write_batch_summary(results, out / BATCH_SUMMARY, str(checkpoint))
    done = sum(r.ok for r in results)
    failed = len(results) - done
    console.print(escape(f"{done} of {len(results)} studies predicted into {out}" + (f"; {failed} failed" if failed
                                                                                      else "")))
    if not done:
        raise typer.Exit(1)
