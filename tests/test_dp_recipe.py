"""The DP recipe at the site: trainable sets (frozen parts untouched and unsent), augmentation multiplicity (per-case
gradient = mean of its views' gradients, before clipping), the optimizers and their state across rounds, and the PRV
accountant on the same ledger."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from client.client_app import train
from client.privacy.accountant import PersistentAccountant, epsilon_of
from client.privacy.engine import CasesOnly, make_private
from client.privacy.multiplicity import MultiViewLoader, augment_batch, average_views, install_view_averaging
from client.privacy.optimizers import AdamBC, STATE_DIR, load_state, read_state, save_state
from client.runtime import clear_cache
from models.losses import MultiTaskLoss
from models.network import build_model
from models.trainable import freeze_untrained, is_trained, trained_names
from tests.client_helpers import TINY, context, initial_state, make_phantoms, message, run_config


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return make_phantoms(tmp_path_factory.mktemp("phantoms"), sites=1, cases=4, scenario="iid")


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    clear_cache()


def _node(phantoms: Path, tmp_path: Path) -> dict[str, object]:
    return {"data-dir": str(phantoms / "site-01"), "state-dir": str(tmp_path / "state")}


def test_trainable_sets_are_defined_by_ownership_names() -> None:
    names = list(build_model(TINY).state_dict())
    shared, head = trained_names(names, "shared"), trained_names(names, "head")
    assert trained_names(names, "all") == names
    assert shared and not any(n.startswith("encoders.") or ".embeddings." in n for n in shared)
    assert any(n.startswith("decoder.blocks.") for n in shared) and any(n.startswith("fusion.levels.") for n in shared)
    assert head and all(n.startswith(("decoder.head.", "classifier.")) for n in head)
    # the classifier's per-modality embeddings belong to their modality; the rest of the head is shared
    assert {n for n in head if ".modalities." not in n} < set(shared)
    assert is_trained("_module.classifier.fc.weight", "head")  # Opacus's wrapper prefix is ignored
    with pytest.raises(ValueError, match="choose one of all, shared, head"):
        is_trained("classifier.fc.weight", "encoders")


def test_a_trainable_set_can_add_modalities() -> None:
    """head+ct+us: the heads and everything ct and us own (what MRI-only public pretraining could not train)."""
    from models.modalities import owner_modality

    names = list(build_model(TINY).state_dict())
    plus = trained_names(names, "head+ct+us")
    owned = [n for n in names if owner_modality(n) in ("ct", "us")]
    assert owned and set(plus) == set(trained_names(names, "head")) | set(owned)
    assert not any(owner_modality(n) in ("t1", "t1ce", "t2", "flair") for n in plus if n.startswith("encoders."))
    assert set(trained_names(names, "shared+us")) == set(trained_names(names, "shared")) | {
        n for n in names if owner_modality(n) == "us"}
    assert set(trained_names(names, "none+ct+us")) == set(owned)  # what they own, and nothing else
    for bad, why in (("head+xray", "unknown modalities 'xray'"), ("head+ct+ct", "twice"), ("all+ct", "already"),
                     ("heads+ct", "choose one of"), ("none", "trains nothing")):
        with pytest.raises(ValueError, match=why):
            is_trained("classifier.fc.weight", bad)
    from common.runconfig import RunConfigError, load

    with pytest.raises(RunConfigError, match="dp-trainable"):
        load({"dp-trainable": "head+xray"})
    assert load({"dp-trainable": "head+ct+us"})["dp-trainable"] == "head+ct+us"


def test_a_site_without_the_modalities_a_set_trains_declines_and_spends_nothing(tmp_path: Path) -> None:
    """none+ct+us at a site without CT or ultrasound: nothing to train there. The site declines (no-usable-data,
    not a failure), its ledger stays empty, and the planner says so instead of a verdict."""
    from client.privacy.planner import NOTHING_TO_TRAIN, plan
    from common import replies
    from simulations.phantom_writers import generate

    generate(tmp_path / "mri", sites=1, cases_per_site=4, seed=3, scenario="iid", shape=(16, 32, 32), fmt="nifti",
             heldout_cases=0, modalities=["t1", "t2"])
    node = {"data-dir": str(tmp_path / "mri" / "site-01"), "state-dir": str(tmp_path / "state")}
    reply = train(message("train", initial_state()), context(node, run_config(**{"dp-trainable": "none+ct+us"})))
    assert reply.has_error() and reply.error.code == replies.NO_USABLE_DATA
    assert "nothing to train" in reply.error.reason and "t1, t2" in reply.error.reason
    ledger = PersistentAccountant.load(tmp_path / "state")  # nothing reserved, nothing spent
    assert not ledger.history and not ledger.reserved
    planned = plan(run_config(**{"dp-trainable": "none+ct+us"}), patients=20, site_modalities=["t1", "t2"])
    assert planned.verdict == NOTHING_TO_TRAIN and planned.dimension == 0
    assert plan(run_config(**{"dp-trainable": "none+ct+us"}), patients=20).dimension > 0  # a site with them trains


@pytest.mark.parametrize("which", ["shared", "head", "head+t2", "none+t2"])
def test_frozen_parts_are_bit_identical_after_a_dp_round_and_absent_from_the_reply(
        phantoms: Path, tmp_path: Path, which: str) -> None:
    state = initial_state()
    reply = train(message("train", state), context(_node(phantoms, tmp_path), run_config(**{"dp-trainable": which})))
    assert not reply.has_error(), reply.error
    sent = reply.content["arrays"].to_torch_state_dict()
    assert sorted(sent) == sorted(trained_names(state, which))  # only the trainable set leaves the site
    assert any(not torch.equal(sent[k], state[k]) for k in sent)  # ... and it was trained
    # the site's own copy of the frozen parts is bit-identical to what it received (not noised, not stepped)
    from client.runtime import _RUNTIMES

    (rt,) = _RUNTIMES.values()
    own = rt.model.state_dict()
    frozen = [k for k in state if not is_trained(k, which)]
    assert frozen and all(torch.equal(own[k], state[k]) for k in frozen)
    assert all(not p.requires_grad for n, p in rt.model.named_parameters() if not is_trained(n, which))


def _batch(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    m = len(TINY.modalities)
    mask = torch.ones(n, m)
    mask[0, 1] = 0.0
    return {"image": torch.randn(n, m, *TINY.spatial_size, generator=g), "mask": mask,
            "seg": torch.randint(0, 4, (n, *TINY.spatial_size), generator=g), "label": torch.tensor([0, 1, 1][:n])}


def test_augmentations_keep_shapes_flip_seg_with_image_and_zero_missing_channels() -> None:
    b = _batch(3)
    image, seg = augment_batch(b["image"], b["mask"], b["seg"], torch.Generator().manual_seed(1))
    assert image.shape == b["image"].shape and seg.shape == b["seg"].shape
    assert torch.count_nonzero(image[0, 1]) == 0  # a missing channel stays exactly zero
    assert not torch.equal(image, b["image"] * b["mask"][:, :, None, None, None])
    assert sorted(seg.flatten().tolist()) == sorted(b["seg"].flatten().tolist())  # flips only permute labels


def test_multiplicity_gives_each_case_the_mean_of_its_single_view_gradients() -> None:
    """Opacus's per-row gradients of the K x expanded batch, averaged per case by average_views, equal the mean of
    the K single-view gradients computed by hand with plain autograd."""
    torch.manual_seed(0)
    model = build_model(TINY.replace(dropout=0.0))  # a deterministic forward for the comparison
    reference = copy.deepcopy(model)  # the same weights without Opacus's hooks
    loss_fn = MultiTaskLoss()
    cases = [{k: v[i] for k, v in _batch(2).items()} for i in range(2)]
    loader = torch.utils.data.DataLoader(cases, batch_size=2)
    parts = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, loss_fn, noise_multiplier=1.0,
                         max_grad_norm=1.0)
    k = 3
    views = MultiViewLoader([_batch(2)], k, torch.Generator().manual_seed(5))
    (expanded,) = list(views)
    assert expanded["image"].shape[0] == 2 * k and views.case_of_row.tolist() == [0, 0, 0, 1, 1, 1]
    seg_logits, cls_logits = parts.module(expanded["image"], expanded["mask"])
    loss_fn(seg_logits, cls_logits, expanded["seg"], expanded["label"])[0].backward()
    params = [p for p in model.parameters() if p.requires_grad]
    average_views(params, views.case_of_row, k)

    by_hand: list[list[torch.Tensor]] = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    for row in range(2 * k):
        case = row // k
        seg_l, cls_l = reference(expanded["image"][row:row + 1], expanded["mask"][row:row + 1])
        total, _ = loss_fn(seg_l, cls_l, expanded["seg"][row:row + 1], expanded["label"][row:row + 1])
        own = [p for p in reference.parameters() if p.requires_grad]
        for acc, grad in zip(by_hand[case], torch.autograd.grad(total, own, allow_unused=True)):
            if grad is not None:
                acc += grad / k
    for i, p in enumerate(params):
        assert p.grad_sample.shape[0] == 2
        for case in range(2):
            torch.testing.assert_close(p.grad_sample[case], by_hand[case][i], rtol=1e-4, atol=1e-6)


def test_view_averaging_runs_before_the_clip() -> None:
    calls: list[str] = []

    class Opt:
        params: list[torch.Tensor] = []

        def clip_and_accumulate(self) -> None:
            calls.append("clip")

    opt, views = Opt(), MultiViewLoader([], 2)
    p = torch.zeros(3, requires_grad=True)
    p.grad_sample = torch.tensor([[1.0, 1, 1], [3, 3, 3], [5, 5, 5], [7, 7, 7]])  # type: ignore[attr-defined]
    opt.params = [p]
    views.case_of_row = torch.tensor([0, 0, 1, 1])
    install_view_averaging(opt, views)
    opt.clip_and_accumulate()
    assert calls == ["clip"] and p.grad_sample.tolist() == [[2, 2, 2], [6, 6, 6]]  # type: ignore[attr-defined]


def _saved_state(path: Path) -> dict[int, dict[str, object]]:
    """The per-parameter optimizer state a site saved (for the parameter names it saved it under)."""
    state = read_state(path, "sgd", torch.load(path, weights_only=True)["names"])
    assert state is not None
    return state


def test_site_trains_with_multiplicity_sgd_and_kept_optimizer_state(phantoms: Path, tmp_path: Path) -> None:
    rc = run_config(**{"augment-multiplicity": 2, "optimizer": "sgd", "optimizer-state": "keep"})
    node = _node(phantoms, tmp_path)
    first = train(message("train", initial_state(), 1), context(node, rc))
    assert not first.has_error(), first.error
    saved = list((tmp_path / "state" / STATE_DIR).glob("*.pt"))
    assert len(saved) == 1
    before = _saved_state(saved[0])
    assert before and all("momentum_buffer" in s for s in before.values())
    clear_cache()  # a deployed site's next message is a new process: the state comes from disk
    second = train(message("train", first.content["arrays"].to_torch_state_dict(), 2), context(node, rc))
    assert not second.has_error(), second.error
    after = _saved_state(saved[0])
    assert any(not torch.equal(after[i]["momentum_buffer"], before[i]["momentum_buffer"]) for i in before)


def test_adam_bc_is_adam_without_noise_and_takes_the_noise_variance_out() -> None:
    torch.manual_seed(0)
    w1, w2 = torch.nn.Parameter(torch.randn(5)), None
    w2 = torch.nn.Parameter(w1.detach().clone())
    adam, bc = torch.optim.Adam([w1], lr=0.01), AdamBC([w2], lr=0.01, gamma=1e-30)
    for _ in range(3):
        g = torch.randn(5)
        w1.grad, w2.grad = g.clone(), g.clone()
        adam.step()
        bc.step()
    torch.testing.assert_close(w1, w2)
    # one step by hand with noise variance phi: v^ = max(g^2 - phi, gamma, phi * sqrt(2 / 1)) (one sample's worth)
    w = torch.nn.Parameter(torch.zeros(2))
    opt = AdamBC([w], lr=0.1, gamma=1e-4, noise_var=0.5)
    w.grad = torch.tensor([2.0, 0.1])
    opt.step()
    expected = -0.1 * w.grad / (torch.tensor([4.0 - 0.5, 0.5 * 2 ** 0.5]).sqrt() + 1e-8)
    torch.testing.assert_close(w.detach(), expected)


def test_adam_bc_does_not_blow_up_on_pure_noise_over_a_federated_run_of_steps() -> None:
    """Gradients of pure DP noise (the regime of a pretrained start: signal far below sigma*C/B) for 30 steps: with
    the paper's floor gamma alone, corrected moments that fall below it step by lr*m/sqrt(gamma) (measured
    17-97x the model's norm in a run); the standard-error floor keeps every coordinate within about lr per step,
    as DP-Adam would."""
    torch.manual_seed(0)
    phi, lr, steps = 0.04, 0.01, 30
    w = torch.nn.Parameter(torch.zeros(20000))
    opt = AdamBC([w], lr=lr, noise_var=phi)
    for _ in range(steps):
        w.grad = torch.randn(w.shape) * phi ** 0.5
        opt.step()
    assert w.detach().abs().max() <= 1.5 * lr * steps
    assert w.detach().norm() <= lr * steps * w.numel() ** 0.5  # as if every coordinate went lr every step


def test_optimizer_state_refuses_another_parameter_set(tmp_path: Path) -> None:
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    w.grad = torch.ones(3)
    opt.step()
    path = tmp_path / "s.pt"
    save_state(path, opt, "sgd", ["w"])
    fresh = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    assert not load_state(path, fresh, "sgd", ["other"]) and not fresh.state
    assert load_state(path, fresh, "sgd", ["w"]) and torch.equal(fresh.state[w]["momentum_buffer"], torch.ones(3))


def test_optimizer_state_round_trips_flat_and_refuses_damaged_or_old_files(tmp_path: Path) -> None:
    """Adam's moments and step counts come back exactly from the flat layout; a truncated slot, an entry naming no
    slot and a version-1 file (one tensor per parameter) each leave the optimizer fresh instead of half-loaded."""
    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(2, 3)), torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(()))]
    opt = torch.optim.Adam(ws, lr=0.01)
    for _ in range(3):
        for w in ws:
            w.grad = torch.randn_like(w)
        opt.step()
    path, names = tmp_path / "s.pt", ["a", "b", "c"]
    save_state(path, opt, "adam", names)
    fresh = torch.optim.Adam(ws, lr=0.01)
    assert load_state(path, fresh, "adam", names)
    for w in ws:
        assert set(fresh.state[w]) == set(opt.state[w])
        for key, value in opt.state[w].items():
            assert torch.equal(fresh.state[w][key], value) and fresh.state[w][key].shape == value.shape
    payload = torch.load(path, weights_only=True)
    assert len(payload["slots"]) <= 3  # step, exp_avg, exp_avg_sq: one flat tensor each, not one per parameter

    damaged = copy.deepcopy(payload)
    slot = next(k for k in damaged["slots"] if k.startswith("exp_avg_sq"))
    damaged["slots"][slot] = damaged["slots"][slot][:-1]
    foreign = copy.deepcopy(payload)
    entries = json.loads(foreign["entries"])
    entries[0][2] = "nowhere/float32"
    foreign["entries"] = json.dumps(entries)
    old = {"format": "fedfusion-optimizer-state/1", "optimizer": "adam", "names": names,
           "state": opt.state_dict()["state"]}
    for bad in (damaged, foreign, old):
        torch.save(bad, path)
        fresh = torch.optim.Adam(ws, lr=0.01)
        assert not load_state(path, fresh, "adam", names) and not fresh.state


def test_a_site_keeps_only_its_most_recent_optimizer_states(tmp_path: Path) -> None:
    """A long-lived site takes part in run after run: old runs' states are pruned, the newest ones stay."""
    import os

    from client.privacy.optimizers import KEEP_STATES, state_file

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    paths = [state_file(tmp_path, f"run-{i}", "sgd", ["w"]) for i in range(KEEP_STATES + 3)]
    for i, path in enumerate(paths):
        save_state(path, opt, "sgd", ["w"])
        os.utime(path, (1_000_000 + i, 1_000_000 + i))  # distinct write times, whatever the clock's resolution
    left = sorted(p.name for p in (tmp_path / "optimizer-state").glob("*.pt"))
    assert left == sorted(p.name for p in paths[-KEEP_STATES:])


def test_prv_reads_the_same_ledger_tighter(tmp_path: Path) -> None:
    ledger = PersistentAccountant.load(tmp_path)
    ledger.record(1.95, 0.5, 30, 1e-5)  # the demo's per-site plan for RDP epsilon 8
    ledger.record(5.0, 1.0, 1, 1e-5, training=False)  # one evaluation release
    rdp, prv = ledger.epsilon(1e-5, "rdp"), ledger.epsilon(1e-5, "prv")
    reference_rdp, reference_prv = RDPAccountant(), PRVAccountant()
    reference_rdp.history = reference_prv.history = list(ledger.history)
    assert rdp == pytest.approx(reference_rdp.get_epsilon(delta=1e-5))
    assert prv == pytest.approx(reference_prv.get_epsilon(delta=1e-5, eps_error=0.01))
    assert prv < rdp
    with pytest.raises(ValueError, match="choose one of rdp, prv"):
        epsilon_of(ledger.history, 1e-5, "pld")


def test_the_base_part_of_a_trainable_set_can_learn_slower_than_its_added_modalities(
        phantoms: Path, tmp_path: Path) -> None:
    """lr-base-scale: with head+ct, the heads (what a pretrained start already learnt) step at a fraction of the
    rate the CT parameters (new to the start) step at; 1 keeps one rate and one parameter group."""
    from models.modalities import owner_modality
    from models.schedule import LRSchedule
    from models.trainable import parameter_groups

    model = build_model(TINY)
    freeze_untrained(model, "head+ct")
    one, two = parameter_groups(model, "head+ct"), parameter_groups(model, "head+ct", 0.1)
    assert len(one) == 1 and [g["lr_scale"] for g in two] == [1.0, 0.1]
    plain = build_model(TINY)
    freeze_untrained(plain, "head")  # nothing added: nothing to set the heads against, one rate
    assert [g["lr_scale"] for g in parameter_groups(plain, "head", 0.1)] == [1.0]
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(owner_modality(names[id(p)]) == "ct" for p in two[0]["params"])
    assert all(owner_modality(names[id(p)]) != "ct" for p in two[1]["params"])
    opt = torch.optim.Adam(two, lr=1.0)
    LRSchedule(0.01, 10, "constant", warmup_steps=0).apply(opt, 3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.001])
    with pytest.raises(ValueError, match="lr-base-scale"):
        parameter_groups(model, "head+ct", 0.0)
    from common.runconfig import RunConfigError, load

    for bad in (0, 1.5):
        with pytest.raises(RunConfigError, match="lr-base-scale"):
            load({"lr-base-scale": bad})

    # at the site (no DP, Adam: each coordinate moves by about the rate, whatever its gradient's scale)
    def moved(scale: float) -> tuple[float, float]:
        clear_cache()
        state = initial_state()
        node = {"data-dir": str(phantoms / "site-01"), "state-dir": str(tmp_path / f"state-{scale}"),
                "allow-no-dp": True}
        rc = run_config(**{"dp-enabled": False, "dp-trainable": "head+ct", "lr-base-scale": scale,
                           "lr-schedule": "constant", "lr-warmup": 0.0})
        reply = train(message("train", state), context(node, rc))
        assert not reply.has_error(), reply.error
        sent = reply.content["arrays"].to_torch_state_dict()
        step = {k: (sent[k] - state[k]).abs().mean().item() for k in sent if sent[k].is_floating_point()}
        heads = [v for k, v in step.items() if owner_modality(k) != "ct"]
        ct = [v for k, v in step.items() if owner_modality(k) == "ct"]
        return sum(heads) / len(heads), sum(ct) / len(ct)

    (heads_1, ct_1), (heads_s, ct_s) = moved(1.0), moved(0.01)
    assert heads_s < 0.05 * heads_1  # the heads step about 100x less ...
    assert ct_s > 0.5 * ct_1  # ... the CT parameters about as much


def test_the_single_modality_view_is_the_last_view_of_each_case_drawn_among_the_added_modalities() -> None:
    from models.training import single_modality_views

    # 3 cases x 2 views over (t1, ct, us): the first case holds t1 and ct, the second t1 only, the third all three
    per_case = torch.tensor([[1.0, 1, 0], [1, 0, 0], [1, 1, 1]])
    mask = per_case.repeat_interleave(2, dim=0)
    prefer = torch.tensor([0.0, 1, 1])  # e.g. head+ct+us: the encoders of ct and us train, t1's is frozen
    seen: set[tuple[float, ...]] = set()
    for seed in range(40):
        out = single_modality_views(mask, 2, prefer, torch.Generator().manual_seed(seed))
        assert torch.equal(out[0::2], per_case)  # the other views keep the case's modalities
        last = out[1::2]
        assert torch.equal(last.sum(dim=1), torch.ones(3)) and bool((last <= per_case).all())
        assert last[0].tolist() == [0, 1, 0] and last[1].tolist() == [1, 0, 0]  # ct preferred; t1 the only one
        assert last[2, 0] == 0  # ct or us, never the frozen t1
        seen.add(tuple(last[2].tolist()))
    assert seen == {(0.0, 1.0, 0.0), (0.0, 0.0, 1.0)}
    uniform = single_modality_views(mask, 2, None, torch.Generator().manual_seed(0))
    assert torch.equal(uniform[1::2].sum(dim=1), torch.ones(3))
    with pytest.raises(ValueError, match="augment-multiplicity"):
        single_modality_views(mask, 1)


def test_a_dp_site_trains_a_single_modality_view_when_the_model_has_the_term(phantoms: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import models.training as training

    calls: list[tuple[int, torch.Tensor | None, torch.Tensor]] = []
    original = training.single_modality_views

    def spy(mask: torch.Tensor, views: int, prefer: torch.Tensor | None = None,
            generator: torch.Generator | None = None) -> torch.Tensor:
        out = original(mask, views, prefer, generator)
        calls.append((views, prefer, out))
        return out

    monkeypatch.setattr(training, "single_modality_views", spy)
    node = _node(phantoms, tmp_path)
    assert TINY.single_modality_loss > 0
    for weight, expected in ((0.0, 0), (TINY.single_modality_loss, 1)):
        calls.clear()
        clear_cache()
        # a batch as large as the site (sampling rate 1): Poisson sampling then never draws an empty batch, which
        # trains nothing and would leave the view unused by chance
        rc = run_config(**{"augment-multiplicity": 2, "dp-trainable": "head+ct", "model-single-modality-loss": weight,
                           "batch-size": 64})
        reply = train(message("train", initial_state(), 1), context(node, rc))
        assert not reply.has_error(), reply.error
        assert (len(calls) > 0) == bool(expected)
    views, prefer, out = calls[0]
    assert views == 2 and prefer is not None
    assert prefer.tolist() == [float(m == "ct") for m in TINY.modalities]
    assert torch.equal(out[1::2].sum(dim=1), torch.ones(out.shape[0] // 2))
