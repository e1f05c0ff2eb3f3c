"""The run directory's metrics log: JSON lines of ``{round, phase, scope, metric, value}``.

``scope`` is ``"global"`` (:data:`GLOBAL_SCOPE`) for the server's view, else a site: the ServerApp names a site by
what the SuperLink knows of its node (its registered name, else ``node-<node id>``; :mod:`server.scopes`), never
by anything the site sends. ``phase`` is e.g. ``train``, ``validation``, ``site-eval``, ``server-eval``. Every
writer (centralized training, the ServerApp, simulations) uses this one class, and readers tell site scopes with
:func:`is_site_scope`, so they see one format.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text


_WRITE_LOCK = threading.Lock()

#: The scope of the server's own (aggregated, global-model) records.
GLOBAL_SCOPE = "global"


def is_site_scope(scope: object) -> bool:
    """Whether a log record's ``scope`` names one site (anything but :data:`GLOBAL_SCOPE`)."""
    return bool(scope) and str(scope) != GLOBAL_SCOPE


class MetricsLog:
    """Append-only JSON-lines metrics log, flushed and fsynced per batch so a crash loses no round."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, round: int, phase: str, scope: str, metrics: Mapping[str, float | int]) -> None:
        """Append one line per metric. Non-finite values are written as ``null`` (valid JSON)."""
        lines = []
        for metric, value in metrics.items():
            v: float | None = float(value)
            if not math.isfinite(v):
                v = None
            lines.append(
                json.dumps({"round": int(round), "phase": phase, "scope": str(scope), "metric": metric, "value": v})
            )
        if not lines:
            return
        # the server writes from its evaluation thread while the strategy logs the next round's site metrics:
        # one batch must not interleave with another (a buffered append of a long batch is several writes)
        with _WRITE_LOCK, open(self.path, "a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def drop_rounds_after(self, last_round: int) -> None:
        """Remove entries of rounds ``> last_round`` (used on resume so no round is logged twice)."""
        if not self.path.exists():
            return
        kept = [r for r in self.read() if r["round"] <= last_round]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def read(self) -> list[dict[str, Any]]:
        return list(iter_metrics(self.path))


def iter_metrics(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Yield the records of a metrics log, skipping a torn last line left by a crash."""
    p = Path(path)
    if not p.exists():
        return
    with open(p, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue
