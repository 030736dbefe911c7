"""Baselines on hand-made exit outputs where the right answer is known."""

import numpy as np
import pytest

from dimec.config import CalibrationConfig, CostConfig
from dimec.costs import CostModel
from dimec.evaluation import evaluate_router
from dimec.experiments import OURS
from dimec.experiments.compare import METHODS, build_router, compare_methods, evaluate_over_seeds
from dimec.outputs import ExitOutputs
from dimec.routing import ROUTERS, make_router
from dimec.routing.baselines import entropy, ucb_choices
from dimec.tiers import CLOUD, EDGE, MOBILE
from dimec.training.cartography import Cartography

CM = CostModel.from_config(CostConfig(), (2, 3, 6))  # lambda = 0.1/6: mobile 0.05, edge 0.0917, cloud 0.15
LAM = 0.1 / 6


def outputs(max_probs, labels=None, preds=None, emb=None) -> ExitOutputs:
    """Binary outputs from (N, 3) max-probabilities and predicted labels per exit."""
    mp = np.asarray(max_probs, dtype=np.float64)
    preds = np.zeros(mp.shape, dtype=int) if preds is None else np.asarray(preds)
    probs = np.stack([np.where(preds == 0, mp, 1 - mp), np.where(preds == 0, 1 - mp, mp)], -1)  # (N, 3, 2)
    labels = np.zeros(len(mp), dtype=int) if labels is None else np.asarray(labels)
    emb = np.zeros((len(mp), 2)) if emb is None else np.asarray(emb, dtype=np.float64)
    return ExitOutputs.from_probs(probs, labels, emb)


def carto_for(conf, var) -> Cartography:
    c, v = np.asarray(conf, dtype=np.float64), np.asarray(var, dtype=np.float64)
    return Cartography(np.stack([c] * 3, 1), np.stack([v] * 3, 1), np.ones((len(c), 3)))


def random_case(n=300, seed=0):
    rng = np.random.default_rng(seed)
    mp = rng.uniform(0.5, 1.0, (n, 3))
    labels = rng.integers(0, 2, n)
    right = rng.random((n, 3)) < np.array([0.6, 0.7, 0.85])
    preds = np.where(right, labels[:, None], 1 - labels[:, None])
    return outputs(mp, labels, preds, rng.normal(size=(n, 4))), carto_for(rng.uniform(0.3, 1, n), rng.uniform(0, 0.05, n))


def test_every_method_is_registered():
    assert set(METHODS) <= set(ROUTERS)


def test_constant_tiers():
    out = outputs(np.full((5, 3), 0.9))
    for name, tier in (("mobile-only", MOBILE), ("edge-only", EDGE), ("cloud-only", CLOUD)):
        d = make_router(name).fit(out, CM).route(out, CM)
        assert (d.tier == tier).all() and (d.exit_index == tier).all()
        np.testing.assert_allclose(d.cost, CM.tier_costs[tier])


def test_random_tier_shares_converge():
    out = outputs(np.full((30_000, 3), 0.9))
    probs = (0.2, 0.3, 0.5)
    d = make_router("random", probs=probs, seed=1).fit(out, CM).route(out, CM)
    np.testing.assert_allclose(np.bincount(d.tier, minlength=3) / len(out), probs, atol=0.01)
    again = make_router("random", probs=probs, seed=1).fit(out, CM).route(out, CM)
    np.testing.assert_array_equal(d.tier, again.tier)  # a seed reproduces the run
    assert (make_router("random", probs=probs, seed=2).fit(out, CM).route(out, CM).tier != d.tier).any()


def test_deebert_exits_at_first_exit_under_the_entropy_threshold():
    out = outputs([[0.99, 0.6, 0.6],    # m is sure -> exit m
                   [0.55, 0.99, 0.6],   # m unsure, n sure -> exit n
                   [0.55, 0.6, 0.99],   # only l sure -> l
                   [0.55, 0.6, 0.6]])   # nobody sure -> l anyway
    threshold = 0.2  # entropy(0.99) = 0.056 nats, entropy(0.6) = 0.673
    assert entropy(np.array([0.99, 0.01])) < threshold < entropy(np.array([0.6, 0.4]))
    d = make_router("deebert", threshold=threshold).fit(out, CM).route(out, CM)
    np.testing.assert_array_equal(d.exit_index, [0, 1, 2, 2])
    assert (d.tier == CLOUD).all()
    o_c, fee = 3 * LAM, 6 * LAM  # the whole model is on the cloud: pay the offload and the layers used
    np.testing.assert_allclose(d.cost, [o_c + fee * 2 / 6, o_c + fee * 3 / 6, o_c + fee, o_c + fee])


def test_deebert_fit_picks_the_best_grid_threshold():
    out, _ = random_case()
    r = make_router("deebert").fit(out, CM)
    assert r.threshold_ in r.grid_ and r.grid_rewards_.max() == r.grid_rewards_[list(r.grid_).index(r.threshold_)]
    d = r.route(out, CM)
    reward = out.correct[np.arange(len(out)), d.exit_index].mean() - d.cost.mean()
    assert reward == pytest.approx(r.grid_rewards_.max())


def test_oracle_is_the_cheapest_at_the_best_accuracy():
    out, carto = random_case(n=400)
    keep = out.correct.any(1)  # every sample has a right exit: the oracle's accuracy is 1
    out, carto = out.subset(keep), Cartography(*(a[keep] for a in (carto.confidence, carto.variability,
                                                                    carto.correctness)))
    rows = compare_methods(out, out, CM, carto, "accuracy", CalibrationConfig(), METHODS, seeds=(0, 1))
    assert [r["method"] for r in rows if "skipped" in r] == ["hybrid-learned"]  # no training dynamics given
    results = {r["method"]: r["mean"] for r in rows if "skipped" not in r}
    oracle, cloud = results["oracle"], results["cloud-only"]
    assert oracle["accuracy"] == 1.0 >= cloud["accuracy"] and oracle["mean_cost"] <= cloud["mean_cost"]
    for name, r in results.items():
        assert r["accuracy"] <= oracle["accuracy"]
        if r["accuracy"] >= oracle["accuracy"]:  # matching the oracle's accuracy costs at least as much
            assert r["mean_cost"] >= oracle["mean_cost"] - 1e-12, name


def test_oracle_sends_hopeless_samples_to_the_cloud():
    out = outputs(np.full((4, 3), 0.9), labels=[0, 0, 0, 1],
                  preds=[[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 0, 0]])
    d = make_router("oracle").route(out, CM)
    np.testing.assert_array_equal(d.tier, [MOBILE, EDGE, CLOUD, CLOUD])


def test_ucb_concentrates_on_the_best_arm():
    rng = np.random.default_rng(0)
    rewards = rng.normal([0.2, 0.5, 0.8], 0.1, size=(3000, 3))  # a stationary stream
    arms = ucb_choices(rewards, 1.0, np.random.default_rng(0))
    assert np.bincount(arms, minlength=3).argmax() == 2 and (arms[-1000:] == 2).mean() > 0.9


def test_adaee_bandit_learns_the_best_threshold():
    rng = np.random.default_rng(0)
    n = 3000
    mp = np.stack([rng.uniform(0.62, 0.78, n), np.full(n, 0.8), np.full(n, 0.99)], 1)
    cm = CostModel(lambda_m=0.01, lambda_e=0.01, o_e=0.1, o_c=0.5, cloud_fee=0.3, exit_layers=(2, 3, 6))
    # arm 0.6 keeps every sample on the mobile: reward ~0.70 - 0.02; arm 0.8 offloads all: 0.99 - 0.72
    r = make_router("adaee", arms=(0.6, 0.8), seed=3)
    d = r.route(outputs(mp), cm)
    arms, _ = r.play(outputs(mp), cm)
    pulls = np.bincount(arms, minlength=2)
    assert pulls.argmax() == 0 and pulls[0] > 0.9 * n
    np.testing.assert_array_equal(d.tier[arms == 0], MOBILE)
    assert not [k for k in vars(r) if k.endswith("_")]  # routing a stream learns nothing into the router
    again = make_router("adaee", arms=(0.6, 0.8), seed=3)
    np.testing.assert_array_equal(again.route(outputs(mp), cm).cost, d.cost)


def test_isplitee_bandit_learns_the_best_split():
    n = 3000
    mp = np.random.default_rng(1).uniform(0.85, 0.95, (n, 3))
    cm = CostModel(lambda_m=0.2, lambda_e=0.01, o_e=0.1, o_c=0.5, cloud_fee=0.3, exit_layers=(2, 3, 6))
    r = make_router("isplitee", threshold=0.8, seed=0)  # both splits answer on the mobile: m is cheaper
    d = r.route(outputs(mp), cm)
    arms, _ = r.play(outputs(mp), cm)
    assert (arms == 0).sum() > 0.9 * n and r.online
    np.testing.assert_array_equal(d.exit_index[arms == 1], EDGE)  # split at n exits at n, on the mobile
    assert (d.tier == MOBILE).all()


def test_knn_majority_pool_and_ties_to_the_cheaper_tier():
    emb = [[0, 0], [0, 0.1], [0.1, 0], [10, 10], [10, 10.1], [10.1, 10]]
    val = outputs(np.full((6, 3), 0.9), emb=emb)
    carto = carto_for([0.9, 0.9, 0.9, 0.1, 0.1, 0.1], np.zeros(6))  # easy cluster at 0, hard cluster at 10
    cal = CalibrationConfig(alpha_grid=(0.5,), beta_grid=(0.01,))
    r = build_router("knn", cal, k=3).fit(val, CM, carto)
    np.testing.assert_array_equal(r.pools_, [MOBILE] * 3 + [CLOUD] * 3)
    test = outputs(np.full((3, 3), 0.9), emb=[[0.2, 0.2], [9.8, 9.9], [6, 6]])
    np.testing.assert_array_equal(r.route(test, CM).tier, [MOBILE, CLOUD, CLOUD])
    tie = build_router("knn", cal, k=2).fit(val.subset(np.array([0, 3])), CM, carto_for([0.9, 0.1], [0, 0]))
    assert tie.route(outputs([[0.9] * 3], emb=[[5, 5]]), CM).tier[0] == MOBILE  # 1 vote each: cheaper wins


def test_knn_chunking_does_not_change_answers():
    out, carto = random_case(n=250)
    a = build_router("knn", CalibrationConfig(), chunk=7).fit(out, CM, carto).route(out, CM)
    b = build_router("knn", CalibrationConfig(), chunk=10_000).fit(out, CM, carto).route(out, CM)
    np.testing.assert_array_equal(a.tier, b.tier)


def test_costs_by_hand_for_every_method():
    out, carto = random_case(n=60, seed=5)
    m, n, l = CM.exit_layers
    lam_m, lam_e, o_e, o_c, fee = CM.lambda_m, CM.lambda_e, CM.o_e, CM.o_c, CM.cloud_fee
    tier_cost = {MOBILE: lam_m * m, EDGE: o_e + lam_e * n, CLOUD: o_c + fee}
    layers = {0: m, 1: n, 2: l}
    for name in (m for m in METHODS if m not in OURS):  # our policies' plan prices: tests/test_plans.py
        r = build_router(name, CalibrationConfig(), seed=0).fit(out, CM, carto)
        d = r.route(out, CM)
        if name == "deebert":  # cloud from layer 1 to the exit used
            expected = [o_c + fee * layers[k] / l for k in d.exit_index]
        elif name in ("adaee", "isplitee"):  # mobile up to the split, the cloud continues to l
            split = [m] * len(out) if name == "adaee" else [layers[a] for a in r.play(out, CM)[0]]
            hop = CM.hidden_state_factor * o_c  # the mobile's hidden state to the cloud
            expected = [lam_m * s if t == MOBILE else lam_m * s + hop + fee * (l - s) / l
                        for s, t in zip(split, d.tier, strict=True)]
        else:
            expected = [tier_cost[t] for t in d.tier]
            np.testing.assert_array_equal(d.exit_index, d.tier)
        np.testing.assert_allclose(d.cost, expected, err_msg=name)


def test_evaluate_over_seeds_mean_and_std():
    out, carto = random_case(n=200)

    def factory(seed):
        return make_router("random", seed=seed).fit(out, CM)

    mean, std = evaluate_over_seeds(factory, out, CM, "mcc", seeds=(0, 1, 2))
    runs = [evaluate_router(factory(s), out, CM, "mcc") for s in (0, 1, 2)]
    assert mean["accuracy"] == pytest.approx(np.mean([r.accuracy for r in runs]))
    assert std["mean_cost"] == pytest.approx(np.std([r.mean_cost for r in runs]))
    assert set(mean["metrics"]) == {"accuracy", "mcc"} and mean["runs"] == 3
    fixed_mean, fixed_std = evaluate_over_seeds(lambda s: make_router("cloud-only"), out, CM, "mcc", (0, 1))
    assert fixed_std["accuracy"] == 0.0 and fixed_mean["cost_change_pct"] == pytest.approx(0.0)
