"""The Gaussian mechanism for the numbers a site releases besides DP-SGD updates (its evaluation statistics).

A release of a vector ``f(D)`` whose L2 sensitivity to adding or removing one patient is ``S`` adds independent
Gaussian noise of std ``z * S`` to every entry (``z``: the noise multiplier, the site policy's
``eval-noise-multiplier``). Its Rényi DP at order ``alpha`` is ``alpha / (2 z^2)``: exactly what Opacus's RDP
accountant computes for a history entry ``(z, sample_rate=1.0, steps=1)`` (``opacus.accountants.analysis.rdp``:
``_compute_rdp`` returns ``alpha / (2 * sigma**2)`` for ``q == 1``). So the site's one ledger composes releases
and training rounds exactly (:func:`client.privacy.session.release_budget`, :func:`~client.privacy.session.charge_release`).

The noise is drawn from the operating system's entropy (:class:`random.SystemRandom`), never from a seed: the run
config's seed is chosen by the server, and noise it could recompute would protect nothing.
"""

from __future__ import annotations

import math
import random

import numpy as np

__all__ = ["GAUSSIAN_RELEASE_RATE", "gaussian_release"]

#: Sample rate of a Gaussian release in the RDP history: the whole data set, every time.
GAUSSIAN_RELEASE_RATE = 1.0

_SYSTEM = random.SystemRandom()


def gaussian_release(values: np.ndarray, *, noise_multiplier: float, sensitivity: float,
                     rng: random.Random | None = None) -> np.ndarray:
    """``values`` plus independent Gaussian noise of std ``noise_multiplier * sensitivity`` per entry.

    Args:
        values: the exact statistics, any shape.
        noise_multiplier: ``z > 0``.
        sensitivity: L2 sensitivity of ``values`` to one privacy unit, ``> 0``.
        rng: source of the noise (tests); default: the operating system's entropy.

    Raises:
        ValueError: a non-positive or non-finite noise multiplier or sensitivity.
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"the release's noise multiplier must be a positive number, got {noise_multiplier}")
    if not (math.isfinite(sensitivity) and sensitivity > 0):
        raise ValueError(f"the release's sensitivity must be a positive number, got {sensitivity}")
    source = rng if rng is not None else _SYSTEM
    std = float(noise_multiplier) * float(sensitivity)
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    noise = np.asarray([source.gauss(0.0, std) for _ in range(flat.size)], dtype=np.float64)
    return (flat + noise).reshape(np.shape(values))
