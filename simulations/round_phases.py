"""Where a simulated run's wall time goes, per round: the split the benches print and write to docs/benchmarks.md.

Three sources, all inside the run directory:

* ``flower.log`` (Flower's own log lines, time-stamped): when each round starts (``[ROUND r/R]``), when its
  evaluate phase starts (``configure_evaluate``, after the training replies are aggregated), when the ServerApp's
  own evaluation starts (``Global evaluation``) and when the strategy finishes. These give each round's wall time
  and its three phases: *train* (messages out, site training, replies, aggregation), *site evaluation* (Flower's
  evaluate phase) and *server* (its evaluations of the selection, held-out and unseen sets, checkpoint);
* ``metrics.jsonl``: every site's ``train-seconds`` (its local epochs only), whose sum over sites divided by the
  number of sites that can train at once is the round's *ideal* wall time;
* the timings file (:mod:`common.timings`, written when the run had ``FEDFUSION_TIMINGS`` set): what the sites'
  ClientApps spent, by phase (imports, runtime build, training parts, epochs, evaluation), and the server's
  evaluations (selection, held-out and unseen sets) and checkpoint.

Site phases carry no round number when they are not messages (a runtime is built inside a message); they are
attributed to the round whose wall interval holds their start.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import timings

__all__ = ["RoundSplit", "SITE_PHASES", "read_round_splits", "render_splits", "startup_seconds", "work_split"]

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_ROUND = re.compile(r"\[ROUND (\d+)/\d+\]")

#: Site phases summed per round (seconds of wall time inside the ClientApp, summed over sites), in table order:
#: (timing phase, column title). ``train-other`` is derived: a train message's handler time minus the rest.
SITE_PHASES: tuple[tuple[str, str], ...] = (
    ("import", "imports"),
    ("runtime", "runtime build"),
    ("training-parts", "DP plan + Opacus"),
    ("train-compute", "local epochs"),
    ("train-other", "other in train handler"),
    ("evaluate-message", "evaluate handler"),
)


@dataclass
class RoundSplit:
    """One round's wall time and where it went (seconds)."""

    round: int
    start: float
    wall: float
    train_phase: float
    site_eval_phase: float
    server_phase: float
    train_seconds: list[float] = field(default_factory=list)
    site: dict[str, float] = field(default_factory=dict)
    server_eval: float = 0.0
    checkpoint: float = 0.0
    #: CPU seconds of the server's evaluations (of an earlier round) that ran during this round's train phase
    eval_cpu_beside: float = 0.0

    @property
    def summed_training(self) -> float:
        return float(sum(self.train_seconds))

    def ideal(self, parallel: int) -> float:
        """Summed training over the number of sites that can train at once (issue 15's definition)."""
        return self.summed_training / max(1, parallel) if self.train_seconds else float("nan")

    def ideal_undisturbed(self, parallel: int) -> float:
        """:meth:`ideal` less the CPU the server's evaluation took from the sites' training beside it: on a machine
        whose cores the sites already fill, every CPU second of it delays a site's epochs by about a second, which
        would otherwise raise the ideal and flatter the ratio. Conservative: where a core was idle it subtracts
        time the sites did not lose."""
        if not self.train_seconds:
            return float("nan")
        return max(0.0, self.summed_training - self.eval_cpu_beside) / max(1, parallel)

    def ratio(self, parallel: int) -> float:
        ideal = self.ideal(parallel)
        return self.wall / ideal if ideal and ideal == ideal else float("nan")


def _epoch(stamp: str) -> float:
    return dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _log_marks(flower_log: Path) -> tuple[dict[int, dict[str, float]], float | None]:
    """Per round: the epoch seconds of ``start``, ``evaluate`` (configure_evaluate) and ``server`` (Global
    evaluation); and when the strategy finished."""
    marks: dict[int, dict[str, float]] = {}
    current: int | None = None
    end: float | None = None
    for line in Path(flower_log).read_text(encoding="utf-8", errors="replace").splitlines():
        m = _STAMP.match(line)
        if not m:
            continue
        t = _epoch(m.group(1))
        r = _ROUND.search(line)
        if r:
            current = int(r.group(1))
            marks[current] = {"start": t}
        elif current is not None and "configure_evaluate" in line:
            marks[current].setdefault("evaluate", t)
        elif current is not None and "Global evaluation" in line and "results" not in line:
            marks[current].setdefault("server", t)
        elif "Strategy execution finished" in line:
            end = t
    return marks, end


def _train_seconds(metrics: Path) -> dict[int, list[float]]:
    from models.runlog import is_site_scope, iter_metrics

    out: dict[int, list[float]] = defaultdict(list)
    for rec in iter_metrics(metrics):
        if (rec["phase"] == "train" and is_site_scope(rec["scope"]) and rec["metric"] == "train-seconds"
                and rec["value"] is not None):
            out[int(rec["round"])].append(float(rec["value"]))
    return dict(out)


def read_round_splits(run_dir: Path, timings_file: Path | None = None) -> list[RoundSplit]:
    """The split of every round of the run in ``run_dir`` (see the module docstring); site and server phases
    stay empty without a timings file."""
    run_dir = Path(run_dir)
    marks, end = _log_marks(run_dir / "flower.log")
    trains = _train_seconds(run_dir / "metrics.jsonl")
    rounds = sorted(marks)
    splits: list[RoundSplit] = []
    for i, rnd in enumerate(rounds):
        mk = marks[rnd]
        stop = marks[rounds[i + 1]]["start"] if i + 1 < len(rounds) else end
        if stop is None:
            continue
        evaluate = mk.get("evaluate", mk.get("server", stop))
        server = mk.get("server", stop)
        splits.append(RoundSplit(
            round=rnd, start=mk["start"], wall=stop - mk["start"], train_phase=evaluate - mk["start"],
            site_eval_phase=server - evaluate, server_phase=stop - server, train_seconds=trains.get(rnd, []),
        ))
    if timings_file is not None:
        _add_timings(splits, timings.read(timings_file))
    return splits


def _round_of(splits: Sequence[RoundSplit], rec: dict[str, Any]) -> RoundSplit | None:
    if "round" in rec:
        for s in splits:
            if s.round == int(rec["round"]):
                return s
    t = float(rec.get("start", 0.0))
    for s in splits:
        if s.start <= t < s.start + s.wall:
            return s
    return None


def _add_timings(splits: Sequence[RoundSplit], records: Sequence[dict[str, Any]]) -> None:
    for rec in records:
        split = _round_of(splits, rec)
        if split is None:
            continue
        name, wall = rec["phase"], float(rec["wall"])
        if rec.get("who") == "server":
            if name == "server-eval":
                split.server_eval += wall
                _add_eval_beside(splits, rec)
            elif name == "checkpoint":
                split.checkpoint += wall
            continue
        site = split.site
        if name == "train-message":
            site["train-message"] = site.get("train-message", 0.0) + wall
            site["train-compute"] = site.get("train-compute", 0.0) + float(rec.get("compute", 0.0))
        elif name in ("import", "runtime", "training-parts", "evaluate-message"):
            site[name] = site.get(name, 0.0) + wall
    for split in splits:
        site = split.site
        if "train-message" in site:
            # imports, runtime and parts built by an evaluate message are not part of a train handler; the small
            # error this leaves is on the conservative side (other work is under- rather than over-counted)
            inside = sum(site.get(k, 0.0) for k in ("import", "runtime", "training-parts", "train-compute"))
            site["train-other"] = max(0.0, site["train-message"] - inside)


def _add_eval_beside(splits: Sequence[RoundSplit], rec: dict[str, Any]) -> None:
    """Charge the CPU of a server evaluation to the train phases it overlapped, in proportion to the overlap
    (the server evaluates round r while the sites train round r+1, server/server_app.py)."""
    start, wall = float(rec.get("start", 0.0)), float(rec["wall"])
    cpu = float(rec.get("cpu", wall))
    if wall <= 0:
        return
    for s in splits:
        overlap = min(start + wall, s.start + s.train_phase) - max(start, s.start)
        if overlap > 0:
            s.eval_cpu_beside += cpu * overlap / wall


def startup_seconds(splits: Sequence[RoundSplit], timings_file: Path) -> tuple[float, float]:
    """``(before round 1, prepare)``: wall seconds from the driver starting Ray to round 1 (Ray, the apps, the
    ServerApp's set-up, the sites' prepare step), and of it the prepare step; NaN without the records."""
    records = timings.read(timings_file)
    starts = [float(r["start"]) for r in records if r.get("who") == "driver" and r["phase"] == "ray-start"]
    prepare = sum(float(r["wall"]) for r in records if r.get("who") == "server" and r["phase"] == "prepare")
    if not starts or not splits:
        return float("nan"), prepare
    return splits[0].start - min(starts), prepare


def work_split(splits: Sequence[RoundSplit], parallel: int, timings_file: Path) -> str:
    """One paragraph: where a whole simulation's time went (start-up, the rounds' phases) against its ideal."""
    startup, prepare = startup_seconds(splits, timings_file)
    rounds = sum(s.wall for s in splits)
    ideal = sum(s.ideal(parallel) for s in splits)
    train = sum(s.train_phase for s in splits)
    site_eval = sum(s.site_eval_phase for s in splits)
    server = sum(s.server_phase for s in splits)
    server_eval = sum(s.server_eval for s in splits)
    epochs = sum(s.summed_training for s in splits)
    beside = sum(s.eval_cpu_beside for s in splits)
    undisturbed = sum(s.ideal_undisturbed(parallel) for s in splits)
    overlap = (
        f"; the server's evaluations ran beside the next round's training for {beside:.0f} CPU s, which the sites' "
        f"epochs lost on a full machine: ideal without it {undisturbed:.0f} s, (start-up + rounds) / that "
        f"{(startup + rounds) / undisturbed if undisturbed else float('nan'):.2f}"
    ) if beside >= 0.5 else ""
    return (
        f"work split: {startup:.0f} s before round 1 (Ray, apps, sites preparing: {prepare:.0f} s); {len(splits)} "
        f"rounds {rounds:.0f} s = train phase {train:.0f} s (sites' local epochs {epochs:.0f} s summed over sites) + "
        f"site evaluation {site_eval:.0f} s + server {server:.0f} s (evaluations {server_eval:.0f} s); "
        f"ideal (summed local epochs / {parallel} sites at a time) {ideal:.0f} s, rounds / ideal "
        f"{rounds / ideal if ideal else float('nan'):.2f}, (start-up + rounds) / ideal "
        f"{(startup + rounds) / ideal if ideal else float('nan'):.2f}{overlap}"
    )


def render_splits(splits: Sequence[RoundSplit], parallel: int, with_sites: bool = True) -> list[str]:
    """Markdown table rows (header included) of ``splits``: per round the wall time, the ideal, their ratio, the
    three phases and (``with_sites``) the sites' summed handler time by phase and the server's work."""
    head = ["round", "wall s", "ideal s", "wall / ideal", "train phase s", "site-eval phase s", "server phase s"]
    if with_sites:
        head += [f"sites: {title} s" for _, title in SITE_PHASES] + ["server eval s", "checkpoint s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for s in splits:
        row = [str(s.round), f"{s.wall:.1f}", f"{s.ideal(parallel):.1f}", f"{s.ratio(parallel):.2f}",
               f"{s.train_phase:.1f}", f"{s.site_eval_phase:.1f}", f"{s.server_phase:.1f}"]
        if with_sites:
            row += [f"{s.site.get(key, 0.0):.1f}" for key, _ in SITE_PHASES]
            row += [f"{s.server_eval:.1f}", f"{s.checkpoint:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    return lines
