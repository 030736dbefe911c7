"""Plans: the one shape every servable routing policy takes, and how a plan is priced and run.

A plan is a sequence of stages. A sample starts on the first stage's tier (its raw input is offloaded
there unless that tier is the mobile), runs the layers up to the stage's exit and stops there if the exit's
confidence clears the stage's threshold; otherwise it runs on to the next stage, on the same tier (more
layers) or on a tier further up (its hidden state is shipped there: a hop). The last stage always answers.

    cloud-only                  [(cloud, l)]
    cascade                     [(mobile, m, t_m), (edge, n, t_n), (cloud, l)]
    split computing (AdaEE)     [(mobile, m, t_m), (cloud, l)]
    early exit on the cloud     [(cloud, m, t_m), (cloud, n, t_n), (cloud, l)]          (DeeBERT)

A pre-router (DIMEC-DC's centroids, or a learned classifier) may choose one of several plans per sample
before any transformer layer runs; "hybrid" sends the samples it predicts hard straight to the cloud and
the others into the cascade. The plan data and the stop rule live in runtime/plans.py (the phone reads
them without this module); this module prices plans and runs them on cached outputs. Cost of stopping at stage s (docs/cost-model.md):

    raw(first tier) + sum over stages <= s of layers run there * that tier's layer rate
                    + sum over tier changes of hop(previous tier, next tier)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dimec.costs import CostModel
from dimec.outputs import ExitOutputs
from dimec.routing.base import Decisions, Router
from dimec.runtime.plans import (  # noqa: F401  (the plan data lives in the torch-free runtime; re-exported)
    CONFIDENCES,
    Plan,
    Stage,
    check_plan,
    confidence,
    plan_text,
    stop_stages,
)


def stage_costs(plan: Plan, cost_model: CostModel) -> np.ndarray:
    """(S,) what a sample costs when it stops at each stage of `plan`."""
    layers = cost_model.exit_layers
    costs, total, done, tier = [], cost_model.raw_offload(plan[0].tier), 0, plan[0].tier
    for s in plan:
        if s.tier != tier:
            total += cost_model.hop(tier, s.tier)
            tier = s.tier
        total += (layers[s.exit] - done) * cost_model.layer_rate(s.tier)
        done = layers[s.exit]
        costs.append(total)
    return np.asarray(costs, dtype=np.float64)


@dataclass
class PlanDecisions:
    """What running plans on N samples gives: the answering exit and tier, the cost, the stopping stage."""

    exit_index: np.ndarray  # (N,)
    tier: np.ndarray  # (N,)
    cost: np.ndarray  # (N,)
    stage: np.ndarray  # (N,)


def run_plans(outputs: ExitOutputs, plans: list[Plan], choice: np.ndarray, cost_model: CostModel,
              kind: str = "max_prob") -> PlanDecisions:
    """Run plan `choice[i]` on sample i. choice: (N,) indices into `plans`."""
    conf = outputs.confidences(kind)  # (N, 3)
    n = len(outputs)
    out = PlanDecisions(np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n), np.zeros(n, np.int64))
    for p, plan in enumerate(plans):
        rows = choice == p
        if not rows.any():
            continue
        stop = stop_stages(conf, plan, rows)[rows]
        out.exit_index[rows] = np.array([s.exit for s in plan])[stop]
        out.tier[rows] = np.array([s.tier for s in plan])[stop]
        out.cost[rows] = stage_costs(plan, cost_model)[stop]
        out.stage[rows] = stop
    return out


class PlanRouter(Router):
    """A router that can be served: before any layer runs it picks one of its plans for each sample
    (`choose_plans`, from the routing embedding and the token count), and the plan does the rest.

    Fitted state: `plans_` (list of plans), `confidence_` ("max_prob" or "entropy", what thresholds read) and
    `prerouter_` (None: plan 0 for every sample; else a pre-router from routing/prerouters.py). Routing
    cached outputs, serving and the JSON state are shared by every subclass."""

    def choose_plans(self, embeddings: np.ndarray, lengths: np.ndarray | None) -> np.ndarray:
        """(N, H), (N,) -> (N,) index into `plans_`."""
        self.check_fitted()
        pre = getattr(self, "prerouter_", None)
        return np.zeros(len(embeddings), dtype=np.int64) if pre is None else pre.choose(embeddings, lengths)

    def route(self, outputs: ExitOutputs, cost_model: CostModel) -> Decisions:
        self.check_fitted()
        choice = self.choose_plans(outputs.embeddings, outputs.lengths)
        d = run_plans(outputs, self.plans_, choice, cost_model, self.confidence_)
        return Decisions(exit_index=d.exit_index, tier=d.tier, cost=d.cost)

    def adopt(self, other: PlanRouter) -> None:
        """Take another fitted plan router's plans, confidence and pre-router (a tuned or auto choice)."""
        self.plans_, self.confidence_ = list(other.plans_), other.confidence_
        self.prerouter_ = getattr(other, "prerouter_", None)

    def describe(self) -> str:
        pre = getattr(self, "prerouter_", None)
        plans = " | ".join(plan_text(p) for p in self.plans_)
        return plans if pre is None else f"{pre.describe()}: {plans}"

    def state(self) -> dict:
        pre = getattr(self, "prerouter_", None)
        return {"plans": [[s.to_list() for s in p] for p in self.plans_], "confidence": self.confidence_,
                "prerouter": None if pre is None else pre.to_dict()}

    def load_state(self, state: dict) -> None:
        from dimec.runtime.policy import plans_from_state

        self.plans_, self.confidence_, self.prerouter_ = plans_from_state(state)
