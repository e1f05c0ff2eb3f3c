"""Update validation: bad updates are rejected with a reason and the round completes with the others."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message

from common import replies as client_replies
from server.settings import ServerSettings
from server.strategy import build_strategy
from server.validation import UpdateValidator
from tests.server_stubs import FakeGrid, reply, site_metrics

NAMES = ("encoders.t1.w", "encoders.ct.w", "decoder.w", "decoder.num_batches_tracked")
MODS = ("t1", "ct")


def _global() -> dict[str, np.ndarray]:
    out = {n: np.zeros((3, 4), dtype=np.float32) for n in NAMES[:3]}
    out["decoder.num_batches_tracked"] = np.array(7, dtype=np.int64)
    return out


def _update(glob: dict[str, np.ndarray], seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {n: (v + scale * 0.01 * rng.standard_normal(v.shape)).astype(np.float32) for n, v in glob.items()
           if v.dtype == np.float32}
    out["decoder.num_batches_tracked"] = np.array(9, dtype=np.int64)
    return out


def _chain():
    chain = build_strategy(ServerSettings.from_run_config({"min-train-nodes": 2, "min-available-nodes": 2}), MODS)
    return chain


def _start_round(chain, glob, nodes, rnd=1):
    arrays = ArrayRecord({k: Array(v) for k, v in glob.items()})
    return list(chain.configure_train(rnd, arrays, ConfigRecord(), FakeGrid(nodes)))


def test_bad_updates_rejected_round_completes(caplog):
    glob = _global()
    chain = _chain()
    nodes = [1, 2, 3, 4, 5, 6, 7]
    _start_round(chain, glob, nodes)
    good = {n: _update(glob, seed=n) for n in (1, 2, 3)}
    nan = _update(glob, 4)
    nan["decoder.w"][0, 0] = np.nan
    wrong_shape = _update(glob, 5)
    wrong_shape["encoders.t1.w"] = np.zeros((4, 3), dtype=np.float32)
    wrong_key = _update(glob, 6)
    wrong_key["encoders.t2.w"] = wrong_key.pop("encoders.t1.w")
    huge = {k: (glob[k] + 1000 * (v - glob[k])).astype(v.dtype) if v.dtype == np.float32 else v
            for k, v in _update(glob, 7).items()}
    metrics = site_metrics(10, {"t1": 10, "ct": 10})
    replies = [reply(n, good[n], metrics) for n in (1, 2, 3)] + [
        reply(4, nan, metrics), reply(5, wrong_shape, metrics), reply(6, wrong_key, metrics), reply(7, huge, metrics)
    ]
    with caplog.at_level(logging.WARNING, logger="server"):
        arrays, agg_metrics = chain.aggregate_train(1, replies)
    reasons = chain.rejections[1]
    assert set(reasons) == {4, 5, 6, 7}
    assert "non-finite" in reasons[4]
    assert "wrong shape" in reasons[5]
    assert "wrong parameter keys" in reasons[6]
    assert "norm" in reasons[7]
    for node in (4, 5, 6, 7):  # each rejection is logged with the node and the reason
        assert any(f"node {node}:" in r.getMessage() for r in caplog.records)
    # the round completed with the three good sites only (equal weights -> plain mean)
    assert arrays is not None and agg_metrics["sites-accepted"] == 3
    np.testing.assert_allclose(arrays["decoder.w"].numpy(),
                               np.mean([good[n]["decoder.w"] for n in (1, 2, 3)], axis=0), rtol=1e-5)
    assert arrays["decoder.w"].numpy().dtype == np.float32
    assert arrays["decoder.num_batches_tracked"].numpy().dtype == np.int64


def test_arrays_whose_bytes_contradict_their_metadata_are_rejected_not_a_crash():
    """A site controls an Array's declared dtype and shape and its bytes: declared (3, 4) over bytes of shape (12,)
    passed the shape check and broke the norm's arithmetic; dtype strings numpy cannot parse (TypeError, SyntaxError)
    broke the dtype check; a garbled .npy header raised TokenError from numpy's reader. Each raised out of
    aggregate_train (the ServerApp's round) before a check named it."""
    glob = _global()
    chain = _chain()
    _start_round(chain, glob, [1, 2, 3, 4, 5, 6])
    metrics = site_metrics(10, {"t1": 10, "ct": 10})
    replies = [reply(n, _update(glob, n), metrics) for n in (1, 2, 3, 4, 5, 6)]
    flat = Array(np.full(12, 5.0, dtype=np.float32))
    replies[2].content["arrays"]["decoder.w"] = Array(dtype="float32", shape=(3, 4), stype=flat.stype, data=flat.data)
    replies[3].content["arrays"]["decoder.w"] = Array(dtype="no-such-dtype", shape=(3, 4), stype=flat.stype,
                                                      data=flat.data)
    replies[4].content["arrays"]["decoder.w"] = Array(dtype="i8,,", shape=(3, 4), stype=flat.stype, data=flat.data)
    garbled = flat.data.replace(b"'descr': '<f4'", b"'descr': ((((")
    replies[5].content["arrays"]["decoder.w"] = Array(dtype="float32", shape=(3, 4), stype=flat.stype, data=garbled)
    arrays, agg_metrics = chain.aggregate_train(1, replies)
    reasons = chain.rejections[1]
    assert set(reasons) == {3, 4, 5, 6}
    assert "declares float32 of shape (3, 4)" in reasons[3] and "is not a dtype" in reasons[4]
    assert "is not a dtype" in reasons[5] and "not a readable .npy stream" in reasons[6]
    assert arrays is not None and agg_metrics["sites-accepted"] == 2
    np.testing.assert_allclose(arrays["decoder.w"].numpy(),
                               np.mean([_update(glob, n)["decoder.w"] for n in (1, 2)], axis=0), rtol=1e-5)


def test_wrong_dtype_and_missing_weight_rejected():
    glob = _global()
    validator = UpdateValidator()
    as64 = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in _update(glob, 1).items()}
    res = validator.validate(
        [reply(1, as64, site_metrics(5, {})), reply(2, _update(glob, 2), {"train-loss": 1.0})], glob
    )
    reasons = {r.node_id: r.reason for r in res.rejected}
    assert "wrong dtype" in reasons[1]
    assert "num-examples" in reasons[2]


def test_norm_outlier_with_two_replies_uses_previous_rounds():
    glob = _global()
    validator = UpdateValidator(norm_factor=10)
    # round 1: three normal updates set the history
    first = validator.validate([reply(n, _update(glob, n), site_metrics(5, {})) for n in (1, 2, 3)], glob)
    assert not first.rejected
    # round 2: only two replies, one 1000x larger: judged against the previous rounds' median norm
    huge = {k: (1000 * v).astype(v.dtype) if v.dtype == np.float32 else v for k, v in _update(glob, 5).items()}
    res = validator.validate([reply(4, _update(glob, 4), site_metrics(5, {})), reply(5, huge, site_metrics(5, {}))],
                             glob)
    assert [r.node_id for r in res.rejected] == [5]
    assert len(res.accepted) == 1


def test_too_few_accepted_keeps_global_model():
    glob = _global()
    chain = _chain()
    _start_round(chain, glob, [1, 2])
    nan = _update(glob, 2)
    nan["encoders.ct.w"][:] = np.inf
    arrays, metrics = chain.aggregate_train(
        1, [reply(1, _update(glob, 1), site_metrics(5, {"t1": 5})), reply(2, nan, site_metrics(5, {"t1": 5}))]
    )
    assert arrays is None  # min-train-nodes = 2 not met: Flower keeps the current global arrays
    assert metrics["sites-rejected"] == 1


def test_declining_site_is_dropped_from_sampling(caplog):
    glob = _global()
    chain = _chain()
    sent = _start_round(chain, glob, [1, 2, 3])
    assert sorted(int(m.metadata.dst_node_id) for m in sent) == [1, 2, 3]
    reason = client_replies.make_reason(client_replies.DECLINED_BUDGET, "budget spent", epsilon_total=8.0)
    decline = Message(Error(code=client_replies.DECLINED_BUDGET, reason=reason), reply_to=next(m for m in sent if m.metadata.dst_node_id == 3))
    replies = [reply(n, _update(glob, n), site_metrics(5, {"t1": 5})) for n in (1, 2)] + [decline]
    with caplog.at_level(logging.WARNING, logger="server"):
        arrays, metrics = chain.aggregate_train(1, replies)
    assert arrays is not None and metrics["sites-declined"] == 1
    assert chain.declined == {3}
    assert any("node 3" in r.getMessage() and "declined" in r.getMessage() for r in caplog.records)
    sent = _start_round(chain, glob, [1, 2, 3], rnd=2)
    assert sorted(int(m.metadata.dst_node_id) for m in sent) == [1, 2]
    # a metric-style decline is understood too
    chain2 = _chain()
    _start_round(chain2, glob, [1, 2, 3])
    chain2.aggregate_train(1, [reply(n, _update(glob, n), site_metrics(5, {})) for n in (1, 2)]
                           + [reply(3, None, {"num-examples": 0.0, "declined": 1.0})])
    assert chain2.declined == {3}


def test_validator_state_roundtrip():
    v = UpdateValidator()
    v.history = [1.0, 2.0]
    w = UpdateValidator()
    w.load_state_dict(v.state_dict())
    assert w.history == [1.0, 2.0]


NAMED = ("encoders.t1.w", "encoders.ct.w", "fusion.levels.0.qkv.weight", "decoder.blocks.0.w", "decoder.head.w",
         "classifier.fc.weight")


def _named_global() -> dict[str, np.ndarray]:
    return {n: np.full((2, 3), float(i), dtype=np.float32) for i, n in enumerate(NAMED)}


def test_server_accepts_trainable_only_replies_and_keeps_the_rest_unchanged():
    """dp-trainable = shared: the replies carry the trainable set only; the aggregate takes the frozen encoders from
    the global model bit for bit, and a reply with frozen keys or without a trainable key is rejected."""
    glob = _named_global()
    settings = ServerSettings.from_run_config({"min-train-nodes": 2, "min-available-nodes": 2, "dp-trainable": "shared"})
    chain = build_strategy(settings, MODS)
    _start_round(chain, glob, [1, 2, 3, 4])
    trained = ["fusion.levels.0.qkv.weight", "decoder.blocks.0.w", "decoder.head.w", "classifier.fc.weight"]
    assert chain.trained == trained
    good = {n: {k: glob[k] + 0.01 * n for k in trained} for n in (1, 2)}
    with_frozen = {**{k: glob[k] + 0.03 for k in trained}, "encoders.t1.w": glob["encoders.t1.w"] + 0.03}
    missing = {k: glob[k] + 0.04 for k in trained[1:]}
    metrics = site_metrics(10, {"t1": 10, "ct": 10})
    replies = [reply(1, good[1], metrics), reply(2, good[2], metrics), reply(3, with_frozen, metrics),
               reply(4, missing, metrics)]
    arrays, out = chain.aggregate_train(1, replies)
    reasons = chain.rejections[1]
    assert set(reasons) == {3, 4} and out["sites-accepted"] == 2
    assert "unexpected encoders.t1.w" in reasons[3] and "missing fusion.levels.0.qkv.weight" in reasons[4]
    assert arrays is not None and set(arrays.keys()) == set(NAMED)  # the global model is whole again
    for name in ("encoders.t1.w", "encoders.ct.w"):
        assert np.array_equal(arrays[name].numpy(), glob[name])
    np.testing.assert_allclose(arrays["decoder.head.w"].numpy(), glob["decoder.head.w"] + 0.015, rtol=1e-6)


def test_client_side_clipping_needs_whole_replies():
    from server.settings import UnsupportedConfiguration

    settings = ServerSettings.from_run_config({"client-dp": "client-side", "dp-trainable": "head"})
    with pytest.raises(UnsupportedConfiguration, match="fixedclipping_mod"):
        settings.check_protection()
