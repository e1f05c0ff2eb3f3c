"""What a site reveals beyond DP, attacked (issue 12, section 2): each test plays a curious server (or checks the
server side of a defence) and fails without the defence.

* evaluate replies: a crafted model cannot read a label count; a model or a round is evaluated once; no evaluation
  after the site declined training; evaluation reads only held-out patients, never training ones;
* train replies: counts are bucketed (neighbouring sites send the same counts), no training loss;
* the privacy unit is the patient: a patient with three studies costs the epsilon of one and its whole gradient
  contribution is clipped once;
* the server computes global metrics from the sites' summed statistics.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from client.client_app import evaluate, train
from client.runtime import clear_cache, get_runtime, training_parts
from common import replies
from tests.client_helpers import context, initial_state, make_phantoms, message, run_config

#: metric names of models.metrics: exact per-site values of these are what a curious server reads patients from
EXACT_METRICS = ("accuracy", "recall", "specificity", "f1", "auroc", "dice-", "iou-", "precision-")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One NIfTI site of 12 patients (one study each): large enough to hold 2 patients out for evaluation."""
    torch.set_num_threads(1)
    return make_phantoms(tmp_path_factory.mktemp("reveal"), sites=1, cases=12, fmt="nifti")


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    clear_cache()


def _node(site: Path, tmp_path: Path, **extra: object) -> dict[str, object]:
    return {"data-dir": str(site), "state-dir": str(tmp_path / "state"), **extra}


def _labels(site: Path) -> dict[str, int]:
    with open(site / "labels.csv", newline="") as fh:
        return {row["case_id"]: int(row["label"]) for row in csv.DictReader(fh)}


def _crafted_state() -> dict[str, torch.Tensor]:
    """A model that calls every case malignant with probability ~1 (a label-count probe)."""
    state = initial_state()
    state["classifier.mlp.3.weight"] = torch.zeros_like(state["classifier.mlp.3.weight"])
    state["classifier.mlp.3.bias"] = torch.tensor([-30.0, 30.0])
    return state


def _attacker_count(metrics: dict[str, float]) -> int:
    """The server's best reading of "how many evaluated cases are malignant" under the crafted model."""
    if "accuracy" in metrics:  # every case predicted malignant: accuracy = malignant share
        return round(metrics["accuracy"] * metrics["num-examples"])
    return round(sum(v for k, v in metrics.items() if k.startswith("stat-hist-malignant-")))


# ---------------------------------------------------------------------------------------------------------------
# evaluate replies
# ---------------------------------------------------------------------------------------------------------------
def test_crafted_model_cannot_read_a_label_count_from_evaluate(phantoms: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # seeded noise so the outcome is the same every run (the site draws from the OS entropy)
    if importlib.util.find_spec("client.privacy.release") is not None:
        monkeypatch.setattr("client.privacy.release._SYSTEM", random.Random(20240611))
    site = phantoms / "site-01"
    reply = evaluate(message("evaluate", _crafted_state()), context(_node(site, tmp_path), run_config()))
    assert not reply.has_error(), reply.error
    m = dict(reply.content["metrics"])

    labels = _labels(site)
    malignant_all = sum(labels.values())
    rt, _ = get_runtime(_node(site, tmp_path), run_config())
    held = getattr(getattr(rt, "split", None), "validation", range(len(rt.dataset)))
    malignant_held = sum(labels[rt.dataset.cases[i][1]] for i in held)
    guess = _attacker_count(m)
    assert guess not in (malignant_all, malignant_held), "the crafted model read the site's label count"

    # what is sent instead: no exact metric at all, Gaussian-noised statistics charged to the ledger as the
    # Gaussian mechanism (z, q=1, 1 step) at the site's eval-noise-multiplier
    assert not [k for k in m if k.startswith(EXACT_METRICS)]
    from client.privacy.accountant import PersistentAccountant, epsilon_of

    assert m["eval-noise-multiplier"] == 5.0
    assert PersistentAccountant.load(tmp_path / "state").history == [(5.0, 1.0, 1)]
    assert m["epsilon-round"] == pytest.approx(epsilon_of([(5.0, 1.0, 1)], 1e-5))


def test_noise_is_calibrated_to_the_patient_sensitivity() -> None:
    from client.privacy.release import gaussian_release
    from common.evalstats import SENSITIVITY, STATISTIC_KEYS, site_sums

    # one patient (any number of studies, any values) moves the statistics by at most SENSITIVITY in L2
    rng = np.random.default_rng(0)
    for studies in (1, 3):
        dice, probs = rng.random((studies, 4)), rng.random(studies)
        one = site_sums(np.ones((studies, 4)), np.full(studies, 0.99), np.ones(studies, dtype=int), [list(range(studies))])
        assert np.linalg.norm(one) == pytest.approx(SENSITIVITY)  # the worst case is attained
        other = site_sums(dice, probs, rng.integers(0, 2, studies), [list(range(studies))])
        assert np.linalg.norm(other) <= SENSITIVITY + 1e-12
    noisy = gaussian_release(np.zeros((4000, len(STATISTIC_KEYS))), noise_multiplier=5.0, sensitivity=SENSITIVITY,
                             rng=random.Random(1))
    assert noisy.std() == pytest.approx(5.0 * SENSITIVITY, rel=0.02)


def test_a_model_and_a_round_are_evaluated_once(phantoms: Path, tmp_path: Path) -> None:
    node, rc = _node(phantoms / "site-01", tmp_path), run_config()
    a, b = initial_state(0), initial_state(1)
    assert not evaluate(message("evaluate", a, 1), context(node, rc)).has_error()
    clear_cache()  # a deployed site answers every message in a fresh process: the limit must be on disk
    for state, rnd in ((a, 2), (b, 1)):  # the same model in another round, another model in the same round
        again = evaluate(message("evaluate", state, rnd), context(node, rc))
        assert again.has_error() and again.error.code == replies.REFUSED_EVALUATION, (rnd, again)
    assert not evaluate(message("evaluate", b, 2), context(node, rc)).has_error()


def test_no_evaluation_after_the_site_declined_training(phantoms: Path, tmp_path: Path) -> None:
    # one training round costs ~4.5 epsilon here, one evaluation ~0.8: the ceiling stops training only
    node, rc = _node(phantoms / "site-01", tmp_path, **{"max-epsilon": 2.0}), run_config()
    declined = train(message("train", initial_state()), context(node, rc))
    assert declined.has_error() and declined.error.code == replies.DECLINED_BUDGET
    clear_cache()
    reply = evaluate(message("evaluate", initial_state()), context(node, rc))
    assert reply.has_error() and reply.error.code == replies.REFUSED_EVALUATION
    assert "declined training" in reply.error.reason


def test_evaluation_reads_only_held_out_patients(phantoms: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from common.data.dataset import CaseDataset

    read: dict[str, set[str]] = {"train": set(), "evaluate": set()}
    phase = {"now": ""}
    original = CaseDataset.__getitem__

    def recording(self: CaseDataset, index: int) -> dict:
        item = original(self, index)
        if phase["now"]:
            read[phase["now"]].add(item["case_id"])
        return item

    monkeypatch.setattr(CaseDataset, "__getitem__", recording)
    node, rc = _node(phantoms / "site-01", tmp_path), run_config(**{"local-epochs": 3})
    phase["now"] = "train"
    assert not train(message("train", initial_state()), context(node, rc)).has_error()
    phase["now"] = "evaluate"
    assert not evaluate(message("evaluate", initial_state()), context(node, rc)).has_error()
    phase["now"] = ""
    assert read["evaluate"] and read["train"]
    assert not read["evaluate"] & read["train"], "evaluation read cases the site trains on"
    assert len(read["evaluate"]) == 2  # 20 % of 12 patients

    # the split is the same in a fresh process (same state directory, same salt)
    rt, _ = get_runtime(node, rc)
    before = rt.split
    clear_cache()
    assert get_runtime(node, rc)[0].split == before


def test_a_site_may_refuse_all_evaluation(phantoms: Path, tmp_path: Path) -> None:
    node = _node(phantoms / "site-01", tmp_path, **{"allow-evaluation": False})
    reply = evaluate(message("evaluate", initial_state()), context(node, run_config()))
    assert reply.has_error() and reply.error.code == replies.REFUSED_EVALUATION


# ---------------------------------------------------------------------------------------------------------------
# train replies
# ---------------------------------------------------------------------------------------------------------------
def _without_one_patient(site: Path, out: Path) -> Path:
    """A copy of ``site`` minus its last patient: the neighbouring data set of add/remove DP."""
    shutil.copytree(site, out)
    rows = list(csv.DictReader(open(out / "labels.csv", newline="")))
    gone = rows[-1]["case_id"]
    shutil.rmtree(out / gone)
    with open(out / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["case_id", "label"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(r for r in rows if r["case_id"] != gone)
    return out


def test_train_replies_of_neighbouring_sites_carry_the_same_counts(phantoms: Path, tmp_path: Path) -> None:
    full = phantoms / "site-01"
    smaller = _without_one_patient(full, tmp_path / "site-02")
    sent = []
    for site in (full, smaller):
        clear_cache()
        reply = train(message("train", initial_state()), context(_node(site, tmp_path / site.name), run_config()))
        assert not reply.has_error(), reply.error
        sent.append(dict(reply.content["metrics"]))
    counts = [{k: v for k, v in m.items() if k == "num-examples" or k.startswith("cases-")} for m in sent]
    assert counts[0] == counts[1], "the case counts tell the server that a patient left"
    assert all(v % 10 == 0 for v in counts[0].values())  # multiples of the default count-granularity
    assert not [k for m in sent for k in m if "loss" in k]  # an exact mean loss over the cases is not DP


# ---------------------------------------------------------------------------------------------------------------
# the patient is the privacy unit
# ---------------------------------------------------------------------------------------------------------------
def _copy_case(src: Path, dst: Path) -> None:
    """Copy a NIfTI case folder under a new case id (file names carry the case id)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy(f, dst / f.name.replace(src.name, dst.name))


def _site(phantoms: Path, out: Path, patients: dict[str, str]) -> Path:
    """A site of ``{case id: patient id}`` whose studies all copy the phantom site's first case (label 1)."""
    src = phantoms / "site-01" / "case-0004"  # a malignant case
    for case in patients:
        _copy_case(src, out / case)
    with open(out / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["case_id", "label", "patient_id"])
        writer.writerows((case, 1, pid) for case, pid in patients.items())
    return out


def test_a_patient_with_three_studies_costs_the_epsilon_of_one(phantoms: Path, tmp_path: Path) -> None:
    three = _site(phantoms, tmp_path / "site-31",
                  {"case-a": "P1", "case-b": "P1", "case-c": "P1", "case-d": "P2", "case-e": "P3", "case-f": "P4"})
    one = _site(phantoms, tmp_path / "site-32", {"case-a": "P1", "case-d": "P2", "case-e": "P3", "case-f": "P4"})
    eps = []
    for site in (three, one):
        clear_cache()
        reply = train(message("train", initial_state()), context(_node(site, tmp_path / site.name), run_config()))
        assert not reply.has_error(), reply.error
        eps.append(dict(reply.content["metrics"])["epsilon-total"])
    assert eps[0] == pytest.approx(eps[1], rel=1e-12), "the patient with three studies cost more epsilon"


def test_a_patient_with_three_studies_is_clipped_once(phantoms: Path, tmp_path: Path) -> None:
    """The attacker's view of one DP-SGD step: the patient's whole contribution to the summed gradient (before
    noise) is at most the clipping norm C, not 3 C."""
    clip = 1e-3
    site = _site(phantoms, tmp_path / "site-33",
                 {"case-a": "P1", "case-b": "P1", "case-c": "P1", "case-d": "P2", "case-e": "P3", "case-f": "P4"})
    node, rc = _node(site, tmp_path), run_config(**{"dp-max-grad-norm": clip})
    rt, policy = get_runtime(node, rc)
    module, loader, optimizer, loss_fn = training_parts(rt, policy)
    train_idx = list(getattr(getattr(rt, "split", None), "train", range(len(rt.dataset))))
    case_ids = [rt.dataset.cases[i][1] for i in train_idx]
    target = {case_ids.index(c) for c in ("case-a", "case-b", "case-c")}
    torch.manual_seed(0)
    batch_indices = None
    for _ in range(2000):  # Poisson batches until one holds exactly the patient's three studies
        batch_indices = next((ix for ix in loader.batch_sampler if set(ix) == target), None)
        if batch_indices is not None:
            break
    assert batch_indices is not None
    from torch.utils.data import default_collate

    batch = default_collate([loader.dataset[i] for i in batch_indices])
    module.train()
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(*module(batch["image"], batch["mask"].float()), batch["seg"], batch["label"])[0]
    loss.backward()
    optimizer.clip_and_accumulate()
    total = math.sqrt(sum(float(p.summed_grad.pow(2).sum()) for p in optimizer.params))
    assert 0.5 * clip < total <= clip * (1 + 1e-4), f"patient contributes {total / clip:.2f} C"


def test_dicom_studies_of_one_patient_are_grouped_under_a_salted_key(tmp_path: Path) -> None:
    import pydicom

    from common.data.dataset import CaseDataset
    from tests.readers_helpers import make_seg, make_volume, simple_affine, write_site

    shape = (4, 8, 8)
    cases = {c: {"t1": make_volume(shape, seed=i)} for i, c in enumerate(("c1", "c2", "c3"))}
    site = write_site(tmp_path / "site", cases, {c: 1 for c in cases}, simple_affine(),
                      seg={c: make_seg(shape) for c in cases})  # the writer stamps PatientID PID-4711 everywhere
    for f in (site / "c3").rglob("*.dcm"):  # c3 belongs to another patient
        ds = pydicom.dcmread(f)
        ds.PatientID = "OTHER-0815"
        ds.save_as(f)
    salted = CaseDataset([site], ("t1",), shape, patient_salt=b"a" * 32)
    assert salted.patient_groups() == [[0, 1], [2]]
    keys = {salted.group_key(g) for g in salted.patient_groups()}
    assert not any("PID-4711" in k or "OTHER-0815" in k for k in keys)
    other = CaseDataset([site], ("t1",), shape, patient_salt=b"b" * 32)
    assert other.patient_groups() == [[0, 1], [2]]
    assert not keys & {other.group_key(g) for g in other.patient_groups()}  # the key depends on the site's salt


# ---------------------------------------------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------------------------------------------
def test_server_computes_global_dice_from_summed_statistics() -> None:
    from flwr.app import MessageType

    from server.settings import ServerSettings
    from server.strategy import build_strategy
    from tests.server_stubs import eval_metrics, reply, set_task_identity

    set_task_identity()
    strategy = build_strategy(ServerSettings.from_run_config({}))
    sites = [reply(1, None, eval_metrics(3, 0.2, **{"site-index": 1.0}), MessageType.EVALUATE),
             reply(2, None, eval_metrics(1, 0.6, **{"site-index": 2.0}), MessageType.EVALUATE),
             # exact metrics without statistics (an old or dishonest site) are not averaged in
             reply(3, None, {"num-examples": 50.0, "dice-whole": 0.99}, MessageType.EVALUATE)]
    out = strategy.aggregate_evaluate(1, sites)
    assert out is not None
    assert out["dice-whole"] == pytest.approx((3 * 0.2 + 1 * 0.6) / 4)
    assert out["cases"] == pytest.approx(4.0) and out["sites"] == 2.0
    assert out["specificity"] == pytest.approx(1.0)  # every stub case is benign at probability 0.3
