"""Temperature scaling (Guo et al., 2017): one temperature per exit, fitted on the validation split by
negative log-likelihood, so that each exit's softmax(logits / T) is a calibrated confidence.

A temperature never changes an exit's prediction (argmax), only how sure it says it is; every threshold
that reads a confidence (the reward search, the confidence and entropy baselines, the serving tiers) then
reads a calibrated one. Fitted once, at the end of training, on the kept model; saved in its
dimec_model.json.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

from dimec.metrics import expected_calibration_error
from dimec.outputs import ExitOutputs, softmax

LOG_T_BOUNDS = (np.log(0.05), np.log(20.0))  # T in [0.05, 20]: far beyond what a fine-tuned exit needs
ECE_BINS = 15


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / T). logits (N, C), labels (N,)."""
    z = np.asarray(logits, dtype=np.float64) / temperature  # (N, C)
    return float((logsumexp(z, axis=1) - z[np.arange(len(z)), labels]).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising the NLL (a one-dimensional convex problem in 1/T; bounded search over log T)."""
    if len(labels) == 0:
        return 1.0
    labels = np.asarray(labels, dtype=np.int64)
    result = minimize_scalar(lambda log_t: nll(logits, labels, float(np.exp(log_t))), bounds=LOG_T_BOUNDS,
                             method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))


def fit_temperatures(outputs: ExitOutputs) -> np.ndarray:
    """(3,) one temperature per exit, from the raw logits of `outputs` (its own temperatures are ignored)."""
    return np.array([fit_temperature(outputs.logits[:, k], outputs.labels) for k in range(3)])


def calibration_report(outputs: ExitOutputs, temperatures: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Per exit: temperature, ECE and NLL before (T = 1) and after scaling, on `outputs`' samples."""
    before = softmax(outputs.logits.astype(np.float64))  # (N, 3, C)
    after = softmax(outputs.logits.astype(np.float64) / np.asarray(temperatures)[None, :, None])
    y = outputs.labels
    return {
        "temperatures": [round(float(t), 4) for t in temperatures],
        "ece_before": [expected_calibration_error(before[:, k], y, bins) for k in range(3)],
        "ece_after": [expected_calibration_error(after[:, k], y, bins) for k in range(3)],
        "nll_before": [nll(outputs.logits[:, k], y) for k in range(3)],
        "nll_after": [nll(outputs.logits[:, k], y, float(temperatures[k])) for k in range(3)],
        "samples": len(outputs), "bins": bins,
    }
