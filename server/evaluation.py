"""Global evaluation of the global model on the server's held-out set, and aggregation of site metrics.

* :class:`GlobalEvaluator` evaluates a state dict on the held-out set (``test-dir``, default
  ``<data-dir>/heldout``) for every non-empty modality subset, through :mod:`common.evaluation` like every other
  held-out evaluator (``models.evaluation.evaluate_subsets``: encoders once per batch, fusion + decoder per
  subset): segmentation Dice/IoU/precision per region (HD95 for the full modality set only unless ``eval-hd95``
  says otherwise), classification accuracy/recall/specificity/F1/AUROC, per subset plus ``all``, ``mean`` and
  ``worst``. Its flat metrics go to the metrics log with phase ``server-eval``.
* :func:`server.aggregation.weighted_metrics` (re-exported here) averages the sites' metrics weighted by
  ``num-examples``.

The held-out set is read once per server process and its preprocessed cases are cached on disk beside it
(``<data-root>/.fedfusion-cache/<folder>``, :func:`common.layout.derived_cache_dir`, when that folder is writable);
a missing or unreadable test set disables global evaluation with a clear log line instead of stopping the
federation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from common.layout import HELDOUT_NAME, LABELS_FILE, derived_cache_dir
from models.config import ModelConfig
from models.metrics import DEFAULT_THRESHOLD

from .aggregation import weighted_metrics

__all__ = ["GlobalEvaluator", "EvalOutcome", "SUBSET_MEAN", "subset_mean", "weighted_metrics"]

logger = logging.getLogger(__name__)


#: Row of the selection score: each metric averaged over the run config's ``select-subsets`` (``best-metric``'s
#: default is ``subset-mean/dice-whole``). Not ``mean/``: that row is the mean over all ``2**M - 1`` subsets.
SUBSET_MEAN = "subset-mean"

#: Per-subset bookkeeping, not metrics: left out of the subset mean.
_NOT_AVERAGED = ("cases", "cases-seg", "cases-label", "threshold")


def subset_mean(flat: Mapping[str, float], names: Sequence[str]) -> dict[str, float] | None:
    """``subset-mean/<metric>``: each metric of ``flat`` averaged over the subsets ``names`` (finite values only).

    Args:
        flat: one evaluation's ``"<subset>/<metric>"`` metrics (:attr:`EvalOutcome.flat`).
        names: subset names (:func:`models.modalities.subset_name`), e.g. the full set and each single modality.

    Returns:
        The averaged metrics, or ``None`` when ``flat`` lacks one of the subsets (it was not evaluated).
    """
    rows: list[dict[str, float]] = []
    for name in names:
        row = {k[len(name) + 1:]: float(v) for k, v in flat.items() if k.startswith(f"{name}/")}
        if not row:
            return None
        rows.append(row)
    out: dict[str, float] = {}
    for metric in rows[0] if rows else ():
        if metric in _NOT_AVERAGED:
            continue
        vals = [r[metric] for r in rows if metric in r and math.isfinite(r[metric])]
        out[f"{SUBSET_MEAN}/{metric}"] = sum(vals) / len(vals) if vals else math.nan
    return out


class EvalOutcome:
    """One global evaluation: the flat metrics (``"<subset>/<metric>"`` -> value), the per-subset table, and the
    balanced-accuracy-optimal decision threshold on this cohort's full-modality-set cases (``None``: fewer than two
    classes, or the full set not evaluated)."""

    def __init__(self, flat: dict[str, float], table: Any, operating_threshold: float | None = None) -> None:
        self.flat = flat
        self.table = table
        self.operating_threshold = operating_threshold


class GlobalEvaluator:
    """Evaluates global weights on the held-out set, for every non-empty modality subset.

    Args:
        model_config: the run's model config (the held-out volumes are resampled to its ``spatial_size``).
        test_dir: a site-layout folder (case folders, optional labels.csv) holding all modalities; the
            segmentation metrics are over its cases with a segmentation, the classification metrics over its
            labelled cases (rows count both: ``cases-seg``, ``cases-label``).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:i]"``.
        batch_size: held-out cases per forward pass.
        subsets: modality subsets to evaluate (``None`` = all ``2**M - 1``).
        dataset: an already built dataset (tests, or callers that hold one); skips reading ``test_dir``.
        hd95: HD95 for the full modality set only (``"full"``, run config ``eval-hd95``), every subset
            (``"all"``) or never (``"none"``); the distance transforms dominate an every-subset evaluation.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        test_dir: str | Path,
        device: str = "auto",
        batch_size: int = 2,
        subsets: Sequence[Sequence[str]] | None = None,
        dataset: Any | None = None,
        hd95: str = "full",
    ) -> None:
        if hd95 not in ("full", "all", "none"):
            raise ValueError(f"global evaluation hd95 (run config 'eval-hd95') is {hd95!r}; choose full, all or none")
        self.hd95 = hd95
        self.model_config = model_config
        self.test_dir = Path(test_dir)
        self.device_name = device
        self.batch_size = batch_size
        self.subsets = [tuple(s) for s in subsets] if subsets is not None else None
        self._dataset = dataset
        self._model: torch.nn.Module | None = None
        self._disabled_reason: str | None = None

    @property
    def disabled_reason(self) -> str | None:
        """Why global evaluation is off (``None`` while it works)."""
        return self._disabled_reason

    def _device(self) -> torch.device:
        from models.training import resolve_device

        return resolve_device(self.device_name)

    def _load(self) -> bool:
        if self._disabled_reason is not None:
            return False
        if self._dataset is None:
            if not self.test_dir.is_dir():
                self._disabled_reason = (
                    f"held-out test set {self.test_dir} does not exist; set run config `test-dir` to a site-layout "
                    f"folder (case folders + {LABELS_FILE}) or generate phantoms (their {HELDOUT_NAME}/ folder)"
                )
                logger.warning("global evaluation disabled: %s", self._disabled_reason)
                return False
            try:
                from common.evaluation import load_heldout

                # preprocessed once per data set, next to it when its folder is writable (the simulations'
                # held-out set is the phantoms' heldout/)
                cache = derived_cache_dir(self.test_dir)
                self._dataset = load_heldout(self.model_config, self.test_dir,
                                             cache_dir=None if cache is None else cache / "preprocessed")
            except Exception as exc:  # noqa: BLE001 - a bad test set must not stop the federation
                self._disabled_reason = f"cannot read held-out test set {self.test_dir}: {exc}"
                logger.warning("global evaluation disabled: %s", self._disabled_reason)
                return False
            if len(self._dataset) == 0:
                self._disabled_reason = f"held-out test set {self.test_dir} holds no cases"
                logger.warning("global evaluation disabled: %s", self._disabled_reason)
                return False
        return True

    def evaluate(self, state_dict: Mapping[str, torch.Tensor], subsets: str | None = None,
                 threshold: float = DEFAULT_THRESHOLD) -> EvalOutcome | None:
        """Evaluate ``state_dict`` (the plain model's names) on the held-out set, classifying at ``threshold``
        (the operating point the selection set chose, :class:`EvalOutcome`).

        ``subsets``: a name of :data:`common.evaluation.SUBSET_CHOICES` for this evaluation instead of the
        evaluator's own subsets (run config ``eval-subsets`` for the rounds before the last). With fewer than every
        subset, the ``mean``/``worst`` rows and the monotonicity count are left out: they would summarise a
        different set of subsets than the same keys of a full evaluation.

        Returns:
            the flat metrics and per-subset table, or ``None`` when global evaluation is disabled or failed
            (the reason is logged; the federation goes on).
        """
        if not self._load():
            return None
        from common.evaluation import evaluate_model
        from models.network import build_model

        try:
            device = self._device()  # an unusable device name fails this evaluation, not the server
            if self._model is None:
                self._model = build_model(self.model_config)
            model = self._model
            model.load_state_dict({k: torch.as_tensor(v) for k, v in state_dict.items()})
            model.to(device)
            report = evaluate_model(model, self._dataset, subsets=subsets or self.subsets, hd95=self.hd95,
                                    batch_size=self.batch_size, device=device, threshold=threshold)
        except Exception as exc:  # noqa: BLE001 - log and go on: evaluation must not kill the server
            logger.exception("global evaluation failed: %s", exc)
            return None
        for note in report.notes:  # e.g. a held-out set without labels.csv: classification metrics NaN
            logger.info("global evaluation: %s", note)
        flat = {k: float(v) for k, v in report.to_flat().items()}
        if subsets not in (None, "all"):
            flat = {k: v for k, v in flat.items()
                    if not k.startswith(("mean/", "worst/")) and k != "monotonicity-violations"}
        return EvalOutcome(flat, report.to_table(), report.operating_threshold)
