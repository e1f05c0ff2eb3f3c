"""The shared U-shaped decoder (Y_hat = g(Z)); the case-level head is :mod:`models.classifier`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .encoders import conv_block, upsample


class Decoder(nn.Module):
    """U-shaped decoder: from the fused bottleneck up to full resolution, one skip connection per level.

    At each level ``l = L-2 .. 0``: 1x1 conv ``channels[l+1] -> channels[l]`` + nearest x2 upsampling (no transposed
    convolution, so Opacus stays on its fast path), concatenation with the skip ``channels[l]`` features, then a
    3x3 conv block ``2*channels[l] -> channels[l]``.

    Args:
        spatial_dims: 2 or 3.
        channels: encoder widths per level (the decoder mirrors them).
        out_channels: segmentation classes of the final 1x1 conv ``head``; ``None`` returns the full-resolution
            ``channels[0]`` features instead (late fusion puts per-modality heads on them).
    """

    def __init__(self, spatial_dims: int, channels: Sequence[int], out_channels: int | None) -> None:
        super().__init__()
        chans = tuple(channels)
        self.ups = nn.ModuleList(
            upsample(spatial_dims, chans[l + 1], chans[l]) for l in reversed(range(len(chans) - 1))
        )
        self.blocks = nn.ModuleList(
            conv_block(spatial_dims, 2 * chans[l], chans[l]) for l in reversed(range(len(chans) - 1))
        )
        self.head = (
            conv_block(spatial_dims, chans[0], out_channels, kernel_size=1, conv_only=True)
            if out_channels is not None
            else None
        )
        self.channels = chans

    def forward(self, bottleneck: Tensor, skips: Sequence[Tensor]) -> Tensor:
        """``bottleneck`` (B, channels[-1], *S/2**(L-1)); ``skips[l]`` (B, channels[l], *S/2**l) for l < L-1.

        Returns seg logits (B, out_channels, *S), or features (B, channels[0], *S) when ``out_channels`` is None.
        """
        if len(skips) < len(self.channels) - 1:
            raise ValueError(f"decoder needs {len(self.channels) - 1} skip tensors, got {len(skips)}")
        x = bottleneck
        for i, (up, block) in enumerate(zip(self.ups, self.blocks)):
            level = len(self.channels) - 2 - i
            x = block(torch.cat([up(x), skips[level]], dim=1))
        return self.head(x) if self.head is not None else x

