"""Cross-validation splits for probes: stratified, seeded train / val / test folds, and their JSON format.

Format (``splits.json``)::

    {"folds": [{"train": [ids], "val": [ids], "test": [ids]}, ...], "seed": 0, "ratios": [0.3, 0.35, 0.35],
     "stratify": "class" | "quantile bins (5)"}

Scheme (``make_splits``): the subjects are grouped into strata (classes, or quantile bins of a regression target);
each stratum is shuffled once (seeded). Fold k rotates each stratum's order by round(k * n / n_folds) positions and
cuts it into train / val / test by the ratios (rounded per stratum). So every fold is stratified and covers all ids,
and when the test ratio is 1 / n_folds (60/20/20 with 5 folds) the test sets partition the subjects exactly
(standard K-fold); with 30/35/35 each subject is tested in about 35 % of the folds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..atomic import atomic_path

PAPER_RATIOS = {"30/35/35": (0.30, 0.35, 0.35), "60/20/20": (0.60, 0.20, 0.20)}
PARTS = ("train", "val", "test")


class SplitError(ValueError):
    """Splits that cannot be made or used; the message names the file and the problem."""


def strata(labels: Sequence, task: str, n_bins: int = 5) -> tuple[np.ndarray, str]:
    """Stratum of each subject: its class (classification) or quantile bin of the target (regression)."""
    if task == "classification":
        return np.asarray([str(x) for x in labels]), "class"
    values = np.asarray(labels, dtype=np.float64)
    bins = max(1, min(n_bins, len(values) // 3))
    edges = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1])
    return np.searchsorted(edges, values, side="right").astype(str), f"quantile bins ({bins})"


def make_splits(ids: Sequence[str], labels: Sequence, task: str, *, ratios=(0.3, 0.35, 0.35), n_folds: int = 5,
                seed: int = 0) -> dict:
    """Stratified rotating splits (see the module docstring). Returns the splits.json dict."""
    ids = [str(i) for i in ids]
    ratios = tuple(float(r) for r in ratios)
    if len(ratios) != 3 or min(ratios) <= 0 or abs(sum(ratios) - 1.0) > 1e-6:
        raise SplitError(f"split ratios must be three positive fractions summing to 1, got {ratios}")
    if n_folds < 1:
        raise SplitError(f"need at least one fold, got {n_folds}")
    if len(set(ids)) != len(ids):
        raise SplitError("subject ids must be unique")
    groups, how = strata(labels, task)
    rng = np.random.default_rng(seed)
    folds = [{part: [] for part in PARTS} for _ in range(n_folds)]
    for stratum in sorted(set(groups)):
        members = [ids[i] for i in rng.permutation(np.flatnonzero(groups == stratum))]
        n = len(members)
        n_test = int(round(n * ratios[2]))
        n_val = int(round(n * ratios[1]))
        if n >= 3:  # keep every part non-empty when the stratum allows it
            n_test, n_val = max(n_test, 1), max(n_val, 1)
            n_test = min(n_test, n - 2)
            n_val = min(n_val, n - n_test - 1)
        for k, fold in enumerate(folds):
            shift = int(round(k * n / n_folds))
            order = members[shift:] + members[:shift]
            fold["test"] += order[:n_test]
            fold["val"] += order[n_test : n_test + n_val]
            fold["train"] += order[n_test + n_val :]
    for fold in folds:
        for part in PARTS:
            fold[part] = sorted(fold[part])
    return {"folds": folds, "seed": seed, "ratios": list(ratios), "stratify": how}


def save_splits(splits: dict, path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(splits, indent=1) + "\n")
    return path


def load_splits(path) -> list[dict]:
    """Read splits.json -> list of {"train", "val", "test"} id lists; checks the format and disjointness."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SplitError(f"{path}: cannot read the splits file: {err}") from None
    folds = data.get("folds") if isinstance(data, dict) else None
    if not isinstance(folds, list) or not folds:
        raise SplitError(f'{path}: expected {{"folds": [{{"train": [...], "val": [...], "test": [...]}}, ...]}}')
    out = []
    for k, fold in enumerate(folds):
        if not isinstance(fold, dict) or any(not isinstance(fold.get(p), list) for p in ("train", "test")):
            raise SplitError(f"{path}: fold {k} needs 'train' and 'test' id lists (and optionally 'val')")
        parts = {p: [str(i) for i in fold.get(p, [])] for p in PARTS}
        if not parts["train"] or not parts["test"]:
            raise SplitError(f"{path}: fold {k} has an empty train or test set")
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            both = sorted(set(parts[a]) & set(parts[b]))
            if both:
                raise SplitError(f"{path}: fold {k}: ids in both {a} and {b}: {both[:5]}")
        out.append(parts)
    return out
