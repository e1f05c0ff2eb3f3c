"""Real processes on loopback: a TLS SuperLink with SuperNode authentication, three site SuperNodes, a real run.

Slow (tens of seconds to a few minutes on 2 cores) but part of CI. Skipped only when Flower's executables are
not installed. Every test leaves no process behind (checked).
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import pytest

from common import processes
from fedfusion.loopback import LoopbackFederation, make_phantoms, metrics_rounds, missing_binaries, tiny_run_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(540),  # bounded inside each test; generous for a loaded shared 2-core CI machine
    pytest.mark.skipif(bool(missing_binaries()), reason=f"Flower executables missing: {missing_binaries()}"),
]


def _handshake(port: int, context: ssl.SSLContext, server_hostname: str = "localhost") -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_hostname) as tls:
            return tls.getpeercert()


def test_tls_superlink_authenticated_supernodes_and_persistent_state(tmp_path: Path) -> None:
    """Machinery only (no training): TLS with our CA, three registered SuperNodes online, state survives a restart."""
    fed = LoopbackFederation(tmp_path / "w", tmp_path / "data", 3, use_site_daemon=False)
    with fed:
        nodes = fed.nodes()
        assert sorted(nodes) == sorted(fed.node_ids.values())
        assert set(nodes.values()) == {"online"}

        # TLS: the certificate chains to our CA and names localhost / 127.0.0.1 …
        assert fed.keys is not None
        ours = ssl.create_default_context(cafile=str(fed.keys.ca_cert))
        cert = _handshake(fed.superlink_port, ours)
        assert ("DNS", "localhost") in cert["subjectAltName"]
        assert ("IP Address", "127.0.0.1") in cert["subjectAltName"]
        # … and a client that does not trust our CA refuses it
        with pytest.raises(ssl.SSLCertVerificationError):
            _handshake(fed.superlink_port, ssl.create_default_context())
        # plain HTTP gets no HTTP answer from the TLS port
        with socket.create_connection(("127.0.0.1", fed.superlink_port), timeout=10) as raw:
            raw.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            raw.settimeout(5)
            try:
                answer = raw.recv(100)
            except (TimeoutError, ConnectionResetError):
                answer = b""
        assert not answer.startswith(b"HTTP/1.1 200")

        # Flower's SQLite state on disk: restart the SuperLink, the registrations are still there
        db = fed.workdir / "superlink-state" / "state.db"
        assert db.read_bytes()[:16] == b"SQLite format 3\x00"
        fed.procs.stop("superlink")
        fed.start_superlink()
        assert sorted(fed.nodes()) == sorted(fed.node_ids.values())
        all_pids = set(fed.procs.all_pids)
    assert not processes.alive(all_pids), "processes left behind"


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_phantoms(tmp_path_factory.mktemp("phantoms") / "data", sites=3, cases_per_site=4)


def test_loopback_deployment_runs_two_rounds_with_report(tmp_path: Path, phantom_data: Path) -> None:
    """`fedfusion site` x3 (or flower-supernode when the daemon is absent) + `flwr run`: 2 rounds, then a report."""
    work = tmp_path / "w"
    start = time.monotonic()
    with LoopbackFederation(work, phantom_data, 3) as fed:
        cfg = tiny_run_config(work, phantom_data)
        run_id = fed.submit(cfg)
        try:
            status = fed.wait_finished(run_id, timeout=200)
        except TimeoutError:
            pytest.fail(f"run did not finish:\n{fed.run_log(run_id)[-3000:]}\n{fed.logs()}")
        run_log = fed.run_log(run_id)
        assert status == "finished:completed", f"{status}\n{run_log[-3000:]}\n{fed.logs()}"
        run_dir = Path(cfg["run-dir"])
        assert {1, 2} <= metrics_rounds(run_dir), run_log[-3000:]
        # the report: written by the ServerApp if it does, else by the coordinator's `fedfusion report RUN_DIR`
        report = run_dir / "report.md" if (run_dir / "report.md").is_file() else fed.build_report(run_dir)
        assert report.stat().st_size > 0
        # the run history is on the SuperLink, visible with flwr ls
        listed = fed.flwr(["ls"])["runs"]
        assert any(int(r["run-id"]) == run_id for r in listed)
        # every site spent privacy budget in its own state directory
        for name in fed.site_names:
            assert any(fed.state_dir(name).iterdir()), f"{name} wrote no state"
        all_pids = set(fed.procs.all_pids)
    assert not processes.alive(all_pids), "processes left behind"
    print(f"loopback deployment: 2 rounds in {time.monotonic() - start:.0f}s")
