"""Modality-aware aggregation with hand-made updates: ownership groups, eligibility and weights."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, Krum

from server.aggregation import ModalityAwareStrategy, modality_weight, ownership_groups, weighted_metrics
from server.settings import ServerSettings, UnsupportedConfiguration
from server.strategy import build_strategy
from tests.server_stubs import FakeGrid, reply, site_metrics

NAMES = ("encoders.t1.w", "encoders.ct.w", "encoders.us.w", "fusion.levels.0.embeddings.ct.weight", "decoder.w")
MODS = ("t1", "ct", "us")


def _global() -> dict[str, np.ndarray]:
    return {n: np.full((2, 3), 0.5, dtype=np.float32) for n in NAMES}


def _site(value: float, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (value + 0.1 * rng.standard_normal((2, 3))).astype(np.float32) for n in NAMES}


@pytest.fixture()
def round_replies():
    """Site 1: t1 (10 cases) + ct (4); site 2: t1 only (30); site 3: ct only (12). Nobody has us."""
    a, b, c = _site(1.0, 1), _site(5.0, 2), _site(-3.0, 3)
    replies = [
        reply(1, a, site_metrics(10, {"t1": 10, "ct": 4})),
        reply(2, b, site_metrics(30, {"t1": 30})),
        reply(3, c, site_metrics(20, {"ct": 12})),
    ]
    return replies, a, b, c


def _configured(strategy, glob):
    arrays = ArrayRecord({k: Array(v) for k, v in glob.items()})
    list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([1, 2, 3])))
    return strategy


def test_ownership_groups_read_names():
    groups = ownership_groups(NAMES)
    assert groups["t1"] == ["encoders.t1.w"]
    assert groups["ct"] == ["encoders.ct.w", "fusion.levels.0.embeddings.ct.weight"]
    assert groups["shared"] == ["decoder.w"]


def test_modality_weight_needs_has_and_cases():
    assert modality_weight({"cases-ct": 4.0, "has-ct": 1.0}, "ct") == 4.0
    assert modality_weight({"cases-ct": 4.0, "has-ct": 0.0}, "ct") == 0.0
    assert modality_weight({"has-ct": 1.0}, "ct") == 0.0  # no count: cannot weight, so not eligible
    assert modality_weight({}, "ct") == 0.0


def test_fedavg_modality_aware_weights_follow_case_counts(round_replies):
    replies, a, b, c = round_replies
    glob = _global()
    strat = _configured(ModalityAwareStrategy(FedAvg(), MODS), glob)
    arrays, metrics = strat.aggregate_train(1, replies)
    out = {k: v.numpy() for k, v in arrays.items()}
    # encoder t1: only sites 1 and 2 have t1, weighted by cases-t1 (10, 30); site 3 never dilutes it
    np.testing.assert_allclose(out["encoders.t1.w"], (10 * a["encoders.t1.w"] + 30 * b["encoders.t1.w"]) / 40,
                               rtol=1e-6)
    # ct parameters (encoder and the fusion embedding named after ct): sites 1 and 3, weights 4 and 12
    for n in ("encoders.ct.w", "fusion.levels.0.embeddings.ct.weight"):
        np.testing.assert_allclose(out[n], (4 * a[n] + 12 * c[n]) / 16, rtol=1e-6)
    # shared: all sites by num-examples
    np.testing.assert_allclose(
        out["decoder.w"], (10 * a["decoder.w"] + 30 * b["decoder.w"] + 20 * c["decoder.w"]) / 60, rtol=1e-6
    )
    # nobody has us this round: its encoder keeps the global values exactly
    np.testing.assert_array_equal(out["encoders.us.w"], glob["encoders.us.w"])
    assert strat.last_absent == ["us"]
    assert metrics["num-examples"] == 60


def test_site_without_modality_cannot_overwrite_it(round_replies):
    replies, a, b, c = round_replies
    # site 2 (no ct) sends a wildly different ct encoder: it must not matter at all
    poisoned = dict(b)
    poisoned["encoders.ct.w"] = np.full((2, 3), 1e6, dtype=np.float32)
    replies[1] = reply(2, poisoned, site_metrics(30, {"t1": 30}))
    strat = _configured(ModalityAwareStrategy(FedAvg(), MODS), _global())
    arrays, _ = strat.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["encoders.ct.w"].numpy(),
                               (4 * a["encoders.ct.w"] + 12 * c["encoders.ct.w"]) / 16, rtol=1e-6)


def test_robust_aggregators_apply_per_group_over_eligible_sites(round_replies):
    replies, a, b, c = round_replies
    # a fourth site with t1 to make the median meaningful
    d = _site(2.0, 4)
    replies.append(reply(4, d, site_metrics(5, {"t1": 5})))
    strat = _configured(ModalityAwareStrategy(FedMedian(), MODS), _global())
    arrays, _ = strat.aggregate_train(1, replies)
    t1 = np.median(np.stack([a["encoders.t1.w"], b["encoders.t1.w"], d["encoders.t1.w"]]), axis=0)
    np.testing.assert_allclose(arrays["encoders.t1.w"].numpy(), t1, rtol=1e-6)
    ct = np.median(np.stack([a["encoders.ct.w"], c["encoders.ct.w"]]), axis=0)
    np.testing.assert_allclose(arrays["encoders.ct.w"].numpy(), ct, rtol=1e-6)

    strat = _configured(ModalityAwareStrategy(Krum(num_malicious_nodes=0), MODS), _global())
    arrays, _ = strat.aggregate_train(1, replies)
    # Krum picks one eligible site's ct encoder (sites 1 or 3), never site 2's or 4's
    ct_out = arrays["encoders.ct.w"].numpy()
    assert any(np.array_equal(ct_out, s["encoders.ct.w"]) for s in (a, c))


def test_fedadam_steps_on_the_modality_aware_mean(round_replies):
    replies, a, b, c = round_replies
    glob = _global()
    adam = FedAdam(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    strat = _configured(ModalityAwareStrategy(adam, MODS), glob)
    arrays, _ = strat.aggregate_train(1, replies)
    mean_t1 = (10 * a["encoders.t1.w"] + 30 * b["encoders.t1.w"]) / 40
    delta = mean_t1 - glob["encoders.t1.w"]
    m = 0.1 * delta
    v = 0.01 * delta**2
    eta_norm = 0.1 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    expected = glob["encoders.t1.w"] + eta_norm * m / (np.sqrt(v) + 1e-3)
    np.testing.assert_allclose(arrays["encoders.t1.w"].numpy(), expected, rtol=1e-5)
    # no site has us: parameters and optimiser moments untouched
    np.testing.assert_array_equal(arrays["encoders.us.w"].numpy(), glob["encoders.us.w"])
    assert not adam.m_t["encoders.us.w"].any() and not adam.v_t["encoders.us.w"].any()


def test_full_chain_plain_vs_modality_aware(round_replies):
    replies, a, b, c = round_replies
    glob = _global()
    results = {}
    for aggregation in ("modality-aware", "plain"):
        settings = ServerSettings.from_run_config({"aggregation": aggregation, "min-train-nodes": 2, "min-available-nodes": 2})
        chain = build_strategy(settings, MODS)
        arrays = ArrayRecord({k: Array(v) for k, v in glob.items()})
        list(chain.configure_train(1, arrays, ConfigRecord(), FakeGrid([1, 2, 3])))
        agg, _ = chain.aggregate_train(1, [reply(int(r.metadata.src_node_id), {k: v.numpy() for k, v in
                                                  r.content["arrays"].items()}, dict(r.content["metrics"]))
                                            for r in replies])
        results[aggregation] = {k: v.numpy() for k, v in agg.items()}
        assert all(v.dtype == np.float32 for v in results[aggregation].values())
    # plain FedAvg: every parameter over every site by num-examples (site 3's t1 encoder dilutes t1)
    n = "encoders.t1.w"
    np.testing.assert_allclose(results["plain"][n], (10 * a[n] + 30 * b[n] + 20 * c[n]) / 60, rtol=1e-6)
    np.testing.assert_allclose(results["modality-aware"][n], (10 * a[n] + 30 * b[n]) / 40, rtol=1e-6)


def test_weighted_metrics_tolerates_different_keys():
    out = weighted_metrics([{"num-examples": 1, "x": 1.0}, {"num-examples": 3, "x": 5.0, "y": 2.0}])
    assert out == {"num-examples": 4.0, "x": 4.0, "y": 2.0}


def test_unsupported_protection_combinations_are_refused():
    with pytest.raises(UnsupportedConfiguration, match="SecAgg"):
        build_strategy(ServerSettings.from_run_config({"secagg": True}))
    with pytest.raises(UnsupportedConfiguration, match="fedadam"):
        build_strategy(ServerSettings.from_run_config({"client-dp": "server-side", "strategy": "fedadam"}))
    chain = build_strategy(ServerSettings.from_run_config({"client-dp": "server-side", "strategy": "fedavg"}))
    assert "DifferentialPrivacy" in type(chain.strategy).__name__


def test_dp_wrappers_compose_with_modality_aware_aggregation(round_replies):
    replies, a, b, c = round_replies
    glob = _global()

    def run(settings):
        chain = build_strategy(settings, MODS)
        arrays = ArrayRecord({k: Array(v) for k, v in glob.items()})
        list(chain.configure_train(1, arrays, ConfigRecord(), FakeGrid([1, 2, 3])))
        fresh = [reply(int(r.metadata.src_node_id), {k: v.numpy() for k, v in r.content["arrays"].items()},
                       dict(r.content["metrics"])) for r in replies]
        return chain, chain.aggregate_train(1, fresh)[0]

    # server-side clipping with a clip far above the update norms and no noise = modality-aware mean
    _, agg = run(ServerSettings.from_run_config({"client-dp": "server-side", "client-dp-clip": 1e6, "client-dp-noise": 0.0}))
    n = "encoders.t1.w"
    np.testing.assert_allclose(agg[n].numpy(), (10 * a[n] + 30 * b[n]) / 40, rtol=1e-5)
    # with noise: a modality no site has keeps its global values exactly (noise is not added to public values)
    _, agg = run(ServerSettings.from_run_config({"client-dp": "server-side", "client-dp-clip": 1.0, "client-dp-noise": 1.0}))
    np.testing.assert_array_equal(agg["encoders.us.w"].numpy(), glob["encoders.us.w"])
    # client-side: sites that did not clip to client-dp-clip are rejected by validation
    chain, agg = run(ServerSettings.from_run_config({"client-dp": "client-side", "client-dp-clip": 0.01, "client-dp-noise": 0.0}))
    assert agg is None and set(chain.rejections[1]) == {1, 2, 3}
    assert all("clipping norm" in r for r in chain.rejections[1].values())
