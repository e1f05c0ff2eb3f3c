"""Experiment ``settings``: local-only training at each site vs federated vs centralized pooled (the upper bound).

Same phantom federation (``scanner-skew``), model (attention fusion, six modalities, modality dropout 0.25), optimizer
(Adam, same lr and batch size), seed and number of passes over the data: federated = ``rounds`` rounds of
``local_epochs`` epochs at every site; local-only = one site trains ``rounds * local_epochs`` epochs on its own cases;
centralized = the pooled cases of all sites for ``rounds * local_epochs`` epochs. No DP anywhere (the privacy
experiment measures its cost). All rows are evaluated on the same held-out set.
"""

from __future__ import annotations

import math

from common.layout import heldout_dir

from .common import Context, Outcome, budget_notes, fmt, markdown_table, phantoms, run_central, run_federated, write_result

NAME = "settings"
TITLE = "Experiment `settings`: local-only vs federated vs centralized pooled training"


def run(ctx: Context) -> str:
    """Train every row, write the section, return its Markdown body."""
    from common.data.site import list_cases
    from common.layout import site_dirs

    data = phantoms(ctx, "scanner-skew")
    sites = site_dirs(data)
    local = [run_central(ctx, f"settings-local-{s.name}", s, heldout=heldout_dir(data)) for s in sites]
    fed = run_federated(ctx, "settings-federated", data, {"model-family": "attention"})
    central = run_central(ctx, "settings-central", data)
    headers = ["setting", "training cases", "Dice whole", "Dice core", "Dice enh.", "accuracy", "AUROC",
               "Dice whole, one modality (mean)", "train s"]

    def row(name: str, cases: str, o: Outcome) -> list[str]:
        return [name, cases, fmt(o.get("all/dice-whole")), fmt(o.get("all/dice-core")),
                fmt(o.get("all/dice-enhancing")), fmt(o.get("all/accuracy")), fmt(o.get("all/auroc")),
                fmt(o.get("single-mean/dice-whole")), f"{o.seconds:.0f}"]

    counts = [len(list_cases(s)) for s in sites]
    rows = [row(f"local only: {s.name}", str(n), o) for s, n, o in zip(sites, counts, local)]
    mean = {k: _mean([o.get(k) for o in local]) for k in
            ("all/dice-whole", "all/dice-core", "all/dice-enhancing", "all/accuracy", "all/auroc",
             "single-mean/dice-whole")}
    rows.append(row("local only: mean of sites", f"{sum(counts) / len(counts):.1f}",
                    Outcome("mean", mean, sum(o.seconds for o in local) / len(local), "")))
    rows.append(row("federated (FedAvg, modality-aware)", f"{sum(counts)} (distributed)", fed))
    rows.append(row("centralized pooled (upper bound)", str(sum(counts)), central))
    body = [
        f"{len(sites)} phantom sites (scenario `scanner-skew`: all modalities, different scanners), attention fusion, "
        "no DP, the same epochs over each row's data. `train s` = wall time (federated: the whole simulation incl. "
        "the Ray start; others: the training loop).",
        "",
        markdown_table(headers, rows, align_right_from=1),
        "",
        "### What the numbers say",
        "",
        *findings(mean, fed, central),
        *budget_notes([*local, fed, central]),
    ]
    text = "\n".join(body)
    write_result(ctx, NAME, TITLE, text, [*local, fed, central])
    return text


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def findings(local_mean: dict[str, float], fed: Outcome, central: Outcome) -> list[str]:
    lm, fd, ce = local_mean["all/dice-whole"], fed.get("all/dice-whole"), central.get("all/dice-whole")
    out = [f"- Whole-tumour Dice: local-only mean {fmt(lm)}, federated {fmt(fd)}, centralized {fmt(ce)}."]
    if math.isfinite(ce) and math.isfinite(lm) and ce > lm:
        gap = (fd - lm) / (ce - lm)
        out.append(f"- Federation closes {gap:.0%} of the gap between training alone and pooling the data.")
    out.append(
        "- Same epochs is not the same number of optimizer steps: a local-only site takes ~1/N of the pooled steps "
        "per epoch, and each federated round restarts Adam's moments at every site and averages N models, so "
        "federated training moves less per epoch than pooled training."
    )
    return out
