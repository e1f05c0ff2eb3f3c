"""Model arrays travel as one packed vector (common/packing.py): the server packs the global model, a site unpacks it
as its run config's network and replies packed, the server unpacks replies before validating them; mismatches are
refusals, not silently misplaced values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from client import runtime
from client.client_app import train
from common import packing, replies
from common.runconfig import model_entries
from server.settings import ServerSettings
from server.strategy import build_strategy
from tests.client_helpers import TINY, context, initial_state, make_phantoms, message, run_config
from tests.server_stubs import FakeGrid, reply, site_metrics


def _state() -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in initial_state().items()}


def test_pack_and_unpack_round_trip_and_refuse_mismatches() -> None:
    state = _state()
    record = packing.pack(state)
    assert packing.is_packed(record) and len(list(record.keys())) == 1
    layout = packing.model_layout(TINY)
    assert layout is not None and layout.size == sum(v.size for v in state.values())
    back = packing.unpack(record, layout)
    assert list(back) == list(state) and all(np.array_equal(back[k], state[k]) for k in state)

    short = ArrayRecord({layout.key: Array(np.zeros(layout.size - 1, dtype=np.float32))})
    with pytest.raises(ValueError, match="wrong shape"):
        packing.unpack(short, layout)
    other = ArrayRecord({packing.PACKED_PREFIX + "0" * 16: Array(np.zeros(layout.size, dtype=np.float32))})
    with pytest.raises(ValueError, match="another model layout"):
        packing.unpack(other, layout)
    mixed = packing.pack({"w": np.zeros(2, np.float32), "n": np.zeros((), np.int64)})
    assert not packing.is_packed(mixed) and sorted(mixed.keys()) == ["n", "w"]


def test_the_server_sends_one_vector_and_reads_packed_replies_by_name() -> None:
    settings = ServerSettings.from_run_config({"min-train-nodes": 2, "min-available-nodes": 2,
                                               **model_entries(TINY)})
    chain = build_strategy(settings, TINY.modalities)
    glob = _state()
    arrays = ArrayRecord({k: Array(v) for k, v in glob.items()})
    sent = list(chain.configure_train(1, arrays, ConfigRecord(), FakeGrid([1, 2])))
    assert sent and all(packing.is_packed(m.content["arrays"]) for m in sent)

    def packed_reply(node: int, update: dict[str, np.ndarray]) -> Message:
        msg = reply(node, None, site_metrics(10, {m: 10 for m in TINY.modalities}))
        msg.content["arrays"] = packing.pack(update)
        return msg

    moved = {k: v + 0.01 for k, v in glob.items()}
    wrong = {**moved, next(iter(moved)): np.zeros(3, np.float32)}
    new, metrics = chain.aggregate_train(1, [packed_reply(1, moved), packed_reply(2, moved), packed_reply(3, wrong)])
    assert new is not None and metrics is not None and metrics["sites-rejected"] == 1
    assert "wrong shape" in chain.rejections[1][3]
    assert np.allclose(new[next(iter(glob))].numpy(), moved[next(iter(glob))])


def test_a_site_unpacks_the_model_and_replies_packed(tmp_path: Path) -> None:
    data = make_phantoms(tmp_path / "data", sites=1, cases=3, scenario="iid", fmt="nifti")
    runtime.clear_cache()
    node = {"data-dir": str(data / "site-01"), "state-dir": str(tmp_path / "state")}
    state = initial_state()
    msg = message("train", state)
    msg.content["arrays"] = packing.pack(state)
    out = train(msg, context(node, run_config()))
    assert not out.has_error(), out.error
    assert packing.is_packed(out.content["arrays"])
    new = packing.unpack(out.content["arrays"], packing.model_layout(TINY))
    assert any(not np.array_equal(new[k], state[k].numpy()) for k in state)

    # a vector that does not fit the run's network is a bad request, not a crash
    bad = message("train", state, server_round=2)
    bad.content["arrays"] = ArrayRecord({packing.model_layout(TINY).key: Array(np.zeros(5, np.float32))})
    refused = train(bad, context(node, run_config()))
    assert refused.has_error() and refused.error.code == replies.BAD_REQUEST
    runtime.clear_cache()
