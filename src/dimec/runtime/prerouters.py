"""Pre-routers: pick a plan for each sample before any transformer layer runs, from what the phone has by
then: the embedding layer's output mean-pooled over real tokens (H numbers) and the token count.

    centroid  DIMEC-DC's rule: the nearest cartography-pool mean (easy, medium, hard) picks the plan.
    learned   a multinomial logistic regression over [pooled embedding, log(tokens)], trained on the
              *training* split's cartography to predict each sample's cheapest adequate tier (the first
              exit that is right in at least `adequate` of the epochs; the cloud when none is). Two
              thresholds on its probabilities pick the plan: P(cloud) >= t_cloud -> plan 2 (straight to the
              cloud); else P(edge) + P(cloud) >= t_edge -> plan 1 (start on the edge); else plan 0.
Both read the pooled routing embedding the phone's int8 graph computes (its embedding layer only).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dimec.errors import ConfigError, DataError
from dimec.tiers import CLOUD, EDGE, TIERS


def nearest_centroid(embeddings: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(N, H), (K, H) -> (N,) index of the nearest non-empty (non-NaN) centroid (Euclidean)."""
    x = np.asarray(embeddings, dtype=np.float64)
    empty = np.isnan(centroids).any(1)  # (K,)
    c = np.where(empty[:, None], 0.0, centroids)
    d = (c * c).sum(1)[None] - 2.0 * x @ c.T  # (N, K): squared distance minus ||x||^2, the same for every k
    return np.where(empty[None], np.inf, d).argmin(1)


class CentroidPreRouter:
    """Plan `plan_of_pool[k]` for samples nearest to pool mean k. Online (DIMEC-DC Dynamic, Algorithm 2):
    each sample also moves its mean, mu_k <- (n_k mu_k + e) / (n_k + 1); `choose` moves copies (a batch
    is a stream seen once, the fitted means stay), `update` moves this pre-router's own (serving)."""

    kind = "centroid"

    def __init__(self, centroids: np.ndarray, counts: np.ndarray, plan_of_pool: tuple[int, ...] = (0, 1, 2),
                 online: bool = False) -> None:
        self.centroids = np.asarray(centroids, dtype=np.float64)  # (K, H), NaN rows for empty pools
        self.counts = np.asarray(counts, dtype=np.int64)  # (K,) samples behind each mean
        self.plan_of_pool = np.asarray(plan_of_pool, dtype=np.int64)  # (K,)
        self.online = bool(online)

    def pools(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, H) -> (N,) nearest pool per sample (for an online pre-router, in stream order)."""
        if not self.online:
            return nearest_centroid(embeddings, self.centroids)
        centroids, counts = self.centroids.copy(), self.counts.copy()
        return np.array([_assign_and_move(e, centroids, counts) for e in np.asarray(embeddings, np.float64)],
                        dtype=np.int64)

    def choose(self, embeddings: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        return self.plan_of_pool[self.pools(embeddings)]

    def update(self, embedding: np.ndarray) -> int:
        """Serving an online pre-router: the plan for one sample (H,), moving its pool mean for good."""
        return int(self.plan_of_pool[_assign_and_move(np.asarray(embedding, np.float64), self.centroids,
                                                      self.counts)])

    def describe(self) -> str:
        return "nearest pool mean" + (" (moving, Algorithm 2)" if self.online else "") + " picks the plan"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "plan_of_pool": self.plan_of_pool.tolist(), "counts": self.counts.tolist(),
                "online": self.online,
                "centroids": [None if np.isnan(c).any() else c.tolist() for c in self.centroids]}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CentroidPreRouter:
        hidden = next(len(c) for c in raw["centroids"] if c is not None)
        return cls(np.array([c if c is not None else [np.nan] * hidden for c in raw["centroids"]]),
                   raw["counts"], tuple(raw["plan_of_pool"]), raw.get("online", False))


def _assign_and_move(e: np.ndarray, centroids: np.ndarray, counts: np.ndarray) -> int:
    """Nearest mean k for one embedding (H,); moves centroids[k] towards it and counts it (in place)."""
    k = int(nearest_centroid(e[None], centroids)[0])
    centroids[k] = (counts[k] * centroids[k] + e) / (counts[k] + 1)
    counts[k] += 1
    return k


def cheapest_adequate(correctness: np.ndarray, adequate: float = 0.5) -> np.ndarray:
    """(N, 3) share of epochs each exit was right -> (N,) the first adequate tier, the cloud when none."""
    ok = correctness >= adequate
    return np.where(ok.any(1), ok.argmax(1), CLOUD)


def routing_features(embeddings: np.ndarray, lengths: np.ndarray | None) -> np.ndarray:
    """(N, H), (N,) -> (N, H + 1): the pooled embedding and log(token count)."""
    if lengths is None:
        raise DataError("the learned pre-router needs each sample's token count",
                        "recompute the run's outputs cache (delete RUN_DIR/outputs/)")
    return np.concatenate([np.asarray(embeddings, dtype=np.float64),
                           np.log(np.maximum(np.asarray(lengths, dtype=np.float64), 1.0))[:, None]], 1)


class LearnedPreRouter:
    """Logistic regression over routing features, predicting the cheapest adequate tier; thresholds on its
    probabilities choose the plan (module docstring)."""

    kind = "learned"

    def __init__(self, mean: np.ndarray, scale: np.ndarray, coef: np.ndarray, intercept: np.ndarray,
                 t_cloud: float = np.inf, t_edge: float = np.inf) -> None:
        self.mean, self.scale = np.asarray(mean, np.float64), np.asarray(scale, np.float64)  # (F,)
        self.coef, self.intercept = np.asarray(coef, np.float64), np.asarray(intercept, np.float64)  # (3, F), (3,)
        self.t_cloud, self.t_edge = float(t_cloud), float(t_edge)

    @classmethod
    def fit(cls, embeddings: np.ndarray, lengths: np.ndarray, correctness: np.ndarray, adequate: float = 0.5,
            c: float = 1.0, seed: int = 0) -> LearnedPreRouter:
        """Train on (a sample of) the training split: correctness (M, 3) from its cartography."""
        from sklearn.linear_model import LogisticRegression

        x = routing_features(embeddings, lengths)  # (M, F)
        y = cheapest_adequate(correctness, adequate)  # (M,)
        present = np.unique(y)
        if len(present) < 2:
            raise DataError(f"the training split's cartography puts every sample on the {TIERS[present[0]]} tier",
                            "the learned pre-router has nothing to learn here; use another policy")
        mean, scale = x.mean(0), x.std(0) + 1e-6
        model = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit((x - mean) / scale, y)
        coef, intercept = np.zeros((3, x.shape[1])), np.full(3, -np.inf)  # absent classes: probability 0
        if len(present) == 2:  # sklearn keeps one row for two classes: p(second) = sigmoid(row)
            coef[present[1]], intercept[present[1]] = model.coef_[0], model.intercept_[0]
            coef[present[0]], intercept[present[0]] = 0.0, 0.0
        else:
            coef[present], intercept[present] = model.coef_, model.intercept_
        return cls(mean, scale, coef, intercept)

    def probabilities(self, embeddings: np.ndarray, lengths: np.ndarray | None) -> np.ndarray:
        """(N, 3) P(cheapest adequate tier = mobile, edge, cloud)."""
        z = (routing_features(embeddings, lengths) - self.mean) / self.scale @ self.coef.T + self.intercept
        z = z - z.max(1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(1, keepdims=True)

    def with_thresholds(self, t_cloud: float, t_edge: float) -> LearnedPreRouter:
        return LearnedPreRouter(self.mean, self.scale, self.coef, self.intercept, t_cloud, t_edge)

    def plans_from(self, p: np.ndarray) -> np.ndarray:
        """(N, 3) probabilities -> (N,) plan: 2 straight to the cloud, 1 start on the edge, 0 the cascade."""
        return np.where(p[:, CLOUD] >= self.t_cloud, 2, np.where(p[:, EDGE] + p[:, CLOUD] >= self.t_edge, 1, 0))

    def choose(self, embeddings: np.ndarray, lengths: np.ndarray | None) -> np.ndarray:
        return self.plans_from(self.probabilities(embeddings, lengths))

    def describe(self) -> str:
        return f"learned pre-router (P(cloud) >= {self.t_cloud:.3g}: cloud; P(not mobile) >= {self.t_edge:.3g}: edge)"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "coef": self.coef.tolist(), "intercept": [None if np.isinf(b) else b for b in self.intercept],
                "t_cloud": None if np.isinf(self.t_cloud) else self.t_cloud,
                "t_edge": None if np.isinf(self.t_edge) else self.t_edge}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LearnedPreRouter:
        intercept = [-np.inf if b is None else b for b in raw["intercept"]]  # None: a class never seen
        t_cloud, t_edge = (np.inf if t is None else t for t in (raw["t_cloud"], raw["t_edge"]))
        return cls(raw["mean"], raw["scale"], raw["coef"], intercept, t_cloud, t_edge)


class CachedChoice:
    """A pre-router whose plans for one set of outputs (validation, while thousands of candidates sharing the
    pre-router are scored on it) are computed once; anything else is chosen afresh. Serialises as the
    pre-router itself."""

    def __init__(self, prerouter, embeddings: np.ndarray, lengths: np.ndarray | None) -> None:
        self.prerouter, self.embeddings = prerouter, embeddings
        self.plans = prerouter.choose(embeddings, lengths)

    def choose(self, embeddings: np.ndarray, lengths: np.ndarray | None) -> np.ndarray:
        return self.plans if embeddings is self.embeddings else self.prerouter.choose(embeddings, lengths)

    def describe(self) -> str:
        return self.prerouter.describe()

    def to_dict(self) -> dict[str, Any]:
        return self.prerouter.to_dict()


PREROUTERS = {CentroidPreRouter.kind: CentroidPreRouter, LearnedPreRouter.kind: LearnedPreRouter}


def prerouter_from_dict(raw: dict[str, Any] | None):
    if raw is None:
        return None
    if raw.get("kind") not in PREROUTERS:
        raise ConfigError(f"unknown pre-router kind {raw.get('kind')!r}", f"known: {', '.join(PREROUTERS)}")
    return PREROUTERS[raw["kind"]].from_dict(raw)

