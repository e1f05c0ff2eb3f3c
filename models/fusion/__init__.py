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

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ..config import ModelConfig
    from .base import Fusion

#: The registry: family name -> ``"module:Class"`` of its fusion module. Classes are imported on first use, so listing
#: the families (run-config validation, CLI help) costs no torch import. Adding a family = one module + one line.
FUSIONS: dict[str, str] = {
    "input": "models.fusion.input:InputFusion",
    "single": "models.fusion.single:SingleFusion",
    "hierarchical": "models.fusion.hierarchical:HierarchicalFusion",
    "attention": "models.fusion.attention:AttentionFusion",
    "output": "models.fusion.output:OutputFusion",
}


def check_family(family: str) -> None:
    """Raise ``ValueError`` naming the registered families when ``family`` is not one of them."""
    if family not in FUSIONS:
        raise ValueError(f"unknown fusion family {family!r}; choose one of {', '.join(FUSIONS)}")


def fusion_class(family: str) -> "type[Fusion]":
    """The fusion module class registered for ``family``."""
    check_family(family)
    module, _, name = FUSIONS[family].partition(":")
    return getattr(importlib.import_module(module), name)


def build_fusion(cfg: "ModelConfig") -> "Fusion":
    """The fusion module of ``cfg.family``."""
    return fusion_class(cfg.family)(cfg)


def __getattr__(name: str) -> Any:
    # ``from models.fusion import AttentionFusion`` keeps working, lazily.
    for spec in FUSIONS.values():
        if spec.endswith(f":{name}"):
            module, _, cls = spec.partition(":")
            return getattr(importlib.import_module(module), cls)
    if name == "Fusion":
        return importlib.import_module("models.fusion.base").Fusion
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FUSIONS", "build_fusion", "check_family", "fusion_class"]
