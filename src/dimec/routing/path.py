"""The calibrated path: the configurations calibration admitted, ordered safest first, ending at its choice.

Live control (serving/live/controller.py) moves the served policy along this path when the live loss drifts,
and never off it. What "admitted" means follows the target's mode:

    point       every candidate whose validation loss (+ margin) meets the target
    probability the configurations Learn-then-Test certified
    expected    the configurations conformal risk control admitted
    budget      only the choice (a budget states no loss to keep, so there is nothing to control)

Among the admitted, the path keeps the (loss, cost) Pareto front no cheaper than the choice, from cloud-only
(always admissible: its loss is 0) to the choice, thinned to at most MAX_STEPS entries spread evenly in validation
disagreement (the quantity watched live): the controller moves one step per decision, and a front of twenty
near-identical thresholds would make it walk twenty times to get anywhere. Each entry holds the plan-router
state to serve and its validation disagreement and accuracy loss (the live budgets are computed from them).
"""

from __future__ import annotations

import numpy as np

from dimec.costs import CostModel
from dimec.outputs import ExitOutputs
from dimec.routing.plan import PlanRouter
from dimec.routing.selection import Selection, candidate_losses
from dimec.routing.targets import Target, pareto_order

MAX_STEPS = 6


def _admitted(candidates, selection: Selection, target: Target) -> list[int]:
    s = selection.scores
    if target.budgeted:
        return []
    if target.guaranteed or target.expected:
        ok = {t["describe"] for t in (selection.guarantee or {}).get("tested", [])
              if t.get("p_value", 2.0) <= (target.delta or 0) or t.get("adjusted_risk_pt", np.inf) <= target.max_loss}
        return [j for j, (_, r) in enumerate(candidates) if r.describe() in ok]
    return [int(j) for j in np.flatnonzero(s.loss_pt + target.point_margin * s.loss_se_pt <= target.max_loss + 1e-9)]


def calibrated_path(candidates: list[tuple[str, PlanRouter]], selection: Selection, target: Target,
                    val: ExitOutputs, cost_model: CostModel, max_steps: int = MAX_STEPS) -> list[dict]:
    """Entries (safest first, the choice last): family, describe, state, validation figures."""
    if selection.index is None:
        return []
    chosen = selection.index
    s = selection.scores
    safe = [j for j, (f, _) in enumerate(candidates) if f == "cloud-only"]
    pool = sorted(set(_admitted(candidates, selection, target)) | set(safe[:1]) | {chosen})
    pool = [j for j in pool if s.cost[j] >= s.cost[chosen] - 1e-12]
    front = [pool[i] for i in pareto_order(s.loss_pt[pool], s.cost[pool])]
    front = [j for j in front if j != chosen] + [chosen]  # the choice ends the path, whatever ties ordered
    if safe and safe[0] not in front:
        front = [safe[0], *front]
    out = []
    for j in front:
        family, router = candidates[j]
        dis = candidate_losses(router, val, cost_model, "disagreement")
        acc = candidate_losses(router, val, cost_model, "accuracy")
        out.append({"family": family, "describe": router.describe(), "state": PlanRouter.state(router),
                    "val_disagreement_pt": 100 * float(dis[0].mean()), "val_accuracy_loss_pt": 100 * float(acc[0].mean()),
                    "val_cost": float(acc[1].mean())})
    return thin(out, max_steps)


def thin(path: list[dict], max_steps: int) -> list[dict]:
    """At most max_steps entries: the first and the last, and between them those nearest to evenly spaced
    levels of validation disagreement (each entry once, path order kept)."""
    if len(path) <= max_steps or max_steps < 2:
        return path
    dis = np.array([e["val_disagreement_pt"] for e in path])
    keep = {0, len(path) - 1}
    inner = np.arange(1, len(path) - 1)
    for level in np.linspace(dis[0], dis[-1], max_steps)[1:-1]:
        free = [i for i in inner if i not in keep]
        if free:
            keep.add(min(free, key=lambda i: (abs(dis[i] - level), i)))
    return [path[i] for i in sorted(keep)]
