"""Expected-loss control (conformal risk control) and what a calibration set can carry."""

import numpy as np
import pytest

from dimec.config import CalibrationConfig, CostConfig
from dimec.costs import CostModel
from dimec.errors import ConfigError
from dimec.outputs import ExitOutputs
from dimec.routing import ROUTERS
from dimec.routing.selection import min_rows_to_certify
from dimec.routing.targets import (
    Target,
    binomial_p_value,
    control_expected_loss,
    smallest_certifiable_loss,
)
from tests.test_policies import synthetic

CM = CostModel.from_config(CostConfig(), (2, 3, 6))


def _population(n=200_000, k=12, seed=0):
    """Per-sample losses of k nested configurations, safest first: config j adds an error on the samples
    whose hardness is below its reach, and fixes a few (L = -1) so that the losses are not monotone."""
    rng = np.random.default_rng(seed)
    hard = rng.random(n)
    fixes = rng.random(n) < 0.01
    return [np.where(hard < 0.002 * (j + 1), 1, np.where(fixes & (hard > 1 - 0.004 * j), -1, 0)).astype(np.int8)
            for j in range(k)]


def test_expected_loss_control_holds_on_average_over_calibration_draws():
    pop = _population()
    means = np.array([p.mean() for p in pop])
    eps, n, rng = 0.01, 400, np.random.default_rng(1)
    realised, point = [], []
    for _ in range(400):
        rows = rng.choice(len(pop[0]), n, replace=False)
        result = control_expected_loss(range(len(pop)), [p[rows] for p in pop], eps)
        realised.append(means[result.admitted[-1]] if result.admitted else 0.0)
        ok = [j for j, p in enumerate(pop) if p[rows].mean() <= eps]  # the point estimate along the same path
        point.append(means[max(ok)] if ok else 0.0)
    assert np.mean(realised) <= eps  # the promise: on average over draws
    assert np.mean(point) > eps  # the point estimate breaks it on the same draws (winner's curse)
    assert np.mean(realised) > 0.3 * eps  # and control is not vacuous


def test_expected_loss_control_stops_at_the_first_refusal_and_reports_adjusted_risks():
    losses = {0: np.zeros(99, np.int8), 1: np.r_[np.ones(1), np.zeros(98)], 2: np.r_[np.ones(5), np.zeros(94)],
              3: np.zeros(99, np.int8)}
    result = control_expected_loss([0, 1, 2, 3], losses, eps=0.03)
    assert result.admitted == [0, 1]  # 3 is loss-free alone, but its monotonised loss carries 2's errors
    assert [round(r, 4) for _, r in result.adjusted_risk] == [0.01, 0.02, 0.06]


def test_smallest_certifiable_loss_matches_the_binomial_test():
    losses = np.r_[np.ones(3), np.zeros(997)]
    eps = smallest_certifiable_loss(losses, delta=0.1)
    assert binomial_p_value(losses > 0, eps * 1.001) <= 0.1 < binomial_p_value(losses > 0, eps * 0.99)
    assert smallest_certifiable_loss(np.zeros(640), 0.1) == pytest.approx(1 - 0.1 ** (1 / 640))
    assert min_rows_to_certify(0.005, 0.1) == 460  # docs/routing.md's "bare minimum"


def test_auto_with_expected_control_reports_what_the_data_can_carry():
    val, _ = synthetic(n=3000)
    cal = CalibrationConfig(max_loss=1.0, control="expected",
                            threshold_grid=8)
    router = ROUTERS["auto"].from_config(cal, families=("cascade", "edge-only", "mobile-only", "cloud-only")).fit(val, CM)
    assert "conformal risk control" in router.how_
    carry = router.capacity_
    assert carry["rows"] == 3000 and 0 < carry["smallest_certifiable_loss_pt"] < 100
    assert carry["point_cut_pct"] >= carry["expected_cut_pct"] >= 0
    assert "expected-loss control gives" in carry["text"]
    point = ROUTERS["auto"].from_config(CalibrationConfig(control="point", max_loss=1.0, threshold_grid=8),
                                        families=("cascade", "edge-only", "mobile-only", "cloud-only")).fit(val, CM)
    assert point.route(val, CM).cost.mean() <= router.route(val, CM).cost.mean() + 1e-9


def test_a_guarantee_below_the_rows_it_needs_says_so():
    val, _ = synthetic(n=400)  # 200 test rows: below the 460 any certificate at 0.5 pt needs
    router = ROUTERS["cascade"].from_config(CalibrationConfig(max_loss=0.5, delta=0.1)).fit(val, CM)
    assert "below the 460" in router.selection_.how


@pytest.mark.parametrize("bad", [{"control": "median"}, {"max_loss": -1.0}, {"max_loss": 100.0},
                                 {"delta": 0.0}, {"delta": 1.0}])
def test_bad_loss_control_settings_are_one_clear_error(bad):
    with pytest.raises(ConfigError):
        Target(**{"max_loss": 0.5, **bad}).check()


def test_calibration_rows_beyond_validation_fit_pools_on_validation_and_score_on_all():
    from dimec.training.cartography import Cartography

    val, easy = synthetic(n=1200)
    extra, _ = synthetic(n=2400, seed=5)  # rows without training dynamics (spare or cross-fitted)
    rows = ExitOutputs.concat([val, extra])
    carto = Cartography(np.stack([np.where(easy, 0.95, 0.3)] * 3, 1), np.zeros((len(val), 3)),
                        np.stack([easy.astype(float)] * 3, 1))
    fams = ("cascade", "hybrid-centroid", "dimec-fixed", "cloud-only")
    for cal in (CalibrationConfig(control="point", max_loss=1.0, threshold_grid=6),
                CalibrationConfig(max_loss=1.0, threshold_grid=6, control="expected")):
        router = ROUTERS["auto"].from_config(cal, families=fams).fit(rows, CM, carto)
        assert router.capacity_["rows"] == 3600
        fixed = next(f for f in router.summary_ if f["family"] == "dimec-fixed")
        assert fixed["candidates"] == 1 and "skipped" not in fixed
    with pytest.raises(Exception, match="cartography covers"):
        carto.rows_of(val.subset(np.arange(100)))
