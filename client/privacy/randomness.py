"""Where a site's training randomness comes from: the OS's CSPRNG, unless the site's own policy asks otherwise.

DP-SGD protects a case only if nobody outside the site can predict the Gaussian noise added to each step (and
which cases each Poisson step sampled): whoever knows the noise subtracts it from the update and is left with the
clipped gradient sum. So the noise must never be seeded from anything the server knows or sends (run config
``seed``, the round number, a config record value).

Default (a :class:`RandomStream` from :meth:`RandomStream.fresh`): every draw reads new bytes from the operating
system's CSPRNG (:func:`system_entropy`, ``os.urandom``: Linux ``getrandom(2)``), so each step has fresh entropy
and there is no seed to guess. Uniforms are 53-bit floats from those bytes; Gaussians come from Box-Muller in
float64 and then Opacus's floating-point-attack-resistant construction (Opacus ``_generate_noise`` with
``secure_mode=True``: the sum of ``2n = 4`` draws divided by 2, after Holohan & Braghin 2021, "Secure random
sampling in differential privacy", section 5.1), so the low bits of a noised value do not reveal the draw.

Why not Opacus's own ``secure_mode``: it needs ``torchcsprng``, whose last release (0.2.1, 2021) requires
``torch==1.8.1`` and has no wheel past Python 3.9: it cannot be installed beside torch 2.13. Why not a
``torch.Generator`` seeded from ``os.urandom``: the CPU generator (MT19937) keeps only the low 32 bits of its seed
(``manual_seed(s)`` and ``manual_seed(s + 2**32)`` draw the same numbers), a search of 2^32 candidates an attacker
holding an update can afford, and MT19937 is not cryptographically secure anyway.

Reproducible (:meth:`RandomStream.reproducible`, only when the site's policy says ``reproducible-noise = true``):
the same bytes come from SHAKE-256 of a seed and a draw counter. Whoever knows the seed's parts can recompute the
noise; the site's reply says so (``dp-reproducible-noise = 1``) and the run report states it.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch

__all__ = ["RandomStream", "system_entropy"]

#: Gaussian draws summed per noise value (Opacus's secure construction with n = 2: 2n draws, divided by sqrt(2n)).
SECURE_DRAWS = 4
_MANTISSA = 53


def system_entropy(n: int) -> bytes:
    """``n`` bytes from the operating system's CSPRNG: the only source of a site's default randomness."""
    return os.urandom(n)


class RandomStream:
    """Random bytes, uniforms and Gaussians for one site round (see the module docstring).

    ``fresh()`` reads the OS CSPRNG at every draw; ``reproducible(*parts)`` derives every draw from SHAKE-256 of the
    parts and a counter (same parts, same sequence of calls: same numbers).
    """

    def __init__(self, seed: bytes | None = None) -> None:
        self._seed = seed
        self._counter = 0

    @classmethod
    def fresh(cls) -> "RandomStream":
        """Draws from the OS CSPRNG (the default of every site)."""
        return cls(None)

    @classmethod
    def reproducible(cls, *parts: object) -> "RandomStream":
        """Draws fixed by ``parts`` (e.g. run seed, round, site name); for experiments whose sites opted in."""
        return cls(hashlib.sha256(repr(tuple(parts)).encode("utf-8")).digest())

    @property
    def is_reproducible(self) -> bool:
        return self._seed is not None

    def bytes(self, n: int) -> bytes:
        """``n`` random bytes (fresh OS entropy, or the next block of the reproducible stream)."""
        if self._seed is None:
            return system_entropy(n)
        self._counter += 1
        return hashlib.shake_256(self._seed + self._counter.to_bytes(8, "little")).digest(n)

    def seed64(self) -> int:
        """A 63-bit integer to seed a ``torch.Generator`` for draws that are not privacy noise (modality dropout,
        ``nn.Dropout``): from this stream, so nothing random in a round comes from the server either."""
        return int.from_bytes(self.bytes(8), "little") >> 1

    def uniform(self, n: int) -> torch.Tensor:
        """``(n,)`` float64 uniforms in the open interval (0, 1), 53 random bits each."""
        return torch.from_numpy(self._uniform(n))

    def normal(self, n: int) -> torch.Tensor:
        """``(n,)`` float64 standard normal draws (Box-Muller on :meth:`uniform` pairs)."""
        return torch.from_numpy(self._normal(n))

    def gaussian(self, shape: torch.Size | tuple[int, ...], std: float) -> torch.Tensor:
        """Noise of ``shape`` (float64, CPU) with std ``std``: each value the sum of :data:`SECURE_DRAWS` normals
        over ``sqrt(SECURE_DRAWS)`` (the floating-point-safe construction of the module docstring)."""
        count = math.prod(shape)
        draws = self._normal(SECURE_DRAWS * count).reshape(SECURE_DRAWS, count)
        return torch.from_numpy(draws.sum(axis=0) * (std / math.sqrt(SECURE_DRAWS))).view(*shape)

    # numpy, not torch, for the arithmetic: on a busy CPU torch's threaded element-wise kernels made a step's noise
    # cost ~60x more than these single-threaded loops (measured: 300 ms vs 5 ms for the default model)
    def _uniform(self, n: int) -> np.ndarray:
        if n <= 0:
            return np.empty(0, dtype=np.float64)
        words = np.frombuffer(self.bytes(8 * n), dtype=np.uint64)
        # the top 53 bits of each word; +0.5 keeps 0 out (log(0) in Box-Muller)
        return ((words >> np.uint64(64 - _MANTISSA)).astype(np.float64) + 0.5) * (2.0 ** -_MANTISSA)

    def _normal(self, n: int) -> np.ndarray:
        pairs = (n + 1) // 2
        u = self._uniform(2 * pairs)
        radius = np.sqrt(-2.0 * np.log(u[:pairs]))
        angle = (2.0 * math.pi) * u[pairs:]
        return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]

    def poisson_mask(self, n: int, rate: float) -> torch.Tensor:
        """``(n,)`` bool: each of ``n`` items independently True with probability ``rate`` (Poisson sampling)."""
        return self.uniform(n) < rate
