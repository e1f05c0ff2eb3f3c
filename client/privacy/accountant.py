"""The site's persistent privacy accountant.

A site's privacy loss composes over *every* round it ever trains, across daemon restarts and across runs. The
accountant's whole state is Opacus's history, a list of ``(noise_multiplier, sample_rate, steps)`` triples: for
either accountant fedfusion offers (RDP, PRV; see below) that history determines epsilon, so a JSON file of it is a
complete and exact saved state. It lives at ``<state-dir>/privacy-accountant.json`` and is written atomically
(temporary file, fsync, rename, fsync of the folder), so a crash never leaves a half-written budget.

Concurrency and crashes: a round is *reserved* before it trains and *committed* after (or *released* when it failed
before any update could leave the site), each a read-modify-write under an exclusive ``flock`` on
``<state-dir>/privacy-accountant.lock`` (:func:`locked_ledger`). Two runs training on one SuperNode at once
therefore see each other's reservations: no budget check passes on a stale ledger, and no write is lost. A
reservation is saved to disk before training starts; a round whose process died before committing or releasing
(a crash, a kill) stays reserved for good and **counts as spent** (the stricter choice: the site cannot tell
whether its update left before the crash).

Which accountant (run-config key ``dp-accountant``): the history is the same for every accountant (a composition
of Poisson-subsampled Gaussian mechanisms, each entry ``(noise_multiplier, sample_rate, steps)``), and epsilon is
computed from it when asked, by the accountant asked for (:data:`ACCOUNTANTS`):

* ``rdp`` (default): Opacus's Rényi-DP accountant. It composes heterogeneous histories (different noise or sample
  rates across runs, evaluation releases) exactly and cheaply, is what :func:`opacus.accountants.utils.
  get_noise_multiplier` defaults to, and is a valid, slightly conservative upper bound.
* ``prv``: Opacus's PRV accountant (numerical composition of privacy-loss random variables, Gopi et al. 2021). It
  returns the *upper* end of its error interval (``eps_error`` :data:`PRV_EPS_ERROR`), so it is a guarantee too,
  and it is tighter: on a demo-sized ledger (sigma 1.95, q 0.5, 30 steps, derived for RDP epsilon 8) it gives 7.35.

So a site can switch accountants without converting its ledger: the file's ``mechanism`` field names the form of
the history (Opacus's RDP-accountant triples, ``"rdp"``), which every accountant here reads, and ledgers written
before the choice existed stay valid.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import math
import os
import secrets
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as privacy_analysis

from models.atomic import atomic_write_text

log = logging.getLogger(__name__)

#: File name of the saved accountant inside a site's state directory.
ACCOUNTANT_FILE = "privacy-accountant.json"
#: Lock file beside it (never deleted: removing a lock file while someone waits on it breaks the lock).
LOCK_FILE = "privacy-accountant.lock"
#: Form of the saved history (see module docstring): Opacus's ``(noise_multiplier, sample_rate, steps)`` triples.
MECHANISM = "rdp"
#: Accountants epsilon can be read with (run-config key ``dp-accountant``; must equal
#: :data:`common.runconfig.ACCOUNTANTS`).
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
#: Width of the PRV accountant's error interval on epsilon (Opacus's default); its upper end is reported.
PRV_EPS_ERROR = 0.01
_FORMAT = "fedfusion-privacy-accountant/2"
#: Earlier format, read as a ledger without reservations (older code refuses the new format: it would ignore them).
_FORMAT_V1 = "fedfusion-privacy-accountant/1"

HistoryEntry = tuple[float, float, int]


def epsilon_of(history: list[HistoryEntry], delta: float, accountant: str = "rdp") -> float:
    """Epsilon a *fresh* Opacus accountant (``rdp`` or ``prv``, see the module docstring) computes for ``history`` at
    ``delta`` (0 for an empty history).

    Raises:
        ValueError: an unknown accountant.
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown privacy accountant {accountant!r}; choose one of {', '.join(ACCOUNTANTS)} "
                         "(run config dp-accountant)")
    return _epsilon(tuple((float(s), float(q), int(n)) for s, q, n in history), float(delta), accountant)


@functools.lru_cache(maxsize=64)
def _epsilon(history: tuple[HistoryEntry, ...], delta: float, accountant: str) -> float:
    # A round asks for the same (history, delta) several times (budget check, reply metrics, the ledger's
    # informational copy), and the answer depends on nothing else. RDP: what Opacus's RDPAccountant.get_epsilon
    # computes, step by step and in the same order (the same floating-point sums, so the same epsilon), with each
    # entry's RDP curve remembered (~90 ms per entry, and the history grows by one or two entries a round). PRV:
    # Opacus's accountant as is (~400 ms a call).
    if not history:
        return 0.0
    with warnings.catch_warnings():
        # a Gaussian release (sample rate 1) takes a log(0) branch inside Opacus's PRV, and a large epsilon puts
        # RDP's best order at the edge of Opacus's grid (PRV sizes its domain with RDP): the values are still bounds
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        if accountant == "prv":
            acc = PRVAccountant()
            acc.history = list(history)
            return float(acc.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))
        rdp = sum([_rdp_curve(entry) for entry in history])
        eps, _ = privacy_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(eps)


@functools.lru_cache(maxsize=256)
def _rdp_curve(entry: HistoryEntry) -> Any:
    """RDP of one history entry at Opacus's default orders (a numpy array)."""
    sigma, q, steps = entry
    return privacy_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=RDPAccountant.DEFAULT_ALPHAS)


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
        history: Opacus RDP history of committed rounds, ``[(noise_multiplier, sample_rate, steps), ...]``.
        rounds: training rounds committed so far (informational; Gaussian releases such as evaluations are in the
            history but not counted here).
        reserved: rounds reserved and not yet committed or released, by reservation id: ``{"entry": [sigma, q,
            steps], "delta": ..., "training": ..., "pid": ..., "time": ...}``. They count as spent (see the module
            docstring).
    """

    path: Path
    delta: float | None = None
    history: list[HistoryEntry] = field(default_factory=list)
    rounds: int = 0
    reserved: dict[str, dict[str, Any]] = field(default_factory=dict)

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
            if data.get("format") not in (_FORMAT, _FORMAT_V1) or data.get("mechanism") != MECHANISM:
                raise ValueError(f"unexpected format {data.get('format')!r} / mechanism {data.get('mechanism')!r}")
            history = [(float(s), float(q), int(n)) for s, q, n in data["history"]]
            delta = None if data.get("delta") is None else float(data["delta"])
            reserved = {str(k): {**v, "entry": _entry(v["entry"]), "delta": float(v["delta"])}
                        for k, v in dict(data.get("reserved", {})).items()}
            return cls(path=path, delta=delta, history=history, rounds=int(data.get("rounds", 0)), reserved=reserved)
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
            "reserved": {k: {**v, "entry": list(v["entry"])} for k, v in self.reserved.items()},
            # informational copy for operators reading the file; the history is the state
            "epsilon": self.epsilon(self.delta) if self.delta else 0.0,
        }
        atomic_write_text(self.path, json.dumps(data, indent=1))

    # -- accounting ----------------------------------------------------------------------------------
    def spent_history(self, *, without: str | None = None) -> list[HistoryEntry]:
        """Committed rounds plus every reservation (but ``without``): what the site must count as spent."""
        out = list(self.history)
        for rid, res in self.reserved.items():
            if rid != without:
                out = _merge(out, res["entry"])
        return out

    def epsilon(self, delta: float, accountant: str = "rdp") -> float:
        """Epsilon spent so far (committed and reserved rounds), at ``delta``, read with ``accountant``."""
        return epsilon_of(self.spent_history(), delta, accountant)

    def prospective_epsilon(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                            accountant: str = "rdp") -> float:
        """Epsilon the site *would* have spent after one more round of ``steps`` steps (the ledger is unchanged)."""
        return epsilon_of(_merge(self.spent_history(), _checked(noise_multiplier, sample_rate, steps)), delta,
                          accountant)

    def record(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float, *,
               training: bool = True) -> None:
        """Charge one round of ``steps`` DP-SGD steps (``training=False``: one release of another mechanism, e.g. a
        Gaussian release as ``(z, 1.0, 1)``) and save the ledger (hold :func:`locked_ledger`)."""
        if steps <= 0:
            return
        self.delta = float(delta)
        self.history = _merge(self.history, _checked(noise_multiplier, sample_rate, steps))
        self.rounds += 1 if training else 0
        self.save()

    def reserve(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float, *,
                training: bool = True) -> str:
        """Save a reservation of one round (``training=False``: one release, see :meth:`record`); it counts as spent
        from now on. Returns its id (hold the lock)."""
        rid = secrets.token_hex(8)
        self.reserved[rid] = {"entry": _checked(noise_multiplier, sample_rate, steps), "delta": float(delta),
                              "training": bool(training), "pid": os.getpid(), "time": time.time()}
        self.save()
        return rid

    def commit(self, rid: str) -> None:
        """Turn reservation ``rid`` into a recorded round and save (hold the lock).

        Raises:
            KeyError: no such reservation (it was committed or released already).
        """
        res = self.reserved.pop(rid)
        self.delta = res["delta"]
        self.history = _merge(self.history, res["entry"])
        self.rounds += 1 if res.get("training", True) else 0
        self.save()

    def release(self, rid: str) -> None:
        """Drop reservation ``rid`` without charging it (only when no update of that round left the site)."""
        if self.reserved.pop(rid, None) is not None:
            self.save()


@contextmanager
def locked_ledger(state_dir: str | os.PathLike[str]) -> Iterator[PersistentAccountant]:
    """The ledger of ``state_dir``, loaded under an exclusive lock held until the block ends.

    Every read-modify-write of the ledger goes through here, so concurrent rounds (two runs on one SuperNode, two
    ClientApp processes) serialise their checks and writes. ``flock`` is released by the kernel when the process
    dies, so a crash never leaves the lock held.
    """
    directory = Path(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield PersistentAccountant.load(directory)
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def _entry(raw: Any) -> HistoryEntry:
    sigma, q, steps = raw
    return float(sigma), float(q), int(steps)


def _checked(noise_multiplier: float, sample_rate: float, steps: int) -> HistoryEntry:
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise multiplier must be positive to account for it, got {noise_multiplier}")
    return float(noise_multiplier), float(sample_rate), int(steps)
