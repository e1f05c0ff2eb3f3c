"""``fedfusion simulate --ray-address``: the same simulation on an existing Ray cluster.

The test starts its own Ray head (``ray start --head --block``) on 127.0.0.1 with free ports, 2 CPUs and a private
temporary folder, runs a 2-round simulation against it, and stops the head with every process below it. Bounded:
the head gets at most :data:`HEAD_TIMEOUT` seconds to come up, the module :data:`TIMEOUT`. It checks that the
virtual sites ran on that cluster (its worker logs name Flower's ClientAppActor), that both rounds aggregated both
sites, and that the head is still running after the simulation disconnected (a joined cluster is not shut down).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from common import processes
from fedfusion.loopback import make_phantoms, metrics_rounds, train_scopes

#: Seconds for the Ray head to accept connections (about 10 s on the 2-core machine under load).
HEAD_TIMEOUT = 120
#: The whole module: head start, a 2-round simulation of two tiny sites (about 60 s under load), teardown.
TIMEOUT = 600

pytestmark = [pytest.mark.slow, pytest.mark.timeout(TIMEOUT)]


def _worker_ports(taken: list[int], count: int = 200) -> list[str]:
    """Ray's worker port range, disjoint from the ports given to its other components (Ray refuses an overlap)."""
    low = max(taken) + 1 if max(taken) + count <= 65535 else min(taken) - count
    return [f"--min-worker-port={low}", f"--max-worker-port={low + count - 1}"]


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[tuple[str, Path, processes.ProcessSet]]:
    """A Ray head on 127.0.0.1 (``HOST:PORT``), its temporary folder and the process set that owns it."""
    ray = Path(sys.executable).parent / "ray"
    if not ray.exists():
        pytest.skip(f"{ray} is not installed")
    # Ray puts Unix sockets under the temporary folder: keep its path short
    temp = Path(tempfile.mkdtemp(prefix="rayh", dir="/tmp"))
    gcs, *others = processes.free_ports(9)
    names = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port")
    argv = [str(ray), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
            "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}",
            *[f"--{name}={port}" for name, port in zip(names, others)],
            *_worker_ports([gcs, *others])]
    procs = processes.ProcessSet(tmp_path / "logs")
    try:
        procs.start("ray-head", argv)
        if not processes.wait_port("127.0.0.1", gcs, HEAD_TIMEOUT):
            pytest.fail(f"the Ray head did not open port {gcs}:\n{procs.procs['ray-head'].log_text()[-4000:]}")
        yield f"127.0.0.1:{gcs}", temp, procs
    finally:
        procs.refresh()
        seen = set(procs.all_pids)
        left = procs.stop_all()
        shutil.rmtree(temp, ignore_errors=True)
        assert not left and not processes.alive(seen), f"Ray processes left behind: {sorted(left)}"


def test_two_rounds_on_an_existing_ray_cluster(ray_head: tuple[str, Path, processes.ProcessSet],
                                                tmp_path: Path) -> None:
    from simulations.simulate import simulate

    address, temp, procs = ray_head
    data = make_phantoms(tmp_path / "data", sites=2, cases_per_site=2, heldout_cases=2)
    overrides = {
        "num-server-rounds": 2, "model-channels": "4", "model-family": "input", "model-spatial-size": "8,16,16",
        "model-modalities": "t1,t1ce,flair", "local-epochs": 1, "batch-size": 2, "dp-enabled": False,
        "eval-every": 0, "eval-hd95": "none", "round-timeout": 300,
    }
    result = simulate(tmp_path / "run", data=data, overrides=overrides, progress=False, report=False,
                      ray_address=address)
    assert result.rounds == 2 and {1, 2} <= metrics_rounds(result.run_dir)
    for rnd in (1, 2):
        # two distinct virtual sites trained (the server names simulated sites by node identity)
        assert len(train_scopes(result.run_dir, rnd)) == 2, (rnd, train_scopes(result.run_dir, rnd))
    logs = [p for p in (temp / "session_latest" / "logs").glob("worker-*") if p.is_file()]
    assert any("ClientAppActor" in p.read_text(errors="replace") for p in logs), \
        "no worker of the external cluster ran a ClientAppActor"
    assert procs.running("ray-head"), "the simulation shut the external Ray cluster down"


def test_a_wrong_address_is_a_clear_error(tmp_path: Path) -> None:
    from simulations.ray_cluster import RayClusterError, connect

    (port,) = processes.free_ports(1)
    with pytest.raises(RayClusterError, match=f"127.0.0.1:{port}"):
        connect({}, 1, f"127.0.0.1:{port}")
