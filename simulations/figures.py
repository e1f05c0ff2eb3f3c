"""PNG figures of the run report, drawn from plain numbers (no run-directory knowledge here).

Every function takes already-extracted series and writes one PNG. Figures are drawn on a
``matplotlib.figure.Figure`` with the Agg canvas directly, never through ``pyplot``: no global backend switch
(``fedfusion simulate`` may run inside a process that uses another backend), no global figure registry to leak,
and it works headless.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from models.atomic import atomic_write

#: A series of ``(round, value)`` points; ``value`` None = not recorded (e.g. non-finite in the log).
Series = Sequence[tuple[int, float | None]]

_DPI = 110


def _figure(width: float = 7.0, height: float = 4.2):  # -> matplotlib.figure.Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically (temp file then rename), so a reader never sees half a file."""
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=_DPI))
    return Path(path)


def _xy(series: Series) -> tuple[list[int], list[float]]:
    """Points with a recorded value, sorted by round."""
    pts = sorted((int(r), float(v)) for r, v in series if v is not None)
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot_lines(ax, lines: Mapping[str, Series], styles: Mapping[str, str] | None = None) -> bool:
    drawn = False
    for label, series in lines.items():
        x, y = _xy(series)
        if not x:
            continue
        ax.plot(x, y, (styles or {}).get(label, "-"), marker="o", markersize=3, label=label)
        drawn = True
    return drawn


def _integer_rounds(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def global_dice_figure(
    dice: Mapping[str, Series], classification: Mapping[str, Series], path: Path
) -> Path:
    """The paper's Fig. 2: global Dice per round (left) and the global classifier over rounds (right).

    Args:
        dice: label -> Dice series, e.g. ``{"all / whole": [...], "mean subset / whole": [...]}`` (Dice in [0, 1]).
        classification: label -> series for accuracy / AUROC of the all-modality input (in [0, 1]).
        path: PNG to write.
    """
    fig = _figure(10.0, 4.2)
    ax1, ax2 = fig.subplots(1, 2)
    styles = {k: "--" for k in dice if k.startswith(("mean", "worst"))}
    _round_panel(ax1, dice, styles, "no server evaluation recorded", "Global Dice per round (held-out set)", "Dice")
    _round_panel(ax2, classification, {}, "no classification metrics", "Global classifier per round", "score")
    return _save(fig, path)


def _round_panel(ax: Any, series: Mapping[str, Series], styles: Mapping[str, str], empty: str,
                 title: str, ylabel: str) -> None:
    """One per-round line panel on a [0, 1] scale, saying ``empty`` when there is nothing to draw."""
    if not _plot_lines(ax, series, styles):
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
    ax.set(title=title, xlabel="round", ylabel=ylabel, ylim=(0.0, 1.0))
    _integer_rounds(ax)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")


def contribution_figure(
    values: Mapping[str, Mapping[str, float | None]], path: Path, *, title: str, ylabel: str
) -> Path:
    """The paper's Fig. 3: each modality's contribution as grouped bars.

    Args:
        values: modality -> {measure: value}; one bar group per modality, one bar per measure (e.g. Dice drop
            per region when the modality is left out). None values are drawn as missing bars.
        title, ylabel: axis texts (say the unit: Dice points, probability, attention share).
    """
    import numpy as np

    mods = list(values)
    measures: list[str] = []
    for per in values.values():
        measures.extend(k for k in per if k not in measures)
    fig = _figure(max(5.0, 1.1 * len(mods) + 2.5), 4.0)
    ax = fig.subplots()
    if not mods or not measures:
        ax.text(0.5, 0.5, "no contribution measured", ha="center", va="center", transform=ax.transAxes)
    else:
        width = 0.8 / len(measures)
        x = np.arange(len(mods))
        for i, measure in enumerate(measures):
            ys = [values[m].get(measure) for m in mods]
            heights = [float("nan") if y is None else float(y) for y in ys]
            ax.bar(x + (i - (len(measures) - 1) / 2) * width, heights, width, label=measure)
        ax.set_xticks(x, mods)
        ax.axhline(0.0, color="black", linewidth=0.8)
        if len(measures) > 1:
            ax.legend(fontsize=7, loc="best")
    ax.set(title=title, ylabel=ylabel, xlabel="modality")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def roc_figure(
    fpr: Sequence[float],
    tpr: Sequence[float],
    thresholds: Sequence[float],
    auroc: float | None,
    path: Path,
    *,
    specificity: Sequence[float] | None = None,
) -> Path:
    """The paper's Fig. 4: ROC curve (left) and sensitivity / specificity over decision thresholds (right).

    Args:
        fpr, tpr: ROC points in [0, 1], same length, thresholds descending.
        thresholds: the malignant-probability threshold of each point (the first may be +inf: predict none).
        auroc: area under the ROC curve, shown in the legend.
        specificity: ``1 - fpr`` unless given.
    """
    import numpy as np

    fpr_a, tpr_a = np.asarray(fpr, float), np.asarray(tpr, float)
    thr = np.asarray(thresholds, float)
    spec = 1.0 - fpr_a if specificity is None else np.asarray(specificity, float)
    fig = _figure(10.0, 4.2)
    ax1, ax2 = fig.subplots(1, 2)
    label = "ROC" if auroc is None else f"ROC (AUROC {auroc:.3f})"
    ax1.plot(fpr_a, tpr_a, marker="o", markersize=2, label=label)
    ax1.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    ax1.set(title="Classifier ROC (held-out set)", xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)",
            xlim=(0, 1), ylim=(0, 1.02))
    ax1.legend(fontsize=8, loc="lower right")
    ax1.grid(alpha=0.3)
    # Step functions over a threshold grid: at threshold t the operating point is the ROC point with the smallest
    # threshold >= t (predicted malignant iff p >= t); thresholds are descending and thr[0] = +inf, so that is
    # the last point of the prefix with thr >= t.
    grid = np.linspace(0.0, 1.0, 201)
    idx = np.array([int(np.sum(thr >= t)) - 1 for t in grid]).clip(0)
    ax2.plot(grid, tpr_a[idx], label="sensitivity")
    ax2.plot(grid, spec[idx], label="specificity")
    ax2.set(title="Sensitivity over decision thresholds", xlabel="threshold on P(malignant)", ylabel="rate",
            xlim=(0, 1), ylim=(0, 1.02))
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    return _save(fig, path)


def site_series_figure(
    series: Mapping[str, Series],
    path: Path,
    *,
    title: str,
    ylabel: str,
    log_y: bool = False,
    limit: float | None = None,
    limit_label: str = "limit",
) -> Path:
    """One line per site over rounds (privacy spent, training loss).

    Args:
        limit: optional horizontal reference line (e.g. the run's target ε); the y axis then starts at 0.
    """
    fig = _figure(7.0, 4.0)
    ax = fig.subplots()
    if not _plot_lines(ax, series):
        ax.text(0.5, 0.5, "not recorded in this run", ha="center", va="center", transform=ax.transAxes)
    elif log_y:
        ax.set_yscale("log")
    if limit is not None and math.isfinite(limit):
        ax.axhline(limit, color="red", linestyle=":", label=f"{limit_label} {limit:g}")
        ax.set_ylim(bottom=0.0, top=max(ax.get_ylim()[1], limit * 1.05))
    ax.set(title=title, xlabel="round", ylabel=ylabel)
    _integer_rounds(ax)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2 if len(series) > 6 else 1)
    return _save(fig, path)


def subset_dice_figure(rows: Sequence[tuple[str, float | None]], path: Path, *, title: str) -> Path:
    """Horizontal bars of whole-lesion Dice for every modality subset (rows in display order)."""
    import numpy as np

    fig = _figure(7.0, max(3.0, 0.16 * len(rows) + 1.2))
    ax = fig.subplots()
    names = [r[0] for r in rows]
    vals = [float("nan") if r[1] is None else float(r[1]) for r in rows]
    y = np.arange(len(rows))
    ax.barh(y, vals, height=0.75)
    ax.set_yticks(y, names, fontsize=6 if len(rows) > 20 else 8)
    ax.invert_yaxis()
    ax.margins(y=0.01)
    ax.set(title=title, xlabel="Dice (whole lesion)", xlim=(0.0, 1.0))
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)
