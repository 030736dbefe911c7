"""DIMEC-DC routers: nearest pool centroid in embedding space (Fixed), with the online mean update of
Algorithm 2 (Dynamic)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dimec.atomic import read_json, write_text
from dimec.costs import CostModel
from dimec.errors import ArtifactError
from dimec.outputs import ExitOutputs
from dimec.routing.base import Decisions, register
from dimec.routing.pools import PoolRouter, nearest_centroid


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
        write_text(path, json.dumps(state) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> DimecFixedRouter:
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"router file not found: {path}", "run `dimec calibrate RUN_DIR` first")
        state = read_json(path, "run `dimec calibrate RUN_DIR` again")
        from dimec.routing.base import ROUTERS

        try:
            router = ROUTERS[state["router"]](**state["params"])
            router.alpha_, router.beta_ = state["alpha"], state["beta"]
            router.expected_reward_ = state["expected_reward"]
            router.counts_ = np.asarray(state["counts"], dtype=np.int64)
            hidden = next(len(c) for c in state["centroids"] if c is not None)
            router.centroids_ = np.array([c if c is not None else [np.nan] * hidden for c in state["centroids"]],
                                         dtype=np.float64)  # (3, H)
            if router.centroids_.shape != (3, hidden):
                raise ValueError(f"centroids of shape {router.centroids_.shape}")
        except (KeyError, TypeError, ValueError, StopIteration) as exc:
            raise ArtifactError(f"{path} is not a valid router file ({type(exc).__name__}: {exc})",
                                "run `dimec calibrate RUN_DIR` again") from None
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
