"""What the run report needs predictions for: the run's checkpoint on the held-out set.

The best (else last) checkpoint of a run directory is rebuilt and run on the held-out cases
(:mod:`common.evaluation`) for

- the classifier's ROC and operating points (paper Fig. 4): P(malignant) of every case with all its modalities;
- each modality's contribution to the fused prediction (paper Fig. 3): what the prediction loses when that modality
  alone is masked, and its attention share / late-fusion weight where the family has one
  (:func:`models.contribution.mean_contribution`).

Optional by design: a run without a checkpoint or without reachable data gets ``(None, reason)``, and nothing in here
raises, so the report (:mod:`simulations.report`) is always written. Torch and MONAI are imported only when a
checkpoint and a held-out set are both there.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.layout import LABELS_FILE, heldout_dir

log = logging.getLogger("fedfusion.report")

__all__ = [
    "CONTRIBUTION_MEASURES",
    "THRESHOLDS",
    "HeldoutResult",
    "analyse_heldout",
    "pick_checkpoint",
    "resolve_heldout_dir",
]

#: display names of ``models.contribution.modality_contribution``'s measures
CONTRIBUTION_MEASURES: dict[str, str] = {
    "dice_drop": "Dice drop (whole)",
    "class_drop": "P(true class) drop",
    "attention_share": "attention share",
    "fusion_weight": "late-fusion weight",
}
#: decision thresholds of the operating-point table
THRESHOLDS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)
#: held-out cases per forward pass
BATCH_SIZE = 4


@dataclass
class HeldoutResult:
    """What the checkpoint did on the held-out set."""

    checkpoint_name: str
    heldout_dir: Path
    num_cases: int
    checkpoint_round: int | None = None
    positives: int = 0
    #: ROC as ``(threshold, sensitivity, specificity)`` points (``models.metrics.roc_points``); empty = not computed
    roc: list[tuple[float, float, float]] = field(default_factory=list)
    auroc: float | None = None
    #: threshold on P(malignant) -> ``models.metrics.classification_metrics`` at that threshold
    operating_points: dict[float, dict[str, float]] = field(default_factory=dict)
    roc_reason: str = ""
    contribution: dict[str, dict[str, float]] = field(default_factory=dict)  # modality -> measure -> value
    contribution_reason: str = ""

    @property
    def source(self) -> str:
        """Markdown naming the checkpoint and its round, e.g. ```checkpoints/best.pt` (round 3)``."""
        tail = f" (round {self.checkpoint_round})" if self.checkpoint_round is not None else ""
        return f"`{self.checkpoint_name}`{tail}"


def resolve_heldout_dir(config: Mapping[str, Any], data_dir: Path | None) -> tuple[Path | None, str]:
    """The held-out folder: the first holding labels.csv of ``data_dir/heldout``, ``data_dir`` (when given), the run
    config's ``test-dir``, ``<data-dir>/heldout``. Returns ``(folder or None, why not)``."""
    candidates: list[Path] = []
    if data_dir is not None:
        candidates += [heldout_dir(data_dir), Path(data_dir)]
    if str(config.get("test-dir") or "").strip():
        candidates.append(Path(str(config["test-dir"])))
    if str(config.get("data-dir") or "").strip():
        candidates.append(heldout_dir(str(config["data-dir"])))
    for c in candidates:
        if (c / LABELS_FILE).is_file():
            return c, ""
    if not candidates:
        return None, "no data: pass `fedfusion report RUN --data DIR` (the run config names no data-dir/test-dir)"
    return None, (
        f"held-out set not found (looked for {LABELS_FILE} in {', '.join(str(c) for c in candidates)}); "
        "pass `--data DIR` with the data root or the held-out folder"
    )


def pick_checkpoint(run_dir: Path) -> Path | None:
    """``RUN/checkpoints/best.pt``, else ``last.pt``, else None."""
    for name in ("best.pt", "last.pt"):
        p = Path(run_dir) / "checkpoints" / name
        if p.is_file():
            return p
    return None


def analyse_heldout(
    run_dir: Path, config: Mapping[str, Any], data_dir: Path | None, device: str
) -> tuple[HeldoutResult | None, str]:
    """Predictions (ROC) and modality contributions of the best (else last) checkpoint on the held-out set.

    Args:
        run_dir: the run directory (its ``checkpoints/``).
        config: the run config (``test-dir``, ``data-dir`` locate the held-out set when ``data_dir`` is None).
        data_dir: data root or held-out folder given by the user (see :func:`resolve_heldout_dir`).
        device: ``"auto"``, ``"cpu"`` or ``"cuda[:i]"``.

    Returns:
        ``(result, "")``, or ``(None, reason)`` when any ingredient is missing. Never raises: the report must still
        be written; a failed part leaves its reason in the result (``roc_reason``, ``contribution_reason``).
    """
    ckpt = pick_checkpoint(run_dir)
    if ckpt is None:
        return None, "no checkpoint in checkpoints/ (best.pt or last.pt)"
    heldout, why = resolve_heldout_dir(config, data_dir)
    if heldout is None:
        return None, why
    try:
        import torch

        from common.evaluation import heldout_loader, load_heldout, load_model
        from models.evaluation import predict
        from models.metrics import classification_metrics, roc_points
        from models.training import resolve_device
    except ImportError as exc:
        return None, f"this checkout cannot rebuild the model or read the data ({exc})"
    try:
        dev = resolve_device(device)
        model, cfg, extra = load_model(ckpt, dev)
        dataset = load_heldout(cfg, heldout)  # cached: the contribution pass re-reads the same cases
    except Exception as exc:  # noqa: BLE001 - the report must still be written
        log.warning("report: checkpoint %s on %s unusable: %s", ckpt, heldout, exc)
        return None, f"cannot use {ckpt.name} on {heldout}: {exc}"
    ckpt_round = extra.get("round") if isinstance(extra, Mapping) else None
    result = HeldoutResult(checkpoint_name=f"checkpoints/{ckpt.name}", heldout_dir=heldout, num_cases=len(dataset),
                           checkpoint_round=None if ckpt_round is None else int(ckpt_round))
    loader = heldout_loader(dataset, BATCH_SIZE)
    # 1. ROC / operating points from the malignant probability of every case with all its modalities
    try:
        pred = predict(model, loader, dev)
        used = pred.used.bool()
        probs, labels = pred.probs[used], pred.labels[used]
        result.num_cases = int(used.sum())
        result.positives = int((labels == 1).sum())
        result.roc = [tuple(map(float, p)) for p in roc_points(probs, labels)]  # type: ignore[misc]
        result.auroc = classification_metrics(probs, labels)["auroc"]
        result.operating_points = {t: classification_metrics(probs, labels, threshold=t) for t in THRESHOLDS}
        if result.positives in (0, result.num_cases):
            result.roc_reason = "the held-out set has one class only"
    except Exception as exc:  # noqa: BLE001 - report what failed, keep the rest of the report
        log.warning("report: prediction on the held-out set failed: %s", exc)
        result.roc, result.roc_reason = [], f"prediction on {heldout} failed: {exc}"
    # 2. modality contribution (occlusion by masking; attention share where the family has attention)
    try:
        from models.contribution import mean_contribution
    except ImportError as exc:
        result.contribution_reason = f"models.contribution is not usable in this checkout ({exc})"
        return result, ""
    try:
        with torch.no_grad():
            raw = mean_contribution(model, loader, dev)
    except Exception as exc:  # noqa: BLE001
        log.warning("report: modality contribution failed: %s", exc)
        result.contribution_reason = f"modality contribution on {heldout} failed: {exc}"
        return result, ""
    result.contribution = {m: {CONTRIBUTION_MEASURES.get(k, k): v for k, v in per.items()} for m, per in raw.items()}
    if not result.contribution:
        result.contribution_reason = "no held-out case has any of the model's modalities"
    return result, ""
