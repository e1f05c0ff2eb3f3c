"""The shared U-shaped decoder (Y_hat = g(Z)); the case-level head is :mod:`models.classifier`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .encoders import conv_block, upsample


def decoder_widths(channels: Sequence[int], num_seg_classes: int) -> tuple[int, ...]:
    """Output width of the decoder's block at each level: the encoder's width, except at full resolution, where
    the block that feeds the 1x1 segmentation head gets at least two channels per segmentation class.

    Why: with the default ``channels[0] = 4`` the last block had 4 GroupNorm+ReLU channels for 4 classes, and the
    thin nested sub-regions (a one-voxel enhancing rim around a two-voxel core) were never separated: Dice core and
    enhancing stayed 0 in every run, while an 8-channel block learns them (``bench/recipe.py``, docs/benchmarks.md).
    Widening only this block costs one full-resolution convolution, not one per modality.
    """
    chans = tuple(int(c) for c in channels)
    if len(chans) == 1:  # no decoder blocks: the bottleneck itself reaches the head
        return chans
    return (max(chans[0], 2 * int(num_seg_classes)), *chans[1:])


class Decoder(nn.Module):
    """U-shaped decoder: from the fused bottleneck up to full resolution, one skip connection per level.

    At each level ``l = L-2 .. 0`` with output width ``w_l`` (:func:`decoder_widths`; ``w_{L-1}`` = the bottleneck's
    ``channels[-1]``): 1x1 conv ``w_{l+1} -> w_l`` + nearest x2 upsampling (no transposed convolution, so Opacus
    stays on its fast path), concatenation with the skip ``channels[l]`` features, then a 3x3 conv block
    ``w_l + channels[l] -> w_l``.

    Args:
        spatial_dims: 2 or 3.
        channels: encoder widths per level.
        out_channels: segmentation classes of the final 1x1 conv ``head``; ``None`` returns the full-resolution
            features (:attr:`out_width` channels) instead (late fusion puts per-modality heads on them).
        num_seg_classes: segmentation classes the full-resolution width is sized for (default ``out_channels``).
    """

    def __init__(
        self, spatial_dims: int, channels: Sequence[int], out_channels: int | None, num_seg_classes: int | None = None
    ) -> None:
        super().__init__()
        chans = tuple(channels)
        classes = num_seg_classes if num_seg_classes is not None else out_channels
        if classes is None:
            raise ValueError("Decoder needs num_seg_classes when out_channels is None (late fusion)")
        widths = decoder_widths(chans, classes)
        inputs = (*widths[1:-1], chans[-1]) if len(chans) > 1 else ()  # what each level's upsampling receives
        self.ups = nn.ModuleList(
            upsample(spatial_dims, inputs[l], widths[l]) for l in reversed(range(len(chans) - 1))
        )
        self.blocks = nn.ModuleList(
            conv_block(spatial_dims, widths[l] + chans[l], widths[l]) for l in reversed(range(len(chans) - 1))
        )
        #: width of the full-resolution features (what ``head`` or a late-fusion head receives)
        self.out_width: int = widths[0]
        self.head = (
            conv_block(spatial_dims, widths[0], out_channels, kernel_size=1, conv_only=True)
            if out_channels is not None
            else None
        )
        self.channels = chans

    def forward(self, bottleneck: Tensor, skips: Sequence[Tensor]) -> Tensor:
        """``bottleneck`` (B, channels[-1], *S/2**(L-1)); ``skips[l]`` (B, channels[l], *S/2**l) for l < L-1.

        Returns seg logits (B, out_channels, *S), or features (B, out_width, *S) when ``out_channels`` is None.
        """
        if len(skips) < len(self.channels) - 1:
            raise ValueError(f"decoder needs {len(self.channels) - 1} skip tensors, got {len(skips)}")
        x = bottleneck
        for i, (up, block) in enumerate(zip(self.ups, self.blocks)):
            level = len(self.channels) - 2 - i
            x = block(torch.cat([up(x), skips[level]], dim=1))
        return self.head(x) if self.head is not None else x

