"""The run report: ``RUN/report.md`` with PNG figures in ``RUN/figures/``, built from a run directory only.

Inputs (``docs/architecture.md`` "Run directory"):

- ``RUN/config.json``: the resolved run config (``model-*`` keys, DP, strategy, data paths);
- ``RUN/metrics.jsonl``: ``{round, phase, scope, metric, value}`` lines (:mod:`models.runlog`). Read phases:
  ``server-eval``/``global`` (``<subset>/<metric>`` keys of ``models.evaluation``), ``train`` per site (every
  scope but ``global``: the site's registered name or ``node-<id>``, :mod:`server.scopes`; ``num-examples``,
  ``train-loss``, ``cases-<m>``, ``has-<m>``, ``epsilon-total``, ``epsilon-round``, ``delta``), ``validation`` per
  site, ``site-eval`` (global or per site);
- ``RUN/checkpoints/best.pt`` (else ``last.pt``) and the held-out set, only for what needs predictions
  (checkpoint-based modality contribution, the ROC curve): :mod:`simulations.heldout_analysis` computes those.

Sections, as the multimodal paper shows them: global Dice per round (its Fig. 2), the per-modality-subset table,
its Table I / Table II layout, each modality's contribution (its Fig. 3; leave-one-out from the logged per-subset
metrics always, from the checkpoint when the data is there), the classifier's ROC / sensitivity over thresholds
(its Fig. 4), privacy spent per site per round, and the sites' training. Whatever a run did not record is said so
("not recorded in this run"); nothing in here may crash the end of a simulation.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.layout import HELDOUT_NAME, UNSEEN_NAME, VALIDATION_NAME
from models.config import SEG_REGIONS
from models.modalities import MODALITIES, canonical, subset_name
from models.atomic import atomic_write_text
from models.runlog import is_site_scope, iter_metrics

from . import figures
from .heldout_analysis import HeldoutResult, analyse_heldout

log = logging.getLogger("fedfusion.report")

__all__ = [
    "build_report",
    "RunRecords",
    "load_run",
    "leave_one_out",
    "monotonicity_share",
]

#: Regions shown in tables and figures, most clinically used first.
REGIONS: tuple[str, ...] = tuple(r for r in ("whole", "core", "enhancing", "oedema") if r in SEG_REGIONS)
#: Regions of the leave-one-out contribution chart.
CONTRIBUTION_REGIONS: tuple[str, ...] = ("whole", "core", "enhancing")
NOT_RECORDED = "not recorded in this run"
DASH = "—"


# ---------------------------------------------------------------------------------------------------------------
# reading the run directory
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class RunRecords:
    """The metrics log indexed as ``data[phase][scope][round][metric] = value`` (later lines win).

    ``value`` is None where the log holds ``null`` (a non-finite number, e.g. HD95 of an empty prediction or
    epsilon without DP).
    """

    data: dict[str, dict[str, dict[int, dict[str, float | None]]]] = field(default_factory=dict)

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]]) -> "RunRecords":
        data: dict[str, dict[str, dict[int, dict[str, float | None]]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(dict))
        )
        for rec in records:
            try:
                phase, scope, rnd, metric = str(rec["phase"]), str(rec["scope"]), int(rec["round"]), str(rec["metric"])
            except (KeyError, TypeError, ValueError):
                continue  # a foreign or damaged line: skip, the rest of the log is still good
            value = rec.get("value")
            data[phase][scope][rnd][metric] = None if value is None else float(value)
        return cls(data)

    def has(self, phase: str) -> bool:
        return bool(self.data.get(phase))

    def scopes(self, phase: str) -> list[str]:
        return sorted(self.data.get(phase, {}))

    def rounds(self, phase: str, scope: str) -> list[int]:
        return sorted(self.data.get(phase, {}).get(scope, {}))

    def at(self, phase: str, scope: str, rnd: int) -> dict[str, float | None]:
        return dict(self.data.get(phase, {}).get(scope, {}).get(rnd, {}))

    def series(self, phase: str, scope: str, metric: str) -> list[tuple[int, float | None]]:
        """``(round, value)`` for every round where ``metric`` was logged."""
        by_round = self.data.get(phase, {}).get(scope, {})
        return [(r, by_round[r][metric]) for r in sorted(by_round) if metric in by_round[r]]

    def last_round(self) -> int | None:
        rounds = [r for ph in self.data.values() for sc in ph.values() for r in sc]
        return max(rounds) if rounds else None



@dataclass
class Run:
    """What the report reads from a run directory."""

    run_dir: Path
    config: dict[str, Any]
    records: RunRecords
    notes: list[str] = field(default_factory=list)  # problems met while reading (shown in the report)

    # -- derived facts ---------------------------------------------------------------------------------------
    @property
    def eval_rounds(self) -> list[int]:
        return self.records.rounds("server-eval", "global")

    @property
    def final_round(self) -> int | None:
        rounds = self.eval_rounds
        return rounds[-1] if rounds else None

    def final_eval(self) -> dict[str, float | None]:
        r = self.final_round
        return {} if r is None else self.records.at("server-eval", "global", r)

    def modalities(self) -> tuple[str, ...]:
        """The run's model modalities (config ``model-modalities``), else the single-modality subsets logged."""
        raw = self.config.get("model-modalities")
        if raw:
            try:
                return canonical(str(raw).split(","))
            except ValueError as exc:
                note = f"config model-modalities is not valid ({exc}); modalities taken from the log"
                if note not in self.notes:
                    self.notes.append(note)
        logged = {k.split("/", 1)[0] for k in self.final_eval() if "/" in k}
        return tuple(m for m in MODALITIES if m in logged)

    def sites(self) -> list[str]:
        """Site ids seen in the log (training first, else site evaluation)."""
        found = [s for s in self.records.scopes("train") if is_site_scope(s)]
        if not found:
            found = [s for s in self.records.scopes("site-eval") if is_site_scope(s)]
        return found


def load_run(run_dir: Path) -> Run:
    """Read ``config.json`` and ``metrics.jsonl`` of ``run_dir`` (either may be missing; that is noted).

    Raises:
        FileNotFoundError: if ``run_dir`` is not a directory.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"run directory {run_dir} does not exist; give the --out folder of a `fedfusion simulate` run"
        )
    notes: list[str] = []
    config: dict[str, Any] = {}
    cfg_path = run_dir / "config.json"
    if cfg_path.is_file():
        try:
            loaded = json.loads(cfg_path.read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                config = loaded
            else:
                notes.append(f"{cfg_path.name} is not a JSON object; run settings unknown")
        except (OSError, json.JSONDecodeError) as exc:
            notes.append(f"{cfg_path.name} cannot be read ({exc}); run settings unknown")
    else:
        notes.append("config.json is missing; run settings unknown")
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        notes.append("metrics.jsonl is missing: no metric was recorded in this run")
    records = RunRecords.from_records(iter_metrics(metrics_path))
    return Run(run_dir=run_dir, config=config, records=records, notes=notes)


# ---------------------------------------------------------------------------------------------------------------
# computations on logged metrics (pure, tested)
# ---------------------------------------------------------------------------------------------------------------
def all_subset_key(flat: Mapping[str, Any], modalities: Sequence[str]) -> str | None:
    """The prefix of the all-modality subset: ``all`` if logged, else the full subset name, else None."""
    if any(k.startswith("all/") for k in flat):
        return "all"
    if modalities:
        full = subset_name(modalities)
        if any(k.startswith(full + "/") for k in flat):
            return full
    return None


def leave_one_out(
    flat: Mapping[str, float | None], modalities: Sequence[str], metric: str = "dice-whole"
) -> dict[str, float | None]:
    """Each modality's contribution from logged per-subset metrics, no data needed.

    ``contribution[m] = metric(all modalities) - metric(all modalities without m)``: how much the fused
    prediction loses when ``m`` is missing (positive = ``m`` helps). None where either subset was not logged or
    the run has one modality only.
    """
    mods = canonical(modalities) if modalities else ()
    top = all_subset_key(flat, mods)
    out: dict[str, float | None] = {}
    for m in mods:
        rest = [x for x in mods if x != m]
        full_v = flat.get(f"{top}/{metric}") if top else None
        rest_v = flat.get(f"{subset_name(rest)}/{metric}") if rest else None
        out[m] = None if full_v is None or rest_v is None else float(full_v) - float(rest_v)
    return out


#: Dice-whole drop that counts as a monotonicity violation: the value of
#: ``models.evaluation.MONOTONICITY_TOLERANCE`` (not imported: the log-only report stays free of torch/MONAI
#: imports, which cost seconds; tests/test_report.py checks both agree).
MONOTONICITY_TOLERANCE = 0.01


def monotonicity_share(
    flat: Mapping[str, float | None],
    modalities: Sequence[str],
    metric: str = "dice-whole",
    tolerance: float = MONOTONICITY_TOLERANCE,
) -> tuple[int, int]:
    """Count subset pairs ``(S, S + {m})`` where adding modality ``m`` lowers ``metric`` by more than
    ``tolerance`` (the rule of ``models.evaluation.monotonicity``), from a flat ``<subset>/<metric>`` dict.

    Returns:
        ``(violations, pairs)`` over the pairs where both subsets were logged with a finite value.
    """
    mods = canonical(modalities) if modalities else ()
    values: dict[frozenset[str], float] = {}
    for key, v in flat.items():
        if v is None or not key.endswith("/" + metric) or not math.isfinite(v):
            continue
        parts = key[: -len(metric) - 1].split("+")
        if all(p in mods for p in parts):
            values[frozenset(parts)] = float(v)
    violations = pairs = 0
    for s, v in values.items():
        for m in mods:
            bigger = None if m in s else values.get(s | {m})
            if bigger is None:
                continue
            pairs += 1
            violations += int(bigger < v - tolerance)
    return violations, pairs


# ---------------------------------------------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return DASH
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return DASH
        if math.isinf(v):
            return "∞"
        if v != 0.0 and abs(v) < 10 ** -digits:
            return f"{v:.1e}"  # e.g. DP delta 1e-05, which fixed-point would show as 0.000
        return f"{v:.{digits}f}"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_fmt(c, digits) for c in row) + " |" for row in rows]
    return out + [""]


def _fig_link(path: Path, run_dir: Path, alt: str) -> str:
    return f"![{alt}]({path.relative_to(run_dir).as_posix()})"


# ---------------------------------------------------------------------------------------------------------------
# report sections: each returns markdown lines; figures go to ctx.fig_dir
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Ctx:
    run: Run
    fig_dir: Path
    heldout: HeldoutResult | None
    heldout_reason: str
    figures: list[Path] = field(default_factory=list)

    def fig(self, name: str) -> Path:
        return self.fig_dir / name


def _config_summary(run: Run) -> list[str]:
    c = run.config
    if not c:
        return [f"- run config: {NOT_RECORDED}", ""]

    def g(key: str) -> str:
        return _fmt(c.get(key)) if key in c else DASH

    dp = c.get("dp-enabled")
    if dp is False or str(dp).lower() == "false":
        dp_text = "off"
    elif dp is None:
        dp_text = DASH
    else:
        noise = c.get("dp-noise-multiplier")
        dp_text = (
            f"on, target ε = {g('dp-target-epsilon')}, δ = {g('dp-delta')}, max grad norm {g('dp-max-grad-norm')}, "
            f"noise multiplier {'derived from ε' if noise in (0, 0.0, None) else g('dp-noise-multiplier')}"
        )
    sites = run.sites()
    rounds_done = run.records.last_round()
    lines = [
        f"- fusion family: **{g('model-family')}**; modalities: {', '.join(run.modalities()) or DASH}; "
        f"spatial size {g('model-spatial-size')} ({g('model-spatial-dims')}D), channels {g('model-channels')}, "
        f"modality dropout {g('model-modality-dropout')}",
        f"- rounds: {g('num-server-rounds')} planned, "
        f"{'none' if rounds_done is None else rounds_done} last logged; sites: {len(sites) if sites else DASH}"
        + (f" ({', '.join(sites)})" if sites and len(sites) <= 12 else ""),
        f"- strategy: {g('strategy')}, aggregation: {g('aggregation')}, proximal mu {g('proximal-mu')}; "
        f"local epochs {g('local-epochs')}, lr {g('lr')}, batch size {g('batch-size')}, seed {g('seed')}",
        f"- differential privacy (patient level): {dp_text}",
        *_recipe_lines(run),
        f"- data: {g('data-dir')}; held-out set: "
        f"{g('test-dir') if c.get('test-dir') else f'<data-dir>/{HELDOUT_NAME}'}",
        "",
    ]
    return lines


def _recipe_lines(run: Run) -> list[str]:
    """Initial weights (init-checkpoint, with its recorded hash and provenance) and the DP recipe keys."""
    c = run.config
    lines = []
    init = run.run_dir / "init-checkpoint.json"
    if init.is_file():
        try:
            record = json.loads(init.read_text(encoding="utf-8"))
            prov = record.get("provenance") or {}
            made = ", ".join(f"{k} {v}" for k, v in prov.items() if isinstance(v, (str, int, float))) if isinstance(
                prov, dict) else ""
            lines.append(f"- initial weights: `{record.get('path')}` (SHA-256 `{record.get('sha256')}`"
                         + (f"; {made}" if made else "") + ")")
        except (OSError, ValueError, AttributeError) as exc:
            lines.append(f"- initial weights: init-checkpoint.json unreadable ({exc})")
    elif c.get("init-checkpoint"):
        lines.append(f"- initial weights: `{c.get('init-checkpoint')}` (no provenance recorded)")
    elif c:
        lines.append("- initial weights: fresh, from the run's seed")
    recipe = {k: c[k] for k in ("dp-trainable", "augment-multiplicity", "optimizer", "optimizer-state",
                                "dp-accountant", "server-ema") if k in c}
    if recipe:
        lines.append("- training recipe: " + ", ".join(f"{k} {_fmt(v)}" for k, v in recipe.items()))
    return lines


def _dice_rose(run: Run) -> str:
    s = [(r, v) for r, v in run.records.series("server-eval", "global", f"{_top(run)}/dice-whole") if v is not None]
    if not s:
        return f"- global Dice over rounds: {NOT_RECORDED} (no server evaluation)"
    if len(s) < 2:
        return f"- global Dice over rounds: only round {s[0][0]} was evaluated ({s[0][1]:.3f}); cannot tell a trend"
    (r0, v0), (r1, v1) = s[0], s[-1]
    best_r, best_v = max(s, key=lambda p: p[1])
    verdict = "**rose**" if v1 > v0 else "**did not rise**"
    start = " = the init checkpoint, before any site trained" if r0 == 0 else ""
    held = _site_modality_sets(run)
    unseen = ""
    if held and not any(set(h) >= set(run.modalities()) for h in held.values()):
        # e.g. the demo's sites (MRI, T1 + CT, T2 + ultrasound): the all-modality input is one no site trains on,
        # so its Dice need not move with what the federation teaches
        counts = Counter("+".join(h) or DASH for h in held.values())
        unseen = (f"; no site holds all {len(run.modalities())} modalities (the sites report "
                  + ", ".join(f"{k} ({n} site{'s' if n > 1 else ''})"
                             for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
                  + "), so no site trains on this input: what they taught shows on the subsets they hold")
    return (
        f"- global Dice (all modalities, whole lesion) {verdict} over the rounds: {v0:.3f} (round {r0}{start}) → "
        f"{v1:.3f} (round {r1}); highest {best_v:.3f} at round {best_r}{unseen}"
    )


def _site_modality_sets(run: Run) -> dict[str, tuple[str, ...]]:
    """The modalities each site reported holding in its last train reply (``has-<m>`` / ``cases-<m>``), in the
    run's modality order."""
    mods = run.modalities()
    out: dict[str, tuple[str, ...]] = {}
    for site in (s for s in run.records.scopes("train") if is_site_scope(s)):
        rounds = run.records.rounds("train", site)
        if rounds:
            last = run.records.at("train", site, max(rounds))
            out[site] = tuple(m for m in mods if (last.get(f"has-{m}") or 0) > 0 or (last.get(f"cases-{m}") or 0) > 0)
    return out


def _single_modality_trend(run: Run) -> list[str]:
    """Whole-lesion Dice of each modality alone from the first to the last evaluated round, where it moved by more
    than 0.05: what the sites taught the network beyond its start (e.g. the CT and ultrasound encoders an MRI-only
    public start could not train)."""
    moved = []
    for m in run.modalities():
        s = [(r, v) for r, v in run.records.series("server-eval", "global", f"{m}/dice-whole") if v is not None]
        if len(s) >= 2 and abs(s[-1][1] - s[0][1]) > 0.05:
            moved.append(f"{m} {s[0][1]:.3f} → {s[-1][1]:.3f}")
    if not moved:
        return []
    return ["- Dice (whole lesion) from one modality alone, first → last evaluated round, where it moved by more "
            "than 0.05: " + "; ".join(moved)]


def _selection_trend(run: Run) -> list[str]:
    """Which round became ``best.pt`` and by what (as ``best.pt`` records it), and how that measure moved on the
    selection set (``server-select``) from its first to its last evaluated round (nothing without a selection set
    or a ``best.pt``)."""
    from server.checkpointing import best_record, pick_metric

    best = best_record(run.run_dir)
    if best is None or not best.get("metric"):
        return []
    values = []
    for r in run.records.rounds("server-select", "global"):
        flat = {k: float(v) for k, v in run.records.at("server-select", "global", r).items() if v is not None}
        found = pick_metric(flat, str(best["metric"]))
        if found is not None:
            values.append((r, *found))
    if not values:
        return []
    (r0, key, v0), (r1, _, v1) = values[0], values[-1]
    what = f"`{key}`"
    if key.startswith("subset-mean/"):
        what += f" (averaged over the subsets `{run.config.get('select-subsets', DASH)}`)"
    return [f"- `checkpoints/best.pt`: round {best['round']}, chosen on the selection set by {what}: "
            f"{v0:.3f} (round {r0}) → {v1:.3f} (round {r1}), best {float(best['value']):.3f}"]


def _auroc_trend(run: Run) -> list[str]:
    """The classifier's AUROC from the first to the last evaluated round (nothing when fewer than two)."""
    s = [(r, v) for r, v in run.records.series("server-eval", "global", f"{_top(run)}/auroc") if v is not None]
    if len(s) < 2:
        return []
    return [f"- global AUROC (classification): {s[0][1]:.3f} (round {s[0][0]}) → {s[-1][1]:.3f} (round {s[-1][0]})"]


def _top(run: Run) -> str:
    return all_subset_key(run.final_eval(), run.modalities()) or "all"


def _header(ctx: _Ctx) -> list[str]:
    run = ctx.run
    lines = [
        f"# fedfusion run report: {run.run_dir.name}",
        "",
        f"Run directory `{run.run_dir}`; report built {time.strftime('%Y-%m-%d %H:%M:%S')}.",
        "",
        "## Run",
        "",
        *_config_summary(run),
        "## Final numbers",
        "",
    ]
    flat, top = run.final_eval(), _top(run)
    if not flat:
        lines += [f"Server evaluation: {NOT_RECORDED}.", ""]
    else:
        lines.append(f"Global model on the held-out set, round {run.final_round} (all modalities):")
        lines.append("")
        keys = [f"dice-{r}" for r in REGIONS] + ["hd95-whole", "accuracy", "recall", "specificity", "f1", "auroc"]
        lines += _table(keys, [[flat.get(f"{top}/{k}") for k in keys]])
        lines.append(
            f"Mean over modality subsets: Dice whole {_fmt(flat.get('mean/dice-whole'))}; "
            f"worst subset: Dice whole {_fmt(flat.get('worst/dice-whole'))}."
        )
        lines.append("")
    lines += [_dice_rose(run), *_single_modality_trend(run), *_selection_trend(run), *_auroc_trend(run), ""]
    if run.notes:
        lines += ["Notes:", *[f"- {n}" for n in run.notes], ""]
    return lines


def _global_dice_section(ctx: _Ctx) -> list[str]:
    run, top = ctx.run, _top(ctx.run)
    lines = ["## Global Dice per round (paper Fig. 2)", ""]
    if not run.eval_rounds:
        return lines + [f"Server evaluation: {NOT_RECORDED}.", ""]
    rec = run.records
    dice = {f"{top} / {r}": rec.series("server-eval", "global", f"{top}/dice-{r}") for r in REGIONS}
    dice["mean subset / whole"] = rec.series("server-eval", "global", "mean/dice-whole")
    dice["worst subset / whole"] = rec.series("server-eval", "global", "worst/dice-whole")
    cls = {f"{top} / {k}": rec.series("server-eval", "global", f"{top}/{k}") for k in ("accuracy", "auroc", "f1")}
    path = figures.global_dice_figure(dice, cls, ctx.fig("global_dice.png"))
    ctx.figures.append(path)
    lines += [_fig_link(path, run.run_dir, "global Dice per round"), ""]
    header = ["round"] + [f"Dice {r}" for r in REGIONS] + ["mean-subset Dice", "worst-subset Dice", "accuracy", "AUROC"]
    rows = []
    for r in run.eval_rounds:
        f = rec.at("server-eval", "global", r)
        rows.append(
            [r] + [f.get(f"{top}/dice-{reg}") for reg in REGIONS]
            + [f.get("mean/dice-whole"), f.get("worst/dice-whole"), f.get(f"{top}/accuracy"), f.get(f"{top}/auroc")]
        )
    return lines + _table(header, rows)


def _subset_rows(flat: Mapping[str, float | None], modalities: Sequence[str]) -> list[str]:
    """Subset names logged in ``flat``, smallest subsets first then canonical order; then all / mean / worst."""
    names = {k.split("/", 1)[0] for k in flat if "/" in k}
    order = {m: i for i, m in enumerate(MODALITIES)}

    def key(name: str) -> tuple[int, tuple[int, ...]]:
        parts = name.split("+")
        return len(parts), tuple(order.get(p, 99) for p in parts)

    singles = sorted((n for n in names if all(p in MODALITIES for p in n.split("+"))), key=key)
    tail = [n for n in ("all", "mean", "worst") if n in names]
    return singles + tail


def _subset_section(ctx: _Ctx) -> list[str]:
    run = ctx.run
    lines = ["## Per-modality-subset evaluation (final evaluated round)", ""]
    flat = run.final_eval()
    if not flat:
        return lines + [f"Server evaluation: {NOT_RECORDED}.", ""]
    mods = run.modalities()
    rows_names = _subset_rows(flat, mods)
    cols = ["dice-whole", "dice-core", "dice-enhancing", "hd95-whole", "accuracy", "auroc"]
    lines.append(
        f"Round {run.final_round}, held-out set with each modality subset given to the model "
        f"({sum(1 for n in rows_names if n not in ('all', 'mean', 'worst'))} subsets). HD95 in voxels of the "
        "model grid; mean = average over subsets, worst = lowest over subsets (per column)."
    )
    lines.append("")
    rows = [[f"**{n}**" if n in ("all", "mean", "worst") else n] + [flat.get(f"{n}/{c}") for c in cols]
            for n in rows_names]
    lines += _table(["subset", "Dice whole", "Dice core", "Dice enhancing", "HD95 whole", "accuracy", "AUROC"], rows)
    violations, pairs = monotonicity_share(flat, mods)
    logged = {k: v for k, v in flat.items() if k.endswith("monotonicity-violations")}
    mono = []
    if pairs:
        mono.append(
            f"adding a modality lowered whole-lesion Dice by more than {MONOTONICITY_TOLERANCE:g} in {violations} "
            f"of {pairs} subset pairs (share {violations / pairs:.3f}; it should be near 0)"
        )
    for k, v in logged.items():
        mono.append(f"share logged by the server (`{k}`) {_fmt(v)}")
    lines.append("Monotonicity: " + ("; ".join(mono) if mono else NOT_RECORDED) + ".")
    lines.append("")
    singles = [(n, flat.get(f"{n}/dice-whole")) for n in rows_names]
    if len(singles) > 1:
        path = figures.subset_dice_figure(singles, ctx.fig("subset_dice.png"),
                                          title=f"Dice per modality subset, round {run.final_round}")
        ctx.figures.append(path)
        lines += [_fig_link(path, run.run_dir, "Dice per modality subset"), ""]
    return lines


def _paper_rows(flat: Mapping[str, float | None], mods: Sequence[str]) -> list[str]:
    """Rows of the paper's Tables I/II that this run's subset evaluation has: single modalities, the MRI group
    (all MR sequences of the run together, when more than one) and the fused ``all``."""
    from models.modalities import DICOM_MODALITY

    names = {k.split("/", 1)[0] for k in flat if "/" in k}
    rows = [m for m in mods if m in names]
    mri = [m for m in mods if DICOM_MODALITY.get(m) == "MR"]
    if len(mri) > 1 and subset_name(mri) in names and subset_name(mri) != subset_name(mods):
        rows.append(subset_name(mri))
    top = all_subset_key(flat, mods)
    if top:
        rows.append(top)
    return rows


def _paper_tables_section(ctx: _Ctx) -> list[str]:
    run = ctx.run
    lines = ["## The paper's Table I / Table II with this run's numbers", ""]
    flat = run.final_eval()
    if not flat:
        return lines + [f"Server evaluation: {NOT_RECORDED}.", ""]
    rows = _paper_rows(flat, run.modalities())
    lines += [
        f"One federated model (family {run.config.get('model-family', DASH)}), evaluated at round "
        f"{run.final_round} with only the row's modalities given (the paper trains one model per row; here the "
        "rows are the same fused network under missing modalities). Segmentation on the whole lesion.",
        "",
        "**Table I: segmentation**",
        "",
    ]
    lines += _table(["input", "Dice", "IoU", "precision"],
                    [[n] + [flat.get(f"{n}/{k}") for k in ("dice-whole", "iou-whole", "precision-whole")] for n in rows])
    lines += ["**Table II: classification (malignant vs benign)**", ""]
    lines += _table(["input", "accuracy", "recall", "F1"],
                    [[n] + [flat.get(f"{n}/{k}") for k in ("accuracy", "recall", "f1")] for n in rows])
    return lines


def _contribution_section(ctx: _Ctx) -> list[str]:
    run = ctx.run
    lines = ["## Modality contribution to the fused prediction (paper Fig. 3)", ""]
    mods = run.modalities()
    flat = run.final_eval()
    # 1. from the checkpoint on the held-out set (needs data)
    held = ctx.heldout
    if held is not None and held.contribution:
        measures: list[str] = []
        for per in held.contribution.values():
            measures += [k for k in per if k not in measures]
        path = figures.contribution_figure(
            held.contribution, ctx.fig("contribution_checkpoint.png"),
            title=f"Contribution per modality ({held.checkpoint_name}"
                  + (f", round {held.checkpoint_round}" if held.checkpoint_round is not None else "") + ", held-out set)",
            ylabel="drop when the modality is masked / share",
        )
        ctx.figures.append(path)
        lines += [
            f"From {held.source} on the held-out set ({held.num_cases} cases, `{held.heldout_dir}`): "
            "for every modality, what the fused prediction loses when that modality alone is masked "
            "(Dice / probability drop), and its share of the cross-modal attention where the family has one.",
            "",
            _fig_link(path, run.run_dir, "modality contribution from the checkpoint"),
            "",
        ]
        lines += _table(["modality", *measures], [[m, *[held.contribution[m].get(k) for k in measures]]
                                                  for m in held.contribution])
    else:
        reason = held.contribution_reason if held is not None else ctx.heldout_reason
        lines += [f"From the checkpoint on the held-out set: not available ({reason}).", ""]
    # 2. leave-one-out from the logged subsets: always (needs no data)
    if not flat or not mods:
        return lines + [f"Leave-one-out from the logged per-subset metrics: {NOT_RECORDED}.", ""]
    loo = {r: leave_one_out(flat, mods, f"dice-{r}") for r in CONTRIBUTION_REGIONS}
    values = {m: {r: loo[r][m] for r in CONTRIBUTION_REGIONS} for m in mods}
    path = figures.contribution_figure(
        values, ctx.fig("contribution_leave_one_out.png"),
        title=f"Leave-one-out contribution, round {run.final_round}",
        ylabel="Dice(all) − Dice(all without m)",
    )
    ctx.figures.append(path)
    lines += [
        f"Leave-one-out from the logged per-subset metrics (round {run.final_round}, no data needed): "
        "Dice of the all-modality input minus Dice of the subset without the modality. Positive = the fused "
        "prediction loses Dice without it.",
        "",
        _fig_link(path, run.run_dir, "leave-one-out modality contribution"),
        "",
    ]
    lines += _table(["modality", *[f"Δ Dice {r}" for r in CONTRIBUTION_REGIONS]],
                    [[m, *[values[m][r] for r in CONTRIBUTION_REGIONS]] for m in mods])
    if len(mods) < 2:
        lines += ["The run has one modality: leaving it out leaves no input, so no contribution is defined.", ""]
    return lines


def _roc_section(ctx: _Ctx) -> list[str]:
    run = ctx.run
    lines = ["## Classifier sensitivity / ROC over decision thresholds (paper Fig. 4)", ""]
    held = ctx.heldout
    if held is None or not held.roc:
        reason = held.roc_reason if held is not None else ctx.heldout_reason
        logged = run.final_eval().get(f"{_top(run)}/auroc")
        lines.append(f"Not available: {reason}.")
        if logged is not None:
            lines.append(f"The logged AUROC of the final round (all modalities) is {logged:.3f}.")
        return lines + [""]
    thr = [p[0] for p in held.roc]
    tpr = [p[1] for p in held.roc]
    spec = [p[2] for p in held.roc]
    fpr = [1.0 - s_ for s_ in spec]
    auroc = held.auroc if held.auroc is not None and math.isfinite(held.auroc) else None
    path = figures.roc_figure(fpr, tpr, thr, auroc, ctx.fig("roc.png"), specificity=spec)
    ctx.figures.append(path)
    lines += [
        f"{held.source} on {held.num_cases} held-out cases ({held.positives} malignant), every case with "
        f"all its modalities; score = P(malignant). AUROC {_fmt(auroc)}.",
        "",
        _fig_link(path, run.run_dir, "ROC and sensitivity over thresholds"),
        "",
    ]
    lines += _table(["threshold", "sensitivity (recall)", "specificity", "accuracy", "F1"],
                    [[t, m.get("recall"), m.get("specificity"), m.get("accuracy"), m.get("f1")]
                     for t, m in held.operating_points.items()])
    return lines


def _privacy_section(ctx: _Ctx) -> list[str]:
    run = ctx.run
    lines = ["## Privacy spent per site per round", ""]
    dp = run.config.get("dp-enabled")
    sites = [s for s in run.records.scopes("train") if is_site_scope(s)]
    series = {s: run.records.series("train", s, "epsilon-total") for s in sites}
    series = {s: v for s, v in series.items() if v}
    site_dp = [v for s in sites for _, v in run.records.series("train", s, "dp-enabled") if v is not None]
    dp_off = dp is False or str(dp).lower() == "false" or (bool(site_dp) and not any(site_dp))
    if dp_off:
        # sites without DP report epsilon 0: a curve of zeros would read as "perfectly private"
        return lines + ["Differential privacy was off in this run: no privacy accounting (no formal guarantee).", ""]
    lines += _noise_source_lines(run, sites)
    if not series:
        return lines + [f"Privacy accounting (epsilon-total per site): {NOT_RECORDED}.", ""]
    if all(v is None for s in series.values() for _, v in s):
        return lines + ["Every site reported ε = ∞ (no DP noise): nothing to plot.", ""]
    target = run.config.get("dp-target-epsilon")
    try:
        limit = float(target) if target is not None else None
    except (TypeError, ValueError):
        limit = None
    path = figures.site_series_figure(series, ctx.fig("privacy.png"), title="Privacy spent per site (ε, total)",
                                      ylabel="ε spent so far", limit=limit, limit_label="target ε")
    ctx.figures.append(path)
    lines += [
        "ε spent by each site so far (patient-level DP-SGD, RDP accountant), δ as reported by the site"
        + (f"; run target ε = {_fmt(target)}" if target is not None else "")
        + ".",
        "",
        _fig_link(path, run.run_dir, "privacy spent per site"),
        "",
    ]
    rounds = sorted({r for s in series.values() for r, _ in s})
    rows = []
    for site in series:
        by_round = dict(series[site])
        last_r = max(run.records.rounds("train", site))
        last = run.records.at("train", site, last_r)
        rows.append([site, *[by_round.get(r) for r in rounds], last.get("delta")])
    lines += _table(["site", *[f"round {r}" for r in rounds], "δ"], rows, digits=2)
    return lines + _planner_lines(run)


def _planner_lines(run: Run) -> list[str]:
    """What ``fedfusion privacy-plan`` predicts for this run's settings at each site, beside what the run did.

    Only where the run's data root is a phantom set (its manifest gives every site's patients and modalities);
    a deployed server does not know a site's patient count, and a site runs the planner itself.
    """
    manifest_path = Path(str(run.config.get("data-dir") or "")) / "phantoms.json"
    if not manifest_path.is_file():
        return []
    from client.privacy.planner import plan

    try:
        sites = json.loads(manifest_path.read_text(encoding="utf-8"))["sites"]
        plans = {name: plan(run.config, patients=int(site["cases"]), sites=len(sites),
                            site_modalities=site["modalities"]) for name, site in sorted(sites.items())}
        rows = [[name, p.patients, ",".join(sites[name]["modalities"]), p.noise.noise_multiplier, p.run_ratio,
                 p.verdict] for name, p in plans.items()]
        last = next(iter(plans.values()))  # the rule is the run's, the same at every site
    except StopIteration:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:  # a stale or foreign manifest costs this part only
        return ["", f"What the privacy planner predicts for this run: not computed ({type(exc).__name__}: {exc}).", ""]
    header = ["site", "patients", "modalities", "noise multiplier", "r_run", "verdict"]
    starts = {p.start for p in plans.values()}
    if len(starts) == 1:
        start = f"the run starts from {last.start_text}"
    else:
        # a start without some modalities is planned per site: from scratch where the site trains one of them
        start = "the start differs by site (column start)"
        header.append("start")
        for row, p in zip(rows, plans.values()):
            row.append(p.start_text)
    return [
        "",
        "### What the privacy planner predicted",
        "",
        f"`fedfusion privacy-plan` for this run's settings at each site, {len(sites)} sites averaged per round; "
        f"{start}. The verdict's rule, fixed before this run: {last.rule}.",
        "",
        *_table(header, rows, digits=2),
    ]


def _noise_source_lines(run: Run, sites: list[str]) -> list[str]:
    """Where the sites' DP noise came from (their ``dp-reproducible-noise`` replies); nothing when not recorded."""
    flags = {s: [v for _, v in run.records.series("train", s, "dp-reproducible-noise") if v is not None] for s in sites}
    reproducible = [s for s, values in flags.items() if any(v > 0 for v in values)]
    if reproducible:
        return [
            f"**Reproducible DP noise** at {', '.join(reproducible)}: their own policy (`reproducible-noise = true`) "
            "drew the noise from the run's seed, the round and the site's name, so whoever knows the run config can "
            "recompute and remove it. Their ε is **not** a guarantee against the server (experiments only).",
            "",
        ]
    if any(flags.values()):
        return ["DP noise: drawn by every site from its operating system's CSPRNG (no site reported reproducible "
                "noise).", ""]
    return []


def _sites_section(ctx: _Ctx) -> list[str]:
    run = ctx.run
    lines = ["## Sites", ""]
    sites = [s for s in run.records.scopes("train") if is_site_scope(s)]
    if not sites:
        lines += [f"Site training: {NOT_RECORDED}.", ""]
    else:
        mods = run.modalities()
        held = _site_modality_sets(run)
        rows = []
        for site in sites:
            last = run.records.at("train", site, max(run.records.rounds("train", site)))
            has = held.get(site, ())
            n = last.get("num-examples")
            declined = [r for r, v in run.records.series("train", site, "declined") if v]
            rejected = [r for r, v in run.records.series("validation", site, "accepted") if v is not None and v == 0]
            rows.append([
                site, len(run.records.rounds("train", site)) - len(declined), None if n is None else int(n),
                last.get("train-loss"), ", ".join(has) or DASH,
                ", ".join(f"{m} {int(last[f'cases-{m}'])}" for m in mods if last.get(f"cases-{m}") is not None) or DASH,
                ", ".join(map(str, rejected)) or DASH, ", ".join(map(str, declined)) or DASH,
            ])
        lines.append("Last round each site reported (updates rejected by the server's validation and rounds the "
                     "site declined to train, e.g. privacy budget spent, by round):")
        lines.append("")
        lines += _table(["site", "rounds trained", "cases", "train loss", "modalities", "cases per modality",
                         "rejected (rounds)", "declined (rounds)"], rows)
        loss = {s: run.records.series("train", s, "train-loss") for s in sites}
        if any(loss.values()):
            path = figures.site_series_figure(loss, ctx.fig("train_loss.png"), title="Local training loss per site",
                                              ylabel="train loss")
            ctx.figures.append(path)
            lines += [_fig_link(path, run.run_dir, "training loss per site"), ""]
    if not run.records.has("site-eval"):
        return lines + [f"Site-local evaluation: {NOT_RECORDED}.", ""]
    lines += ["Site-local evaluation (last round each scope reported):", ""]
    rows_sc = []
    metrics: list[str] = []
    for scope in run.records.scopes("site-eval"):
        last = run.records.at("site-eval", scope, max(run.records.rounds("site-eval", scope)))
        metrics.extend(k for k in sorted(last) if k not in metrics)
        rows_sc.append((scope, last))
    shown = metrics[:10]
    counts = {"num-examples", "sites", "cases"}  # whole numbers, shown without decimals
    lines += _table(["scope", *shown], [[sc, *[int(last[k]) if k in counts and last.get(k) is not None
                                               else last.get(k) for k in shown]] for sc, last in rows_sc])
    if len(metrics) > len(shown):
        lines += [f"({len(metrics) - len(shown)} more site metrics in metrics.jsonl.)", ""]
    return lines


# ---------------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------------
def _cohorts_section(ctx: _Ctx) -> list[str]:
    """Which set chose best.pt, and the unseen-scanner cohort beside the in-distribution held-out set."""
    run = ctx.run
    lines = ["## Held-out cohorts: model selection and an unseen scanner", ""]
    selected = run.records.rounds("server-select", "global")
    if selected:
        by = run.config.get("best-metric", DASH)
        on = run.config.get("select-subsets", "full")  # runs before the key existed: the full set only
        lines.append(f"`checkpoints/best.pt` was chosen on the separate selection set (`{VALIDATION_NAME}/`, "
                     f"subsets `{on}`, {len(selected)} evaluated rounds) by `{by}`; the numbers of this report come "
                     f"from the held-out set (`{HELDOUT_NAME}/`), which chose nothing.")
    else:
        lines.append(f"No selection set (`{VALIDATION_NAME}/`) was evaluated: `best.pt` was chosen on the held-out "
                     "set itself, so its numbers are optimistic for `best.pt`.")
    lines.append("")
    unseen_rounds = run.records.rounds("server-eval-unseen", "global")
    ours = run.final_eval()
    if not unseen_rounds or not ours:
        return lines + [f"Unseen-scanner cohort (`{UNSEEN_NAME}/`): {NOT_RECORDED}.", ""]
    rnd = unseen_rounds[-1]
    theirs = run.records.at("server-eval-unseen", "global", rnd)
    cols = [("dice-whole", "Dice whole"), ("dice-core", "Dice core"), ("dice-enhancing", "Dice enhancing"),
            ("accuracy", "accuracy"), ("auroc", "AUROC")]
    rows = []
    for label, flat in ((f"in-distribution (`{HELDOUT_NAME}/`)", ours), (f"unseen scanner (`{UNSEEN_NAME}/`)", theirs)):
        rows.append([label, *[flat.get(f"all/{k}") for k, _ in cols]])
    ratio = []
    for k, _ in cols:
        a, b = ours.get(f"all/{k}"), theirs.get(f"all/{k}")
        ratio.append(b / a if isinstance(a, float) and isinstance(b, float) and a > 0 else None)
    rows.append(["unseen / in-distribution", *ratio])
    lines.append(f"Round {rnd}, all of the model's modalities; the unseen cohort is from a scanner vendor and settings "
                 "no training site has.")
    lines.append("")
    lines += _table(["cohort", *[name for _, name in cols]], rows)
    return lines + [""]


SECTIONS: tuple[tuple[str, Callable[[_Ctx], list[str]]], ...] = (
    ("header", _header),
    ("global Dice", _global_dice_section),
    ("subsets", _subset_section),
    ("cohorts", _cohorts_section),
    ("paper tables", _paper_tables_section),
    ("contribution", _contribution_section),
    ("ROC", _roc_section),
    ("privacy", _privacy_section),
    ("sites", _sites_section),
)


def build_report(run_dir: Path, data_dir: Path | None = None, device: str = "auto") -> Path:
    """Write ``run_dir/report.md`` and its PNG figures under ``run_dir/figures/``; return the report's path.

    Args:
        run_dir: a run directory (config.json, metrics.jsonl, checkpoints/).
        data_dir: data root (holding ``heldout/``) or the held-out folder itself; default: the run config's
            ``test-dir`` / ``<data-dir>/heldout``. Only the checkpoint-based contribution and the ROC need it.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:i]"`` for the held-out predictions.

    Raises:
        FileNotFoundError: if ``run_dir`` does not exist. Anything missing inside it is reported, not raised.
    """
    run = load_run(Path(run_dir))
    fig_dir = run.run_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    held, reason = analyse_heldout(run.run_dir, run.config, Path(data_dir) if data_dir is not None else None, device)
    ctx = _Ctx(run=run, fig_dir=fig_dir, heldout=held, heldout_reason=reason)
    lines: list[str] = []
    for name, section in SECTIONS:
        try:
            lines += section(ctx)
        except Exception as exc:  # noqa: BLE001 - one broken section must not cost the whole report
            log.exception("report section %r failed", name)
            lines += [f"## {name}", "", f"This section could not be built: {type(exc).__name__}: {exc}", ""]
    if ctx.figures:
        lines += ["---", "", "Figures: " + ", ".join(f"`{p.relative_to(run.run_dir).as_posix()}`" for p in ctx.figures)]
    out = run.run_dir / "report.md"
    atomic_write_text(out, "\n".join(lines).rstrip() + "\n")
    return out
