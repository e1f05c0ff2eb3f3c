"""The model config: one small serialisable object that rebuilds any fedfusion network.

It travels inside every checkpoint (:meth:`ModelConfig.to_dict`). Its run-config form (the ``model-*`` keys of
pyproject.toml's ``[tool.flwr.app.config]``, which hold the defaults) is read and written by
:mod:`common.runconfig`; nothing here restates those defaults.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from .modalities import canonical

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


#: How training drops modalities (run config ``model-modality-dropout-mode``;
#: ``models.network.apply_modality_dropout``).
MODALITY_DROPOUT_MODES: tuple[str, ...] = ("independent", "subsets")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a fusion network.

    Attributes:
        family: fusion family, a name of the registry :data:`models.fusion.FUSIONS`.
        modalities: modalities the network has inputs for, canonical order (a subset of :data:`MODALITIES`).
        spatial_dims: 2 (slices, input ``(B, M, H, W)``) or 3 (volumes, input ``(B, M, D, H, W)``).
        spatial_size: input size the data is resized to, ``(D, H, W)`` for 3D or ``(H, W)`` for 2D, voxels.
        channels: feature width at each encoder level (depth = ``len(channels)``); the last is the fused width.
        num_seg_classes: segmentation classes including background (see :data:`SEG_LABELS`).
        num_classes: case-level classes (see :data:`CLASS_NAMES`).
        attention_heads: heads of the cross-modal attention (``attention`` family).
        modality_dropout: training-time probability of dropping each present modality (never all).
        dropout: dropout before the classifier.
        modality_dropout_mode: how modalities are dropped (``models.network.apply_modality_dropout``).
        single_modality_loss: weight of the training loss on one present modality per case, drawn uniformly
            (:func:`models.training.train_epoch`): the fusion, decoder and classifier run a second time on that
            modality alone, the encoders once; 0 = off. Without it a fused model sees a lone modality in under 1 %
            of its training cases and keeps only about half of its full-set Dice on one (docs/results.md,
            ``fusion``). DP-SGD takes one pass per layer: there, with K >= 2 augmented views per case, the last
            view sees one modality alone instead (:func:`models.training.single_modality_views`, a 1/K share of
            the case's gradient whatever the weight); with fewer views, none.
    """

    family: str
    modalities: tuple[str, ...]
    spatial_dims: int
    spatial_size: tuple[int, ...]
    channels: tuple[int, ...]
    attention_heads: int
    modality_dropout: float
    dropout: float
    modality_dropout_mode: str
    single_modality_loss: float
    # facts of the label sets, not run-config choices
    num_seg_classes: int = len(SEG_LABELS)
    num_classes: int = len(CLASS_NAMES)

    def __post_init__(self) -> None:
        from .fusion import check_family  # the registry lives with the fusion modules (imported lazily there)

        check_family(self.family)
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
        if self.modality_dropout_mode not in MODALITY_DROPOUT_MODES:
            raise ValueError(f"modality_dropout_mode must be one of {', '.join(MODALITY_DROPOUT_MODES)}, got "
                             f"{self.modality_dropout_mode!r}")
        if not (math.isfinite(self.single_modality_loss) and self.single_modality_loss >= 0):
            raise ValueError(f"single_modality_loss must be a finite weight >= 0, got {self.single_modality_loss}")
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
        # configs saved before these keys existed trained with the only mode there was and without the single-modality
        # loss (facts, not defaults)
        data = {"modality_dropout_mode": "independent", "single_modality_loss": 0.0, **data}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys are {sorted(known)}")
        required = {f.name for f in fields(cls) if f.default is MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"model config lacks {missing}; a model config needs {sorted(required)}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> "ModelConfig":
        data = self.to_dict()
        data.update({k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()})
        return ModelConfig.from_dict(data)
