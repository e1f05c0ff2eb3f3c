"""Experiment ``settings``: local-only training at each site vs federated vs centralized pooled (the upper bound).

Same phantom federation (``scanner-skew``: all six modalities, scanners differ), the run config's model, optimizer
and schedule, the same batch and the same number of optimizer steps for every row: federated = ``rounds`` rounds of
``local_epochs`` epochs at every site (steps summed over the sites); pooled = as many steps on the pooled cases;
local-only = as many steps on one site's cases. No DP anywhere (the privacy experiment measures its cost). Every
row's last checkpoint is evaluated (:data:`common.EVALUATION_NOTE`) on the held-out set (a reference scanner) and
on the unseen-scanner cohort (a vendor and settings no site has). Federated and pooled rows run every seed of the
budget, local-only the first.
"""

from __future__ import annotations

from common.layout import site_dirs

from .common import (EVALUATION_NOTE, Context, Outcome, markdown_table, phantoms, run_central, run_federated,
                     write_result)
from .stats import against, cell, paired, summarise

NAME = "settings"
TITLE = "Experiment `settings`: local-only vs federated vs centralized pooled training (equal steps)"
GRID: dict[str, None] = {"tiny": None, "small": None, "standard": None}

#: Federated mean-region Dice as a share of pooled, at equal steps (target).
FEDERATED_SHARE = 0.95
#: The federated model's mean-region Dice on the unseen scanner, as a share of in-distribution (target).
UNSEEN_SHARE = 0.90
#: What the pooled reference must reach (mean over seeds): metric key -> (name, minimum).
POOLED_TARGETS: dict[str, tuple[str, float]] = {
    "all/dice-whole": ("Dice whole", 0.85), "all/dice-core": ("Dice core", 0.70),
    "all/dice-enhancing": ("Dice enhancing", 0.60), "all/accuracy": ("accuracy", 0.85), "all/auroc": ("AUROC", 0.90),
}


def run(ctx: Context) -> str:
    """Train every row, write the section, return its Markdown body."""
    data = {s: phantoms(ctx, "scanner-skew", seed=s) for s in ctx.seeds}
    first = ctx.seeds[0]
    sites = site_dirs(data[first])
    local = {s.name: [run_central(ctx, f"settings-local-{s.name}", data[first], seed=first, site=s)] for s in sites}
    fed = [run_federated(ctx, "settings-federated", data[s], {}, seed=s) for s in ctx.seeds]
    # ablation: each round's local training starts a fresh optimizer (run config optimizer-state = reset) instead
    # of continuing the site's Adam moments (the default, keep)
    reset = [run_federated(ctx, "settings-federated-reset", data[s], {"optimizer-state": "reset"}, seed=s)
             for s in ctx.seeds]
    pooled = [run_central(ctx, "settings-pooled", data[s], seed=s) for s in ctx.seeds]

    cols = [("all/dice-whole", "Dice whole"), ("all/dice-core", "Dice core"), ("all/dice-enhancing", "Dice enh."),
            ("all/mean-region-dice", "mean-region Dice"), ("all/accuracy", "accuracy"),
            ("all/balanced-accuracy", "balanced acc."), ("all/auroc", "AUROC"), ("all/threshold", "threshold"),
            ("unseen/mean-region-dice", "unseen: mean-region Dice"), ("unseen/accuracy", "unseen: accuracy")]

    def row(name: str, rows: list[Outcome]) -> list[str]:
        return [name, str(len(rows)), *[cell(summarise(rows, k)) for k, _ in cols],
                f"{summarise(rows, 'optimizer-steps').mean:.0f}"]

    table = [row(f"local only: {name}", rows) for name, rows in local.items()]
    table += [row("federated (FedAvg, modality-aware)", fed),
              row("federated, site optimizer reset every round (ablation)", reset),
              row("centralized pooled (upper bound)", pooled)]
    body = [
        f"{len(sites)} phantom sites (scenario `scanner-skew`), the run config's model and optimizer, no DP, every row "
        f"the same optimizer steps; {EVALUATION_NOTE}. mean ± SD over seeds where a row ran several.",
        "",
        markdown_table(["setting", "seeds", *[name for _, name in cols], "steps"], table, align_right_from=1),
        "",
        "### What the numbers say",
        "",
        *findings(local, fed, pooled),
        *reset_findings(fed, reset),
    ]
    text = "\n".join(body)
    write_result(ctx, NAME, TITLE, text, [*[o for rows in local.values() for o in rows], *fed, *reset, *pooled])
    return text


def findings(local: dict[str, list[Outcome]], fed: list[Outcome], pooled: list[Outcome]) -> list[str]:
    """Plain statements computed from the rows, each against its target and the noise."""
    key = "all/mean-region-dice"
    f, p = summarise(fed, key), summarise(pooled, key)
    out = []
    reached = []
    for k, (name, low) in POOLED_TARGETS.items():
        s = summarise(pooled, k)
        verdict = "met" if s.mean >= low else f"missed by {low - s.mean:.3f}"
        reached.append(f"{name} {cell(s)} (≥ {low:.2f}: {verdict})")
    out.append("- Centralized pooled reference, all modalities: " + "; ".join(reached) + ".")
    if p.mean == p.mean and p.mean > 0:
        share = f.mean / p.mean
        out.append(f"- Federated reaches {share:.2f} of the pooled mean-region Dice ({cell(f)} vs {cell(p)}; target "
                   f"≥ {FEDERATED_SHARE:.2f}: {'met' if share >= FEDERATED_SHARE else 'missed'}); paired difference "
                   f"{cell(paired(fed, pooled, key))} over {len(fed)} seed(s), {against(paired(fed, pooled, key))}.")
    u = summarise(fed, "unseen/mean-region-dice")
    if f.mean == f.mean and f.mean > 0 and u.n:
        share = u.mean / f.mean
        out.append(f"- On the unseen scanner the federated model keeps {share:.2f} of its in-distribution mean-region "
                   f"Dice ({cell(u)}; target ≥ {UNSEEN_SHARE:.2f}: {'met' if share >= UNSEEN_SHARE else 'missed'}).")
    if local:
        worst = min(local, key=lambda s: summarise(local[s], key).mean)
        best = max(local, key=lambda s: summarise(local[s], key).mean)
        lo, hi = summarise(local[worst], key).mean, summarise(local[best], key).mean
        text = (f"- Local-only training at the same steps: {cell(summarise(local[worst], key))} (`{worst}`) to "
                f"{cell(summarise(local[best], key))} (`{best}`) mean-region Dice, one seed: what a site gets "
                "without the federation")
        if p.mean == p.mean and p.mean > 0:
            text += f" ({lo / p.mean:.2f}-{hi / p.mean:.2f} of pooled"
            if hi >= p.mean - 2 * p.sd:
                text += ("; a single site's cases seen more often reach the pooled model at equal steps, so at this "
                         "budget the step count, not the number of cases, limits the pooled and federated rows")
            text += ")"
        out.append(text + ".")
    return out


def reset_findings(fed: list[Outcome], reset: list[Outcome]) -> list[str]:
    """What resetting the sites' optimizer every round (instead of keeping its state) costs, against the noise."""
    out = []
    for key, name in (("all/mean-region-dice", "mean-region Dice"), ("all/accuracy", "accuracy"),
                      ("all/auroc", "AUROC")):
        diff = paired(fed, reset, key)
        out.append(f"- Optimizer state kept (default) vs reset every round, {name}: {cell(summarise(fed, key))} vs "
                   f"{cell(summarise(reset, key))}, paired difference {cell(diff)} over {diff.n} seed(s), "
                   f"{against(diff)}.")
    return out
