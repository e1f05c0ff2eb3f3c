"""A Grid whose ``send_and_receive`` notices replies promptly.

Flower's grids push the messages and then poll for the replies at a fixed interval: 3 s for the deployed
SuperLink's grid (``flwr.superlink.grid.http_grid``), 0.1 s in simulation (``InMemoryGrid.pull_interval``). A
round has two such phases (train, evaluate), so a deployed round waited up to 6 s after its last reply had arrived,
whatever the sites' compute. :class:`PromptGrid` polls at an interval that grows with the time already waited (a
fixed share of it, between a floor and a cap): a reply is noticed within that share of the phase's duration, and a
long phase costs few pulls. Every other call goes to the wrapped grid unchanged.

:func:`prompt` wraps only grids without their own short interval. Simulation's ``InMemoryGrid`` keeps its fixed
interval, shortened from Flower's 0.1 s to :data:`SIMULATION_POLL_S`: once the sites' handlers and the server's
aggregation had lost their own overhead (flat optimizer state, arrays decoded once), the poll was most of what
was left between the last reply and the aggregation (``bench/round_overhead.py --rounds 6``, 4 sites on 2 cores,
three alternating pairs of runs: later rounds' median wall / ideal 1.08, 1.07, 1.07 at 0.02 s against 1.09,
1.11, 1.08 at 0.1 s). Earlier, with 0.3 s more overhead per round, a 0.02 s floor had made rounds slower (1.24
and 1.27 against 1.19 and 1.19): the driver's pulls then competed with longer site handlers for the cores.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

__all__ = ["PromptGrid", "SIMULATION_POLL_S", "poll_interval", "prompt"]

#: The poll interval's floor and cap (s), and the share of the time waited so far it follows in between.
FLOOR_S, CAP_S, SHARE = 0.1, 1.0, 0.05
#: Simulation's in-memory grid: its fixed poll interval (s; Flower's default 0.1)
SIMULATION_POLL_S = 0.02


def poll_interval(waited: float) -> float:
    """Seconds to sleep before the next pull after ``waited`` seconds of waiting for the replies."""
    return min(CAP_S, max(FLOOR_S, SHARE * waited))


class PromptGrid:
    """Wraps a Flower :class:`~flwr.serverapp.Grid`; ``send_and_receive`` pulls at :func:`poll_interval`.

    Args:
        grid: the grid Flower gave the ServerApp.
        clock / sleep: injectable for tests (default ``time.monotonic`` / ``time.sleep``).
    """

    def __init__(self, grid: Grid, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._grid = grid
        self._clock = clock
        self._sleep = sleep

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push ``messages`` and return the replies that arrive within ``timeout`` seconds (``None``: wait for all),
        as Flower's grids do."""
        pending = set(self._grid.push_messages(messages))
        start = self._clock()
        replies: list[Message] = []
        while pending:
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            waited = self._clock() - start
            if not pending or (timeout is not None and waited >= timeout):
                break
            pause = poll_interval(waited)
            if timeout is not None:
                pause = min(pause, max(0.0, timeout - waited))
            self._sleep(pause)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def prompt(grid: Grid) -> Grid:
    """``grid`` wrapped in :class:`PromptGrid` unless it polls at a short interval of its own (simulation's
    ``InMemoryGrid``, whose interval is set to :data:`SIMULATION_POLL_S`): in practice the deployed SuperLink's
    grid, which sleeps 3 s between pulls."""
    if hasattr(grid, "pull_interval"):
        grid.pull_interval = min(float(grid.pull_interval), SIMULATION_POLL_S)
        return grid
    return PromptGrid(grid)  # type: ignore[return-value]
