"""Real processes on loopback: a TLS SuperLink with SuperNode authentication, three ``fedfusion site`` daemons and
one real run, with a site killed mid-round and restarted and an unregistered key refused.

Starting Flower's processes is what costs here (Flower starts a new ClientApp process per message, and each one
imports torch, Opacus and MONAI: about 7.5 s of CPU), so ONE federation and ONE run serve every test: the module
fixture :func:`deployment` drives the scenario below once and records what it saw; each test asserts one
property of it. Waiting is event-driven (process logs, the run directory, the run's ``flwr log --stream``
follower), not ``flwr`` CLI polling (about 1 s of CPU per call).

1. SuperLink (TLS, node authentication, SQLite state) on 127.0.0.1, three keys registered, three sites started
   and the run submitted (its ServerApp starts while the sites do); once they are online, TLS handshakes.
2. The run: 3 rounds. min-train-nodes = min-available-nodes = 3 makes every round sample all three sites
   (Flower's FedAvg sizes the sample from the nodes online when the round starts, before waiting for
   min-available-nodes), so round 3 waits for a restarted site.
3. site-02 gets its round-2 train message -> SIGKILL of its daemon, SuperNode and ClientApp (a crash). Its reply
   never comes: the SuperLink answers "node unavailable" after 2 missed heartbeats (37-60 s after the kill:
   Flower's heartbeat interval is fixed; the longest wait of the scenario, CPU idle), and round 2 moves on with the other two sites' updates (2 < 3: the global model is kept).
4. Meanwhile a SuperNode with valid TLS trust but an unregistered key tries to join: refused, no node id.
5. Once round 2 is aggregated the SuperLink lists site-02 offline; it is restarted from the same key and state
   folder, rejoins for round 3 and its privacy ledger continues from what it had spent.
6. The run finishes; the coordinator's ``fedfusion report``; the sites stop; the SuperLink is killed and started
   again: registrations and the run history are still in its SQLite state (one final ``flwr ls``).
7. Everything is stopped; no process is left alive.

Timeouts: the figures next to them were measured on the 2-core machine under load; every timeout is 3x or more
of that. Skipped only when Flower's executables are not installed.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from common import processes
from fedfusion.loopback import (
    LoopbackFederation,
    make_phantoms,
    metrics_rounds,
    missing_binaries,
    tiny_run_config,
    train_scopes,
)

#: The site that crashes in round 2.
VICTIM = "site-02"
#: Cases per site = DP batch size: Poisson sampling rate 1, one DP step per epoch and never an empty batch.
CASES = 2

#: The run: tiny model (fedfusion.loopback.TINY_RUN_CONFIG) with DP on; what the scenario does not need is off.
RUN: dict[str, Any] = {
    "num-server-rounds": 3,
    # Early fusion, one level: 17 parameter tensors instead of the attention family's 88. Flower moves every
    # tensor as its own object (one HTTPS request and SQLite write each, at every hop of every message), which
    # made the SuperLink the second largest CPU user. The three modalities stay (server evaluation per subset).
    "model-family": "input",
    "model-channels": "4",
    "batch-size": CASES,
    "min-available-nodes": 3,
    "min-train-nodes": 3,
    # No federated evaluation: it would start one more ClientApp process per site and round (~6 s of CPU each).
    "fraction-evaluate": 0.0,
    # Held-out evaluation by the server once, after the last round (the report needs it), without HD95.
    "eval-every": 0,
    "eval-hd95": "none",
    # Longer than the SuperLink takes to declare the killed site unavailable (<= 2 x 30 s heartbeats + 3 s
    # polling), so round 2 ends by "node unavailable", not by timeout; and 5x a healthy round (38-66 s under
    # load 9-12, waiting for nodes included), so no reply is cut off on a slow machine.
    "round-timeout": 300,
}

# Budgets. Measured on the 2-core development machine while other engineers' jobs kept its load average at 9-12
# (each figure is the range of 4 runs; an idle machine is 2-3x faster); each timeout is 3x or more of the worst.
ONLINE_TIMEOUT = 180  # SuperLink start to 3 sites online, run submitted: 27-58 s
KILL_TIMEOUT = 240  # sites online to site-02 receiving its round-2 message (ServerApp start, round 1): 55-74 s
ROGUE_TIMEOUT = 90  # an unregistered SuperNode gives up: 13-24 s
ROUND2_TIMEOUT = 180  # kill to round 2 aggregated: <= 2 x 30 s of Flower heartbeats + 3 s polling (wall clock, not CPU)
RESTART_TIMEOUT = 120  # round 2 aggregated to site-02 online again: 12-27 s
FINISH_TIMEOUT = 240  # site-02 online to the run finished (round 3, server evaluation): 47-71 s
REPORT_TIMEOUT = 120  # fedfusion report (runs while the SuperLink restarts): 11-34 s

pytestmark = [
    pytest.mark.slow,
    # The first test that asks for the fixture pays for the whole scenario: its inner timeouts plus shutdown.
    pytest.mark.timeout(
        ONLINE_TIMEOUT + KILL_TIMEOUT + ROGUE_TIMEOUT + ROUND2_TIMEOUT + RESTART_TIMEOUT + FINISH_TIMEOUT
        + REPORT_TIMEOUT + 120
    ),
    pytest.mark.skipif(bool(missing_binaries()), reason=f"Flower executables missing: {missing_binaries()}"),
]


@dataclass
class Observed:
    """What the scenario saw, for the tests to assert on (the federation is stopped by then)."""

    fed: LoopbackFederation
    nodes_at_start: dict[int, str] = field(default_factory=dict)
    cert: dict = field(default_factory=dict)
    untrusted_refused: bool = False
    plain_http_answer: bytes = b""
    run_id: int = 0
    run_dir: Path = Path()
    status: str = ""
    run_log: str = ""
    round1_before_kill: set[str] = field(default_factory=set)
    eps_before: float = 0.0
    eps_after: float = 0.0
    rogue_rc: int | None = None
    rogue_log: str = ""
    superlink_log: str = ""
    nodes_after_rogue: dict[int, str] = field(default_factory=dict)
    report: Path | None = None
    db_header: bytes = b""
    nodes_after_restart: dict[int, str] = field(default_factory=dict)
    runs_after_restart: list[dict] = field(default_factory=list)
    left_behind: set[int] = field(default_factory=set)

    def logs(self) -> str:
        """Every process log and the ServerApp's log, for failure messages."""
        return f"{self.fed.logs()}\n----- ServerApp (run {self.run_id})\n{self.run_log[-6000:]}"


def _handshake(port: int, context: ssl.SSLContext, server_hostname: str = "localhost") -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_hostname) as tls:
            return tls.getpeercert()


def _epsilon(state_dir: Path) -> float:
    """Epsilon spent so far according to the site's persistent privacy ledger (0 when none yet)."""
    from client.privacy.accountant import ACCOUNTANT_FILE

    path = state_dir / ACCOUNTANT_FILE
    if not path.is_file():
        return 0.0
    return float(json.loads(path.read_text()).get("epsilon", 0.0))  # written atomically


def _tls_checks(fed: LoopbackFederation, seen: Observed) -> None:
    assert fed.keys is not None
    seen.cert = _handshake(fed.superlink_port, ssl.create_default_context(cafile=str(fed.keys.ca_cert)))
    try:  # a client that does not trust our CA must refuse the SuperLink
        _handshake(fed.superlink_port, ssl.create_default_context())
    except ssl.SSLCertVerificationError:
        seen.untrusted_refused = True
    with socket.create_connection(("127.0.0.1", fed.superlink_port), timeout=10) as raw:
        raw.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        raw.settimeout(5)
        try:
            seen.plain_http_answer = raw.recv(100)
        except (TimeoutError, ConnectionResetError):
            seen.plain_http_answer = b""


def _scenario(fed: LoopbackFederation, seen: Observed, data: Path) -> None:
    clock = time.monotonic()

    def phase(what: str) -> None:
        nonlocal clock
        fed.log(f"{what}: {time.monotonic() - clock:.1f}s")
        clock = time.monotonic()

    fed.start(wait=False)
    cfg = tiny_run_config(fed.workdir, data, **RUN)
    seen.run_dir = Path(cfg["run-dir"])
    # Submitted while the sites start: the ServerApp starts meanwhile and waits for min-available-nodes.
    seen.run_id = fed.submit(cfg)
    fed.wait_online(fed.site_names, ONLINE_TIMEOUT)
    seen.nodes_at_start = fed.nodes()
    _tls_checks(fed, seen)
    phase("SuperLink, 3 sites online, run submitted")

    # The victim has its round-2 instruction (so round 1 is aggregated, its ledger holds epsilon > 0): crash it.
    fed.wait_log(VICTIM, "Receiving: train message", KILL_TIMEOUT, count=2)
    seen.round1_before_kill = train_scopes(seen.run_dir, 1)
    fed.kill_site(VICTIM)
    seen.eps_before = _epsilon(fed.state_dir(VICTIM))
    phase("online to the kill in round 2")

    # While the SuperLink waits for the victim's missed heartbeats, an unregistered key tries to join.
    rogue = fed.start_rogue("rogue")
    seen.rogue_rc = rogue.wait(timeout=ROGUE_TIMEOUT)
    seen.rogue_log = fed.procs.procs["rogue"].output()
    seen.superlink_log = fed.procs.procs["superlink"].output()
    seen.nodes_after_rogue = fed.nodes()
    phase("rogue refused")

    fed.wait_until(lambda: train_scopes(seen.run_dir, 2), ROUND2_TIMEOUT, "round 2 aggregated")
    phase("round 2 aggregated without the victim")
    fed.restart_site(VICTIM, timeout=RESTART_TIMEOUT)  # same key (node id) and state dir, once listed offline
    phase("victim online again")
    seen.status = fed.wait_finished(seen.run_id, FINISH_TIMEOUT)
    seen.run_log = fed.run_log(seen.run_id)
    seen.eps_after = _epsilon(fed.state_dir(VICTIM))
    phase("run finished")

    with ThreadPoolExecutor(1) as pool:
        # the report: written by the ServerApp if it does, else by the coordinator's `fedfusion report RUN_DIR`
        # (a process of its own: it runs while the SuperLink restarts below)
        report = seen.run_dir / "report.md"
        building = None
        if seen.status.endswith(":completed") and not report.is_file():
            building = pool.submit(fed.build_report, seen.run_dir, REPORT_TIMEOUT)
        # Flower's SQLite state on disk: crash the SuperLink (SIGKILL: nothing flushed on the way out) and start
        # it again; the registrations and the run history are still there. Its sites stop cleanly first, so none
        # is reconnecting meanwhile.
        fed.stop_sites()
        seen.db_header = (fed.workdir / "superlink-state" / "state.db").read_bytes()[:16]
        fed.procs.kill("superlink")
        seen.nodes_after_restart = fed.start_superlink()
        seen.runs_after_restart = fed.flwr(["ls"])["runs"]
        phase("sites stopped, SuperLink crashed and restarted")
        seen.report = building.result() if building is not None else report if report.is_file() else None
        phase("report ready")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Observed:
    data = make_phantoms(tmp_path_factory.mktemp("phantoms") / "data", sites=3, cases_per_site=CASES, heldout_cases=2)
    fed = LoopbackFederation(tmp_path_factory.mktemp("loopback") / "w", data, 3)
    seen = Observed(fed)
    try:
        _scenario(fed, seen, data)
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired, AssertionError) as exc:
        seen.run_log = seen.run_log or (fed.run_log(seen.run_id) if seen.run_id else "")
        pytest.fail(f"the loopback scenario failed: {exc}\n{seen.logs()}")
    finally:
        clock = time.monotonic()
        fed.procs.refresh()
        all_pids = set(fed.procs.all_pids)
        fed.close()
        seen.left_behind = processes.alive(all_pids)
        fed.log(f"stopped: {time.monotonic() - clock:.1f}s")
    return seen


def test_tls_superlink_and_authenticated_supernodes(deployment: Observed) -> None:
    """TLS with our CA (SANs localhost / 127.0.0.1), refused by a client without it; three registered sites
    online."""
    fed = deployment.fed
    assert sorted(deployment.nodes_at_start) == sorted(fed.node_ids.values())
    assert set(deployment.nodes_at_start.values()) == {"online"}
    assert ("DNS", "localhost") in deployment.cert["subjectAltName"]
    assert ("IP Address", "127.0.0.1") in deployment.cert["subjectAltName"]
    assert deployment.untrusted_refused, "a client that does not trust our CA accepted the SuperLink's certificate"
    # plain HTTP gets no HTTP answer from the TLS port
    assert not deployment.plain_http_answer.startswith(b"HTTP/1.1 200")


def test_unregistered_supernode_is_refused(deployment: Observed) -> None:
    """A SuperNode with a valid TLS trust but an unknown key never gets a node id; registered ones are unaffected."""
    fed, log = deployment.fed, deployment.rogue_log
    assert deployment.rogue_rc != 0, log
    assert "Failed to activate SuperNode" in log, log
    assert "SuperNode ID:" not in log, "the unregistered SuperNode must not get a node id"
    assert "No SuperNode found with the given public key" in deployment.superlink_log
    nodes = deployment.nodes_after_rogue
    assert set(nodes) == set(fed.node_ids.values()), f"an unknown node appeared: {nodes}"
    assert nodes[fed.node_ids["site-01"]] == "online"


def test_run_completes_with_report(deployment: Observed) -> None:
    """``fedfusion site`` x3 + ``flwr run``: every round logged, the healthy rounds with all three sites, a report,
    and every site spent privacy budget in its own state directory."""
    fed, run_dir = deployment.fed, deployment.run_dir
    assert deployment.status == "finished:completed", f"{deployment.status}\n{deployment.logs()}"
    assert {1, 2, 3} <= metrics_rounds(run_dir), deployment.run_log[-3000:]
    for rnd in (1, 3):
        assert set(fed.site_names) <= train_scopes(run_dir, rnd), f"round {rnd}: {train_scopes(run_dir, rnd)}"
    assert deployment.report is not None and deployment.report.stat().st_size > 0
    for name in fed.site_names:
        assert any(fed.state_dir(name).iterdir()), f"{name} wrote no state"


def test_killed_site_round_completes_then_it_rejoins_with_its_budget(deployment: Observed) -> None:
    """Round 2 aggregates the other sites' updates without the killed site and the run goes on; the site,
    restarted from the same key and state dir, rejoins in round 3 and its privacy ledger continues."""
    fed, run_dir = deployment.fed, deployment.run_dir
    before = deployment.round1_before_kill
    assert VICTIM in before, f"{VICTIM} did not train in round 1: {before}"
    assert deployment.status == "finished:completed", f"{deployment.status}\n{deployment.logs()}"
    round2, round3 = train_scopes(run_dir, 2), train_scopes(run_dir, 3)
    assert VICTIM not in round2 and len(round2 & set(fed.site_names)) >= 2, f"round 2 aggregated {round2}"
    assert VICTIM in round3, f"{VICTIM} did not rejoin in round 3: {round3}"
    # the restarted site continued its privacy ledger (it did not start again from zero)
    assert deployment.eps_after > deployment.eps_before > 0, (deployment.eps_before, deployment.eps_after)


def test_superlink_state_survives_restart(deployment: Observed) -> None:
    """Flower's SQLite state on disk: after the SuperLink was killed and started again, the registrations and the
    run history are there (the run as ``flwr ls`` lists it)."""
    assert deployment.db_header == b"SQLite format 3\x00"
    assert sorted(deployment.nodes_after_restart) == sorted(deployment.fed.node_ids.values())
    listed = {int(r["run-id"]): r for r in deployment.runs_after_restart}
    assert deployment.run_id in listed, f"run {deployment.run_id} not in flwr ls: {sorted(listed)}"
    assert str(listed[deployment.run_id].get("status", "")).startswith("finished"), listed[deployment.run_id]


def test_no_process_left_behind(deployment: Observed) -> None:
    assert not deployment.left_behind, f"processes left behind: {sorted(deployment.left_behind)}"
