"""Fit every router on validation and score it on test through the one evaluation loop; routers with a
seed are scored over several seeds (mean and standard deviation)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dimec.config import CalibrationConfig
from dimec.costs import CostModel
from dimec.errors import DimecError
from dimec.evaluation import MethodResult, evaluate_methods, evaluate_router, score_decisions
from dimec.experiments import DISPLAY, METHODS, SWEPT  # noqa: F401  (re-exported)
from dimec.outputs import ExitOutputs
from dimec.routing import ROUTERS, make_router
from dimec.routing.base import Router, TrainingSignal
from dimec.routing.plan import PlanRouter
from dimec.training.cartography import Cartography


def is_seeded(name: str) -> bool:
    """Whether a registered router's results depend on a seed (they are then averaged over several): it
    takes one, and does not declare `seed_matters = False`."""
    cls = ROUTERS[name]
    return getattr(cls, "seed_matters", True) and "seed" in cls.from_config(CalibrationConfig()).get_params()


def build_router(name: str, calibration: CalibrationConfig, seed: int | None = None, **overrides: Any) -> Router:
    """A router by name with the run's calibration settings (each router's `from_config`), a seed where it
    takes one, and any parameter overridden."""
    if name not in ROUTERS:
        make_router(name)  # the registry's one clear error for an unknown name
    router = ROUTERS[name].from_config(calibration, seed)
    return type(router)(**(router.get_params() | overrides)) if overrides else router


def evaluate_over_seeds(router_factory: Callable[[int], Router], outputs: ExitOutputs, cost_model: CostModel,
                        metric: str, seeds: Sequence[int], name: str | None = None) -> tuple[dict, dict]:
    """`router_factory(seed)` returns a fitted router; each is scored on `outputs` (the stream in order,
    once). Returns (mean, std): MethodResult-like dicts averaged / spread over the seeds."""
    results = [evaluate_router(router_factory(s), outputs, cost_model, metric, name) for s in seeds]
    return aggregate(results)


def aggregate(results: Sequence[MethodResult]) -> tuple[dict, dict]:
    def stat(fn: Callable[[np.ndarray], Any], values: list) -> Any:
        return fn(np.asarray(values, dtype=np.float64), axis=0)

    out = []
    for fn in (np.mean, np.std):  # population std over seeds
        out.append({
            "method": results[0].method,
            "accuracy": float(stat(fn, [r.accuracy for r in results])),
            "metrics": {k: float(stat(fn, [r.metrics[k] for r in results])) for k in results[0].metrics},
            "mean_cost": float(stat(fn, [r.mean_cost for r in results])),
            "cost_change_pct": float(stat(fn, [r.cost_change_pct for r in results])),
            "tier_shares": [float(v) for v in stat(fn, [r.tier_shares for r in results])],
            "runs": len(results),
        })
    return out[0], out[1]


def compare_methods(val: ExitOutputs, test: ExitOutputs, cost_model: CostModel, carto: Cartography | None,
                    metric: str, calibration: CalibrationConfig, methods: Sequence[str] = METHODS,
                    seeds: Sequence[int] = (0,), train: TrainingSignal | None = None) -> list[dict]:
    """Fit each method on validation, score on test. One row per method: mean, std (zeros when the
    method has no seed), whether it ran over seeds, and the 95% paired bootstrap intervals of its accuracy
    and cost change against cloud-only (of the first seed's run). A method that cannot be fitted on this
    task (e.g. the learned pre-router without training dynamics) gets a row with the reason instead."""
    rows = []
    for name in methods:
        def factory(seed: int, name: str = name) -> Router:
            return build_router(name, calibration, seed).fit(val, cost_model, carto, train)

        try:
            first = factory(seeds[0])
        except DimecError as exc:
            rows.append({"method": name, "skipped": exc.message})
            continue
        routers = {name: first}
        mean, std = evaluate_over_seeds(lambda s, first=first, f=factory: first if s == seeds[0] else f(s), test,
                                        cost_model, metric, seeds if is_seeded(name) else seeds[:1])
        ci = evaluate_methods(routers, test, cost_model, metric)[0]
        rows.append({"method": name, "mean": mean, "std": std, "seeded": is_seeded(name),
                     "ci": {"accuracy_change_pt": ci.accuracy_change_pt.to_dict(),
                            "cost_change_pct": ci.cost_change.to_dict()},
                     "describe": first.describe() if isinstance(first, PlanRouter) else None,
                     "winner": getattr(first, "winner_", None)} | noise_of(first))
    return rows


def noise_of(router: Router) -> dict:
    """For a policy chosen on validation by a point estimate: its loss estimate's standard error, and whether
    it is at least the stated loss (the estimate cannot resolve the target: Table I flags the row)."""
    selection = getattr(router, "selection_", None)
    if selection is None or selection.loss_se_pt() is None:
        return {}
    return {"val_loss_se_pt": selection.loss_se_pt(), "noisy_estimate": bool(selection.noisy)}


def threshold_sweeps(val: ExitOutputs, test: ExitOutputs, cost_model: CostModel, carto: Cartography | None,
                     metric: str, calibration: CalibrationConfig, train: TrainingSignal | None = None
                     ) -> dict[str, list[dict]]:
    """Accuracy/cost on test for every threshold of the methods that have one (the Pareto curves):
    DeeBERT's entropy threshold, AdaEE's mobile confidence threshold held fixed (no bandit),
    DIMEC-DC's alpha (beta re-chosen by the reward search for each alpha), and the test Pareto front of
    every threshold configuration of our plan families (thresholds from validation quantiles)."""
    from dimec.routing.baselines import DEFAULT_ARMS, deebert_decisions, entropy_grid, split_decisions
    from dimec.tiers import MOBILE

    def scored(name: str, decisions, threshold: float) -> dict:
        return score_decisions(name, decisions, test, cost_model, metric).to_dict() | {"threshold": float(threshold)}

    sweeps = {
        "deebert": [scored("deebert", deebert_decisions(test, cost_model, t), t) for t in entropy_grid(val, 21)],
        "adaee": [scored("adaee", split_decisions(test, cost_model, MOBILE, t), t) for t in DEFAULT_ARMS],
    }
    if carto is not None:
        sweeps["dimec-fixed"] = [
            evaluate_router(build_router("dimec-fixed", calibration, alpha_grid=(a,)).fit(val, cost_model, carto),
                            test, cost_model, metric).to_dict() | {"threshold": float(a)}
            for a in calibration.alpha_grid
        ]
    for name in SWEPT:  # the threshold grids of our policies: every configuration, its test Pareto front kept
        family = build_router(name, calibration)
        try:
            family.prepare(val, cost_model, carto, train)
        except DimecError:
            continue
        scored_grid = [evaluate_router(c, test, cost_model, metric).to_dict() | {"threshold": c.describe()}
                       for c in family.candidates(val, cost_model, carto, train)]
        sweeps[name] = pareto_rows(scored_grid)
    return sweeps


def pareto_rows(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on both accuracy and cost, by cost."""
    front, best = [], -np.inf
    for r in sorted(rows, key=lambda r: (r["mean_cost"], -r["accuracy"])):
        if r["accuracy"] > best + 1e-12:
            front.append(r)
            best = r["accuracy"]
    return front
