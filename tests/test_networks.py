"""Fusion networks: shapes, missing-modality invariance, ownership, Opacus readiness, modality dropout."""

from __future__ import annotations

import warnings

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from models import FusionNet, build_model
from models.config import ModelConfig
from models.modalities import owner_modality
from models.network import apply_modality_dropout
from models.summary import count_parameters, estimate_flops, parameters_by_owner
from common.runconfig import default_model_config
from models.fusion import FUSIONS

FAMILIES = tuple(FUSIONS)

torch.set_num_threads(1)

SIZES = {2: (16, 16), 3: (8, 16, 16)}
SUBSETS = {
    "all": ("t1", "t1ce", "t2", "flair", "ct", "us"),
    "one": ("flair",),
    "subset": ("t1", "t2", "ct"),
}


def tiny(family: str, dims: int = 3, modalities: tuple[str, ...] = SUBSETS["subset"]) -> ModelConfig:
    return default_model_config(
        family=family,
        modalities=modalities,
        spatial_dims=dims,
        spatial_size=SIZES[dims],
        channels=(4, 8),
        attention_heads=2,
    )


def close(a: torch.Tensor, b: torch.Tensor, scale: float) -> bool:
    """Equal up to float32 noise: relative to the tensor's largest entry, or to the model's gradient ``scale``."""
    return bool((a - b).abs().max() <= 1e-2 * b.abs().max() + 1e-4 * scale)


def batch(cfg: ModelConfig, b: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    m = len(cfg.modalities)
    image = torch.randn(b, m, *cfg.spatial_size, generator=g)
    mask = (torch.rand(b, m, generator=g) > 0.4).float()
    mask[torch.arange(b), torch.randint(0, m, (b,), generator=g)] = 1.0  # at least one present per sample
    image = image * mask.reshape(b, m, *[1] * cfg.spatial_dims)  # contract: missing channel is zeros
    return image, mask


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("subset", list(SUBSETS))
def test_builds_runs_and_validates(family: str, dims: int, subset: str) -> None:
    cfg = tiny(family, dims, SUBSETS[subset])
    model = build_model(cfg)
    assert isinstance(model, FusionNet) and model.config == cfg
    assert ModuleValidator.validate(model, strict=False) == []
    image, mask = batch(cfg)
    seg, cls = model(image, mask)
    assert seg.shape == (3, cfg.num_seg_classes, *cfg.spatial_size)
    assert cls.shape == (3, cfg.num_classes)
    assert torch.isfinite(seg).all() and torch.isfinite(cls).all()
    (seg.square().mean() + cls.square().mean()).backward()
    # every trainable parameter takes part in the forward (so it gets a gradient, zero if unused by this batch)
    assert all(p.grad is not None for p in model.parameters())
    attn = model.attention_weights()
    if family == "attention":
        m = len(cfg.modalities)
        assert attn is not None and attn.shape == (3, m, m)
        # each present query's attention over keys sums to 1; missing keys get none
        rows = attn.sum(dim=2)
        assert torch.allclose(rows[mask > 0], torch.ones_like(rows[mask > 0]), atol=1e-5)
        assert (attn.permute(0, 2, 1)[mask == 0] == 0).all()
    else:
        assert attn is None


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dims", [2, 3])
def test_missing_modality_pixels_have_no_effect(family: str, dims: int) -> None:
    cfg = tiny(family, dims)
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    image, _ = batch(cfg)
    # mixed mask: modality 1 missing for sample 0 only, modality 0 missing for sample 2 only
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    seg1, cls1 = model(image, mask)
    noisy = image.clone()
    missing = mask == 0
    noisy[missing] = 100.0 * torch.randn_like(noisy[missing])
    noisy[0, 1, 0] = float("nan")  # even non-finite junk in a missing channel is never read
    seg2, cls2 = model(noisy, mask)
    assert torch.allclose(seg1, seg2, atol=1e-6)
    assert torch.allclose(cls1, cls2, atol=1e-6)
    # changing a *present* modality does change the output (the test above is not vacuous)
    changed = image.clone()
    changed[1, 1] += 1.0
    seg3, _ = model(changed, mask)
    assert not torch.allclose(seg1[1], seg3[1], atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_mask_batch_equals_per_sample_runs(family: str) -> None:
    cfg = tiny(family, 2)
    torch.manual_seed(2)
    model = build_model(cfg).eval()
    image, _ = batch(cfg)
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    seg, cls = model(image, mask)
    for i in range(3):
        seg_i, cls_i = model(image[i : i + 1], mask[i : i + 1])
        assert torch.allclose(seg_i, seg[i : i + 1], atol=1e-5)
        assert torch.allclose(cls_i, cls[i : i + 1], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_ownership(family: str) -> None:
    cfg = tiny(family, 2, SUBSETS["all"])
    model = build_model(cfg)
    owners = parameters_by_owner(model)
    assert set(owners) == set(cfg.modalities) | {None}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        owner = owner_modality(name)
        if parts[0] == "encoders" or (parts[0] == "fusion" and parts[1] in ("stems", "heads")):
            assert owner == parts[1 if parts[0] == "encoders" else 2], name
        elif "embeddings" in parts:
            assert owner == parts[parts.index("embeddings") + 1], name
        elif parts[:2] == ["classifier", "modalities"]:
            assert owner == parts[2], name
        else:
            assert parts[0] in ("fusion", "decoder", "classifier"), name
            assert owner is None, name
    # every modality owns the same amount (no modality is special) and the per-owner counts add up
    per_modality = {owners[m] for m in cfg.modalities}
    assert len(per_modality) == 1
    assert sum(owners.values()) == count_parameters(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_opacus_per_sample_gradients(family: str) -> None:
    cfg = tiny(family, 2).replace(dropout=0.0)
    torch.manual_seed(3)
    model = build_model(cfg)
    reference = build_model(cfg)
    reference.load_state_dict(model.state_dict())
    image, _ = batch(cfg)
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    gsm = GradSampleModule(model, loss_reduction="sum")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # full backward hook on inputs without grad: expected
        seg, cls = gsm(image, mask)
        (seg.square().sum() + cls.square().sum()).backward()
    seg0, cls0 = reference(image[:1], mask[:1])
    (seg0.square().sum() + cls0.square().sum()).backward()
    scale = max(float(p.grad.abs().max()) for p in model.parameters())
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert p.grad_sample is not None, name
        assert p.grad_sample.shape == (3, *p.shape), name
        # per-sample gradients add up to the batch gradient and sample 0's equals a batch-of-one gradient
        # (float32 noise: a conv bias before GroupNorm has a small gradient made of cancelling terms)
        assert close(p.grad_sample.sum(0), p.grad, scale), name
        assert close(p.grad_sample[0], q.grad, scale), name


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layer_is_on_opacus_fast_path(family: str) -> None:
    """Each module holding parameters has a hook grad sampler (no silent functorch fallback, e.g. PReLU or
    ConvTranspose)."""
    model = build_model(tiny(family, 3))
    direct = [mod for mod in model.modules() if any(True for _ in mod.parameters(recurse=False))]
    assert direct
    slow = {type(mod).__name__ for mod in direct if type(mod) not in GradSampleModule.GRAD_SAMPLERS}
    assert slow == set()


@pytest.mark.parametrize("family", FAMILIES)
def test_site_modalities_skip_absent_branches(family: str) -> None:
    cfg = tiny(family, 2).replace(dropout=0.0)
    torch.manual_seed(4)
    full = build_model(cfg).eval()
    site = build_model(cfg)
    site.load_state_dict(full.state_dict())
    site.set_site_modalities(["ct", "t1"])  # this site never has t2
    frozen = {n for n, p in site.named_parameters() if not p.requires_grad}
    assert frozen and all(owner_modality(n) == "t2" for n in frozen)
    assert all(p.requires_grad for n, p in site.named_parameters() if owner_modality(n) != "t2")
    image, _ = batch(cfg)
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    expected = full(image, mask)
    got = site.eval()(image, mask)
    for a, b in zip(expected, got):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="declared absent"):
        site(image, torch.ones_like(mask))
    # Opacus on the site model: every trainable parameter gets per-sample gradients
    gsm = GradSampleModule(site.train())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        seg, cls = gsm(image, mask)
        (seg.mean() + cls.mean()).backward()
    for name, p in site.named_parameters():
        assert (getattr(p, "grad_sample", None) is not None) == p.requires_grad, name
    with pytest.raises(ValueError, match="not inputs"):
        site.set_site_modalities(["us"])
    site.set_site_modalities(None)
    assert all(p.requires_grad for p in site.parameters())


def test_unimodal_baseline_is_the_same_network() -> None:
    for family in FAMILIES:
        cfg = tiny(family, 2, ("t1ce",))
        model = build_model(cfg)
        seg, cls = model(torch.randn(2, 1, *cfg.spatial_size), torch.ones(2, 1))
        assert seg.shape == (2, cfg.num_seg_classes, *cfg.spatial_size) and cls.shape == (2, cfg.num_classes)
        assert {owner_modality(n) for n, _ in model.named_parameters()} <= {"t1ce", None}


def test_bad_inputs_are_clear_errors() -> None:
    cfg = tiny("single", 2)
    model = build_model(cfg)
    image, mask = batch(cfg)
    with pytest.raises(ValueError, match="modality channels"):
        model(image[:, :2], mask[:, :2])
    with pytest.raises(ValueError, match="mask must be"):
        model(image, mask[:, :2])
    with pytest.raises(ValueError, match="divisible"):
        model(torch.zeros(1, 3, 15, 16), torch.ones(1, 3))
    with pytest.raises(ValueError, match="no modality present"):
        model(image, torch.zeros_like(mask))
    with pytest.raises(ValueError, match=r"\(B, M, H, W\)"):
        model(torch.zeros(1, 3, 8, 16, 16), torch.ones(1, 3))


def test_modality_dropout_never_drops_all_and_respects_missing() -> None:
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(500, 6, generator=g) > 0.5).float()
    mask[:, 0] = torch.where(mask.sum(1) == 0, torch.ones(500), mask[:, 0])
    mask[0] = 0.0  # an empty sample stays empty (the network rejects it, dropout does not invent one)
    out = apply_modality_dropout(mask, 0.9, generator=g)
    assert out.shape == mask.shape and out.dtype == mask.dtype
    assert ((out == 0) | (out == 1)).all()
    assert (out <= mask).all()  # only drops; never revives a missing modality
    assert (out[1:].sum(1) >= 1).all()  # never drops every present modality
    assert out[0].sum() == 0
    assert out.sum() < mask.sum()  # it does drop at p = 0.9
    assert torch.equal(apply_modality_dropout(mask, 0.0), mask)
    # reproducible with a generator
    a = apply_modality_dropout(mask, 0.5, generator=torch.Generator().manual_seed(7))
    b = apply_modality_dropout(mask, 0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="probability"):
        apply_modality_dropout(mask, 1.0)


def test_subset_modality_dropout_draws_uniform_non_empty_subsets_of_the_present_modalities() -> None:
    """mode="subsets": a share min(1, 2p) of the samples keeps a uniformly drawn non-empty subset of its present
    modalities (the distribution the every-subset evaluation averages over), the rest keep all; missing stays
    missing, nothing is emptied, draws are reproducible, and an unknown mode is a named error."""
    from collections import Counter

    n = 20000
    mask = torch.ones(n, 3)
    mask[: n // 2, 2] = 0.0  # half the samples lack the third modality
    out = apply_modality_dropout(mask, 0.25, generator=torch.Generator().manual_seed(0), mode="subsets")
    assert (out <= mask).all() and (out.sum(1) >= 1).all()
    changed = (out != mask).any(dim=1).float()
    # a chosen sample (share 0.5) keeps all of its k modalities with probability 1 / (2^k - 1)
    expected_changed = 0.5 * (0.5 * (1 - 1 / 7) + 0.5 * (1 - 1 / 3))
    assert abs(float(changed.mean()) - expected_changed) < 0.02
    counts = Counter(tuple(int(v) for v in row) for row in out[n // 2 :].tolist())
    # among the samples with all 3 present: all-kept = unchosen (0.5) + chosen and drawn full (0.5 / 7); the other
    # six non-empty subsets 0.5 / 7 each
    total = n // 2
    for subset, c in counts.items():
        want = 0.5 + 0.5 / 7 if subset == (1, 1, 1) else 0.5 / 7
        assert abs(c / total - want) < 0.02, (subset, c / total)
    assert len(counts) == 7
    assert torch.equal(apply_modality_dropout(mask, 0.6, generator=torch.Generator().manual_seed(3), mode="subsets"),
                       apply_modality_dropout(mask, 0.6, generator=torch.Generator().manual_seed(3), mode="subsets"))
    every = apply_modality_dropout(mask, 0.6, generator=torch.Generator().manual_seed(3), mode="subsets")
    assert abs(float((every != mask).any(dim=1).float().mean()) - (0.5 * 6 / 7 + 0.5 * 2 / 3)) < 0.02  # share 1
    empty = torch.zeros(2, 3)
    assert torch.equal(apply_modality_dropout(empty, 0.4, mode="subsets"), empty)
    with pytest.raises(ValueError, match="mode 'sometimes' is not one of independent, subsets"):
        apply_modality_dropout(mask, 0.25, mode="sometimes")


def test_model_configs_saved_before_the_dropout_mode_existed_load_as_independent() -> None:
    cfg = tiny("attention").replace(modality_dropout_mode="subsets")
    data = cfg.to_dict()
    assert ModelConfig.from_dict(data) == cfg
    del data["modality_dropout_mode"]
    assert ModelConfig.from_dict(data).modality_dropout_mode == "independent"
    with pytest.raises(ValueError, match="modality_dropout_mode"):
        cfg.replace(modality_dropout_mode="random")
    del data["single_modality_loss"]  # saved before the single-modality loss existed: trained without it
    assert ModelConfig.from_dict(data).single_modality_loss == 0.0
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="single_modality_loss"):
            cfg.replace(single_modality_loss=bad)


def test_summary_counts() -> None:
    cfg = tiny("hierarchical", 2)
    model = build_model(cfg)
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    model.train()
    flops = estimate_flops(model, cfg)
    assert flops > 0 and model.training  # mode restored
    bigger = build_model(cfg.replace(channels=(8, 16)))
    assert estimate_flops(bigger, bigger.config) > flops


def test_attention_softmax_equals_torch_softmax_with_masked_keys() -> None:
    """The attention's elementwise softmax (models.fusion.attention.softmax_last) gives torch.softmax's values and
    gradients, masked keys included (weight exactly 0), at the default model's level-0 shape."""
    from models.fusion.attention import softmax_last

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 64, 2, 6, 6, generator=g, dtype=torch.float64) * 4
    present = torch.tensor([[1, 1, 0, 1, 0, 1], [0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    masked = scores.masked_fill(~present[:, None, None, None, :], float("-inf"))
    upstream = torch.randn(masked.shape, generator=g, dtype=torch.float64)
    ours_in, ref_in = masked.clone().requires_grad_(), masked.clone().requires_grad_()
    ours, ref = softmax_last(ours_in), ref_in.softmax(dim=-1)
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-10, atol=1e-12)
    assert torch.all(ours[~present[:, None, None, None, :].expand_as(ours)] == 0)


def _reference_attention_fusion(fusion, pyramids, mask):
    """The attention family's formula as first written (update per modality, output projection and upsampling per
    modality, then the masked mean), from the module's own layers: what the pooled computation must equal."""
    import math as _math

    import torch.nn.functional as F

    fused = []
    for l, attn in enumerate(fusion.levels):
        stacked = torch.stack([p[l] for p in pyramids], dim=1)
        b, m, c = stacked.shape[:3]
        spatial = stacked.shape[3:]
        src = stacked
        if fusion.pools[l] > 1:
            src = F.avg_pool3d(stacked.flatten(1, 2), fusion.pools[l]).unflatten(1, (m, c))
        tokens = src.flatten(3).permute(0, 3, 1, 2)
        p = tokens.shape[1]
        index = torch.zeros(b, 1, dtype=torch.long)
        emb = torch.cat([attn.embeddings[n](index) for n in attn.modalities], dim=1)
        qkv = attn.qkv(attn.norm(tokens + emb[:, None]).reshape(b, p * m, c))
        q, k, v = qkv.reshape(b, p, m, 3, attn.heads, c // attn.heads).unbind(dim=3)
        q, k, v = (x.transpose(2, 3) for x in (q, k, v))
        scores = q @ k.transpose(-1, -2) / _math.sqrt(c // attn.heads)
        scores = scores.masked_fill(~(mask > 0)[:, None, None, None, :], float("-inf"))
        mixed = (scores.softmax(dim=-1) @ v).transpose(2, 3).reshape(b, p, m, c)
        delta = attn.out(mixed.reshape(b, p * m, c)).reshape(b, p, m, c)
        delta = delta.permute(0, 2, 3, 1).reshape(b, m * c, *src.shape[3:])
        if fusion.pools[l] > 1:
            delta = F.interpolate(delta, size=tuple(spatial), mode="nearest")
        u = stacked + delta.reshape(b, m, c, *spatial)
        w = mask.reshape(b, m, *([1] * (u.dim() - 2)))
        fused.append((u * w).sum(dim=1) / mask.sum(dim=1).reshape(b, *([1] * (u.dim() - 2))))
    return fused


def test_attention_fusion_pooled_form_equals_the_per_modality_formula() -> None:
    """The attention fusion averages over modalities before its output projection, value mixing and upsampling
    (models/fusion/attention.py); outputs and gradients equal the per-modality formula's, masks of 1..M modalities,
    and prepare() + fuse() under several masks equals forward() under each."""
    cfg = tiny("attention", 3, ("t1", "t1ce", "flair", "ct")).replace(dropout=0.0)
    torch.manual_seed(0)
    model = build_model(cfg).double()
    fusion = model.fusion
    g = torch.Generator().manual_seed(1)
    pyramids = [[torch.randn(3, c, *(s // 2**l for s in cfg.spatial_size), generator=g, dtype=torch.float64)
                 .requires_grad_() for l, c in enumerate(cfg.channels)] for _ in cfg.modalities]
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.float64)
    ours = fusion(pyramids, mask)
    ref = _reference_attention_fusion(fusion, pyramids, mask)
    upstream = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in ours]
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-12)
    params = [p for p in fusion.parameters()] + [p for pp in pyramids for p in pp]
    g_ours = torch.autograd.grad(sum((o * u).sum() for o, u in zip(ours, upstream)), params, allow_unused=True)
    g_ref = torch.autograd.grad(sum((r * u).sum() for r, u in zip(ref, upstream)), params, allow_unused=True)
    for a, b in zip(g_ours, g_ref):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    prepared = fusion.prepare(pyramids)
    for keep in ([0, 0, 1, 0], [1, 0, 1, 1], [1, 1, 1, 1]):
        sub = mask.clone() * torch.tensor(keep, dtype=torch.float64)
        sub[sub.sum(dim=1) == 0, 2] = 1.0
        for f, r in zip(fusion.fuse(prepared, sub), _reference_attention_fusion(fusion, pyramids, sub)):
            torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-12)
