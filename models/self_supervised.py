"""Self-supervised pretraining of the per-modality encoders by masked-volume reconstruction (no labels needed).

For a public cohort without segmentations or case labels: every present modality's volume is cut into patches
(:func:`patch_keep_mask`, a share ``mask_ratio`` of them zeroed), the modality's own encoder
(``encoders.<m>``) encodes the masked volume, and a light decoder shared by all modalities (the network's decoder
architecture with one output channel) reconstructs the full volume; the loss is the mean squared error on the
zeroed voxels only (as in masked autoencoders: reconstructing what is visible teaches nothing). Only the encoders
are kept afterwards (:meth:`MaskedVolumeModel.network_state`): the fusion core, decoder and classifier keep their
initialisation, which is what ``dp-trainable = shared`` then trains privately.

Families with per-modality encoders only (``single``, ``hierarchical``, ``attention``, ``output``); ``input``
fuses the channels before one shared encoder and has none to pretrain per modality.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .decoder import Decoder
from .network import FusionNet

__all__ = ["MaskedVolumeModel", "patch_keep_mask"]


def patch_keep_mask(shape: tuple[int, ...], patch: int, mask_ratio: float, generator: torch.Generator) -> Tensor:
    """``(B, M, *S)`` float 0/1: each ``patch``-sided cube of each volume kept (1) or zeroed (0) with probability
    ``mask_ratio`` of zeroing (sides of ``S`` must be divisible by ``patch``).

    Raises:
        ValueError: a patch that does not tile the volume, or a ratio outside (0, 1).
    """
    b, m, *spatial = shape
    if any(s % patch for s in spatial):
        raise ValueError(f"patch size {patch} must divide the volume {tuple(spatial)}")
    if not 0 < mask_ratio < 1:
        raise ValueError(f"mask ratio must be in (0, 1), got {mask_ratio}")
    grid = [s // patch for s in spatial]
    keep = (torch.rand((b, m, *grid), generator=generator) >= mask_ratio).float()
    for axis in range(len(spatial)):
        keep = keep.repeat_interleave(patch, dim=2 + axis)
    return keep


class MaskedVolumeModel(nn.Module):
    """A :class:`FusionNet`'s per-modality encoders plus a shared reconstruction decoder (see the module docstring).

    Args:
        network: the network whose ``encoders`` are pretrained (in place; the other parts are untouched).
    """

    def __init__(self, network: FusionNet) -> None:
        super().__init__()
        if not hasattr(network, "encoders"):
            raise ValueError(f"fusion family {network.config.family!r} has no per-modality encoders to pretrain; "
                             "use a family with them (single, hierarchical, attention, output)")
        self.network = network
        cfg = network.config
        self.reconstruct = Decoder(cfg.spatial_dims, cfg.channels, out_channels=1)

    def forward(self, image: Tensor, mask: Tensor, keep: Tensor) -> Tensor:
        """Mean squared reconstruction error on the zeroed voxels of the present modalities.

        Args:
            image: ``(B, M, *S)`` volumes (missing channels are ignored).
            mask: ``(B, M)`` availability.
            keep: ``(B, M, *S)`` 0/1 from :func:`patch_keep_mask`.

        Returns:
            A scalar loss (0 when no present voxel was zeroed).
        """
        total = image.new_zeros(())
        count = image.new_zeros(())
        for i, m in enumerate(self.network.config.modalities):
            present = mask[:, i] > 0
            if not bool(present.any()):
                continue
            x = image[present, i : i + 1]
            k = keep[present, i : i + 1]
            feats = self.network.encoders[m](x * k)
            recon = self.reconstruct(feats[-1], feats[:-1])
            hidden = 1 - k
            total = total + (((recon - x) ** 2) * hidden).sum()
            count = count + hidden.sum()
        return total / count.clamp(min=1)

    def network_state(self) -> dict[str, Tensor]:
        """The network's state dict (pretrained encoders, the rest as initialised)."""
        return {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}
