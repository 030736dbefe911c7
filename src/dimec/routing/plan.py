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
the others into the cascade. Cost of stopping at stage s (docs/cost-model.md):

    raw(first tier) + sum over stages <= s of layers run there * that tier's layer rate
                    + sum over tier changes of hop(previous tier, next tier)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dimec.costs import CostModel
from dimec.errors import ConfigError
from dimec.outputs import CONFIDENCES, ExitOutputs, confidence  # noqa: F401  (re-exported)
from dimec.routing.base import Decisions, Router
from dimec.tiers import CLOUD, TIERS


@dataclass(frozen=True)
class Stage:
    tier: int  # where this stage runs: MOBILE, EDGE or CLOUD
    exit: int  # the exit read here: 0 (after layer m), 1 (n) or 2 (l)
    threshold: float | None = None  # answer here if confidence >= threshold; None: always answer

    def to_list(self) -> list:
        return [TIERS[self.tier], self.exit, self.threshold]

    @classmethod
    def from_list(cls, raw: list) -> Stage:
        tier, exit_index, threshold = raw
        return cls(TIERS.index(tier), int(exit_index), None if threshold is None else float(threshold))


Plan = tuple[Stage, ...]


def check_plan(plan: Plan) -> Plan:
    """Tiers never go back down, exits strictly increase, only the last stage has no threshold, and a tier
    runs only the exits its package holds (the mobile exit m, the edge m and n, the cloud all three)."""
    if not plan:
        raise ConfigError("a plan needs at least one stage")
    for a, b in zip(plan, plan[1:], strict=False):
        if b.tier < a.tier or b.exit <= a.exit:
            raise ConfigError(f"plan stages must move up: {plan_text(plan)}")
    for s in plan:
        if s.exit > s.tier and s.tier != CLOUD:
            raise ConfigError(f"the {TIERS[s.tier]} tier does not hold exit {s.exit}: {plan_text(plan)}")
    if any(s.threshold is None for s in plan[:-1]) or plan[-1].threshold is not None:
        raise ConfigError(f"every stage but the last needs a threshold: {plan_text(plan)}")
    if any(math.isnan(s.threshold) for s in plan[:-1]):  # NaN compares false: a silent "never" (inf says it)
        raise ConfigError(f"plan thresholds must be numbers, not NaN: {plan_text(plan)}")
    return plan


def plan_text(plan: Plan) -> str:
    """'mobile@m>=0.9 -> edge@n>=0.8 -> cloud@l'."""
    names = "mnl"
    return " -> ".join(f"{TIERS[s.tier]}@{names[s.exit]}" + ("" if s.threshold is None else f">={s.threshold:.4g}")
                       for s in plan)


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


def stop_stages(conf: np.ndarray, plan: Plan, rows: np.ndarray | None = None) -> np.ndarray:
    """(N,) index of the stage at which each sample stops. conf: (N, 3) every exit's confidence; rows: (N,)
    bool, the samples that take this plan (others get -1)."""
    n = len(conf)
    rows = np.ones(n, dtype=bool) if rows is None else rows
    stop = np.where(rows, len(plan) - 1, -1)
    open_ = rows.copy()
    for i, s in enumerate(plan[:-1]):
        ok = open_ & (conf[:, s.exit] >= s.threshold)
        stop[ok] = i
        open_ &= ~ok
    return stop


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
        from dimec.routing.prerouters import prerouter_from_dict

        if not isinstance(state["plans"], list) or not state["plans"]:
            raise ConfigError("a plan router needs a non-empty list of plans")
        self.plans_ = [check_plan(tuple(Stage.from_list(s) for s in p)) for p in state["plans"]]
        self.confidence_ = str(state["confidence"])
        self.prerouter_ = prerouter_from_dict(state.get("prerouter"))
