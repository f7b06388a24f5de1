"""Probe figures: a 2-D embedding of the latents coloured by a label, and per-fold metrics (Agg, no pyplot)."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import numpy as np


def pca_2d(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """X (N, D) -> (N, 2) scores on the first two principal components of the standardised features, and the
    explained-variance fractions (2,)."""
    X = np.asarray(X, dtype=np.float64)
    std = X.std(axis=0)
    Z = (X - X.mean(axis=0)) / np.where(std > 0, std, 1.0)
    U, S, _ = np.linalg.svd(Z, full_matrices=False)
    scores = U[:, :2] * S[:2]
    if scores.shape[1] < 2:
        scores = np.pad(scores, ((0, 0), (0, 2 - scores.shape[1])))
    total = float((S**2).sum()) or 1.0
    explained = np.pad(S[:2] ** 2 / total, (0, max(0, 2 - len(S))))
    return scores, explained


def umap_2d(X: np.ndarray, seed: int = 0) -> np.ndarray | None:
    """UMAP embedding (N, 2) when ``umap-learn`` is installed, else None."""
    if importlib.util.find_spec("umap") is None or len(X) < 5:
        return None
    import umap

    return umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, len(X) - 1)).fit_transform(X)


def embedding_figure(X: np.ndarray, labels: Sequence, title: str, *, categorical: bool, seed: int = 0):
    """Scatter of the PCA (and UMAP, if installed) embedding of X (N, D), coloured by ``labels``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [("PCA", *pca_2d(X))]
    embedded = umap_2d(X, seed)
    if embedded is not None:
        panels.append(("UMAP", embedded, None))
    fig = Figure(figsize=(5.5 * len(panels), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for axis, (name, points, explained) in zip(axes, panels):
        if categorical:
            for value in sorted(set(map(str, labels))):
                chosen = np.array([str(v) == value for v in labels])
                axis.scatter(points[chosen, 0], points[chosen, 1], s=18, label=value)
            axis.legend(fontsize=8)
        else:
            shown = axis.scatter(points[:, 0], points[:, 1], c=np.asarray(labels, dtype=float), s=18, cmap="viridis")
            fig.colorbar(shown, ax=axis)
        if explained is not None:
            axis.set_xlabel(f"PC1 ({explained[0]:.0%})")
            axis.set_ylabel(f"PC2 ({explained[1]:.0%})")
        axis.set_title(name)
    fig.suptitle(title)
    return fig


def fold_metrics_figure(folds: Sequence[dict], title: str):
    """One panel per metric: the value of each fold as bars, with the mean as a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = [k for k in dict.fromkeys(k for f in folds for k in f) if any(f.get(k) is not None for f in folds)]
    fig = Figure(figsize=(3.2 * max(len(keys), 1), 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(len(keys), 1), squeeze=False)[0]
    for axis, key in zip(axes, keys):
        values = [f.get(key) if f.get(key) is not None else np.nan for f in folds]
        axis.bar(range(len(values)), values, color="tab:blue")
        axis.axhline(np.nanmean(values), color="k", linestyle="--", linewidth=1)
        axis.set_xticks(range(len(values)), [str(i) for i in range(len(values))])
        axis.set_xlabel("fold")
        axis.set_title(key)
    fig.suptitle(title)
    return fig
