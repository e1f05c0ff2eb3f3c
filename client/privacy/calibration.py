"""The one calibration of a site's DP-SGD noise: the site's :meth:`client.privacy.session.DPSession.plan` and the
feasibility planner (:mod:`client.privacy.planner`, ``fedfusion privacy-plan``) both call :func:`plan_noise`, so the
noise a site trains with and the noise the planner predicts are the same number by construction.

For ``N`` privacy units (patients), an expected batch ``B``, ``E`` local epochs and ``R`` rounds: a step samples
each unit with probability ``q = 1 / ceil(N / B)`` (Opacus's Poisson loader), an epoch has ``ceil(N / B)`` steps,
the run ``R * E * ceil(N / B)`` steps, and the noise multiplier is the run's ``dp-noise-multiplier`` or else the
smallest one whose epsilon over those steps, read with the run's accountant (``dp-accountant``), is at most
``dp-target-epsilon``; never below the site's ``min-noise-multiplier``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from common.runconfig import DPConfig
from models.atomic import atomic_write_text

from .engine import (NOISE_SEARCH, derive_noise_multiplier, expected_batch_size, sample_rate_of,
                     steps_per_epoch)

log = logging.getLogger("fedfusion.site")

__all__ = ["NOISE_CACHE", "NoisePlan", "plan_noise"]

#: Derived noise multipliers of past plans, in the site's state directory (a cache, not state).
NOISE_CACHE = "noise-cache.json"


@dataclass(frozen=True)
class NoisePlan:
    """What a site's DP-SGD does over one run (see the module docstring).

    Attributes:
        noise_multiplier: Gaussian noise std / clipping norm.
        sample_rate: Poisson rate ``q`` per unit and step.
        steps_per_epoch: ``ceil(N / B)``.
        steps_per_round: local epochs x steps per epoch (what the ledger charges per round).
        total_steps: rounds x steps per round.
        expected_batch: expected units per step, ``int(N * q)`` (the divisor of the summed clipped gradients).
        derived: the multiplier was derived from the target epsilon (not given by ``dp-noise-multiplier``).
        raised_to_floor: the site's ``min-noise-multiplier`` raised it.
    """

    noise_multiplier: float
    sample_rate: float
    steps_per_epoch: int
    steps_per_round: int
    total_steps: int
    expected_batch: int
    derived: bool
    raised_to_floor: bool


def plan_noise(request: DPConfig, *, num_units: int, batch_size: int, local_epochs: int, num_rounds: int,
               min_noise_multiplier: float = 0.0, cache_dir: Path | None = None) -> NoisePlan:
    """The noise and sampling of a run of ``num_rounds`` rounds over ``num_units`` privacy units.

    ``cache_dir`` (a site's state directory) remembers derived multipliers on disk: the search costs
    seconds (PRV: tens), and a deployed ClientApp process lives for one message.

    Raises:
        ValueError: no units, or a target epsilon that cannot be reached over the planned steps (the message says
            what to change).
    """
    spe = steps_per_epoch(num_units, batch_size)
    q = sample_rate_of(num_units, batch_size)
    steps = num_rounds * local_epochs * spe
    sigma = float(request.noise_multiplier)
    derived = sigma <= 0
    if derived:
        sigma = _derived_noise(cache_dir, request, q, steps)
    raised = sigma < min_noise_multiplier
    if raised:
        sigma = float(min_noise_multiplier)  # more noise only strengthens privacy, so the site may raise it unasked
    return NoisePlan(noise_multiplier=float(sigma), sample_rate=q, steps_per_epoch=spe,
                     steps_per_round=local_epochs * spe, total_steps=steps,
                     expected_batch=expected_batch_size(num_units, batch_size), derived=derived,
                     raised_to_floor=raised)


#: Derivations of this process (a planner over several sites without a state directory).
_MEMO: dict[str, float] = {}


def _derived_noise(cache_dir: Path | None, request: DPConfig, sample_rate: float, steps: int) -> float:
    cache_file = Path(cache_dir) / NOISE_CACHE if cache_dir is not None else None
    # the search's version leads the key: a multiplier another search derived (valid too, but a hair different)
    # is not served, so the planner and the site always agree
    key = f"{NOISE_SEARCH}|{request.accountant}|{request.target_epsilon!r}|{request.delta!r}|{sample_rate!r}|{steps}"
    if cache_file is None and key in _MEMO:
        return _MEMO[key]
    cached: object = {}
    if cache_file is not None:
        try:
            cached = json.loads(cache_file.read_text(encoding="utf-8")) if cache_file.exists() else {}
        except (OSError, ValueError):
            cached = {}
    if isinstance(cached, dict) and isinstance(cached.get(key), (int, float)):
        return float(cached[key])
    # the search costs seconds; simulated sites of one size served by one worker share it (each still gets the
    # value in its own state directory below)
    sigma = _MEMO.get(key)
    if sigma is None:
        sigma = derive_noise_multiplier(target_epsilon=request.target_epsilon, delta=request.delta,
                                        sample_rate=sample_rate, steps=steps, accountant=request.accountant)
        _MEMO[key] = sigma
    if cache_file is not None:
        table = cached if isinstance(cached, dict) else {}
        table[key] = sigma
        try:
            atomic_write_text(cache_file, json.dumps(table, indent=1))
        except OSError as exc:  # a cache, not state: never fail a round for it
            log.warning("could not write %s: %s", cache_file, exc)
    return sigma
