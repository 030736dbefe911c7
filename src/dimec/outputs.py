"""ExitOutputs: what every router may look at for N samples, computed once by the model and cached in a
run directory (`outputs/{split}.safetensors`). Training writes it, routing reads it: it lives below both.

The cache holds raw logits; the probabilities every router reads are `softmax(logits / T_k)` with one
temperature per exit (1 = uncalibrated), so confidences can be re-calibrated without running the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from dimec.atomic import write_with
from dimec.errors import ArtifactError, ConfigError
from dimec.runtime.plans import CONFIDENCES, confidence, softmax  # noqa: F401  (one definition; re-exported)

FORMAT_VERSION = 2  # 1: probabilities only (no logits, no lengths); read as stale and recomputed
@dataclass(eq=False)
class ExitOutputs:
    """Everything a router may look at for N samples, computed once by the model."""

    logits: np.ndarray  # (N, 3, C) raw logits at exits m, n, l
    labels: np.ndarray  # (N,) true labels (int)
    embeddings: np.ndarray  # (N, H) embedding-layer output pooled over real tokens
    lengths: np.ndarray | None = None  # (N,) real tokens per sample, special tokens included
    temperatures: np.ndarray = field(default_factory=lambda: np.ones(3))  # (3,) per exit

    def __post_init__(self) -> None:
        self.logits = np.asarray(self.logits, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.embeddings = np.asarray(self.embeddings, dtype=np.float32)
        self.temperatures = np.asarray(self.temperatures, dtype=np.float64).reshape(3)
        if self.lengths is not None:
            self.lengths = np.asarray(self.lengths, dtype=np.int64)
        n = len(self.labels)
        if self.logits.ndim != 3 or self.logits.shape[1] != 3 or len(self.logits) != n:
            raise ValueError(f"logits must be (N, 3, C) with N = {n} labels, got {self.logits.shape}")
        if self.embeddings.ndim != 2 or len(self.embeddings) != n:
            raise ValueError(f"embeddings must be (N, H) with N = {n}, got {self.embeddings.shape}")
        if self.lengths is not None and self.lengths.shape != (n,):
            raise ValueError(f"lengths must be (N,) with N = {n}, got {self.lengths.shape}")
        if not (self.temperatures > 0).all():
            raise ValueError(f"temperatures must be > 0, got {self.temperatures.tolist()}")

    @classmethod
    def from_probs(cls, probs: np.ndarray, labels: np.ndarray, embeddings: np.ndarray,
                   lengths: np.ndarray | None = None) -> ExitOutputs:
        """From probabilities (N, 3, C), e.g. hand-made ones in tests: logits = log(probs), temperature 1."""
        return cls(np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)), labels, embeddings, lengths)

    def __len__(self) -> int:
        return len(self.labels)

    @cached_property
    def probs(self) -> np.ndarray:  # (N, 3, C) softmax(logits / T) per exit
        return softmax(self.logits.astype(np.float64) / self.temperatures[None, :, None])

    @property
    def num_classes(self) -> int:
        return self.logits.shape[2]

    @cached_property
    def predictions(self) -> np.ndarray:  # (N, 3); a temperature never changes an argmax
        return self.logits.argmax(-1)

    @property
    def max_probs(self) -> np.ndarray:  # (N, 3) confidence of each exit in its own prediction
        return self.probs.max(-1)

    @cached_property
    def correct(self) -> np.ndarray:  # (N, 3) bool
        return self.predictions == self.labels[:, None]

    def losses_against_last_exit(self, loss: str = "accuracy") -> np.ndarray:
        """(N, 3) int8: what answering at exit k loses against the last exit (cloud-only), per sample:
        "accuracy" 1[last right] - 1[k right] in {-1, 0, 1}; "disagreement" 1[k's answer != last's]."""
        cache = self.__dict__.setdefault("_losses", {})
        if loss not in cache:
            if loss == "accuracy":
                cache[loss] = self.correct[:, -1:].astype(np.int8) - self.correct.astype(np.int8)
            elif loss == "disagreement":
                cache[loss] = (self.predictions != self.predictions[:, -1:]).astype(np.int8)
            else:
                raise ConfigError(f"unknown loss {loss!r}", "use accuracy or disagreement")
        return cache[loss]

    def confidences(self, kind: str = "max_prob") -> np.ndarray:
        """(N, 3) each exit's confidence in its own prediction (computed once per kind)."""
        cache = self.__dict__.setdefault("_confidences", {})
        if kind not in cache:
            cache[kind] = confidence(self.probs, kind)
        return cache[kind]

    def with_temperatures(self, temperatures) -> ExitOutputs:
        return ExitOutputs(self.logits, self.labels, self.embeddings, self.lengths, temperatures)

    @classmethod
    def concat(cls, parts: list[ExitOutputs]) -> ExitOutputs:
        """The samples of several outputs (of one model: same temperatures) in order."""
        lengths = None if any(p.lengths is None for p in parts) else np.concatenate([p.lengths for p in parts])
        return cls(np.concatenate([p.logits for p in parts]), np.concatenate([p.labels for p in parts]),
                   np.concatenate([p.embeddings for p in parts]), lengths, parts[0].temperatures)

    def subset(self, index: np.ndarray) -> ExitOutputs:
        lengths = None if self.lengths is None else self.lengths[index]
        return ExitOutputs(self.logits[index], self.labels[index], self.embeddings[index], lengths,
                           self.temperatures)

    # ---- the cache file ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Written to a temporary file and renamed: a crash never leaves half a cache behind."""
        tensors = {"logits": self.logits, "labels": self.labels, "embeddings": self.embeddings,
                   "temperatures": self.temperatures}
        if self.lengths is not None:
            tensors["lengths"] = self.lengths
        write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format_version": str(FORMAT_VERSION)}))

    @classmethod
    def load(cls, path: str | Path) -> ExitOutputs:
        """A damaged, truncated or outdated file is an ArtifactError naming it (callers that own a cache
        recompute it instead)."""
        path = Path(path)
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "np") as f:
                version = (f.metadata() or {}).get("format_version")
            if version != str(FORMAT_VERSION):
                raise ValueError(f"cache format {version}, expected {FORMAT_VERSION}")
            return cls(tensors["logits"], tensors["labels"], tensors["embeddings"], tensors.get("lengths"),
                       tensors["temperatures"])
        except (OSError, SafetensorError, KeyError, ValueError) as exc:
            raise ArtifactError(f"{path} is not a valid exit-outputs cache ({exc})",
                                "delete it; the next stage recomputes it from the model") from None
