"""Confidence cascades: a sample answers at the first exit on its path confident enough, else moves on.

    cascade           mobile@m -> edge@n -> cloud@l   the model split across the three tiers; hidden states
                                                      move up (a threshold of +inf at n skips the edge's
                                                      answer: the AdaEE-style split mobile -> cloud)
    edge-cascade      edge@n -> cloud@l               raw input to the edge, which forwards its hidden state
    cloud-early-exit  cloud@m -> cloud@n -> cloud@l   the whole model on the cloud (DeeBERT-style)

The thresholds are either given, or chosen on validation among a grid (quantiles of each exit's validation
confidence, plus +inf: "never answer here") to meet the run's target (routing/targets.py).
"""

from __future__ import annotations

from typing import Any, ClassVar, Self

import numpy as np

from dimec.config import CalibrationConfig
from dimec.costs import CostModel
from dimec.errors import ConfigError
from dimec.outputs import ExitOutputs
from dimec.routing.base import TrainingSignal, register
from dimec.routing.plan import PlanRouter, Stage, check_plan
from dimec.routing.selection import select
from dimec.routing.targets import Target
from dimec.tiers import CLOUD, EDGE, MOBILE
from dimec.training.cartography import Cartography

NEVER = float("inf")  # a threshold no confidence reaches: the stage never answers


def threshold_grid(conf: np.ndarray, size: int) -> np.ndarray:
    """Ascending candidate thresholds for one exit: `size` quantiles of its validation confidences and +inf."""
    if size < 1:
        raise ConfigError(f"calibration.threshold_grid must be >= 1, got {size}")
    q = np.quantile(conf, np.linspace(0, 1, size + 1)[:-1]) if len(conf) else np.zeros(0)
    return np.unique(np.concatenate([q, [NEVER]]))


def target_of(calibration: CalibrationConfig) -> dict[str, Any]:
    """The target settings of a calibration section, as router parameters."""
    return {"max_loss": calibration.max_loss, "delta": calibration.delta, "budget": calibration.budget,
            "budget_cut": calibration.budget_cut, "loss": calibration.loss, "test": calibration.guarantee_test,
            "order_share": calibration.order_share, "seed": calibration.seed,
            "point_margin": calibration.point_margin, "control": calibration.control}


class TunedPlanRouter(PlanRouter):
    """A plan router whose thresholds are given, or chosen on validation to meet a target.

    Subclasses define `candidates(...)`: fixed-threshold routers of their own kind. `fit` with thresholds
    None picks among them with `selection.select`; the choice and the grid's figures are kept in
    `selection_` (not persisted: `state()` holds what serving needs)."""

    confidences_of: ClassVar[tuple[str, ...]] = ("max_prob",)

    def __init__(self, thresholds: tuple[float, ...] | None = None, confidence: str = "max_prob",
                 target: dict[str, Any] | None = None, grid_size: int = 20) -> None:
        self.thresholds = None if thresholds is None else tuple(thresholds)
        self.confidence = confidence
        self.target = target
        self.grid_size = grid_size

    @classmethod
    def from_config(cls, calibration: CalibrationConfig, seed: int | None = None, **params) -> Self:
        return cls(target=target_of(calibration), grid_size=calibration.threshold_grid, **params)

    def checked_target(self) -> Target:
        """The `target` parameter as a checked Target (a method, not learned state: no trailing underscore)."""
        return Target(**(self.target or {})).check()

    def fixed(self, thresholds: tuple[float, ...], confidence: str, prerouter=None) -> Self:
        """A fitted copy with these thresholds (a candidate): this router's parameters (`get_params`, so a
        subclass's own parameters come along), with the thresholds and confidence replaced."""
        router = type(self)(**{**self.get_params(), "thresholds": tuple(thresholds), "confidence": confidence})
        router.set_thresholds(thresholds, confidence, prerouter)
        return router

    def set_thresholds(self, thresholds: tuple[float, ...], confidence: str, prerouter=None) -> None:
        raise NotImplementedError

    def candidates(self, val: ExitOutputs, cost_model: CostModel, cartography: Cartography | None,
                   train: TrainingSignal | None) -> list[Self]:
        raise NotImplementedError

    def prepare(self, val: ExitOutputs, cost_model: CostModel, cartography: Cartography | None,
                train: TrainingSignal | None) -> None:
        """Fit what the candidates share (a pre-router) before `candidates` is called."""

    def kinds(self, val: ExitOutputs) -> tuple[str, ...]:
        """Confidence measures worth trying: for two classes entropy orders samples as max-prob does."""
        return ("max_prob", "entropy") if val.num_classes > 2 else ("max_prob",)

    def fit(self, val: ExitOutputs, cost_model: CostModel, cartography: Cartography | None = None,
            train: TrainingSignal | None = None) -> Self:
        if self.thresholds is not None:
            self.set_thresholds(self.thresholds, self.confidence)
            return self
        from dimec.routing.baselines import CloudOnlyRouter  # the fallback that always meets a loss target

        def build(outputs: ExitOutputs, carto: Cartography | None) -> list[tuple[str, PlanRouter]]:
            self.prepare(outputs, cost_model, carto, train)
            return [(self.name, c) for c in self.candidates(outputs, cost_model, carto, train)] + \
                [("cloud-only", CloudOnlyRouter())]

        candidates, selection = select(build, val, cartography, cost_model, self.checked_target())
        if selection.index is None:
            raise ConfigError(f"no {self.name} configuration meets the target ({self.checked_target().describe()})",
                              "raise the budget; no policy is cheaper than mobile-only")
        self.selection_ = selection
        self.adopt(candidates[selection.index][1])
        return self


class _PathRouter(TunedPlanRouter):
    """One path of (tier, exit) stages; one threshold per stage but the last."""

    path: ClassVar[tuple[tuple[int, int], ...]]

    def set_thresholds(self, thresholds: tuple[float, ...], confidence: str, prerouter=None) -> None:
        if len(thresholds) != len(self.path) - 1:
            raise ConfigError(f"{self.name} takes {len(self.path) - 1} thresholds, got {len(thresholds)}")
        stages = [Stage(t, e, float(th)) for (t, e), th in zip(self.path, thresholds, strict=False)]
        self.plans_ = [check_plan((*stages, Stage(*self.path[-1])))]
        self.confidence_, self.prerouter_ = confidence, None

    def candidates(self, val: ExitOutputs, cost_model: CostModel, cartography: Cartography | None,
                   train: TrainingSignal | None) -> list[Self]:
        out = []
        for kind in self.kinds(val):
            conf = val.confidences(kind)
            grids = [threshold_grid(conf[:, e], self.grid_size) for _, e in self.path[:-1]]
            for values in np.array(np.meshgrid(*grids, indexing="ij")).reshape(len(grids), -1).T:
                out.append(self.fixed(tuple(float(v) for v in values), kind))
        return out


@register("cascade")
class CascadeRouter(_PathRouter):
    """mobile@m -> edge@n -> cloud@l: the mobile answers if confident, else the edge continues from its
    hidden state, else the cloud continues from the edge's."""

    path = ((MOBILE, 0), (EDGE, 1), (CLOUD, 2))


@register("edge-cascade")
class EdgeCascadeRouter(_PathRouter):
    """edge@n -> cloud@l: raw input to the edge; the cloud continues when the edge is unsure."""

    path = ((EDGE, 1), (CLOUD, 2))


@register("cloud-early-exit")
class CloudEarlyExitRouter(_PathRouter):
    """cloud@m -> cloud@n -> cloud@l: DeeBERT's deployment (the whole model on the cloud), with exits
    chosen to meet the target instead of DeeBERT's reward."""

    path = ((CLOUD, 0), (CLOUD, 1), (CLOUD, 2))
