"""Experiment ``planner``: the feasibility planner's verdict on private runs it was not calibrated on.

The planner's rule (:mod:`client.privacy.planner`, version 2) puts the from-scratch threshold at ``r_run = 3.7``,
fitted on the twelve scratch rows of the ``privacy`` grid (N = 24, 64, 128, 256 patients per site x epsilon 1, 3,
8). This experiment trains scratch cells at case counts the grid does not have (N = 48, 80 and 96), at epsilons
chosen before training so that version 2 predicts each side of its threshold about 1.7x away from it (``r_run``
~2.2 and ~6.2), with the non-private run of the same N as each cell's reference. Every cell is a ``privacy`` cell
(:func:`simulations.experiments.privacy.row_overrides`: batch N/4, DP-SGD of the whole network, the same
federation, rounds and accountant), so "learns" is measured as there: mean-region Dice >= 0.5 x the non-private
run. The table prints both versions' verdicts beside the measurement.

Cells from a self-supervised start (``masked``: the encoders pretrained by masked-volume reconstruction on the
``privacy`` experiment's public phantom cohort without its labels, frozen; the fusion core, decoder and heads
trained, ``dp-trainable = shared``, from the seed's weights) check that the planner is right to plan such a start
as from scratch; their reference is the non-private run from the same start.
"""

from __future__ import annotations

import math

from .common import Context, Outcome, fmt, markdown_table, phantoms, run_federated, write_result
from .privacy import LEARNS_SHARE, planner_prediction, public_checkpoint, row_overrides
from .stats import cell, of_values, summarise

#: ``(cases per site, target epsilon, start)``.
Cell = tuple[int, float, str]
#: How the table names a start.
START_TEXT = {"scratch": "scratch", "masked": "self-supervised"}

NAME = "planner"
TITLE = "Experiment `planner`: the privacy planner's verdict on runs it was not calibrated on"

#: Private cells ``(N, epsilon, start)`` per budget (each N and start also trains its non-private reference).
GRID: dict[str, tuple[tuple[int, float, str], ...]] = {
    "tiny": ((4, 8.0, "scratch"), (4, 8.0, "masked")),
    "small": ((16, 3.0, "scratch"), (16, 8.0, "scratch")),
    # chosen before training: version 2 predicts "learns" at r_run 2.21 (N 80, eps 10) and 2.15 (N 96, eps 8),
    # "will not learn" at 6.25 (N 48, eps 5) and 6.07 (N 96, eps 2); version 1 predicts "will not learn" for all.
    # Epsilons stay within a fresh site's max-epsilon (10): a first choice of eps 30 at N 48 was refused by the sites.
    # The masked cells (added 2026-11-30, chosen before training): `shared` from the self-supervised start, planned
    # as from scratch: "learns" at r_run 1.81 (N 48, eps 5), "will not learn" at 6.73 (N 48, eps 1)
    "standard": ((48, 5.0, "scratch"), (80, 10.0, "scratch"), (96, 2.0, "scratch"), (96, 8.0, "scratch"),
                 (48, 1.0, "masked"), (48, 5.0, "masked")),
}
#: Cells (and their non-private references) run on every seed of the budget, the others on the first: on
#: ``standard`` the three cells whose first-seed Dice ratio fell within 0.1 of the 0.5 line (0.41, 0.40, 0.47),
#: where one seed cannot tell the verdict from the seed-to-seed spread (added after seeing seed 0, for that reason).
REPLICATED: dict[str, tuple[Cell, ...]] = {
    "standard": ((48, 5.0, "scratch"), (96, 2.0, "scratch"), (48, 1.0, "masked")),
}
#: Epochs of the masked-volume pretraining behind the ``masked`` cells (the ``privacy`` grid's supervised
#: pretraining runs as many).
MASKED_EPOCHS = 10
#: Version 1 of the rule (fixed before any measurement, superseded): learns iff r_run <= 1.
V1_THRESHOLD = 1.0


def run(ctx: Context) -> str:
    """Train every cell and its reference, write the section, return its Markdown body."""
    cells = GRID[ctx.budget.name]
    ckpt = public_checkpoint(ctx, MASKED_EPOCHS, mode="masked")[0] if any(s == "masked" for *_, s in cells) else None
    replicated = set(REPLICATED.get(ctx.budget.name, ()))
    replicated |= {(n, math.inf, s) for n, _, s in replicated}
    results: dict[Cell, list[Outcome]] = {}
    plans: dict[Cell, tuple[float, str]] = {}
    for n, eps, start in sorted({(n, math.inf, s) for n, _, s in cells} | set(cells)):
        over = row_overrides(n, start, eps, ckpt)
        label = (f"planner-n{n}{'' if start == 'scratch' else '-' + start}"
                 f"-eps-{'inf' if math.isinf(eps) else format(eps, 'g')}")
        for seed in ctx.seeds if (n, eps, start) in replicated else ctx.seeds[:1]:
            data = phantoms(ctx, "scanner-skew", cases=n, seed=seed)
            results.setdefault((n, eps, start), []).append(run_federated(ctx, label, data, over, seed=seed))
        if not math.isinf(eps):
            plans[(n, eps, start)] = planner_prediction(ctx, over, n)
    text = render(results, plans)
    write_result(ctx, NAME, TITLE, text, [o for outs in results.values() for o in outs])
    return text


def render(results: dict[Cell, list[Outcome]], plans: dict[Cell, tuple[float, str]]) -> str:
    """The section body: one row per private cell with both rule versions' verdicts and the measurement (on the
    mean over the seeds a cell ran, each seed's ratio to its own non-private run)."""
    from client.privacy.planner import predicts_learning

    key = "all/mean-region-dice"
    headers = ["cases per site", "start", "target ε", "seeds", "noise multiplier", "ε spent (max site)",
               "mean-region Dice", "non-private mean-region Dice", "Dice / non-private", "planner r_run",
               "verdict (version 2)", "verdict (version 1: r_run ≤ 1)", "measured", "version 2 agrees",
               "version 1 agrees"]
    rows: list[list[str]] = []
    agree_v2: list[bool] = []
    agree_v1: list[bool] = []
    several: list[str] = []
    for (n, eps, start), (r_run, planned) in sorted(plans.items(), key=lambda kv: (kv[0][2] != "scratch", kv[0])):
        outs = results[(n, eps, start)]
        # the reference on the cell's own seeds (a reference may have run on more, for another cell)
        refs = [r for r in results.get((n, math.inf, start), []) if r.seed in {o.seed for o in outs}]
        ref_of = {r.seed: r.get(key) for r in refs}
        per_seed = [(o.seed, o.get(key) / ref_of[o.seed]) for o in outs if ref_of.get(o.seed)]
        shares = of_values(v for _, v in per_seed)
        share = shares.mean
        v1 = "learns" if r_run <= V1_THRESHOLD else "will not learn"
        predicted = predicts_learning(planned)
        measured, a2, a1 = "—", "—", "—"
        if not all(math.isfinite(o.get("noise-multiplier")) for o in outs):
            measured = "no site trained (see the run's log)"  # e.g. refused by the sites' policy: not a measurement
        elif math.isfinite(share):
            learns = share >= LEARNS_SHARE
            measured = "learns" if learns else "does not learn"
            if len({v >= LEARNS_SHARE for _, v in per_seed}) > 1:
                measured += f" (seeds split: {sum(v >= LEARNS_SHARE for _, v in per_seed)} of {len(per_seed)} learn)"
            if predicted is not None:
                agree_v2.append(learns == predicted)
                a2 = "yes" if agree_v2[-1] else "no"
            agree_v1.append(learns == (v1 == "learns"))
            a1 = "yes" if agree_v1[-1] else "no"
        rows.append([str(n), START_TEXT.get(start, start), f"{eps:g}", str(len(outs)),
                     fmt(summarise(outs, "noise-multiplier").mean, 2),
                     fmt(max(o.get("epsilon-spent") for o in outs), 2),
                     cell(summarise(outs, key)), cell(summarise(refs, key)) if refs else "—", cell(shares, 2),
                     fmt(r_run, 2), planned, v1, measured, a2, a1])
        if len(outs) > 1:
            ratios = ", ".join(f"{v:.2f} (seed {seed})" for seed, v in per_seed)
            several.append(f"N = {n} {START_TEXT.get(start, start)} at ε = {eps:g}: Dice / non-private {ratios}")
    body: list[str] = [
        "Private cells at case counts or starts the `privacy` grid does not have, each beside the non-private "
        "run of the same N and start (on the seeds the `seeds` column gives, each against its own seed's "
        "non-private run, mean ± SD; the `privacy` experiment's federation, batch N/4, RDP accountant, "
        "delta 1e-5, clipping norm 1). `scratch`: DP-SGD of the whole network from the seed's weights; "
        "`self-supervised`: the encoders from masked-volume pretraining on the `privacy` experiment's public "
        "cohort without its labels, frozen, and the rest (`dp-trainable = shared`) trained from the seed's "
        "weights, which the planner plans as from scratch. `measured` learns = mean-region Dice ≥ "
        f"{LEARNS_SHARE:g} x the non-private run. The planner's rule version 2 (`client/privacy/planner.py`) was "
        "fitted on the `privacy` grid's scratch rows; these cells were chosen before training, at `r_run` about "
        "1.7-2x either side of its threshold.",
        "",
        markdown_table(headers, rows, align_right_from=2),
        "",
        "### What the numbers say",
        "",
    ]
    if agree_v2:
        body.append(f"- Version 2 of the rule agrees with the measurement in {sum(agree_v2)} of {len(agree_v2)} "
                    f"cells it was not fitted on; version 1 (r_run ≤ 1) in {sum(agree_v1)} of {len(agree_v1)}.")
    if several:
        body.append("- Cells run on several seeds (those whose first seed fell near the 0.5 line): "
                    + "; ".join(several) + ".")
    body.append("- A cell on one seed: a Dice ratio within about 0.2 of the 0.5 line is inside the seed-to-seed "
                "spread the `privacy` grid's 3-seed rows show (N = 256, ε = 8: 1.09 ± 0.23).")
    return "\n".join(body)
