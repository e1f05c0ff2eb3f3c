"""Opt-in timing of the phases of a federated run (site start-up, training, evaluation, server work), for benches.

A process that has the environment variable :data:`ENV` set to a file path appends one JSON line per timed phase
to that file; without it every call here is a no-op (one dictionary lookup). The benches
(``bench/round_overhead.py``, ``bench/scale.py``, ``bench/site_latency.py``) set it before the run starts, so the
Ray workers and the Flower processes of the run inherit it, and then split each round's wall time into phases
with :func:`read`. Lines are appended with one ``write`` on an ``O_APPEND`` descriptor, so several processes can
share the file. A record::

    {"who": "site-01", "phase": "train", "start": 1760000000.12, "wall": 3.41, "cpu": 3.38, "pid": 1234,
     "round": 2}

``who`` is a site's folder name, ``server`` or ``driver``; ``wall`` and ``cpu`` are seconds (``cpu``: this
process's CPU time over the phase, all threads); extra keys (``round``, ``built``) are whatever the caller
passed. Timings name no patient, case or path.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["ENV", "Clock", "clock", "done", "enabled", "phase", "read", "record"]

#: Environment variable naming the JSON-lines file timings go to (unset: timing is off).
ENV = "FEDFUSION_TIMINGS"


def enabled() -> bool:
    """Whether this process records timings."""
    return bool(os.environ.get(ENV))


def record(who: str, name: str, start: float, wall: float, cpu: float | None = None, **extra: Any) -> None:
    """Append one timing (``start``: epoch seconds; ``wall``/``cpu``: seconds) when timing is on."""
    path = os.environ.get(ENV)
    if not path:
        return
    entry: dict[str, Any] = {"who": who, "phase": name, "start": round(start, 4), "wall": round(wall, 4),
                             "pid": os.getpid()}
    if cpu is not None:
        entry["cpu"] = round(cpu, 4)
    entry.update(extra)
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError:
        pass  # a timing that cannot be written must never fail the work it measures


Clock = tuple[float, float, float]


def clock() -> Clock:
    """The start of a phase for :func:`done` (epoch seconds, a monotonic reading, this process's CPU time)."""
    return time.time(), time.perf_counter(), time.process_time()


def done(started: Clock, who: str, name: str, **extra: Any) -> None:
    """Record the phase that began at ``started`` (:func:`clock`) and ends now (for code where a ``with`` block
    would re-indent a whole body; a phase left by an exception is simply not recorded)."""
    if os.environ.get(ENV):
        record(who, name, started[0], time.perf_counter() - started[1], time.process_time() - started[2], **extra)


@contextmanager
def phase(who: str, name: str, **extra: Any) -> Iterator[dict[str, Any]]:
    """Time the ``with`` block as phase ``name`` of ``who``. The yielded dict may receive more keys (e.g.
    ``built=True``) before the block ends; they go into the record."""
    fields: dict[str, Any] = dict(extra)
    if not os.environ.get(ENV):
        yield fields
        return
    started = clock()
    try:
        yield fields
    finally:
        done(started, who, name, **fields)


def read(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of a timings file, in file order (a torn last line is skipped; a missing file is empty)."""
    p = Path(path)
    if not p.is_file():
        return []
    out: list[dict[str, Any]] = []
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "phase" in rec and "wall" in rec:
            out.append(rec)
    return out
