"""The five fusion families (fusion review arXiv 2404.15022), one module each, and their registry.

===============  ==============================================================  =====================
family           what is fused, where                                            module
===============  ==============================================================  =====================
``input``        image channels, before one shared encoder (per-modality stems)  :mod:`.input`
``single``       bottleneck features, ``phi(W [H_1 || ... || H_M] + b)``          :mod:`.single`
``hierarchical`` the same formula at every encoder level (skips + bottleneck)    :mod:`.hierarchical`
``attention``    cross-modal attention between modality tokens at every level    :mod:`.attention`
``output``       per-modality predictions, masked learned-weight average         :mod:`.output`
===============  ==============================================================  =====================
"""

from __future__ import annotations

from ..config import FUSION_FAMILIES, ModelConfig
from .attention import AttentionFusion
from .base import Fusion
from .hierarchical import HierarchicalFusion
from .input import InputFusion
from .output import OutputFusion
from .single import SingleFusion

#: family name -> fusion class.
FUSIONS: dict[str, type[Fusion]] = {
    "input": InputFusion,
    "single": SingleFusion,
    "hierarchical": HierarchicalFusion,
    "attention": AttentionFusion,
    "output": OutputFusion,
}
assert set(FUSIONS) == set(FUSION_FAMILIES), "every family in models.config.FUSION_FAMILIES needs a fusion module"


def build_fusion(cfg: ModelConfig) -> Fusion:
    """The fusion module of ``cfg.family``."""
    try:
        cls = FUSIONS[cfg.family]
    except KeyError:
        raise ValueError(f"unknown fusion family {cfg.family!r}; choose one of {', '.join(FUSIONS)}") from None
    return cls(cfg)


__all__ = [
    "FUSIONS",
    "AttentionFusion",
    "Fusion",
    "HierarchicalFusion",
    "InputFusion",
    "OutputFusion",
    "SingleFusion",
    "build_fusion",
]
