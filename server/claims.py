"""Bounds on the weights sites claim: no site can buy the federation by claiming more cases than it has.

A reply's aggregation weight is what the site *says*: ``num-examples`` for shared parameters, ``cases-<m>`` for
modality ``m``'s parameters. A malicious site could claim ``num-examples = 1e9`` and make every parameter group,
including encoders no honest site holds, its own update. :class:`ClaimGuard` rejects (never clips: a site caught
lying about its size is not trusted with a smaller weight either) any reply whose claims

* are not numbers: ``num-examples`` must be positive and finite, each ``cases-<m>`` finite and ``>= 0``;
* are inconsistent: ``cases-<m> > num-examples`` (a site cannot have more cases with a modality than cases);
* exceed the site's **pin**: the first accepted claims of a node (per phase, ``train`` and ``evaluate``) are
  pinned for the rest of the run, and later claims may not exceed them (equal or lower is fine: sites report
  counts rounded to a stable granularity, so an honest site repeats the same values; a jump is refused);
* for a node without a pin: ``num-examples > claim_factor x`` the *low median* of the other claims (the pinned
  claims of every earlier accepted node and this round's unpinned claims). The low median (the smaller middle
  value; the smaller of two) cannot be raised by one huge claim, even with two replies.

Every weight a site can ever get is therefore at most ``claim_factor x`` the median site's claim at the time it
was first accepted. Pins are strategy state: saved in ``last.pt`` (numbers, strings and dicts only) and restored
on resume.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from common.reply_metrics import WEIGHT_KEY

__all__ = ["ClaimGuard", "low_median", "weight_problem"]

PHASES = ("train", "evaluate")


def weight_problem(value: object) -> str | None:
    """Why ``value`` cannot be a reply's ``num-examples`` (``None`` when it is a positive finite number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return f"metric {WEIGHT_KEY!r} must be a positive finite number, got {value!r}"
    return None


def low_median(values: Sequence[float]) -> float:
    """The lower middle value of ``values`` (the median for an odd count, the smaller middle one for an even
    count): one outlier can never raise it, even among two values. ``values`` must not be empty."""
    ordered = sorted(values)
    return float(ordered[(len(ordered) - 1) // 2])


class ClaimGuard:
    """Checks claimed weights and keeps each node's pinned claims across rounds (see the module docstring).

    Args:
        factor: ``k``: a first claim may be at most ``k x`` the low median claim (run config ``claim-factor``).
        modalities: the model's modalities (their ``cases-<m>`` are train claims).
        tolerance: relative slack for float round-off when comparing a claim with its pin.
    """

    def __init__(self, factor: float = 10.0, modalities: Sequence[str] = (), tolerance: float = 1e-6) -> None:
        if not factor > 1.0:
            raise ValueError(f"claim factor (run config 'claim-factor') must be > 1, got {factor}; the default is 10")
        self.factor = float(factor)
        self.modalities = tuple(modalities)
        self.tolerance = float(tolerance)
        #: phase -> node id -> {"round": first accepted round, "num-examples": n, "cases-<m>": c, ...}
        self.pins: dict[str, dict[int, dict[str, float]]] = {phase: {} for phase in PHASES}

    # -- state for checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Pins as plain dicts of strings and floats (checkpoints load with ``weights_only=True``)."""
        return {phase: {str(node): dict(claims) for node, claims in pins.items()} for phase, pins in self.pins.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pins = {phase: {} for phase in PHASES}
        for phase, pins in state.items():
            if phase in self.pins and isinstance(pins, Mapping):
                self.pins[phase] = {int(node): {str(k): float(v) for k, v in claims.items()}
                                    for node, claims in pins.items()}

    # -- checks ------------------------------------------------------------------------------------
    def claims(self, phase: str, metrics: Mapping[str, object]) -> dict[str, float] | str:
        """The weights a reply claims in ``phase`` (``num-examples``, and for ``train`` every ``cases-<m>``), or
        why they are unusable."""
        n = metrics.get(WEIGHT_KEY)
        problem = weight_problem(n)
        if problem is not None:
            return problem
        out = {WEIGHT_KEY: float(n)}  # type: ignore[arg-type]
        if phase != "train":
            return out
        for m in self.modalities:
            key = f"cases-{m}"
            value = metrics.get(key, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                return f"metric {key!r} must be a finite number >= 0, got {value!r}"
            if value > out[WEIGHT_KEY]:
                return (f"claims {key} = {value:g} but {WEIGHT_KEY} = {out[WEIGHT_KEY]:g}: a site cannot have more "
                        f"cases with {m} than cases")
            out[key] = float(value)
        return out

    def check(self, phase: str, server_round: int, claimed: Mapping[int, Mapping[str, object]]) -> dict[int, str]:
        """Which of this round's replies claim too much, and why.

        Args:
            phase: ``train`` or ``evaluate`` (pinned separately).
            server_round: the round (named in reasons).
            claimed: node id -> the reply's metrics.

        Returns:
            node id -> rejection reason, for the rejected replies only.
        """
        pins = self.pins[phase]
        problems: dict[int, str] = {}
        valid: dict[int, dict[str, float]] = {}
        for node, metrics in claimed.items():
            claims = self.claims(phase, metrics)
            if isinstance(claims, str):
                problems[node] = claims
            else:
                valid[node] = claims
        population = [p[WEIGHT_KEY] for p in pins.values()] + [c[WEIGHT_KEY] for n, c in valid.items() if n not in pins]
        for node, claims in valid.items():
            pin = pins.get(node)
            if pin is not None:
                problem = self._above_pin(claims, pin)
            else:
                problem = self._above_median(claims[WEIGHT_KEY], population)
            if problem is not None:
                problems[node] = problem
        return problems

    def _above_pin(self, claims: Mapping[str, float], pin: Mapping[str, float]) -> str | None:
        for key, value in claims.items():
            limit = pin.get(key, 0.0)
            if value > limit * (1.0 + self.tolerance) + self.tolerance:
                return (f"claims {key} = {value:g}, above the {limit:g} pinned since round {int(pin['round'])} "
                        "(a site's claimed counts may not grow during a run; start a new run if its data grew)")
        return None

    def _above_median(self, n: float, population: Sequence[float]) -> str | None:
        reference = low_median(population)
        if n > self.factor * reference:
            return (f"claims {WEIGHT_KEY} = {n:g}, {n / reference:.1f}x the median claim {reference:g} of the sites "
                    f"(limit {self.factor:g}x, run config claim-factor)")
        return None

    def pin(self, phase: str, server_round: int, accepted: Mapping[int, Mapping[str, object]]) -> None:
        """Pin the claims of accepted replies from nodes without a pin yet (their first accepted round)."""
        pins = self.pins[phase]
        for node, metrics in accepted.items():
            if node in pins:
                continue
            claims = self.claims(phase, metrics)
            if isinstance(claims, dict):
                pins[node] = {"round": float(server_round), **claims}
