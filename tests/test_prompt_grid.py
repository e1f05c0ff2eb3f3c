"""server.grid.PromptGrid: replies are noticed within a small share of the time waited (Flower's deployed grid
sleeps 3 s between pulls), a timeout returns what arrived, and a long phase costs few pulls."""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import pytest

from server.grid import CAP_S, FLOOR_S, SIMULATION_POLL_S, PromptGrid, poll_interval, prompt


class ClockGrid:
    """A grid on a fake clock: the reply to message i arrives at ``ready[i]`` seconds."""

    def __init__(self, ready: list[float]) -> None:
        self.now = 0.0
        self.ready = ready
        self.pulls = 0
        self.taken: set[str] = set()

    def push_messages(self, messages: Iterable[Any]) -> list[str]:
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids: Iterable[str]) -> list[Any]:
        self.pulls += 1
        out = []
        for mid in list(ids):
            if mid not in self.taken and self.ready[int(mid[1:])] <= self.now:
                self.taken.add(mid)
                out.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid)))
        return out

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds

    def get_node_ids(self) -> list[int]:
        return [1, 2]


def wrap(grid: ClockGrid) -> PromptGrid:
    return PromptGrid(grid, clock=lambda: grid.now, sleep=grid.sleep)  # type: ignore[arg-type]


def test_the_last_reply_is_noticed_promptly_where_flower_waits_up_to_3_s() -> None:
    grid = ClockGrid([2.0, 4.0])
    replies = wrap(grid).send_and_receive(["a", "b"])
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    # noticed within 5 % of the 4 s waited (Flower's deployed grid: up to 3 s late, 75 %)
    assert 4.0 <= grid.now <= 4.0 * 1.05 + FLOOR_S


def test_timeout_returns_what_arrived() -> None:
    grid = ClockGrid([1.0, 100.0])
    replies = wrap(grid).send_and_receive(["a", "b"], timeout=10.0)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert grid.now == pytest.approx(10.0)  # stops at the timeout, not a poll interval past it


def test_a_long_phase_costs_few_pulls_and_other_calls_pass_through() -> None:
    grid = ClockGrid([600.0])
    wrap(grid).send_and_receive(["a"])
    # 10 minutes: ~ log(growth) pulls while the interval grows, then one per CAP_S second
    assert grid.pulls < 600 / CAP_S + 120
    assert wrap(grid).get_node_ids() == [1, 2]
    assert poll_interval(0.0) == FLOOR_S and poll_interval(1e6) == CAP_S


def test_only_grids_without_a_short_interval_of_their_own_are_wrapped() -> None:
    """Simulation's InMemoryGrid keeps its own fixed interval, shortened to SIMULATION_POLL_S (measured in
    bench/round_overhead.py); the deployed grid (no pull_interval, 3 s sleeps) is wrapped."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    deployed = ClockGrid([1.0])
    assert isinstance(prompt(deployed), PromptGrid)  # type: ignore[arg-type]
    simulated = InMemoryGrid.__new__(InMemoryGrid)
    simulated.pull_interval = 0.1
    assert prompt(simulated) is simulated and simulated.pull_interval == SIMULATION_POLL_S
