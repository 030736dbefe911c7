"""Cartography, cost model, reward search and the DIMEC routers on hand-made numbers."""

import numpy as np
import pytest

from dimec.config import CostConfig
from dimec.costs import CostModel
from dimec.errors import ConfigError, NotFittedError
from dimec.outputs import ExitOutputs
from dimec.routing import make_router
from dimec.routing.base import Decisions, load_router, save_router
from dimec.routing.dimec import DimecDynamicRouter, DimecFixedRouter
from dimec.routing.pools import (
    EASY,
    HARD,
    MEDIUM,
    assign_pools,
    expected_reward,
    nearest_centroid,
    search_thresholds,
)
from dimec.training.cartography import Cartography


def test_variability_is_variance_not_std():
    probs = np.array([[[0.2, 0.5, 0.9]], [[0.4, 0.5, 0.7]], [[0.9, 0.5, 0.8]]])  # (E=3, N=1, 3)
    correct = probs > 0.5
    carto = Cartography.from_dynamics(probs, correct)
    mobile = np.array([0.2, 0.4, 0.9])
    expected_var = ((mobile - mobile.mean()) ** 2).mean()  # population variance, as the paper defines
    assert carto.confidence[0, 0] == pytest.approx(mobile.mean())
    assert carto.variability[0, 0] == pytest.approx(expected_var)
    assert carto.variability[0, 1] == 0.0
    std = Cartography.from_dynamics(probs, correct, variability="std")
    assert std.variability[0, 0] == pytest.approx(np.sqrt(expected_var))
    assert carto.correctness[0, 0] == pytest.approx(1 / 3)
    with pytest.raises(ConfigError):
        Cartography.from_dynamics(probs, correct, variability="mad")


def test_cost_model_defaults_follow_the_paper():
    cm = CostModel.from_config(CostConfig(), (2, 3, 6))
    lam = 0.1 / 6  # full_model_reward / l
    assert cm.lambda_m == pytest.approx(1.5 * lam) and cm.lambda_e == pytest.approx(lam)
    assert cm.o_e == pytest.approx(2.5 * lam) and cm.o_c == pytest.approx(3 * lam)
    assert cm.cloud_fee == pytest.approx(6 * lam)
    np.testing.assert_allclose(cm.tier_costs, [3 * lam, (2.5 + 3) * lam, (3 + 6) * lam])
    assert cm.relative_change(cm.cloud_only / 2) == pytest.approx(-50.0)
    assert CostModel.from_dict(cm.to_dict()) == cm
    with pytest.raises(ConfigError):
        CostModel.from_config(CostConfig(offload_cloud=-1), (2, 3, 6))


def test_pool_rules():
    conf = np.array([0.9, 0.9, 0.3, 0.3])
    var = np.array([0.001, 0.2, 0.2, 0.001])
    np.testing.assert_array_equal(assign_pools(conf, var, 0.5, 0.01, "text"), [EASY, MEDIUM, HARD, HARD])
    np.testing.assert_array_equal(assign_pools(conf, var, 0.5, 0.01, "algorithm1"), [EASY, EASY, MEDIUM, HARD])
    with pytest.raises(ConfigError):
        assign_pools(conf, var, 0.5, 0.01, "other")


def test_reward_search_picks_the_right_thresholds():
    # Unit tier costs 0 / 0.1 / 0.2. Samples 0-1 are confident and stable at the mobile exit, 2-3 confident
    # but unstable (mobile exit unsure, edge sure), 4-5 unconfident (only the cloud is sure).
    cm = CostModel(lambda_m=0.0, lambda_e=0.0, o_e=0.1, o_c=0.2, cloud_fee=0.0, exit_layers=(1, 2, 3))
    conf = np.array([0.95, 0.9, 0.8, 0.75, 0.3, 0.2])
    var = np.array([0.001, 0.002, 0.05, 0.06, 0.01, 0.02])
    max_probs = np.array([[0.99, 0.99, 0.99], [0.98, 0.99, 0.99], [0.55, 0.95, 0.99],
                          [0.5, 0.95, 0.99], [0.5, 0.6, 0.99], [0.5, 0.55, 0.99]])
    search = search_thresholds(conf, var, max_probs, cm, alpha_grid=(0.1, 0.5, 0.85), beta_grid=(0.0, 0.01, 0.1))
    assert (search.alpha, search.beta) == (0.5, 0.01)
    pools = assign_pools(conf, var, search.alpha, search.beta)
    np.testing.assert_array_equal(pools, [EASY, EASY, MEDIUM, MEDIUM, HARD, HARD])
    by_hand = np.mean([0.99, 0.98, 0.95 - 0.1, 0.95 - 0.1, 0.99 - 0.2, 0.99 - 0.2])
    assert search.reward == pytest.approx(by_hand)
    assert expected_reward(pools, max_probs, cm) == pytest.approx(by_hand)
    assert search.grid.shape == (3, 3) and search.grid.max() == pytest.approx(by_hand)


def _fitted(router_cls, pools_embeddings, conf, var):
    probs = np.tile(np.array([[[0.9, 0.1]]]), (len(conf), 3, 1))
    val = ExitOutputs.from_probs(probs, np.zeros(len(conf), dtype=int), pools_embeddings)
    carto = Cartography(confidence=np.stack([conf] * 3, 1), variability=np.stack([var] * 3, 1),
                        correctness=np.ones((len(conf), 3)))
    cm = CostModel(0.0, 0.0, 0.1, 0.2, 0.0, (1, 2, 3))
    return router_cls(alpha_grid=(0.5,), beta_grid=(0.01,)).fit(val, cm, carto), cm


def test_fixed_router_nearest_centroid_and_round_trip(tmp_path):
    emb = np.array([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0], [0.0, 10.0], [1.0, 10.0]])
    conf = np.array([0.9, 0.9, 0.9, 0.9, 0.1, 0.1])
    var = np.array([0.0, 0.0, 0.5, 0.5, 0.0, 0.0])
    router, cm = _fitted(DimecFixedRouter, emb, conf, var)
    np.testing.assert_allclose(router.centroids_, [[0, 0.5], [10, 0.5], [0.5, 10]])
    tiers = router.predict_tiers(np.array([[1.0, 1.0], [9.0, 0.0], [0.0, 8.0]]))
    np.testing.assert_array_equal(tiers, [EASY, MEDIUM, HARD])
    save_router(router, tmp_path / "router.json", cm)
    loaded, raw = load_router(tmp_path / "router.json")
    assert isinstance(loaded, DimecFixedRouter) and CostModel.from_dict(raw["cost_model"]) == cm
    np.testing.assert_allclose(loaded.centroids_, router.centroids_)
    assert (loaded.alpha_, loaded.beta_) == (router.alpha_, router.beta_)
    d = router.route(ExitOutputs.from_probs(np.full((3, 3, 2), 0.5), np.zeros(3, int), np.array([[1.0, 1], [9, 0], [0, 8]])), cm)
    np.testing.assert_allclose(d.cost, cm.tier_costs[[0, 1, 2]])


def test_dynamic_router_updates_means_as_algorithm_2():
    emb = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 0.0], [10.0, 2.0], [0.0, 10.0], [0.0, 12.0]])
    conf = np.array([0.9, 0.9, 0.9, 0.9, 0.1, 0.1])
    var = np.array([0.0, 0.0, 0.5, 0.5, 0.0, 0.0])
    router, _ = _fitted(DimecDynamicRouter, emb, conf, var)
    stream = np.array([[4.0, 0.0], [4.0, 0.0]])
    tiers = router.predict_tiers(stream)
    # easy mean (1, 0) with n=2 -> (2*(1,0) + (4,0)) / 3 = (2, 0); the next sample is still nearest to it
    np.testing.assert_array_equal(tiers, [EASY, EASY])
    np.testing.assert_allclose(router.centroids_[EASY], [1.0, 0.0])  # batch routing leaves the fit untouched
    assert router.update(stream[0]) == EASY
    np.testing.assert_allclose(router.centroids_[EASY], [2.0, 0.0])
    assert router.counts_[EASY] == 3


def test_dynamic_differs_from_fixed_when_means_drift():
    emb = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 100.0]])
    conf, var = np.array([0.9, 0.9, 0.1]), np.array([0.0, 0.5, 0.0])
    fixed, _ = _fitted(DimecFixedRouter, emb, conf, var)
    dynamic, _ = _fitted(DimecDynamicRouter, emb, conf, var)
    stream = np.array([[6.0, 0.0], [4.5, 0.0], [4.5, 0.0]])
    np.testing.assert_array_equal(fixed.predict_tiers(stream), [MEDIUM, EASY, EASY])
    np.testing.assert_array_equal(dynamic.predict_tiers(stream), [MEDIUM, MEDIUM, MEDIUM])  # edge mean moved to 8


def test_empty_pool_does_not_crash_routing(tmp_path):
    emb = np.array([[0.0, 0.0], [1.0, 0.0], [9.0, 9.0]])
    conf, var = np.array([0.9, 0.9, 0.9]), np.array([0.0, 0.0, 0.0])  # all easy: medium and hard empty
    for cls in (DimecFixedRouter, DimecDynamicRouter):
        router, cm = _fitted(cls, emb, conf, var)
        assert router.counts_.tolist() == [3, 0, 0]
        np.testing.assert_array_equal(router.predict_tiers(np.array([[50.0, 50.0], [0.0, 1.0]])), [EASY, EASY])
    save_router(router, tmp_path / "r.json", cm)
    loaded, _ = load_router(tmp_path / "r.json")
    assert isinstance(loaded, DimecDynamicRouter)
    assert loaded.predict_tiers(np.array([[5.0, 5.0]])).tolist() == [EASY]


def test_nearest_centroid_ignores_nan():
    centroids = np.array([[np.nan, np.nan], [5.0, 5.0], [0.0, 0.0]])
    assert nearest_centroid(np.array([[0.1, 0.0]]), centroids).tolist() == [2]


def test_router_before_fit_and_registry():
    with pytest.raises(NotFittedError, match="before fit"):
        DimecFixedRouter().predict_tiers(np.zeros((1, 2)))
    with pytest.raises(ConfigError, match="unknown router"):
        make_router("no-such-router")
    assert isinstance(make_router("dimec-dynamic"), DimecDynamicRouter)


def test_decisions_from_tiers():
    cm = CostModel(1.0, 1.0, 1.0, 1.0, 1.0, (1, 2, 3))
    d = Decisions.from_tiers(np.array([0, 2, 1]), cm)
    np.testing.assert_allclose(d.cost, cm.tier_costs[[0, 2, 1]])
    np.testing.assert_array_equal(d.exit_index, d.tier)


def test_a_damaged_cost_profile_is_one_clear_error(tmp_path):
    for text in ("{not json", '{"lambda_m_ms": 1}', '["a list"]', '{"lambda_m_ms": 1, "lambda_e_ms": 0, '
                 '"o_e_ms": 1, "o_c_ms": 1, "cloud_layer_ms": 1}', "\udcff"):
        path = tmp_path / "profile.json"
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
        with pytest.raises(ConfigError, match="cost profile"):
            CostModel.from_profile(path, (2, 3, 6))
