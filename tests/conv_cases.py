"""Convolution test cases shared by the per-case sampler and fast-path tests: a case is
``(conv class, in, out, kernel, stride, padding, dilation, groups, bias, spatial)``."""

from __future__ import annotations

import torch
from torch import nn


def build_case(case: tuple, batch: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """``(layer, input (batch, in, *spatial), output gradient)`` of ``case``, seeded (0)."""
    cls, cin, cout, k, stride, pad, dil, groups, bias, spatial = case
    torch.manual_seed(0)
    layer = cls(cin, cout, k, stride=stride, padding=pad, dilation=dil, groups=groups, bias=bias)
    x = torch.randn(batch, cin, *spatial)
    return layer, x, torch.randn_like(layer(x))
