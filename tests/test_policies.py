"""Our policies on hand-made exit outputs: cascades, hybrids, auto and the three ways of stating a target."""

from dataclasses import replace

import numpy as np
import pytest

from dimec.config import CalibrationConfig, CostConfig
from dimec.costs import CostModel
from dimec.errors import ConfigError
from dimec.outputs import ExitOutputs
from dimec.routing import ROUTERS, make_router
from dimec.routing.base import TrainingSignal, load_router, save_router
from dimec.routing.targets import Target, betting_p_value, binomial_p_value, pareto_order
from dimec.tiers import CLOUD, EDGE, MOBILE
from dimec.training.cartography import Cartography

CM = CostModel.from_config(CostConfig(), (2, 3, 6))


def synthetic(n=4000, seed=0, mobile_acc=(0.99, 0.6), edge_acc=(0.97, 0.7), cloud_acc=0.9):
    """Binary outputs where confidence is honest: the mobile exit is right with probability mobile_acc[0]
    when confident (max-prob ~0.95), mobile_acc[1] when not (~0.6); likewise the edge."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    easy = rng.random(n) < 0.6  # 60% of samples: the mobile exit is confident
    probs = np.zeros((n, 3, 2))
    for k, (sure, unsure) in enumerate((mobile_acc, edge_acc)):
        conf = np.where(easy, rng.uniform(0.9, 1.0, n), rng.uniform(0.5, 0.7, n))
        right = rng.random(n) < np.where(easy, sure, unsure)
        pred = np.where(right, labels, 1 - labels)
        probs[np.arange(n), k, pred] = conf
        probs[np.arange(n), k, 1 - pred] = 1 - conf
    right = rng.random(n) < cloud_acc
    pred = np.where(right, labels, 1 - labels)
    probs[np.arange(n), 2, pred], probs[np.arange(n), 2, 1 - pred] = 0.9, 0.1
    emb = rng.normal(size=(n, 4)) + easy[:, None]  # the pre-routers get a weak signal
    return ExitOutputs.from_probs(probs, labels, emb, lengths=rng.integers(5, 40, n)), easy


def test_the_cascade_meets_a_point_target_and_stops_at_confident_exits():
    val, _ = synthetic()
    test, _ = synthetic(seed=1)
    router = ROUTERS["cascade"].from_config(CalibrationConfig(control="point", max_loss=0.5)).fit(val, CM)
    d = router.route(test, CM)
    cloud = test.correct[:, CLOUD].mean()
    acc = (test.predictions[np.arange(len(test)), d.exit_index] == test.labels).mean()
    assert 100 * (cloud - acc) < 1.5  # near the target on fresh data
    assert d.cost.mean() < 0.7 * CM.cloud_only  # the confident 60% stay on the mobile
    assert router.selection_.scores.loss_pt[router.selection_.index] <= 0.5


def test_a_point_estimate_says_when_validation_is_too_small_for_the_target():
    small, _ = synthetic(n=300)  # a loss estimate on 300 samples has a standard error of about 1 pt
    router = ROUTERS["cascade"].from_config(CalibrationConfig(control="point", max_loss=0.5)).fit(small, CM)
    assert "WARNING" in router.selection_.how and "--delta" in router.selection_.how
    large, _ = synthetic(n=4000)
    router = ROUTERS["cascade"].from_config(CalibrationConfig(control="point", max_loss=2.0)).fit(large, CM)
    assert "WARNING" not in router.selection_.how


def test_auto_keeps_the_cheapest_policy_that_meets_the_target_and_says_why(tmp_path):
    val, easy = synthetic()
    carto = Cartography(np.stack([np.where(easy, 0.95, 0.3)] * 3, 1), np.zeros((len(val), 3)),
                        np.stack([easy.astype(float)] * 3, 1))
    cal = CalibrationConfig(control="point", max_loss=0.5, threshold_grid=8)
    auto = ROUTERS["auto"].from_config(cal).fit(val, CM, carto)
    families = {r["family"]: r for r in auto.summary_}
    assert families[auto.winner_]["chosen"] and families["cloud-only"]["meets_target"]
    best = min((r for r in auto.summary_ if r.get("meets_target")), key=lambda r: r["val_cost"])
    assert best["family"] == auto.winner_
    assert "skipped" in families["hybrid-learned"]  # no training signal given
    save_router(auto, tmp_path / "router.json", CM)
    loaded, raw = load_router(tmp_path / "router.json")
    np.testing.assert_array_equal(loaded.route(val, CM).cost, auto.route(val, CM).cost)
    assert raw["state"]["winner"] == auto.winner_


def test_budget_mode_is_the_most_accurate_within_the_budget():
    val, _ = synthetic()
    for cut in (20.0, 50.0):
        router = ROUTERS["cascade"].from_config(CalibrationConfig(control="point", max_loss=None, budget_cut=cut)).fit(val, CM)
        cost = router.route(val, CM).cost.mean()
        assert cost <= CM.cloud_only * (1 - cut / 100) + 1e-12
    with pytest.raises(ConfigError, match="mobile-only"):
        ROUTERS["cascade"].from_config(CalibrationConfig(control="point", max_loss=None, budget=0.001)).fit(val, CM)


def test_a_guarantee_is_more_conservative_than_the_point_estimate():
    val, _ = synthetic(n=6000)
    point = ROUTERS["cascade"].from_config(CalibrationConfig(control="point", max_loss=1.0)).fit(val, CM)
    sure = ROUTERS["cascade"].from_config(CalibrationConfig(control="point", max_loss=1.0, delta=0.1)).fit(val, CM)
    assert sure.route(val, CM).cost.mean() >= point.route(val, CM).cost.mean() - 1e-12
    tested = sure.selection_.guarantee["tested"]
    assert tested and all(t["p_value"] <= 0.1 for t in tested[:-1])


def test_p_values_are_valid_and_the_betting_test_uses_fixes():
    rng = np.random.default_rng(0)
    eps = 0.01
    # under the null (loss exactly eps) small p-values are rare: at most delta of the time
    for test in ("binomial", "betting"):
        ps = []
        for s in range(200):
            losses = (rng.random(800) < eps).astype(np.int8)
            ps.append(binomial_p_value(losses > 0, eps) if test == "binomial" else betting_p_value(losses, eps, s))
        assert np.mean(np.array(ps) <= 0.1) <= 0.1 + 0.05, test
    # a policy that adds 1% errors but fixes 2% has loss -1%: the betting test certifies it, binomial cannot
    losses = np.zeros(3000, dtype=np.int8)
    losses[:30], losses[30:90] = 1, -1
    assert betting_p_value(losses, eps) < 0.1 < binomial_p_value(losses > 0, eps)


def test_pareto_order_is_safest_first():
    loss, cost = np.array([0.5, 0.1, 0.3, 0.1]), np.array([1.0, 3.0, 2.0, 2.5])
    np.testing.assert_array_equal(pareto_order(loss, cost), [3, 2, 0])


def test_learned_hybrid_sends_predicted_hard_samples_straight_to_the_cloud():
    val, easy = synthetic()
    train_out, train_easy = synthetic(seed=3)
    correctness = np.stack([train_easy.astype(float), np.ones(len(train_out)), np.ones(len(train_out))], 1)
    train = TrainingSignal(train_out.embeddings, train_out.lengths,
                           Cartography(correctness, np.zeros_like(correctness), correctness))
    router = ROUTERS["hybrid-learned"].from_config(CalibrationConfig(control="point", max_loss=0.5, threshold_grid=8)).fit(
        val, CM, None, train)
    plans = router.choose_plans(val.embeddings, val.lengths)
    assert set(np.unique(plans)) <= {0, 1, 2}
    if (plans == 2).any():  # straight to the cloud: raw offload, no mobile layers, no hop
        d = router.route(val, CM)
        np.testing.assert_allclose(d.cost[plans == 2], CM.tier_costs[CLOUD])
    p = router.prerouter_.probabilities(val.embeddings, val.lengths)
    assert p[easy, MOBILE].mean() > p[~easy, MOBILE].mean()  # it learnt the (weak) signal


def test_bad_targets_are_one_clear_error_each():
    for kwargs, message in (({"max_loss": -1.0}, "max-loss"), ({"max_loss": 100.0}, "max-loss"),
                            ({"delta": 0.0}, "delta"), ({"delta": 1.0}, "delta"),
                            ({"max_loss": None}, "no target"), ({"budget": 0.1, "budget_cut": 10.0}, "not both"),
                            ({"budget": 0.1, "delta": 0.1}, "--delta goes with"), ({"loss": "f1"}, "unknown loss")):
        with pytest.raises(ConfigError, match=message):
            Target(**{"max_loss": 0.5, **kwargs}).check()
    with pytest.raises(ConfigError, match="unknown router"):
        make_router("nope")


def test_constant_tiers_are_servable_plans():
    router = make_router("edge-only")
    assert router.plans_[0][0].tier == EDGE and router.describe() == "edge@n"
    val, _ = synthetic(n=50)
    np.testing.assert_allclose(router.route(val, CM).cost, CM.tier_costs[EDGE])
    assert replace(CalibrationConfig(), policy="auto").policy == "auto"
