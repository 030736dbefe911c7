"""The one evaluation loop every router goes through: cached exit outputs in, metrics and costs out.

`evaluate_methods` scores several routers on the same samples against cloud-only: accuracy change and
cost change with 95% paired bootstrap intervals, and the share of the oracle's saving each achieves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from dimec.costs import CostModel
from dimec.metrics import compute_metrics
from dimec.outputs import ExitOutputs
from dimec.routing.base import Decisions, Router
from dimec.tiers import CLOUD


@dataclass
class Interval:
    estimate: float
    low: float
    high: float  # a 95% paired bootstrap percentile interval

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MethodResult:
    method: str
    accuracy: float  # in [0, 1]
    metrics: dict[str, float]  # accuracy and the task metric (mcc / f1)
    mean_cost: float  # reward units per sample
    cost_change_pct: float  # vs cloud-only (negative = cheaper)
    tier_shares: tuple[float, float, float]  # share of samples answered on mobile, edge, cloud
    accuracy_change_pt: Interval | None = None  # vs cloud-only on the same samples
    cost_change: Interval | None = None  # % vs cloud-only
    oracle_share: float | None = None  # (cloud-only - cost) / (cloud-only - oracle): 1 = the oracle's saving

    def to_dict(self) -> dict:
        return asdict(self)


def answers(decisions: Decisions, outputs: ExitOutputs) -> np.ndarray:
    """(N,) the prediction each sample got from the exit that answered it."""
    return outputs.predictions[np.arange(len(outputs)), decisions.exit_index]


def score_decisions(name: str, decisions: Decisions, outputs: ExitOutputs, cost_model: CostModel,
                    metric: str) -> MethodResult:
    n = len(outputs)
    metrics = compute_metrics(outputs.labels, answers(decisions, outputs), metric)
    mean_cost = float(decisions.cost.mean()) if n else 0.0
    shares = np.bincount(decisions.tier, minlength=3)[:3] / max(1, n)
    return MethodResult(
        method=name, accuracy=metrics["accuracy"], metrics=metrics, mean_cost=mean_cost,
        cost_change_pct=cost_model.relative_change(mean_cost), tier_shares=tuple(float(s) for s in shares),
    )


def evaluate_router(router: Router, outputs: ExitOutputs, cost_model: CostModel, metric: str,
                    name: str | None = None) -> MethodResult:
    """Route the test outputs (in order, once) and score the answers."""
    return score_decisions(name or router.name, router.route(outputs, cost_model), outputs, cost_model, metric)


def evaluate_methods(routers: dict[str, Router], outputs: ExitOutputs, cost_model: CostModel, metric: str,
                     resamples: int = 2000, seed: int = 0) -> list[MethodResult]:
    """Each router scored on `outputs`, with its accuracy and cost change against cloud-only (paired
    bootstrap intervals) and its share of the oracle's saving."""
    from dimec.routing import make_router

    cloud_correct = outputs.correct[:, CLOUD]
    oracle_cost = make_router("oracle").route(outputs, cost_model).cost.mean()
    room = cost_model.cloud_only - oracle_cost
    results = []
    for name, router in routers.items():
        d = router.route(outputs, cost_model)
        r = score_decisions(name, d, outputs, cost_model, metric)
        correct = answers(d, outputs) == outputs.labels
        r.accuracy_change_pt, r.cost_change = paired_bootstrap(correct, cloud_correct, d.cost,
                                                               cost_model.cloud_only, resamples, seed=seed)
        r.oracle_share = float((cost_model.cloud_only - r.mean_cost) / room) if room > 1e-12 else None
        results.append(r)
    return results


def paired_bootstrap(correct: np.ndarray, reference_correct: np.ndarray, cost: np.ndarray, reference_cost: float,
                     resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[Interval, Interval]:
    """Accuracy change in points and cost change in % against a reference (cloud-only) on the same samples,
    each with a paired bootstrap percentile interval: one resample of sample indices serves both methods, so
    the interval reflects the difference, not each method's own noise."""
    n = len(correct)
    diff = correct.astype(np.float64) - reference_correct.astype(np.float64)  # (N,) in {-1, 0, 1}
    cost = np.asarray(cost, dtype=np.float64)
    rng = np.random.default_rng(seed)
    d, c = np.empty(resamples), np.empty(resamples)
    for start in range(0, resamples, 100):  # 100 resamples at a time bounds the (100, N) index matrix
        idx = rng.integers(0, n, size=(min(100, resamples - start), n))
        d[start : start + len(idx)] = 100 * diff[idx].mean(1)
        c[start : start + len(idx)] = 100 * (cost[idx].mean(1) / reference_cost - 1)
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    acc = Interval(100 * diff.mean(), *np.percentile(d, [lo, hi]).tolist())
    cst = Interval(100 * (cost.mean() / reference_cost - 1), *np.percentile(c, [lo, hi]).tolist())
    return acc, cst
