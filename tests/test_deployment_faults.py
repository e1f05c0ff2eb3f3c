"""Faults on the real loopback deployment: an unregistered key, a site killed mid-round and restarted.

Slow, part of CI; skipped only when Flower's executables are missing. No process may be left behind.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

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

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(540),  # bounded inside each test; generous for a loaded shared 2-core CI machine
    pytest.mark.skipif(bool(missing_binaries()), reason=f"Flower executables missing: {missing_binaries()}"),
]


def test_unregistered_supernode_is_refused(tmp_path: Path) -> None:
    """A SuperNode with a valid TLS trust but an unknown key never gets a node id; registered ones are unaffected."""
    fed = LoopbackFederation(tmp_path / "w", tmp_path / "data", 1, use_site_daemon=False)
    with fed:
        rogue = fed.start_rogue("rogue")
        rc = rogue.wait(timeout=90)
        log = fed.procs.procs["rogue"].log_text()
        assert rc != 0, log
        assert "Failed to activate SuperNode" in log, log
        assert "SuperNode ID:" not in log, "the unregistered SuperNode must not get a node id"
        superlink_log = fed.procs.procs["superlink"].log_text()
        assert "No SuperNode found with the given public key" in superlink_log
        nodes = fed.nodes()
        assert set(nodes) == set(fed.node_ids.values()), f"an unknown node appeared: {nodes}"
        assert nodes[fed.node_ids["site-01"]] == "online"
        all_pids = set(fed.procs.all_pids)
    assert not processes.alive(all_pids), "processes left behind"


def _epsilon(state_dir: Path) -> float:
    """Epsilon spent so far according to the site's persistent privacy ledger (0 when none yet)."""
    from client.privacy.accountant import ACCOUNTANT_FILE

    path = state_dir / ACCOUNTANT_FILE
    if not path.is_file():
        return 0.0
    try:
        return float(json.loads(path.read_text()).get("epsilon", 0.0))
    except (json.JSONDecodeError, ValueError):  # written atomically, but be safe while polling
        return 0.0


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_phantoms(tmp_path_factory.mktemp("phantoms") / "data", sites=3, cases_per_site=4)


def test_killed_site_round_completes_then_it_rejoins_with_its_budget(tmp_path: Path, phantom_data: Path) -> None:
    """Kill site-02 early in round 2: round 2 gets the other sites' updates and moves on without the victim (its
    reply never comes: the SuperLink answers "node unavailable" after 2 missed heartbeats, or the round times out),
    and the run goes on. site-02, restarted from the same key and state dir, rejoins for round 3 and its privacy
    ledger continues from what it had spent.

    min-train-nodes = min-available-nodes = 3 makes every round sample all three sites (Flower's FedAvg sizes the
    sample from the nodes online when the round starts, before waiting for min-available-nodes), so round 3
    waits for the restarted site; round 2, with 2 < 3 updates, keeps the global model and moves on."""
    victim = "site-02"
    work = tmp_path / "w"
    with LoopbackFederation(work, phantom_data, 3) as fed:
        # no federated evaluation: on 2 cores the ClientApp process Flower starts per message is the slow part
        cfg = tiny_run_config(work, phantom_data, **{"num-server-rounds": 3, "round-timeout": 90,
                                                      "min-available-nodes": 3, "min-train-nodes": 3,
                                                      "fraction-evaluate": 0.0})
        run_dir = Path(cfg["run-dir"])
        run_id = fed.submit(cfg)

        # wait until round 1 is logged with the victim's update (its ledger then holds epsilon > 0)
        deadline = time.monotonic() + 200
        while 1 not in metrics_rounds(run_dir):
            if time.monotonic() > deadline:
                pytest.fail(f"round 1 never completed:\n{fed.run_log(run_id)[-3000:]}\n{fed.logs()}")
            if fed.run_status(run_id).startswith("finished"):
                pytest.fail(f"run ended early: {fed.run_status(run_id)}\n{fed.run_log(run_id)[-3000:]}")
            time.sleep(0.5)
        assert victim in train_scopes(run_dir, 1), f"{victim} did not train in round 1: {train_scopes(run_dir, 1)}"
        time.sleep(1.0)  # round 2's messages are out
        fed.kill_site(victim)  # a crash (SIGKILL of the daemon, its SuperNode and ClientApp), not a clean stop
        eps_before = _epsilon(fed.state_dir(victim))
        assert eps_before > 0

        fed.restart_site(victim)  # same key (same node id), same state dir; after the SuperLink saw it offline
        status = fed.wait_finished(run_id, timeout=240)
        assert status == "finished:completed", f"{status}\n{fed.run_log(run_id)[-3000:]}\n{fed.logs()}"
        assert {1, 2, 3} <= metrics_rounds(run_dir)
        round2, round3 = train_scopes(run_dir, 2), train_scopes(run_dir, 3)
        assert victim not in round2 and len(round2 & set(fed.site_names)) >= 2, f"round 2 aggregated {round2}"
        assert victim in round3, f"{victim} did not rejoin in round 3: {round3}"
        eps_after = _epsilon(fed.state_dir(victim))
        # the restarted site continued its privacy ledger (it did not start again from zero)
        assert eps_after > eps_before > 0, (eps_before, eps_after)
        all_pids = set(fed.procs.all_pids)
    assert not processes.alive(all_pids), "processes left behind"
