"""Per-modality feature encoders and the small MONAI building blocks shared by every fusion network.

Every block here is Opacus-ready by construction: convolutions + GroupNorm + ReLU (no BatchNorm, no InstanceNorm
with running statistics, no PReLU -- MONAI's default activation -- and no transposed convolution), so that
``opacus.validators.ModuleValidator.validate(model)`` is clean and every layer is on Opacus's fast per-sample
gradient path (hooks for Conv2d/Conv3d/GroupNorm/Linear/LayerNorm/Embedding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, ResidualUnit, UpSample
from torch import Tensor, nn

#: Activation of every block (MONAI name). ReLU keeps Opacus on its fast path; PReLU would not.
ACT: str = "RELU"


def norm_groups(channels: int) -> int:
    """GroupNorm group count for ``channels``: the largest of 8, 4, 2 that leaves at least two channels per
    group, else 1 (group statistics over one channel would be instance norm, noisy at these widths)."""
    for g in (8, 4, 2):
        if channels % g == 0 and channels // g >= 2:
            return g
    return 1


def norm(channels: int) -> tuple[str, dict[str, int]]:
    """MONAI norm spec: GroupNorm sized for ``channels`` (per-sample statistics, so DP-SGD-compatible)."""
    return ("group", {"num_groups": norm_groups(channels)})


def conv_block(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    *,
    kernel_size: int = 3,
    strides: int = 1,
    conv_only: bool = False,
    bias: bool = True,
) -> Convolution:
    """One MONAI ``Convolution`` (conv -> GroupNorm -> ReLU, or the bare conv with ``conv_only``), 'same' padding."""
    return Convolution(
        spatial_dims,
        in_channels,
        out_channels,
        strides=strides,
        kernel_size=kernel_size,
        act=ACT,
        norm=norm(out_channels),
        conv_only=conv_only,
        bias=bias,
    )


def residual_block(spatial_dims: int, in_channels: int, out_channels: int, *, strides: int = 1) -> ResidualUnit:
    """MONAI ``ResidualUnit`` with two conv-GroupNorm-ReLU subunits; ``strides=2`` halves every spatial axis."""
    return ResidualUnit(
        spatial_dims,
        in_channels,
        out_channels,
        strides=strides,
        kernel_size=3,
        subunits=2,
        act=ACT,
        norm=norm(out_channels),
    )


def upsample(spatial_dims: int, in_channels: int, out_channels: int) -> UpSample:
    """x2 upsampling without transposed convolution: a 1x1 conv to ``out_channels`` at the low resolution
    (cheaper than after upsampling) then nearest-neighbour ``nn.Upsample`` (MONAI ``UpSample`` "nontrainable")."""
    return UpSample(
        spatial_dims,
        in_channels,
        out_channels,
        scale_factor=2,
        mode="nontrainable",
        pre_conv="default",
        interp_mode="nearest",
        align_corners=None,
    )


class Encoder(nn.Module):
    """A feature pyramid encoder: level 0 at full resolution, each later level halves every spatial axis.

    Level 0 is a residual unit ``in_channels`` -> ``channels[0]`` at full resolution; level ``l > 0`` is a strided
    residual unit ``channels[l-1]`` -> ``channels[l]`` (two conv-GroupNorm-ReLU subunits each).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (1 for a per-modality encoder; ``channels[0]`` after a stem).
        channels: width per level; depth = ``len(channels)``.
        stem: False when a fusion stem already produced ``channels[0]`` features at full resolution (then
            ``in_channels`` must equal ``channels[0]``).
    """

    def __init__(self, spatial_dims: int, in_channels: int, channels: Sequence[int], *, stem: bool = True) -> None:
        super().__init__()
        if not channels:
            raise ValueError("encoder needs at least one level in channels, e.g. channels=(8, 16, 32)")
        if not stem and in_channels != channels[0]:
            raise ValueError(
                f"without a stem the input must have channels[0]={channels[0]} channels, got {in_channels}"
            )
        # Level 0 is a single residual unit (two convs) at full resolution: it runs once per modality, and on the
        # DP path its per-sample conv gradients are the most expensive part of the network.
        levels: list[nn.Module] = [residual_block(spatial_dims, in_channels, channels[0])]
        for prev, cur in zip(channels[:-1], channels[1:]):
            levels.append(residual_block(spatial_dims, prev, cur, strides=2))
        self.levels = nn.ModuleList(levels)
        self.channels = tuple(channels)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``x`` (B, C_in, *S) -> features ``[H^0, ..., H^{L-1}]``, ``H^l`` of shape (B, channels[l], *S / 2**l)."""
        feats: list[Tensor] = []
        for level in self.levels:
            x = level(x)
            feats.append(x)
        return feats


def masked_mean(features: Sequence[Tensor], mask: Tensor) -> Tensor:
    """Mean of per-modality feature maps over the modalities present in each sample.

    Args:
        features: M tensors (B, C, *S), one per modality in config order.
        mask: (B, M) float 0/1 availability; every sample must have at least one modality present.

    Returns:
        (B, C, *S). A missing modality's features are multiplied by exactly 0, so they never contribute.
    """
    return masked_mean_stacked(torch.stack(list(features), dim=1), mask)


def masked_mean_stacked(stacked: Tensor, mask: Tensor) -> Tensor:
    """:func:`masked_mean` of features already stacked along dim 1: (B, M, C, *S), mask (B, M) -> (B, C, *S)."""
    w = mask.reshape(*mask.shape, *([1] * (stacked.dim() - 2))).to(stacked.dtype)
    count = mask.sum(dim=1).clamp_min(1.0).reshape(-1, *([1] * (stacked.dim() - 2))).to(stacked.dtype)
    return (stacked * w).sum(dim=1) / count
