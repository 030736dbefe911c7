"""embed(x) for one tokenised sample in plain numpy: the router's input at a fraction of a millisecond.

The embedding layer is a table lookup, a sum and a LayerNorm; run through torch modules one sample at a
time, call overhead dominates (about 0.7 ms against 10 ms for the whole mobile tier). This computes the
same numbers (tests/test_model.py checks it against `MultiExitModel.embed`).
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
