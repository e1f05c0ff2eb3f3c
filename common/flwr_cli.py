"""The Flower app as the ``flwr`` CLI sees it: staging a FAB source folder, connections, run-config files, JSON output.

Shared by the simulation runner (:mod:`simulations.flwr_run`) and the deployment tooling of the CLI
(:mod:`fedfusion.deployment`, :mod:`fedfusion.loopback`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

#: Name of the SuperLink connection written to ``$FLWR_HOME/config.toml`` (``flwr run . fedfusion``).
CONNECTION_NAME = "fedfusion"
#: Terminal run states reported by ``flwr ls`` start with this (``finished:completed|failed|stopped``).
FINISHED_PREFIX = "finished"
#: Seconds between fallback ``flwr ls`` status queries while the run's log stream is open / after it ended.
LS_INTERVAL = 30.0
LS_INTERVAL_NO_STREAM = 3.0
#: Packages that make up the Flower app (shipped inside the FAB).
APP_PACKAGES = ("models", "common", "client", "server", "fedfusion", "simulations")
#: The project directory (where pyproject.toml lives).
PROJECT_DIR = Path(__file__).resolve().parents[1]


def flwr_config_toml(
    address: str, root_certificates: Path | str | None, *, insecure: bool = False, name: str = CONNECTION_NAME
) -> str:
    """``$FLWR_HOME/config.toml`` text with one SuperLink connection ``name`` (made the default)."""
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    if insecure:
        lines.append("insecure = true")
    else:
        if root_certificates is None:
            raise ValueError("flwr_config_toml: root_certificates is required unless insecure=True")
        lines.append(f'root-certificates = "{Path(root_certificates).resolve()}"')
    return "\n".join(lines) + "\n"


def write_flwr_home(flwr_home: Path, address: str, root_certificates: Path | str | None, *, insecure: bool = False) -> Path:
    """Write ``flwr_home/config.toml`` for the ``fedfusion`` connection; returns its path."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(flwr_config_toml(address, root_certificates, insecure=insecure))
    return path


def stage_app(dest: Path, project_dir: Path = PROJECT_DIR) -> Path:
    """Copy the Flower app (pyproject.toml + the app's packages, sources only) to ``dest`` for ``flwr run``.

    Why not ``flwr run .`` in the checkout: Flower 1.41's ``flwr run`` treats a ``[tool.flwr.federations]`` table
    in pyproject.toml as legacy configuration, migrates it to ``$FLWR_HOME/config.toml`` **and rewrites
    pyproject.toml** (commenting the table out). It also packs every ``*.json/*.jsonl/*.md`` of the folder
    (run directories, data manifests) into the FAB. The staged copy has neither problem; the FAB holds exactly
    the app's code and its run config defaults.
    """
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    text = (project_dir / "pyproject.toml").read_text()
    (dest / "pyproject.toml").write_text(_strip_federations(text))
    data = tomllib.loads((dest / "pyproject.toml").read_text())  # fail here, not inside flwr, on a bad edit
    assert "federations" not in data.get("tool", {}).get("flwr", {})
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "tests", "test_*.py")
    for pkg in APP_PACKAGES:
        src = project_dir / pkg
        if src.is_dir():
            shutil.copytree(src, dest / pkg, ignore=ignore)
    if (project_dir / "README.md").is_file():
        shutil.copy2(project_dir / "README.md", dest / "README.md")
    return dest


def _strip_federations(pyproject_text: str) -> str:
    """Drop every ``[tool.flwr.federations*]`` table from pyproject text (keeps all other lines verbatim)."""
    out, skipping = [], False
    for line in pyproject_text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith("[") and not stripped.startswith("[["):
            skipping = stripped.strip("[]").strip().startswith("tool.flwr.federations")
        if not skipping:
            out.append(line)
    return "".join(out)


def run_config_toml(overrides: Mapping[str, Any], path: Path) -> Path:
    """Write run config overrides as a TOML file (``flwr run --run-config FILE.toml``): robust to spaces/quotes."""
    import tomli_w

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(dict(overrides)))
    return path


def flwr_json(argv: Sequence[str], env: Mapping[str, str], timeout: float = 60.0, cwd: Path | None = None) -> dict:
    """Run a ``flwr … --format json`` command and return its JSON (the last JSON object on stdout)."""
    proc = subprocess.run(list(argv), env=dict(env), capture_output=True, text=True, timeout=timeout, cwd=cwd)
    text = proc.stdout
    start = text.find("{")
    if start < 0:
        raise RuntimeError(f"{' '.join(argv)} printed no JSON (rc {proc.returncode}):\n{text}\n{proc.stderr}")
    try:
        data = json.loads(text[start:])
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"{' '.join(argv)}: unreadable JSON output:\n{text}\n{proc.stderr}") from exc
    if not data.get("success", False):
        raise RuntimeError(f"{' '.join(argv)} failed: {data}\n{proc.stderr}")
    return data


def run_status(flwr: str, connection: str, run_id: int, env: Mapping[str, str], cwd: Path | None = None,
               timeout: float = 60.0) -> str:
    """The status of run ``run_id`` as ``flwr ls --run-id`` reports it (``finished:completed``, …; "" if unknown)."""
    data = flwr_json([flwr, "ls", connection, "--run-id", str(run_id), "--format", "json"], env, timeout=timeout,
                     cwd=cwd)
    runs = data.get("runs", [])
    return str(runs[0].get("status", "")) if runs else ""


def log_stream_argv(flwr: str, connection: str, run_id: int) -> list[str]:
    """``flwr log RUN CONNECTION --stream``: prints the ServerApp's log as it comes and exits when the run is
    finished (the SuperLink ends the stream then), so one such process replaces polling ``flwr ls``."""
    return [flwr, "log", str(run_id), connection, "--stream"]


def wait_run_finished(
    status: Callable[[], str],
    stream_open: Callable[[], bool],
    timeout: float,
    *,
    check: Callable[[], None] | None = None,
    poll: Callable[[], None] | None = None,
    interval: float = 0.5,
) -> str:
    """Wait until a run is finished; returns its ``flwr ls`` status (e.g. ``finished:completed``).

    Each ``flwr`` CLI call costs about a second of CPU (it imports Flower), which a 2-core machine takes from the
    run itself. So the event is the end of the run's log stream (:func:`log_stream_argv`; ``stream_open`` says
    whether it still runs): ``status`` (one ``flwr ls``) is asked when it has ended, and otherwise only every
    :data:`LS_INTERVAL` seconds as a fallback (every :data:`LS_INTERVAL_NO_STREAM` once the stream ended before
    the run, e.g. on a dropped connection). ``check`` runs every ``interval`` seconds and raises to stop early
    (a process the run needs has died); ``poll`` is called as often (progress displays, process bookkeeping).

    Raises:
        TimeoutError: the run is not finished after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    next_ls = time.monotonic() + LS_INTERVAL
    current = ""
    while True:
        stream_ended = not stream_open()
        if stream_ended or time.monotonic() >= next_ls:
            current = status()
            if current.startswith(FINISHED_PREFIX):
                return current
            next_ls = time.monotonic() + (LS_INTERVAL_NO_STREAM if stream_ended else LS_INTERVAL)
        if check is not None:
            check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"run not finished after {timeout:.0f}s (status {current!r})")
        if poll is not None:
            poll()
        time.sleep(interval)
