"""`fedfusion simulate`'s public pretraining: made once per cohort request and network, reused by reruns, rebuilt
when it cannot be trusted, and used by default exactly when DP is on and the simulation generates its phantoms."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import simulations.pretrain as sp
from common.runconfig import model_entries
from models.checkpoint import load_checkpoint
from tests.client_helpers import TINY

SMALL = {**model_entries(TINY), "batch-size": 2, "lr": 0.01, "seed": 0}


@pytest.fixture()
def counted(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    monkeypatch.setattr(sp, "PUBLIC_SITES", 1)
    monkeypatch.setattr(sp, "PUBLIC_CASES", 2)
    calls: list[Any] = []
    real = sp.pretrain

    def pretrain(settings: sp.PretrainSettings) -> sp.PretrainResult:
        calls.append(settings)
        return real(settings)

    monkeypatch.setattr(sp, "pretrain", pretrain)
    return calls


def test_public_start_pretrains_once_and_rebuilds_what_it_cannot_trust(tmp_path: Path, counted: list[Any]) -> None:
    ckpt = sp.public_start(tmp_path / "public", SMALL)
    _, cfg, extra = load_checkpoint(ckpt)
    assert cfg == TINY and extra["provenance"]["kind"] == "fedfusion-pretrain" and len(counted) == 1
    assert counted[0].phantoms == {"sites": 1, "cases": 2, "seed": sp.PUBLIC_SEED}
    assert sp.public_start(tmp_path / "public", SMALL) == ckpt and len(counted) == 1  # reused
    ckpt.write_bytes(b"not a checkpoint")
    assert sp.public_start(tmp_path / "public", SMALL) == ckpt and len(counted) == 2  # rebuilt, not trusted
    load_checkpoint(ckpt)


def test_simulate_starts_from_public_pretraining_by_default_only_under_dp(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import simulations.simulate as sim

    ckpt = tmp_path / "pretrained.pt"
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(sp, "public_start", lambda folder, config, progress=False: ckpt)
    monkeypatch.setattr("server.initial.initial_state", lambda *a, **k: None)

    def federation(config: dict[str, Any], num_sites: int, **_: Any) -> Any:
        seen.append(dict(config))
        return object()

    monkeypatch.setattr(sim, "run_federation", federation)
    tiny = dict(sites=2, cases_per_site=1, shape=(8, 16, 16), heldout_cases=1, progress=False, report=False)
    sim.simulate(tmp_path / "dp", overrides={**SMALL, "dp-enabled": True}, public_pretrain=None, **tiny)
    sim.simulate(tmp_path / "nodp", overrides={**SMALL, "dp-enabled": False}, public_pretrain=None, **tiny)
    given = tmp_path / "given.pt"
    sim.simulate(tmp_path / "init", overrides={**SMALL, "dp-enabled": True, "init-checkpoint": str(given)},
                 public_pretrain=None, **tiny)
    sim.simulate(tmp_path / "off", overrides={**SMALL, "dp-enabled": True}, public_pretrain=False, **tiny)
    assert [c["init-checkpoint"] for c in seen] == [str(ckpt.resolve()), "", str(given), ""]
