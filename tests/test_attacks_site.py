"""Attacks on a site's promises, played for real: each test is what a curious server (or a run submitter) would try.

* predict the DP noise from what the server knows (the run config's seed, the round, a config value) and subtract
  it from the update;
* race two runs on one SuperNode so that both pass the privacy budget check and one charge is lost;
* ship a modified app (the app brings the privacy code that is supposed to protect the site);
* ask for a workload that exhausts the site's machine.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from client.client_app import train
from client.runtime import clear_cache
from common import replies
from tests.client_helpers import context, initial_state, make_phantoms, message, run_config


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    root = make_phantoms(tmp_path_factory.mktemp("phantoms"), sites=1, cases=3, scenario="iid", fmt="nifti")
    # a second site holding exactly the first one's cases: any difference between their updates is noise
    shutil.copytree(root / "site-01", root / "site-02")
    return root


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    clear_cache()  # every call below is a fresh site process, as a deployed SuperNode runs each message


def _node(phantoms: Path, state: Path, site: str = "site-01", **extra: object) -> dict[str, object]:
    return {"data-dir": str(phantoms / site), "state-dir": str(state), **extra}


def _update(node: dict[str, object], rc: dict[str, Any], server_round: int = 1,
            config: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train one round on a fresh process-like cache; returns the site's update (new - sent) and its metrics."""
    clear_cache()
    sent = initial_state()
    msg = message("train", sent, server_round)
    if config:
        for key, value in config.items():
            msg.content.config_records["config"][key] = value
    reply = train(msg, context(node, rc))
    assert not reply.has_error(), reply.error
    new = reply.content["arrays"].to_torch_state_dict()
    return {k: new[k] - sent[k] for k in sent}, dict(reply.content["metrics"])


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ DP noise
def test_the_server_cannot_predict_the_noise_from_the_run_config(phantoms: Path, tmp_path: Path) -> None:
    """Attack: the server re-runs the site's round with the run config it sent, learns the noise, subtracts it.

    Before: noise and Poisson sampling were seeded from the run config's ``seed`` (and the round and site name),
    so two runs with the same run config produced bit-identical updates. Now the site draws from the OS CSPRNG."""
    rc = run_config()
    first, m1 = _update(_node(phantoms, tmp_path / "a"), rc)
    again, _ = _update(_node(phantoms, tmp_path / "b"), rc)
    assert not _same(first, again), "same run config, same update: the noise is predictable from the run config"
    # two sites with the very same cases in one run draw different noise too
    other, _ = _update(_node(phantoms, tmp_path / "c", site="site-02"), rc)
    assert not _same(first, other)
    assert m1["dp-reproducible-noise"] == 0.0


def test_only_the_sites_entropy_source_feeds_the_noise(phantoms: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack: the server varies what it controls (run seed, round, config record values) to steer the noise.

    With the OS entropy source replaced by a fixed byte stream, every server-side value changes nothing: the
    update is bit-identical, so the noise, the sampling and the dropout depend on the site's entropy alone."""
    from client.privacy import randomness

    def fake_entropy(label: str) -> Callable[[int], bytes]:
        counter = itertools.count()
        return lambda n: hashlib.shake_256(f"{label}/{next(counter)}".encode()).digest(n)

    updates = []
    for seed, server_round, extra in ((0, 1, {}), (12345, 7, {"seed": 99, "noise-seed": 4})):
        monkeypatch.setattr(randomness, "system_entropy", fake_entropy("site"))
        # a constant learning rate: the run's schedule is a public function of the round, not randomness
        rc = run_config(seed=seed, **{"lr-schedule": "constant", "lr-warmup": 0.0})
        update, _ = _update(_node(phantoms, tmp_path / f"s{seed}"), rc, server_round, extra)
        updates.append(update)
    assert _same(*updates), "a server-side value reached the site's random draws"
    # and the entropy source is really used: another byte stream, another update
    monkeypatch.setattr(randomness, "system_entropy", fake_entropy("another site"))
    different, _ = _update(_node(phantoms, tmp_path / "other"), run_config(**{"lr-schedule": "constant",
                                                                              "lr-warmup": 0.0}))
    assert not _same(updates[0], different)


def test_reproducible_noise_only_when_the_site_asks_and_then_it_says_so(phantoms: Path, tmp_path: Path) -> None:
    rc = run_config()
    node = _node(phantoms, tmp_path / "a", **{"reproducible-noise": True})
    first, m1 = _update(node, rc)
    again, m2 = _update(_node(phantoms, tmp_path / "b", **{"reproducible-noise": True}), rc)
    assert _same(first, again)
    assert m1["dp-reproducible-noise"] == m2["dp-reproducible-noise"] == 1.0
    # still a different stream per site and per round
    other_site, _ = _update(_node(phantoms, tmp_path / "c", site="site-02", **{"reproducible-noise": True}), rc)
    next_round, _ = _update(_node(phantoms, tmp_path / "d", **{"reproducible-noise": True}), rc, server_round=2)
    assert not _same(first, other_site) and not _same(first, next_round)


# ------------------------------------------------------------------------------------------------ privacy ledger
def _one_round_budget(sigma: float = 1.0, delta: float = 1e-5) -> tuple[float, float]:
    """Epsilon after one and after two rounds of the race's run config (batch >= cases: q = 1, one step a round)."""
    from client.privacy.accountant import epsilon_of

    return epsilon_of([(sigma, 1.0, 1)], delta), epsilon_of([(sigma, 1.0, 2)], delta)


#: The race's run config: batch size above the site's 3 cases, so a round is exactly one DP step at rate 1.
RACE_RC = {"batch-size": 8, "local-epochs": 1, "dp-noise-multiplier": 1.0}


def _race_one_round(phantoms: str, state: str, ceiling: float, me: int, passed: list[Any], declined: list[Any],
                    out: Any) -> None:
    """A site process training one round while another process does too (multiprocessing target).

    Its "training" first waits until the other process has either got past its budget check (and is training too)
    or been declined: the interleaving that makes both pass a check done without a lock."""
    import time

    import models.training as training

    torch.set_num_threads(1)
    real_epoch, other = training.train_epoch, 1 - me

    def train_epoch(*args: Any, **kwargs: Any) -> Any:
        passed[me].set()
        deadline = time.monotonic() + 180
        while not (passed[other].is_set() or declined[other].is_set()):
            if time.monotonic() > deadline:
                raise TimeoutError("the other site process never got past its budget check")
            time.sleep(0.02)
        return real_epoch(*args, **kwargs)

    training.train_epoch = train_epoch
    node = {"data-dir": str(Path(phantoms) / "site-01"), "state-dir": state, "max-epsilon": ceiling}
    reply = train(message("train", initial_state()), context(node, run_config(**RACE_RC)))
    if reply.has_error():
        declined[me].set()
        out.put((me, "declined", reply.error.code))
    else:
        out.put((me, "trained", dict(reply.content["metrics"])["epsilon-total"]))


def test_two_concurrent_runs_cannot_both_pass_the_ceiling_or_lose_a_charge(phantoms: Path, tmp_path: Path) -> None:
    """Attack: two runs on one SuperNode train at once against a ceiling that fits one round.

    Before: each process loaded the ledger, checked, trained and saved with no lock: both passed, and the second
    save overwrote the first (one round's epsilon was never recorded). Now the check and a durable reservation are
    one step under an exclusive lock: exactly one trains, and the ledger holds every charge that happened."""
    from client.privacy.accountant import PersistentAccountant

    one, two = _one_round_budget()
    ceiling = (one + two) / 2
    ctx = multiprocessing.get_context("spawn")
    passed, declined, out = [ctx.Event(), ctx.Event()], [ctx.Event(), ctx.Event()], ctx.Queue()
    procs = [ctx.Process(target=_race_one_round, args=(str(phantoms), str(tmp_path / "state"), ceiling, i, passed,
                                                        declined, out)) for i in (0, 1)]
    for p in procs:
        p.start()
    results = sorted((out.get(timeout=600) for _ in procs), key=lambda r: r[1])
    for p in procs:
        p.join(timeout=60)
    assert [r[1] for r in results] == ["declined", "trained"], results
    assert results[0][2] == replies.DECLINED_BUDGET
    ledger = PersistentAccountant.load(tmp_path / "state")
    trained = sum(r[1] == "trained" for r in results)
    assert ledger.rounds == trained and ledger.reserved == {}, "a charge was lost or left pending"
    assert ledger.epsilon(1e-5) == pytest.approx(one) and ledger.epsilon(1e-5) <= ceiling


def _crash_mid_round(phantoms: str, state: str) -> None:
    """A site process killed while training (multiprocessing target): no commit, no release."""
    import os

    import models.training as training

    torch.set_num_threads(1)
    training.train_epoch = lambda *a, **k: os._exit(9)
    train(message("train", initial_state()), context({"data-dir": str(Path(phantoms) / "site-01"),
                                                      "state-dir": state}, run_config(**RACE_RC)))


def test_a_round_that_crashed_mid_training_counts_as_spent(phantoms: Path, tmp_path: Path) -> None:
    """A process killed mid-round may have been about to send its update: the site cannot tell, so the round's
    reservation stays on the ledger and counts (before, nothing was recorded and the budget silently came back)."""
    from client.privacy.accountant import PersistentAccountant

    one, two = _one_round_budget()
    proc = multiprocessing.get_context("spawn").Process(target=_crash_mid_round,
                                                         args=(str(phantoms), str(tmp_path / "state")))
    proc.start()
    proc.join(timeout=600)
    assert proc.exitcode == 9
    ledger = PersistentAccountant.load(tmp_path / "state")
    assert ledger.epsilon(1e-5) == pytest.approx(one) and len(ledger.reserved) == 1
    node = _node(phantoms, tmp_path / "state", **{"max-epsilon": (one + two) / 2})
    reply = train(message("train", initial_state()), context(node, run_config(**RACE_RC)))
    assert reply.has_error() and reply.error.code == replies.DECLINED_BUDGET


def test_a_round_that_failed_before_replying_gives_its_reservation_back(
        phantoms: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import models.training as training
    from client.privacy.accountant import PersistentAccountant

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(training, "train_epoch", broken)
    reply = train(message("train", initial_state()), context(_node(phantoms, tmp_path / "state"), run_config()))
    assert reply.has_error() and reply.error.code == replies.SITE_FAILURE
    ledger = PersistentAccountant.load(tmp_path / "state")
    assert ledger.reserved == {} and ledger.epsilon(1e-5) == 0.0  # no update left the site: nothing spent


# ------------------------------------------------------------------------------------------------ workload caps
@pytest.mark.parametrize(
    "cap, value, overrides, asked",
    [
        ("max-spatial-voxels", 1024, {}, "model-spatial-size=8,16,16 (2048 voxels per case)"),
        ("max-channels", 4, {}, "model-channels=4,8 (8 channels in its widest layer)"),
        ("max-batch-size", 8, {"batch-size": 16}, "batch-size=16"),
        ("max-local-epochs", 2, {"local-epochs": 3}, "local-epochs=3"),
        ("max-rounds", 10, {"num-server-rounds": 500}, "num-server-rounds=500"),
    ],
)
def test_a_run_asking_more_than_the_sites_caps_is_refused_before_any_work(
        phantoms: Path, tmp_path: Path, cap: str, value: int, overrides: dict[str, Any], asked: str) -> None:
    """Attack: a run config sized to exhaust the site's memory (or its days). The site refuses it by policy, naming
    the key, the value asked and its cap, before reading a single case."""
    node = _node(phantoms, tmp_path / "state", **{cap: value})
    reply = train(message("train", initial_state()), context(node, run_config(**overrides)))
    assert reply.has_error() and reply.error.code == replies.REFUSED_POLICY, reply
    assert asked in reply.error.reason and f"{cap}={value}" in reply.error.reason, reply.error.reason
    assert not (tmp_path / "state" / "preprocessed").exists(), "the site read its cases before refusing"


# ------------------------------------------------------------------------------------------------ app pinning
def _deliver(fab: bytes, state_dir: Path) -> tuple[Any, Any, int]:
    """Deliver a run's first message with ``fab`` to Flower's real SuperNode intake (its in-memory node state and
    object store), as the SuperNode's main loop does; returns the node state, the run and the run id."""
    import time as _time

    from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, RecordDict
    from flwr.supercore.fab import Fab
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supernode import start_client_internal as sci
    from flwr.supernode.nodestate import NodeStateFactory

    stores = ObjectStoreFactory()
    state, objects = NodeStateFactory(objectstore_factory=stores).state(), stores.store()
    state.set_node_id(7)
    run_id = 42
    md = Metadata(run_id=run_id, message_id="", src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="1",
                  created_at=_time.time(), ttl=3600.0, message_type="train")
    msg = Message(content=RecordDict({"arrays": ArrayRecord({"w": torch.zeros(3)}),
                                      "config": ConfigRecord({"server-round": 1})}), metadata=md)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    tree, parts = get_object_tree(msg), {k: v.deflate() for k, v in get_all_nested_objects(msg).items()}
    run = Run.create_empty(run_id)
    run.fab_hash = hashlib.sha256(fab).hexdigest()
    sci._pull_and_store_message(
        state=state, object_store=objects, node_config={}, receive=lambda: (msg, tree), get_run=lambda _r: run,
        get_fab=lambda h, _r: Fab(h, fab, {}), pull_object=lambda _r, o: parts[o],
        confirm_message_received=lambda _r, _m: None, trusted_entities=None,
    )
    return state, run, run_id


def test_a_pinned_site_runs_only_the_app_it_pinned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack: the run submitter ships a modified app (one byte: the policy's default ceiling 10 -> 90); the app
    brings the very policy and ledger code that should protect the site. A site that pinned the reviewed app's hash
    refuses it in its SuperNode process (outside the app) before Flower stores it for a ClientApp; the reviewed
    app runs. Before, any FAB the SuperLink handed over was stored and run."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.supernode import start_client_internal as sci

    from client.privacy.policy import write_policy_file
    from client.supernode_guard import AppPins, app_sha256, install
    from common.flwr_cli import stage_app

    reviewed = stage_app(tmp_path / "reviewed")
    modified = tmp_path / "modified"
    shutil.copytree(reviewed, modified)
    policy_py = modified / "client" / "privacy" / "policy.py"
    source = policy_py.read_text()
    assert "max_epsilon: float = 10.0" in source
    policy_py.write_text(source.replace("max_epsilon: float = 10.0", "max_epsilon: float = 90.0", 1))
    fabs = {"reviewed": build_fab_from_disk(reviewed), "modified": build_fab_from_disk(modified)}
    assert app_sha256(reviewed) == hashlib.sha256(fabs["reviewed"]).hexdigest() != app_sha256(modified)

    state_dir = tmp_path / "site-state"
    write_policy_file(state_dir, {"allowed-apps": [app_sha256(reviewed)]})
    monkeypatch.setattr(sci, "_pull_and_store_message", sci._pull_and_store_message)  # undone after the test
    install(AppPins(state_dir, {}))

    state, run, run_id = _deliver(fabs["modified"], state_dir)
    assert state.get_run(run_id) is None and state.get_fab(run.fab_hash) is None, "the modified app was stored"
    (reply,) = state.get_messages_legacy(is_reply=True)
    assert reply.has_error() and reply.error.code == sci.FAB_VERIFICATION_ERROR.code

    state, run, run_id = _deliver(fabs["reviewed"], state_dir)
    assert state.get_run(run_id) is not None and state.get_fab(run.fab_hash).content == fabs["reviewed"]
    assert not state.get_messages_legacy(is_reply=True)


def test_flower_home_inside_the_state_directory_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An app unpacked under FLWR_HOME must not be able to overwrite the privacy ledger: the site will not start
    with Flower's home inside (or around) its state directory."""
    from client.daemon import DaemonError, SiteOptions, prepare

    site = make_phantoms(tmp_path / "ph", sites=1, cases=2, scenario="iid", fmt="nifti") / "site-01"
    state = tmp_path / "state"
    for home in (state / "flwr-home", tmp_path):
        monkeypatch.setenv("FLWR_HOME", str(home))
        with pytest.raises(DaemonError, match="overlaps the site's state directory"):
            prepare(SiteOptions(data=site, superlink="h:1", insecure=True, state=state), python="x")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    prepare(SiteOptions(data=site, superlink="h:1", insecure=True, state=state), python="x")


# ------------------------------------------------------------------------------------------------ Control API
def test_a_site_holding_the_ca_cannot_reach_the_control_api(tmp_path: Path) -> None:
    """Attack: a site (it holds the CA and reaches the address the SuperNodes use) registers a key of its own and
    could submit runs through the Control API. Before, ``flower-superlink`` served the Control API on the sites'
    port; the deployment's SuperLink now serves only the Fleet API there, the Control API on loopback only."""
    import os
    import subprocess
    import sys

    from common import flwr_cli, processes
    from fedfusion import deployment as dep
    from fedfusion.commands.certs import make_deployment_keys

    keys = make_deployment_keys(tmp_path / "certs", ["localhost", "127.0.0.1"], 1)
    fleet_port, control_port = processes.free_ports(2)
    venv = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_HOME": str(tmp_path / "superlink-home")}
    cmd = dep.superlink_command(database=tmp_path / "state.db", tls=dep.ServerTLS.from_dir(keys.server_cert.parent),
                                host="127.0.0.1", port=fleet_port, control_port=control_port,
                                executable=(str(venv / "fedfusion"),))
    procs = processes.ProcessSet(tmp_path / "logs", env=env, cwd=tmp_path)
    try:
        procs.start("superlink", cmd)
        assert processes.wait_port("127.0.0.1", fleet_port, 90), procs.procs["superlink"].log_text()

        def register(port: int) -> dict[str, Any]:
            home = tmp_path / f"home-{port}"
            flwr_cli.write_flwr_home(home, f"127.0.0.1:{port}", keys.ca_cert)
            for _ in range(60):  # the port opens a moment before the app answers
                proc = subprocess.run(
                    [str(venv / "flwr"), "supernode", "register", str(keys.sites[0].public_key),
                     flwr_cli.CONNECTION_NAME, "--format", "json"],
                    env={**env, "FLWR_HOME": str(home)}, capture_output=True, text=True, timeout=60, cwd=tmp_path)
                answer = json.loads(proc.stdout[proc.stdout.find("{"):])
                if "unavailable" not in str(answer.get("error-message", "")):
                    return answer
                time.sleep(1.0)
            raise AssertionError(f"no answer on port {port}: {answer}")

        as_site = register(fleet_port)
        assert not as_site["success"], "a site registered a key through the port the sites use"
        as_admin = register(control_port)
        assert as_admin["success"], as_admin
    finally:
        assert not procs.stop_all(), "SuperLink processes left behind"
