"""The ``flwr run`` path: a private local SuperLink in simulation mode, offline, and nothing left running.

Every process the run starts (SuperLink, SuperExec, ``flwr-simulation``, Ray's GCS/raylet/workers, the ``flwr``
CLI) inherits the private ``FLWR_HOME`` of the run's work folder; the tests find them by that environment entry,
so other Flower/Ray processes on the machine are never confused with ours.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from models.runlog import iter_metrics

pytestmark = pytest.mark.slow

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
               if r["phase"] == "train" and str(r["scope"]).startswith("site-")}
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
