"""A checkpoint as a MONAI bundle (``fedfusion export --format monai-bundle``)::

    BUNDLE/configs/metadata.json    MONAI metadata: versions, network_data_format (input modalities and channels,
                                    output labels and classes), plus fedfusion's provenance under "fedfusion"
    BUNDLE/configs/inference.json   the inference workflow MONAI's ConfigParser / `python -m monai.bundle run` runs
    BUNDLE/models/model.pt          the weights: a plain state dict (loads with torch.load(weights_only=True))
    BUNDLE/docs/README.md           the model card (fedfusion.model_card)

The inference config builds the network with ``models.network.build_model`` from a ``models.config.ModelConfig``
(both ``_target_`` components), MONAI's ``SimpleInferer``, and :class:`common.bundle_workflow.StudyEvaluator`, which
reads and preprocesses each study as training does and writes what ``fedfusion predict`` writes; so a bundle needs
fedfusion installed, and its outputs equal ``fedfusion predict``'s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from common.bundle_workflow import METADATA_KEY
from common.provenance import ModelProvenance, load_provenance
from models.atomic import atomic_write_text
from models.checkpoint import atomic_torch_save, load_checkpoint
from models.config import CLASS_NAMES, SEG_LABELS, ModelConfig
from models.modalities import DICOM_MODALITY

from .model_card import model_card

__all__ = ["BUNDLE_FILES", "export_bundle", "inference_config", "bundle_metadata"]

#: Files of a bundle, relative to its folder.
BUNDLE_FILES: tuple[str, ...] = ("configs/metadata.json", "configs/inference.json", "models/model.pt",
                                 "docs/README.md")
#: MONAI's metadata schema the metadata follows.
METADATA_SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"


def inference_config(cfg: ModelConfig) -> dict[str, Any]:
    """``configs/inference.json``: ids ``bundle_root``, ``device``, ``dataset_dir``, ``dataset``, ``output_dir``,
    ``network_def``, ``network``, ``inferer``, ``evaluator`` and ``run`` (MONAI's inference
    properties); ``bundle_root``, ``dataset_dir`` and ``output_dir`` are set at run time."""
    return {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "dataset_dir": "",
        "output_dir": "$@bundle_root + '/eval'",
        "dicom_seg": True,
        "network_def": {
            "_target_": "models.network.build_model",
            "cfg": {"_target_": "models.config.ModelConfig", **cfg.to_dict()},
        },
        "network": "$@network_def.to(@device)",
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "dataset": {"_target_": "common.bundle_workflow.study_folders", "dataset_dir": "@dataset_dir"},
        "inferer": {"_target_": "monai.inferers.SimpleInferer"},
        "evaluator": {
            "_target_": "common.bundle_workflow.StudyEvaluator",
            "network": "@network",
            "dataset": "@dataset",
            "output_dir": "@output_dir",
            "provenance": {"_target_": "common.bundle_workflow.bundle_provenance", "bundle_root": "@bundle_root"},
            "inferer": "@inferer",
            "dicom_seg": "@dicom_seg",
        },
        # no "initialize": the weights are loaded by "run", since monai.bundle.load() initializes the workflow only to
        # build network_def and loads models/model.pt itself, from wherever the bundle lies
        "run": [
            "$@network.load_state_dict(torch.load(@checkpoint, map_location=@device, weights_only=True))",
            "$@evaluator.run()",
        ],
    }


def _versions() -> dict[str, str]:
    import monai
    import nibabel
    import numpy
    import pydicom
    import torch

    try:
        import highdicom

        hd_version = highdicom.__version__
    except ImportError:  # predict without DICOM SEG still works
        hd_version = "not installed"
    return {"monai": monai.__version__, "torch": torch.__version__.split("+")[0], "numpy": numpy.__version__,
            "pydicom": pydicom.__version__, "nibabel": nibabel.__version__, "highdicom": hd_version}


def bundle_metadata(cfg: ModelConfig, provenance: ModelProvenance, name: str) -> dict[str, Any]:
    """``configs/metadata.json`` (MONAI's metadata schema, plus fedfusion's model config and provenance)."""
    versions = _versions()
    version = provenance.fedfusion_version if provenance.fedfusion_version != "unknown" else "0.0.0"
    kinds = sorted({DICOM_MODALITY[m] for m in cfg.modalities})
    return {
        "schema": METADATA_SCHEMA,
        "version": version,
        "changelog": {version: f"exported by fedfusion from run {provenance.run_id}, round {provenance.round}"},
        "monai_version": versions["monai"],
        "pytorch_version": versions["torch"],
        "numpy_version": versions["numpy"],
        "required_packages_version": {"fedfusion": provenance.fedfusion_version, "pydicom": versions["pydicom"],
                                      "nibabel": versions["nibabel"], "highdicom": versions["highdicom"]},
        "name": name,
        "task": "Brain tumour sub-region segmentation and malignancy classification from any subset of "
                + ", ".join(cfg.modalities),
        "description": f"fedfusion {cfg.family} fusion network trained federatedly; inputs are any subset of the "
                       "modalities (missing ones masked), outputs a 4-class segmentation and P(malignant).",
        "authors": "fedfusion",
        "copyright": "see the training consortium",
        "data_source": provenance.data,
        "data_type": "dicom or nifti",
        "intended_use": "research only; not a medical device",
        "image_classes": f"{len(cfg.modalities)} channels: " + ", ".join(cfg.modalities),
        "label_classes": ", ".join(f"{k}: {v}" for k, v in SEG_LABELS.items()),
        "pred_classes": ", ".join(f"{i}: {c}" for i, c in enumerate(CLASS_NAMES)),
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image", "format": "magnitude", "modality": "/".join(kinds),
                    "num_channels": len(cfg.modalities), "spatial_shape": list(cfg.spatial_size), "dtype": "float32",
                    "value_range": [], "is_patch_data": False,
                    "channel_def": {str(i): m for i, m in enumerate(cfg.modalities)},
                },
                "mask": {
                    "type": "vector", "format": "availability", "num_channels": len(cfg.modalities),
                    "spatial_shape": [], "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
                    "channel_def": {str(i): f"{m} present" for i, m in enumerate(cfg.modalities)},
                },
            },
            "outputs": {
                "pred": {
                    "type": "image", "format": "segmentation", "num_channels": cfg.num_seg_classes,
                    "spatial_shape": list(cfg.spatial_size), "dtype": "float32", "value_range": [],
                    "is_patch_data": False, "channel_def": {str(k): v for k, v in SEG_LABELS.items()},
                },
                "class": {
                    "type": "vector", "format": "classification", "num_channels": cfg.num_classes,
                    "spatial_shape": [], "dtype": "float32", "value_range": [],
                    "is_patch_data": False, "channel_def": {str(i): c for i, c in enumerate(CLASS_NAMES)},
                },
            },
        },
        METADATA_KEY: {"model_config": cfg.to_dict(), "provenance": provenance.to_dict()},
    }


def export_bundle(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], *, overwrite: bool = False
                  ) -> ModelProvenance:
    """Write the MONAI bundle of ``checkpoint`` into the folder ``out`` (see the module doc).

    Raises:
        FileNotFoundError / ValueError: an unusable checkpoint, or ``out`` not empty and not an earlier bundle
            (``overwrite`` replaces an earlier bundle's files).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; give a folder for the bundle")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "configs" / "metadata.json").is_file():
            raise ValueError(f"{out} is not empty and holds no bundle; give a new or empty folder")
        if not overwrite:
            raise ValueError(f"{out} already holds a bundle; pass --overwrite to replace it")
    state_dict, cfg, extra = load_checkpoint(checkpoint)
    provenance = load_provenance(checkpoint, extra)
    name = out.resolve().name
    atomic_torch_save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, out / "models" / "model.pt")
    for relative, text in (
        ("configs/metadata.json", json.dumps(bundle_metadata(cfg, provenance, name), indent=2) + "\n"),
        ("configs/inference.json", json.dumps(inference_config(cfg), indent=2) + "\n"),
        ("docs/README.md", model_card(cfg, provenance, name)),
    ):
        atomic_write_text(out / relative, text)
    return provenance
