"""Choosing among candidate configurations of servable policies on validation, to meet a `Target`.

Every candidate is a fitted `PlanRouter` with fixed thresholds. Each is routed over the validation outputs
once; its per-sample loss against cloud-only and its cost give the figures the target reads (see
routing/targets.py for the three modes and the guarantee).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from dimec.costs import CostModel
from dimec.outputs import ExitOutputs
from dimec.routing.plan import PlanRouter
from dimec.routing.targets import (
    LOSS_BOUND,
    Target,
    control_expected_loss,
    learn_then_test,
    monotone_path,
    pareto_order,
    select_budget,
    select_point,
    smallest_certifiable_loss,
    split_rows,
)
from dimec.training.cartography import Cartography


@dataclass
class Scores:
    """Validation figures of K candidates: loss in points (against cloud-only) and mean cost."""

    family: list[str]  # (K,) which policy each candidate belongs to
    loss_pt: np.ndarray  # (K,) on the rows the candidates are scored on (all of validation, or its ordering part)
    cost: np.ndarray  # (K,)
    loss_se_pt: np.ndarray  # (K,) standard error of loss_pt
    added_pt: np.ndarray | None = None  # (K,) share of samples with L = +1 (errors the candidate adds), in points


@dataclass
class Selection:
    index: int | None  # the chosen candidate (None: nothing meets the target)
    scores: Scores
    how: str  # one line: what was required and what was found
    guarantee: dict | None = None  # the sequence tested and its p-values, when a guarantee was asked
    noisy: bool = False  # a point estimate whose standard error is at least the stated loss (see `how`)

    def loss_se_pt(self) -> float | None:
        """The standard error of the chosen candidate's loss estimate, in points."""
        return None if self.index is None else float(self.scores.loss_se_pt[self.index])


def candidate_losses(router: PlanRouter, outputs: ExitOutputs, cost_model: CostModel, loss: str,
                     rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(per-sample loss, per-sample cost) of a candidate on `outputs` (optionally only `rows`)."""
    d = router.route(outputs, cost_model)
    losses = outputs.losses_against_last_exit(loss)[np.arange(len(outputs)), d.exit_index]
    if rows is not None:
        return losses[rows], d.cost[rows]
    return losses, d.cost


def score(candidates: list[tuple[str, PlanRouter]], outputs: ExitOutputs, cost_model: CostModel,
          target: Target, per_sample: np.ndarray | None = None) -> Scores:
    """The candidates' figures on `outputs`; `per_sample`, an (N, K) int8 array, also receives each
    candidate's per-sample losses (expected-loss control builds its path from them)."""
    k = len(candidates)
    loss, cost, se, added = np.zeros(k), np.zeros(k), np.zeros(k), np.zeros(k)
    for j, (_, router) in enumerate(candidates):
        losses, costs = candidate_losses(router, outputs, cost_model, target.loss)
        loss[j], cost[j], added[j] = 100 * losses.mean(), costs.mean(), 100 * (losses > 0).mean()
        se[j] = 100 * losses.std() / np.sqrt(max(1, len(losses)))
        if per_sample is not None:
            per_sample[:, j] = losses
    return Scores([f for f, _ in candidates], loss, cost, se, added)


CandidateBuilder = Callable[[ExitOutputs, "Cartography | None"], list[tuple[str, PlanRouter]]]


def select(build: CandidateBuilder, val: ExitOutputs, cartography: Cartography | None, cost_model: CostModel,
           target: Target) -> tuple[list[tuple[str, PlanRouter]], Selection]:
    """Build the candidates with `build(outputs, cartography)` (fitted, fixed-threshold plan routers, with
    their family names; include cloud-only, the fallback that always meets a loss target) and pick the one
    the target asks for. With a guarantee the candidates are built from the ordering part of validation
    only, so that the testing part is untouched by every choice made before the test."""
    target.check()
    if target.guaranteed:
        return _select_guaranteed(build, val, cartography, cost_model, target)
    if target.expected:
        return _select_expected(build, val, cartography, cost_model, target)
    candidates = build(val, cartography)
    scores = score(candidates, val, cost_model, target)
    if target.budgeted:
        cap = target.cost_cap(cost_model.cloud_only)
        index = select_budget(scores.loss_pt, scores.cost, cap)
        how = (f"most accurate with mean validation cost <= {cap:.4g} "
               f"({100 * (cap / cost_model.cloud_only - 1):+.1f}% against cloud-only)")
    else:
        index = select_point(scores.loss_pt + target.point_margin * scores.loss_se_pt, scores.cost, target.max_loss)
        margin = f" + {target.point_margin:g} standard errors" if target.point_margin else ""
        how = f"cheapest with validation loss{margin} <= {target.max_loss:g} pt (point estimate, {len(val)} samples)"
        se = float(scores.loss_se_pt[index]) if index is not None else 0.0
        noisy = se >= target.max_loss
        if noisy:  # the estimate's own noise is as large as the target: say so, loudly
            how += (f"; WARNING: its loss estimate has a standard error of {se:.2f} pt, as large as the target, "
                    "so on new data the loss will often exceed it (state a guarantee with --delta, or calibrate "
                    "on a larger validation split)")
        return candidates, Selection(index, scores, how, noisy=noisy)
    return candidates, Selection(index, scores, how)


def subset_cartography(cartography: Cartography | None, rows: np.ndarray) -> Cartography | None:
    """The cartography of `rows` (ascending) of the calibration rows; it covers their first len(cartography)
    rows (validation), so that of an ascending subset covers the subset's prefix too."""
    if cartography is None:
        return None
    rows = rows[rows < len(cartography)]
    return Cartography(cartography.confidence[rows], cartography.variability[rows], cartography.correctness[rows])


@dataclass
class _Ordered:
    """The candidates built and ordered on one part of the calibration rows, for testing on the other."""

    candidates: list[tuple[str, PlanRouter]]
    scores: Scores  # on the ordering part
    front: np.ndarray  # the path to test, safest first (cloud-only excluded: it is admissible untested)
    safe: list[int]  # the cloud-only candidates
    order_rows: np.ndarray
    test_rows: np.ndarray
    test_losses: dict  # candidate -> (n_test,) per-sample losses, computed on first use


def _ordered(build: CandidateBuilder, val: ExitOutputs, cartography: Cartography | None, cost_model: CostModel,
             target: Target) -> _Ordered:
    order_rows, test_rows = split_rows(len(val), target.order_share, target.seed)
    order, test = val.subset(order_rows), val.subset(test_rows)
    candidates = build(order, subset_cartography(cartography, order_rows))
    per_sample = np.zeros((len(order), len(candidates)), np.int8) if target.expected else None
    scores = score(candidates, order, cost_model, target, per_sample)
    safe = [j for j, (f, _) in enumerate(candidates) if f == "cloud-only"]
    front = test_order(per_sample, scores.loss_pt, scores.added_pt, scores.cost, safe, target)

    class _Lazy(dict):  # per-sample test-row losses, computed only for the candidates actually tested
        def __missing__(self, j: int) -> np.ndarray:
            self[j] = candidate_losses(candidates[j][1], test, cost_model, target.loss)[0]
            return self[j]

    return _Ordered(candidates, scores, front, safe, order_rows, test_rows, _Lazy())


def test_order(per_sample: np.ndarray | None, loss_pt: np.ndarray, added_pt: np.ndarray, cost: np.ndarray,
               safe: list[int], target: Target) -> np.ndarray:
    """The candidates a guarantee's test walks, safest first, from the ordering rows alone. Expected-loss
    control: the path that keeps the monotonised loss (per_sample: (N, C) losses) lowest per unit of cost
    saved; Learn-then-Test: the Pareto front of what its test reads (the binomial test: added errors alone).
    The safe candidates (cloud-only) are left out: they are always admissible."""
    if target.expected and safe:
        return np.array(monotone_path(per_sample, cost, safe[0], PATH_STOP * target.max_loss / 100), dtype=np.int64)
    tested = added_pt if target.test == "binomial" else loss_pt
    return np.array([j for j in pareto_order(tested, cost) if j not in safe], dtype=np.int64)


PATH_STOP = 3.0  # expected-loss control's path ends once its monotonised risk on the ordering rows passes
# 3x the target: configurations beyond it are never admitted on the testing rows either (in practice)


def _cheapest(o: _Ordered, admitted: list[int]) -> int | None:
    admissible = admitted + o.safe
    return min(admissible, key=lambda j: (o.scores.cost[j], o.scores.loss_pt[j])) if admissible else None


def _select_guaranteed(build: CandidateBuilder, val: ExitOutputs, cartography: Cartography | None,
                       cost_model: CostModel, target: Target) -> tuple[list[tuple[str, PlanRouter]], Selection]:
    o = _ordered(build, val, cartography, cost_model, target)
    result = learn_then_test(o.scores.loss_pt, o.scores.cost, o.test_losses, target, o.front)
    index = _cheapest(o, result.certified)
    how = (f"cheapest of {len(result.certified)} configuration(s) certified by Learn-then-Test "
           f"({target.test} p-values, delta {target.delta:g}; {len(o.order_rows)} calibration samples build and "
           f"order {len(o.front)} Pareto candidates, {len(o.test_rows)} others test them; cloud-only is always "
           "admissible)")
    floor = min_rows_to_certify(target.max_loss / 100, target.delta)
    if not result.certified and len(o.test_rows) < floor:
        how += (f"; its {len(o.test_rows)} test samples are below the {floor} that any certificate at "
                f"{target.max_loss:g} pt and delta {target.delta:g} needs (even a configuration that adds no error "
                "could not be certified): calibrate on more rows, or state a larger loss")
    guarantee = {"order_samples": len(o.order_rows), "test_samples": len(o.test_rows), "front": len(o.front),
                 "min_test_samples": floor,
                 "tested": [{"family": o.candidates[j][0], "describe": o.candidates[j][1].describe(), "p_value": p,
                             "order_loss_pt": float(o.scores.loss_pt[j]), "order_cost": float(o.scores.cost[j])}
                            for j, p in result.tested],
                 "certified": len(result.certified)}
    return o.candidates, Selection(index, o.scores, how, guarantee)


def _select_expected(build: CandidateBuilder, val: ExitOutputs, cartography: Cartography | None,
                     cost_model: CostModel, target: Target) -> tuple[list[tuple[str, PlanRouter]], Selection]:
    o = _ordered(build, val, cartography, cost_model, target)
    result = control_expected_loss(o.front, o.test_losses, target.max_loss / 100)
    index = _cheapest(o, result.admitted[-1:])
    how = (f"cheapest configuration whose expected loss is controlled at {target.max_loss:g} pt (conformal risk "
           f"control; {len(o.order_rows)} calibration samples build a path of {len(o.front)} configurations, "
           f"{len(o.test_rows)} others control the monotonised loss; cloud-only is always admissible)")
    slack = 100 * LOSS_BOUND / (len(o.test_rows) + 1)
    if slack >= target.max_loss:
        how += (f"; its {len(o.test_rows)} control samples leave no room: the correction B/(n+1) = {slack:.2f} pt "
                "alone reaches the target (calibrate on more rows)")
    guarantee = {"order_samples": len(o.order_rows), "test_samples": len(o.test_rows), "front": len(o.front),
                 "tested": [{"family": o.candidates[j][0], "describe": o.candidates[j][1].describe(),
                             "adjusted_risk_pt": 100 * r, "order_loss_pt": float(o.scores.loss_pt[j]),
                             "order_cost": float(o.scores.cost[j])} for j, r in result.adjusted_risk],
                 "admitted": len(result.admitted)}
    return o.candidates, Selection(index, o.scores, how, guarantee)


def min_rows_to_certify(eps: float, delta: float) -> int:
    """The fewest test rows on which Learn-then-Test's binomial test can certify anything at (eps, delta): a
    configuration with no added error has p = (1 - eps)^n, which must be <= delta."""
    if eps <= 0:
        return 10**9
    if eps >= 1:
        return 1
    return int(np.ceil(np.log(delta) / np.log1p(-eps)))


def what_the_data_can_carry(build: CandidateBuilder, val: ExitOutputs, cartography: Cartography | None,
                            cost_model: CostModel, target: Target, delta: float = 0.1) -> dict:
    """Before choosing: with these rows, the smallest loss Learn-then-Test can certify at `delta`, and the
    cost cut the point estimate and expected-loss control give at the stated loss (one build on all rows,
    one on the ordering part, shared by both ordered modes)."""
    eps_pt = target.max_loss if target.max_loss is not None else 0.5
    point_target = replace(target, max_loss=eps_pt, delta=None, budget=None, budget_cut=None, control="point")
    candidates = build(val, cartography)
    scores = score(candidates, val, cost_model, point_target)
    point = select_point(scores.loss_pt + target.point_margin * scores.loss_se_pt, scores.cost, eps_pt)
    o = _ordered(build, val, cartography, cost_model, replace(point_target, control="expected"))
    crc = control_expected_loss(o.front, o.test_losses, eps_pt / 100)
    expected = _cheapest(o, crc.admitted[-1:])
    first = test_order(None, o.scores.loss_pt, o.scores.added_pt, o.scores.cost, o.safe,  # Learn-then-Test's order
                       point_target)[:1]
    smallest = min((smallest_certifiable_loss(o.test_losses[j], delta, target.test, target.loss, target.seed)
                    for j in first), default=1.0)

    def cut(cost: float | None) -> float:
        return 0.0 if cost is None else -cost_model.relative_change(cost)

    return {"rows": len(val), "eps_pt": eps_pt, "delta": delta, "loss": target.loss,
            "smallest_certifiable_loss_pt": 100 * smallest,
            "min_test_rows_to_certify": min_rows_to_certify(eps_pt / 100, delta),
            "test_rows": len(o.test_rows),
            "point_cut_pct": cut(None if point is None else float(scores.cost[point])),
            "expected_cut_pct": cut(None if expected is None else float(o.scores.cost[expected])),
            "text": (f"with {len(val)} labelled rows, the smallest loss certifiable at delta = {delta:g} is "
                     f"{100 * smallest:.2f} pt; at {eps_pt:g} pt expected-loss control gives "
                     f"{cut(None if expected is None else float(o.scores.cost[expected])):.1f}% and the point "
                     f"estimate {cut(None if point is None else float(scores.cost[point])):.1f}%")}
