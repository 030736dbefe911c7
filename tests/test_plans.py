"""Plans: every path's price from the cost model, where samples stop, and plan checks."""

import numpy as np
import pytest

from dimec.config import CostConfig
from dimec.costs import CostModel
from dimec.errors import ConfigError
from dimec.outputs import ExitOutputs
from dimec.routing.plan import Stage, check_plan, confidence, plan_text, run_plans, stage_costs
from dimec.tiers import CLOUD, EDGE, MOBILE

CM = CostModel.from_config(CostConfig(), (2, 3, 6))
LAM = 0.1 / 6


def test_path_costs_follow_the_documented_formulas():
    cascade = (Stage(MOBILE, 0, 0.9), Stage(EDGE, 1, 0.8), Stage(CLOUD, 2))
    # mobile 2 layers at 1.5; hop to the edge 1.25 * 2.5; one edge layer; hop 1.25 * (3 - 2.5); 3 cloud layers
    np.testing.assert_allclose(stage_costs(cascade, CM) / LAM, [3.0, 3 + 3.125 + 1, 3 + 3.125 + 1 + 0.625 + 3])
    for tier in (MOBILE, EDGE, CLOUD):  # a one-stage plan is the paper's tier
        assert stage_costs((Stage(tier, tier),), CM)[0] == pytest.approx(CM.tier_costs[tier])
    deebert = (Stage(CLOUD, 0, 0.5), Stage(CLOUD, 1, 0.5), Stage(CLOUD, 2))
    np.testing.assert_allclose(stage_costs(deebert, CM) / LAM, [3 + 2, 3 + 3, 3 + 6])
    split = (Stage(MOBILE, 0, 0.9), Stage(CLOUD, 2))  # AdaEE: the mobile's hidden state to the cloud
    np.testing.assert_allclose(stage_costs(split, CM) / LAM, [3.0, 3 + 1.25 * 3 + 4])
    free_hops = CostModel.from_config(CostConfig(hidden_state_offload=0.0), (2, 3, 6))
    assert stage_costs(cascade, free_hops)[2] / LAM == pytest.approx(3 + 1 + 3)


def test_samples_stop_at_the_first_confident_stage():
    probs = np.array([[[0.95, 0.05], [0.9, 0.1], [0.9, 0.1]],    # confident at the mobile
                      [[0.6, 0.4], [0.85, 0.15], [0.9, 0.1]],    # at the edge
                      [[0.6, 0.4], [0.6, 0.4], [0.1, 0.9]]])     # only the cloud answers
    out = ExitOutputs.from_probs(probs, np.array([0, 0, 1]), np.zeros((3, 2)))
    plan = (Stage(MOBILE, 0, 0.9), Stage(EDGE, 1, 0.8), Stage(CLOUD, 2))
    d = run_plans(out, [plan], np.zeros(3, dtype=int), CM)
    np.testing.assert_array_equal(d.stage, [0, 1, 2])
    np.testing.assert_array_equal(d.exit_index, [0, 1, 2])
    np.testing.assert_allclose(d.cost, stage_costs(plan, CM))
    # two plans chosen per sample: sample 1 goes straight to the cloud
    d2 = run_plans(out, [plan, (Stage(CLOUD, 2),)], np.array([0, 1, 0]), CM)
    np.testing.assert_array_equal(d2.tier, [MOBILE, CLOUD, CLOUD])
    assert d2.cost[1] == pytest.approx(CM.tier_costs[CLOUD])
    assert confidence(probs[:, 0], "entropy")[0] > confidence(probs[:, 0], "entropy")[1]


def test_bad_plans_are_refused():
    with pytest.raises(ConfigError, match="move up"):
        check_plan((Stage(EDGE, 1, 0.5), Stage(MOBILE, 2)))
    with pytest.raises(ConfigError, match="does not hold exit"):
        check_plan((Stage(MOBILE, 1, 0.5), Stage(CLOUD, 2)))
    with pytest.raises(ConfigError, match="needs a threshold"):
        check_plan((Stage(MOBILE, 0), Stage(CLOUD, 2)))
    assert plan_text(check_plan((Stage(MOBILE, 0, 0.9), Stage(CLOUD, 2)))) == "mobile@m>=0.9 -> cloud@l"
