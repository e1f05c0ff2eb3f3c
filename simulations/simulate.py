"""Local multi-site simulation: the real ServerApp and ClientApp on Flower's simulation engine.

``simulate`` generates phantom sites when no data is given, fuses the run config (pyproject defaults +
overrides), runs the apps over one virtual SuperNode per site, shows progress from the run's metrics log, and
writes the report. The apps are loaded by their pyproject component names, exactly as ``flwr run`` loads them;
the in-process engine can load another ClientApp (``client_app``, ``"module:attribute"`` importable from the
project directory, e.g. a test's attacking sites).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.layout import simulated_state_dir, site_dirs
from common import runconfig, timings
from common.runconfig import PROJECT_DIR, ConfigValue

from .observer import RunObserver, SimulationResult, backend_config
from .ray_cluster import connect, disconnect

log = logging.getLogger("fedfusion.simulate")

SERVER_APP = "server.server_app:app"
CLIENT_APP = "client.client_app:app"
#: The run's phase timings (:mod:`common.timings`), in its run directory.
TIMINGS_FILE = "timings.jsonl"


def permit_virtual_sites(
    run_dir: Path, data: Path, *, allow_no_dp: bool = True, min_noise_multiplier: float | None = None,
    reproducible_noise: bool | None = None,
) -> None:
    """Write the privacy policy of every virtual site of a simulation (``RUN/site-state/<site>``).

    A real site's operator owns its policy and fedfusion never loosens it from the server side; in a simulation the
    person running it operates every virtual site, so a run without DP (or with less noise than the default floor,
    or with DP noise reproducible from the run's seed, for experiments that must repeat exactly) needs their
    policies to say so explicitly. ``None`` leaves a key as the policy file has it.
    """
    from client.privacy.policy import write_policy_file

    values: dict[str, object] = {"allow-no-dp": allow_no_dp}
    if min_noise_multiplier is not None:
        values["min-noise-multiplier"] = min_noise_multiplier
    if reproducible_noise is not None:
        values["reproducible-noise"] = reproducible_noise
    for site in site_dirs(data):
        write_policy_file(simulated_state_dir(run_dir, site.name), values)


def run_federation(
    run_config: Mapping[str, ConfigValue],
    num_sites: int,
    *,
    cpus_per_site: float | None = None,
    progress: bool = True,
    client_app: str = CLIENT_APP,
    ray_address: str | None = None,
) -> SimulationResult:
    """Run the ServerApp and a ClientApp over ``num_sites`` virtual SuperNodes with ``run_config``.

    ``client_app`` is the ClientApp's ``"module:attribute"`` (default: fedfusion's own); Ray workers import it by
    that path from the project directory. The run directory is ``run_config["run-dir"]``; Flower's own log goes to
    ``<run-dir>/flower.log``. ``ray_address``: run the virtual sites on the existing Ray cluster whose head is at
    ``HOST:PORT`` (:mod:`simulations.ray_cluster`) instead of a private one on this machine.
    """
    # Flower's public run_simulation() cannot pass a run config to the apps; its internal runner (the one
    # `flower-simulation` uses) can. flwr is pinned to <1.50 in pyproject.toml for this reason.
    from flwr.app import Context, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    run_dir = Path(str(run_config["run-dir"]))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(dict(run_config), indent=2, sort_keys=True))

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

    flwr_logger = logging.getLogger("flwr")
    handler = logging.FileHandler(run_dir / "flower.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    flwr_logger.addHandler(handler)
    console_handlers = [h for h in flwr_logger.handlers if h is not handler]
    saved_levels = [h.level for h in console_handlers]
    if progress:
        for h in console_handlers:  # the progress display replaces Flower's wall of logs
            h.setLevel(logging.WARNING)

    run_id = int.from_bytes(secrets.token_bytes(8), "little") >> 1
    run = Run.create_empty(run_id=run_id)
    run.primary_task_id = int.from_bytes(secrets.token_bytes(8), "little") >> 1
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = dict(run_config)
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    server_context = Context(
        run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config)
    )

    backend = backend_config(num_sites, cpus_per_site)
    # phase timings of this run (RUN/timings.jsonl, unless the caller collects them elsewhere): the work split
    # `fedfusion simulate` prints and the benches read (simulations/round_phases.py)
    own_timings = timings.ENV not in os.environ
    if own_timings:
        os.environ[timings.ENV] = str(run_dir / TIMINGS_FILE)
    try:
        with RunObserver(run_config, num_sites, progress) as observer:
            # Ray is started (or joined) here, not by Flower: the workers get fedfusion's environment either way
            with timings.phase("driver", "ray-start"):
                connect(backend["init_args"], cpus_per_site, ray_address)
            with timings.phase("driver", "federation"):
                _run_simulation(
                    num_supernodes=num_sites,
                    exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                    server_app_attr=SERVER_APP,
                    client_app_attr=client_app,
                    backend_name="ray",
                    backend_config=backend,
                    app_dir=str(PROJECT_DIR),
                    run=run,
                    server_app_context=server_context,
                    is_app=True,
                )
    finally:
        disconnect()
        if own_timings:
            os.environ.pop(timings.ENV, None)
        flwr_logger.removeHandler(handler)
        handler.close()
        for h, level in zip(console_handlers, saved_levels):
            h.setLevel(level)
    return observer.result()


def simulate(
    out: Path,
    *,
    data: Path | None = None,
    sites: int = 3,
    cases_per_site: int = 24,
    scenario: str = "realistic",
    shape: tuple[int, int, int] = (32, 64, 64),
    data_format: str = "dicom",
    heldout_cases: int = 12,
    overrides: Mapping[str, Any] | None = None,
    cpus_per_site: float | None = None,
    progress: bool = True,
    report: bool = True,
    engine: str = "inprocess",
    client_app: str = CLIENT_APP,
    ray_address: str | None = None,
    public_pretrain: bool | None = False,
    public_modalities: Sequence[str] | None = None,
) -> SimulationResult:
    """Generate phantoms if needed, run the federation, and build the report. See ``fedfusion simulate``.

    ``engine``: ``inprocess`` runs Flower's simulation engine in this process; ``flwr`` submits the same run
    config with ``flwr run`` to a private local SuperLink (:mod:`simulations.flwr_run`). ``client_app``: the
    ClientApp ``"module:attribute"`` the in-process engine runs (the ``flwr`` engine runs pyproject's).
    ``ray_address``: the in-process engine's virtual sites run on the existing Ray cluster with its head at this
    ``HOST:PORT`` (see :mod:`simulations.ray_cluster` for what every node needs).
    ``public_pretrain``: start from a network pretrained on a generated public phantom cohort in ``OUT/public``
    (:func:`simulations.pretrain.public_start`; made once, reused by reruns) instead of the seed's weights;
    ``None`` = when DP is on, phantoms are generated and neither ``init-checkpoint`` nor ``resume`` is set
    (DP-SGD from scratch at a few dozen cases per site does not learn: docs/results.md, ``privacy``).
    ``public_modalities``: the public cohort's modalities (None: all six; see
    :func:`simulations.pretrain.public_phantoms`).
    """
    if engine not in ("inprocess", "flwr"):
        raise ValueError(f"unknown engine {engine!r}; use inprocess (Flower's engine in this process) or flwr")
    if engine == "flwr" and ray_address:
        raise ValueError("--ray-address needs engine='inprocess': the flwr engine's SuperLink starts its own Ray")
    if engine == "flwr" and client_app != CLIENT_APP:
        raise ValueError(f"client_app {client_app!r} needs engine='inprocess': `flwr run` runs the ClientApp that "
                         f"pyproject.toml names ({CLIENT_APP})")
    out = Path(out)
    overrides = dict(overrides or {})
    generate = data is None
    data = Path(out / "data" if data is None else data)
    overrides.setdefault("data-dir", str(data.resolve()))
    overrides["run-dir"] = str(out.resolve())
    config = runconfig.load(overrides)  # a bad key fails here, before phantoms are written
    if public_pretrain is None:
        public_pretrain = bool(generate and config["dp-enabled"])
    pretraining = public_pretrain and not config["init-checkpoint"] and not config["resume"]
    if public_modalities is not None:
        from models.modalities import canonical

        public_modalities = canonical(public_modalities)  # an unknown name fails here, before phantoms
        if not pretraining:
            log.warning("--public-modalities %s ignored: this run does not pretrain on public data (no DP, "
                        "--no-public-pretrain, --data, --init or --resume)", ",".join(public_modalities))
    if generate:
        from .phantom_writers import ensure

        ensure(data, sites=sites, cases_per_site=cases_per_site, seed=int(config["seed"]), scenario=scenario,
               shape=shape, fmt=data_format, heldout_cases=heldout_cases, progress=progress)
    if pretraining:
        from .pretrain import public_start

        kept = {} if public_modalities is None else {"modalities": public_modalities}
        config["init-checkpoint"] = str(public_start(out / "public", config, progress=progress, **kept).resolve())
    sites_found = site_dirs(data)
    # A federation smaller than the strategy's minimums would wait forever: cap them to the sites we have.
    for key in ("min-train-nodes", "min-evaluate-nodes", "min-available-nodes"):
        config[key] = min(int(config[key]), len(sites_found))
    from server.settings import ServerSettings

    ServerSettings.from_run_config(config).check_protection()  # refuse here, before any process starts
    if config["init-checkpoint"] and not config["resume"]:
        from server.initial import initial_state

        # a checkpoint of another network is refused here, not in the ServerApp after the workers started
        initial_state(runconfig.model_config(config), int(config["seed"]), str(config["init-checkpoint"]))
    if not config["dp-enabled"]:
        log.warning(
            "dp-enabled=false: the %d virtual sites' policies are set to allow training WITHOUT differential "
            "privacy (simulation only; a real site decides this in its own policy)", len(sites_found)
        )
        permit_virtual_sites(out, Path(data), allow_no_dp=True)
    if engine == "flwr":
        from .flwr_run import run_federation_flwr

        result = run_federation_flwr(config, len(sites_found), cpus_per_site=cpus_per_site, progress=progress)
    else:
        result = run_federation(config, len(sites_found), cpus_per_site=cpus_per_site, progress=progress,
                                client_app=client_app, ray_address=ray_address)
    if report:
        from .report import build_report

        result.report = build_report(out, data_dir=Path(data))
    return result
