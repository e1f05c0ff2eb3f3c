"""Where a simulated round's time went (simulations/round_phases.py): Flower's log marks, the sites' train-seconds
and the phase timings (common/timings.py) put together per round, and the timings themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common import timings
from simulations.round_phases import read_round_splits, render_splits, startup_seconds, work_split

LOG = (
    "2026-01-01 10:00:00,000 INFO Initial global evaluation results: None\n"
    "2026-01-01 10:00:01,000 INFO [ROUND 1/2]\n"
    "2026-01-01 10:00:01,100 INFO configure_train: Sampled 2 nodes (out of 2)\n"
    "2026-01-01 10:00:07,000 INFO configure_evaluate: Sampled 2 nodes (out of 2)\n"
    "2026-01-01 10:00:08,000 INFO Global evaluation\n"
    "2026-01-01 10:00:11,000 INFO [ROUND 2/2]\n"
    "2026-01-01 10:00:13,500 INFO configure_evaluate: Sampled 2 nodes (out of 2)\n"
    "2026-01-01 10:00:13,750 INFO Global evaluation\n"
    "2026-01-01 10:00:14,250 INFO Strategy execution finished in 13.25s\n"
)


def _epoch(clock: str) -> float:
    import datetime as dt

    return dt.datetime.strptime(f"2026-01-01 {clock}", "%Y-%m-%d %H:%M:%S").timestamp()


def test_rounds_split_into_phases_with_site_and_server_work(tmp_path: Path) -> None:
    (tmp_path / "flower.log").write_text(LOG)
    recs = [
        {"round": 1, "phase": "train", "scope": "site-1", "metric": "train-seconds", "value": 4.0},
        {"round": 1, "phase": "train", "scope": "site-2", "metric": "train-seconds", "value": 5.0},
        {"round": 1, "phase": "train", "scope": "global", "metric": "train-seconds", "value": 4.5},
        {"round": 2, "phase": "train", "scope": "site-1", "metric": "train-seconds", "value": 2.0},
        {"round": 2, "phase": "train", "scope": "site-2", "metric": "train-seconds", "value": 2.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    t1 = _epoch("10:00:01")
    timing_lines = [
        {"who": "driver", "phase": "ray-start", "start": _epoch("09:59:50"), "wall": 3.0},
        {"who": "server", "phase": "prepare", "start": _epoch("09:59:55"), "wall": 5.0},
        {"who": "site-1", "phase": "runtime", "start": t1 + 0.2, "wall": 0.5},  # no round: attributed by time
        {"who": "p0", "phase": "train-message", "round": 1, "start": t1 + 0.1, "wall": 5.5, "compute": 4.0},
        {"who": "p1", "phase": "train-message", "round": 1, "start": t1 + 0.1, "wall": 5.2, "compute": 5.0},
        {"who": "p0", "phase": "evaluate-message", "round": 1, "start": t1 + 6.1, "wall": 0.4},
        {"who": "server", "phase": "server-eval", "round": 1, "start": t1 + 7.0, "wall": 2.5},
        {"who": "server", "phase": "checkpoint", "round": 1, "start": t1 + 9.5, "wall": 0.1},
        # more of round 1's evaluation, half of it beside round 2's train phase (t1 + 10 to t1 + 12.5)
        {"who": "server", "phase": "server-eval", "round": 1, "start": t1 + 12.0, "wall": 1.0, "cpu": 1.6},
    ]
    (tmp_path / "timings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in timing_lines) + '{"torn')
    splits = read_round_splits(tmp_path, tmp_path / "timings.jsonl")
    assert [s.round for s in splits] == [1, 2]
    one, two = splits
    assert (one.wall, one.train_phase, one.site_eval_phase, one.server_phase) == pytest.approx((10.0, 6.0, 1.0, 3.0))
    assert (two.wall, two.train_phase, two.site_eval_phase, two.server_phase) == pytest.approx((3.25, 2.5, 0.25, 0.5))
    assert one.train_seconds == [4.0, 5.0] and one.ideal(2) == pytest.approx(4.5) and one.ratio(2) == pytest.approx(10 / 4.5)
    assert one.site["runtime"] == pytest.approx(0.5) and one.site["train-compute"] == pytest.approx(9.0)
    assert one.site["train-other"] == pytest.approx(10.7 - 9.0 - 0.5)
    assert one.site["evaluate-message"] == pytest.approx(0.4)
    assert (one.server_eval, one.checkpoint) == pytest.approx((3.5, 0.1))
    assert two.site == {} and two.server_eval == 0.0
    # the CPU it took from round 2's training (half its 1.6 s) comes off round 2's ideal, not round 1's
    assert (one.eval_cpu_beside, two.eval_cpu_beside) == pytest.approx((0.0, 0.8))
    assert two.ideal(2) == pytest.approx(2.0) and two.ideal_undisturbed(2) == pytest.approx((4.0 - 0.8) / 2)
    assert startup_seconds(splits, tmp_path / "timings.jsonl") == pytest.approx((11.0, 5.0))
    table = render_splits(splits, 2)
    assert len(table) == 4 and table[2].startswith("| 1 | 10.0 | 4.5 | 2.22 |")
    split = work_split(splits, 2, tmp_path / "timings.jsonl")
    assert "11 s before round 1" in split and "beside the next round's training for 1 CPU s" in split


def test_timings_are_off_without_the_variable_and_appended_with_it(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "t.jsonl"
    monkeypatch.delenv(timings.ENV, raising=False)
    with timings.phase("site-01", "train") as fields:
        fields["round"] = 1
    assert not path.exists() and not timings.enabled()
    monkeypatch.setenv(timings.ENV, str(path))
    with timings.phase("site-01", "train", round=2) as fields:
        fields["built"] = True
    started = timings.clock()
    timings.done(started, "server", "checkpoint")
    recs = timings.read(path)
    assert [(r["who"], r["phase"]) for r in recs] == [("site-01", "train"), ("server", "checkpoint")]
    assert recs[0]["round"] == 2 and recs[0]["built"] is True and recs[0]["wall"] >= 0 and "cpu" in recs[0]
    assert timings.read(tmp_path / "missing.jsonl") == []
