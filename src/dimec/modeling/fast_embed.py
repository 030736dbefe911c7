"""embed(x) and the Fixed routing decision for one tokenised sample in plain numpy.

The embedding layer is a table lookup, a sum and a LayerNorm; run through torch modules one sample at a
time, call overhead dominates (about 0.7 ms against 3 ms for the whole mobile tier). `NumpyEmbedder`
computes the same numbers (tests/test_model.py checks it against `MultiExitModel.embed`); `FastRouter`
goes further and tabulates everything the nearest-centroid decision needs per token id and position, so
the routing decision costs under 1% of the mobile tier.

Not on the served path: the phone routes with the int8 graph's routing-embedding session and the served
policy's pre-router (runtime/policy.py). This module is the reference `benchmarks/bench_core.py` times a
DIMEC-DC decision against (what a table-based decision on the phone would cost).
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
    """Nearest pool centroid of embed(x) for one tokenised sample, from precomputed tables.

    With LayerNorm weight g and bias b, embed(x) = g * z + b where z = mean_t (x_t - mu_t) / sigma_t. So
        ||embed(x) - c_k||^2 = ||g * z||^2 + 2 z . a_k + d_k,   a_k = g * (b - c_k),  d_k = ||b - c_k||^2,
    and the first term is the same for every k. With a'_k = a_k - sum(a_k) / H (so x . a'_k = x . a_k -
    mu * sum(a_k)) the tier is
        argmin_k  sum_t x_t . a'_k / sigma_t  +  T * d_k / 2.
    A token's x_t = w_id + p_t (+ a segment embedding) enters only through mean(x_t), mean(x_t^2) and
    x_t . a'_k, and each splits into a per-id part, a per-position part and, for mean(x_t^2), the cross
    term 2 w_id . p_t / H. All are tabulated here, so routing one sample is a few gathers and a handful
    of numpy calls over (T, 2 + K) numbers instead of (T, H) arithmetic.
    Same decisions as `DimecFixedRouter.predict_tiers(embed(x))` (up to float rounding on exact ties).
    An empty pool (NaN centroid) gets d_k = inf and is never chosen. Tables: (V, max_tokens) float32 for
    the cross term (15 MiB for a 30k vocabulary at 128 tokens) plus (V, 2 + K) float64.
    """

    def __init__(self, embedder: NumpyEmbedder, centroids: np.ndarray, max_tokens: int = 128) -> None:
        centroids = np.asarray(centroids, dtype=np.float64)  # (K, H), NaN rows for empty pools
        g, b = embedder.weight.astype(np.float64), embedder.bias.astype(np.float64)
        empty = np.isnan(centroids).any(1)
        diff = np.where(empty[:, None], 0.0, b - centroids)  # (K, H)
        hidden = diff.shape[1]
        a = (g * diff).T  # (H, K)
        a_centred = a - a.sum(0) / hidden  # (H, K): x . a'_k = x . a_k - mean(x) * sum(a_k)
        self.half_d = np.where(empty, np.inf, (diff**2).sum(1) / 2)  # (K,)
        self.max_tokens = min(max_tokens, len(embedder.position) - embedder.offset)
        types = embedder.token_type  # (J, H) or None; segment A (type 0) is folded into the word table
        w = embedder.word + (0.0 if types is None else types[0])  # (V, H) float32
        p = embedder.position[embedder.offset : embedder.offset + self.max_tokens]  # (T_max, H)

        def features(x: np.ndarray) -> np.ndarray:  # (N, H) -> (N, 2 + K): mean x, mean x^2, x . a'_k
            x = x.astype(np.float64)
            return np.concatenate([x.mean(1, keepdims=True), (x * x).mean(1, keepdims=True), x @ a_centred], 1)

        self.by_id, self.by_position = features(w), features(p)  # (V, 2 + K), (T_max, 2 + K)
        self.cross = (2.0 / hidden * (w @ p.T)).ravel()  # (V * T_max,) float32: 2 w_id . p_t / H
        self.positions = np.arange(self.max_tokens)
        self.by_type = None
        if types is not None and len(types) > 1:  # segment j adds delta_j = type_j - type_0 to every x_t
            delta = (types - types[0]).astype(np.float64)  # (J, H)
            self.by_type = features(delta)  # (J, 2 + K)
            self.id_type = 2.0 / hidden * (w.astype(np.float64) @ delta.T)  # (V, J): 2 w_id . delta_j / H
            self.position_type = 2.0 / hidden * (p.astype(np.float64) @ delta.T)  # (T_max, J)
        self.eps = embedder.eps

    def __call__(self, input_ids, token_type_ids=None) -> int:
        """One unpadded sample's token ids (T,) -> tier index."""
        ids = np.asarray(input_ids)
        n = len(ids)
        if n > self.max_tokens:
            raise ValueError(f"{n} tokens, FastRouter was built for at most {self.max_tokens} (max_tokens)")
        f = self.by_id[ids] + self.by_position[:n]  # (T, 2 + K): mean x, mean x^2 (no cross term), x . a'_k
        f[:, 1] += self.cross[ids * self.max_tokens + self.positions[:n]]
        if token_type_ids is not None and self.by_type is not None:
            types = np.asarray(token_type_ids)
            if types.any():  # sentence pairs: segment-B tokens
                f += self.by_type[types]
                f[:, 1] += self.id_type[ids, types] + self.position_type[self.positions[:n], types]
        inv_sigma = (f[:, 1] - f[:, 0] ** 2 + self.eps) ** -0.5  # (T,)
        return int(np.argmin(inv_sigma @ f[:, 2:] + n * self.half_d))
