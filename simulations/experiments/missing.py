"""Experiment ``missing``: share of missing modalities per site (0-75 %) x aggregation (plain FedAvg vs
modality-aware) x modality dropout (off vs 0.25), federated.

Data: ``iid`` phantoms (same scanner everywhere) where each site lacks a controlled share of the six modalities
(:func:`simulations.scenarios.with_missing_fraction`: site level, windows that rotate so the sites together cover
as many modalities as possible; at 75 % with 4 sites every modality is at exactly one site). The held-out set has
every modality. Sites freeze the encoders of modalities they never have (client ``set_site_modalities``), so a site
returns those encoders unchanged: plain FedAvg then averages each encoder's update with (N - n_m) unchanged copies
(shrinking it by n_m / N), modality-aware aggregation averages it over the n_m owners only.
"""

from __future__ import annotations

from .common import Context, Outcome, fmt, markdown_table, phantoms, run_federated, write_result

NAME = "missing"
TITLE = "Experiment `missing`: missing modalities per site, plain vs modality-aware aggregation, modality dropout"

#: Budget -> (missing fractions, aggregations, modality dropouts, sites).
GRID: dict[str, tuple[tuple[float, ...], tuple[str, ...], tuple[float, ...], int]] = {
    "tiny": ((0.75,), ("plain", "modality-aware"), (0.25,), 2),
    "small": ((0.0, 0.25, 0.5, 0.75), ("plain", "modality-aware"), (0.0, 0.25), 4),
    "full": ((0.0, 0.25, 0.5, 0.75), ("plain", "modality-aware"), (0.0, 0.25), 6),
}


def _realised(data_manifest: dict) -> tuple[float, str]:
    sites = data_manifest["sites"]
    have = [len(s["modalities"]) for s in sites.values()]
    share = 1.0 - sum(have) / (6.0 * len(have))
    return share, " · ".join("+".join(s["modalities"]) for s in sites.values())


def run(ctx: Context) -> str:
    """Train every cell of the grid, write the section, return its Markdown body."""
    import json

    fractions, aggregations, dropouts, n_sites = GRID[ctx.budget.name]
    results: dict[tuple[float, str, float], Outcome] = {}
    layouts: dict[float, tuple[float, str]] = {}
    for i, f in enumerate(fractions):
        data = phantoms(ctx, "iid", sites=n_sites, missing_fraction=f)
        layouts[f] = _realised(json.loads((data / "phantoms.json").read_text()))
        for agg in aggregations:
            for p in dropouts:
                label = f"missing{int(round(f * 100)):02d}-{agg}-drop{int(round(p * 100)):02d}"
                results[(f, agg, p)] = run_federated(
                    ctx, label, data, {"aggregation": agg, "model-modality-dropout": p, "model-family": "attention"}
                )
        if i < len(fractions) - 1:  # the longest experiment: keep a partial table in case it is stopped
            _write(ctx, fractions[: i + 1], aggregations, dropouts, n_sites, results, layouts,
                   partial=f"Partial: {len(results)} of {len(fractions) * len(aggregations) * len(dropouts)} runs "
                           "finished so far.")
    return _write(ctx, fractions, aggregations, dropouts, n_sites, results, layouts)


def _write(ctx: Context, fractions: tuple[float, ...], aggregations: tuple[str, ...], dropouts: tuple[float, ...],
           n_sites: int, results: dict[tuple[float, str, float], Outcome],
           layouts: dict[float, tuple[float, str]], partial: str = "") -> str:
    """Write the section for the runs in ``results`` and return its body."""
    headers = ["missing per site", "aggregation", "modality dropout", "Dice whole (all)", "Dice core", "accuracy",
               "AUROC", "Dice whole, one modality (mean / worst)"]
    rows = []
    for (f, agg, p), o in results.items():
        rows.append([f"{f:.0%} (realised {layouts[f][0]:.0%})", agg, f"{p:g}", fmt(o.get("all/dice-whole")),
                     fmt(o.get("all/dice-core")), fmt(o.get("all/accuracy")), fmt(o.get("all/auroc")),
                     f"{fmt(o.get('single-mean/dice-whole'))} / {fmt(o.get('single-worst/dice-whole'))}"])
    layout_lines = [f"- {f:.0%}: {layouts[f][1]}" for f in fractions]
    body = [
        *([f"**{partial}**", ""] if partial else []),
        f"{n_sites} phantom sites (scenario `iid` plus site-level missing modalities), attention fusion, FedAvg, "
        "no DP; held-out cases have every modality. \"all\" = evaluated with all six series, \"one modality\" = "
        "with a single series (mean and worst over the six; this is where an encoder trained at few sites shows).",
        "",
        "Modalities per site (sites separated by ·):",
        "",
        *layout_lines,
        "",
        markdown_table(headers, rows, align_right_from=3),
        "",
        "### What the numbers say",
        "",
        *findings(fractions, aggregations, dropouts, results),
    ]
    text = "\n".join(body)
    write_result(ctx, NAME, TITLE, text)
    return text


def findings(fractions: tuple[float, ...], aggregations: tuple[str, ...], dropouts: tuple[float, ...],
             results: dict[tuple[float, str, float], Outcome]) -> list[str]:
    """Differences computed from the grid, and the mechanism behind them."""
    out: list[str] = []
    if {"plain", "modality-aware"} <= set(aggregations):
        for p in dropouts:
            diffs = []
            for f in fractions:
                a, b = results.get((f, "modality-aware", p)), results.get((f, "plain", p))
                if a and b:
                    diffs.append(f"{f:.0%}: {a.get('all/dice-whole') - b.get('all/dice-whole'):+.3f} all / "
                                 f"{a.get('single-mean/dice-whole') - b.get('single-mean/dice-whole'):+.3f} one-modality")
            out.append(f"- Modality-aware minus plain Dice (dropout {p:g}): " + "; ".join(diffs) + ".")
        out.append(
            "- At 0 % missing both aggregations are the same computation (every site owns every encoder, so the "
            "per-modality weights equal the case counts); any gap there is run-to-run noise (Ray scheduling changes "
            "floating-point summation order) and sets the scale for the other differences."
        )
        out.append(
            "- Mechanism: a site freezes the encoders of modalities it lacks and returns them unchanged, so plain "
            "FedAvg scales an encoder's round update by n_m / N (the share of sites holding m: 1/4 at 75 % with 4 "
            "sites) while modality-aware aggregation applies the owners' full update. Shared layers (fusion, "
            "decoder, classifier) are averaged identically by both. With few rounds, a shrunken encoder update "
            "matters most for single-modality inputs; evaluated with all six series, the fused model can lean on "
            "whichever encoders did train, which is why the \"all\" column moves less than the one-modality column."
        )
    if len(dropouts) > 1:
        diffs = []
        for f in fractions:
            for agg in aggregations:
                a, b = results.get((f, agg, max(dropouts))), results.get((f, agg, min(dropouts)))
                if a and b:
                    diffs.append(f"{f:.0%}/{agg}: {a.get('single-mean/dice-whole') - b.get('single-mean/dice-whole'):+.3f}")
        out.append(f"- Modality dropout {max(dropouts):g} minus {min(dropouts):g}, one-modality Dice: "
                   + "; ".join(diffs) + ". Dropout trains the fusion on partial inputs, which is what the "
                   "one-modality column tests; on all six series it costs some fitting at this budget.")
    return out
