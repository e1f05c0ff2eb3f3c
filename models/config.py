"""The model config: one small serialisable object that rebuilds any fedfusion network.

It travels inside every checkpoint and in the run config (Flower's flat ``ConfigRecord`` via
:meth:`ModelConfig.to_flat` / :meth:`ModelConfig.from_flat`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from .modalities import MODALITIES, canonical

#: The five fusion families of the fusion review (arXiv 2404.15022).
FUSION_FAMILIES: tuple[str, ...] = ("input", "single", "hierarchical", "attention", "output")

#: Segmentation labels (BraTS-like): 0 background, 1 oedema, 2 non-enhancing core, 3 enhancing rim.
SEG_LABELS: dict[int, str] = {0: "background", 1: "oedema", 2: "core", 3: "enhancing"}

#: Evaluation regions as unions of labels (BraTS convention): whole lesion, tumour core, enhancing.
SEG_REGIONS: dict[str, tuple[int, ...]] = {
    "oedema": (1,),
    "core": (2,),
    "enhancing": (3,),
    "whole": (1, 2, 3),
}

#: Case-level classes for clinical decision support.
CLASS_NAMES: tuple[str, ...] = ("benign", "malignant")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a fusion network.

    Attributes:
        family: fusion family, one of :data:`FUSION_FAMILIES`.
        modalities: modalities the network has inputs for, canonical order (a subset of :data:`MODALITIES`).
        spatial_dims: 2 (slices, input ``(B, M, H, W)``) or 3 (volumes, input ``(B, M, D, H, W)``).
        spatial_size: input size the data is resized to, ``(D, H, W)`` for 3D or ``(H, W)`` for 2D, voxels.
        channels: feature width at each encoder level (depth = ``len(channels)``); the last is the fused width.
        num_seg_classes: segmentation classes including background (see :data:`SEG_LABELS`).
        num_classes: case-level classes (see :data:`CLASS_NAMES`).
        attention_heads: heads of the cross-modal attention (``attention`` family).
        modality_dropout: training-time probability of dropping each present modality (never all).
        dropout: dropout before the classifier.
    """

    family: str = "attention"
    modalities: tuple[str, ...] = MODALITIES
    spatial_dims: int = 3
    spatial_size: tuple[int, ...] = (16, 32, 32)
    channels: tuple[int, ...] = (8, 16, 32)
    num_seg_classes: int = len(SEG_LABELS)
    num_classes: int = len(CLASS_NAMES)
    attention_heads: int = 2
    modality_dropout: float = 0.25
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.family not in FUSION_FAMILIES:
            raise ValueError(
                f"unknown fusion family {self.family!r}; choose one of {', '.join(FUSION_FAMILIES)}"
            )
        object.__setattr__(self, "modalities", canonical(self.modalities))
        object.__setattr__(self, "spatial_size", tuple(int(s) for s in self.spatial_size))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if len(self.spatial_size) != self.spatial_dims:
            raise ValueError(
                f"spatial_size {self.spatial_size} has {len(self.spatial_size)} axes but spatial_dims is "
                f"{self.spatial_dims}; give (D, H, W) for 3D or (H, W) for 2D"
            )
        down = 2 ** (len(self.channels) - 1)
        if any(s % down for s in self.spatial_size):
            raise ValueError(
                f"spatial_size {self.spatial_size} must be divisible by {down} "
                f"(2 ** (depth - 1) for channels {self.channels})"
            )
        if not 0.0 <= self.modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1), got {self.modality_dropout}")
        if self.channels[-1] % self.attention_heads:
            raise ValueError(
                f"fused width {self.channels[-1]} must be divisible by attention_heads {self.attention_heads}"
            )

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Rebuild from :meth:`to_dict` output; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys are {sorted(known)}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))

    def to_flat(self, prefix: str = "model-") -> dict[str, str | int | float]:
        """Flat dict for Flower's run config / ``ConfigRecord`` (keys ``model-<field>`` with dashes;
        sequences as comma-separated strings)."""
        out: dict[str, str | int | float] = {}
        for k, v in self.to_dict().items():
            out[prefix + k.replace("_", "-")] = ",".join(str(x) for x in v) if isinstance(v, list) else v
        return out

    @classmethod
    def from_flat(cls, flat: dict[str, Any], prefix: str = "model-") -> "ModelConfig":
        """Inverse of :meth:`to_flat`; missing keys take the defaults, other keys are ignored."""
        types = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for name, f in types.items():
            key = prefix + name.replace("_", "-")
            if key not in flat:
                continue
            value = flat[key]
            if name == "modalities":
                value = tuple(s for s in str(value).split(",") if s.strip())
            elif name in ("spatial_size", "channels"):
                value = tuple(int(s) for s in str(value).split(",") if s.strip())
            elif name in ("spatial_dims", "num_seg_classes", "num_classes", "attention_heads"):
                value = int(value)
            elif name in ("modality_dropout", "dropout"):
                value = float(value)
            else:
                value = str(value)
            kwargs[name] = value
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "ModelConfig":
        data = self.to_dict()
        data.update({k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()})
        return ModelConfig.from_dict(data)
