"""ExitOutputs: what every router may look at for N samples, computed once by the model and cached in a
run directory (`outputs/{split}.safetensors`). Training writes it, routing reads it: it lives below both."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file


@dataclass
class ExitOutputs:
    """Everything a router may look at for N samples, computed once by the model."""

    probs: np.ndarray  # (N, 3, C) softmax at exits m, n, l
    labels: np.ndarray  # (N,) true labels (int)
    embeddings: np.ndarray  # (N, H) embedding-layer output pooled over real tokens

    def __post_init__(self) -> None:
        assert self.probs.ndim == 3 and self.probs.shape[1] == 3, self.probs.shape
        assert len(self.labels) == len(self.probs) == len(self.embeddings)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def predictions(self) -> np.ndarray:  # (N, 3)
        return self.probs.argmax(-1)

    @property
    def max_probs(self) -> np.ndarray:  # (N, 3) confidence of each exit in its own prediction
        return self.probs.max(-1)

    @property
    def correct(self) -> np.ndarray:  # (N, 3) bool
        return self.predictions == self.labels[:, None]

    def subset(self, index: np.ndarray) -> ExitOutputs:
        return ExitOutputs(self.probs[index], self.labels[index], self.embeddings[index])

    def save(self, path: str | Path) -> None:
        save_file(
            {"probs": self.probs.astype(np.float32), "labels": self.labels.astype(np.int64),
             "embeddings": self.embeddings.astype(np.float32)},
            str(path),
        )

    @classmethod
    def load(cls, path: str | Path) -> ExitOutputs:
        t = load_file(str(path))
        return cls(t["probs"], t["labels"], t["embeddings"])
