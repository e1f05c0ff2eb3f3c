"""Held-out evaluation for every modality subset: the robustness-to-missing-modalities table.

For a subset ``S`` of the model's modalities, every case is evaluated with the modalities outside ``S`` masked out
(mask 0 and channel zeroed); a case that lacks a modality of ``S`` simply has it missing too. A case with *no*
modality of ``S`` cannot be fed to the network; it is left out of that subset's row (the row's ``cases`` says how
many cases it covers; the held-out set normally has every modality, so this does not happen there).

Mixed supervision: the segmentation metrics of a row are means over the cases that carry a segmentation, the
classification metrics are over the cases that carry a label (the batches' ``has_seg``/``has_label`` flags; every
case counts when a batch has none). Each row reports ``cases`` (evaluated), ``cases-seg`` and ``cases-label``; a
set without any label gives NaN classification metrics and a note in :attr:`SubsetReport.notes` (likewise for
segmentations), never an error.

Rows: one per subset (``models.modalities.subset_name``), ``all`` (the full modality set: an alias of its subset
row), ``mean`` (mean over the subset rows of each metric) and ``worst`` (the worst subset per metric: minimum, or
maximum for the lower-is-better HD95).

``monotonicity-violations``: the share of pairs ``(S, S ∪ {m})`` (both evaluated, ``m ∉ S``) where adding ``m``
*lowers* Dice-whole by more than ``tolerance`` (default 0.01 absolute Dice: differences below that are noise on a
handful of held-out cases). NaN when no such pair was evaluated (e.g. ``subsets=[full]``).

Speed: the loader is read once; for every batch the per-modality encoders run once and only the fusion and decoder
run per subset (``FusionNet.forward_subsets``, several subsets stacked along the batch axis), and segmentation
metrics are computed on the fly. HD95 (distance transforms) is then the slowest part: ``hd95=False`` skips it,
``hd95="full"`` computes it for the full-modality subset only. The subsets of a batch can be split over threads
(``workers``; by default two on CPU where OpenMP's idle threads sleep, :func:`default_workers`): the fusion and
decoder of one subset are many small operations that PyTorch's intra-op threads share poorly, so two subsets at
once use two cores better than one subset on two. Each subset's numbers come from the same operations whatever
the split.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .metrics import (
    CLS_METRICS,
    DEFAULT_THRESHOLD,
    classification_metrics,
    label_map,
    lower_is_better,
    operating_threshold,
    seg_metric_names,
    segmentation_metrics,
)
from .modalities import canonical, subset_name
from .modalities import subsets as all_subsets
from .training import mask_channels, target_flags, unpack_batch

#: Default tolerance (absolute Dice-whole) of the monotonicity check.
MONOTONICITY_TOLERANCE = 0.01
#: Most threads :func:`evaluate_subsets` splits a batch's subsets over by default (measured on 2 cores only).
MAX_DEFAULT_WORKERS = 2


def default_workers(device: torch.device | str) -> int:
    """Threads :func:`evaluate_subsets` uses by default.

    More than one only on CPU with OpenMP's passive wait policy (``OMP_WAIT_POLICY=PASSIVE``, which ``fedfusion
    simulate`` sets before torch loads): there the idle intra-op threads sleep, and two subsets at once took
    0.64-0.74x the wall time of one at a time on 2 cores (three runs). With OpenMP's default active waiting two
    callers' spinning thread teams fight for the cores (1.28-1.38x; docs/benchmarks.md, "Held-out evaluation
    over every modality subset"), so it stays 1 there, as on CUDA (one stream; ``subset_batch`` stacks subsets
    instead). Never more than ``torch.get_num_threads()``: a process limited to one core (a simulated site) stays
    on one thread.
    """
    if torch.device(device).type != "cpu" or os.environ.get("OMP_WAIT_POLICY", "").strip().upper() != "PASSIVE":
        return 1
    return max(1, min(MAX_DEFAULT_WORKERS, torch.get_num_threads()))


def model_modalities(model: nn.Module) -> tuple[str, ...]:
    """The modalities (input channel order) of a FusionNet, also through an Opacus wrapper."""
    inner = getattr(model, "_module", model)
    cfg = getattr(inner, "config", None)
    if cfg is None or not hasattr(cfg, "modalities"):
        raise ValueError("cannot tell the model's modalities: pass modalities=... (model has no .config)")
    return tuple(cfg.modalities)


@dataclass
class Predictions:
    """Outputs of :func:`predict` over a loader, on CPU.

    Attributes:
        case_ids: case id per case (``""`` if the batches carry none).
        probs: (N,) float probability of the malignant class.
        labels: (N,) int64 true case labels.
        seg_pred: (N, *S) uint8 predicted label maps (argmax).
        seg_true: (N, *S) uint8 true label maps (zeros where ``has_seg`` is False).
        used: (N,) bool, False for cases left out because no modality of the mask override was present.
        has_seg: (N,) bool, whether ``seg_true`` is the case's segmentation (else a placeholder).
        has_label: (N,) bool, whether ``labels`` is the case's label (else a placeholder).
    """

    case_ids: list[str]
    probs: Tensor
    labels: Tensor
    seg_pred: Tensor
    seg_true: Tensor
    used: Tensor
    has_seg: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    has_label: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))


def _batch_flags(batch: Any, n: int) -> tuple[Tensor, Tensor]:
    """``(has_seg (n,), has_label (n,))`` bool of a batch (all True when it carries no flags)."""
    flags = target_flags(batch)
    if flags is None:
        return torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)
    return flags[0].cpu() > 0, flags[1].cpu() > 0


def _case_ids(batch: Any, n: int) -> list[str]:
    ids = batch.get("case_id") if isinstance(batch, dict) else (batch[4] if len(batch) > 4 else None)
    if ids is None:
        return [""] * n
    if isinstance(ids, str):
        return [ids]
    return [str(x) for x in ids]


@torch.inference_mode()
def predict(
    model: nn.Module,
    loader: Iterable[Any],
    device: torch.device | str,
    mask_override: Tensor | Sequence[float] | None = None,
) -> Predictions:
    """Run ``model`` over ``loader`` in eval mode.

    Args:
        mask_override: optional (M,) 0/1 keep-vector: the effective mask of each case is its own mask times this
            (so an override can only remove modalities); removed channels are zeroed.
    """
    device = torch.device(device)
    model.eval()
    keep = None if mask_override is None else torch.as_tensor(mask_override, dtype=torch.float32).to(device)
    ids: list[str] = []
    probs, labels, preds, truths, used, segs_on, labels_on = [], [], [], [], [], [], []
    for batch in loader:
        image, mask, seg, label = unpack_batch(batch)
        if image.shape[0] == 0:
            continue
        image = image.to(device).float()
        mask = mask.to(device).float()
        if keep is not None:
            if keep.numel() != mask.shape[1]:
                raise ValueError(f"mask_override has {keep.numel()} entries, the data has {mask.shape[1]} modalities")
            mask = mask * keep
        ok = mask.sum(dim=1) > 0
        ids.extend(_case_ids(batch, image.shape[0]))
        b = image.shape[0]
        prob = torch.full((b,), math.nan)
        pred = torch.zeros(seg.shape, dtype=torch.uint8)
        if bool(ok.any()):
            seg_logits, class_logits = model(mask_channels(image[ok], mask[ok]), mask[ok])
            prob[ok.cpu()] = torch.softmax(class_logits.float(), dim=1)[:, 1].cpu()
            pred[ok.cpu()] = label_map(seg_logits).to(torch.uint8).cpu()
        probs.append(prob)
        preds.append(pred)
        truths.append(seg.to(torch.uint8).cpu())
        labels.append(label.reshape(-1).long().cpu())
        used.append(ok.cpu())
        seg_on, label_on = _batch_flags(batch, b)
        segs_on.append(seg_on)
        labels_on.append(label_on)
    if not probs:
        raise ValueError("the evaluation loader yielded no cases")
    return Predictions(
        case_ids=ids,
        probs=torch.cat(probs),
        labels=torch.cat(labels),
        seg_pred=torch.cat(preds),
        seg_true=torch.cat(truths),
        used=torch.cat(used),
        has_seg=torch.cat(segs_on),
        has_label=torch.cat(labels_on),
    )


@dataclass
class SubsetReport:
    """Per-subset held-out metrics (see module docstring).

    Attributes:
        modalities: the model's modalities.
        subsets: evaluated subsets, in evaluation order.
        rows: ``name -> {metric -> value}`` for every subset name plus ``all`` (if the full set was evaluated),
            ``mean`` and ``worst``; every row also has ``cases``, ``cases-seg`` and ``cases-label`` (how many cases
            the segmentation and the classification metrics are over).
        notes: what could not be measured and why (e.g. no case carries a label: classification metrics NaN).
        monotonicity_violations: share of violating (S, S ∪ {m}) pairs (NaN without pairs).
        monotonicity_pairs: number of pairs checked.
        seconds: wall time of the evaluation.
        operating_threshold: the balanced-accuracy-optimal threshold on this set's full-modality-set probabilities
            (:func:`models.metrics.operating_threshold`; what a selection set hands to the reported evaluation), or
            ``None`` when the full set was not evaluated or its cases hold fewer than two classes.
    """

    modalities: tuple[str, ...]
    subsets: list[tuple[str, ...]]
    rows: dict[str, dict[str, float]]
    monotonicity_violations: float = math.nan
    monotonicity_pairs: int = 0
    tolerance: float = MONOTONICITY_TOLERANCE
    seconds: float = 0.0
    metric_names: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    operating_threshold: float | None = None

    def to_flat(self) -> dict[str, float]:
        """``<row>/<metric> -> value`` for every row and metric, plus ``monotonicity-violations``."""
        flat = {f"{row}/{m}": float(v) for row, vals in self.rows.items() for m, v in vals.items()}
        flat["monotonicity-violations"] = float(self.monotonicity_violations)
        return flat

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (NaN kept as ``None``)."""

        def clean(v: float) -> float | None:
            return None if not math.isfinite(v) else v

        return {
            "modalities": list(self.modalities),
            "subsets": [subset_name(s) for s in self.subsets],
            "rows": {r: {m: clean(v) for m, v in vals.items()} for r, vals in self.rows.items()},
            "monotonicity_violations": clean(self.monotonicity_violations),
            "monotonicity_pairs": self.monotonicity_pairs,
            "monotonicity_tolerance": self.tolerance,
            "seconds": self.seconds,
            "notes": list(self.notes),
        }

    def to_table(self, metrics: Sequence[str] | None = None, title: str | None = None) -> Any:
        """A ``rich.table.Table`` with one row per subset, then ``mean`` and ``worst``."""
        from rich.table import Table

        metrics = list(metrics) if metrics else [
            m for m in ("dice-whole", "dice-core", "dice-enhancing", "iou-whole", "precision-whole", "hd95-whole",
                        "accuracy", "balanced-accuracy", "f1", "auroc") if any(m in r for r in self.rows.values())
        ]
        table = Table(title=title or "held-out metrics per modality subset", show_lines=False)
        table.add_column("subset", style="bold", no_wrap=True)
        table.add_column("cases", justify="right")
        for m in metrics:
            table.add_column(m, justify="right")
        names = [subset_name(s) for s in self.subsets] + ["mean", "worst"]
        for i, name in enumerate(names):
            row = self.rows.get(name)
            if row is None:
                continue
            style = "italic" if name in ("mean", "worst") else None
            cells = [_fmt(row.get(m, math.nan)) for m in metrics]
            cases = row.get("cases", math.nan)
            table.add_row(name, "" if math.isnan(cases) else f"{cases:.0f}", *cells, style=style,
                          end_section=(i == len(self.subsets) - 1))
        table.caption = (
            f"monotonicity violations (adding a modality lowers dice-whole by > {self.tolerance:g}): "
            f"{_fmt(self.monotonicity_violations)} of {self.monotonicity_pairs} pairs"
            + "".join(f"\n{note}" for note in self.notes)
        )
        return table


def _fmt(v: float) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.3f}"


@torch.inference_mode()
def evaluate_subsets(
    model: nn.Module,
    loader: Iterable[Any],
    device: torch.device | str,
    subsets: Sequence[Sequence[str]] | None = None,
    *,
    modalities: Sequence[str] | None = None,
    hd95: bool | str = True,
    tolerance: float = MONOTONICITY_TOLERANCE,
    threshold: float = DEFAULT_THRESHOLD,
    shared_encoding: bool = True,
    subset_batch: int | None = None,
    workers: int | None = None,
) -> SubsetReport:
    """Evaluate ``model`` on ``loader`` for every subset of its modalities (or the given ``subsets``).

    Args:
        model: FusionNet (or anything with its forward; then pass ``modalities``).
        loader: held-out batches (dicts or tuples, see :func:`models.training.unpack_batch`), read once.
        device: where to run the network.
        subsets: subsets to evaluate (default: all ``2^M - 1``), each a sequence of modality names.
        modalities: the model's input modalities in channel order (default: ``model.config.modalities``).
        hd95: True or ``"all"`` = HD95 for every subset; ``"full"`` = for the full-modality subset only; False or
            ``"none"`` = never.
        tolerance: Dice-whole drop that counts as a monotonicity violation.
        threshold: malignant-probability threshold of the classification metrics.
        shared_encoding: use ``model.forward_subsets`` (encoders once per batch, fusion + decoder per subset);
            False runs one full forward per subset (the reference path; same numbers, slower). Models without
            ``forward_subsets`` always take the reference path.
        subset_batch: subsets stacked along the batch axis per decoder pass (shared path only; ``None``: the
            network's default, 1 on CPU, 8 on CUDA).
        workers: threads a batch's subsets are split over (shared path only; ``None``: :func:`default_workers`).
            The batch is encoded once and its features read by every thread; the numbers do not depend on it.

    Returns:
        :class:`SubsetReport`.
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    mods = tuple(modalities) if modalities is not None else model_modalities(model)
    wanted = all_subsets(mods) if subsets is None else [canonical(s) for s in subsets]
    for s in wanted:
        extra = [m for m in s if m not in mods]
        if extra:
            raise ValueError(f"subset {subset_name(s)} has modalities {extra} the model does not have ({mods})")
    wanted = list(dict.fromkeys(wanted))  # unique, order kept
    full = tuple(mods)
    if workers is None:
        workers = default_workers(device)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    keeps = {s: torch.tensor([1.0 if m in s else 0.0 for m in mods], device=device) for s in wanted}
    if hd95 not in (True, False, "all", "full", "none"):
        raise ValueError(f"hd95 must be True/'all', 'full' or False/'none', got {hd95!r}")
    want_hd = {s: hd95 in (True, "all") or (hd95 == "full" and s == full) for s in wanted}

    model.eval()
    per_case: dict[tuple[str, ...], dict[str, list[Tensor]]] = {s: {} for s in wanted}
    probs: dict[tuple[str, ...], list[Tensor]] = {s: [] for s in wanted}
    labels: dict[tuple[str, ...], list[Tensor]] = {s: [] for s in wanted}
    inner = getattr(model, "_module", model)  # an Opacus wrapper's plain module: no hooks needed at inference
    shared = shared_encoding and hasattr(inner, "forward_subsets")

    cases: dict[tuple[str, ...], int] = {s: 0 for s in wanted}

    def record(s: tuple[str, ...], seg_logits: Tensor, class_logits: Tensor, seg_true: Tensor, label: Tensor,
               seg_on: Tensor, label_on: Tensor) -> None:
        cases[s] += int(label.numel())
        if bool(seg_on.any()):  # segmentation metrics over the cases with a segmentation only
            pred = label_map(seg_logits).cpu()[seg_on]
            for k, v in segmentation_metrics(pred, seg_true[seg_on], hd95=want_hd[s]).items():
                per_case[s].setdefault(k, []).append(v)
        probs[s].append(torch.softmax(class_logits.float(), dim=1)[:, 1].cpu()[label_on])
        labels[s].append(label[label_on])

    def run_shared(share: list[tuple[str, ...]], image: Tensor, mask: Tensor, targets: tuple[Tensor, ...],
                   features: Any) -> None:
        """Fusion + decoder per subset of ``share`` on the batch's encoding (``FusionNet.forward_subsets``),
        recorded. Each subset belongs to one share, so no thread appends to another's lists."""
        with torch.inference_mode():  # thread-local: a pool thread does not inherit the caller's
            stacked = torch.stack([keeps[s] for s in share])
            outputs = inner.forward_subsets(image, mask, stacked, subset_batch=subset_batch, features=features)
            for s, (seg_logits, class_logits) in zip(share, outputs):
                record(s, seg_logits, class_logits, *targets)

    pool = (ThreadPoolExecutor(max_workers=workers, thread_name_prefix="subset-eval")
            if shared and workers > 1 and len(wanted) > 1 else None)
    try:
        for batch in loader:
            image, mask, seg, label = unpack_batch(batch)
            if image.shape[0] == 0:
                continue
            if image.shape[1] != len(mods):
                raise ValueError(f"batch has {image.shape[1]} modality channels, the model has {len(mods)} ({mods})")
            image = image.to(device).float()
            mask = mask.to(device).float()
            seg_cpu = seg.cpu().long()
            label_cpu = label.reshape(-1).cpu().long()
            seg_on, label_on = _batch_flags(batch, int(image.shape[0]))
            whole: list[tuple[str, ...]] = []  # subsets that leave every case of the batch some modality
            for s in wanted:
                m = mask * keeps[s]
                ok = m.sum(dim=1) > 0
                if not bool(ok.any()):
                    continue
                if shared and bool(ok.all()):
                    whole.append(s)
                    continue
                # Reference path (and cases without any modality of s): one full forward on the usable cases.
                x, m = (image, m) if bool(ok.all()) else (image[ok], m[ok])
                seg_logits, class_logits = model(mask_channels(x, m), m)
                ok_cpu = ok.cpu()
                record(s, seg_logits, class_logits, seg_cpu[ok_cpu], label_cpu[ok_cpu], seg_on[ok_cpu],
                       label_on[ok_cpu])
            if whole:
                n = 1 if pool is None else min(workers, len(whole))
                # interleaved shares (the subsets come ordered by size), one per thread
                shares = [whole[i::n] for i in range(n)]
                targets = (seg_cpu, label_cpu, seg_on, label_on)
                features = inner.encode(image, mask)  # encoders once per batch, whatever the threads
                if n == 1:
                    run_shared(shares[0], image, mask, targets, features)
                else:
                    jobs = [pool.submit(run_shared, share, image, mask, targets, features) for share in shares]
                    wait(jobs)  # every share of the batch finishes before a thread's error is raised
                    for job in jobs:
                        job.result()
    finally:
        if pool is not None:
            pool.shutdown(wait=True)

    seg_names = seg_metric_names(hd95=True)
    metric_names = seg_names + list(CLS_METRICS)
    rows: dict[str, dict[str, float]] = {}
    for s in wanted:
        row: dict[str, float] = {}
        n = sum(int(t.numel()) for t in labels[s])  # labelled cases
        n_seg = sum(int(t.numel()) for t in per_case[s].get("dice-whole", []))  # segmented cases
        for k in seg_names:
            vals = per_case[s].get(k)
            if vals:
                row[k] = float(torch.cat(vals).mean())
            elif not k.startswith("hd95-"):  # HD95 rows exist only where it was computed
                row[k] = math.nan
        if n:
            row.update(classification_metrics(torch.cat(probs[s]), torch.cat(labels[s]), threshold))
        else:
            row.update(classification_metrics(torch.empty(0), torch.empty(0, dtype=torch.long), threshold))
        row["cases"] = float(cases[s])
        row["cases-seg"] = float(n_seg)
        row["cases-label"] = float(n)
        rows[subset_name(s)] = row
    if not any(r["cases"] for r in rows.values()):
        raise ValueError("the evaluation loader yielded no usable cases")
    notes = []
    if not any(r["cases-label"] for r in rows.values()):
        notes.append("no evaluated case carries a label (labels.csv): classification metrics are undefined (NaN)")
    if not any(r["cases-seg"] for r in rows.values()):
        notes.append("no evaluated case carries a segmentation: segmentation metrics are undefined (NaN)")

    subset_rows = [rows[subset_name(s)] for s in wanted]
    mean_row: dict[str, float] = {}
    worst_row: dict[str, float] = {}
    for k in metric_names:
        if any(k not in r for r in subset_rows):
            continue  # HD95 computed for some subsets only: no mean/worst over a different set of rows
        vals = [r[k] for r in subset_rows if math.isfinite(r[k])]
        mean_row[k] = sum(vals) / len(vals) if vals else math.nan
        worst_row[k] = (max(vals) if lower_is_better(k) else min(vals)) if vals else math.nan
    for k in ("cases", "cases-seg", "cases-label"):
        mean_row[k] = worst_row[k] = min(r[k] for r in subset_rows)
    if full in wanted:
        rows["all"] = dict(rows[subset_name(full)])
    rows["mean"] = mean_row
    rows["worst"] = worst_row

    violations, pairs = monotonicity(
        {s: rows[subset_name(s)]["dice-whole"] for s in wanted}, mods, tolerance
    )
    operating = None
    if full in wanted and labels[full]:
        full_labels = torch.cat(labels[full])
        if 0 < int(full_labels.sum()) < full_labels.numel():
            operating = operating_threshold(torch.cat(probs[full]), full_labels)
    return SubsetReport(
        modalities=mods,
        subsets=wanted,
        rows=rows,
        monotonicity_violations=(violations / pairs) if pairs else math.nan,
        monotonicity_pairs=pairs,
        tolerance=tolerance,
        seconds=time.perf_counter() - t0,
        metric_names=metric_names,
        notes=notes,
        operating_threshold=operating,
    )


def monotonicity(
    score: dict[tuple[str, ...], float], modalities: Sequence[str], tolerance: float = MONOTONICITY_TOLERANCE
) -> tuple[int, int]:
    """(violations, pairs) over pairs ``(S, S ∪ {m})`` present in ``score`` with finite scores, where
    ``score[S ∪ {m}] < score[S] - tolerance``."""
    violations = pairs = 0
    for s, v in score.items():
        for m in modalities:
            if m in s:
                continue
            bigger = canonical((*s, m))
            w = score.get(bigger)
            if w is None or not (math.isfinite(v) and math.isfinite(w)):
                continue
            pairs += 1
            if w < v - tolerance:
                violations += 1
    return violations, pairs
