"""Evaluating a model on a held-out set: the one place that builds the held-out dataset, rebuilds a model from a
checkpoint and runs the per-modality-subset evaluation.

Every evaluator of fedfusion goes through here: the server's per-round :class:`server.evaluation.GlobalEvaluator`
(a state dict), ``fedfusion evaluate``, the run report's held-out analysis, the experiments' tables and the
subset-evaluation benchmark (a checkpoint file). The metrics themselves are :mod:`models.evaluation`'s; this module
only fixes how the pieces are put together, so every caller gets the same numbers for the same weights and cases:

- :func:`load_heldout`: the held-out folder as a :class:`common.data.dataset.CaseDataset` with the model's
  modalities and spatial size, no augmentation, cached in memory (passes re-read nothing);
- :func:`load_model`: checkpoint -> network on the device, in eval mode, with its config and extra state;
- :func:`heldout_loader`: the held-out cases in order, batch by batch, without touching torch's global RNG;
- :func:`evaluate_model` / :func:`evaluate_checkpoint`: :func:`models.evaluation.evaluate_subsets` over them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from common.data.dataset import CaseDataset
from common.data.site import discover_sites
from common.layout import HELDOUT_NAME, heldout_dir
from models.checkpoint import load_checkpoint, stored_threshold
from models.config import ModelConfig
from models.evaluation import SubsetReport, evaluate_subsets, model_modalities
from models.metrics import DEFAULT_THRESHOLD
from models.network import FusionNet, build_model
from models.training import resolve_device

__all__ = [
    "SUBSET_CHOICES",
    "CheckpointEvaluation",
    "evaluate_checkpoint",
    "evaluate_model",
    "heldout_loader",
    "load_heldout",
    "load_model",
    "select_subsets",
    "selection_threshold",
]

#: Named subset selections of :func:`select_subsets`.
SUBSET_CHOICES: tuple[str, ...] = ("all", "full", "full+singles")

#: A subset selection: one of :data:`SUBSET_CHOICES`, explicit subsets (modality-name sequences) or ``None`` (all).
Subsets = str | Sequence[Sequence[str]] | None


def select_subsets(subsets: Subsets, modalities: Sequence[str]) -> list[tuple[str, ...]] | None:
    """The modality subsets to evaluate for a model with ``modalities``.

    Args:
        subsets: ``"all"`` or ``None`` (every non-empty subset, ``2**M - 1``), ``"full"`` (the full modality set
            only), ``"full+singles"`` (the full set, then each single modality when the model has more than one)
            or explicit subsets.

    Returns:
        The subsets in evaluation order, or ``None`` for every subset (``evaluate_subsets``' default).

    Raises:
        ValueError: an unknown name, listing the known ones.
    """
    if subsets is None:
        return None
    if isinstance(subsets, str):
        full = tuple(modalities)
        if subsets == "all":
            return None
        if subsets == "full":
            return [full]
        if subsets == "full+singles":
            return [full, *[(m,) for m in full]] if len(full) > 1 else [full]
        raise ValueError(f"modality subsets {subsets!r} unknown; choose one of {', '.join(SUBSET_CHOICES)}")
    return [tuple(s) for s in subsets]


def load_heldout(model_config: ModelConfig, folder: str | os.PathLike[str],
                 cache_dir: str | os.PathLike[str] | None = None) -> CaseDataset:
    """The held-out set in ``folder`` as the model sees it.

    Args:
        model_config: the model to evaluate: its ``modalities`` are the channels (``M``) and its ``spatial_size``
            the grid every case is resampled to.
        folder: a site-layout folder (case folders + labels.csv), e.g. ``<data>/heldout``.
        cache_dir: an on-disk cache of the preprocessed cases (:class:`common.data.CaseDataset`'s ``cache_dir``),
            so that later processes skip reading and resampling them.

    Returns:
        Items ``image`` (M, *spatial_size) float32, ``mask`` (M,), ``seg`` (*spatial_size) int64, ``label`` ()
        int64, ``case_id``; no augmentation, cached in memory after the first read.

    Raises:
        ValueError: ``folder`` is not a folder, holds no usable case, or is a data root (whose site folders would
            otherwise be evaluated as if they were held out).
    """
    folder = Path(folder)
    found = discover_sites(folder)
    if len(found) != 1 or found[0].path != folder:
        raise ValueError(
            f"{folder} is a data root, not a held-out set; give its {HELDOUT_NAME}/ folder ({heldout_dir(folder)}) "
            "or another site-layout folder (case folders + labels.csv)"
        )
    return CaseDataset([folder], model_config.modalities, model_config.spatial_size, augment=False, cache=True,
                       cache_dir=cache_dir)


def load_model(
    checkpoint: str | os.PathLike[str], device: str | torch.device = "auto"
) -> tuple[FusionNet, ModelConfig, dict[str, Any]]:
    """Rebuild the network of a fedfusion checkpoint (``models.checkpoint``) with its weights.

    Args:
        checkpoint: a ``.pt`` file written by :func:`models.checkpoint.save_checkpoint`.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda[:i]"`` or a ``torch.device``.

    Returns:
        ``(model, config, extra)``: the network on ``device`` in eval mode, its model config, and the extra state
        saved with it (``round``, metrics, ...).

    Raises:
        FileNotFoundError / ValueError: a missing or foreign checkpoint, or an unusable device.
    """
    state, cfg, extra = load_checkpoint(checkpoint)
    dev = resolve_device(str(device))
    model = build_model(cfg)
    model.load_state_dict(state)
    return model.to(dev).eval(), cfg, extra


def heldout_loader(dataset: Dataset | Sequence[Mapping[str, Any]], batch_size: int, *,
                   pin_memory: bool = False) -> DataLoader:
    """The held-out cases in dataset order, ``batch_size`` per batch, read in this process.

    The loader has its own generator: iterating a loader draws a base seed, which would otherwise come from (and
    shift) torch's global RNG, and an evaluation must not change what a training that follows it draws.
    ``pin_memory``: batches in page-locked memory (for a CUDA device: faster host-to-GPU copies).
    """
    if batch_size < 1:
        raise ValueError(f"evaluation batch size must be at least 1, got {batch_size}")
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0,
                      generator=torch.Generator().manual_seed(0), pin_memory=pin_memory)


def evaluate_model(
    model: nn.Module,
    heldout: Dataset | Sequence[Mapping[str, Any]],
    *,
    subsets: Subsets = None,
    hd95: bool | str = "full",
    batch_size: int = 4,
    device: str | torch.device = "auto",
    threshold: float = DEFAULT_THRESHOLD,
) -> SubsetReport:
    """Per-modality-subset metrics of ``model`` on ``heldout`` (:func:`models.evaluation.evaluate_subsets`).

    Args:
        model: a FusionNet whose config matches the held-out items' modalities; it must already be on ``device``.
        heldout: :func:`load_heldout`'s dataset, or any sequence of such items.
        subsets: see :func:`select_subsets`.
        hd95: ``"full"`` (HD95 for the full modality set only), ``"all"``/True (every subset), ``"none"``/False.
        batch_size: held-out cases per forward pass.
        device: where the model runs (see :func:`load_model`).
        threshold: decision threshold on P(malignant) of the classification metrics.
    """
    wanted = select_subsets(subsets, model_modalities(model))
    dev = resolve_device(str(device))
    loader = heldout_loader(heldout, batch_size, pin_memory=dev.type == "cuda")
    return evaluate_subsets(model, loader, dev, wanted, hd95=hd95, threshold=threshold)


@dataclass
class CheckpointEvaluation:
    """One checkpoint evaluated on one held-out folder.

    Attributes:
        report: the per-subset metrics (``report.to_flat()`` for the ``<subset>/<metric>`` keys).
        config: the checkpoint's model config.
        extra: the checkpoint's extra state (``round``, ...).
        heldout: the held-out folder.
        cases: held-out cases read (usable cases of the folder).
        device: where the model ran.
    """

    report: SubsetReport
    config: ModelConfig
    heldout: Path
    cases: int
    device: torch.device
    extra: dict[str, Any] = field(default_factory=dict)


def evaluate_checkpoint(
    checkpoint: str | os.PathLike[str],
    heldout: str | os.PathLike[str],
    *,
    subsets: Subsets = "all",
    hd95: bool | str = "full",
    batch_size: int = 4,
    device: str | torch.device = "auto",
    threshold: float | None = None,
) -> CheckpointEvaluation:
    """Load ``checkpoint`` (:func:`load_model`), read the held-out folder with its config (:func:`load_heldout`)
    and evaluate it for the chosen modality subsets (:func:`evaluate_model`; arguments as there), at ``threshold``
    (e.g. :func:`selection_threshold`'s), else the decision threshold the checkpoint stores (calibrated on the
    server's selection set), else the default 0.5.

    Raises:
        FileNotFoundError / ValueError: an unusable checkpoint, held-out folder, device or subset choice.
    """
    dev = resolve_device(str(device))
    model, cfg, extra = load_model(checkpoint, dev)
    dataset = load_heldout(cfg, heldout)
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"a decision threshold is a probability in [0, 1], got {threshold}")
    cut = float(threshold) if threshold is not None else stored_threshold(extra, DEFAULT_THRESHOLD)
    report = evaluate_model(model, dataset, subsets=subsets, hd95=hd95, batch_size=batch_size, device=dev,
                            threshold=cut)
    return CheckpointEvaluation(report=report, config=cfg, heldout=Path(heldout), cases=len(dataset), device=dev,
                                extra=dict(extra) if isinstance(extra, Mapping) else {})


def selection_threshold(
    checkpoint: str | os.PathLike[str],
    select: str | os.PathLike[str],
    *,
    batch_size: int = 4,
    device: str | torch.device = "auto",
) -> tuple[float, int]:
    """The classifier's operating point for ``checkpoint`` chosen on a selection folder ``select`` (labelled cases
    the reported numbers do not come from): the balanced-accuracy-optimal threshold of its full-modality-set
    probabilities (:func:`models.metrics.operating_threshold`, what the server does with its ``validation/``
    set). Returns ``(threshold, cases read)``.

    Raises:
        ValueError: the selection folder holds cases of one class only (no operating point can be chosen on it),
            or an unusable checkpoint or folder (as :func:`evaluate_checkpoint`).
    """
    result = evaluate_checkpoint(checkpoint, select, subsets="full", hd95=False, batch_size=batch_size,
                                 device=device)
    if result.report.operating_threshold is None:
        raise ValueError(f"selection set {select}: its {result.cases} cases do not hold both classes with all of the "
                         "model's modalities, so no operating point can be chosen on it; give a labelled cohort "
                         "of both classes")
    return float(result.report.operating_threshold), result.cases
