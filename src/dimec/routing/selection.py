"""Choosing among candidate configurations of servable policies on validation, to meet a `Target`.

Every candidate is a fitted `PlanRouter` with fixed thresholds. Each is routed over the validation outputs
once; its per-sample loss against cloud-only and its cost give the figures the target reads (see
routing/targets.py for the three modes and the guarantee).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dimec.costs import CostModel
from dimec.outputs import ExitOutputs
from dimec.routing.plan import PlanRouter
from dimec.routing.targets import (
    Target,
    learn_then_test,
    pareto_order,
    select_budget,
    select_point,
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


@dataclass
class Selection:
    index: int | None  # the chosen candidate (None: nothing meets the target)
    scores: Scores
    how: str  # one line: what was required and what was found
    guarantee: dict | None = None  # the sequence tested and its p-values, when a guarantee was asked


def candidate_losses(router: PlanRouter, outputs: ExitOutputs, cost_model: CostModel, loss: str,
                     rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(per-sample loss, per-sample cost) of a candidate on `outputs` (optionally only `rows`)."""
    d = router.route(outputs, cost_model)
    losses = outputs.losses_against_last_exit(loss)[np.arange(len(outputs)), d.exit_index]
    if rows is not None:
        return losses[rows], d.cost[rows]
    return losses, d.cost


def score(candidates: list[tuple[str, PlanRouter]], outputs: ExitOutputs, cost_model: CostModel,
          target: Target) -> Scores:
    k = len(candidates)
    loss, cost, se = np.zeros(k), np.zeros(k), np.zeros(k)
    for j, (_, router) in enumerate(candidates):
        losses, costs = candidate_losses(router, outputs, cost_model, target.loss)
        loss[j], cost[j] = 100 * losses.mean(), costs.mean()
        se[j] = 100 * losses.std() / np.sqrt(max(1, len(losses)))
    return Scores([f for f, _ in candidates], loss, cost, se)


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
        if se >= target.max_loss:  # the estimate's own noise is as large as the target: say so, loudly
            how += (f"; WARNING: its loss estimate has a standard error of {se:.2f} pt, as large as the target, "
                    "so on new data the loss will often exceed it (state a guarantee with --delta, or calibrate "
                    "on a larger validation split)")
    return candidates, Selection(index, scores, how)


def subset_cartography(cartography: Cartography | None, rows: np.ndarray) -> Cartography | None:
    if cartography is None:
        return None
    return Cartography(cartography.confidence[rows], cartography.variability[rows], cartography.correctness[rows])


def _select_guaranteed(build: CandidateBuilder, val: ExitOutputs, cartography: Cartography | None,
                       cost_model: CostModel, target: Target) -> tuple[list[tuple[str, PlanRouter]], Selection]:
    order_rows, test_rows = split_rows(len(val), target.order_share, target.seed)
    order, test = val.subset(order_rows), val.subset(test_rows)
    candidates = build(order, subset_cartography(cartography, order_rows))
    scores = score(candidates, order, cost_model, target)
    safe = [j for j, (f, _) in enumerate(candidates) if f == "cloud-only"]  # L = 0: admissible untested
    front = np.array([j for j in pareto_order(scores.loss_pt, scores.cost) if j not in safe], dtype=np.int64)
    cache: dict[int, np.ndarray] = {}

    class _Lazy(dict):  # per-sample test-row losses, computed only for the candidates actually tested
        def __getitem__(self, j: int) -> np.ndarray:
            if j not in cache:
                cache[j] = candidate_losses(candidates[j][1], test, cost_model, target.loss)[0]
            return cache[j]

    result = learn_then_test(scores.loss_pt, scores.cost, _Lazy(), target, front)
    admissible = result.certified + safe
    index = min(admissible, key=lambda j: (scores.cost[j], scores.loss_pt[j])) if admissible else None
    how = (f"cheapest of {len(result.certified)} configuration(s) certified by Learn-then-Test "
           f"({target.test} p-values, delta {target.delta:g}; {len(order_rows)} validation samples build and "
           f"order {len(front)} Pareto candidates, {len(test_rows)} others test them; cloud-only is always "
           "admissible)")
    guarantee = {"order_samples": len(order_rows), "test_samples": len(test_rows), "front": len(front),
                 "tested": [{"family": candidates[j][0], "describe": candidates[j][1].describe(), "p_value": p,
                             "order_loss_pt": float(scores.loss_pt[j]), "order_cost": float(scores.cost[j])}
                            for j, p in result.tested],
                 "certified": len(result.certified)}
    return candidates, Selection(index, scores, how, guarantee)
