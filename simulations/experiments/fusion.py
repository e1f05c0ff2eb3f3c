"""Experiment ``fusion``: the five fusion families vs single-modality baselines, all trained federated.

Every row is a federated simulation of the same phantom federation (scenario ``scanner-skew``: every site has all
six modalities, scanners differ), the same budget and seed, without DP, with modality-aware aggregation. Fusion
rows use all six modalities; baselines are one-modality networks (``input`` family over a single channel). All rows
are evaluated on the same held-out cases: with all of the row's modalities, and (fusion rows) with each single
modality present, which shows how well a fused model degrades when only one series is available.
"""

from __future__ import annotations

from pathlib import Path

from common.layout import heldout_dir
from models.fusion import FUSIONS

from .common import (Context, Outcome, budget_notes, fmt, foreground_ratio, markdown_table, modality_reliance,
                     phantoms, run_federated, write_result)

NAME = "fusion"
TITLE = "Experiment `fusion`: fusion families vs single-modality baselines (federated)"
FAMILIES = tuple(FUSIONS)  # the registry

#: Budget -> (fusion families, single-modality baselines).
GRID: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "tiny": (("attention",), ("ct",)),
    "small": (FAMILIES, ("flair", "ct", "us")),
    "full": (FAMILIES, ("t1", "t1ce", "t2", "flair", "ct", "us")),
}


def run(ctx: Context) -> str:
    """Train every row, write the section, return its Markdown body."""
    families, baselines = GRID[ctx.budget.name]
    data = phantoms(ctx, "scanner-skew")
    fused: list[Outcome] = [run_federated(ctx, f"fusion-{f}", data, {"model-family": f}) for f in families]
    single: list[Outcome] = [
        run_federated(ctx, f"fusion-only-{m}", data, {"model-family": "input", "model-modalities": m,
                                                      "model-modality-dropout": 0.0})
        for m in baselines
    ]
    for o in fused + single:
        if "lesion-volume-ratio" not in o.metrics:  # not setdefault: that would evaluate foreground_ratio anyway
            o.metrics["lesion-volume-ratio"] = foreground_ratio(Path(o.run_dir) / "checkpoints" / "last.pt",
                                                                heldout_dir(data))
    reliance = {f: modality_reliance(Path(o.run_dir) / "checkpoints" / "last.pt", heldout_dir(data))
                for f, o in zip(families, fused)}
    headers = ["model", "modalities", "Dice whole", "Dice core", "Dice enh.", "accuracy", "AUROC",
               "Dice whole, one modality (mean / worst)", "Dice drop when masked: largest (modality)", "lesion volume predicted / true", "train s"]
    rows = []
    for f, o in zip(families, fused):
        top = max(reliance[f].items(), key=lambda kv: kv[1]) if reliance[f] else None
        rows.append([f"{f} fusion", "all six", fmt(o.get("all/dice-whole")), fmt(o.get("all/dice-core")),
                     fmt(o.get("all/dice-enhancing")), fmt(o.get("all/accuracy")), fmt(o.get("all/auroc")),
                     f"{fmt(o.get('single-mean/dice-whole'))} / {fmt(o.get('single-worst/dice-whole'))}",
                     f"{fmt(top[1])} ({top[0]})" if top else "n/a", fmt(o.get("lesion-volume-ratio"), 2),
                     f"{o.seconds:.0f}"])
    for m, o in zip(baselines, single):
        rows.append([f"{m} only", m, fmt(o.get("all/dice-whole")), fmt(o.get("all/dice-core")),
                     fmt(o.get("all/dice-enhancing")), fmt(o.get("all/accuracy")), fmt(o.get("all/auroc")),
                     "—", "—", fmt(o.get("lesion-volume-ratio"), 2), f"{o.seconds:.0f}"])
    body = [
        f"{ctx.budget.sites} phantom sites (scenario `scanner-skew`: all six modalities everywhere, different "
        "scanners), FedAvg with modality-aware aggregation, no DP, modality dropout 0.25 for fusion rows (0 for "
        "one-modality rows). Metrics: held-out means; \"one modality\" = the fusion model given a single series "
        "(mean and worst over the six). `train s` = simulation wall time.",
        "",
        markdown_table(headers, rows, align_right_from=2),
        "",
        "### What the numbers say",
        "",
        *findings(families, fused, baselines, single, reliance),
        *budget_notes(fused + single),
    ]
    text = "\n".join(body)
    write_result(ctx, NAME, TITLE, text, fused + single)
    return text


def findings(families: tuple[str, ...], fused: list[Outcome], baselines: tuple[str, ...],
             single: list[Outcome], reliance: dict[str, dict[str, float]] | None = None) -> list[str]:
    """Plain statements computed from the rows (no claim the numbers do not carry)."""
    out: list[str] = []
    if fused:
        best = max(zip(families, fused), key=lambda t: _val(t[1].get("all/dice-whole")))
        worst = min(zip(families, fused), key=lambda t: _val(t[1].get("all/dice-whole")))
        out.append(f"- Best fusion family by whole-tumour Dice: `{best[0]}` ({fmt(best[1].get('all/dice-whole'))}); "
                   f"weakest: `{worst[0]}` ({fmt(worst[1].get('all/dice-whole'))}).")
    if single and fused:
        best_single = max(zip(baselines, single), key=lambda t: _val(t[1].get("all/dice-whole")))
        better = [f for f, o in zip(families, fused)
                  if _val(o.get("all/dice-whole")) > _val(best_single[1].get("all/dice-whole"))]
        out.append(f"- Best single-modality baseline: `{best_single[0]}` "
                   f"({fmt(best_single[1].get('all/dice-whole'))}); fusion families above it: "
                   f"{', '.join(f'`{f}`' for f in better) if better else 'none'}.")
        empty = [m for m, o in zip(baselines, single) if o.get("lesion-volume-ratio") == 0.0]
        if empty:
            out.append(
                f"- {', '.join(f'`{m}`' for m in empty)} only: the network predicts no lesion at all on the held-out "
                "set (lesion volume ratio 0): after these few rounds it still sits in the all-background solution "
                "that cross-entropy favours at ~6 % lesion voxels, while the fused networks have left it (most "
                "over-segment: ratio > 1). At this budget the comparison says which networks have escaped that "
                "solution, not which segments better; `--budget full` is the meaningful comparison."
            )
        if len(better) < len(families):
            drops = [max(r.values()) for r in (reliance or {}).values() if r]
            if drops and max(drops) < 0.05:
                out.append(
                    f"- Why fusion does not beat one series here: masking any single modality changes a fused "
                    f"model's whole-tumour Dice by at most {max(drops):.3f}, i.e. at this budget the fused models do "
                    "not yet use modality-specific information; each encoder sees the lesion outline (docs/"
                    "phantoms.md: FLAIR alone has oedema-vs-brain CNR 3.1), so whole-tumour Dice needs no second "
                    "series, while six encoders are fitted from the same few cases and rounds as one. The "
                    "sub-regions (core: T1, enhancing rim: T1ce) and the malignancy label are where complementary "
                    "contrasts are needed, and they are not learnt at this budget."
                )
            else:
                out.append(
                    "- Where fusion does not beat one series: whole-tumour Dice needs no second series in these "
                    "phantoms (FLAIR alone has oedema-vs-brain CNR 3.1, docs/phantoms.md) while six encoders are "
                    "fitted from the same few cases and rounds as one; the `Dice drop when masked` column shows "
                    "which series each fused model actually leans on."
                )
    return out


def _val(v: float) -> float:
    return v if v == v else -1.0  # NaN sorts last
