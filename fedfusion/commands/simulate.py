"""``fedfusion simulate``: the project's main job."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fedfusion.commands.help import FAMILIES_HELP, SCENARIOS_HELP, STRATEGIES_HELP


def command(
    out: Annotated[Path, typer.Option("--out", help="Run directory (config, metrics, checkpoints, report).")] = Path(
        "runs/latest"
    ),
    data: Annotated[
        Optional[Path], typer.Option(help="Folder of site-* folders (+ heldout/). Default: generate phantoms.")
    ] = None,
    sites: Annotated[int, typer.Option(help="Phantom sites to generate (when --data is not given).")] = 3,
    cases_per_site: Annotated[int, typer.Option(help="Phantom cases per site (varies per site).")] = 24,
    scenario: Annotated[str, typer.Option(help=SCENARIOS_HELP)] = (
        "realistic"
    ),
    rounds: Annotated[Optional[int], typer.Option(help="Federated rounds (run config num-server-rounds).")] = None,
    fusion: Annotated[
        Optional[str], typer.Option(help=FAMILIES_HELP)
    ] = None,
    modalities: Annotated[Optional[str], typer.Option(help="Comma-separated modalities of the model.")] = None,
    dp_epsilon: Annotated[
        Optional[float], typer.Option(help="Target epsilon per site over the run ('inf' disables DP).")
    ] = None,
    strategy: Annotated[
        Optional[str], typer.Option(help=STRATEGIES_HELP)
    ] = None,
    aggregation: Annotated[Optional[str], typer.Option(help="modality-aware or plain.")] = None,
    local_epochs: Annotated[Optional[int], typer.Option(help="Local epochs per round.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for phantoms, model init and sampling.")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this directory.")] = None,
    init: Annotated[
        Optional[Path], typer.Option("--init", help="Start from this checkpoint's weights (fedfusion pretrain, or a "
                                     "run's checkpoints/best.pt; run config init-checkpoint).")
    ] = None,
    set_: Annotated[
        Optional[list[str]], typer.Option("--set", help="Any run config key: --set lr=0.003 (repeatable).")
    ] = None,
    cpus_per_site: Annotated[Optional[float], typer.Option(help="CPU cores per virtual site (default 1).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress display instead of Flower's log.")] = True,
    report: Annotated[bool, typer.Option(help="Write report.md with figures at the end.")] = True,
    engine: Annotated[
        str,
        typer.Option(
            help="inprocess: Flower's simulation engine in this process; flwr: `flwr run` on a private local "
            "SuperLink that is stopped (with all its workers) when the run ends or is interrupted."
        ),
    ] = "inprocess",
    ray_address: Annotated[
        Optional[str],
        typer.Option(
            "--ray-address",
            help="Run the virtual sites on an existing Ray cluster (HOST:PORT of its head, as `ray start --head` "
            "prints) instead of a private one on this machine. Every node needs this fedfusion environment at the "
            "same path and the data and run folders on a shared filesystem.",
        ),
    ] = None,
    public_pretrain: Annotated[
        Optional[bool],
        typer.Option(
            "--public-pretrain/--no-public-pretrain",
            help="Start from a network pretrained on a generated public phantom cohort (another seed and "
            "scanners than any site; made once in OUT/public) rather than the seed's weights. Default: on when DP "
            "is on, phantoms are generated and no --init/--resume is given.",
        ),
    ] = None,
    public_modalities: Annotated[
        Optional[str],
        typer.Option(
            "--public-modalities",
            help="Public pretraining: the modalities the generated public cohort has, comma-separated (default: "
            "all six). Public brain-tumour data are MRI only (t1,t1ce,t2,flair): the CT and ultrasound encoders "
            "are then the sites' to train (--set dp-trainable=head+ct+us).",
        ),
    ] = None,
) -> None:
    """Generate phantom hospital sites (unless --data), run a federated simulation with the real ServerApp and
    ClientApp on Flower's simulation engine, and write a report to OUT/report.md."""
    import os

    # Before torch loads libgomp: the ServerApp's evaluation threads share the machine with the virtual sites
    # (and whatever else runs there); with spinning OpenMP waits on a busy machine the held-out evaluation took
    # several times its CPU time in wall time (docs/benchmarks.md, demo section). Waiting threads sleep instead.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from rich.console import Console

    from common.runconfig import parse_assignments
    from simulations.flwr_run import FlwrRunError
    from simulations.ray_cluster import RayClusterError
    from simulations.simulate import simulate

    console = Console()
    overrides: dict[str, object] = parse_assignments(set_)
    if dp_epsilon is not None:
        if dp_epsilon == float("inf"):
            overrides["dp-enabled"] = False
        else:
            overrides["dp-enabled"] = True
            overrides["dp-target-epsilon"] = dp_epsilon
    named = {
        "num-server-rounds": rounds,
        "model-family": fusion,
        "model-modalities": modalities,
        "strategy": strategy,
        "aggregation": aggregation,
        "local-epochs": local_epochs,
        "seed": seed,
    }
    overrides.update({k: v for k, v in named.items() if v is not None})
    if init is not None:
        overrides["init-checkpoint"] = str(init.expanduser().resolve())
    if resume is not None:
        overrides["resume"] = str(resume.resolve())
        out = resume
    try:
        result = simulate(
            out,
            data=data,
            sites=sites,
            cases_per_site=cases_per_site,
            scenario=scenario,
            overrides=overrides,
            cpus_per_site=cpus_per_site,
            progress=progress,
            report=report,
            engine=engine,
            ray_address=ray_address,
            public_pretrain=public_pretrain,
            public_modalities=None if public_modalities is None else [
                m.strip() for m in public_modalities.split(",") if m.strip()],
        )
    except (KeyError, ValueError, FileNotFoundError, FlwrRunError, RayClusterError) as exc:
        console.print(f"[red]fedfusion simulate: {exc}[/red]")
        raise typer.Exit(2) from exc
    m = result.final_metrics
    console.print(
        f"[bold green]done[/bold green]: {result.rounds} rounds over {result.num_sites} sites in "
        f"{result.wall_seconds:.0f} s, peak memory {result.peak_rss_mb:.0f} MiB"
    )
    console.print(_work_split(result, cpus_per_site), highlight=False)
    if m:
        console.print(
            "final global (all modalities): "
            + ", ".join(f"{k.split('/', 1)[1]} {v:.3f}" for k, v in m.items() if k.startswith("all/") and v is not None
                        and k.split("/", 1)[1] in ("dice-whole", "dice-core", "dice-enhancing", "accuracy", "auroc"))
        )
    best = _best_line(result.run_dir)
    if best:
        console.print(best, highlight=False)
    if result.report:
        console.print(f"report: {result.report}")


def _best_line(run_dir: Path) -> str | None:
    """Which checkpoint to use and why: ``best.pt``'s round and the selection measure that chose it."""
    from server.checkpointing import RunDirectory, best_record

    best = best_record(run_dir)
    if best is None:
        return None
    value = best["value"]
    shown = f" = {value:.3f}" if isinstance(value, (int, float)) else ""
    return (f"best model: {RunDirectory(run_dir).best_path} (round {best['round']}, {best['metric']}{shown} on the "
            f"{best['selected_on']}/ set)")


def _work_split(result: "object", cpus_per_site: Optional[float]) -> str:
    """Where the simulation's time went (start-up, rounds by phase) against its ideal, from the run's timings."""
    from simulations.observer import SimulationResult, parallel_sites
    from simulations.round_phases import read_round_splits, work_split
    from simulations.simulate import TIMINGS_FILE

    assert isinstance(result, SimulationResult)
    timings_file = result.run_dir / TIMINGS_FILE
    splits = read_round_splits(result.run_dir, timings_file)
    if not splits:
        return "work split: no round finished"
    return work_split(splits, parallel_sites(result.num_sites, cpus_per_site), timings_file)
