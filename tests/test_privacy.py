"""Privacy building blocks: persistent accountant, site policy, noise derivation, per-case gradients, plain names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch.utils.data import DataLoader

from client.privacy.accountant import ACCOUNTANT_FILE, PersistentAccountant, epsilon_of
from client.privacy.engine import (
    CasesOnly,
    PerCaseGradModule,
    derive_noise_multiplier,
    make_private,
    sample_rate_of,
    steps_per_epoch,
)
from client.privacy.policy import PolicyRefusal, SitePolicy, read_policy_file, write_policy_file
from common.runconfig import DPConfig
from tests.client_helpers import TINY

dp_request = DPConfig.from_run_config  # a run's dp-* keys over pyproject's defaults


def test_accountant_composes_persists_and_matches_opacus(tmp_path: Path) -> None:
    ledger = PersistentAccountant.load(tmp_path)
    assert ledger.epsilon(1e-5) == 0.0
    ledger.record(1.1, 0.25, 4, 1e-5)
    ledger.record(1.1, 0.25, 4, 1e-5)  # merged, as Opacus does
    ledger.record(2.0, 0.5, 3, 1e-5)
    assert ledger.history == [(1.1, 0.25, 8), (2.0, 0.5, 3)]
    fresh = RDPAccountant()
    fresh.history = [(1.1, 0.25, 8), (2.0, 0.5, 3)]
    again = PersistentAccountant.load(tmp_path)
    assert again.history == ledger.history and again.rounds == 3
    assert again.epsilon(1e-5) == pytest.approx(fresh.get_epsilon(delta=1e-5), rel=1e-12)
    # prospective check leaves the ledger untouched
    before = list(again.history)
    nxt = again.prospective_epsilon(1.1, 0.25, 4, 1e-5)
    assert nxt > again.epsilon(1e-5) and again.history == before
    assert nxt == pytest.approx(epsilon_of(before + [(1.1, 0.25, 4)], 1e-5))
    assert [p.name for p in tmp_path.iterdir()] == [ACCOUNTANT_FILE]  # atomic write left no temporary file


def test_unreadable_ledger_refuses_instead_of_resetting(tmp_path: Path) -> None:
    (tmp_path / ACCOUNTANT_FILE).write_text("{ truncated")
    with pytest.raises(ValueError, match="refusing to train"):
        PersistentAccountant.load(tmp_path)


def test_policy_precedence_node_config_over_file_over_defaults(tmp_path: Path) -> None:
    assert SitePolicy.resolve({}, tmp_path) == SitePolicy()
    write_policy_file(tmp_path, {"max-epsilon": 3.0, "min-noise-multiplier": 0.8})
    write_policy_file(tmp_path, {"allow-no-dp": True})  # merges, keeps earlier keys
    assert read_policy_file(tmp_path) == {"max_epsilon": 3.0, "min_noise_multiplier": 0.8, "allow_no_dp": True}
    p = SitePolicy.resolve({"max-epsilon": 2.0, "partition-id": 0}, tmp_path)
    assert (p.max_epsilon, p.min_noise_multiplier, p.allow_no_dp) == (2.0, 0.8, True)
    (tmp_path / "privacy-policy.toml").unlink()
    (tmp_path / "privacy-policy.json").write_text(json.dumps({"max-grad-norm": 0.5}))
    assert SitePolicy.resolve({}, tmp_path).max_grad_norm == 0.5
    with pytest.raises(ValueError, match="max-epsilon"):
        SitePolicy.resolve({"max-epsilon": "lots"}, tmp_path)


@pytest.mark.parametrize(
    "request_, phrase",
    [
        (dp_request({"dp-noise-multiplier": 0.2}), "min-noise-multiplier"),
        (dp_request({"dp-max-grad-norm": 5.0}), "max-grad-norm"),
        (dp_request({"dp-target-epsilon": 50.0}), "max-epsilon"),
        (dp_request({"dp-delta": 1e-3}), "max-delta"),
        (dp_request({"dp-enabled": False}), "WITHOUT differential privacy"),
    ],
)
def test_policy_refuses_weaker_privacy(request_: DPConfig, phrase: str) -> None:
    with pytest.raises(PolicyRefusal, match=phrase):
        SitePolicy().check(request_)


def test_policy_accepts_stronger_privacy_and_allowed_dp_off() -> None:
    SitePolicy().check(dp_request({"dp-noise-multiplier": 3.0, "dp-max-grad-norm": 0.5, "dp-delta": 1e-6}))
    SitePolicy(allow_no_dp=True).check(dp_request({"dp-enabled": False}))


def test_derived_noise_meets_the_target_over_the_planned_steps() -> None:
    q, steps = sample_rate_of(10, 4), 3 * steps_per_epoch(10, 4)
    assert q == pytest.approx(1 / 3)
    sigma = derive_noise_multiplier(target_epsilon=8.0, delta=1e-5, sample_rate=q, steps=steps)
    eps = epsilon_of([(sigma, q, steps)], 1e-5)
    assert eps <= 8.0 and eps > 7.9  # the smallest noise that meets the target (binary search tolerance 0.01)
    with pytest.raises(ValueError, match="dp-target-epsilon"):
        derive_noise_multiplier(target_epsilon=0.0, delta=1e-5, sample_rate=q, steps=steps)


@pytest.mark.parametrize(("target", "q", "steps", "accountant"), [
    (8.0, 1 / 6, 30, "rdp"), (3.0, 0.25, 44, "rdp"), (1.0, 0.5, 10, "rdp"), (50.0, 0.25, 10, "rdp"),
    (0.5, 0.01, 1000, "rdp"), (8.0, 1 / 6, 30, "prv"),
])
def test_derived_noise_keeps_opacus_contract(target: float, q: float, steps: int, accountant: str) -> None:
    """The search (regula falsi, not Opacus's bisection) gives what get_noise_multiplier promises: epsilon within
    0.01 below the target, read with the same accountant, and so a multiplier within a hair of Opacus's."""
    from opacus.accountants.utils import get_noise_multiplier

    sigma = derive_noise_multiplier(target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps,
                                    accountant=accountant)
    eps = epsilon_of([(sigma, q, steps)], 1e-5, accountant)
    assert target - 0.01 <= eps <= target
    extra = {"eps_error": 0.01} if accountant == "prv" else {}
    theirs = get_noise_multiplier(target_epsilon=target, target_delta=1e-5, sample_rate=q, steps=steps,
                                  accountant=accountant, **extra)
    # inside the tolerance window the multiplier is pinned only as well as epsilon's slope allows (flat at low epsilon)
    assert sigma == pytest.approx(theirs, rel=0.03)


def test_an_unreachable_target_is_refused_by_name() -> None:
    # below the RDP accountant's floor at this delta (about 0.1): more noise stops helping, said without a 1e6 walk
    with pytest.raises(ValueError, match=r"cannot reach epsilon=0.05 .* stops falling .* Raise dp-target-epsilon"):
        derive_noise_multiplier(target_epsilon=0.05, delta=1e-5, sample_rate=0.25, steps=10)


def _batch(b: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    image = torch.randn(b, len(TINY.modalities), *TINY.spatial_size, generator=g)
    mask = torch.ones(b, len(TINY.modalities))
    mask[1, 2:] = 0
    image = image * mask[:, :, None, None, None]
    seg = torch.randint(0, 4, (b, *TINY.spatial_size), generator=g)
    label = torch.tensor([0, 1, 1][:b])
    return image, mask, seg, label


def test_per_case_gradients_equal_opacus_functorch() -> None:
    from opacus import GradSampleModule

    from models.losses import MultiTaskLoss
    from models.network import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    ref_model = build_model(TINY)
    for m in ref_model.modules():  # deterministic forward for the comparison
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model = build_model(TINY)
    model.load_state_dict(ref_model.state_dict())
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    loss = MultiTaskLoss()
    image, mask, seg, label = _batch()

    gsm = GradSampleModule(ref_model, force_functorch=True)
    gsm.train()
    loss(*gsm(image, mask), seg, label)[0].backward()
    ours = PerCaseGradModule(model).train()
    loss(*ours(image, mask), seg, label)[0].backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        assert p.grad_sample.shape == q.grad_sample.shape, name
        torch.testing.assert_close(p.grad_sample, q.grad_sample, atol=1e-5, rtol=1e-4, msg=name)


def test_make_private_keeps_plain_names_and_clips() -> None:
    from models.losses import MultiTaskLoss
    from models.network import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(TINY)
    names = set(model.state_dict())
    image, mask, seg, label = _batch()
    items = [{"image": image[i], "mask": mask[i], "seg": seg[i], "label": label[i], "case_id": f"c{i}"} for i in range(3)]
    loader = DataLoader(CasesOnly(items), batch_size=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    parts = make_private(model, opt, loader, MultiTaskLoss(), noise_multiplier=1.0, max_grad_norm=0.5)
    assert set(parts.model.state_dict()) == names
    assert parts.sample_rate == pytest.approx(0.5) and parts.steps_per_epoch == 2
    batch = next(b for b in parts.loader if b["image"].shape[0] > 0)
    assert "case_id" not in batch
    parts.optimizer.zero_grad()
    MultiTaskLoss()(*parts.module(batch["image"], batch["mask"]), batch["seg"], batch["label"])[0].backward()
    parts.optimizer.pre_step()
    # after clipping each case contributes at most max_grad_norm: the summed clipped gradient is bounded
    total = torch.sqrt(sum((p.summed_grad.float() ** 2).sum() for p in model.parameters() if p.requires_grad))
    assert float(total) <= 0.5 * batch["image"].shape[0] + 1e-4
    assert parts.steps_taken == 1


def test_policy_evaluation_and_count_keys_are_checked(tmp_path: Path) -> None:
    p = SitePolicy.resolve({"eval-noise-multiplier": 8, "count-granularity": "5", "allow-evaluation": "false"}, None)
    assert (p.eval_noise_multiplier, p.count_granularity, p.allow_evaluation) == (8.0, 5.0, False)
    with pytest.raises(ValueError, match="allow-evaluation = false"):
        SitePolicy(eval_noise_multiplier=0.0)
    with pytest.raises(ValueError, match="count-granularity"):
        SitePolicy(count_granularity=2.5)


def test_patient_sampler_with_one_study_per_patient_draws_what_opacus_draws() -> None:
    """Phantom sites (one study per patient) train on exactly the batches Opacus's own Poisson sampler draws."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    from client.privacy.patient_sampling import PatientPoissonSampler

    generator = torch.Generator().manual_seed(3)
    ours = PatientPoissonSampler([[i] for i in range(7)], sample_rate=0.25, steps=4,
                                 draw=lambda n, q: torch.rand(n, generator=generator) < q)
    theirs = UniformWithReplacementSampler(num_samples=7, sample_rate=0.25, generator=torch.Generator().manual_seed(3),
                                           steps=4)
    assert list(ours) == list(theirs)
    everyone = lambda n, q: torch.ones(n, dtype=torch.bool)  # noqa: E731
    grouped = PatientPoissonSampler([[0, 2], [1], [3, 4, 5]], sample_rate=1.0, steps=1, draw=everyone)
    assert next(iter(grouped)) == [0, 2, 1, 3, 4, 5] and grouped.owner.tolist() == [0, 0, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="disjoint"):
        PatientPoissonSampler([[0, 1], [1]], sample_rate=0.5, steps=1, draw=everyone)


def test_grad_samples_are_summed_per_patient() -> None:
    from client.privacy.patient_sampling import sum_grad_samples_by_patient

    p = torch.nn.Parameter(torch.zeros(2))
    p.grad_sample = torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.0, 5.0]])
    sum_grad_samples_by_patient([p], torch.tensor([0, 1, 0]))
    assert p.grad_sample.tolist() == [[1.0, 5.0], [2.0, 1.0]]
    p.grad_sample = torch.zeros((0, 2))  # a noise-only step: nothing to sum
    sum_grad_samples_by_patient([p], torch.zeros(0, dtype=torch.long))
    assert p.grad_sample.shape == (0, 2)
    p.grad_sample = torch.ones((2, 2))
    with pytest.raises(RuntimeError, match="in step with training"):
        sum_grad_samples_by_patient([p], torch.tensor([0, 0, 1]))


def test_make_private_over_patients_plans_per_patient_and_refuses_modes_without_per_study_gradients() -> None:
    from models.losses import MultiTaskLoss
    from models.network import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    image, mask, seg, label = _batch()
    items = [{"image": image[i], "mask": mask[i], "seg": seg[i], "label": label[i]} for i in range(3)]
    loader = DataLoader(CasesOnly(items), batch_size=1)
    model = build_model(TINY)
    parts = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, MultiTaskLoss(),
                         noise_multiplier=1.0, max_grad_norm=0.5, groups=[[0, 2], [1]])
    # 2 patients at batch 1: 2 steps per epoch, q = 1/2 per patient (3 studies alone would give 3 steps, q = 1/3)
    assert (parts.steps_per_epoch, parts.sample_rate) == (2, 0.5)
    assert parts.optimizer.expected_batch_size == 1
    model = build_model(TINY)
    with pytest.raises(ValueError, match="per-study gradients"):
        make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, MultiTaskLoss(),
                     noise_multiplier=1.0, max_grad_norm=0.5, grad_sample_mode="ghost", groups=[[0, 2], [1]])
    with pytest.raises(ValueError, match="exactly once"):
        make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, MultiTaskLoss(),
                     noise_multiplier=1.0, max_grad_norm=0.5, groups=[[0], [1]])
def test_site_noise_is_gaussian_with_the_planned_std_and_sampling_has_the_planned_rate() -> None:
    from scipy import stats

    from client.privacy.randomness import RandomStream

    stream = RandomStream.reproducible("test", 1)
    noise = stream.gaussian((400, 500), std=2.5)
    assert noise.shape == (400, 500) and noise.dtype == torch.float64
    assert stats.kstest(noise.flatten().numpy(), stats.norm(scale=2.5).cdf).pvalue > 1e-3
    u = stream.uniform(100_000)
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-3
    assert abs(float(stream.poisson_mask(100_000, 0.25).double().mean()) - 0.25) < 0.01
    # same parts, same numbers; fresh streams never repeat
    assert torch.equal(RandomStream.reproducible("a", 1).gaussian((50,), 1.0),
                       RandomStream.reproducible("a", 1).gaussian((50,), 1.0))
    assert not torch.equal(RandomStream.reproducible("a", 1).gaussian((50,), 1.0),
                           RandomStream.reproducible("a", 2).gaussian((50,), 1.0))
    assert not torch.equal(RandomStream.fresh().gaussian((50,), 1.0), RandomStream.fresh().gaussian((50,), 1.0))


def test_policy_reproducible_noise_secure_mode_lock_and_workload_caps(tmp_path: Path) -> None:
    assert SitePolicy().reproducible_noise is False
    with pytest.raises(ValueError, match="secure-mode=true forbids reproducible-noise"):
        SitePolicy.resolve({"secure-mode": True, "reproducible-noise": True}, tmp_path)
    write_policy_file(tmp_path, {"max-batch-size": 16, "reproducible-noise": True})
    assert "max-batch-size = 16\n" in (tmp_path / "privacy-policy.toml").read_text()
    p = SitePolicy.resolve({"max-rounds": "50"}, tmp_path)
    assert (p.max_batch_size, p.max_rounds, p.reproducible_noise) == (16, 50, True)
    with pytest.raises(ValueError, match="max-channels.*whole number"):
        SitePolicy.resolve({"max-channels": 2.5}, tmp_path)
    with pytest.raises(ValueError, match="max-local-epochs must be a whole number >= 1"):
        SitePolicy(max_local_epochs=0)


def _tiny_private(batch_size: int, noise_multiplier: float = 1.0, max_grad_norm: float = 1.0) -> Any:
    """DP parts of the tiny network over the three cases of :func:`_batch`; returns ``(parts, batch)``."""
    from models.losses import MultiTaskLoss
    from models.network import build_model

    torch.manual_seed(0)
    model = build_model(TINY)
    batch = _batch()
    image, mask, seg, label = batch
    items = [{"image": image[i], "mask": mask[i], "seg": seg[i], "label": label[i]} for i in range(3)]
    parts = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                         DataLoader(CasesOnly(items), batch_size=batch_size), MultiTaskLoss(),
                         noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm)
    return parts, batch


def test_private_loader_samples_from_the_rounds_stream_and_builds_empty_batches() -> None:
    """Poisson sampling draws from ``parts.randomness`` (the site's stream), and an empty draw is an empty batch of
    the same keys (Opacus's empty-batch collate is kept)."""
    from client.privacy.randomness import RandomStream

    parts, _ = _tiny_private(batch_size=1)

    def sampled(stream: RandomStream) -> list[int]:
        parts.randomness = stream
        return [int(b["image"].shape[0]) for b in parts.loader]

    assert sampled(RandomStream.reproducible("s", 1)) == sampled(RandomStream.reproducible("s", 1))

    class Nobody(RandomStream):
        def poisson_mask(self, n: int, rate: float) -> torch.Tensor:
            return torch.zeros(n, dtype=torch.bool)

    parts.randomness = Nobody()
    batches = list(parts.loader)
    assert len(batches) == 3
    assert all(set(b) == {*CasesOnly.KEYS, *CasesOnly.FLAGS} and b["image"].shape[0] == 0 for b in batches)


def test_dp_noise_is_drawn_from_the_rounds_stream_not_a_torch_generator() -> None:
    """The noise Opacus's optimizer adds is exactly the stream's secure Gaussians (std = sigma x clip), parameter by
    parameter: no torch generator (32-bit seeds on CPU) is involved."""
    from models.losses import MultiTaskLoss
    from client.privacy.randomness import RandomStream

    parts, (image, mask, seg, label) = _tiny_private(batch_size=3, noise_multiplier=1.3, max_grad_norm=0.7)
    MultiTaskLoss()(*parts.module(image, mask), seg, label)[0].backward()
    opt = parts.optimizer
    opt.clip_and_accumulate()
    summed = [p.summed_grad.clone() for p in opt.params]
    parts.randomness = RandomStream.reproducible("noise", 1)
    torch.manual_seed(123)  # whatever torch's own RNG holds must not matter
    opt.add_noise()
    expected = RandomStream.reproducible("noise", 1)
    for p, s in zip(opt.params, summed):
        noise = expected.gaussian(s.shape, 1.3 * 0.7).to(s.dtype)
        torch.testing.assert_close(p.grad.view_as(s) - s, noise, rtol=0, atol=1e-6)


def test_a_noise_cache_entry_of_another_search_is_not_served(tmp_path: Path) -> None:
    """The site's noise cache keys on the search's version: a value an earlier search stored under the old key
    (here a planted one) is ignored, so the site trains with what the planner computes now."""
    from client.privacy.calibration import NOISE_CACHE, plan_noise

    request = dp_request({"dp-noise-multiplier": 0.0, "dp-target-epsilon": 8.0})
    q, steps = sample_rate_of(24, 6), 5 * steps_per_epoch(24, 6)
    old_key = f"{request.accountant}|{request.target_epsilon!r}|{request.delta!r}|{q!r}|{steps}"
    (tmp_path / NOISE_CACHE).write_text(json.dumps({old_key: 99.0}))
    got = plan_noise(request, num_units=24, batch_size=6, local_epochs=1, num_rounds=5, cache_dir=tmp_path)
    fresh = derive_noise_multiplier(target_epsilon=8.0, delta=request.delta, sample_rate=q, steps=steps)
    assert got.noise_multiplier == fresh != 99.0
    assert fresh in json.loads((tmp_path / NOISE_CACHE).read_text()).values()  # stored under the new key
