"""Deployment building blocks shared by the Docker/systemd files, ``deploy/scripts/loopback.py`` and the tests.

One place builds the command lines of the real processes so that what the tests run is what the containers and
units run (``tests/test_deploy_files.py`` compares them):

* :func:`superlink_command` — ``flower-superlink`` with TLS, SuperNode authentication and a SQLite database;
* :func:`supernode_command` — Flower's own ``flower-supernode`` for one site;
* :func:`site_command` — ``fedfusion site`` (the site daemon: validates the data, then runs the SuperNode);
* :func:`flwr_config_toml` — the SuperLink connection that ``flwr run/ls/log/supernode`` read from
  ``$FLWR_HOME/config.toml`` (Flower >= 1.40 keeps connections there, not in pyproject.toml);
* :func:`stage_app` — a copy of the Flower app to submit with ``flwr run`` (see its docstring for why);
* :class:`ProcessSet` — starts processes in their own sessions and stops them with every descendant.

Flower 1.41 facts this relies on (read from its source): the SuperLink serves the Fleet, Control and Runtime
APIs over one HTTPS port (``--host/--port``); SuperNode authentication needs TLS and ``--enable-supernode-auth``,
and each SuperNode's OpenSSH EC public key must be registered with ``flwr supernode register`` before it can
connect; a SuperNode also serves a local Runtime API (``--port``, default 9094) that must differ between
SuperNodes on one machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from client.daemon import DEFAULT_RUNTIME_PORT, format_node_config, supernode_flags  # noqa: F401 (re-exported)

#: Name of the SuperLink connection written to ``$FLWR_HOME/config.toml`` (``flwr run . fedfusion``).
CONNECTION_NAME = "fedfusion"
#: Port the SuperLink listens on in fedfusion's deployment files (Fleet + Control + Runtime, HTTPS).
DEFAULT_SUPERLINK_PORT = 9092
#: Local Runtime API port of a SuperNode (only reachable on the site machine itself).
DEFAULT_SUPERNODE_RUNTIME_PORT = DEFAULT_RUNTIME_PORT
#: Packages that make up the Flower app (shipped inside the FAB).
APP_PACKAGES = ("models", "client", "server", "fedfusion", "simulations")
#: The project directory (where pyproject.toml lives).
PROJECT_DIR = Path(__file__).resolve().parents[1]

INSECURE_WARNING = (
    "WARNING: insecure mode: TLS and SuperNode authentication are OFF. Model updates travel unencrypted and any "
    "machine that reaches the port can join. Use only on an isolated test network."
)


def warn_insecure(stream: IO[str] | None = None) -> None:
    """Print the insecure-mode warning on stderr (and raise a Python warning for callers that log them)."""
    print(INSECURE_WARNING, file=stream or sys.stderr, flush=True)
    warnings.warn(INSECURE_WARNING, stacklevel=2)


@dataclass(frozen=True)
class ServerTLS:
    """The SuperLink's TLS files (PEM), as written by ``fedfusion certs`` under ``OUT/superlink/``."""

    certfile: Path
    keyfile: Path
    ca_certfile: Path

    @classmethod
    def from_dir(cls, directory: Path | str) -> ServerTLS:
        d = Path(directory)
        return cls(d / "server.pem", d / "server.key", d / "ca.pem")

    def check(self) -> None:
        for what, path in (("certificate", self.certfile), ("private key", self.keyfile), ("CA", self.ca_certfile)):
            if not Path(path).is_file():
                raise FileNotFoundError(
                    f"SuperLink TLS {what} {path} not found: make the deployment keys with "
                    "`fedfusion certs --out DIR --hosts <server names/IPs>` and pass DIR/superlink"
                )


def superlink_command(
    *,
    database: Path | str,
    tls: ServerTLS | None,
    host: str = "0.0.0.0",
    port: int = DEFAULT_SUPERLINK_PORT,
    insecure: bool = False,
    log_file: Path | str | None = None,
    executable: str = "flower-superlink",
) -> list[str]:
    """The ``flower-superlink`` command line.

    Secure by default: TLS with ``tls`` and SuperNode authentication on. ``insecure=True`` turns both off
    (Flower refuses node authentication without TLS) and prints :data:`INSECURE_WARNING`.
    Runtime installation of app dependencies (``uv sync`` into a fresh environment) is disabled: the image / venv
    already holds fedfusion and its pinned torch, and hospital networks are often offline.
    ``database`` is Flower's SQLite state file: keep it on a persistent volume so restarts keep run history.
    """
    cmd = [executable]
    if insecure:
        warn_insecure()
        cmd.append("--insecure")
    else:
        if tls is None:
            raise ValueError("superlink_command: TLS files are required unless insecure=True")
        cmd += [
            "--ssl-certfile", str(tls.certfile),
            "--ssl-keyfile", str(tls.keyfile),
            "--ssl-ca-certfile", str(tls.ca_certfile),
            "--enable-supernode-auth",
        ]
    cmd += [
        "--database", str(database),
        "--host", host,
        "--port", str(port),
        "--disable-runtime-dependency-installation",
    ]
    if log_file is not None:
        cmd += ["--log-file", str(log_file)]
    return cmd


def supernode_command(
    *,
    superlink: str,
    root_certificates: Path | str | None,
    private_key: Path | str | None,
    node_config: Mapping[str, Any],
    runtime_port: int = DEFAULT_SUPERNODE_RUNTIME_PORT,
    insecure: bool = False,
    max_retries: int | None = None,
    max_wait_time: float | None = None,
    executable: str = "flower-supernode",
) -> list[str]:
    """The ``flower-supernode`` command line of one site (TLS + node authentication unless ``insecure``)."""
    if insecure:
        warn_insecure()
        root_certificates = private_key = None
    elif root_certificates is None or private_key is None:
        raise ValueError("supernode_command: root_certificates and private_key are required unless insecure=True")
    return supernode_flags(
        executable=executable, superlink=superlink, root_certificates=root_certificates, private_key=private_key,
        node_config=node_config, runtime_port=runtime_port, insecure=insecure, max_retries=max_retries,
        max_wait_time=max_wait_time,
    )


def site_command(
    *,
    data: Path | str,
    superlink: str,
    state: Path | str,
    root_certificates: Path | str | None,
    private_key: Path | str | None,
    public_key: Path | str | None = None,
    runtime_port: int = DEFAULT_SUPERNODE_RUNTIME_PORT,
    insecure: bool = False,
    extra: Sequence[str] = (),
    executable: Sequence[str] = ("fedfusion",),
) -> list[str]:
    """The ``fedfusion site`` command line (the site daemon; it execs ``flower-supernode`` after validation).

    Flags follow ``fedfusion site --help``; the runtime port flag is only passed when the daemon supports it
    (see :func:`site_supports`).
    """
    cmd = [*executable, "site", "--data", str(data), "--superlink", superlink, "--state", str(state)]
    if insecure:
        warn_insecure()
        cmd.append("--insecure")
    else:
        if root_certificates is None or private_key is None:
            raise ValueError("site_command: root_certificates and private_key are required unless insecure=True")
        cmd += ["--root-certificates", str(root_certificates), "--auth-private-key", str(private_key)]
        if public_key is not None:
            cmd += ["--auth-public-key", str(public_key)]
    if runtime_port != DEFAULT_SUPERNODE_RUNTIME_PORT:
        cmd += ["--runtime-port", str(runtime_port)]
    cmd += list(extra)
    return cmd


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


# ----------------------------------------------------------------------------------------------------------
# processes
# ----------------------------------------------------------------------------------------------------------


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports that were free on ``host`` a moment ago (bind to port 0, read, release)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def wait_port(host: str, port: int, timeout: float) -> bool:
    """True once something accepts TCP connections on ``host:port`` (polls until ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def _proc_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, fields of /proc/<pid>/stat after the command name: state, ppid, pgrp, session, ...) per process."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
        except OSError:
            continue
        # the command name is in parentheses and may contain spaces: split after the last ')'
        yield int(entry), stat[stat.rfind(")") + 2 :].split()


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) for every process, from /proc (Linux)."""
    return {pid: (int(rest[1]), rest[0]) for pid, rest in _proc_stats()}


def descendants(pid: int) -> set[int]:
    """Every live (non-zombie) process below ``pid`` (children, grandchildren, …)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for p, (ppid, _state) in table.items():
        children.setdefault(ppid, []).append(p)
    out, stack = set(), [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in out:
                out.add(c)
                stack.append(c)
    return {p for p in out if table.get(p, (0, "Z"))[1] != "Z"}


def session_members(sids: Iterable[int]) -> set[int]:
    """Every live (non-zombie) process whose session id is in ``sids``.

    A process keeps its session when its parent dies: Ray actors orphaned by a finished ``flwr-simulation``
    (re-parented to init) are still found through the session their detached SuperExec leads.
    """
    want = set(sids)
    out: set[int] = set()
    for pid, rest in _proc_stats():
        if rest[0] not in ("Z", "X") and int(rest[3]) in want:
            out.add(pid)
    return out


def alive(pids: Iterable[int]) -> set[int]:
    """The subset of ``pids`` still running (zombies count as gone)."""
    table = _proc_table()
    return {p for p in pids if p in table and table[p][1] not in ("Z", "X")}


@dataclass
class Managed:
    """One started process: its Popen, log file and every pid ever seen below it."""

    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path
    seen: set[int] = field(default_factory=set)

    def refresh(self) -> None:
        if self.popen.poll() is None:
            self.seen |= descendants(self.popen.pid)
        # Members of sessions led by our processes (Flower detaches its SuperExec with start_new_session; its
        # orphaned children keep that session). Our own session is never one of them: ours started new ones.
        self.seen |= session_members(({self.popen.pid} | self.seen) - {os.getsid(0)}) - {os.getpid()}

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class ProcessSet:
    """Start named processes in their own sessions; stop them together with all their descendants.

    Flower detaches its SuperExec helpers into new sessions (``start_new_session=True``), so killing a process
    group is not enough: the set remembers every descendant pid it has seen (:meth:`refresh`, called by
    :meth:`stop` and periodically by the loopback driver) and signals those too.
    """

    def __init__(self, log_dir: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = dict(env or os.environ)
        self.cwd = cwd
        self.procs: dict[str, Managed] = {}
        self.all_pids: set[int] = set()

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Managed:
        if name in self.procs and self.procs[name].popen.poll() is None:
            raise RuntimeError(f"process {name!r} is already running (pid {self.procs[name].popen.pid})")
        log_path = self.log_dir / f"{name}.log"
        fh = open(log_path, "ab")  # noqa: SIM115 - owned by the child; closed below after the fork
        fh.write(f"\n===== start {name}: {' '.join(argv)}\n".encode())
        fh.flush()
        popen = subprocess.Popen(
            list(argv), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**self.env, **(env or {})}, cwd=self.cwd, start_new_session=True,
        )
        fh.close()
        managed = Managed(name=name, argv=list(argv), popen=popen, log_path=log_path)
        self.procs[name] = managed
        self.all_pids.add(popen.pid)
        return managed

    def refresh(self) -> None:
        for m in self.procs.values():
            m.refresh()
            self.all_pids |= m.seen

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop ``name`` and everything below it: ``sig`` first, SIGKILL after ``timeout`` seconds."""
        m = self.procs[name]
        m.refresh()
        pids = {m.popen.pid} | m.seen
        self.all_pids |= pids
        _signal_all(pids, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (alive(pids) or m.popen.poll() is None):
            if m.popen.poll() is None:
                try:
                    m.popen.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.2)
        m.refresh()  # orphans that appeared while the tree went down (same sessions)
        pids |= m.seen
        self.all_pids |= pids
        if alive(pids):
            _signal_all(alive(pids), signal.SIGKILL)
        try:
            m.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def kill(self, name: str) -> None:
        """SIGKILL ``name`` and its descendants at once (a crash, as in the fault tests)."""
        self.stop(name, sig=signal.SIGKILL, timeout=5.0)

    def stop_all(self, timeout: float = 10.0) -> set[int]:
        """Stop every process (reverse start order); returns the pids still alive afterwards (should be empty)."""
        self.refresh()
        for name in reversed(list(self.procs)):
            self.stop(name, timeout=timeout)
        left = alive(self.all_pids)
        if left:
            _signal_all(left, signal.SIGKILL)
            time.sleep(0.5)
            left = alive(self.all_pids)
        return left

    def running(self, name: str) -> bool:
        return name in self.procs and self.procs[name].popen.poll() is None


def _signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            pgid = os.getpgid(pid)
        except ProcessLookupError:
            continue
        try:
            # Our children lead their own sessions (start_new_session): signal the whole group then.
            if pgid == pid:
                os.killpg(pgid, sig)
            else:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


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
