"""The round-0 global model from a checkpoint (``init-checkpoint``, ``simulate --init``) and the server's moving
average of the global weights (``server-ema``), on the real ServerApp with stub sites."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict

from common import packing
from common.runconfig import RunConfigError, model_entries
from models.checkpoint import load_checkpoint, save_checkpoint
from models.network import build_model
from server.initial import PROVENANCE_FILE, sha256_of
from tests.server_stubs import LocalGrid, eval_metrics, site_metrics, write_heldout
from tests.test_server_resume import SITES, TINY

STEP = 0.25  # every stub site moves every float array by this much


class RecordingSites:
    """Stub sites that remember the arrays of every train message and return them moved by :data:`STEP`."""

    def __init__(self) -> None:
        self.received: dict[int, list[dict[str, torch.Tensor]]] = {}

    def __call__(self, node_id: int, msg: Message) -> Message:
        if msg.metadata.message_type.startswith("query"):  # prepare-sites before round 1 (server/prepare.py)
            return Message(content=RecordDict({"metrics": MetricRecord({"ready": 1.0, "can-evaluate": 1.0})}),
                           reply_to=msg)
        rnd = int(msg.content["config"]["server-round"])
        if msg.metadata.message_type.startswith("evaluate"):
            return Message(content=RecordDict({"metrics": MetricRecord(eval_metrics(3, 0.1))}), reply_to=msg)
        record = msg.content["arrays"]
        if packing.is_packed(record):  # the server sends the model as one vector (common/packing.py)
            layout = packing.model_layout(TINY)
            assert layout is not None
            state = {k: torch.from_numpy(v.copy()) for k, v in packing.unpack(record, layout).items()}
        else:
            state = record.to_torch_state_dict()
        self.received.setdefault(rnd, []).append(state)
        moved = {k: v + STEP if v.is_floating_point() else v for k, v in state.items()}
        metrics = site_metrics(sum(SITES[node_id].values()), SITES[node_id])
        return Message(content=RecordDict({"arrays": ArrayRecord(moved), "metrics": MetricRecord(metrics)}),
                       reply_to=msg)


def _serve(tmp_path: Path, **overrides: object) -> RecordingSites:
    from server.server_app import run_server

    heldout = write_heldout(tmp_path / "heldout", TINY.modalities)
    config = {**model_entries(TINY), "num-server-rounds": 2, "strategy": "fedavg", "aggregation": "plain",
              "min-train-nodes": 3, "min-evaluate-nodes": 3, "min-available-nodes": 3, "eval-every": 1,
              "run-dir": str(tmp_path / "run"), "test-dir": str(heldout), "round-timeout": 60, "device": "cpu",
              **overrides}
    sites = RecordingSites()
    run_server(LocalGrid(sorted(SITES), sites), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                                         run_config=config))
    return sites


def _pretrained(path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)  # other weights than the run's seed would give
    state = {k: v + 0.5 for k, v in build_model(TINY).state_dict().items()}
    save_checkpoint(path, state, TINY, provenance={"kind": "test", "data": "public"})
    return state


def test_init_checkpoint_is_the_round_0_global_model_and_its_provenance_is_recorded(tmp_path: Path) -> None:
    ckpt = tmp_path / "pretrained.pt"
    pretrained = _pretrained(ckpt)
    sites = _serve(tmp_path, **{"init-checkpoint": str(ckpt), "num-server-rounds": 1})
    assert len(sites.received[1]) == len(SITES)
    for state in sites.received[1]:  # every site's first round starts from the checkpoint's weights exactly
        assert state.keys() == pretrained.keys()
        assert all(torch.equal(state[k], pretrained[k]) for k in pretrained)
    record = json.loads((tmp_path / "run" / PROVENANCE_FILE).read_text())
    assert record["sha256"] == sha256_of(ckpt) and record["provenance"] == {"kind": "test", "data": "public"}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["init-checkpoint"] == str(ckpt)
    # round 0 is evaluated (the report shows what the federation added to the checkpoint); last.pt is round 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["round"] for r in rows if r.get("phase") == "server-eval"} == {0, 1}
    _, _, extra = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert int(extra["round"]) == 1


def test_a_run_from_the_seed_does_not_evaluate_round_0(tmp_path: Path) -> None:
    _serve(tmp_path, **{"num-server-rounds": 1})
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["round"] for r in rows if r.get("phase") == "server-eval"} == {1}


def test_init_checkpoint_of_another_network_is_refused_naming_the_difference(tmp_path: Path) -> None:
    ckpt = tmp_path / "wide.pt"
    other = TINY.replace(channels=(8, 16))
    save_checkpoint(ckpt, build_model(other).state_dict(), other)
    with pytest.raises(RunConfigError, match=r"init-checkpoint.*channels: checkpoint \[8, 16\], run \[4, 8\]"):
        _serve(tmp_path, **{"init-checkpoint": str(ckpt)})
    with pytest.raises(RunConfigError, match="init-checkpoint.*does not exist"):
        _serve(tmp_path, **{"init-checkpoint": str(tmp_path / "missing.pt")})


def test_server_ema_is_evaluated_and_saved_while_sites_train_from_the_raw_model(tmp_path: Path) -> None:
    ckpt = tmp_path / "pretrained.pt"
    start = _pretrained(ckpt)
    sites = _serve(tmp_path, **{"init-checkpoint": str(ckpt), "server-ema": 0.5})
    name = next(k for k, v in start.items() if v.is_floating_point())
    # the sites train from the raw aggregate (start + STEP after round 1) ...
    assert torch.allclose(sites.received[2][0][name], start[name] + STEP)
    raw, _, extra = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert torch.allclose(raw[name], start[name] + 2 * STEP)
    # ... the average after 2 rounds is 0.25 * start + 0.25 * (start + STEP) + 0.5 * (start + 2 STEP)
    expected = start[name].double() + 1.25 * STEP
    assert np.allclose(extra["ema"][name].numpy(), expected.numpy())
    best, _, best_extra = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    # round 0 (the checkpoint itself) is a candidate too: the stub data may tie every round
    averages = {0: start[name], 1: start[name] + 0.5 * STEP, 2: start[name] + 1.25 * STEP}
    assert torch.allclose(best[name], averages[int(best_extra["round"])])


class PreparingUntilRound0IsScored(RecordingSites):
    """Stub sites whose prepare step waits until the server has logged round 0's held-out evaluation, as a slow
    site's start-up would: the server must evaluate round 0 while it waits for the sites, not after."""

    def __init__(self, metrics: Path) -> None:
        super().__init__()
        self.metrics, self.seen_round_0 = metrics, []

    def __call__(self, node_id: int, msg: Message) -> Message:
        if msg.metadata.message_type.startswith("query"):
            import time

            deadline = time.monotonic() + 60.0  # the tiny model's round 0 takes well under 1 s
            while time.monotonic() < deadline and not self._round_0_logged():
                time.sleep(0.05)
            self.seen_round_0.append(self._round_0_logged())
        return super().__call__(node_id, msg)

    def _round_0_logged(self) -> bool:
        if not self.metrics.exists():
            return False
        rows = [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]
        return any(r["round"] == 0 and r["phase"] == "server-eval" for r in rows)


def test_round_0_is_evaluated_while_the_sites_prepare(tmp_path: Path) -> None:
    from server.server_app import run_server

    ckpt = tmp_path / "pretrained.pt"
    _pretrained(ckpt)
    heldout = write_heldout(tmp_path / "heldout", TINY.modalities)
    run_dir = tmp_path / "run"
    config = {**model_entries(TINY), "num-server-rounds": 1, "min-train-nodes": 3, "min-evaluate-nodes": 3,
              "min-available-nodes": 3, "run-dir": str(run_dir), "test-dir": str(heldout), "device": "cpu",
              "init-checkpoint": str(ckpt)}
    sites = PreparingUntilRound0IsScored(run_dir / "metrics.jsonl")
    run_server(LocalGrid(sorted(SITES), sites), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                                        run_config=config))
    assert sites.seen_round_0 and all(sites.seen_round_0)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    round_0 = [r for r in rows if r["round"] == 0 and r["phase"] == "server-eval"]
    assert len({r["metric"] for r in round_0}) == len(round_0)  # logged once, not again by Strategy.start
    assert {r["round"] for r in rows if r["phase"] == "server-eval"} == {0, 1}
