"""embed(x) and the Fixed routing decision for one tokenised sample in plain numpy.

The embedding layer is a table lookup, a sum and a LayerNorm; run through torch modules one sample at a
time, call overhead dominates (about 0.7 ms against 3 ms for the whole mobile tier). `NumpyEmbedder`
computes the same numbers (tests/test_model.py checks it against `MultiExitModel.embed`); `FastRouter`
goes further and folds the LayerNorm's affine part, the mean pooling and the nearest-centroid search into
one (T, H) x (H, 3) product, so the routing decision costs well under 1% of the mobile tier.
"""

from __future__ import annotations

import numpy as np

from dimec.modeling import hf_adapter


class NumpyEmbedder:
    def __init__(self, model) -> None:
        t = hf_adapter.embedding_tables(model.encoder)
        self.word = t["word"].numpy().astype(np.float32)  # (V, H)
        self.position = t["position"].numpy().astype(np.float32)  # (P, H)
        self.token_type = None if t["token_type"] is None else t["token_type"].numpy().astype(np.float32)
        self.weight, self.bias = t["norm_weight"].numpy(), t["norm_bias"].numpy()  # (H,)
        self.eps, self.offset = t["eps"], t["position_offset"]

    def __call__(self, input_ids, token_type_ids=None) -> np.ndarray:
        """One unpadded sample's token ids (T,) -> pooled embedding (H,)."""
        ids = np.asarray(input_ids)
        x = self.word[ids] + self.position[self.offset : self.offset + len(ids)]  # (T, H)
        if self.token_type is not None:
            x = x + (self.token_type[0] if token_type_ids is None else self.token_type[np.asarray(token_type_ids)])
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        x = (x - mu) / np.sqrt(var + self.eps) * self.weight + self.bias
        return x.mean(0)


class FastRouter:
    """Nearest pool centroid of embed(x) for one tokenised sample, without forming embed(x).

    With LayerNorm weight g and bias b, embed(x) = g * z + b where z = mean_t (x_t - mu_t) / sigma_t. So
        ||embed(x) - c_k||^2 = ||g * z||^2 + 2 z . a_k + d_k,   a_k = g * (b - c_k),  d_k = ||b - c_k||^2,
    and the first term is the same for every k: the tier is argmin_k (2 z . a_k + d_k), where
        z . a_k = mean_t (x_t . a_k - mu_t * sum(a_k)) / sigma_t.
    Same decisions as `DimecFixedRouter.predict_tiers(embed(x))` (up to float rounding on exact ties).
    An empty pool (NaN centroid) gets d_k = inf and is never chosen.
    """

    def __init__(self, embedder: NumpyEmbedder, centroids: np.ndarray) -> None:
        centroids = np.asarray(centroids, dtype=np.float64)  # (K, H), NaN rows for empty pools
        g, b = embedder.weight.astype(np.float64), embedder.bias.astype(np.float64)
        empty = np.isnan(centroids).any(1)
        diff = np.where(empty[:, None], 0.0, b - centroids)  # (K, H)
        self.a = np.ascontiguousarray((g * diff).T, dtype=np.float32)  # (H, K)
        self.a_sum = self.a.sum(0)  # (K,)
        self.d = np.where(empty, np.inf, (diff**2).sum(1))  # (K,)
        type0 = 0.0 if embedder.token_type is None else embedder.token_type[0]
        self.base = embedder.word + type0  # (V, H): word + segment-A embedding, one lookup per token
        self.type_delta = None if embedder.token_type is None else embedder.token_type - embedder.token_type[0]
        self.position = embedder.position[embedder.offset :]  # (P, H)
        self.eps, self.hidden = embedder.eps, self.base.shape[1]

    def __call__(self, input_ids, token_type_ids=None) -> int:
        """One unpadded sample's token ids (T,) -> tier index."""
        ids = np.asarray(input_ids)
        x = self.base[ids]  # (T, H), a fresh copy
        x += self.position[: len(ids)]
        if token_type_ids is not None and self.type_delta is not None:
            types = np.asarray(token_type_ids)
            if types.any():  # sentence pairs: segment-B tokens
                x += self.type_delta[types]
        mu = x.mean(1)  # (T,)
        inv_sigma = 1.0 / np.sqrt(np.einsum("th,th->t", x, x) / self.hidden - mu * mu + self.eps)  # (T,)
        proj = x @ self.a - mu[:, None] * self.a_sum  # (T, K)
        z_dot_a = inv_sigma @ proj / len(ids)  # (K,)
        return int(np.argmin(2.0 * z_dot_a + self.d))
