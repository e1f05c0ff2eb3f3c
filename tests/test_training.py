"""The shared training loop and the per-subset evaluation, with tiny stand-in networks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from models.evaluation import evaluate_subsets, monotonicity, predict
from models.losses import MultiTaskLoss
from models.modalities import subset_name, subsets
from models.schedule import LRSchedule
from models.training import ProximalTerm, make_optimizer, resolve_device, train_epoch
from common.runconfig import default_model_config

torch.set_num_threads(1)

MODS = ("t1", "ct", "us")
SHAPE = (4, 8, 8)


class TinyNet(nn.Module):
    """Stand-in with FusionNet's forward signature: 1x1 conv segmentation + pooled linear classifier."""

    def __init__(self, m: int = len(MODS), c_seg: int = 4) -> None:
        super().__init__()
        self.config = default_model_config(family="input", modalities=MODS, spatial_size=(8, 16, 16), channels=(4, 8))
        self.seg = nn.Conv3d(m, c_seg, 1)
        self.cls = nn.Linear(m, 2)
        self.seen: list[tuple[Tensor, Tensor]] = []

    def forward(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        self.seen.append((image.detach().clone(), mask.detach().clone()))
        return self.seg(image), self.cls(image.mean(dim=(2, 3, 4)) * mask)


def _cases(n: int = 6, seed: int = 0) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        seg = torch.zeros(SHAPE, dtype=torch.long)
        seg[1:3, 2:6, 2:6] = 1
        image = torch.randn((len(MODS), *SHAPE), generator=g) + 2.0 * (seg > 0).float()
        items.append({"image": image, "mask": torch.ones(len(MODS)), "seg": seg, "label": torch.tensor(i % 2)})
    return items


def _dict_batches(items: list[dict[str, Tensor]], b: int = 2) -> list[dict[str, Tensor]]:
    return [{k: torch.stack([it[k] for it in items[i : i + b]]) for k in items[0]} for i in range(0, len(items), b)]


def test_train_epoch_dict_batches_learns() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    opt = make_optimizer(model, 0.05)
    batches = _dict_batches(_cases())
    first = train_epoch(model, batches, opt, MultiTaskLoss(), "cpu")
    for _ in range(10):
        last = train_epoch(model, batches, opt, MultiTaskLoss(), "cpu")
    assert first["num-examples"] == 6 and first["steps"] == 3
    assert last["loss"] < first["loss"]
    assert math.isfinite(last["loss-seg"]) and math.isfinite(last["loss-cls"])


def test_train_epoch_tuple_and_empty_batches() -> None:
    model = TinyNet()
    opt = make_optimizer(model, 0.01, kind="sgd")
    d = _dict_batches(_cases(4))
    tuples = [(b["image"], b["mask"], b["seg"], b["label"]) for b in d]
    empty = (torch.zeros((0, len(MODS), *SHAPE)), torch.zeros((0, len(MODS))), torch.zeros((0, *SHAPE),
             dtype=torch.long), torch.zeros((0,), dtype=torch.long))
    before = [p.detach().clone() for p in model.parameters()]
    out = train_epoch(model, [empty, tuples[0], empty, list(tuples[1])], opt, MultiTaskLoss(), "cpu")
    assert out["num-examples"] == 4 and out["steps"] == 2 and out["empty-batches"] == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    only_empty = train_epoch(model, [empty], opt, MultiTaskLoss(), "cpu")
    assert only_empty["num-examples"] == 0 and math.isnan(only_empty["loss"])


def test_train_epoch_max_batches_and_bad_batch() -> None:
    model = TinyNet()
    opt = make_optimizer(model, 0.01)
    out = train_epoch(model, _dict_batches(_cases()), opt, MultiTaskLoss(), "cpu", max_batches=1)
    assert out["num-examples"] == 2
    with pytest.raises(ValueError, match="batch dict lacks"):
        train_epoch(model, [{"image": torch.zeros(1)}], opt, MultiTaskLoss(), "cpu")


def test_modality_dropout_zeroes_dropped_channels() -> None:
    model = TinyNet()
    opt = make_optimizer(model, 0.01)
    g = torch.Generator().manual_seed(1)
    train_epoch(model, _dict_batches(_cases(6), b=6), opt, MultiTaskLoss(), "cpu", modality_dropout=0.6,
                generator=g)
    image, mask = model.seen[-1]
    assert (mask == 0).any(), "with p=0.6 over 18 draws some modality is dropped"
    assert (mask.sum(dim=1) >= 1).all()
    for b, m in zip(*torch.nonzero(mask == 0, as_tuple=True)):
        assert torch.count_nonzero(image[b, m]) == 0


def test_proximal_gradient_is_mu_times_difference() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    w0 = {k: v + torch.randn_like(v) for k, v in model.state_dict().items()}
    prox = ProximalTerm(w0, mu=0.3)
    prox.penalty(model).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, 0.3 * (p.detach() - w0[name]), atol=1e-6)
    # sequence form and the DP-path helper give the same gradient
    model.zero_grad()
    ProximalTerm([w0["weight"], w0["bias"]], mu=0.3).add_gradient(model)
    assert torch.allclose(model.weight.grad, 0.3 * (model.weight.detach() - w0["weight"]), atol=1e-6)
    with pytest.raises(ValueError, match="no global value"):
        ProximalTerm({"weight": w0["weight"]}, mu=1.0).penalty(model)


def test_train_epoch_with_proximal_pulls_towards_global() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _dict_batches(_cases())

    def drift(mu: float) -> float:
        model.load_state_dict(w0)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        prox = ProximalTerm(w0, mu=mu) if mu else None
        for _ in range(5):
            out = train_epoch(model, batches, opt, MultiTaskLoss(), "cpu", proximal=prox)
        if mu:
            assert out["loss-proximal"] > 0
        return sum(float(((p.detach() - w0[n]) ** 2).sum()) for n, p in model.named_parameters())

    assert drift(5.0) < drift(0.0)


def test_dp_optimizer_takes_noise_only_step_on_empty_batch() -> None:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    torch.manual_seed(0)
    model = GradSampleModule(TinyNet())
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=2)
    empty = {"image": torch.zeros((0, len(MODS), *SHAPE)), "mask": torch.zeros((0, len(MODS))),
             "seg": torch.zeros((0, *SHAPE), dtype=torch.long), "label": torch.zeros((0,), dtype=torch.long)}
    before = [p.detach().clone() for p in model.parameters()]
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    out = train_epoch(model, [empty] + _dict_batches(_cases(2)), opt, MultiTaskLoss(), "cpu",
                      proximal=ProximalTerm(w0, mu=0.1))
    assert out["steps"] == 2 and out["empty-batches"] == 1 and out["num-examples"] == 2
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_resolve_device() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError):
        resolve_device("tpu")


def test_evaluate_subsets_rows_and_masking() -> None:
    model = TinyNet()
    loader = _dict_batches(_cases(5), b=2)
    for b in loader:
        b["case_id"] = [f"case-{i}" for i in range(b["image"].shape[0])]
    model.seen.clear()
    report = evaluate_subsets(model, loader, "cpu", hd95="full")
    names = [subset_name(s) for s in subsets(MODS)]
    assert len(report.subsets) == 2 ** 3 - 1
    assert set(report.rows) == set(names) | {"all", "mean", "worst"}
    assert report.rows["all"] == report.rows["t1+ct+us"]
    assert all(report.rows[n]["cases"] == 5 for n in names)
    # every batch ran once per subset, and channels outside the subset reached the network as zeros
    assert len(model.seen) == len(loader) * 7
    for (image, mask), s in zip(model.seen, [s for _ in loader for s in subsets(MODS)]):
        for i, m in enumerate(MODS):
            if m not in s:
                assert torch.count_nonzero(image[:, i]) == 0 and (mask[:, i] == 0).all()
            else:
                assert (mask[:, i] == 1).all()
    flat = report.to_flat()
    assert "t1/dice-whole" in flat and "worst/auroc" in flat and "monotonicity-violations" in flat
    assert "all/hd95-whole" in flat and "t1/hd95-whole" not in flat
    for k in ("dice-whole", "accuracy"):
        vals = [report.rows[n][k] for n in names]
        assert report.rows["mean"][k] == pytest.approx(sum(vals) / len(vals))
        assert report.rows["worst"][k] == pytest.approx(min(vals))
    assert 0.0 <= report.monotonicity_violations <= 1.0 and report.monotonicity_pairs == 9
    assert report.to_table().row_count == len(names) + 2 and report.to_dict()["subsets"] == names


def test_evaluate_subsets_skips_cases_without_any_subset_modality() -> None:
    model = TinyNet()
    items = _cases(4)
    items[0]["mask"] = torch.tensor([1.0, 0.0, 0.0])  # t1 only
    items[0]["image"][1:] = 0
    report = evaluate_subsets(model, _dict_batches(items), "cpu", subsets=[("ct",), ("t1", "ct")], hd95=False)
    assert report.rows["ct"]["cases"] == 3
    assert report.rows["t1+ct"]["cases"] == 4
    assert "all" not in report.rows
    preds = predict(model, _dict_batches(items), "cpu", mask_override=[0.0, 1.0, 0.0])
    assert preds.used.tolist() == [False, True, True, True] and math.isnan(float(preds.probs[0]))


def test_monotonicity_counts_drops_beyond_tolerance() -> None:
    score = {("t1",): 0.5, ("ct",): 0.6, ("t1", "ct"): 0.55}
    violations, pairs = monotonicity(score, ("t1", "ct"), tolerance=0.01)
    assert (violations, pairs) == (1, 2)  # adding t1 to ct lowers 0.60 -> 0.55
    assert monotonicity(score, ("t1", "ct"), tolerance=0.1) == (0, 2)


def test_lr_schedule_shapes_and_global_steps() -> None:
    cos = LRSchedule(1e-2, total_steps=110, kind="cosine", warmup_steps=10, min_factor=0.1)
    assert cos.lr(0) == pytest.approx(1e-3) and cos.lr(9) == pytest.approx(1e-2)  # linear warm-up
    assert cos.lr(10) == pytest.approx(1e-2) and cos.lr(60) == pytest.approx(0.55e-2)  # halfway down
    assert cos.lr(110) == pytest.approx(1e-3) and cos.lr(500) == pytest.approx(1e-3)  # floor, never back up
    poly = LRSchedule(1.0, total_steps=100, kind="poly")
    assert poly.factor(50) == pytest.approx(0.5**0.9) and poly.factor(100) == 0.0
    assert LRSchedule(1.0, total_steps=5, kind="constant").factor(4) == 1.0
    for bad in ({"kind": "step"}, {"total_steps": 0}, {"warmup_steps": 200}, {"min_factor": 2.0}):
        with pytest.raises(ValueError):
            LRSchedule(**{"base_lr": 1.0, "total_steps": 100, **bad})
    # train_epoch sets the learning rate of each global step: two epochs of 3 steps from step 0, then 3 more
    model = TinyNet()
    opt = make_optimizer(model, 1.0)
    sched = LRSchedule(0.1, total_steps=9, kind="cosine")
    batches = _dict_batches(_cases())
    seen: list[float] = []
    step = opt.step

    def recording_step(*a: object, **k: object) -> object:
        seen.append(opt.param_groups[0]["lr"])
        return step(*a, **k)

    opt.step = recording_step  # type: ignore[method-assign]
    start = 0
    for _ in range(3):
        out = train_epoch(model, batches, opt, MultiTaskLoss(), "cpu", schedule=sched, start_step=start)
        start += int(out["steps"])
    assert seen == pytest.approx([sched.lr(t) for t in range(9)])
    assert out["lr"] == pytest.approx(sched.lr(8))


def test_proximal_term_scoped_to_the_encoders_leaves_shared_layers_free() -> None:
    from models.modalities import owner_modality
    from models.network import build_model
    from tests.client_helpers import TINY

    torch.manual_seed(0)
    model = build_model(TINY)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    full = ProximalTerm(start, mu=1.0)
    encoders = ProximalTerm(start, mu=1.0, scope="encoders")
    names = {id(p): n for n, p in model.named_parameters()}
    covered = {names[id(p)] for p, _ in encoders.pairs(model)}
    assert covered and all(owner_modality(n) is not None for n in covered)
    assert {n for n, _ in model.named_parameters() if owner_modality(n) is not None} == covered
    assert 0 < float(encoders(model)) < float(full(model))
    model.zero_grad()
    encoders.add_gradient(model)
    for n, p in model.named_parameters():
        if owner_modality(n) is None:
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, n
        else:
            assert torch.allclose(p.grad, torch.full_like(p, 0.1), atol=1e-6), n
    with pytest.raises(ValueError, match="proximal scope must be one of"):
        ProximalTerm(start, mu=1.0, scope="decoder")


def test_single_modality_mask_keeps_one_present_modality_drawn_uniformly() -> None:
    from models.training import single_modality_mask

    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]).repeat(2000, 1)
    single = single_modality_mask(mask, torch.Generator().manual_seed(0))
    assert torch.equal(single.sum(dim=1), torch.ones(len(mask))) and bool((single <= mask).all())
    share = single.reshape(2000, 3, 3).mean(dim=0)  # per row pattern: how often each modality was kept
    torch.testing.assert_close(share[0], torch.tensor([0.5, 0.5, 0.0]), atol=0.04, rtol=0)
    torch.testing.assert_close(share[1], torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(share[2], torch.full((3,), 1 / 3), atol=0.04, rtol=0)


@pytest.mark.parametrize("family", ["hierarchical", "attention"])
def test_single_modality_loss_is_the_loss_of_a_lone_modality_forward(family: str) -> None:
    """With one modality per case, the lone-modality prediction is the prediction itself: the step with weight w is
    (1 + w) times the step without (plain SGD, no dropout), so the term really trains that pass, through the shared
    encoders once."""
    from models.network import build_model

    cfg = default_model_config(family=family, modalities=MODS, spatial_size=(8, 16, 16), channels=(4, 8),
                               dropout=0.0)
    g = torch.Generator().manual_seed(1)
    image = torch.randn(4, len(MODS), 8, 16, 16, generator=g)
    seg = (torch.rand(4, 8, 16, 16, generator=g) > 0.7).long()
    mask = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), len(MODS)).float()
    batch = [{"image": image, "mask": mask, "seg": seg, "label": torch.tensor([0, 1, 0, 1])}]
    deltas = []
    for weight in (0.0, 0.5):
        torch.manual_seed(0)
        model = build_model(cfg)
        before = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        train_epoch(model, batch, opt, MultiTaskLoss(), "cpu", single_modality_loss=weight,
                    generator=torch.Generator().manual_seed(0))
        deltas.append(torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(model.parameters(), before)]))
    assert deltas[0].abs().sum() > 0
    torch.testing.assert_close(deltas[1], 1.5 * deltas[0], rtol=1e-4, atol=1e-6)  # float rounding only


def test_single_modality_loss_is_refused_under_dp_sgd() -> None:
    class FakeDP(torch.optim.SGD):
        original_optimizer = None

        def add_noise(self) -> None: ...

    model = TinyNet()
    with pytest.raises(ValueError, match="DP-SGD"):
        train_epoch(model, _dict_batches(_cases(2)), FakeDP(model.parameters(), lr=0.1), MultiTaskLoss(), "cpu",
                    single_modality_loss=0.5)
