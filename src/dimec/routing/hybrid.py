"""Hybrid policies: a pre-router decides first, before any layer runs; what it does not send straight to the
cloud enters a cascade that verifies each early answer by its exit's confidence.

    plan 0  mobile@m -> edge@n -> cloud@l     (the cascade)
    plan 1  edge@n -> cloud@l                 (raw input to the edge; the mobile skipped)
    plan 2  cloud@l                           (raw input straight to the cloud: no wasted mobile layers,
                                               no hidden-state hop)

hybrid-centroid  DIMEC-DC's pools pick the plan (easy -> 0, medium -> 1, hard -> 2): "DIMEC-DC plus
                 verification".
hybrid-learned   the learned pre-router (routing/prerouters.py), trained on the training split's
                 cartography, picks it with two thresholds on its probabilities.
The cascade thresholds (and the learned pre-router's) are chosen on validation to meet the target.
"""

from __future__ import annotations

from typing import Any, Self

import numpy as np

from dimec.config import CalibrationConfig
from dimec.costs import CostModel
from dimec.errors import ConfigError
from dimec.outputs import ExitOutputs
from dimec.routing.base import TrainingSignal, register
from dimec.routing.cascade import TunedPlanRouter, target_of, threshold_grid
from dimec.routing.plan import Stage, check_plan
from dimec.routing.pools import PoolRouter, pool_params_of
from dimec.runtime.prerouters import CachedChoice, CentroidPreRouter, LearnedPreRouter
from dimec.tiers import CLOUD, EDGE, MOBILE
from dimec.training.cartography import Cartography


def hybrid_plans(t_m: float, t_n: float) -> list:
    return [check_plan((Stage(MOBILE, 0, t_m), Stage(EDGE, 1, t_n), Stage(CLOUD, 2))),
            check_plan((Stage(EDGE, 1, t_n), Stage(CLOUD, 2))),
            check_plan((Stage(CLOUD, 2),))]


class _Hybrid(TunedPlanRouter):
    """thresholds: (t_m, t_n) of the cascade, then the pre-router's own (if any)."""

    def fit_prerouter(self, val: ExitOutputs, cost_model: CostModel, cartography: Cartography | None,
                      train: TrainingSignal | None):
        raise NotImplementedError

    def prerouter_grid(self, prerouter, val: ExitOutputs) -> list[tuple[tuple[float, ...], Any]]:
        """(pre-router thresholds, pre-router with them) pairs to try. Default: the pre-router as it is
        (its choice on validation computed once for all the cascade thresholds)."""
        return [((), CachedChoice(prerouter, val.embeddings, val.lengths))]

    def set_thresholds(self, thresholds: tuple[float, ...], confidence: str, prerouter=None) -> None:
        self.plans_ = hybrid_plans(float(thresholds[0]), float(thresholds[1]))
        self.confidence_, self.prerouter_ = confidence, prerouter

    def prepare(self, val: ExitOutputs, cost_model: CostModel, cartography: Cartography | None,
                train: TrainingSignal | None) -> None:
        self.fitted_prerouter_ = self.fit_prerouter(val, cost_model, cartography, train)

    def fit(self, val: ExitOutputs, cost_model: CostModel, cartography: Cartography | None = None,
            train: TrainingSignal | None = None) -> Self:
        if self.thresholds is not None:
            self.prepare(val, cost_model, cartography, train)
            pre = self.with_thresholds(self.fitted_prerouter_, tuple(self.thresholds[2:]))
            self.set_thresholds(self.thresholds, self.confidence, pre)
        else:
            super().fit(val, cost_model, cartography, train)
        self.prerouter_ = getattr(self.prerouter_, "prerouter", self.prerouter_)  # drop a validation cache
        return self

    def with_thresholds(self, prerouter, thresholds: tuple[float, ...]):
        return prerouter

    def candidates(self, val: ExitOutputs, cost_model: CostModel, cartography: Cartography | None,
                   train: TrainingSignal | None) -> list[Self]:
        out = []
        for kind in self.kinds(val):
            conf = val.confidences(kind)
            g_m, g_n = threshold_grid(conf[:, 0], self.grid_size), threshold_grid(conf[:, 1], self.grid_size)
            for pre_t, pre in self.prerouter_grid(self.fitted_prerouter_, val):
                for t_m in g_m:
                    for t_n in g_n:
                        out.append(self.fixed((float(t_m), float(t_n), *pre_t), kind, pre))
        return out


@register("hybrid-centroid")
class HybridCentroidRouter(_Hybrid):
    """DIMEC-DC's pools pick the plan; the cascade verifies the early answers."""

    def __init__(self, thresholds: tuple[float, ...] | None = None, confidence: str = "max_prob",
                 target: dict[str, Any] | None = None, grid_size: int = 20,
                 pool_params: dict[str, Any] | None = None) -> None:
        super().__init__(thresholds, confidence, target, grid_size)
        self.pool_params = pool_params

    @classmethod
    def from_config(cls, calibration: CalibrationConfig, seed: int | None = None, **params) -> Self:
        return cls(target=target_of(calibration), grid_size=calibration.threshold_grid,
                   pool_params=pool_params_of(calibration), **params)

    def fit_prerouter(self, val, cost_model, cartography, train):
        if cartography is None:
            raise ConfigError("hybrid-centroid needs the validation cartography to build DIMEC-DC's pools")
        pools = _Pools(**(self.pool_params or {})).fit(val, cost_model, cartography)
        return CentroidPreRouter(pools.centroids_, pools.counts_)


class _Pools(PoolRouter):
    """DIMEC-DC's calibration (reward-searched thresholds, pools, centroids) without a routing rule."""

    name = "pools"

    def route(self, outputs, cost_model):  # pragma: no cover - never routes
        raise NotImplementedError


@register("hybrid-learned")
class HybridLearnedRouter(_Hybrid):
    """The learned pre-router picks the plan; the cascade verifies the early answers."""

    seed_matters = False  # its logistic regression (lbfgs) is deterministic: every seed gives the same router

    def __init__(self, thresholds: tuple[float, ...] | None = None, confidence: str = "max_prob",
                 target: dict[str, Any] | None = None, grid_size: int = 20, adequate: float = 0.5,
                 prerouter_grid_size: int = 6, seed: int = 0) -> None:
        super().__init__(thresholds, confidence, target, grid_size)
        self.adequate = adequate
        self.prerouter_grid_size = prerouter_grid_size
        self.seed = seed

    @classmethod
    def from_config(cls, calibration: CalibrationConfig, seed: int | None = None, **params) -> Self:
        return cls(target=target_of(calibration), grid_size=max(2, calibration.threshold_grid // 2),
                   adequate=calibration.prerouter_adequate, seed=calibration.seed if seed is None else seed,
                   **params)

    def fit_prerouter(self, val, cost_model, cartography, train):
        if train is None:
            raise ConfigError("hybrid-learned needs the training split's dynamics to learn its pre-router",
                              "train with train.train_dynamics_samples != 0, or choose another policy")
        return LearnedPreRouter.fit(train.embeddings, train.lengths, train.cartography.correctness,
                                    self.adequate, seed=self.seed)

    def with_thresholds(self, prerouter, thresholds):
        return prerouter.with_thresholds(*thresholds)

    def prerouter_grid(self, prerouter: LearnedPreRouter, val: ExitOutputs):
        p = prerouter.probabilities(val.embeddings, val.lengths)  # (N, 3), computed once for every candidate
        g_c = threshold_grid(p[:, CLOUD], self.prerouter_grid_size)
        g_e = threshold_grid(p[:, EDGE] + p[:, CLOUD], self.prerouter_grid_size)
        out = []
        for t_c in g_c:
            for t_e in g_e:
                pre = _ChosenOnce(prerouter.with_thresholds(t_c, t_e), val, p)
                out.append(((float(t_c), float(t_e)), pre))
        return out


class _ChosenOnce(CachedChoice):
    """A learned pre-router with thresholds, its validation probabilities computed once for every pair."""

    def __init__(self, prerouter: LearnedPreRouter, val: ExitOutputs, probs: np.ndarray) -> None:
        self.prerouter, self.embeddings, self.plans = prerouter, val.embeddings, prerouter.plans_from(probs)
