"""Experiment ``missing``: share of missing modalities per site (25-75 %) x aggregation (plain FedAvg vs
modality-aware), federated, with the run config's modality dropout.

Data: ``iid`` phantoms (same scanner everywhere) where each site lacks a controlled share of the six modalities
(:func:`simulations.scenarios.with_missing_fraction`: site level, windows that rotate so the sites together cover
as many modalities as possible; at 75 % with 4 sites every modality is at exactly one site). The held-out set has
every modality. Sites freeze the encoders of modalities they never have (client ``set_site_modalities``), so a site
returns those encoders unchanged: plain FedAvg then averages each encoder's update with (N - n_m) unchanged copies
(shrinking it by n_m / N), modality-aware aggregation averages it over the n_m owners only. Every run takes the same
optimizer steps; 50 % and 75 % (the targets) run every seed of the budget, the other fractions the first.

At the headline fractions both aggregations also run with FedProx on the modality encoders (run config
``proximal-mu`` = :data:`PROXIMAL_MU`, ``proximal-scope = "encoders"``): with the sites' Adam moments kept across
rounds, an owner-only encoder update compounds over the rounds under modality-aware aggregation, and the proximal
term is what was measured to hold it near the global model. On the encoders only it leaves the shared layers and the
classifier free: FedProx on every parameter (μ 0.1) held the encoders too but cost the classifier's AUROC in every
cell (docs/results.md, the 2026-11-30 FedProx runs). The findings also compare modality-aware aggregation with the
proximal term against plain FedAvg without it, the method against the baseline as a consortium would run them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .common import EVALUATION_NOTE, Context, Outcome, markdown_table, phantoms, run_federated, write_result
from .stats import Summary, against, cell, paired, summarise

NAME = "missing"
TITLE = "Experiment `missing`: missing modalities per site, plain vs modality-aware aggregation"

#: Budget -> (missing fractions, sites).
GRID: dict[str, tuple[tuple[float, ...], int]] = {
    "tiny": ((0.75,), 2),
    "small": ((0.25, 0.5, 0.75), 4),
    "standard": ((0.25, 0.5, 0.75), 4),
}
AGGREGATIONS = ("plain", "modality-aware")
#: FedProx strength of the proximal rows (screened 2026-11-30 at 0.1, 0.3 and 1.0 on the encoders; the run
#: config's default stays 0).
PROXIMAL_MU = 0.3
#: What the proximal term holds (run config ``proximal-scope``).
PROXIMAL_SCOPE = "encoders"
#: Variants of the aggregation rows: name -> (label suffix, run-config overrides, headline fractions only).
VARIANTS: dict[str, tuple[str, dict[str, float | str], bool]] = {
    "": ("", {}, False),
    "encoder FedProx": (f"-proxenc{PROXIMAL_MU:g}", {"proximal-mu": PROXIMAL_MU, "proximal-scope": PROXIMAL_SCOPE},
                        True),
}
#: Fractions run with every seed: where the targets are.
HEADLINE = (0.5, 0.75)
#: Targets: modality-aware minus plain mean-region Dice, at 50 % (at least) and 75 % (not below).
TARGETS = {0.5: 0.03, 0.75: 0.0}


def encoder_drift(run_dir: Path, seed: int) -> float:
    """Mean over modalities of ||w_final - w_init|| / ||w_init|| of each modality's encoder parameters, where
    w_init is the server's seeded initialisation (``torch.manual_seed(seed)`` then ``build_model``) and w_final the
    run's last global checkpoint. NaN when the run left no checkpoint."""
    import torch

    from models.checkpoint import load_checkpoint
    from models.modalities import owner_modality
    from models.network import build_model

    ckpt = run_dir / "checkpoints" / "last.pt"
    if not ckpt.exists():
        return math.nan
    final, cfg, _ = load_checkpoint(ckpt)
    torch.manual_seed(seed)
    init = build_model(cfg).state_dict()
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for name, w0 in init.items():
        m = owner_modality(name)
        if m is None or not torch.is_floating_point(w0) or name not in final:
            continue
        num[m] = num.get(m, 0.0) + float((final[name].float() - w0.float()).pow(2).sum())
        den[m] = den.get(m, 0.0) + float(w0.float().pow(2).sum())
    drifts = [math.sqrt(num[m]) / math.sqrt(den[m]) for m in num if den[m] > 0]
    return sum(drifts) / len(drifts) if drifts else math.nan


def _layout(data: Path) -> tuple[float, str]:
    sites = json.loads((data / "phantoms.json").read_text())["sites"]
    have = [len(s["modalities"]) for s in sites.values()]
    share = 1.0 - sum(have) / (6.0 * len(have))
    return share, " · ".join("+".join(s["modalities"]) for s in sites.values())


def _row_name(agg: str, variant: str) -> str:
    return f"{agg} + {_variant_name(variant)}" if variant else agg


def _variant_name(variant: str) -> str:
    """A variant as the table and the findings name it, with its proximal strength."""
    return f"{variant} (μ = {PROXIMAL_MU:g})"


def _target_line(f: float, diff: Summary) -> str:
    """The verdict of a modality-aware-minus-plain difference at fraction ``f`` against :data:`TARGETS`."""
    goal = TARGETS[f]
    met = diff.mean >= goal
    return (f"; target {'≥ +' + format(goal, '.2f') if goal else 'no worse than plain'}: "
            f"{'met' if met else f'missed by {goal - diff.mean:.3f}'}")


def run(ctx: Context) -> str:
    """Train every cell of the grid, write the section, return its Markdown body."""
    fractions, n_sites = GRID[ctx.budget.name]
    # as many cases in all as the other experiments' federations, spread over more sites
    cases = max(1, ctx.budget.sites * ctx.budget.cases_per_site // n_sites)
    results: dict[tuple[float, str, str], list[Outcome]] = {}
    layouts: dict[float, tuple[float, str]] = {}
    for f in fractions:
        for seed in (ctx.seeds if f in HEADLINE else ctx.seeds[:1]):
            data = phantoms(ctx, "iid", seed=seed, sites=n_sites, cases=cases, missing_fraction=f)
            layouts.setdefault(f, _layout(data))
            for variant, (suffix, keys, headline_only) in VARIANTS.items():
                if headline_only and f not in HEADLINE:
                    continue
                for agg in AGGREGATIONS:
                    label = f"missing{int(round(f * 100)):02d}-{agg}{suffix}"
                    outcome = run_federated(ctx, label, data, {"aggregation": agg, **keys}, seed=seed)
                    if "encoder-drift" not in outcome.metrics:
                        outcome.metrics["encoder-drift"] = encoder_drift(Path(outcome.run_dir), seed)
                    results.setdefault((f, agg, variant), []).append(outcome)
    cols = [("all/dice-whole", "Dice whole"), ("all/dice-core", "Dice core"), ("all/dice-enhancing", "Dice enh."),
            ("all/mean-region-dice", "mean-region Dice"), ("single-mean/dice-whole", "Dice whole, one modality"),
            ("all/accuracy", "accuracy"), ("all/auroc", "AUROC"), ("encoder-drift", "encoder drift")]
    # by fraction, then variant; insertion order (plain first) within each
    ordered = sorted(results.items(), key=lambda kv: (kv[0][0], list(VARIANTS).index(kv[0][2])))
    rows = [[f"{f:.0%} (realised {layouts[f][0]:.0%})", _row_name(agg, variant), str(len(outs)),
             *[cell(summarise(outs, k)) for k, _ in cols]] for (f, agg, variant), outs in ordered]
    body = [
        f"{n_sites} phantom sites of {cases} cases (scenario `iid` plus site-level missing modalities), the run "
        "config's model, FedAvg, no DP, equal optimizer steps; held-out cases have every modality (\"one modality\" "
        f"= the mean over single series, where an encoder trained at few sites shows); {EVALUATION_NOTE}. mean ± SD "
        "over seeds.",
        "",
        "Modalities per site (sites separated by ·, first seed):",
        "",
        *[f"- {f:.0%}: {layouts[f][1]}" for f in fractions],
        "",
        markdown_table(["missing per site", "aggregation", "seeds", *[n for _, n in cols]], rows, align_right_from=2),
        "",
        "### What the numbers say",
        "",
        *findings(fractions, results),
    ]
    text = "\n".join(body)
    write_result(ctx, NAME, TITLE, text, [o for outs in results.values() for o in outs])
    return text


def findings(fractions: tuple[float, ...], results: dict[tuple[float, str, str], list[Outcome]]) -> list[str]:
    """Modality-aware minus plain per fraction and variant, against the targets and the noise, and what FedProx
    changed for each aggregation."""
    out: list[str] = []
    key = "all/mean-region-dice"
    for variant in VARIANTS:
        for f in fractions:
            a, b = results.get((f, "modality-aware", variant)), results.get((f, "plain", variant))
            if not (a and b):
                continue
            diff = paired(a, b, key)
            both = f" (both with {variant}, μ = {PROXIMAL_MU:g})" if variant else ""
            line = (f"- {f:.0%} missing{both}: modality-aware minus plain mean-region Dice {cell(diff)} over "
                    f"{diff.n} seed(s) ({against(diff)})")
            if f in TARGETS:
                line += _target_line(f, diff)
            drift_a, drift_b = summarise(a, "encoder-drift").mean, summarise(b, "encoder-drift").mean
            if drift_b == drift_b and drift_b > 0:
                line += f"; encoders moved {drift_a / drift_b:.1f}x as far under modality-aware aggregation"
            out.append(line + ".")
    for variant in (v for v in VARIANTS if v):
        for f in fractions:
            # the method as a consortium would run it against the baseline as it stands
            a, b = results.get((f, "modality-aware", variant)), results.get((f, "plain", ""))
            if a and b:
                diff = paired(a, b, key)
                auroc, acc = paired(a, b, "all/auroc"), paired(a, b, "all/accuracy")
                line = (f"- {f:.0%} missing: modality-aware with {_variant_name(variant)} minus plain FedAvg "
                        f"without it: mean-region Dice {cell(diff)} over {diff.n} seed(s) ({against(diff)})")
                if f in TARGETS:
                    line += _target_line(f, diff)
                out.append(line + f"; AUROC {cell(auroc)} ({against(auroc)}), accuracy {cell(acc)} ({against(acc)}).")
            for agg in AGGREGATIONS:
                with_it, without = results.get((f, agg, variant)), results.get((f, agg, ""))
                if not (with_it and without):
                    continue
                diff = paired(with_it, without, key)
                auroc = paired(with_it, without, "all/auroc")
                out.append(f"- {f:.0%} missing, {agg}: {_variant_name(variant)} minus none: mean-region Dice "
                           f"{cell(diff)} over {diff.n} seed(s) ({against(diff)}), AUROC {cell(auroc)} "
                           f"({against(auroc)}); encoder drift {summarise(without, 'encoder-drift').mean:.2f} → "
                           f"{summarise(with_it, 'encoder-drift').mean:.2f}.")
    out.append(
        "- Mechanism: a site freezes the encoders of modalities it lacks and returns them unchanged, so plain FedAvg "
        "scales an encoder's round update by n_m / N (the share of sites holding m) while modality-aware aggregation "
        "applies the owners' full update; shared layers (fusion, decoder, classifier) are averaged identically by "
        "both. `encoder drift` = ||w_final - w_init|| / ||w_init|| of the modality encoders (mean over modalities). "
        "FedProx adds (μ/2)·||w - w_global||² to each site's loss (here over the modality encoders only), which "
        "holds the owners' compounding encoder updates near the global model."
    )
    return out
