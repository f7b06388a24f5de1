"""Probes on frozen latents: linear (ridge / logistic regression) and a small MLP, with train-fold standardisation.

Shapes: X (N, D) latents, y (N,) targets (float for regression, class indices 0..K-1 for classification).
``predict`` returns (N,) values (regression) or (N, K) class probabilities (classification).

- Features are standardised with the training subjects' mean and std (a constant feature keeps std 1).
- Linear regression: ridge on the standardised features, w = (Z^T Z + alpha I)^-1 Z^T (y - mean y) (alpha -> 0 is
  least squares). Linear classification: scikit-learn ``LogisticRegression`` (L2, C = 1 / alpha, lbfgs).
  alpha = "auto" picks alpha from ``ALPHAS`` (1e-6 ... 1e4) by the validation-fold loss (MSE / log-loss), the
  smallest when there is no validation fold; a number fixes it.
- MLP: Linear(D, 256) - ReLU - Dropout(0.1) - Linear(256, K), AdamW (lr 1e-3, weight decay 1e-2), full batch,
  at most 500 epochs, early stopping on the validation loss (patience 50, best weights kept), seeded and run in a
  forked torch RNG so it is deterministic and leaves the global RNG alone (on one torch thread, restored after). Regression targets are standardised
  with the training mean / std inside the MLP.
- class_weight="balanced" weights class c by N / (K * N_c) in the loss (both probe kinds).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..probes import LinearProbe

ALPHAS = (1e-6, 1e-4, 1e-2, 1.0, 1e2, 1e4)
MLP_HIDDEN = 256
MLP_DROPOUT = 0.1
MLP_LR = 1e-3
MLP_WEIGHT_DECAY = 1e-2
MLP_MAX_EPOCHS = 500
MLP_PATIENCE = 50


class ProbeFitError(ValueError):
    """Data a probe cannot be fitted on (one class, too few subjects, non-finite values)."""


@dataclass(frozen=True)
class Standardizer:
    """Feature standardisation: mean (D,), std (D,) from the training subjects."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, X: np.ndarray) -> "Standardizer":
        X = np.asarray(X, dtype=np.float64)
        std = X.std(axis=0)
        return cls(X.mean(axis=0), np.where(std > 0, std, 1.0))

    def __call__(self, X: np.ndarray) -> np.ndarray:
        return (np.asarray(X, dtype=np.float64) - self.mean) / self.std


def class_weights(y: np.ndarray, n_classes: int, mode: str | None) -> np.ndarray:
    """(K,) loss weights: ones, or N / (K * N_c) for mode "balanced"."""
    if mode is None:
        return np.ones(n_classes)
    if mode != "balanced":
        raise ProbeFitError(f"class_weight must be None or 'balanced', got {mode!r}")
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0)


def _check(X, y, task, n_classes):
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or len(X) != len(y):
        raise ProbeFitError(f"features must be (N, D) with N = {len(y)} targets, got {X.shape}")
    if not np.all(np.isfinite(X)):
        raise ProbeFitError("features contain NaN/inf")
    if task == "classification" and len(np.unique(y)) < 2:
        raise ProbeFitError(f"the training set has a single class ({np.unique(y).tolist()}); a classifier needs two")
    if len(y) < 2:
        raise ProbeFitError(f"need at least 2 training subjects, got {len(y)}")
    return X


# ---------------------------------------------------------------------------------------------------------------
# Linear probes
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class LinearModel:
    """A fitted linear probe: scores = W z + b on standardised features z; W (K, D), b (K,)."""

    task: str
    scaler: Standardizer
    weights: np.ndarray
    bias: np.ndarray
    n_classes: int
    alpha: float

    def scores(self, X) -> np.ndarray:
        return self.scaler(X) @ self.weights.T + self.bias

    def predict(self, X) -> np.ndarray:
        s = self.scores(X)
        if self.task == "regression":
            return s[:, 0]
        if s.shape[1] == 1:
            p1 = 1.0 / (1.0 + np.exp(-s[:, 0]))
            return np.stack([1.0 - p1, p1], axis=1)
        e = np.exp(s - s.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def to_linear_probe(self, target: str, classes=None) -> LinearProbe:
        """The ``DRoPE.probes.LinearProbe`` (JSON format read by ``python -m DRoPE reconstruct --probe``)."""
        return LinearProbe(
            task=self.task, target=target, feature_mean=self.scaler.mean.copy(), feature_std=self.scaler.std.copy(),
            weights=self.weights.copy(), bias=self.bias.copy(),
            classes=None if self.task == "regression" else tuple(str(c) for c in classes),
        )


def _ridge(Z: np.ndarray, y: np.ndarray, alpha: float, sample_weight=None) -> tuple[np.ndarray, float]:
    """w (D,), b minimising sum_i s_i (z_i w + b - y_i)^2 + alpha |w|^2."""
    s = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    z_mean = (s[:, None] * Z).sum(0) / s.sum()
    y_mean = float((s * y).sum() / s.sum())
    Zc, yc = Z - z_mean, y - y_mean
    A = Zc.T @ (s[:, None] * Zc) + alpha * np.eye(Z.shape[1])
    w = np.linalg.solve(A, Zc.T @ (s * yc)) if alpha > 0 else np.linalg.lstsq(Zc * np.sqrt(s)[:, None], yc * np.sqrt(s), rcond=None)[0]
    return w, y_mean - float(z_mean @ w)


def _fit_linear_fixed(Z, y, task, n_classes, alpha, class_weight, seed):
    if task == "regression":
        w, b = _ridge(Z, np.asarray(y, np.float64), alpha)
        return w[None], np.array([b])
    from sklearn.linear_model import LogisticRegression

    weights = class_weights(y, n_classes, class_weight)
    clf = LogisticRegression(C=1.0 / alpha, max_iter=5000, random_state=seed)
    clf.fit(Z, y, sample_weight=weights[y])
    W, b = clf.coef_, clf.intercept_
    if n_classes > 2 and len(clf.classes_) < n_classes:  # classes missing from training: very low scores
        full_W, full_b = np.zeros((n_classes, Z.shape[1])), np.full(n_classes, -1e3)
        full_W[clf.classes_], full_b[clf.classes_] = W, b
        W, b = full_W, full_b
    return W, b


def _val_loss(model, X, y, task) -> float:
    p = model.predict(X)
    if task == "regression":
        return float(np.mean((p - y) ** 2))
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))))


def fit_linear(X, y, task: str, *, n_classes: int = 1, alpha="auto", X_val=None, y_val=None,
               class_weight: str | None = None, seed: int = 0) -> LinearModel:
    """Fit a linear probe (ridge / logistic); alpha="auto" selects it on (X_val, y_val) when given."""
    X = _check(X, y, task, n_classes)
    y = np.asarray(y)
    scaler = Standardizer.fit(X)
    Z = scaler(X)
    if alpha == "auto":
        candidates = ALPHAS if X_val is not None and len(X_val) else ALPHAS[:1]
    else:
        candidates = (float(alpha),)
    best = None
    for a in candidates:
        W, b = _fit_linear_fixed(Z, y, task, n_classes, a, class_weight, seed)
        model = LinearModel(task, scaler, W, b, n_classes, a)
        if len(candidates) == 1:
            return model
        loss = _val_loss(model, X_val, np.asarray(y_val), task)
        if best is None or loss < best[0] - 1e-12:
            best = (loss, model)
    return best[1]


# ---------------------------------------------------------------------------------------------------------------
# MLP probe
# ---------------------------------------------------------------------------------------------------------------


class MLPHead(nn.Module):
    """x (N, D) -> (N, K): Linear - ReLU - Dropout - Linear."""

    def __init__(self, dim: int, out: int, hidden: int = MLP_HIDDEN, dropout: float = MLP_DROPOUT):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class MLPModel:
    """A fitted MLP probe (standardised features in; regression outputs un-standardised)."""

    task: str
    scaler: Standardizer
    net: MLPHead
    n_classes: int
    y_mean: float = 0.0
    y_std: float = 1.0
    epochs: int = 0

    @torch.no_grad()
    def predict(self, X) -> np.ndarray:
        self.net.eval()
        with single_thread():
            out = self.net(torch.as_tensor(self.scaler(X), dtype=torch.float32)).double().numpy()
        if self.task == "regression":
            return out[:, 0] * self.y_std + self.y_mean
        return torch.softmax(torch.as_tensor(out), dim=1).numpy()


def fit_mlp(X, y, task: str, *, n_classes: int = 1, X_val=None, y_val=None, class_weight: str | None = None,
            seed: int = 0, max_epochs: int = MLP_MAX_EPOCHS, patience: int = MLP_PATIENCE) -> MLPModel:
    """Fit the MLP probe with early stopping on the validation fold (fixed 200 epochs without one)."""
    X = _check(X, y, task, n_classes)
    scaler = Standardizer.fit(X)
    regression = task == "regression"
    y = np.asarray(y, dtype=np.float64 if regression else np.int64)
    y_mean, y_std = (float(y.mean()), float(y.std()) or 1.0) if regression else (0.0, 1.0)
    has_val = X_val is not None and len(X_val) > 0
    epochs = max_epochs if has_val else min(max_epochs, 200)

    def tensors(features, targets):
        x = torch.as_tensor(scaler(features), dtype=torch.float32)
        t = torch.as_tensor((np.asarray(targets, np.float64) - y_mean) / y_std, dtype=torch.float32)[:, None] if regression \
            else torch.as_tensor(np.asarray(targets), dtype=torch.long)
        return x, t

    x, t = tensors(X, y)
    xv, tv = tensors(X_val, y_val) if has_val else (None, None)
    if regression:
        loss_fn = nn.MSELoss()
    else:
        loss_fn = nn.CrossEntropyLoss(weight=torch.as_tensor(class_weights(y, n_classes, class_weight), dtype=torch.float32))
    with torch.random.fork_rng(devices=[]), single_thread():
        torch.manual_seed(seed)
        net = MLPHead(X.shape[1], 1 if regression else n_classes)
        optimizer = torch.optim.AdamW(net.parameters(), lr=MLP_LR, weight_decay=MLP_WEIGHT_DECAY)
        best = (float("inf"), None, 0)
        for epoch in range(epochs):
            net.train()
            optimizer.zero_grad()
            loss = loss_fn(net(x), t)
            loss.backward()
            optimizer.step()
            if has_val:
                net.eval()
                with torch.no_grad():
                    val = float(loss_fn(net(xv), tv))
                if val < best[0] - 1e-7:
                    best = (val, {k: v.clone() for k, v in net.state_dict().items()}, epoch + 1)
                elif epoch + 1 - best[2] >= patience:
                    break
        if best[1] is not None:
            net.load_state_dict(best[1])
        trained = best[2] if best[1] is not None else epochs
    return MLPModel(task, scaler, net.eval(), n_classes, y_mean, y_std, trained)


@contextmanager
def single_thread():
    """Run torch on one intra-op thread inside the block (restored after): the MLP's tiny full-batch steps are
    much slower with thread synchronisation than without, most of all on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_probe(kind: str, X, y, task: str, **kwargs):
    """Dispatch: kind "linear" -> ``fit_linear``, "mlp" -> ``fit_mlp``."""
    if kind == "linear":
        return fit_linear(X, y, task, **kwargs)
    if kind == "mlp":
        kwargs.pop("alpha", None)
        return fit_mlp(X, y, task, **kwargs)
    raise ProbeFitError(f"unknown probe {kind!r}; choose linear or mlp")
