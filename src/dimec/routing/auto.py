"""auto: every servable policy fitted on validation, the cheapest that meets the target kept.

The candidates are every configuration of every family below: the confidence cascades (including the
AdaEE-style split and DeeBERT's cloud early exit, with thresholds from the grid), the hybrids (DIMEC-DC's
pools or the learned pre-router in front of the cascade), DIMEC-DC Fixed and Dynamic as published, and the
single tiers. One selection (routing/selection.py) runs over all of them at once, so a guarantee covers the
choice of family too. The report (`summary_`) gives each family's best configuration under the same rule,
so metrics.json can say which won and by how much.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, fields
from typing import Any, Self

import numpy as np

from dimec.config import CalibrationConfig
from dimec.costs import CostModel
from dimec.errors import DimecError
from dimec.outputs import ExitOutputs
from dimec.routing.base import ROUTERS, TrainingSignal, register
from dimec.routing.cascade import TunedPlanRouter, target_of
from dimec.routing.path import calibrated_path
from dimec.routing.plan import PlanRouter
from dimec.routing.selection import select, what_the_data_can_carry
from dimec.routing.targets import Target, select_budget, select_point
from dimec.training.cartography import Cartography

FAMILIES = ("cascade", "edge-cascade", "cloud-early-exit", "hybrid-centroid", "hybrid-learned",
            "dimec-fixed", "dimec-dynamic", "mobile-only", "edge-only", "cloud-only")


@register("auto")
class AutoRouter(PlanRouter):
    def __init__(self, families: tuple[str, ...] = FAMILIES, calibration: dict[str, Any] | None = None) -> None:
        self.families = tuple(families)
        self.calibration = calibration

    @classmethod
    def from_config(cls, calibration: CalibrationConfig, seed: int | None = None, **params) -> Self:
        return cls(calibration=asdict(calibration), **params)

    def calibration_config(self) -> CalibrationConfig:
        """The `calibration` parameter (a dict, as saved in router.json) as a CalibrationConfig."""
        known = {f.name for f in fields(CalibrationConfig)}
        raw = {k: tuple(v) if isinstance(v, list) else v for k, v in (self.calibration or {}).items() if k in known}
        return CalibrationConfig(**raw)

    def candidates(self, val: ExitOutputs, cost_model: CostModel, cartography: Cartography | None,
                   train: TrainingSignal | None) -> tuple[list[tuple[str, PlanRouter]], dict[str, str]]:
        """(family, fitted candidate) pairs, and the families that could not be fitted here, with why."""
        cal = self.calibration_config()
        out, skipped = [], {}
        for family in self.families:
            router = ROUTERS[family].from_config(cal)
            try:
                if isinstance(router, TunedPlanRouter):
                    router.prepare(val, cost_model, cartography, train)
                    out += [(family, c) for c in router.candidates(val, cost_model, cartography, train)]
                else:
                    out.append((family, router.fit(val, cost_model, cartography, train)))
            except DimecError as exc:  # e.g. no training dynamics for the learned pre-router
                skipped[family] = exc.message
        return out, skipped

    def fit(self, val: ExitOutputs, cost_model: CostModel, cartography: Cartography | None = None,
            train: TrainingSignal | None = None) -> Self:
        target = Target(**target_of(self.calibration_config())).check()
        skipped: dict[str, str] = {}
        built: dict[bytes, list[tuple[str, PlanRouter]]] = {}

        def build(outputs: ExitOutputs, carto: Cartography | None) -> list[tuple[str, PlanRouter]]:
            # The capacity report and the selection build on the same rows (all, or the same ordering part):
            # the same rows give the same fitted candidates, so each set of rows is built once.
            key = hashlib.sha256(outputs.logits.tobytes() + outputs.labels.tobytes()).digest()
            if key not in built:
                built[key], why = self.candidates(outputs, cost_model, carto, train)
                skipped.update(why)
            return built[key]

        self.capacity_ = None if target.budgeted else what_the_data_can_carry(build, val, cartography, cost_model,
                                                                              target, target.delta or 0.1)
        candidates, selection = select(build, val, cartography, cost_model, target)
        if selection.index is None:
            raise DimecError(f"no policy meets the target ({target.describe()}) on validation",
                             "raise the budget: no policy is cheaper than mobile-only")
        winner_family, winner = candidates[selection.index]
        self.adopt(winner)
        self.prerouter_ = getattr(self.prerouter_, "prerouter", self.prerouter_)  # drop a validation cache
        self.winner_, self.how_, self.selection_ = winner_family, selection.how, selection
        self.summary_ = self._summary(candidates, selection, target, cost_model, skipped)
        self.path_ = calibrated_path(candidates, selection, target, val, cost_model)  # for live control
        return self

    @staticmethod
    def _summary(candidates, selection, target: Target, cost_model: CostModel, skipped: dict[str, str]) -> list[dict]:
        """Each family's best configuration under the target's rule (point or budget; with a guarantee,
        whether it was certified), on validation."""
        s = selection.scores
        certified = {t["describe"] for t in (selection.guarantee or {}).get("tested", [])
                     if t.get("p_value", 2.0) <= (target.delta or 0)
                     or t.get("adjusted_risk_pt", np.inf) <= (target.max_loss or 0)}
        rows = []
        for family in dict.fromkeys(f for f, _ in candidates):
            idx = np.flatnonzero(np.array(s.family) == family)
            if target.budgeted:
                j = select_budget(s.loss_pt[idx], s.cost[idx], target.cost_cap(cost_model.cloud_only))
            else:
                j = select_point(s.loss_pt[idx] + target.point_margin * s.loss_se_pt[idx], s.cost[idx],
                                 target.max_loss)
            row = {"family": family, "candidates": len(idx), "meets_target": j is not None,
                   "chosen": selection.index is not None and candidates[selection.index][0] == family}
            if j is not None:
                best = idx[j]
                row |= {"val_loss_pt": float(s.loss_pt[best]), "val_cost": float(s.cost[best]),
                        "val_cost_change_pct": cost_model.relative_change(float(s.cost[best])),
                        "describe": candidates[best][1].describe()}
                if target.guaranteed or target.expected:
                    row["certified"] = row["describe"] in certified or family == "cloud-only"
            rows.append(row)
        rows += [{"family": f, "skipped": why} for f, why in skipped.items()]
        return rows

    def state(self) -> dict:
        return {**super().state(), "winner": self.winner_, "how": self.how_, "summary": self.summary_,
                "capacity": self.capacity_, "path": self.path_}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.winner_, self.how_, self.summary_ = state["winner"], state["how"], state["summary"]
        self.capacity_ = state.get("capacity")
        self.path_ = state.get("path") or []
