"""The site daemon behind ``fedfusion site``: check the data, write the privacy policy, run Flower's SuperNode.

Order of work:

1. validate the site folder with :func:`common.data.inspect.inspect_data` (headers only, so a large archive is
   checked in seconds) and refuse to start (exit code 2) when no usable case exists;
2. merge the privacy-policy values given on the command line into ``<state>/privacy-policy.toml`` (values not given
   keep what the file has; the file is what a plain ``flower-supernode`` with the same node config reads too);
3. build the preprocessed cache of the site's cases for the run config this installation ships
   (:func:`client.prepare.warm_site_cache`), so that no message pays for reading and resampling the studies;
4. load torch, Opacus, MONAI and Flower once and serve the SuperNode's ClientApp launches by forking
   (:mod:`client.warm`; ``--no-warm-clientapps`` leaves Flower's one fresh interpreter per message);
5. start Flower's SuperNode through :mod:`client.supernode_guard` (this environment's Python, never code from a
   FAB: it refuses apps not in the policy's ``allowed-apps`` and a ``FLWR_HOME`` inside the state directory) with
   ``--node-config "data-dir=... state-dir=..."`` and the TLS / node-authentication flags, forward
   SIGINT/SIGTERM/SIGHUP to it and exit with its exit code.

Its SuperExec looks for new ClientApp tasks every :data:`TASK_POLL_INTERVAL` seconds (Flower's default: 1 s) unless
``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` is set.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger("fedfusion.site")

#: Exit code when the data directory has no usable case (or cannot be checked).
EXIT_NO_DATA = 2
#: Exit code for bad arguments (missing certificates, bad policy values).
EXIT_BAD_ARGS = 2
#: flower-supernode's default local runtime API port.
DEFAULT_RUNTIME_PORT = 9094
#: Seconds between the SuperExec's checks for a new ClientApp task (a message waits for the next check).
TASK_POLL_INTERVAL = "0.25"


class DaemonError(ValueError):
    """A reason not to start; ``exit_code`` is what ``fedfusion site`` exits with."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_ARGS) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class SiteOptions:
    """Everything ``fedfusion site`` was given (paths as given; resolved by :meth:`resolved`)."""

    data: Path
    superlink: str
    state: Path | None = None
    root_certificates: Path | None = None
    insecure: bool = False
    auth_private_key: Path | None = None
    auth_public_key: Path | None = None
    series_map: Path | None = None
    device: str = "auto"
    num_threads: int = 0
    site_index: int | None = None
    runtime_port: int = DEFAULT_RUNTIME_PORT
    isolation: str | None = None
    max_retries: int | None = None
    max_wait_time: float | None = None
    modalities: tuple[str, ...] = ()
    # privacy policy (None = keep the policy file's value / the default)
    max_epsilon: float | None = None
    max_delta: float | None = None
    min_noise_multiplier: float | None = None
    max_grad_norm: float | None = None
    allow_no_dp: bool | None = None
    secure_mode: bool | None = None
    allowed_apps: tuple[str, ...] | None = None
    # start-up work that later messages would otherwise pay (see the module docstring)
    warm_cache: bool = True
    warm_clientapps: bool = True

    @property
    def state_dir(self) -> Path:
        """``--state``, default ``<data>-state`` next to the data folder (never inside it: the data may be
        read-only)."""
        if self.state is not None:
            return Path(self.state).expanduser().resolve()
        data = Path(self.data).expanduser().resolve()
        return data.parent / f"{data.name}-state"

    def policy_values(self) -> dict[str, Any]:
        values = {
            "max-epsilon": self.max_epsilon,
            "max-delta": self.max_delta,
            "min-noise-multiplier": self.min_noise_multiplier,
            "max-grad-norm": self.max_grad_norm,
            "allow-no-dp": self.allow_no_dp,
            "secure-mode": self.secure_mode,
            "allowed-apps": self.allowed_apps,
        }
        return {k: v for k, v in values.items() if v is not None}


def validate_data(opts: SiteOptions) -> Any:
    """The inspect report of the site folder; :class:`DaemonError` (exit 2) when nothing is usable."""
    from common.data.inspect import inspect_data
    from models.modalities import MODALITIES

    data = Path(opts.data).expanduser()
    if not data.is_dir():
        raise DaemonError(f"--data {data} is not a folder; give the site folder (case folders + labels.csv)",
                          EXIT_NO_DATA)
    try:
        report = inspect_data(data, opts.modalities or MODALITIES, opts.series_map, read_pixels=False)
    except ValueError as exc:  # bad series map
        raise DaemonError(f"cannot check {data}: {exc}", EXIT_BAD_ARGS) from exc
    problems = report.all_problems()
    for problem in problems[:50]:
        log.warning("%s", problem)
    if len(problems) > 50:
        log.warning("... and %d more problems (run `fedfusion inspect %s` for all)", len(problems) - 50, data)
    if not report.ok:
        raise DaemonError(
            f"no usable case in {data} ({len(problems)} problems); the site will not start. Run "
            f"`fedfusion inspect {data}` to see why (labels.csv, segmentations, unmapped series: see --series-map).",
            EXIT_NO_DATA,
        )
    log.info("site data %s: %d usable cases", data, report.usable_cases)
    return report


def node_config(opts: SiteOptions) -> dict[str, Any]:
    """The SuperNode node config read by the ClientApp (same keys for a plain ``flower-supernode``)."""
    cfg: dict[str, Any] = {
        "data-dir": str(Path(opts.data).expanduser().resolve()),
        "state-dir": str(opts.state_dir),
    }
    if opts.series_map is not None:
        cfg["series-map"] = str(Path(opts.series_map).expanduser().resolve())
    if opts.device and opts.device != "auto":
        cfg["device"] = opts.device
    if opts.num_threads:
        cfg["num-threads"] = int(opts.num_threads)
    if opts.site_index is not None:
        cfg["site-index"] = int(opts.site_index)
    return cfg


def format_node_config(cfg: Mapping[str, Any]) -> str:
    """``{"data-dir": "/d", "num-threads": 2}`` → ``data-dir="/d" num-threads=2`` (Flower parses TOML values)."""
    parts = []
    for key, value in cfg.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            value = str(value)
            if '"' in value or "\\" in value:
                raise DaemonError(
                    f"node config {key}={value!r}: Flower's --node-config cannot carry quotes or backslashes; "
                    "use a path without them"
                )
            text = f'"{value}"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


def supernode_flags(
    *,
    executable: str,
    superlink: str,
    root_certificates: Path | str | None,
    private_key: Path | str | None,
    node_config: Mapping[str, Any],
    runtime_port: int = DEFAULT_RUNTIME_PORT,
    insecure: bool = False,
    isolation: str | None = None,
    max_retries: int | None = None,
    max_wait_time: float | None = None,
) -> list[str]:
    """The ``flower-supernode`` command line, flags only, no checks: the one builder behind :func:`supernode_argv`
    (``fedfusion site``) and :func:`fedfusion.deployment.supernode_command` (deployment files, loopback)."""
    argv = [executable, "--superlink", superlink]
    if insecure:
        argv.append("--insecure")
    if root_certificates is not None:
        argv += ["--root-certificates", str(root_certificates)]
    if private_key is not None:
        argv += ["--auth-supernode-private-key", str(private_key)]
    argv += ["--node-config", format_node_config(node_config), "--port", str(int(runtime_port))]
    if isolation:
        argv += ["--isolation", isolation]
    if max_retries is not None:
        argv += ["--max-retries", str(int(max_retries))]
    if max_wait_time is not None:
        argv += ["--max-wait-time", str(float(max_wait_time))]
    return argv


def supernode_argv(opts: SiteOptions, python: str | None = None) -> list[str]:
    """The command line that runs Flower's SuperNode for ``opts`` (TLS + node authentication unless
    ``--insecure``) through the guard: ``PYTHON -m client.supernode_guard --state STATE -- <flower-supernode
    flags>``.

    Raises:
        DaemonError: TLS/auth files missing or unreadable (exit 2).
    """
    if opts.insecure:
        log.warning("--insecure: the connection to the SuperLink is NOT encrypted; never use this outside a test")
        if opts.root_certificates is not None:
            raise DaemonError("--insecure and --root-certificates exclude each other")
    else:
        if opts.root_certificates is None:
            raise DaemonError(
                "--root-certificates CA.pem is required (TLS to the SuperLink); use --insecure only for local tests"
            )
        _readable(opts.root_certificates, "--root-certificates")
    if opts.auth_private_key is not None:
        _readable(opts.auth_private_key, "--auth-private-key")
    if opts.auth_public_key is not None:
        # Flower 1.41 derives the public key from the private one and deprecates the flag; accept it for old scripts.
        log.info("--auth-public-key is not needed by this Flower version (derived from the private key); ignored")

    def resolved(path: Path | None) -> str | None:
        return None if path is None else str(Path(path).expanduser().resolve())

    flags = supernode_flags(
        executable="flower-supernode", superlink=opts.superlink,
        root_certificates=resolved(opts.root_certificates), private_key=resolved(opts.auth_private_key),
        node_config=node_config(opts), runtime_port=opts.runtime_port, insecure=opts.insecure,
        isolation=opts.isolation, max_retries=opts.max_retries, max_wait_time=opts.max_wait_time,
    )
    return [python or sys.executable, "-m", "client.supernode_guard", "--state", str(opts.state_dir), "--", *flags[1:]]


def _readable(path: Path, flag: str) -> None:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DaemonError(f"{flag} {p}: no such file")
    try:
        with open(p, "rb"):
            pass
    except OSError as exc:
        raise DaemonError(f"{flag} {p}: cannot read it ({exc})") from exc


def prepare(opts: SiteOptions, python: str | None = None) -> list[str]:
    """Steps 1-2 and the command line of step 3 (no process started): validate data, write policy, build argv."""
    validate_data(opts)
    from client.privacy.policy import SitePolicy, write_policy_file
    from client.supernode_guard import GuardError, check_flwr_home

    state = opts.state_dir
    try:
        check_flwr_home(state)
    except GuardError as exc:
        raise DaemonError(str(exc)) from exc
    try:
        state.mkdir(parents=True, exist_ok=True)
        values = opts.policy_values()
        path = write_policy_file(state, values) if values else None
        policy = SitePolicy.resolve({}, state)
    except (OSError, ValueError) as exc:
        raise DaemonError(f"site state/policy in {state}: {exc}") from exc
    log.info("site policy%s: %s", f" ({path})" if path else "", policy.to_flat())
    if policy.allow_no_dp:
        log.warning("this site's policy ALLOWS training without differential privacy (allow-no-dp=true)")
    if policy.reproducible_noise:
        log.warning("this site's policy makes its DP noise REPRODUCIBLE from the run config (reproducible-noise=true):"
                    " experiments only, never for patient data")
    if not policy.allowed_apps:
        log.warning("this site pins no apps (allowed-apps is empty): it runs whatever app the coordinator submits; "
                    "pin the reviewed app with --allow-app $(fedfusion app-hash APP)")
    return supernode_argv(opts, python)


def warm_cache(opts: SiteOptions) -> None:
    """Step 3: the preprocessed cache of the default run config; a failure is logged, never fatal (a message
    then builds what it needs, or declines as it would have)."""
    from client.prepare import warm_site_cache

    t0 = time.perf_counter()
    try:
        n = warm_site_cache(Path(opts.data).expanduser().resolve(), opts.state_dir,
                            Path(opts.series_map).expanduser().resolve() if opts.series_map else None)
    except Exception as exc:  # noqa: BLE001 - a cache, not a requirement: the site still starts
        log.warning("could not preprocess the site's cases at start-up (%s: %s); messages will", type(exc).__name__,
                    exc)
        return
    log.info("preprocessed cache ready: %d cases in %.1f s", n, time.perf_counter() - t0)


def run(opts: SiteOptions, python: str | None = None) -> int:
    """Validate, write the policy, warm the caches, run the SuperNode until it exits (serving its ClientApp
    launches from warm processes); forward termination signals to it."""
    argv = prepare(opts, python)
    if opts.warm_cache:
        warm_cache(opts)
    env = dict(os.environ)
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", TASK_POLL_INTERVAL)
    parent = None
    if opts.warm_clientapps:
        from client.warm import WarmParent, preload

        log.info("warm ClientApps: libraries loaded in %.1f s", preload())
        parent = WarmParent.create()
        env = parent.env(env)
    log.info("starting %s", " ".join(argv))
    proc = subprocess.Popen(argv, env=env)

    def forward(signum: int, _frame: FrameType | None) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        if parent is not None:
            parent.serve(stop=lambda: proc.poll() is not None)
            log.info("warm ClientApps: %d launches served", parent.served)
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if parent is not None:
            parent.close()


def main_argv_summary(argv: Sequence[str]) -> str:
    """Printable command line (for logs and --dry-run)."""
    import shlex

    return " ".join(shlex.quote(a) for a in argv)
