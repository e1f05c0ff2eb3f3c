"""Cheap model summaries: trainable parameter count and FLOPs of one forward pass."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .config import ModelConfig


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (parameters with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameters_by_owner(model: nn.Module) -> dict[str | None, int]:
    """Trainable scalars per owner modality (``None`` = shared), read from parameter names."""
    from .modalities import owner_modality

    counts: dict[str | None, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            owner = owner_modality(name)
            counts[owner] = counts.get(owner, 0) + p.numel()
    return counts


@torch.no_grad()
def estimate_flops(model: nn.Module, cfg: ModelConfig) -> int:
    """FLOPs (multiply and add counted separately) of one eval-mode forward at batch 1, all modalities present,
    input ``(1, M, *cfg.spatial_size)``, counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and
    convolutions; elementwise ops are not counted). The model's train/eval mode is restored afterwards."""
    device = next(model.parameters()).device
    m = len(cfg.modalities)
    image = torch.zeros(1, m, *cfg.spatial_size, device=device)
    mask = torch.ones(1, m, device=device)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            model(image, mask)
        return int(counter.get_total_flops())
    finally:
        model.train(was_training)
