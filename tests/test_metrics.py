"""compute_metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dimec.errors import ConfigError
from dimec.metrics import compute_metrics, primary_metric_name

# TP=3 (idx 0, 2, 6), FN=1 (1), FP=2 (4, 7), TN=2 (3, 5)
LABELS = [1, 1, 1, 0, 0, 0, 1, 0]
PREDS = [1, 0, 1, 0, 1, 0, 1, 1]


def test_accuracy_only_for_accuracy_tasks():
    assert compute_metrics(LABELS, PREDS, "accuracy") == {"accuracy": 5 / 8}


def test_f1_is_positive_class_f1():
    precision, recall = 3 / 5, 3 / 4
    result = compute_metrics(LABELS, PREDS, "f1")
    assert set(result) == {"accuracy", "f1"}
    assert result["f1"] == pytest.approx(2 * precision * recall / (precision + recall))  # = 2/3
    assert result["f1"] == pytest.approx(2 / 3)


def test_mcc_matches_formula():
    tp, tn, fp, fn = 3, 2, 2, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    result = compute_metrics(np.array(LABELS), np.array(PREDS), "mcc")
    assert set(result) == {"accuracy", "mcc"}
    assert result["mcc"] == pytest.approx(expected)  # 4 / sqrt(240) = 0.258...
    assert result["accuracy"] == pytest.approx(5 / 8)


def test_mcc_extremes_and_degenerate():
    y = [0, 1, 0, 1]
    assert compute_metrics(y, y, "mcc")["mcc"] == pytest.approx(1.0)
    assert compute_metrics(y, [1, 0, 1, 0], "mcc")["mcc"] == pytest.approx(-1.0)
    assert compute_metrics(y, [1, 1, 1, 1], "mcc")["mcc"] == 0.0  # constant prediction: undefined -> 0


def test_f1_multiclass_is_macro():
    # class 0: P=1, R=1/2 -> 2/3; class 1: P=1/2, R=1 -> 2/3; class 2: perfect -> 1
    result = compute_metrics([0, 0, 1, 2], [0, 1, 1, 2], "f1")
    assert result["f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_values_are_python_floats_in_range():
    result = compute_metrics(np.array([[0], [1], [1]]), np.array([0, 0, 1]), "f1")
    assert all(type(v) is float and 0.0 <= v <= 1.0 for v in result.values())


def test_empty_input_gives_zeros_not_nan():
    assert compute_metrics([], [], "mcc") == {"accuracy": 0.0, "mcc": 0.0}


def test_errors():
    with pytest.raises(ConfigError, match="unknown metric 'auc'"):
        compute_metrics(LABELS, PREDS, "auc")
    with pytest.raises(ValueError, match="8 labels but 2 predictions"):
        compute_metrics(LABELS, [0, 1], "accuracy")


def test_primary_metric_name():
    assert [primary_metric_name(m) for m in ("accuracy", "mcc", "f1")] == ["accuracy", "mcc", "f1"]
    with pytest.raises(ConfigError):
        primary_metric_name("loss")
