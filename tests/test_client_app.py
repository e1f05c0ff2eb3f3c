"""The site ClientApp's handlers called directly on phantom sites (no server): training, privacy ledger, ceiling,
policy refusals, DP off, missing modalities, bad data, and that nothing identifying leaves the site."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import torch

from common import replies
from client.client_app import evaluate, train
from client.privacy.accountant import PersistentAccountant
from client.runtime import clear_cache
from models.modalities import MODALITIES
from tests.client_helpers import TINY, context, initial_state, make_phantoms, message, run_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return make_phantoms(tmp_path_factory.mktemp("phantoms"))


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    clear_cache()


def _node(phantoms: Path, tmp_path: Path, site: str = "site-02", **extra: object) -> dict[str, object]:
    return {"data-dir": str(phantoms / site), "state-dir": str(tmp_path / "state"), **extra}


def test_train_changes_arrays_reports_availability_and_exact_epsilon(phantoms: Path, tmp_path: Path) -> None:
    state = initial_state()
    reply = train(message("train", state), context(_node(phantoms, tmp_path), run_config()))
    assert not reply.has_error(), reply.error
    new = reply.content["arrays"].to_torch_state_dict()
    assert set(new) == set(state)  # plain parameter names, no Opacus "_module." prefix
    assert any(not torch.equal(new[k], state[k]) for k in state)
    m = dict(reply.content["metrics"])
    assert all(isinstance(v, (int, float)) for v in m.values())

    # availability: site-02 of the modality-skew scenario lacks some modalities; the reply says which, with case
    # counts rounded up to the policy's count-granularity (10 by default; 3 cases: too few to hold any out)
    from common.data import CaseDataset

    ds = CaseDataset([phantoms / "site-02"], TINY.modalities, TINY.spatial_size)
    counts = ds.modality_counts()
    assert any(n == 0 for n in counts.values()) and any(n > 0 for n in counts.values())
    for mod in MODALITIES:
        assert m[f"cases-{mod}"] == (10.0 if counts.get(mod, 0) else 0.0)
        assert m[f"has-{mod}"] == (1.0 if counts.get(mod, 0) else 0.0)
    assert m["num-examples"] == 10.0 and "train-loss" not in m

    # the reported epsilon is exactly what a fresh Opacus accountant computes from the saved history
    from opacus.accountants import RDPAccountant

    saved = json.loads((tmp_path / "state" / "privacy-accountant.json").read_text())
    fresh = RDPAccountant()
    fresh.history = [tuple(h) for h in saved["history"]]
    assert m["epsilon-total"] == pytest.approx(fresh.get_epsilon(delta=1e-5), rel=1e-12)
    assert m["epsilon-round"] == pytest.approx(m["epsilon-total"])  # first round ever
    assert m["dp-enabled"] == 1.0 and m["noise-multiplier"] == 1.0 and m["delta"] == 1e-5


def test_a_site_whose_first_message_is_evaluate_then_trains(phantoms: Path, tmp_path: Path) -> None:
    """In simulation a worker may evaluate a site before it ever trained it: training must still work after (here
    the 3-patient site refuses to evaluate: too few patients to hold any out)."""
    ctx = context(_node(phantoms, tmp_path), run_config())
    first = evaluate(message("evaluate", initial_state()), ctx)
    assert first.has_error() and first.error.code == replies.REFUSED_EVALUATION
    assert "too few patients" in first.error.reason
    reply = train(message("train", initial_state()), ctx)
    assert not reply.has_error(), reply.error
    assert dict(reply.content["metrics"])["epsilon-total"] > 0


def test_second_process_continues_from_spent_epsilon(phantoms: Path, tmp_path: Path) -> None:
    node = _node(phantoms, tmp_path)
    first = train(message("train", initial_state()), context(node, run_config()))
    eps1 = dict(first.content["metrics"])["epsilon-total"]
    script = (
        "import json, sys, torch; torch.set_num_threads(1)\n"
        "from client.client_app import train\n"
        "from tests.client_helpers import context, initial_state, message, run_config\n"
        "node, = json.loads(sys.argv[1]),\n"
        "r = train(message('train', initial_state(), server_round=2), context(node, run_config()))\n"
        "print('RESULT', json.dumps(dict(r.content['metrics'])))\n"
    )
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script, json.dumps(node)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    m2 = json.loads(out.stdout.split("RESULT", 1)[1])
    assert m2["epsilon-total"] > eps1 + 1e-9
    assert m2["epsilon-total"] - m2["epsilon-round"] == pytest.approx(eps1, rel=1e-9)
    ledger = PersistentAccountant.load(tmp_path / "state")
    assert ledger.rounds == 2 and ledger.epsilon(1e-5) == pytest.approx(m2["epsilon-total"], rel=1e-12)


def test_ceiling_makes_the_site_decline(phantoms: Path, tmp_path: Path) -> None:
    node = _node(phantoms, tmp_path, **{"max-epsilon": 1.5})
    reply = train(message("train", initial_state()), context(node, run_config()))
    assert reply.has_error()
    assert reply.error.code == replies.DECLINED_BUDGET and replies.is_decline(reply.error.code)
    numbers = replies.parse_reason(reply.error.reason)
    assert numbers["epsilon-total"] == 0.0 and numbers["epsilon-next"] > 1.5 and numbers["max-epsilon"] == 1.5
    assert PersistentAccountant.load(tmp_path / "state").history == []  # nothing was spent


def test_weaker_privacy_than_policy_is_refused(phantoms: Path, tmp_path: Path) -> None:
    for rc in (run_config(**{"dp-noise-multiplier": 0.1}), run_config(**{"dp-max-grad-norm": 50.0}),
               run_config(**{"dp-enabled": False})):
        clear_cache()
        reply = train(message("train", initial_state()), context(_node(phantoms, tmp_path), rc))
        assert reply.has_error() and reply.error.code == replies.REFUSED_POLICY, rc


def test_dp_off_when_the_site_allows_it(phantoms: Path, tmp_path: Path) -> None:
    state = initial_state()
    node = _node(phantoms, tmp_path, **{"allow-no-dp": True})
    reply = train(message("train", state), context(node, run_config(**{"dp-enabled": False, "proximal-mu": 0.1})))
    assert not reply.has_error(), reply.error
    m = dict(reply.content["metrics"])
    assert m["dp-enabled"] == 0.0 and m["epsilon-total"] == 0.0
    new = reply.content["arrays"].to_torch_state_dict()
    assert any(not torch.equal(new[k], state[k]) for k in state)
    assert not (tmp_path / "state" / "privacy-accountant.json").exists()


def test_fedprox_with_dp_and_simulation_partition(phantoms: Path, tmp_path: Path) -> None:
    # simulation: no data-dir, the partition id picks the sorted site-* folder of the run config's data-dir
    rc = run_config(**{"proximal-mu": 0.5, "data-dir": str(phantoms), "run-dir": str(tmp_path / "run")})
    reply = train(message("train", initial_state()), context({"partition-id": 0, "num-partitions": 2}, rc))
    assert not reply.has_error(), reply.error
    assert dict(reply.content["metrics"])["site-index"] == 1.0
    assert (tmp_path / "run" / "site-state" / "site-01" / "privacy-accountant.json").exists()


def test_no_usable_case_gives_a_clear_error(tmp_path: Path) -> None:
    site = tmp_path / "site-09"
    (site / "case-0001").mkdir(parents=True)
    (site / "case-0001" / "junk.dcm").write_bytes(b"not a dicom file")
    (site / "labels.csv").write_text("case_id,label\ncase-0001,1\n")
    node = {"data-dir": str(site), "state-dir": str(tmp_path / "state")}
    reply = train(message("train", initial_state()), context(node, run_config()))
    assert reply.has_error() and reply.error.code == replies.NO_USABLE_DATA
    assert "usable" in reply.error.reason and str(tmp_path) not in reply.error.reason


def _phi_strings(site: Path) -> set[str]:
    found: set[str] = set()
    for f in site.rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for tag in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "StudyDate",
                    "ReferringPhysicianName", "AccessionNumber"):
            v = str(ds.get(tag, "") or "").strip()
            if len(v) >= 4:
                found.add(v)
                found.update(p for p in v.split("^") if len(p) >= 4)
    return found


def _serialise(msg: object) -> str:
    """Every key and value of a reply (arrays: names, dtypes, shapes and raw bytes as latin-1 text)."""
    parts: list[str] = []
    if msg.has_error():  # type: ignore[attr-defined]
        parts.append(str(msg.error.code) + " " + str(msg.error.reason))  # type: ignore[attr-defined]
        return "\n".join(parts)
    for name, record in msg.content.items():  # type: ignore[attr-defined]
        parts.append(name)
        for key, value in record.items():
            parts.append(str(key))
            if hasattr(value, "data") and isinstance(getattr(value, "data"), bytes):
                parts.append(f"{value.dtype} {value.shape}")
                parts.append(value.data.decode("latin-1"))
            else:
                parts.append(repr(value))
    return "\n".join(parts)


def test_nothing_identifying_leaves_the_site(phantoms: Path, tmp_path: Path) -> None:
    site = phantoms / "site-01"
    phi = _phi_strings(site)
    assert phi, "phantoms should carry synthetic PHI in their headers"
    forbidden = phi | {str(phantoms), str(site), str(tmp_path)} | {p.name for p in site.iterdir() if p.is_dir()}
    node = _node(phantoms, tmp_path, site="site-01", **{"max-epsilon": 6.0})
    ctx = context(node, run_config())
    state = initial_state()
    captured = []
    for rnd in (1, 2, 3, 4):  # the ceiling makes a later round decline: that reply is checked too
        reply = train(message("train", state, rnd), ctx)
        captured.append(reply)
        if not reply.has_error():
            state = reply.content["arrays"].to_torch_state_dict()
        captured.append(evaluate(message("evaluate", state, rnd), ctx))
    assert any(r.has_error() for r in captured) and any(not r.has_error() for r in captured)
    text = "\n".join(_serialise(r) for r in captured)
    leaks = sorted(s for s in forbidden if s in text)
    assert not leaks, f"identifying strings in replies: {leaks}"
    for r in captured:
        if not r.has_error() and "metrics" in r.content:
            assert all(isinstance(v, (int, float)) for v in r.content["metrics"].values())


def test_validation_split_is_by_patient_sized_and_salted() -> None:
    from client.holdout import split_site, validation_size

    assert [validation_size(n) for n in (1, 9, 10, 12, 50, 2000)] == [0, 0, 2, 2, 10, 100]

    class Site:  # the two CaseDataset methods the split reads: 30 patients, every third with two studies
        def patient_groups(self) -> list[list[int]]:
            out, i = [], 0
            for p in range(30):
                k = 2 if p % 3 == 0 else 1
                out.append(list(range(i, i + k)))
                i += k
            return out

        def group_key(self, group: list[int]) -> str:
            return f"patient-{group[0]}"

    split = split_site(Site(), b"s" * 32)
    assert len(split.validation_groups) == 6 and len(split.train_groups) == 24
    assert not set(split.train) & set(split.validation)
    assert sorted(split.train + split.validation) == list(range(40))  # every study on exactly one side
    assert split_site(Site(), b"s" * 32) == split  # deterministic for one salt
    assert split_site(Site(), b"t" * 32) != split  # and the salt decides which patients
    assert [len(g) for g in split.train_positions()] == [len(g) for g in split.train_groups]


def test_a_site_that_answers_no_evaluation_trains_on_every_patient(tmp_path: Path) -> None:
    """allow-evaluation = false: nothing to hold out for, so no patient is kept out of training."""
    from client.holdout import split_site

    class Patients:
        def patient_groups(self) -> list[list[int]]:
            return [[i] for i in range(30)]

        def group_key(self, group: tuple[int, ...]) -> str:
            return f"p{group[0]}"

    assert len(split_site(Patients(), b"salt").validation_groups) == 6
    split = split_site(Patients(), b"salt", hold_out=False)
    assert not split.validation_groups and len(split.train) == 30
