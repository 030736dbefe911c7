"""The one evaluation loop every router goes through: cached exit outputs in, metrics and costs out."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from dimec.costs import CostModel
from dimec.metrics import compute_metrics
from dimec.outputs import ExitOutputs
from dimec.routing.base import Decisions, Router


@dataclass
class MethodResult:
    method: str
    accuracy: float  # in [0, 1]
    metrics: dict[str, float]  # accuracy and the task metric (mcc / f1)
    mean_cost: float  # reward units per sample
    cost_change_pct: float  # vs cloud-only (negative = cheaper)
    tier_shares: tuple[float, float, float]  # share of samples answered on mobile, edge, cloud

    def to_dict(self) -> dict:
        return asdict(self)


def score_decisions(name: str, decisions: Decisions, outputs: ExitOutputs, cost_model: CostModel,
                    metric: str) -> MethodResult:
    n = len(outputs)
    predictions = outputs.predictions[np.arange(n), decisions.exit_index]  # (N,)
    metrics = compute_metrics(outputs.labels, predictions, metric)
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
