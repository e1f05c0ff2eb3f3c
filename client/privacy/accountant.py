"""The site's persistent privacy accountant.

A site's privacy loss composes over *every* round it ever trains, across daemon restarts and across runs. The
accountant's whole state is Opacus's history, a list of ``(noise_multiplier, sample_rate, steps)`` triples: for the
RDP accountant (the one fedfusion uses, see below) that history determines epsilon exactly, so a JSON file of it is a
complete and exact saved state. It lives at ``<state-dir>/privacy-accountant.json`` and is written atomically
(temporary file, fsync, rename) after every round, so a crash never leaves a half-written budget.

Why RDP and not PRV: RDP composes heterogeneous histories (different noise or sample rates across runs) exactly
and cheaply, is what :func:`opacus.accountants.utils.get_noise_multiplier` defaults to, and is a valid (slightly
conservative) upper bound. PRV gives tighter numbers but its epsilon depends on numerical discretisation
parameters (``eps_error``), which would make a saved budget less reproducible.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opacus.accountants import RDPAccountant

from models.atomic import atomic_write_text

log = logging.getLogger(__name__)

#: File name of the saved accountant inside a site's state directory.
ACCOUNTANT_FILE = "privacy-accountant.json"
#: Accounting mechanism (see module docstring).
MECHANISM = "rdp"
_FORMAT = "fedfusion-privacy-accountant/1"

HistoryEntry = tuple[float, float, int]


def epsilon_of(history: list[HistoryEntry], delta: float) -> float:
    """Epsilon a *fresh* Opacus RDP accountant computes for ``history`` at ``delta`` (0 for an empty history)."""
    return _epsilon(tuple((float(s), float(q), int(n)) for s, q, n in history), float(delta))


@functools.lru_cache(maxsize=64)
def _epsilon(history: tuple[HistoryEntry, ...], delta: float) -> float:
    # ~90 ms per Opacus call; a round asks for the same (history, delta) several times (budget check, reply
    # metrics, the ledger's informational copy), and the answer depends on nothing else.
    if not history:
        return 0.0
    acc = RDPAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def _merge(history: list[HistoryEntry], entry: HistoryEntry) -> list[HistoryEntry]:
    """Append ``entry``, merging it into the last entry when noise and sample rate are equal (as Opacus does)."""
    out = list(history)
    sigma, q, steps = entry
    if out and out[-1][0] == sigma and out[-1][1] == q:
        out[-1] = (sigma, q, out[-1][2] + steps)
    else:
        out.append(entry)
    return out


@dataclass
class PersistentAccountant:
    """The privacy ledger of one site, saved in its state directory.

    Attributes:
        path: JSON file holding the ledger.
        delta: the delta of the last recorded round (informational: the RDP history is delta-free, epsilon is
            computed at whatever delta is asked, see :meth:`epsilon`).
        history: Opacus RDP history, ``[(noise_multiplier, sample_rate, steps), ...]``.
        rounds: rounds trained so far (informational; Gaussian releases such as evaluations are in the history
            but not counted here).
    """

    path: Path
    delta: float | None = None
    history: list[HistoryEntry] = field(default_factory=list)
    rounds: int = 0

    # -- persistence ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, state_dir: str | os.PathLike[str]) -> "PersistentAccountant":
        """Load the ledger of ``state_dir`` (an empty ledger when none was saved yet).

        Raises:
            ValueError: when the file exists but cannot be read: the site must not silently reset its budget.
        """
        path = Path(state_dir) / ACCOUNTANT_FILE
        if not path.exists():
            return cls(path=path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != _FORMAT or data.get("mechanism") != MECHANISM:
                raise ValueError(f"unexpected format {data.get('format')!r} / mechanism {data.get('mechanism')!r}")
            history = [(float(s), float(q), int(n)) for s, q, n in data["history"]]
            delta = None if data.get("delta") is None else float(data["delta"])
            return cls(path=path, delta=delta, history=history, rounds=int(data.get("rounds", 0)))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"the privacy ledger {path} is unreadable ({exc}); refusing to train rather than reset the site's "
                "spent budget. Restore it from backup, or (only if you accept losing the record) move it away."
            ) from exc

    def save(self) -> None:
        """Write the ledger atomically: temporary file in the same folder, fsync, rename."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data: dict[str, Any] = {
            "format": _FORMAT,
            "mechanism": MECHANISM,
            "delta": self.delta,
            "rounds": self.rounds,
            "history": [[s, q, n] for s, q, n in self.history],
            # informational copy for operators reading the file; the history is the state
            "epsilon": self.epsilon(self.delta) if self.delta else 0.0,
        }
        atomic_write_text(self.path, json.dumps(data, indent=1))

    # -- accounting ----------------------------------------------------------------------------------
    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far, at ``delta``."""
        return epsilon_of(self.history, delta)

    def prospective_epsilon(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        """Epsilon the site *would* have spent after one more round of ``steps`` steps (the ledger is unchanged)."""
        return epsilon_of(_merge(self.history, (float(noise_multiplier), float(sample_rate), int(steps))), delta)

    def record(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float, *,
               training: bool = True) -> None:
        """Charge one round of ``steps`` DP-SGD steps (``training=False``: one release of another mechanism, e.g. a
        Gaussian release as ``(z, 1.0, 1)``) and save the ledger."""
        if steps <= 0:
            return
        if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
            raise ValueError(f"noise multiplier must be positive to account for it, got {noise_multiplier}")
        self.delta = float(delta)
        self.history = _merge(self.history, (float(noise_multiplier), float(sample_rate), int(steps)))
        self.rounds += 1 if training else 0
        self.save()
