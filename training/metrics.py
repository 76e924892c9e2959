"""Classification and language-modelling metrics in plain numpy (no extra dependency)."""

from __future__ import annotations

import math

import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts[true, predicted]."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels.astype(np.int64), preds.astype(np.int64)), 1)
    return matrix


def classification_metrics(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> dict:
    """Accuracy, macro F1 (over classes present in labels or predictions) and the confusion matrix."""
    matrix = confusion_matrix(labels, preds, num_classes)
    tp = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    present = denom > 0
    return {
        "accuracy": float(tp.sum() / max(len(labels), 1)),
        "f1_macro": float(f1[present].mean()) if present.any() else 0.0,
        "confusion_matrix": matrix.tolist(),
    }


def perplexity(mean_loss: float) -> float:
    """exp(mean token cross-entropy), inf on overflow."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return float("inf")
