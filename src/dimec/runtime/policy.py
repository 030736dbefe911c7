"""router.json, the served policy: the one reader of the file, and what the phone needs of it without the
routing package (its plans, what their thresholds read, the pre-router, the cost model it was fitted under).

`routing.base.load_router` builds the full Router from the same file through `read_router_file`; a plan
router's state is parsed by `plans_from_state` here, the one parser of served plans.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dimec.atomic import read_json
from dimec.costs import CostModel
from dimec.errors import ArtifactError, ConfigError
from dimec.runtime.plans import CONFIDENCES, Plan, Stage, check_plan, plan_text
from dimec.runtime.prerouters import prerouter_from_dict

ROUTER_FORMAT = 2  # 1: dimec-fixed only, no cost model (dimec <= 0.1.0)
AGAIN = "run `dimec calibrate RUN_DIR` again (no retraining needed)"


def read_router_file(path: str | Path) -> dict[str, Any]:
    """The whole router.json: present, JSON, this format, with a router name, parameters and state (the cost
    model is checked by those who read it); anything else is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"router file not found: {path}", "run `dimec calibrate RUN_DIR` first")
    raw = read_json(path, AGAIN)
    if not isinstance(raw, dict) or raw.get("format_version") != ROUTER_FORMAT:
        raise ArtifactError(f"{path} was written by an older dimec (router format "
                            f"{raw.get('format_version', 1) if isinstance(raw, dict) else '?'}, "
                            f"this version reads {ROUTER_FORMAT})", AGAIN)
    missing = [k for k in ("router", "params", "state") if k not in raw]
    if missing:
        raise ArtifactError(f"{path} is damaged (no {', '.join(missing)})", AGAIN)
    return raw


def plans_from_state(state: dict[str, Any]) -> tuple[list[Plan], str, Any]:
    """(plans, confidence kind, pre-router or None) of a plan router's saved state."""
    if not isinstance(state["plans"], list) or not state["plans"]:
        raise ConfigError("a plan router needs a non-empty list of plans")
    plans = [check_plan(tuple(Stage.from_list(s) for s in p)) for p in state["plans"]]
    kind = str(state["confidence"])
    if kind not in CONFIDENCES:
        raise ConfigError(f"unknown confidence {kind!r}", f"use one of {', '.join(CONFIDENCES)}")
    return plans, kind, prerouter_from_dict(state.get("prerouter"))


def read_cost_model(path: str | Path) -> CostModel:
    """The cost model a router.json was fitted under (prices of tiers for the client's deadline rule)."""
    try:
        return CostModel.from_dict(read_router_file(path)["cost_model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path} is damaged ({type(exc).__name__}: {exc})", AGAIN) from None


@dataclass
class ServedPolicy:
    """A calibrated plan router as the phone serves it: choose a plan per sample, then the plan runs."""

    name: str
    plans_: list[Plan]
    confidence_: str
    prerouter_: Any  # None: plan 0 for every sample
    cost_model: CostModel

    @classmethod
    def read(cls, path: str | Path) -> ServedPolicy:
        raw = read_router_file(path)
        if "plans" not in raw["state"]:
            raise ConfigError(f"router {raw['router']!r} in {Path(path).parent} cannot be served (it is not a plan "
                              "router)", "calibrate a servable policy, or use --routing cloud-only")
        try:
            plans, kind, pre = plans_from_state(raw["state"])
            cost_model = CostModel.from_dict(raw["cost_model"])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ArtifactError(f"{path} is damaged ({type(exc).__name__}: {exc})", AGAIN) from None
        return cls(str(raw["router"]), plans, kind, pre, cost_model)

    def choose_plans(self, embeddings: np.ndarray, lengths: np.ndarray | None) -> np.ndarray:
        """(N, H), (N,) -> (N,) index into `plans_`."""
        pre = self.prerouter_
        return np.zeros(len(embeddings), dtype=np.int64) if pre is None else pre.choose(embeddings, lengths)

    def describe(self) -> str:
        plans = " | ".join(plan_text(p) for p in self.plans_)
        return plans if self.prerouter_ is None else f"{self.prerouter_.describe()}: {plans}"
