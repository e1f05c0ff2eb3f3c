"""A site's DP session for one run: the noise it trains with, the budget check before a round, the charge after.

What the run asks (:class:`common.runconfig.DPConfig`) meets what the site allows (:class:`SitePolicy`) and what
it has spent (:class:`PersistentAccountant`, in the site's state directory) here, and nowhere else:

1. :meth:`DPSession.plan` fixes the noise multiplier: the run's, or the smallest that keeps the planned rounds ×
   epochs within ``dp-target-epsilon`` (derived once and remembered on disk: a deployed ClientApp process lives
   for one message), never below the site's ``min-noise-multiplier``;
2. :meth:`DPSession.reserve` refuses a round that would take the site past ``max-epsilon`` and otherwise saves a
   reservation of it in the ledger, under the ledger's lock, *before* training (a concurrent round sees it);
3. :meth:`DPSession.commit` turns the reservation into a recorded round after training and returns the reply's
   privacy numbers; :meth:`DPSession.release` drops it when the round failed before any update could leave the
   site. A reservation neither committed nor released (the process died) stays counted as spent.

Releases outside DP-SGD (the evaluation statistics, :mod:`client.privacy.release`) go to the same ledger, through
the same lock and reservations, as a Gaussian-mechanism entry ``(noise multiplier, 1.0, 1)``:
:func:`reserve_release` checks one more fits under ``max-epsilon`` and reserves it, :func:`commit_release` records
it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from common.runconfig import DPConfig

from .accountant import epsilon_of, locked_ledger
from .calibration import NOISE_CACHE, plan_noise
from .policy import SitePolicy

log = logging.getLogger("fedfusion.site")

__all__ = ["BudgetExhausted", "DPSession", "NOISE_CACHE", "NO_DP_METRICS", "Reservation", "commit_release",
           "reserve_release"]

class BudgetExhausted(RuntimeError):
    """The next round would take the site past its ceiling; the numbers say by how much."""

    def __init__(self, spent: float, after: float, ceiling: float, delta: float) -> None:
        self.spent, self.after, self.ceiling, self.delta = spent, after, ceiling, delta
        super().__init__(
            f"epsilon spent {spent:.3f} (delta {delta:g}); this round would bring it to {after:.3f}, above the "
            f"site's max-epsilon {ceiling:.3f}"
        )


@dataclass(frozen=True)
class Reservation:
    """A round reserved in the ledger of ``state_dir`` under id ``rid`` (see :meth:`DPSession.reserve`)."""

    state_dir: Path
    rid: str


@dataclass(frozen=True)
class DPSession:
    """The DP side of one site's run (see the module docstring).

    Attributes:
        state_dir: the site's state directory (ledger, noise cache).
        request: what the run config asks (``dp-*``).
        policy: the site's policy (already checked against ``request``).
        sample_rate: Poisson sampling rate per step, ``1 / steps_per_epoch``.
        steps_per_round: DP-SGD steps of one round (local epochs × steps per epoch).
        noise_multiplier: noise std / clipping norm the site trains with.
    """

    state_dir: Path
    request: DPConfig
    policy: SitePolicy
    sample_rate: float
    steps_per_round: int
    noise_multiplier: float

    @classmethod
    def plan(cls, state_dir: Path, request: DPConfig, policy: SitePolicy, *, num_cases: int, batch_size: int,
             local_epochs: int, num_rounds: int, site_name: str = "site") -> "DPSession":
        """Fix the noise for a run of ``num_rounds`` rounds over ``num_cases`` cases (see the module docstring);
        :func:`client.privacy.calibration.plan_noise` computes it, the planner's code path too.

        Raises:
            ValueError: the target epsilon cannot be reached over the planned steps (the message says what to change).
        """
        plan = plan_noise(request, num_units=num_cases, batch_size=batch_size, local_epochs=local_epochs,
                          num_rounds=num_rounds, min_noise_multiplier=policy.min_noise_multiplier,
                          cache_dir=Path(state_dir))
        if plan.derived:
            log.info("site %s: noise multiplier derived for epsilon=%g, delta=%g (%s accountant) over %d rounds x %d "
                     "epochs (%d steps, q=%.4f)", site_name, request.target_epsilon, request.delta,
                     request.accountant, num_rounds, local_epochs, plan.total_steps, plan.sample_rate)
        if plan.raised_to_floor:
            log.info("site %s: noise multiplier raised to the site floor %.4f", site_name, policy.min_noise_multiplier)
        return cls(Path(state_dir), request, policy, plan.sample_rate, plan.steps_per_round, plan.noise_multiplier)

    def reserve(self) -> Reservation:
        """Reserve one round in the site's ledger, when it fits under ``max-epsilon`` with everything already spent
        or reserved (check and reservation are one step under the ledger's lock).

        Raises:
            BudgetExhausted: the round would exceed the ceiling (nothing is reserved).
            ValueError: the ledger exists but is unreadable (the site must not silently reset its budget).
        """
        delta, accountant = self.request.delta, self.request.accountant
        with locked_ledger(self.state_dir) as ledger:
            after = ledger.prospective_epsilon(self.noise_multiplier, self.sample_rate, self.steps_per_round, delta,
                                               accountant)
            if after > self.policy.max_epsilon:
                raise BudgetExhausted(ledger.epsilon(delta, accountant), after, self.policy.max_epsilon, delta)
            rid = ledger.reserve(self.noise_multiplier, self.sample_rate, self.steps_per_round, delta)
        return Reservation(Path(self.state_dir), rid)

    def commit(self, reservation: Reservation) -> dict[str, float]:
        """Record the reserved round (saved atomically) and return the reply's privacy numbers.

        The charge is the planned steps: Opacus's Poisson loader has exactly that many steps, and the training loop
        takes a noise-only step for an empty batch, so planned = applied. ``epsilon-total`` is everything the site
        has spent or reserved (other rounds in flight included); ``epsilon-round`` what this round added to it.
        """
        delta, accountant = self.request.delta, self.request.accountant
        with locked_ledger(reservation.state_dir) as ledger:
            before = epsilon_of(ledger.spent_history(without=reservation.rid), delta, accountant)
            ledger.commit(reservation.rid)
            total = ledger.epsilon(delta, accountant)
        return {
            "dp-enabled": 1.0, "epsilon-total": total, "epsilon-round": total - before, "delta": delta,
            "noise-multiplier": self.noise_multiplier, "max-grad-norm": self.request.max_grad_norm,
        }

    @staticmethod
    def release(reservation: Reservation) -> None:
        """Drop a reservation whose round failed before its update could leave the site (no charge)."""
        with locked_ledger(reservation.state_dir) as ledger:
            ledger.release(reservation.rid)


def reserve_release(state_dir: Path, policy: SitePolicy, noise_multiplier: float, delta: float,
                    accountant: str = "rdp") -> Reservation:
    """Reserve one Gaussian release at ``noise_multiplier`` in the site's ledger (under its lock), when it still fits
    under ``max-epsilon`` (read with ``accountant``) with everything spent or reserved.

    Raises:
        BudgetExhausted: the release would exceed the ceiling (nothing is reserved).
        ValueError: the ledger exists but is unreadable.
    """
    from .release import GAUSSIAN_RELEASE_RATE

    with locked_ledger(state_dir) as ledger:
        after = ledger.prospective_epsilon(noise_multiplier, GAUSSIAN_RELEASE_RATE, 1, delta, accountant)
        if after > policy.max_epsilon:
            raise BudgetExhausted(ledger.epsilon(delta, accountant), after, policy.max_epsilon, delta)
        rid = ledger.reserve(noise_multiplier, GAUSSIAN_RELEASE_RATE, 1, delta, training=False)
    return Reservation(Path(state_dir), rid)


def commit_release(reservation: Reservation, delta: float, accountant: str = "rdp") -> dict[str, float]:
    """Record the reserved release (not counted as a training round) and return the reply's privacy numbers
    (``epsilon-total``, ``epsilon-round``: this release's share, ``delta``; read with ``accountant``)."""
    with locked_ledger(reservation.state_dir) as ledger:
        before = epsilon_of(ledger.spent_history(without=reservation.rid), delta, accountant)
        ledger.commit(reservation.rid)
        total = ledger.epsilon(delta, accountant)
    return {"epsilon-total": total, "epsilon-round": total - before, "delta": delta}


#: The reply's privacy numbers of a round trained without DP.
NO_DP_METRICS: dict[str, float] = {"dp-enabled": 0.0, "epsilon-total": 0.0, "epsilon-round": 0.0, "delta": 0.0,
                                   "noise-multiplier": 0.0, "max-grad-norm": 0.0}
