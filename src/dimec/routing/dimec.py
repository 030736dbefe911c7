"""DIMEC-DC routers: nearest pool centroid in embedding space (Fixed), with the online mean update of
Algorithm 2 (Dynamic)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Self

import numpy as np

from dimec.config import CalibrationConfig
from dimec.costs import CostModel
from dimec.errors import ArtifactError, ConfigError
from dimec.routing.base import Decisions, ExitOutputs, Router, register
from dimec.routing.pools import assign_pools, search_thresholds
from dimec.training.cartography import Cartography

_DEFAULT = CalibrationConfig()


class PoolRouter(Router):
    """Shared calibration: thresholds by reward search, pools of validation embeddings, their centroids."""

    def __init__(
        self,
        alpha_grid: tuple[float, ...] = _DEFAULT.alpha_grid,
        beta_grid: tuple[float, ...] = _DEFAULT.beta_grid,
        medium_rule: str = _DEFAULT.medium_rule,
        cartography_exit: str = _DEFAULT.cartography_exit,
    ) -> None:
        self.alpha_grid = tuple(alpha_grid)
        self.beta_grid = tuple(beta_grid)
        self.medium_rule = medium_rule
        self.cartography_exit = cartography_exit

    def fit(self, val: ExitOutputs, cost_model: CostModel, cartography: Cartography | None = None) -> Self:
        if cartography is None:
            raise ConfigError(f"router {self.name!r} needs the validation cartography to fit")
        confidence, variability = cartography.exit(self.cartography_exit)
        search = search_thresholds(
            confidence, variability, val.max_probs, cost_model, self.alpha_grid, self.beta_grid, self.medium_rule
        )
        self.alpha_, self.beta_, self.expected_reward_ = search.alpha, search.beta, search.reward
        self.reward_grid_ = search.grid
        self.pools_ = assign_pools(confidence, variability, self.alpha_, self.beta_, self.medium_rule)  # (N,)
        self.pool_embeddings_ = val.embeddings.astype(np.float64)  # (N, H)
        self.counts_ = np.bincount(self.pools_, minlength=3).astype(np.int64)  # (3,)
        hidden = val.embeddings.shape[1]
        self.centroids_ = np.full((3, hidden), np.nan)  # an empty pool keeps NaN and is never chosen
        for k in range(3):
            if self.counts_[k]:
                self.centroids_[k] = self.pool_embeddings_[self.pools_ == k].mean(0)
        return self

    @property
    def pool_shares_(self) -> np.ndarray:
        return self.counts_ / max(1, self.counts_.sum())


def nearest_centroid(embeddings: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(N, H), (3, H) -> (N,) index of the nearest non-empty centroid (Euclidean)."""
    d = ((embeddings[:, None, :] - centroids[None]) ** 2).sum(-1)  # (N, 3)
    return np.where(np.isnan(d), np.inf, d).argmin(1)


@register("dimec-fixed")
class DimecFixedRouter(PoolRouter):
    """Ours-F: each test sample goes to the tier of its nearest pool mean; the means never move."""

    def predict_tiers(self, embeddings: np.ndarray) -> np.ndarray:
        self.check_fitted()
        return nearest_centroid(np.asarray(embeddings, dtype=np.float64), self.centroids_)

    def route(self, outputs: ExitOutputs, cost_model: CostModel) -> Decisions:
        return Decisions.from_tiers(self.predict_tiers(outputs.embeddings), cost_model)

    # ---- persistence (JSON beside the model) ---------------------------------------------------------
    def save(self, path: str | Path) -> None:
        self.check_fitted()
        state = {
            "router": self.name,
            "params": {k: list(v) if isinstance(v, tuple) else v for k, v in self.get_params().items()},
            "alpha": self.alpha_, "beta": self.beta_, "expected_reward": self.expected_reward_,
            "counts": self.counts_.tolist(),
            "centroids": [None if np.isnan(c).any() else c.tolist() for c in self.centroids_],
        }
        Path(path).write_text(json.dumps(state) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> DimecFixedRouter:
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"router file not found: {path}", "run `dimec calibrate RUN_DIR` first")
        state = json.loads(path.read_text())
        from dimec.routing.base import ROUTERS

        router = ROUTERS[state["router"]](**state["params"])
        router.alpha_, router.beta_ = state["alpha"], state["beta"]
        router.expected_reward_ = state["expected_reward"]
        router.counts_ = np.asarray(state["counts"], dtype=np.int64)
        hidden = next(len(c) for c in state["centroids"] if c is not None)
        router.centroids_ = np.array([c if c is not None else [np.nan] * hidden for c in state["centroids"]])
        return router


@register("dimec-dynamic")
class DimecDynamicRouter(DimecFixedRouter):
    """Ours-D (Algorithm 2): assign to the nearest mean, then move that mean towards the sample:
    mu_k <- (n_k * mu_k + e) / (n_k + 1), n_k <- n_k + 1. The stream is seen once, in order."""

    online = True

    def predict_tiers(self, embeddings: np.ndarray) -> np.ndarray:
        self.check_fitted()
        centroids, counts = self.centroids_.copy(), self.counts_.copy()
        tiers = np.empty(len(embeddings), dtype=np.int64)
        for i, e in enumerate(np.asarray(embeddings, dtype=np.float64)):
            k = int(nearest_centroid(e[None], centroids)[0])
            centroids[k] = (counts[k] * centroids[k] + e) / (counts[k] + 1)
            counts[k] += 1
            tiers[i] = k
        return tiers

    def update(self, embedding: np.ndarray) -> int:
        """Serving path: route one sample and keep the moved mean (state persists across calls)."""
        self.check_fitted()
        e = np.asarray(embedding, dtype=np.float64)
        k = int(nearest_centroid(e[None], self.centroids_)[0])
        self.centroids_[k] = (self.counts_[k] * self.centroids_[k] + e) / (self.counts_[k] + 1)
        self.counts_[k] += 1
        return k
