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


def test_an_mri_only_public_cohort_records_what_it_pretrained(tmp_path: Path, counted: list[Any]) -> None:
    """Public brain-tumour data are MRI only: the cohort has no CT or US files, the checkpoint's provenance says
    which modalities it trained (the planner reads it), and it is a request of its own (never reused for the
    all-modality cohort, nor that one for it)."""
    mri = ("t1", "t1ce", "t2", "flair")
    ckpt = sp.public_start(tmp_path / "public", SMALL, modalities=mri)
    _, _, extra = load_checkpoint(ckpt)
    assert extra["provenance"]["modalities"] == "t1,t1ce,t2,flair"
    assert counted[-1].phantoms == {"sites": 1, "cases": 2, "seed": sp.PUBLIC_SEED, "modalities": "t1,t1ce,t2,flair"}
    files = [f.name for f in (tmp_path / "public" / "data").rglob("*.nii.gz")]
    assert files and not any(f.endswith(("_ct.nii.gz", "_us.nii.gz")) for f in files)
    assert any(f.endswith("_flair.nii.gz") for f in files)
    assert sp.public_start(tmp_path / "public", SMALL, modalities=mri) == ckpt and len(counted) == 1  # reused
    sp.public_start(tmp_path / "public", SMALL)  # all six: another request, pretrained again
    assert len(counted) == 2
    assert load_checkpoint(ckpt)[2]["provenance"]["modalities"] == "t1,t1ce,t2,flair,ct,us"


def test_phantom_modalities_are_checked(tmp_path: Path) -> None:
    from simulations.phantom_writers import generate

    with pytest.raises(ValueError, match="xray"):
        generate(tmp_path / "a", sites=1, cases_per_site=1, shape=(8, 16, 16), modalities=["xray"])
    # modality-skew's first site acquires the four MRI sequences only: nothing of an ultrasound-only request
    with pytest.raises(ValueError, match="site-01 acquires"):
        generate(tmp_path / "b", sites=2, cases_per_site=1, shape=(8, 16, 16), scenario="modality-skew",
                 modalities=["us"])


def test_simulate_checks_public_modalities_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    import simulations.simulate as sim

    seen: list[Any] = []
    monkeypatch.setattr(sp, "public_start", lambda folder, config, progress=False, **kw: seen.append(kw) or
                        tmp_path / "never.pt")
    monkeypatch.setattr("server.initial.initial_state", lambda *a, **k: None)
    monkeypatch.setattr(sim, "run_federation", lambda config, num_sites, **_: object())
    tiny = dict(sites=2, cases_per_site=1, shape=(8, 16, 16), heldout_cases=1, progress=False, report=False)
    with pytest.raises(ValueError, match="xray"):
        sim.simulate(tmp_path / "bad", overrides={**SMALL, "dp-enabled": True}, public_pretrain=None,
                     public_modalities=["t1", "xray"], **tiny)
    assert not (tmp_path / "bad" / "data").exists()  # refused before the phantoms were written
    sim.simulate(tmp_path / "dp", overrides={**SMALL, "dp-enabled": True}, public_pretrain=None,
                 public_modalities=["flair", "t1"], **tiny)
    assert seen == [{"modalities": ("t1", "flair")}]
    with caplog.at_level("WARNING", logger="fedfusion.simulate"):
        sim.simulate(tmp_path / "nodp", overrides={**SMALL, "dp-enabled": False}, public_pretrain=None,
                     public_modalities=["t1"], **tiny)
    assert len(seen) == 1 and "--public-modalities t1 ignored" in caplog.text
