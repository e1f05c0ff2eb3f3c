"""The fast convolution path (models/fast_conv.py) gives the stock path's outputs and gradients: per layer over
shapes, strides, paddings, dilations, groups and bias; for the whole default network; and for Opacus's per-case
gradients in hooks mode."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from models.fast_conv import (
    CONV_BACKWARDS,
    channels_last_forward,
    conv_backward_of,
    conv_grads,
    covers,
    set_conv_backward,
)
from tests.conv_cases import build_case

LAYERS = [
    # (conv class, in, out, kernel, stride, padding, dilation, groups, bias, spatial)
    (nn.Conv3d, 4, 4, 3, 1, 1, 1, 1, True, (6, 8, 8)),
    (nn.Conv3d, 2, 4, 3, 1, 1, 1, 1, True, (5, 8, 7)),
    (nn.Conv3d, 4, 8, 3, 2, 1, 1, 1, True, (6, 8, 8)),
    (nn.Conv3d, 8, 4, 3, 2, 1, 1, 1, False, (7, 9, 8)),  # odd sizes: several inputs map to one output size
    (nn.Conv3d, 6, 4, (3, 1, 3), (1, 2, 1), (1, 0, 2), (2, 1, 1), 2, True, (8, 6, 7)),
    (nn.Conv3d, 4, 6, 3, 1, 0, 1, 2, False, (5, 6, 6)),
    (nn.Conv3d, 4, 4, 3, 1, 2, 1, 2, True, (4, 5, 6)),  # padding beyond the kernel's reach
    (nn.Conv3d, 16, 8, 3, 1, 1, 1, 1, True, (4, 8, 8)),
    (nn.Conv2d, 3, 5, 3, 1, 1, 1, 1, True, (9, 8)),
    (nn.Conv2d, 4, 6, 3, 2, 1, 1, 2, True, (9, 8)),
    (nn.Conv2d, 2, 3, (3, 5), 1, (1, 0), 2, 1, False, (10, 11)),
    # pointwise convolutions of one input channel: a broadcast product
    (nn.Conv3d, 1, 4, 1, 1, 0, 1, 1, True, (5, 6, 7)),
    (nn.Conv2d, 1, 3, 1, 1, 0, 1, 1, False, (6, 7)),
]


def _ids(case: tuple) -> str:
    cls, cin, cout, k, s, p, d, g, bias, _ = case
    return f"{cls.__name__}-{cin}to{cout}-k{k}-s{s}-p{p}-d{d}-g{g}-{'bias' if bias else 'nobias'}"


def _grads(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(output, [grad input, grad weight, grad bias?]) of ``sum(layer(x) * gy)``."""
    x = x.detach().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    (y * gy).sum().backward()
    grads = [x.grad, layer.weight.grad] + ([layer.bias.grad] if layer.bias is not None else [])
    return y.detach(), grads


@pytest.mark.parametrize("case", LAYERS, ids=_ids)
def test_layer_outputs_and_gradients_equal_the_stock_path(case: tuple) -> None:
    layer, x, gy = build_case(case, 3)
    y_ref, ref = _grads(layer, x, gy)
    assert set_conv_backward(layer, "fast") == 1 and conv_backward_of(layer) == "fast"
    y, got = _grads(layer, x, gy)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    assert y.is_contiguous()
    for name, g, r in zip(("input", "weight", "bias"), got, ref):
        assert g.shape == r.shape and g.is_contiguous(), name
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4, msg=name)
    set_conv_backward(layer, "stock")
    assert conv_backward_of(layer) == "stock" and "forward" not in vars(layer)


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True),
                                  (True, True, False), (False, True, True)])
def test_conv_grads_computes_only_what_is_needed(need: tuple[bool, bool, bool]) -> None:
    torch.manual_seed(1)
    x, w, gy = torch.randn(2, 4, 5, 6, 6), torch.randn(6, 2, 3, 3, 3), torch.randn(2, 6, 5, 6, 6)
    settings = ([1, 1, 1], [1, 1, 1], [1, 1, 1], 2)
    ref = torch.ops.aten.convolution_backward(gy, x, w, [6], *settings[:3], False, [0, 0, 0], settings[3],
                                              [True, True, True])
    got = conv_grads(gy, x, w, *settings, need)
    for wanted, g, r in zip(need, got, ref):
        if wanted:
            torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
        else:
            assert g is None


def test_frozen_weight_and_input_without_grad() -> None:
    """An encoder a site cannot train (frozen) and a first layer on the image (no input gradient)."""
    torch.manual_seed(2)
    layer = nn.Conv3d(2, 4, 3, padding=1)
    x = torch.randn(2, 2, 4, 6, 6)
    gy = torch.randn(2, 4, 4, 6, 6)
    layer.weight.requires_grad_(False)
    (layer(x) * gy).sum().backward()
    ref = layer.bias.grad.clone()
    layer.bias.grad = None
    set_conv_backward(layer, "fast")
    (layer(x) * gy).sum().backward()
    torch.testing.assert_close(layer.bias.grad, ref, atol=1e-4, rtol=1e-4)
    assert layer.weight.grad is None


def test_what_is_switched_and_what_stays_stock() -> None:
    model = nn.Sequential(
        nn.Conv3d(2, 4, 3, padding=1), nn.Conv3d(4, 4, 1),  # pointwise of several channels: faster stock
        nn.Conv3d(1, 4, 3, padding=1), nn.Conv3d(4, 4, 3, padding=1, groups=4),  # one input channel per group
        nn.Conv3d(1, 4, 1), nn.Conv3d(1, 4, 1, stride=2), nn.Conv3d(1, 4, 1, padding=1),  # product; not strided
        nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), nn.Conv2d(2, 2, 3, padding="same"),
        nn.Conv2d(2, 2, 3, padding="valid"), nn.Conv1d(2, 2, 3), nn.Linear(2, 2),
    )
    expected = [True, False, False, False, True, False, False, False, False, True, False, False]
    assert [covers(m) for m in model] == expected
    assert set_conv_backward(model, "fast") == 3
    assert all(type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear) for m in model)  # classes untouched
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert set_conv_backward(model, "stock") == 0 and conv_backward_of(model) == "stock"
    assert all("forward" not in vars(m) for m in model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="conv-backward"):
        set_conv_backward(model, "quick")
    assert CONV_BACKWARDS == ("fast", "stock")


def test_a_switched_model_copies_and_pickles() -> None:
    import copy
    import io

    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.Conv3d(1, 4, 1))
    set_conv_backward(model, "fast")
    x = torch.randn(1, 2, 4, 4, 4)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert conv_backward_of(twin) == "fast"
        assert all(vars(m)["forward"].module is m for m in twin)  # bound to the copy, not the original
        torch.testing.assert_close(twin[0](x), model[0](x))


def test_stock_convolution_where_the_fast_path_does_not_apply() -> None:
    """No autograd, autocast, unbatched input and functorch transforms take PyTorch's own convolution."""
    torch.manual_seed(3)
    layer = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(2, 2, 6, 6)
    ref = layer(x)
    set_conv_backward(layer, "fast")
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16  # stock autocast behaviour kept
    torch.testing.assert_close(layer(x[0]), ref[0])  # unbatched (C, H, W)
    per_case = torch.func.vmap(lambda xi: layer(xi[None])[0])(x)
    torch.testing.assert_close(per_case, ref)
    pointwise = nn.Conv3d(1, 2, 1)
    set_conv_backward(pointwise, "fast")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pointwise(torch.randn(2, 1, 3, 4, 4)).dtype == torch.bfloat16


def test_channels_last_forward_rule() -> None:
    assert channels_last_forward((1, 1, 1)) and not channels_last_forward((2, 2, 2))
    assert not channels_last_forward((1, 2))


def _no_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _batch(cfg, n: int, seed: int) -> tuple[torch.Tensor, ...]:  # noqa: ANN001 - a ModelConfig
    g = torch.Generator().manual_seed(seed)
    m = len(cfg.modalities)
    image = torch.randn(n, m, *cfg.spatial_size, generator=g)
    mask = torch.ones(n, m)
    mask[0, 1:3] = 0
    image = image * mask.reshape(n, m, *([1] * cfg.spatial_dims))
    seg = torch.randint(0, cfg.num_seg_classes, (n, *cfg.spatial_size), generator=g)
    label = torch.randint(0, cfg.num_classes, (n,), generator=g)
    return image, mask, seg, label


def test_default_network_gradients_equal_the_stock_path() -> None:
    """The run config's model (every Conv3d shape it has), fast vs stock: same loss, same gradients."""
    from common.runconfig import default_model_config
    from models.losses import MultiTaskLoss
    from models.network import build_model

    cfg = default_model_config()
    torch.manual_seed(0)
    nets = [_no_dropout(build_model(cfg)).train(), _no_dropout(build_model(cfg)).train()]
    nets[1].load_state_dict(nets[0].state_dict())
    assert set_conv_backward(nets[1], "fast") > 0
    image, mask, seg, label = _batch(cfg, 2, seed=4)
    losses = []
    for net in nets:
        loss, _ = MultiTaskLoss()(*net(image, mask), seg, label)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    scale = max(float(p.grad.abs().max()) for p in nets[0].parameters())
    for (name, p), (_, q) in zip(nets[0].named_parameters(), nets[1].named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5 * scale, rtol=1e-4, msg=name)


def test_opacus_hooks_per_case_gradients_unchanged_by_the_fast_path() -> None:
    """Opacus hooks mode with fedfusion's grouped sampler: per-case gradients with the fast path equal the stock
    path's and functorch's (whose vmap takes the stock convolution)."""
    from opacus import GradSampleModule

    from client.privacy import grad_samplers
    from models.losses import MultiTaskLoss
    from models.network import build_model
    from tests.client_helpers import TINY

    torch.manual_seed(0)
    nets = [_no_dropout(build_model(TINY)) for _ in range(3)]
    for net in nets[1:]:
        net.load_state_dict(nets[0].state_dict())
    assert set_conv_backward(nets[0], "fast") > 0
    assert set_conv_backward(nets[2], "fast") > 0  # functorch on a switched model: falls back inside vmap
    grad_samplers.install()
    wrapped = [GradSampleModule(nets[0]).train(), GradSampleModule(nets[1]).train(),
               GradSampleModule(nets[2], force_functorch=True).train()]
    image, mask, seg, label = _batch(TINY, 3, seed=1)
    loss = MultiTaskLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # full backward hook on inputs without grad: expected
        for w in wrapped:
            loss(*w(image, mask), seg, label)[0].backward()
    convs = 0
    for (name, fast), (_, stock), (_, func) in zip(*(n.named_parameters() for n in nets)):
        torch.testing.assert_close(fast.grad_sample, stock.grad_sample, atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(fast.grad_sample, func.grad_sample, atol=1e-5, rtol=1e-4, msg=name)
        convs += name.endswith(".weight") and fast.dim() == 5
    assert convs > 0


def test_run_config_key_selects_the_path() -> None:
    from common import runconfig
    from common.runconfig import RunConfigError, TrainConfig

    assert TrainConfig.from_run_config({}).conv_backward in CONV_BACKWARDS
    assert TrainConfig.from_run_config({"conv-backward": "stock"}).conv_backward == "stock"
    with pytest.raises(RunConfigError, match="conv-backward"):
        runconfig.validate({"conv-backward": "quick"})
