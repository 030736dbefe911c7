"""DIMEC-DC routers, exactly as published: nearest pool centroid in embedding space (Fixed), with the online
mean update of Algorithm 2 (Dynamic). As plans: pool k answers on tier k at its exit, no verification."""

from __future__ import annotations

from typing import Self

import numpy as np

from dimec.costs import CostModel
from dimec.outputs import ExitOutputs
from dimec.routing.base import TrainingSignal, register
from dimec.routing.plan import PlanRouter, Stage
from dimec.routing.pools import PoolRouter
from dimec.runtime.prerouters import CentroidPreRouter
from dimec.tiers import TIERS
from dimec.training.cartography import Cartography

TIER_PLANS = [(Stage(k, k),) for k in range(len(TIERS))]  # plan k: answer on tier k at its own exit


@register("dimec-fixed")
class DimecFixedRouter(PoolRouter, PlanRouter):
    """Ours-F: each test sample goes to the tier of its nearest pool mean; the means never move."""

    def fit(self, val: ExitOutputs, cost_model: CostModel, cartography: Cartography | None = None,
            train: TrainingSignal | None = None) -> Self:
        super().fit(val, cost_model, cartography, train)
        self.plans_, self.confidence_ = list(TIER_PLANS), "max_prob"
        self.prerouter_ = CentroidPreRouter(self.centroids_, self.counts_, online=self.online)
        return self

    def predict_tiers(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, H) -> (N,) the tier of each sample (pool k -> tier k)."""
        self.check_fitted()
        return self.prerouter_.pools(embeddings)

    # ---- persistence (router.json, through dimec.routing.base.save_router / load_router) -------------
    def state(self) -> dict:
        return {**super().state(), "alpha": self.alpha_, "beta": self.beta_,
                "expected_reward": self.expected_reward_}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.alpha_, self.beta_ = float(state["alpha"]), float(state["beta"])
        self.expected_reward_ = float(state["expected_reward"])
        self.centroids_, self.counts_ = self.prerouter_.centroids, self.prerouter_.counts


@register("dimec-dynamic")
class DimecDynamicRouter(DimecFixedRouter):
    """Ours-D (Algorithm 2): assign to the nearest mean, then move that mean towards the sample:
    mu_k <- (n_k * mu_k + e) / (n_k + 1), n_k <- n_k + 1. The stream is seen once, in order; routing a
    batch moves copies of the means (the fitted ones stay), `update` moves the router's own (serving)."""

    online = True

    @classmethod
    def from_fixed(cls, fixed: DimecFixedRouter) -> DimecDynamicRouter:
        """A Dynamic router starting from a fitted Fixed router's pools (same parameters, copied state)."""
        dynamic = cls(**fixed.get_params())
        state = fixed.state()
        dynamic.load_state({**state, "prerouter": {**state["prerouter"], "online": True}})
        return dynamic

    def update(self, embedding: np.ndarray) -> int:
        """Serving path: route one sample and keep the moved mean (state persists across calls)."""
        self.check_fitted()
        return self.prerouter_.update(embedding)
