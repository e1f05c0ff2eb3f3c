"""The ``flwr run`` path: a private local SuperLink in simulation mode, offline, and nothing left running.

Every process the run starts (SuperLink, SuperExec, ``flwr-simulation``, Ray's GCS/raylet/workers, the ``flwr``
CLI) inherits the private ``FLWR_HOME`` of the run's work folder; the tests find them by that environment entry,
so other Flower/Ray processes on the machine are never confused with ours.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from models.runlog import is_site_scope, iter_metrics

SITES = 2
CASES = 3
TINY = {
    "num-server-rounds": 2,
    "model-channels": "4,8",
    "model-spatial-size": "8,16,16",
    "model-modalities": "t1,t1ce,flair",
    "batch-size": CASES,  # = cases per site: Poisson rate 1, never an empty DP batch
    "min-train-nodes": SITES,
    "min-evaluate-nodes": SITES,
    "min-available-nodes": SITES,
    "eval-batch-size": 2,
}


def _ours(flwr_home: Path) -> dict[int, str]:
    """pid -> command line of every live process whose environment names ``flwr_home`` as FLWR_HOME."""
    marker = b"FLWR_HOME=" + str(flwr_home).encode() + b"\0"
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state in ("Z", "X"):
                continue
            if marker in (entry / "environ").read_bytes():
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
    return found


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from simulations.phantom_writers import generate

    data = tmp_path_factory.mktemp("flwr-data")
    generate(data, sites=SITES, cases_per_site=CASES, seed=5, scenario="iid", shape=(8, 16, 16), fmt="nifti",
             heldout_cases=2)
    return data


@pytest.mark.slow
def test_flwr_run_finishes_offline_and_leaves_no_process(phantoms: Path, tmp_path: Path) -> None:
    from simulations.flwr_run import run_with_flwr

    workdir = tmp_path / "work"
    flwr_home = workdir / "flwr-home"
    seen: dict[int, str] = {}

    def watch() -> None:
        seen.update(_ours(flwr_home))

    run_dir = run_with_flwr(TINY, phantoms, SITES, workdir, timeout=600, poll=watch)

    rounds = {r["round"] for r in iter_metrics(run_dir / "metrics.jsonl") if r["phase"] == "server-eval"}
    assert {1, 2} <= rounds
    trained = {r["scope"] for r in iter_metrics(run_dir / "metrics.jsonl")
               if r["phase"] == "train" and is_site_scope(r["scope"])}
    assert len(trained) == SITES
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    # No legacy [tool.flwr.federations] table that `flwr run` would migrate (rewriting pyproject.toml).
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "federations" not in pyproject["tool"]["flwr"]

    # The watcher really saw the engine running (so the check below is not vacuous) ...
    cmds = " | ".join(seen.values())
    assert "flower-superlink" in cmds and "flwr-simulation" in cmds, cmds
    # ... and nothing of it survives: no SuperLink, SuperExec, flwr-simulation, Ray process or flwr CLI.
    assert _ours(flwr_home) == {}
    # Runtime dependency installation stayed off (offline): nothing ran `uv` and the SuperLink was told so.
    assert " uv " not in f" {cmds} "
    assert "--disable-runtime-dependency-installation" in cmds


@pytest.mark.slow
def test_interrupted_flwr_run_leaves_no_process(phantoms: Path, tmp_path: Path) -> None:
    from simulations.flwr_run import run_with_flwr

    workdir = tmp_path / "work"
    flwr_home = workdir / "flwr-home"
    seen: dict[int, str] = {}

    def interrupt_once_running() -> None:
        seen.update(_ours(flwr_home))
        if any("flwr-simulation" in c for c in seen.values()):
            raise KeyboardInterrupt  # as Ctrl-C would, in the middle of the run

    with pytest.raises(KeyboardInterrupt):
        run_with_flwr({**TINY, "num-server-rounds": 50}, phantoms, SITES, workdir, timeout=600,
                      poll=interrupt_once_running)
    assert any("flower-superlink" in c for c in seen.values())
    assert _ours(flwr_home) == {}


def test_federation_config_is_what_flower_accepts() -> None:
    """The --federation-config string parses exactly as `flwr run` parses it (Flower 1.41 SimulationConfig)."""
    from flwr.common.config import parse_config_args
    from flwr.supercore.utils import simulation_config_from_json

    from simulations.flwr_run import federation_config

    parsed = parse_config_args([federation_config(7, cpus_per_site=1)])
    cfg = simulation_config_from_json({k.replace("-", "_"): v for k, v in parsed.items()})
    assert cfg.num_supernodes == 7
    assert cfg.client_resources_num_cpus == 1
    assert cfg.init_args_num_cpus >= 1


def test_process_set_stops_orphans_in_detached_sessions(tmp_path: Path) -> None:
    """Like Flower's SuperExec: a child detaches into its own session, starts a worker and exits (and is reaped),
    so the worker is re-parented and its process group has no leader left to signal. Stopping the parent must
    still stop the worker, found through the session it kept."""
    import os
    import sys
    import time

    from common.processes import ProcessSet, alive

    marker = f"FEDFUSION_TEST_ORPHAN={tmp_path}"
    detach = (
        "import subprocess, sys, time; time.sleep(1.0); "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])"  # the worker; then exit
    )
    parent = (
        "import subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', {detach!r}], start_new_session=True).wait(); time.sleep(300)"
    )
    procs = ProcessSet(tmp_path / "logs", env={**os.environ, "FEDFUSION_TEST_ORPHAN": str(tmp_path)})
    procs.start("parent", [sys.executable, "-c", parent])

    def ours(needle: bytes) -> set[int]:
        found = set()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    env = (entry / "environ").read_bytes()
                    cmd = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                if marker.encode() + b"\0" in env and needle in cmd:
                    found.add(int(entry.name))
        return alive(found)

    def workers() -> set[int]:
        return ours(b"import time; time.sleep(300)") - ours(b"Popen")

    def child() -> set[int]:
        return ours(b"sleep(1.0)") - ours(b"start_new_session")

    try:
        # The set sees the detaching child while it lives (as it would see Flower's SuperExec) ...
        deadline = time.monotonic() + 30
        while not (child() & procs.procs["parent"].seen) and time.monotonic() < deadline:
            procs.refresh()
            time.sleep(0.05)
        assert child() & procs.procs["parent"].seen, "the detaching child never started"
        # ... but is not refreshed again until the child has exited and its worker is an orphan.
        while (child() or not workers()) and time.monotonic() < deadline:
            time.sleep(0.05)
        orphans = workers()
        assert orphans, "the detached worker never started"
        assert not orphans & procs.procs["parent"].seen
        left = procs.stop_all(timeout=5)
        assert left == set()
        assert workers() == set()
    finally:  # never leave a sleeper behind, even when an assertion fails
        procs.stop_all(timeout=5)
        for pid in workers():
            os.kill(pid, 9)
