"""Probe metrics in plain NumPy (tested against scipy / scikit-learn).

Regression: ``pearson_r``, ``mse``, ``mae``. Classification (fractions in [0, 1]): ``accuracy``,
``balanced_accuracy`` (mean recall over the classes present in y_true), ``auroc`` (rank / Mann-Whitney form, ties
averaged; multi-class = macro one-vs-rest), ``auprc`` (average precision, sum_n (R_n - R_{n-1}) P_n over the
distinct score thresholds; multi-class = macro one-vs-rest). Undefined values (a constant prediction for r, a single
class for AUROC / AUPRC) are None.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

REGRESSION_METRICS = ("pearson_r", "mse", "mae")
CLASSIFICATION_METRICS = ("accuracy", "balanced_accuracy", "auroc", "auprc")


def pearson_r(y_true, y_pred) -> float | None:
    a = np.asarray(y_true, dtype=np.float64) - np.mean(y_true)
    b = np.asarray(y_pred, dtype=np.float64) - np.mean(y_pred)
    denominator = np.sqrt((a @ a) * (b @ b))
    return float(a @ b / denominator) if denominator > 0 else None


def mse(y_true, y_pred) -> float:
    return float(np.mean((np.asarray(y_true, np.float64) - np.asarray(y_pred, np.float64)) ** 2))


def mae(y_true, y_pred) -> float:
    return float(np.mean(np.abs(np.asarray(y_true, np.float64) - np.asarray(y_pred, np.float64))))


def accuracy(y_true, y_pred) -> float:
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def balanced_accuracy(y_true, y_pred) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]))


def binary_auroc(positive, score) -> float | None:
    """AUROC of scores for a boolean ``positive`` array: P(score_pos > score_neg) + 0.5 P(tie)."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(np.asarray(score, dtype=np.float64))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_average_precision(positive, score) -> float | None:
    """Average precision: sum over distinct thresholds (high to low) of (recall step) x precision."""
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    if n_pos == 0 or n_pos == len(positive):
        return None
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="mergesort")
    score_sorted, hits = np.asarray(score, np.float64)[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(score_sorted)), len(score_sorted) - 1]  # last index of each threshold
    tp = np.cumsum(hits)[last]
    precision = tp / (last + 1)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _one_vs_rest(fn, y_true: np.ndarray, proba: np.ndarray) -> float | None:
    """Binary score (K = 2: the second class's probability) or the macro mean over classes (K > 2)."""
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim == 1 or proba.shape[1] == 2:
        return fn(y_true == 1, proba if proba.ndim == 1 else proba[:, 1])
    values = [fn(y_true == c, proba[:, c]) for c in range(proba.shape[1])]
    return None if any(v is None for v in values) else float(np.mean(values))


def auroc(y_true, proba) -> float | None:
    """y_true (N,) class indices 0..K-1; proba (N, K) or (N,) = P(class 1)."""
    return _one_vs_rest(binary_auroc, np.asarray(y_true), proba)


def auprc(y_true, proba) -> float | None:
    return _one_vs_rest(binary_average_precision, np.asarray(y_true), proba)


def regression_metrics(y_true, y_pred) -> dict:
    return {"pearson_r": pearson_r(y_true, y_pred), "mse": mse(y_true, y_pred), "mae": mae(y_true, y_pred)}


def classification_metrics(y_true, proba) -> dict:
    """y_true (N,) class indices; proba (N, K) class probabilities (prediction = argmax)."""
    proba = np.asarray(proba, dtype=np.float64)
    y_pred = proba.argmax(axis=1)
    return {
        "accuracy": accuracy(y_true, y_pred),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred),
        "auroc": auroc(y_true, proba),
        "auprc": auprc(y_true, proba),
    }


def aggregate(folds: list[dict]) -> tuple[dict, dict]:
    """Mean and population std over folds of each metric (None values skipped; None when none is left)."""
    keys = list(dict.fromkeys(k for fold in folds for k in fold))
    mean, std = {}, {}
    for key in keys:
        values = [f[key] for f in folds if f.get(key) is not None]
        mean[key] = float(np.mean(values)) if values else None
        std[key] = float(np.std(values)) if values else None
    return mean, std
