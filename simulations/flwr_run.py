"""Run a local simulation through ``flwr run`` (the Flower CLI path), offline, leaving no process behind.

``flwr run . local`` in Flower 1.41 starts a *detached* managed SuperLink (``:local:`` connection) that keeps
running after the run ends. This module instead owns everything it starts:

1. stages the app (:func:`common.flwr_cli.stage_app`: pyproject.toml + the app's packages only);
2. starts its own ``flower-superlink --simulation --insecure`` on a free 127.0.0.1 port, in its own session,
   with its SQLite database in ``workdir`` and runtime dependency installation off (nothing calls ``uv``);
3. writes a private ``FLWR_HOME/config.toml`` with one connection to it (``flwr`` never touches ``~/.flwr``);
4. submits with ``flwr run <staged> <connection> --run-config <toml> --federation-config "num-supernodes=N …"``,
   streams the run's log into ``workdir/logs/flwr-log.log`` (``flwr log --stream``, which ends with the run) and
   then asks ``flwr ls --format json`` for the run's status (:func:`common.flwr_cli.wait_run_finished`);
5. always stops the SuperLink with every process below it (SuperExec, ``flwr-simulation``, Ray) in ``finally``,
   also on Ctrl-C (:class:`common.processes.ProcessSet` follows the sessions Flower detaches into).

Simulation options: Flower 1.41 still reads ``options.num-supernodes`` from a connection in config.toml but warns
that it is deprecated in favour of ``flwr run --federation-config`` (keys of ``SimulationConfig`` with ``-``:
``num-supernodes``, ``client-resources-num-cpus``, ``client-resources-num-gpus``, ``init-args-num-cpus``, …),
so the simulation options travel on the command line; the config.toml written here holds only the connection.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from common import flwr_cli, processes
from common import runconfig
from common.runconfig import ConfigValue

from .observer import RunObserver, backend_config

log = logging.getLogger("fedfusion.flwr_run")

#: Name of the SuperLink connection in the private FLWR_HOME.
CONNECTION = "fedfusion-sim"


class FlwrRunError(RuntimeError):
    """The ``flwr run`` path failed (SuperLink did not start, run failed or timed out); the message says where
    the logs are."""


def _bin(name: str) -> str:
    """A console script of this environment (``flwr``, ``flower-superlink``), falling back to PATH."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def offline_env(flwr_home: Path, cpus_per_site: float | None = None) -> dict[str, str]:
    """Environment for the SuperLink and the ``flwr`` CLI: private FLWR_HOME, no telemetry, no update check, no
    runtime dependency installation, and this environment's scripts first on PATH (Flower starts
    ``flower-superexec``/``flwr-simulation`` by name)."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        # Ray workers inherit this: each virtual site uses only the cores it was given.
        OMP_NUM_THREADS=str(max(1, int(cpus_per_site or 1))),
        # waiting OpenMP threads sleep rather than spin on cores the other sites need (simulations/ray_cluster.py)
        OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        RAY_DEDUP_LOGS="0",
        RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",
        # Keep rich/typer output of the CLI plain in log files.
        NO_COLOR="1",
        TERM="dumb",
        COLUMNS="200",
    )
    return env


def federation_config(num_sites: int, cpus_per_site: float | None = None) -> str:
    """``--federation-config`` value: one virtual SuperNode per site, resources as the in-process engine uses
    (:func:`simulations.observer.backend_config`)."""
    backend = backend_config(num_sites, cpus_per_site)
    res, init = backend["client_resources"], backend["init_args"]
    parts = {
        "num-supernodes": int(num_sites),
        # uint32 in Flower's SimulationConfig: whole cores only
        "client-resources-num-cpus": max(1, round(float(res["num_cpus"]))),
        "client-resources-num-gpus": float(res["num_gpus"]),
        "init-args-num-cpus": int(init["num_cpus"]),
        "init-args-num-gpus": int(init["num_gpus"]),
        "init-args-logging-level": "ERROR",
    }
    return " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in parts.items())


def run_with_flwr(
    run_config_overrides: Mapping[str, Any],
    data_dir: Path,
    num_sites: int,
    workdir: Path,
    *,
    cpus_per_site: float | None = None,
    timeout: float = 3600.0,
    poll: Callable[[], None] | None = None,
) -> Path:
    """Run the app over ``num_sites`` virtual SuperNodes through ``flwr run``; returns the run directory.

    Args:
        run_config_overrides: run config keys (pyproject ``[tool.flwr.app.config]``) to override; checked and typed
            here so a bad key fails before anything starts. ``run-dir`` defaults to ``workdir/run``.
        data_dir: folder of ``site-*`` folders (+ ``heldout/``); simulation partition ``i`` is the ``i``-th site.
        num_sites: number of virtual SuperNodes (normally the number of site folders).
        workdir: private folder for the staged app, FLWR_HOME, SuperLink database and logs (created).
        cpus_per_site: CPU cores per virtual site (default 1).
        timeout: seconds to wait for the run to finish before stopping everything.
        poll: called about once a second while the run is going (e.g. to refresh a progress display).

    Raises:
        FlwrRunError: when the SuperLink does not start, ``flwr run`` fails, or the run does not finish
            ``finished:completed`` (the message names the log files).
        RunConfigError: for an unknown run config key or a bad value.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    overrides: dict[str, Any] = dict(run_config_overrides)
    overrides["data-dir"] = str(Path(data_dir).resolve())
    overrides.setdefault("run-dir", str(workdir / "run"))
    # Type-check against the app's defaults now (same rules as `flwr run --run-config`), keep only overrides.
    fused = runconfig.load(overrides)
    to_send: dict[str, ConfigValue] = {k: fused[k] for k in overrides}
    run_dir = Path(str(fused["run-dir"])).resolve()
    to_send["run-dir"] = str(run_dir)

    app_dir = flwr_cli.stage_app(workdir / "app")
    flwr_home = workdir / "flwr-home"
    port = processes.free_ports(1)[0]
    flwr_cli.write_flwr_home(flwr_home, f"127.0.0.1:{port}", None, insecure=True)
    # write_flwr_home names the connection fedfusion; the simulation gets its own name so logs are unambiguous.
    cfg_path = flwr_home / "config.toml"
    cfg_path.write_text(cfg_path.read_text().replace(f'"{flwr_cli.CONNECTION_NAME}"', f'"{CONNECTION}"')
                        .replace(f"[superlink.{flwr_cli.CONNECTION_NAME}]", f"[superlink.{CONNECTION}]"))
    run_config_file = flwr_cli.run_config_toml(to_send, workdir / "run-config.toml")
    env = offline_env(flwr_home, cpus_per_site)
    logs = workdir / "logs"
    procs = processes.ProcessSet(logs, env=env, cwd=workdir)
    restore = _terminate_as_interrupt()
    try:
        superlink = [
            _bin("flower-superlink"), "--insecure", "--simulation",
            "--host", "127.0.0.1", "--port", str(port),
            "--database", str(workdir / "superlink-state.db"),
            "--disable-runtime-dependency-installation",
        ]
        procs.start("superlink", superlink)
        processes.wait_port("127.0.0.1", port, 60.0)  # cheap; then one CLI round trip proves the Control API serves
        _wait_ready(procs, env, workdir, timeout=60.0)

        submitted = flwr_cli.flwr_json(
            [_bin("flwr"), "run", str(app_dir), CONNECTION, "--run-config", str(run_config_file),
             "--federation-config", federation_config(num_sites, cpus_per_site), "--format", "json"],
            env, timeout=120, cwd=workdir,
        )
        run_id = int(submitted["run-id"])
        log.info("flwr run: run %s submitted to 127.0.0.1:%s", run_id, port)
        # The ServerApp's log (what `flwr run --stream` prints) goes to a file instead of the terminal.
        procs.start("flwr-log", flwr_cli.log_stream_argv(_bin("flwr"), CONNECTION, run_id))
        status = _wait_finished(procs, env, workdir, run_id, timeout, poll)
        _copy_log(procs, run_dir / "flower.log")
        if status != f"{flwr_cli.FINISHED_PREFIX}:completed":
            raise FlwrRunError(
                f"flwr run {run_id} ended {status!r}; see {logs}/flwr-log.log (ServerApp log) and "
                f"{logs}/superlink.log"
            )
    finally:
        left = procs.stop_all(timeout=10.0)
        restore()
        if left:  # pragma: no cover - stop_all SIGKILLs; only an unkillable (D-state) process stays
            log.warning("processes still alive after stopping the local SuperLink: %s", sorted(left))
    return run_dir


def _terminate_as_interrupt() -> Callable[[], None]:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt while the SuperLink runs, so ``finally`` stops it when this
    process is terminated (a CI timeout, a closed terminal) and not only on Ctrl-C. Returns the undo function.
    Only the main thread can set handlers; elsewhere this is a no-op (SIGKILL can never be caught)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    saved = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}

    def undo() -> None:
        for sig, handler in saved.items():
            signal.signal(sig, handler)

    return undo


def _wait_ready(procs: processes.ProcessSet, env: Mapping[str, str], workdir: Path, timeout: float) -> None:
    """Wait until the SuperLink's Control API answers ``flwr ls`` (the port opens before it serves)."""
    deadline = time.monotonic() + timeout
    while True:
        if not procs.running("superlink"):
            raise FlwrRunError(f"flower-superlink exited at start:\n{procs.procs['superlink'].log_text()[-4000:]}")
        try:
            flwr_cli.flwr_json([_bin("flwr"), "ls", CONNECTION, "--format", "json"], env, timeout=30, cwd=workdir)
            return
        except (RuntimeError, subprocess.TimeoutExpired):
            if time.monotonic() > deadline:
                raise FlwrRunError(
                    f"flower-superlink did not answer within {timeout:.0f}s:\n"
                    f"{procs.procs['superlink'].log_text()[-4000:]}"
                ) from None
            time.sleep(0.5)


def _wait_finished(
    procs: processes.ProcessSet, env: Mapping[str, str], workdir: Path, run_id: int, timeout: float,
    poll: Callable[[], None] | None,
) -> str:
    """Wait until the run is finished (the ``flwr-log`` stream ends with it); returns its ``flwr ls`` status."""

    def superlink_alive() -> None:
        if not procs.running("superlink"):
            raise FlwrRunError(f"flower-superlink exited during run {run_id}:\n{procs.procs['superlink'].log_text()[-4000:]}")

    def bookkeeping() -> None:
        procs.refresh()  # remember Ray workers while their parents live (see ProcessSet)
        if poll is not None:
            poll()

    try:
        return flwr_cli.wait_run_finished(
            lambda: flwr_cli.run_status(_bin("flwr"), CONNECTION, run_id, env, cwd=workdir),
            lambda: procs.running("flwr-log"), timeout, check=superlink_alive, poll=bookkeeping, interval=1.0,
        )
    except TimeoutError as exc:
        raise FlwrRunError(f"run {run_id}: {exc}") from None


def _copy_log(procs: processes.ProcessSet, dest: Path) -> None:
    """Give the log stream a moment to drain, then keep the ServerApp log next to the run's metrics."""
    m = procs.procs.get("flwr-log")
    if m is None:
        return
    try:
        m.popen.wait(timeout=5)  # `flwr log` ends by itself once the finished run's log is read
    except subprocess.TimeoutExpired:
        pass
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(m.log_text())


def run_federation_flwr(
    run_config: Mapping[str, ConfigValue],
    num_sites: int,
    *,
    cpus_per_site: float | None = None,
    progress: bool = True,
    timeout: float = 24 * 3600.0,
) -> Any:
    """:func:`simulations.simulate.run_federation` through ``flwr run`` (``fedfusion simulate --engine flwr``).

    Same inputs and the same :class:`~simulations.observer.SimulationResult` (wall time, peak memory of this
    process tree, which includes the SuperLink, ``flwr-simulation`` and its Ray workers, final global metrics).
    The scratch folder (staged app, FLWR_HOME, SuperLink database, logs) is removed after a successful run and
    kept, named in the error, after a failed one.
    """
    import shutil
    import tempfile

    Path(str(run_config["run-dir"])).resolve().mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="fedfusion-flwr-"))
    try:
        with RunObserver(run_config, num_sites, progress) as observer:
            run_with_flwr(
                run_config, Path(str(run_config["data-dir"])), num_sites, workdir,
                cpus_per_site=cpus_per_site, timeout=timeout,
            )
    except FlwrRunError as exc:
        raise FlwrRunError(f"{exc}\n(scratch folder kept: {workdir})") from exc
    shutil.rmtree(workdir, ignore_errors=True)
    return observer.result()
