"""A site trains on the run's learning-rate schedule (global step = steps of earlier rounds), and logit-adjusts its
classification loss by its own class shares only when it trains without DP (the prior is a function of every
training label, outside DP-SGD's per-patient clipping)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import models.training
from client.client_app import train
from client.runtime import _RUNTIMES, clear_cache
from models.schedule import LRSchedule
from tests.client_helpers import context, initial_state, make_phantoms, message, run_config


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return make_phantoms(tmp_path_factory.mktemp("phantoms"), sites=1, cases=6, scenario="iid")


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    clear_cache()


def _capture(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    original = models.training.train_epoch

    def spy(*args: Any, **kwargs: Any) -> dict[str, float]:
        out = original(*args, **kwargs)
        calls.append({"schedule": kwargs.get("schedule"), "start": kwargs.get("start_step"), "steps": out["steps"],
                      "lr": out["lr"]})
        return out

    monkeypatch.setattr(models.training, "train_epoch", spy)
    return calls


@pytest.mark.parametrize("dp", [False, True])
def test_site_rounds_continue_the_run_schedule(phantoms: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               dp: bool) -> None:
    calls = _capture(monkeypatch)
    rc = run_config(**{"dp-enabled": dp, "local-epochs": 2, "num-server-rounds": 3, "lr-schedule": "cosine",
                       "lr-warmup": 0.0, "lr": 0.01})
    node = {"data-dir": str(phantoms / "site-01"), "state-dir": str(tmp_path / "state"), "allow-no-dp": True}
    for rnd in (1, 3):
        reply = train(message("train", initial_state(), rnd), context(node, rc))
        assert not reply.has_error(), reply.error
        clear_cache()  # a deployed site's next message is a new process
    first, second, third, fourth = calls  # two epochs in round 1, two in round 3
    per_round = first["steps"] + second["steps"]
    assert per_round > 0 and second["start"] == first["steps"]
    assert third["start"] == 2 * per_round and fourth["start"] == 2 * per_round + third["steps"]
    schedule: LRSchedule = fourth["schedule"]
    assert schedule.total_steps == 3 * per_round
    # the last step of the run ends near the schedule's floor, far below the peak of round 1
    assert fourth["lr"] == pytest.approx(schedule.lr(3 * per_round - 1)) and fourth["lr"] < 0.2 * 0.01
    assert first["lr"] > 0.5 * 0.01


@pytest.mark.parametrize("dp", [False, True])
def test_class_prior_only_without_dp(phantoms: Path, tmp_path: Path, dp: bool) -> None:
    node = {"data-dir": str(phantoms / "site-01"), "state-dir": str(tmp_path / "state"), "allow-no-dp": True}
    reply = train(message("train", initial_state(), 1), context(node, run_config(**{"dp-enabled": dp})))
    assert not reply.has_error(), reply.error
    (rt,) = _RUNTIMES.values()
    if dp:
        assert rt.loss_fn.class_prior is None
    else:
        prior = rt.loss_fn.class_prior
        assert prior is not None and sum(prior) == pytest.approx(1.0)
