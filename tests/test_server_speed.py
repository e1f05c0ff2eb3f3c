"""The server's share of issue 15: sites asked to prepare before round 1, sites without validation patients not
asked to evaluate every round, and the cheaper held-out evaluation of the rounds before the last."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from common import replies
from server.prepare import PREPARE, prepare_sites
from server.settings import ServerSettings
from server.strategy import build_strategy
from tests.server_stubs import FakeGrid, LocalGrid, eval_metrics, reply, write_heldout

MODS = ("t1", "t2")


def test_every_connected_site_is_asked_to_prepare_once() -> None:
    seen: list[tuple[int, str]] = []

    def site(node: int, msg: Message) -> Message:
        seen.append((node, msg.metadata.message_type))
        if node == 3:
            return Message(Error(code=replies.REFUSED_POLICY, reason="fedfusion refused-policy: no"), reply_to=msg)
        return Message(RecordDict({"metrics": MetricRecord({"ready": 1.0, "can-evaluate": float(node == 1)})}),
                       reply_to=msg)

    out = prepare_sites(LocalGrid([1, 2, 3], site), min_available_nodes=3, timeout=30)
    assert sorted(seen) == [(1, PREPARE), (2, PREPARE), (3, PREPARE)]
    assert (out.sites, out.ready, out.failed, out.silent) == (3, 2, 1, 0)
    assert out.cannot_evaluate == {2}  # node 3 failed: it is asked as usual


def _refusal(node: int, text: str = "the site has too few patients to hold any out", **numbers: float) -> Message:
    """An evaluation refusal as ``node`` sends it (a reply to an evaluate instruction addressed to it)."""
    instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.EVALUATE)
    reason = replies.make_reason(replies.REFUSED_EVALUATION, text, **(numbers or {"min_patients": 10}))
    return Message(Error(code=replies.REFUSED_EVALUATION, reason=reason), reply_to=instruction)


def test_sites_without_validation_patients_are_not_asked_again() -> None:
    settings = ServerSettings.from_run_config({"min-evaluate-nodes": 1, "min-available-nodes": 1,
                                               "fraction-evaluate": 1.0})
    chain = build_strategy(settings, MODS)
    grid = FakeGrid([1, 2, 3])
    arrays = ArrayRecord({"w": torch.zeros(2)})
    assert {m.metadata.dst_node_id for m in chain.configure_evaluate(1, arrays, ConfigRecord(), grid)} == {1, 2, 3}
    answer = reply(3, None, eval_metrics(12, 0.5), MessageType.EVALUATE)
    chain.aggregate_evaluate(1, [_refusal(1), _refusal(2), answer])
    assert {m.metadata.dst_node_id for m in chain.configure_evaluate(2, arrays, ConfigRecord(), grid)} == {3}
    # the exclusion survives a resume (strategy state in last.pt)
    again = build_strategy(settings, MODS)
    again.set_state(chain.get_state())
    assert again.without_validation == {1, 2}
    # when no site could answer, no evaluate message goes out at all
    chain.aggregate_evaluate(2, [_refusal(3)])
    assert list(chain.configure_evaluate(3, arrays, ConfigRecord(), grid)) == []


def test_other_evaluation_refusals_keep_the_site_asked() -> None:
    settings = ServerSettings.from_run_config({"min-evaluate-nodes": 1, "min-available-nodes": 1})
    chain = build_strategy(settings, MODS)
    chain.aggregate_evaluate(1, [_refusal(1, "this model was already evaluated", round=1)])
    assert chain.without_validation == set()
    chain.aggregate_evaluate(1, [_refusal(1)])
    assert chain.without_validation == {1}


def test_rounds_before_the_last_evaluate_fewer_subsets(tmp_path: Path) -> None:
    from common.runconfig import default_model_config
    from models.network import build_model
    from server.evaluation import GlobalEvaluator

    cfg = default_model_config(modalities=("t1", "t1ce", "t2"), spatial_size=(8, 16, 16), channels=(4, 8))
    heldout = write_heldout(tmp_path / "data" / "heldout", cfg.modalities, n_cases=2)
    state = build_model(cfg).state_dict()
    evaluator = GlobalEvaluator(cfg, heldout, device="cpu", hd95="none")
    full = evaluator.evaluate(state)
    cheap = evaluator.evaluate(state, subsets="full+singles")
    assert full is not None and cheap is not None
    subsets = lambda flat: {k.split("/", 1)[0] for k in flat if "/" in k}  # noqa: E731
    assert subsets(cheap.flat) == {"t1+t1ce+t2", "t1", "t1ce", "t2", "all"}
    assert {"mean", "worst", "t1+t2"} <= subsets(full.flat) and "monotonicity-violations" in full.flat
    assert cheap.flat["all/dice-whole"] == pytest.approx(full.flat["all/dice-whole"])
    # the held-out set's preprocessed cases are kept beside it, once per data set
    assert any((tmp_path / "data" / ".fedfusion-cache" / "heldout" / "preprocessed").glob("*.npz"))


def _serve_rounds(tmp_path: Path, site: Any, rounds: int = 2) -> Path:
    from flwr.app import Context

    from server.server_app import run_server
    from tests.test_server_resume import SITES, TINY, run_config

    heldout = write_heldout(tmp_path / "heldout", TINY.modalities)
    run_dir = tmp_path / "run"
    config = {**run_config(run_dir, heldout), "num-server-rounds": rounds, "eval-every": 1}
    run_server(LocalGrid(sorted(SITES), site),
               Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    return run_dir


def test_the_server_evaluates_a_round_while_the_sites_train_the_next(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time

    from models.checkpoint import load_checkpoint
    from models.runlog import iter_metrics
    from server.evaluation import GlobalEvaluator
    from tests.test_server_resume import stub_site

    round_2_sent = threading.Event()
    evaluated_before_round_3: list[bool] = []

    def site(node: int, msg: Message) -> Message:
        if msg.metadata.message_type.startswith("train"):
            rnd = int(msg.content["config"]["server-round"])
            if rnd == 2:
                round_2_sent.set()
            if rnd == 3:  # at most one evaluation in flight: round 1's is written before round 3 is sent
                evaluated_before_round_3.append(any(
                    r["round"] == 1 and r["phase"] == "server-eval" for r in iter_metrics(tmp_path / "run" /
                                                                                          "metrics.jsonl")))
        return stub_site(node, msg)

    waited: list[bool] = []
    original = GlobalEvaluator.evaluate

    def evaluate(self: GlobalEvaluator, *args: Any, **kwargs: Any) -> Any:
        if not waited:  # round 1's (a run from fresh weights does not evaluate round 0)
            # evaluated inline, round 2 cannot start before this returns: it would wait the whole 30 s (the tiny
            # model's round takes well under 1 s) and record False
            waited.append(round_2_sent.wait(timeout=30.0))
            time.sleep(1.0)  # longer than the stub's round 2 (3 x 0.15 s): round 3 must still wait for it
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GlobalEvaluator, "evaluate", evaluate)
    run_dir = _serve_rounds(tmp_path, site, rounds=3)
    assert waited == [True]
    assert evaluated_before_round_3 and all(evaluated_before_round_3)
    # and when the run returns, every round's evaluation and checkpoint is on disk, last.pt naming the last
    records = list(iter_metrics(run_dir / "metrics.jsonl"))
    assert sorted(r["round"] for r in records
                  if r["phase"] == "server-eval" and r["metric"] == "all/dice-whole") == [1, 2, 3]
    _, _, extra = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert extra["round"] == 3
    assert extra["strategy_state"]["optimizer"]["class"] == "FedAdam"
    assert (run_dir / "checkpoints" / "best.pt").exists()


def test_an_evaluation_that_fails_beside_the_next_round_still_fails_the_run(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from server.evaluation import GlobalEvaluator
    from tests.test_server_resume import stub_site

    def evaluate(self: GlobalEvaluator, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the held-out set vanished")

    monkeypatch.setattr(GlobalEvaluator, "evaluate", evaluate)
    with pytest.raises(RuntimeError, match="held-out set vanished"):
        _serve_rounds(tmp_path, stub_site)
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()  # no round is recorded as complete
