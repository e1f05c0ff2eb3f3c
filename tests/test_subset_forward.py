"""FusionNet.forward_subsets (encoders once, fusion + decoder per subset) equals forward() with the subset mask,
for every family; evaluate_subsets gives the same report on both paths; the server's HD95 setting."""

from __future__ import annotations

import math

import pytest
import torch

from models.evaluation import evaluate_subsets
from models.modalities import subsets
from models.network import build_model
from server.evaluation import GlobalEvaluator
from server.settings import ServerSettings
from common.runconfig import default_model_config
from models.fusion import FUSIONS

FAMILIES = tuple(FUSIONS)

MODS = ("t1", "t1ce", "flair", "ct", "us")


def _keeps(modalities: tuple[str, ...]) -> torch.Tensor:
    return torch.tensor([[1.0 if m in s else 0.0 for m in modalities] for s in subsets(modalities)])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spatial", [(8, 16, 16), (16, 16)], ids=["3d", "2d"])
def test_forward_subsets_matches_forward_with_the_subset_mask(family: str, spatial: tuple[int, ...]) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = default_model_config(family=family, modalities=MODS, spatial_dims=len(spatial), spatial_size=spatial,
                      channels=(4, 8))
    model = build_model(cfg).eval()
    image = torch.randn(3, len(MODS), *spatial)
    mask = torch.ones(3, len(MODS))
    mask[1, 3] = 0.0  # case 1 has no CT: its CT channel holds garbage that must not matter
    image[1, 3] = 1e3
    keeps = _keeps(MODS)
    keeps = keeps[((mask[None] * keeps[:, None]).sum(dim=2) > 0).all(dim=1)]  # subsets every case can use
    with torch.no_grad():
        outputs = list(model.forward_subsets(image, mask, keeps, subset_batch=4))
        assert len(outputs) == keeps.shape[0]
        for keep, (seg, cls) in zip(keeps, outputs):
            ref_seg, ref_cls = model(image, mask * keep)
            assert seg.shape == ref_seg.shape and cls.shape == ref_cls.shape
            torch.testing.assert_close(seg, ref_seg, atol=1e-5, rtol=0)
            torch.testing.assert_close(cls, ref_cls, atol=1e-5, rtol=0)


def test_forward_subsets_respects_site_modalities_and_rejects_empty_subsets() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = default_model_config(family="output", modalities=MODS, spatial_size=(8, 16, 16), channels=(4, 8))
    model = build_model(cfg).eval()
    model.set_site_modalities(("t1", "flair", "us"))
    image = torch.randn(2, len(MODS), 8, 16, 16)
    mask = torch.tensor([[1.0, 0, 1, 0, 1], [1.0, 0, 0, 0, 1]])
    keeps = torch.tensor([[1.0, 1, 1, 1, 1], [0.0, 0, 0, 0, 1], [1.0, 1, 0, 0, 0]])
    with torch.no_grad():
        for keep, (seg, cls) in zip(keeps, model.forward_subsets(image, mask, keeps)):
            ref_seg, ref_cls = model(image, mask * keep)
            torch.testing.assert_close(seg, ref_seg, atol=1e-5, rtol=0)
            torch.testing.assert_close(cls, ref_cls, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="no modality present"):
            list(model.forward_subsets(image, mask, torch.tensor([[0.0, 0, 1, 0, 0]])))
        with pytest.raises(ValueError, match="subset_masks"):
            list(model.forward_subsets(image, mask, torch.ones(2, 3)))


def _batches(modalities: tuple[str, ...], spatial: tuple[int, ...]) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(2):
        mask = torch.ones(2, len(modalities))
        if i == 1:
            mask[0, :2] = 0.0  # a case without t1/t1ce: subsets of those only skip it (reference path)
        out.append({"image": torch.randn(2, len(modalities), *spatial, generator=g), "mask": mask,
                    "seg": torch.randint(0, 4, (2, *spatial), generator=g), "label": torch.tensor([0, 1])})
    return out


@pytest.mark.parametrize("family", ["input", "attention", "output"])
def test_evaluate_subsets_shared_path_gives_the_reference_report(family: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    mods = ("t1", "t1ce", "ct")
    cfg = default_model_config(family=family, modalities=mods, spatial_size=(8, 16, 16), channels=(4, 8))
    model = build_model(cfg)
    batches = _batches(mods, cfg.spatial_size)
    fast = evaluate_subsets(model, batches, "cpu", hd95="full", subset_batch=3).to_flat()
    slow = evaluate_subsets(model, batches, "cpu", hd95="full", shared_encoding=False).to_flat()
    assert fast.keys() == slow.keys()
    for k, v in slow.items():
        assert (math.isnan(v) and math.isnan(fast[k])) or fast[k] == pytest.approx(v, abs=1e-6), k
    assert fast["t1/cases"] == 3.0 and fast["all/cases"] == 4.0
    assert "all/hd95-whole" in fast and "t1/hd95-whole" not in fast


def test_server_eval_hd95_setting() -> None:
    assert ServerSettings.from_run_config({}).eval_hd95 == "full"
    assert ServerSettings.from_run_config({"eval-hd95": "none"}).eval_hd95 == "none"
    with pytest.raises(ValueError, match="eval-hd95"):
        ServerSettings.from_run_config({"eval-hd95": "sometimes"})

    torch.set_num_threads(1)
    mods = ("t1", "ct")
    cfg = default_model_config(family="single", modalities=mods, spatial_size=(8, 16, 16), channels=(4, 8))
    items = [{"image": b["image"][j], "mask": b["mask"][j], "seg": b["seg"][j], "label": b["label"][j]}
             for b in _batches(mods, cfg.spatial_size) for j in range(2)]
    state = build_model(cfg).state_dict()
    for hd95, full_has, subset_has in (("full", True, False), ("all", True, True), ("none", False, False)):
        outcome = GlobalEvaluator(cfg, "unused", device="cpu", dataset=items, hd95=hd95).evaluate(state)
        assert outcome is not None
        assert ("all/hd95-whole" in outcome.flat) is full_has
        assert ("t1/hd95-whole" in outcome.flat) is subset_has
    with pytest.raises(ValueError, match="eval-hd95"):
        GlobalEvaluator(cfg, "unused", hd95="sometimes")


def test_evaluate_subsets_split_over_threads_gives_the_same_report_in_inference_mode() -> None:
    """The subsets of a batch split over worker threads: the same numbers as one thread, HD95 included (its
    warnings filter is process-wide), and each worker runs without autograd (inference mode is per thread)."""
    import threading

    torch.set_num_threads(1)
    torch.manual_seed(0)
    mods = ("t1", "t1ce", "ct")
    cfg = default_model_config(family="attention", modalities=mods, spatial_size=(8, 16, 16), channels=(4, 8))
    model = build_model(cfg)
    batches = _batches(mods, cfg.spatial_size)
    seen: list[tuple[str, bool, bool]] = []
    plain = model.forward_subsets

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((threading.current_thread().name, torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return plain(*args, **kwargs)

    model.forward_subsets = spy  # type: ignore[method-assign]
    one = evaluate_subsets(model, batches, "cpu", hd95="all", workers=1).to_flat()
    assert {name for name, _, _ in seen} == {threading.current_thread().name}
    seen.clear()
    three = evaluate_subsets(model, batches, "cpu", hd95="all", workers=3).to_flat()
    assert len({name for name, _, _ in seen}) == 3 and all(n.startswith("subset-eval") for n, _, _ in seen)
    assert all(inference and not grad for _, inference, grad in seen)
    assert one.keys() == three.keys() and "t1+ct/hd95-whole" in three
    for k, v in one.items():
        assert (math.isnan(v) and math.isnan(three[k])) or three[k] == v, k
    assert not [t for t in threading.enumerate() if t.name.startswith("subset-eval")]  # the pool is shut down


def test_an_error_in_a_subset_thread_is_raised_and_leaves_no_thread() -> None:
    import threading

    torch.set_num_threads(1)
    mods = ("t1", "ct")
    cfg = default_model_config(family="single", modalities=mods, spatial_size=(8, 16, 16), channels=(4, 8))
    model = build_model(cfg)
    plain = model.forward_subsets

    def broken(image, mask, stacked, **kwargs):  # type: ignore[no-untyped-def]
        if stacked.shape[0] == 1 and float(stacked[0, 0]) == 0.0:  # the share holding the ct-only subset
            raise RuntimeError("decoder exploded")
        return plain(image, mask, stacked, **kwargs)

    model.forward_subsets = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="decoder exploded"):
        evaluate_subsets(model, _batches(mods, cfg.spatial_size), "cpu", hd95="none", workers=3)
    assert not [t for t in threading.enumerate() if t.name.startswith("subset-eval")]
    with pytest.raises(ValueError, match="workers"):
        evaluate_subsets(model, _batches(mods, cfg.spatial_size), "cpu", workers=0)


def test_default_workers_follow_the_wait_policy_the_process_threads_and_the_device(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from models.evaluation import MAX_DEFAULT_WORKERS, default_workers

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        monkeypatch.setenv("OMP_WAIT_POLICY", "passive")  # idle OpenMP threads sleep: two subsets at once
        assert default_workers("cpu") == MAX_DEFAULT_WORKERS == 2
        assert default_workers("cuda") == 1
        torch.set_num_threads(1)  # a simulated site (OMP_NUM_THREADS=1) stays on one thread
        assert default_workers("cpu") == 1
        torch.set_num_threads(4)
        for policy in ("ACTIVE", ""):  # spinning thread teams would fight over the cores
            monkeypatch.setenv("OMP_WAIT_POLICY", policy)
            assert default_workers("cpu") == 1
        monkeypatch.delenv("OMP_WAIT_POLICY")
        assert default_workers("cpu") == 1
    finally:
        torch.set_num_threads(before)
