"""Plan data and the one stop rule, torch-free: what the phone, the servers, `dimec route` and the offline
evaluation all read.

A plan is a sequence of stages (routing/plan.py explains the shapes and prices them). A sample runs the
stages in order and stops at the first one whose exit's confidence clears the stage's threshold; the last
stage (threshold None) always answers. `stops` is that rule for the samples at one stage (the executor and
every tier use it); `stop_stages` applies it to cached confidences of every exit at once (offline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dimec.errors import ConfigError
from dimec.tiers import CLOUD, TIERS

CONFIDENCES = ("max_prob", "entropy")


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.exp(logits - logits.max(axis, keepdims=True))
    return z / z.sum(axis, keepdims=True)


def confidence(probs: np.ndarray, kind: str = "max_prob") -> np.ndarray:
    """(..., C) -> (...): max-probability, or minus the entropy (so that higher is always more confident)."""
    if kind == "max_prob":
        return probs.max(-1)
    if kind == "entropy":
        return (probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(-1)
    raise ConfigError(f"unknown confidence {kind!r}", f"use one of {', '.join(CONFIDENCES)}")


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
        try:  # a stored threshold: a number (inf: never answer here), or null for the last stage
            value = None if threshold is None else float(threshold)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"a plan threshold must be a number or null, got {ascii(threshold)[:40]}") from None
        return cls(TIERS.index(tier), int(exit_index), value)


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


def own_plan(tier: int) -> Plan:
    """The one-stage plan of a tier answering at its own exit (a plain request to that tier)."""
    return (Stage(tier, tier),)


# ---- the stop rule ------------------------------------------------------------------------------------------
def clears(conf: np.ndarray, threshold: float) -> np.ndarray:
    """The comparison at the heart of every plan: a confidence that reaches the threshold answers."""
    return conf >= threshold


def stops(probs: np.ndarray, stage: Stage, kind: str) -> np.ndarray:
    """(R,) bool: which of R samples whose exit gave `probs` (R, C) stop at `stage` (the last stage: all)."""
    if stage.threshold is None:
        return np.ones(len(probs), dtype=bool)
    return clears(confidence(probs, kind), stage.threshold)


def stop_stages(conf: np.ndarray, plan: Plan, rows: np.ndarray | None = None) -> np.ndarray:
    """(N,) index of the stage at which each sample stops, from cached confidences (offline). conf: (N, 3)
    every exit's confidence; rows: (N,) bool, the samples that take this plan (others get -1)."""
    n = len(conf)
    rows = np.ones(n, dtype=bool) if rows is None else rows
    stop = np.where(rows, len(plan) - 1, -1)
    open_ = rows.copy()
    for i, s in enumerate(plan[:-1]):
        ok = open_ & clears(conf[:, s.exit], s.threshold)
        stop[ok] = i
        open_ &= ~ok
    return stop
