"""Task metrics: accuracy always, plus the GLUE task metric (Matthews correlation for CoLA, F1 for MRPC/QQP)."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from dimec.errors import ConfigError

METRICS = ("accuracy", "mcc", "f1")


def primary_metric_name(metric: str) -> str:
    """The key of `compute_metrics`' result that a task reports first ("accuracy", "mcc" or "f1")."""
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}", f"use one of {', '.join(METRICS)}")
    return metric


def compute_metrics(labels: Any, predictions: Any, metric: str) -> dict[str, float]:
    """{"accuracy": ...} plus {"mcc": ...} or {"f1": ...} when `metric` names one.

    Accuracy and F1 lie in [0, 1], MCC in [-1, 1] (0 when undefined, e.g. a constant prediction). F1 is
    the positive class's (label 1, as GLUE reports it) for binary labels, else the macro average. No
    samples gives 0.0 for every metric rather than NaN, so results stay valid JSON.
    """
    name = primary_metric_name(metric)
    y_true = np.asarray(labels).ravel()
    y_pred = np.asarray(predictions).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{y_true.size} labels but {y_pred.size} predictions")
    if y_true.size == 0:
        return {"accuracy": 0.0} | ({} if name == "accuracy" else {name: 0.0})
    result = {"accuracy": float(accuracy_score(y_true, y_pred))}
    if name == "mcc":
        result["mcc"] = float(matthews_corrcoef(y_true, y_pred))
    elif name == "f1":
        binary = set(np.unique(np.concatenate([y_true, y_pred])).tolist()) <= {0, 1}
        result["f1"] = float(f1_score(y_true, y_pred, average="binary" if binary else "macro", zero_division=0))
    return result


# ---- calibration ----------------------------------------------------------------------------------------
def reliability_bins(probs: Any, labels: Any, bins: int = 15) -> dict[str, np.ndarray]:
    """Equal-width confidence bins over (0, 1] (bin b holds confidences in (b/bins, (b+1)/bins]; a confidence
    of exactly 0 joins the first bin). probs (N, C); labels (N,). Per bin: "count", mean "confidence" (the
    max probability) and "accuracy" (0 for an empty bin)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels).ravel()
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"probs must be (N, C) with N = {len(labels)} labels, got {probs.shape}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    return _bins(probs.max(1), (probs.argmax(1) == labels).astype(np.float64), bins)


def _bins(conf: np.ndarray, correct: np.ndarray, bins: int) -> dict[str, np.ndarray]:
    """conf (N,) confidences, correct (N,) 0/1 -> per-bin count, mean confidence, accuracy."""
    index = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)  # (N,)
    count = np.bincount(index, minlength=bins).astype(np.float64)
    safe = np.maximum(count, 1.0)
    return {"count": count, "confidence": np.bincount(index, conf, bins) / safe,
            "accuracy": np.bincount(index, correct, bins) / safe,
            "edges": np.linspace(0.0, 1.0, bins + 1)}


def expected_calibration_error(probs: Any, labels: Any, bins: int = 15) -> float:
    """ECE (Guo et al., 2017): sum over equal-width confidence bins of |B|/N * |accuracy(B) - confidence(B)|,
    in [0, 1]. No samples gives 0.0."""
    if len(np.asarray(labels).ravel()) == 0:
        return 0.0
    b = reliability_bins(probs, labels, bins)
    return float((b["count"] * np.abs(b["accuracy"] - b["confidence"])).sum() / b["count"].sum())


def ece_noise_floor(probs: Any, bins: int = 15, draws: int = 200, seed: int = 0) -> float:
    """The ECE a perfectly calibrated exit with these confidences would still show on this many samples
    (each prediction right with probability equal to its confidence; mean over `draws` simulations).
    ECE is biased upwards on small splits: a measured ECE near this floor is as calibrated as the split
    can tell."""
    conf = np.asarray(probs, dtype=np.float64).max(1)  # (N,)
    if len(conf) == 0:
        return 0.0
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        b = _bins(conf, (rng.random(len(conf)) < conf).astype(np.float64), bins)
        values.append((b["count"] * np.abs(b["accuracy"] - b["confidence"])).sum() / b["count"].sum())
    return float(np.mean(values))
