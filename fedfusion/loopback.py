"""A real deployment on one machine: a TLS SuperLink with SuperNode authentication and N site SuperNodes.

Everything listens on 127.0.0.1 only, on free ports picked at start. Used by ``deploy/scripts/loopback.py``
(a user can watch it) and by ``tests/test_deployment_*.py``. Nothing here is simulated: these are the same
``fedfusion superlink`` / ``fedfusion site`` (or ``flower-supernode``) processes a hospital deployment runs,
built by the argument builders in :mod:`fedfusion.deployment`.

Typical use::

    with LoopbackFederation(workdir, data_dir) as fed:      # certs, SuperLink, registration, SuperNodes
        run_id = fed.submit({"num-server-rounds": 2, "run-dir": str(workdir / "run")})
        fed.wait_finished(run_id, timeout=180)

Waiting is event-driven wherever Flower leaves a trace: a SuperNode is online once its log names its node id, a
run is finished once its ``flwr log --stream`` follower exits. Every ``flwr`` CLI call costs about a second of
CPU (it imports Flower), so the CLI is asked only where its answer is the point (registration, node lists, the
final run status) or as a slow fallback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from common import flwr_cli, processes
from common.layout import heldout_dir, simulated_state_dir
from fedfusion import deployment as dep
from fedfusion.commands.certs import DeploymentKeys, make_deployment_keys, make_node_keys, site_names

#: Terminal run states reported by ``flwr ls`` (``finished:completed``, ``finished:failed``, …).
FINISHED_PREFIX = flwr_cli.FINISHED_PREFIX
#: What ``flower-supernode`` logs once the SuperLink has activated it (the SuperLink then lists it online).
ONLINE_MARK = "SuperNode ID:"


def venv_bin() -> Path:
    """The folder holding this interpreter's console scripts (flower-superlink, flwr, fedfusion)."""
    return Path(sys.executable).parent


def missing_binaries() -> list[str]:
    """Console scripts the loopback deployment needs that are not installed next to this interpreter."""
    need = ["fedfusion", "flower-superlink", "flower-supernode", "flower-superexec", "flwr", "flwr-serverapp", "flwr-clientapp"]
    return [b for b in need if not (venv_bin() / b).exists() and shutil.which(b) is None]


class LoopbackFederation:
    """A SuperLink + ``n_sites`` SuperNodes on 127.0.0.1 with TLS and node authentication (context manager).

    Args:
        workdir: folder for certificates, logs, state (SuperLink database, per-site state dirs), FLWR_HOME.
        data_dir: a federation's data folder holding ``site-01``, ``site-02``… (what ``fedfusion phantoms`` writes).
        n_sites: number of SuperNodes to start (site-01 … site-NN).
        use_site_daemon: start sites with ``fedfusion site`` (True) or Flower's own ``flower-supernode`` (False).
        node_config_extra: more node config keys for every site (e.g. a site privacy policy).
        threads_per_site: torch threads per ClientApp process (OMP/MKL env), so sites do not oversubscribe CPUs.
        site_flags: more ``fedfusion site`` flags for every site daemon (e.g. ``--no-warm-clientapps``).
        env: more environment variables for every process (e.g. ``FEDFUSION_TIMINGS``, ``FLWR_LOG_LEVEL``).
    """

    def __init__(
        self,
        workdir: Path,
        data_dir: Path,
        n_sites: int = 3,
        *,
        use_site_daemon: bool = True,
        node_config_extra: Mapping[str, Any] | None = None,
        threads_per_site: int = 1,
        log: Callable[[str], None] | None = None,
        site_flags: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.data_dir = Path(data_dir).resolve()
        self.n_sites = n_sites
        self.site_names = site_names(n_sites)
        self.use_site_daemon = use_site_daemon
        self.node_config_extra = dict(node_config_extra or {})
        self.log = log or (lambda msg: print(f"[loopback] {msg}", flush=True))
        self.superlink_port, self.control_port, *self.runtime_ports = processes.free_ports(2 + n_sites)
        self.address = f"127.0.0.1:{self.superlink_port}"  # the sites' (Fleet API)
        self.control_address = f"127.0.0.1:{self.control_port}"  # flwr's (Control API)
        self.flwr_home = self.workdir / "flwr-home"
        self.env = {
            **os.environ,
            "PATH": f"{venv_bin()}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(self.flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "OMP_NUM_THREADS": str(threads_per_site),
            "MKL_NUM_THREADS": str(threads_per_site),
            "PYTHONUNBUFFERED": "1",
            "COLUMNS": "200",
            "NO_COLOR": "1",
            **dict(env or {}),
        }
        self.site_flags = list(site_flags)
        self.procs = processes.ProcessSet(self.workdir / "logs", env=self.env, cwd=self.workdir)
        self.keys: DeploymentKeys | None = None
        self.node_ids: dict[str, int] = {}
        self.app_dir = self.workdir / "app"
        #: Sites stopped on purpose (:meth:`kill_site`) until started again: their exit is not a failure.
        self.down: set[str] = set()

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LoopbackFederation:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        left = self.close()
        if left:
            raise RuntimeError(f"processes left behind after shutdown: {sorted(left)}")

    def start(self, *, sites: bool = True, wait: bool = True, timeout: float = 90.0) -> None:
        """Keys, FLWR_HOME, staged app, SuperLink, registration of every site key, and (``sites``) the SuperNodes;
        ``wait``: until every site is online (at most ``timeout`` seconds; else see :meth:`wait_online`)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.keys = make_deployment_keys(self.workdir / "certs", ["localhost", "127.0.0.1"], self.site_names, force=True)
        flwr_cli.write_flwr_home(self.flwr_home, self.control_address, self.keys.ca_cert)
        flwr_cli.stage_app(self.app_dir)
        self.start_superlink()
        for name in self.site_names:
            self.node_ids[name] = self.register(self.site_key(name)[1], name)
        if sites:
            for name in self.site_names:
                self.start_site(name)
            if wait:
                self.wait_online(self.site_names, timeout=timeout)

    def close(self) -> set[int]:
        """Stop every process and its descendants; returns pids still alive (empty when all went).

        Sites (and every other process) stop in parallel while the SuperLink still answers their goodbyes
        (a SuperNode deactivates itself on SIGTERM); the SuperLink goes last."""
        self.procs.stop_many([n for n in self.procs.procs if n != "superlink"])
        left = self.procs.stop_all()
        if left:
            self.log(f"processes still alive after shutdown: {sorted(left)}")
        return left

    # ------------------------------------------------------------------ superlink
    def start_superlink(self, timeout: float = 60.0) -> dict[int, str]:
        """Start the SuperLink and wait until its Control API answers; returns its node list (node id ->
        status), the answer that proved it ready."""
        assert self.keys is not None
        state = self.workdir / "superlink-state"
        state.mkdir(parents=True, exist_ok=True)
        cmd = dep.superlink_command(
            database=state / "state.db",
            tls=dep.ServerTLS.from_dir(self.keys.server_cert.parent),
            host="127.0.0.1",
            port=self.superlink_port,
            control_port=self.control_port,
            executable=(str(venv_bin() / "fedfusion"),),
        )
        self.procs.start("superlink", cmd)
        self.log(f"SuperLink starting: Fleet API on https://{self.address}, Control API on https://{self.control_address}"
                 " (TLS, SuperNode auth, SQLite state)")
        for port in (self.control_port, self.superlink_port):
            if not processes.wait_port("127.0.0.1", port, timeout):
                raise RuntimeError(f"SuperLink did not open port {port}:\n{self.procs.procs['superlink'].log_text()}")
        # The port opens before the app is ready to serve: wait until the Control API answers.
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.nodes(timeout=30)
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    # ------------------------------------------------------------------ flwr CLI
    def flwr(self, args: list[str], timeout: float = 60.0) -> dict:
        """``flwr <args> fedfusion --format json`` against this SuperLink; returns the parsed JSON."""
        return flwr_cli.flwr_json(
            [str(venv_bin() / "flwr"), *args, flwr_cli.CONNECTION_NAME, "--format", "json"], self.env, timeout=timeout,
            cwd=self.workdir,
        )

    def register(self, public_key: Path, name: str) -> int:
        data = self.flwr(["supernode", "register", str(public_key), "--name", name])
        node_id = int(data["node-id"])
        self.log(f"registered {name} as node {node_id}")
        return node_id

    def nodes(self, timeout: float = 60.0) -> dict[int, str]:
        """node id -> status (registered / online / offline / unregistered) as the SuperLink sees them."""
        data = self.flwr(["supernode", "ls"], timeout=timeout)
        return {int(n["node-id"]): n["status"] for n in data.get("nodes", [])}

    def wait_online(self, names: list[str], timeout: float) -> None:
        """Wait until every site in ``names`` (as last started) is online: its SuperNode logged the node id the
        SuperLink activated. RuntimeError when one exits first (e.g. refused), TimeoutError after ``timeout``."""

        def all_online() -> bool:
            for n in names:
                if ONLINE_MARK not in self.procs.procs[n].output():
                    if not self.procs.running(n):
                        log = self.procs.procs[n].output()[-4000:]
                        raise RuntimeError(f"SuperNode {n} exited while connecting:\n{log}")
                    return False
            return True

        self.wait_until(all_online, timeout, f"SuperNodes {', '.join(names)} online")
        self.log(f"online: {', '.join(names)}")

    def wait_offline(self, name: str, timeout: float, interval: float = 3.0) -> None:
        """Wait until the SuperLink lists site ``name`` offline (asks ``flwr supernode ls`` every ``interval`` s)."""
        node_id = self.node_ids[name]
        self.wait_until(lambda: self.nodes().get(node_id) != "online", timeout,
                        f"SuperLink lists {name} (node {node_id}) offline", interval=interval)

    # ------------------------------------------------------------------ waiting
    def check_processes(self) -> None:
        """Raise RuntimeError (with its log) when the SuperLink or a site that should be running has exited.
        Also remembers the processes Flower started below ours meanwhile (so :meth:`close` finds them all)."""
        self.procs.refresh()
        for name in ["superlink", *self.site_names]:
            if name in self.procs.procs and name not in self.down and not self.procs.running(name):
                raise RuntimeError(f"{name} exited (code {self.procs.procs[name].popen.poll()}):\n"
                                   f"{self.procs.procs[name].output()[-4000:]}")

    def wait_until(self, condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
        """:func:`common.processes.wait_until` that fails early when a process of the federation died
        (:meth:`check_processes`)."""
        return processes.wait_until(condition, timeout, what, interval=interval, check=self.check_processes)

    def wait_log(self, name: str, text: str, timeout: float, count: int = 1) -> None:
        """Wait until process ``name`` (as last started) has logged ``text`` at least ``count`` times."""
        self.wait_until(lambda: self.procs.procs[name].output().count(text) >= count, timeout,
                        f"{name} logged {text!r} {count} time(s)")

    # ------------------------------------------------------------------ sites
    def site_key(self, name: str) -> tuple[Path, Path]:
        d = self.workdir / "certs" / "supernodes" / name
        return d / "node.key", d / "node.pub"

    def state_dir(self, name: str) -> Path:
        d = simulated_state_dir(self.workdir, name)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def site_argv(self, name: str, private_key: Path | None = None) -> list[str]:
        """The command that starts site ``name`` (the daemon or Flower's SuperNode, as configured)."""
        assert self.keys is not None
        idx = self.site_names.index(name) if name in self.site_names else 0
        priv = private_key or self.site_key(name)[0]
        ca = self.workdir / "certs" / "supernodes" / name / "ca.pem"
        if not ca.exists():
            ca = self.keys.ca_cert
        data = self.data_dir / name
        port = self.runtime_ports[idx] if name in self.site_names else processes.free_ports(1)[0]
        if self.use_site_daemon:
            return dep.site_command(
                data=data, superlink=self.address, state=self.state_dir(name), root_certificates=ca,
                private_key=priv, runtime_port=port, executable=(str(venv_bin() / "fedfusion"),),
                extra=self.site_flags,
            )
        node_config = {"data-dir": str(data), "state-dir": str(self.state_dir(name)), **self.node_config_extra}
        return dep.supernode_command(
            superlink=self.address, root_certificates=ca, private_key=priv, node_config=node_config,
            runtime_port=port, executable=str(venv_bin() / "flower-supernode"),
        )

    def start_site(self, name: str) -> None:
        self.procs.start(name, self.site_argv(name))
        self.down.discard(name)
        self.log(f"started {name} ({'fedfusion site' if self.use_site_daemon else 'flower-supernode'})")

    def stop_sites(self) -> None:
        """Stop every site at once, cleanly (SIGTERM: each SuperNode deactivates itself at the SuperLink)."""
        self.down |= set(self.site_names)
        self.procs.stop_many([n for n in self.site_names if n in self.procs.procs])
        self.log("stopped every site")

    def kill_site(self, name: str) -> None:
        """SIGKILL a site's SuperNode and every ClientApp below it (a crash, not a clean stop)."""
        self.down.add(name)
        self.procs.kill(name)
        self.log(f"killed {name}")

    def restart_site(self, name: str, timeout: float = 150.0) -> None:
        """Start a crashed site again, as systemd's ``Restart=on-failure`` would, and wait until it is online.

        Flower 1.41 refuses to activate a node id the SuperLink still believes online (exit code 305, "could not
        be activated"), and only marks a silent node offline after 2 missed heartbeats (2 x 30 s, fixed in
        Flower). So wait for the SuperLink to see the crashed node offline, then start; retry on a refusal.
        """
        deadline = time.monotonic() + timeout
        self.wait_offline(name, timeout)
        while True:
            self.start_site(name)
            try:
                self.wait_online([name], timeout=max(5.0, deadline - time.monotonic()))
                return
            except RuntimeError:
                if self.procs.running(name) or time.monotonic() > deadline:
                    raise  # something else failed, or out of time
                # it exited while connecting (refused activation): try again, as systemd would
                self.down.add(name)
                time.sleep(3.0)

    def start_rogue(self, name: str = "rogue") -> subprocess.Popen[bytes]:
        """Start a SuperNode whose key was never registered (it must be refused); returns its process."""
        priv = make_node_keys(self.workdir / "certs" / "unregistered" / name, name).private_key
        cmd = dep.supernode_command(
            superlink=self.address, root_certificates=self.keys.ca_cert if self.keys else None, private_key=priv,
            node_config={"data-dir": str(self.data_dir / "site-01")}, runtime_port=processes.free_ports(1)[0],
            max_retries=2, executable=str(venv_bin() / "flower-supernode"),
        )
        return self.procs.start(name, cmd).popen

    # ------------------------------------------------------------------ runs
    def submit(self, run_config: Mapping[str, Any]) -> int:
        """``flwr run <staged app> fedfusion --run-config overrides.toml``; returns the run id.

        Also starts the run's follower, ``flwr log RUN fedfusion --stream`` (process ``run-RUN``, log
        ``logs/run-RUN.log``): it writes the ServerApp's log as it comes and exits when the run is finished.
        """
        overrides = flwr_cli.run_config_toml(run_config, self.workdir / "run-config.toml")
        data = flwr_cli.flwr_json(
            [str(venv_bin() / "flwr"), "run", str(self.app_dir), flwr_cli.CONNECTION_NAME, "--run-config", str(overrides),
             "--format", "json"],
            self.env, timeout=120, cwd=self.workdir,
        )
        run_id = int(data["run-id"])
        self.procs.start(self._follower(run_id),
                         flwr_cli.log_stream_argv(str(venv_bin() / "flwr"), flwr_cli.CONNECTION_NAME, run_id))
        self.log(f"submitted run {run_id}")
        return run_id

    @staticmethod
    def _follower(run_id: int) -> str:
        return f"run-{run_id}"

    def run_status(self, run_id: int) -> str:
        """The run's status as ``flwr ls --run-id`` reports it (``finished:completed``, …)."""
        return flwr_cli.run_status(str(venv_bin() / "flwr"), flwr_cli.CONNECTION_NAME, run_id, self.env,
                                   cwd=self.workdir)

    def wait_finished(self, run_id: int, timeout: float, poll: Callable[[], None] | None = None) -> str:
        """Wait until the run is finished (its follower exits); returns its ``flwr ls`` status (e.g.
        ``finished:completed``). RuntimeError when the SuperLink or a running site dies first."""
        follower = self._follower(run_id)
        try:
            return flwr_cli.wait_run_finished(
                lambda: self.run_status(run_id), lambda: self.procs.running(follower), timeout,
                check=self.check_processes, poll=poll,
            )
        except TimeoutError as exc:
            raise TimeoutError(f"run {run_id}: {exc}") from None

    def run_log(self, run_id: int) -> str:
        """The ServerApp's log: what the run's follower wrote, else ``flwr log RUN_ID fedfusion --show``."""
        follower = self.procs.procs.get(self._follower(run_id))
        if follower is not None:
            return follower.output()
        proc = subprocess.run(
            [str(venv_bin() / "flwr"), "log", str(run_id), flwr_cli.CONNECTION_NAME, "--show"],
            env=self.env, capture_output=True, text=True, timeout=60, cwd=self.workdir,
        )
        return proc.stdout + proc.stderr

    def build_report(self, run_dir: Path, timeout: float = 180.0) -> Path:
        """``fedfusion report RUN_DIR``: the coordinator's step that turns a run directory into report.md."""
        proc = subprocess.run(
            [str(venv_bin() / "fedfusion"), "report", str(run_dir)], env=self.env, capture_output=True, text=True,
            timeout=timeout, cwd=self.workdir,
        )
        report = Path(run_dir) / "report.md"
        if proc.returncode != 0 or not report.is_file():
            raise RuntimeError(f"fedfusion report {run_dir} failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return report

    def logs(self) -> str:
        """Every process log, for failure messages."""
        return "\n".join(f"----- {n}\n{m.log_text()[-6000:]}" for n, m in self.procs.procs.items())


# ---------------------------------------------------------------------------------------------------------------
# the tiny end-to-end run used by deploy/scripts/loopback.py and the tests
# ---------------------------------------------------------------------------------------------------------------

#: Run config of the loopback run: the smallest model that exercises everything (DP on, 2 rounds).
TINY_RUN_CONFIG: dict[str, Any] = {
    "num-server-rounds": 2,
    "model-channels": "4,8",
    "model-spatial-size": "8,16,16",
    # three modalities: the server evaluates every modality subset (7 here, 63 for all six) each round
    "model-modalities": "t1,t1ce,flair",
    "local-epochs": 1,
    # = cases per site: Poisson sampling rate 1, one DP step per epoch and never an empty batch
    "batch-size": 4,
    "dp-enabled": True,
    "min-train-nodes": 2,
    "min-evaluate-nodes": 2,
    "min-available-nodes": 2,
    "round-timeout": 120,
}


def make_phantoms(out: Path, sites: int = 3, cases_per_site: int = 4, seed: int = 0, heldout_cases: int = 4) -> Path:
    """Write a small phantom federation (``site-01``… + ``heldout``) with the project's phantom generator."""
    from simulations.phantom_writers import generate  # the phantom generator (issue: phantoms)

    generate(out, sites=sites, cases_per_site=cases_per_site, seed=seed, scenario="iid", shape=(8, 16, 16),
             fmt="nifti", heldout_cases=heldout_cases)
    return out


def metrics_rounds(run_dir: Path) -> set[int]:
    """Rounds that have at least one line in ``run_dir/metrics.jsonl`` (empty if none yet)."""
    from models.runlog import iter_metrics

    return {int(r["round"]) for r in iter_metrics(Path(run_dir) / "metrics.jsonl") if "round" in r}


def train_scopes(run_dir: Path, server_round: int) -> set[str]:
    """Site scopes with train metrics logged in ``server_round`` (the sites that replied). A site's scope is the
    name it was registered with (``flwr supernode register --name site-01``, as :meth:`LoopbackFederation.register`
    does), else ``node-<id>``; see :mod:`server.scopes`."""
    from models.runlog import is_site_scope, iter_metrics

    return {
        str(r.get("scope")) for r in iter_metrics(Path(run_dir) / "metrics.jsonl")
        if r.get("round") == server_round and r.get("phase") == "train" and is_site_scope(r.get("scope"))
    }


def tiny_run_config(workdir: Path, data_dir: Path, **overrides: Any) -> dict[str, Any]:
    """:data:`TINY_RUN_CONFIG` with the run directory and held-out set placed for this loopback deployment."""
    cfg = {**TINY_RUN_CONFIG, "run-dir": str(Path(workdir).resolve() / "run"),
           "data-dir": str(Path(data_dir).resolve()), "test-dir": str(heldout_dir(Path(data_dir).resolve()))}
    cfg.update(overrides)
    return cfg
