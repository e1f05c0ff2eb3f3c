"""Rows over seeds: mean ± SD, paired differences, and table cells that say how many seeds stand behind them.

A difference counts only when it is outside the noise: :func:`paired` gives the mean and SD of the per-seed
differences between two rows run on the same seeds (same data, initialisation and training randomness), and
:func:`verdict` calls it a tie when the mean difference is within two standard errors of zero (or when only one
seed was run, when it is reported as untested).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .common import Outcome

__all__ = ["Summary", "against", "cell", "of_values", "paired", "summarise", "verdict"]


@dataclass(frozen=True)
class Summary:
    """One metric of one row over its seeds."""

    mean: float
    sd: float
    n: int

    @property
    def sem(self) -> float:
        return self.sd / math.sqrt(self.n) if self.n > 1 else math.nan


def of_values(values: Iterable[float]) -> Summary:
    """Mean, sample SD and count of the finite ``values`` (NaN mean when none is)."""
    kept = [v for v in values if math.isfinite(v)]
    if not kept:
        return Summary(math.nan, math.nan, 0)
    return Summary(statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else 0.0, len(kept))


def summarise(outcomes: Iterable[Outcome], key: str) -> Summary:
    """Mean, sample SD and count of ``key`` over the outcomes where it is finite (NaN mean when none is)."""
    return of_values(o.get(key) for o in outcomes)


def paired(a: Sequence[Outcome], b: Sequence[Outcome], key: str) -> Summary:
    """``key`` of ``a`` minus ``b`` over the seeds both rows ran (per-seed differences, then mean and SD)."""
    by_seed = {o.seed: o.get(key) for o in b}
    return of_values(o.get(key) - by_seed[o.seed] for o in a if o.seed in by_seed)


def verdict(diff: Summary, margin: float = 0.0) -> str:
    """``"better"``, ``"worse"`` or ``"tie"`` for a paired difference against ``margin``: better when the mean
    exceeds ``margin`` by more than two standard errors, worse when it falls short of it likewise, a tie otherwise
    (``margin`` 0: is one row better than the other at all); ``"one seed"`` when a single seed gives no noise
    estimate to test against, ``"n/a"`` when nothing was measured."""
    if diff.n == 0 or not math.isfinite(diff.mean):
        return "n/a"
    if diff.n == 1:
        return "one seed"
    noise = 2 * diff.sem
    if diff.mean - noise > margin:
        return "better"
    if diff.mean + noise < margin:
        return "worse"
    return "tie"


def cell(s: Summary, digits: int = 3) -> str:
    """``0.812 ± 0.010`` over several seeds, ``0.812`` for one, ``n/a`` for none."""
    if s.n == 0 or not math.isfinite(s.mean):
        return "n/a"
    if s.n == 1:
        return f"{s.mean:.{digits}f}"
    return f"{s.mean:.{digits}f} ± {s.sd:.{digits}f}"


def against(diff: Summary, margin: float = 0.0) -> str:
    """:func:`verdict` as words: where a paired difference stands against a required ``margin``."""
    return {
        "better": f"above +{margin:g} beyond two standard errors" if margin else "better beyond two standard errors",
        "worse": f"short of +{margin:g} beyond two standard errors" if margin else "worse beyond two standard errors",
        "tie": f"within two standard errors of +{margin:g}" if margin else "a tie (within two standard errors)",
        "one seed": "one seed: no noise estimate, so not tested",
        "n/a": "not measured",
    }[verdict(diff, margin)]
