"""fedfusion's grouped-convolution per-case gradients equal Opacus's unfold-based ones and plain autograd's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from client.privacy import grad_samplers
from client.privacy.grad_samplers import conv_grad_sample_grouped
from tests.conv_cases import build_case

CASES = [
    # (conv class, in, out, kernel, stride, padding, dilation, groups, bias, spatial)
    (nn.Conv1d, 3, 4, 3, 1, 1, 1, 1, True, (11,)),
    (nn.Conv2d, 4, 6, 3, 2, 1, 1, 2, True, (9, 8)),
    (nn.Conv2d, 2, 3, (3, 1), 1, (1, 0), 2, 1, False, (10, 7)),
    (nn.Conv3d, 1, 4, 3, 1, 1, 1, 1, True, (6, 8, 8)),
    (nn.Conv3d, 4, 8, 3, 2, 1, 1, 1, True, (6, 8, 8)),
    (nn.Conv3d, 6, 6, 1, 1, 0, 1, 3, True, (4, 5, 6)),
]


def _autograd_per_case(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> dict[str, torch.Tensor]:
    """Case-by-case weight/bias gradients of ``sum(layer(x_i) * gy_i)`` by plain autograd."""
    out: dict[str, list[torch.Tensor]] = {"weight": [], "bias": []}
    for i in range(x.shape[0]):
        layer.zero_grad()
        (layer(x[i : i + 1]) * gy[i : i + 1]).sum().backward()
        out["weight"].append(layer.weight.grad.clone())
        if layer.bias is not None:
            out["bias"].append(layer.bias.grad.clone())
    return {k: torch.stack(v) for k, v in out.items() if v}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].__name__}-{c[1]}to{c[2]}-g{c[7]}")
def test_grouped_conv_grad_sample_matches_autograd_and_opacus(case: tuple) -> None:
    from opacus.grad_sample.conv import compute_conv_grad_sample

    layer, x, gy = build_case(case, 5)
    bias = case[8]
    ours = conv_grad_sample_grouped(layer, [x], gy)
    theirs = compute_conv_grad_sample(layer, [x], gy)
    ref = _autograd_per_case(layer, x, gy)
    assert ours[layer.weight].shape == (5, *layer.weight.shape)
    torch.testing.assert_close(ours[layer.weight], ref["weight"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours[layer.weight], theirs[layer.weight], atol=1e-4, rtol=1e-4)
    if bias:
        torch.testing.assert_close(ours[layer.bias], ref["bias"], atol=1e-4, rtol=1e-4)
    else:
        assert set(ours) == {layer.weight}


def test_empty_batch_and_frozen_weight() -> None:
    layer = nn.Conv3d(2, 3, 3, padding=1)
    empty = conv_grad_sample_grouped(layer, [torch.zeros(0, 2, 4, 4, 4)], torch.zeros(0, 3, 4, 4, 4))
    assert empty[layer.weight].shape == (1, 3, 2, 3, 3, 3) and not empty[layer.weight].any()
    layer.weight.requires_grad_(False)
    x = torch.randn(2, 2, 4, 4, 4)
    only_bias = conv_grad_sample_grouped(layer, [x], torch.ones(2, 3, 4, 4, 4))
    assert set(only_bias) == {layer.bias}
    torch.testing.assert_close(only_bias[layer.bias], torch.full((2, 3), 64.0))


def test_non_zero_padding_mode_falls_back_to_opacus() -> None:
    from opacus.grad_sample.conv import compute_conv_grad_sample

    layer = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
    x = torch.randn(3, 2, 6, 6)
    gy = torch.randn_like(layer(x))
    torch.testing.assert_close(conv_grad_sample_grouped(layer, [x], gy)[layer.weight],
                               compute_conv_grad_sample(layer, [x], gy)[layer.weight])


def test_make_private_installs_the_grouped_sampler() -> None:
    from torch.utils.data import DataLoader

    from client.privacy.engine import CasesOnly, make_private
    from models.losses import MultiTaskLoss
    from models.network import build_model
    from tests.client_helpers import TINY

    grad_samplers.uninstall()
    assert not grad_samplers.installed()
    model = build_model(TINY)
    items = [{"image": torch.zeros(len(TINY.modalities), *TINY.spatial_size), "mask": torch.ones(len(TINY.modalities)),
              "seg": torch.zeros(TINY.spatial_size, dtype=torch.long), "label": torch.tensor(0)}] * 2
    make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(CasesOnly(items), batch_size=1),
                 MultiTaskLoss(), noise_multiplier=1.0, max_grad_norm=1.0)
    assert grad_samplers.installed()


def test_hooks_mode_per_case_gradients_of_the_network_equal_functorch() -> None:
    """On a whole fusion network, Opacus hooks + the grouped sampler give functorch's per-case gradients."""
    from opacus import GradSampleModule

    from models.losses import MultiTaskLoss
    from models.network import build_model
    from tests.client_helpers import TINY

    torch.manual_seed(0)
    nets = [build_model(TINY), build_model(TINY)]
    nets[1].load_state_dict(nets[0].state_dict())
    for net in nets:
        for m in net.modules():  # deterministic forward for the comparison
            if isinstance(m, nn.Dropout):
                m.p = 0.0
    grad_samplers.install()
    hooks = GradSampleModule(nets[0]).train()
    functorch = GradSampleModule(nets[1], force_functorch=True).train()
    g = torch.Generator().manual_seed(1)
    image = torch.randn(3, len(TINY.modalities), *TINY.spatial_size, generator=g)
    mask = torch.ones(3, len(TINY.modalities))
    mask[1, 2:] = 0
    image = image * mask[:, :, None, None, None]
    seg = torch.randint(0, 4, (3, *TINY.spatial_size), generator=g)
    label = torch.tensor([0, 1, 1])
    loss = MultiTaskLoss()
    for wrapped in (hooks, functorch):
        loss(*wrapped(image, mask), seg, label)[0].backward()
    convs = 0
    for (name, p), (_, q) in zip(nets[0].named_parameters(), nets[1].named_parameters()):
        torch.testing.assert_close(p.grad_sample, q.grad_sample, atol=1e-5, rtol=1e-4, msg=name)
        convs += name.endswith(".weight") and p.dim() == 5
    assert convs > 0
