"""Cross-validated probing on saved latents: read features / labels / splits, fit per fold, aggregate.

Features file (``features.npz``, written by ``probe.py extract``): one array per subject id, (D,) or (K, D) for K
protocol draws. For fitting, the K draws of a subject are **averaged** into one (D,) latent (so a subject is one
sample in every fold and cannot leak between train and test). Labels: a CSV with a ``subject_id`` column and the
target column. Regression metrics are in the target's units (``standardize_target`` z-scores the target with the
training fold's mean / std first, as the paper does for age and ADAS-Cog).
"""

from __future__ import annotations

import csv
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import metrics as pm
from .probes import fit_probe

TASKS = ("regression", "classification")


class ProbeDataError(ValueError):
    """Features, labels or splits that do not fit together; the message names the file and the ids."""


def load_features(path) -> dict[str, np.ndarray]:
    """{subject id: (K, D) float64}; (D,) arrays become (1, D). Checks one D for all and finite values."""
    path = Path(path)
    if path.is_file() and not zipfile.is_zipfile(path):
        raise ProbeDataError(f"{path}: not a features .npz (a zip of one array per subject, as probe.py extract writes)")
    try:
        with np.load(path, allow_pickle=False) as data:
            features = {key: np.asarray(data[key], dtype=np.float64) for key in data.files}
    except (OSError, ValueError) as err:
        raise ProbeDataError(f"{path}: cannot read the features file (.npz of one array per subject): {err}") from None
    if not features:
        raise ProbeDataError(f"{path}: no subjects in the features file")
    dims = {}
    for key, value in features.items():
        if value.ndim == 1:
            value = features[key] = value[None]
        if value.ndim != 2 or value.shape[0] < 1:
            raise ProbeDataError(f"{path}: subject {key!r} has features of shape {value.shape}; expected (D,) or (K, D)")
        if not np.all(np.isfinite(value)):
            raise ProbeDataError(f"{path}: subject {key!r} has NaN/inf features")
        dims.setdefault(value.shape[1], []).append(key)
    if len(dims) > 1:
        detail = "; ".join(f"D={d}: {ids[:3]}{' ...' if len(ids) > 3 else ''}" for d, ids in dims.items())
        raise ProbeDataError(f"{path}: subjects have different feature dimensions ({detail})")
    return features


def load_labels(path, target: str) -> dict[str, str]:
    """{subject id: raw label text} from the CSV columns ``subject_id`` and ``target``."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ProbeDataError(f"{path}: cannot read the labels CSV: {err}") from None
    for needed in ("subject_id", target):
        if needed not in columns:
            raise ProbeDataError(f"{path}: no column {needed!r} (columns: {', '.join(columns)})")
    labels = {}
    for row in rows:
        sid = (row["subject_id"] or "").strip()
        if sid in labels:
            raise ProbeDataError(f"{path}: subject {sid!r} appears twice")
        labels[sid] = (row[target] or "").strip()
    return labels


def is_missing(text: str) -> bool:
    """True for an empty / NA / NaN label."""
    if text.lower() in ("", "nan", "na", "n/a", "none", "null"):
        return True
    try:
        return math.isnan(float(text))
    except ValueError:
        return False


def _class_order(values) -> list[str]:
    """Sorted class names (numerically when every name is a number)."""
    unique = sorted(set(values))
    try:
        return sorted(unique, key=float)
    except ValueError:
        return unique


@dataclass
class ProbeData:
    """Subjects with features and labels. X (N, D) mean over draws; y (N,) float or class index; classes."""

    ids: list[str]
    X: np.ndarray
    y: np.ndarray
    classes: list[str] | None

    def rows(self, ids) -> np.ndarray:
        position = {s: i for i, s in enumerate(self.ids)}
        return np.array([position[s] for s in ids], dtype=np.int64)


def build_data(features: dict, labels: dict, ids, task: str, *, features_path="features", labels_path="labels") -> ProbeData:
    """Checks that every id has features and a (non-missing) label; averages draws; encodes the target."""
    if task not in TASKS:
        raise ProbeDataError(f"task must be one of {TASKS}, got {task!r}")
    ids = list(dict.fromkeys(ids))
    no_features = [s for s in ids if s not in features]
    no_label = [s for s in ids if s not in labels]
    if no_features:
        raise ProbeDataError(f"{features_path}: no features for subjects {no_features[:10]}{' ...' if len(no_features) > 10 else ''}")
    if no_label:
        raise ProbeDataError(f"{labels_path}: no label for subjects {no_label[:10]}{' ...' if len(no_label) > 10 else ''}")
    missing = [s for s in ids if is_missing(labels[s])]
    if missing:
        raise ProbeDataError(f"{labels_path}: missing/NaN labels for subjects {missing[:10]}; drop them from the splits")
    X = np.stack([features[s].mean(axis=0) for s in ids])
    raw = [labels[s] for s in ids]
    if task == "regression":
        try:
            y = np.array([float(v) for v in raw])
        except ValueError as err:
            raise ProbeDataError(f"{labels_path}: a regression target must be numeric: {err}") from None
        return ProbeData(ids, X, y, None)
    classes = _class_order(raw)
    return ProbeData(ids, X, np.array([classes.index(v) for v in raw], dtype=np.int64), classes)


def split_ids(folds: list[dict]) -> list[str]:
    return list(dict.fromkeys(s for fold in folds for part in ("train", "val", "test") for s in fold.get(part, [])))


def check_folds(folds: list[dict], data: ProbeData, task: str, splits_path="splits") -> None:
    """Raise for a fold whose train or test set holds a single class (classification)."""
    if task != "classification":
        return
    for k, fold in enumerate(folds):
        for part in ("train", "test"):
            present = np.unique(data.y[data.rows(fold[part])])
            if len(present) < 2:
                names = [data.classes[i] for i in present]
                raise ProbeDataError(
                    f"{splits_path}: fold {k} {part} set has a single class {names}; every fold needs both classes "
                    "(use stratified splits)"
                )


def fold_metrics(task: str, y_true, prediction) -> dict:
    return pm.regression_metrics(y_true, prediction) if task == "regression" else pm.classification_metrics(y_true, prediction)


def standardised(data: ProbeData, train_rows, standardize_target: bool) -> np.ndarray:
    """The target, z-scored with the train rows' statistics when asked (regression only)."""
    if not standardize_target or data.classes is not None:
        return data.y
    mean, std = data.y[train_rows].mean(), data.y[train_rows].std() or 1.0
    return (data.y - mean) / std


def cross_validate(data: ProbeData, folds: list[dict], task: str, probe: str, *, class_weight=None, seed: int = 0,
                   alpha="auto", standardize_target: bool = False, test_data: ProbeData | None = None) -> dict:
    """Fit ``probe`` on each fold's train ids (val ids for model selection) and score it on the test ids.

    test_data: score on these features instead (same ids; the protocol-invariance test). Returns
    {"folds": [metrics], "mean", "std", "predictions": [rows], "fitted": [model per fold]}.
    """
    n_classes = 1 if data.classes is None else len(data.classes)
    per_fold, predictions, fitted = [], [], []
    for k, fold in enumerate(folds):
        train, val, test = (data.rows(fold[p]) for p in ("train", "val", "test"))
        y = standardised(data, train, standardize_target)
        model = fit_probe(probe, data.X[train], y[train], task, n_classes=n_classes, X_val=data.X[val] if len(val) else None,
                          y_val=y[val] if len(val) else None, class_weight=class_weight, seed=seed + k, alpha=alpha)
        source = test_data if test_data is not None else data
        test_rows = source.rows(fold["test"])
        y_test = standardised(source, source.rows(fold["train"]), standardize_target) if test_data is not None else y
        prediction = model.predict(source.X[test_rows])
        per_fold.append(fold_metrics(task, y_test[test_rows], prediction))
        fitted.append(model)
        for sid, truth, pred in zip(fold["test"], y_test[test_rows], prediction):
            row = {"fold": k, "subject_id": sid}
            if task == "regression":
                row.update(true=float(truth), predicted=float(pred))
            else:
                row.update(true=data.classes[int(truth)], predicted=data.classes[int(np.argmax(pred))])
                row.update({f"p_{c}": float(p) for c, p in zip(data.classes, pred)})
            predictions.append(row)
    mean, std = pm.aggregate(per_fold)
    return {"folds": per_fold, "mean": mean, "std": std, "predictions": predictions, "fitted": fitted}
