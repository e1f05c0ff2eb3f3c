"""Deployment building blocks shared by the Docker/systemd files, ``deploy/scripts/loopback.py`` and the tests.

One place builds the command lines of the real processes so that what the tests run is what the containers and
units run (``tests/test_deploy_files.py`` compares them):

* :func:`superlink_command` — ``fedfusion superlink`` (Flower's SuperLink, the Fleet API on the public address and
  the Control API on an administrators-only one) with TLS, SuperNode authentication and a SQLite database;
* :func:`supernode_command` — Flower's own ``flower-supernode`` for one site;
* :func:`site_command` — ``fedfusion site`` (the site daemon: validates the data, then runs the SuperNode);

Connections, app staging and ``flwr`` JSON calls are in :mod:`common.flwr_cli`; starting and stopping process trees
in :mod:`common.processes` (both shared with the simulation runner).

Flower 1.41 facts this relies on (read from its source): ``flower-superlink`` serves the Fleet, Control and Runtime
APIs over one HTTPS port (``--host/--port``), which is why :mod:`fedfusion.superlink` adds a Fleet-only listener and
keeps the rest on loopback; SuperNode authentication needs TLS and ``--enable-supernode-auth``,
and each SuperNode's OpenSSH EC public key must be registered with ``flwr supernode register`` before it can
connect; a SuperNode also serves a local Runtime API (``--port``, default 9094) that must differ between
SuperNodes on one machine.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from client.daemon import DEFAULT_RUNTIME_PORT, supernode_flags

#: Port the sites connect to in fedfusion's deployment files (Fleet API only, HTTPS).
DEFAULT_SUPERLINK_PORT = 9092
#: Port of the Control (+ Runtime) API listener, bound to loopback: administrators only (SSH tunnel).
DEFAULT_CONTROL_PORT = 9093
DEFAULT_CONTROL_ADDRESS = f"127.0.0.1:{DEFAULT_CONTROL_PORT}"
#: The user the image runs as (deploy/Dockerfile): key files must belong to it inside the containers.
IMAGE_UID = 10001
#: Local Runtime API port of a SuperNode (only reachable on the site machine itself).
DEFAULT_SUPERNODE_RUNTIME_PORT = DEFAULT_RUNTIME_PORT

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
    control_host: str = "127.0.0.1",
    control_port: int = DEFAULT_CONTROL_PORT,
    insecure: bool = False,
    log_file: Path | str | None = None,
    executable: Sequence[str] = ("fedfusion",),
) -> list[str]:
    """The ``fedfusion superlink`` command line: the Fleet API on ``host:port`` for the sites, the Control API
    (submitting runs, registering keys) and the Runtime API on ``control_host:control_port`` only.

    Secure by default: TLS with ``tls`` and SuperNode authentication on. ``insecure=True`` turns both off
    (Flower refuses node authentication without TLS) and prints :data:`INSECURE_WARNING`.
    Runtime installation of app dependencies (``uv sync`` into a fresh environment) is disabled: the image / venv
    already holds fedfusion and its pinned torch, and hospital networks are often offline.
    ``database`` is Flower's SQLite state file: keep it on a persistent volume so restarts keep run history.
    """
    cmd = [*executable, "superlink", "--fleet-address", f"{host}:{port}",
           "--control-address", f"{control_host}:{control_port}", "--"]
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
    cmd += ["--database", str(database), "--disable-runtime-dependency-installation"]
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


def install_keys(src: Path | str, dst: Path | str, *, uid: int = IMAGE_UID, gid: int = IMAGE_UID,
                 chown: Callable[[str, int, int], None] = os.chown) -> list[Path]:
    """Copy the key files of ``src`` (one level, regular files) into ``dst`` owned by ``uid:gid``.

    Why: ``fedfusion certs`` writes private keys as 0600 files of the user who ran it, while the containers run as
    :data:`IMAGE_UID`, which could not read them through a bind mount. The compose file's one-shot ``keys`` service
    (root, no network) runs this into a named volume per service. Private keys (``*.key``) stay 0600, certificates
    and public keys become 0644, ``dst`` 0700: readable by the image's user only.

    Returns:
        the files written.

    Raises:
        FileNotFoundError: ``src`` is not a folder or holds no file.
    """
    source, target = Path(src), Path(dst)
    files = sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{source}: no key files to install (make them with `fedfusion certs`)")
    target.mkdir(parents=True, exist_ok=True)
    os.chmod(target, 0o700)
    chown(str(target), uid, gid)
    written = []
    for f in files:
        out = target / f.name
        shutil.copyfile(f, out)
        os.chmod(out, stat.S_IRUSR | stat.S_IWUSR if f.suffix == ".key" else 0o644)
        chown(str(out), uid, gid)
        written.append(out)
    return written
