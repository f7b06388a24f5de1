"""Fitted linear probes on CLS latents: a small JSON format the reconstruct engine and the Slicer module read.

Format (``probe.json``)::

    {"format": "drope-linear-probe", "version": 1,
     "task": "regression" | "classification", "target": "age",
     "feature_mean": [D floats], "feature_std": [D floats],   # train-fold standardisation
     "weights": [[D floats], ...],  "bias": [K floats],       # K = 1 (regression, binary) or n_classes
     "classes": null | ["CN", "MCI", ...]}

Prediction: z = (latent - mean) / std; scores = weights @ z + bias. Regression returns scores[0]; binary
classification (K = 1) gives p(classes[1]) = sigmoid(scores[0]); multi-class uses softmax over K rows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_path

PROBE_FORMAT = "drope-linear-probe"
PROBE_VERSION = 1
TASKS = ("regression", "classification")


class ProbeError(ValueError):
    """A probe file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class LinearProbe:
    """A linear probe on standardised latents.

    Attributes:
        task: "regression" or "classification".
        target: name of the predicted label.
        feature_mean, feature_std: (D,) standardisation from the training fold.
        weights: (K, D); bias: (K,). classes: class names for classification (len 2 when K = 1, else K).
    """

    task: str
    target: str
    feature_mean: np.ndarray
    feature_std: np.ndarray
    weights: np.ndarray
    bias: np.ndarray
    classes: tuple[str, ...] | None = None

    def predict(self, latent: np.ndarray) -> dict:
        """latent (D,) -> {"target", "task", "value"} (+ "probabilities" {class: p} for classification)."""
        latent = np.asarray(latent, dtype=np.float64).reshape(-1)
        if latent.shape != self.feature_mean.shape:
            raise ProbeError(f"probe expects {self.feature_mean.size} latent features, got {latent.size}")
        scores = self.weights @ ((latent - self.feature_mean) / self.feature_std) + self.bias
        if self.task == "regression":
            return {"target": self.target, "task": self.task, "value": float(scores[0])}
        if len(scores) == 1:
            p1 = 1.0 / (1.0 + math.exp(-float(scores[0])))
            probs = np.array([1.0 - p1, p1])
        else:
            e = np.exp(scores - scores.max())
            probs = e / e.sum()
        names = list(self.classes)
        return {
            "target": self.target,
            "task": self.task,
            "value": names[int(np.argmax(probs))],
            "probabilities": {name: float(p) for name, p in zip(names, probs)},
        }

    def to_json(self) -> dict:
        return {
            "format": PROBE_FORMAT,
            "version": PROBE_VERSION,
            "task": self.task,
            "target": self.target,
            "feature_mean": self.feature_mean.tolist(),
            "feature_std": self.feature_std.tolist(),
            "weights": self.weights.tolist(),
            "bias": self.bias.tolist(),
            "classes": None if self.classes is None else list(self.classes),
        }


def save_probe(probe: LinearProbe, path) -> Path:
    """Write ``probe`` as JSON, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(probe.to_json(), indent=1))
    return path


def load_probe(path) -> LinearProbe:
    """Read and validate a probe file; raises ProbeError naming the file and the problem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProbeError(f"{path}: cannot read the probe file: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != PROBE_FORMAT:
        raise ProbeError(f"{path}: not a DRoPE linear probe (expected \"format\": \"{PROBE_FORMAT}\")")
    if data.get("version") != PROBE_VERSION:
        raise ProbeError(f"{path}: probe format version {data.get('version')} is not supported (need {PROBE_VERSION})")
    try:
        probe = LinearProbe(
            task=str(data["task"]),
            target=str(data["target"]),
            feature_mean=np.asarray(data["feature_mean"], dtype=np.float64),
            feature_std=np.asarray(data["feature_std"], dtype=np.float64),
            weights=np.atleast_2d(np.asarray(data["weights"], dtype=np.float64)),
            bias=np.atleast_1d(np.asarray(data["bias"], dtype=np.float64)),
            classes=None if data.get("classes") is None else tuple(str(c) for c in data["classes"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProbeError(f"{path}: malformed probe file: {exc!r}") from exc
    _validate(probe, path)
    return probe


def _validate(probe: LinearProbe, path: Path) -> None:
    D = probe.feature_mean.size
    K = probe.weights.shape[0]
    if probe.task not in TASKS:
        raise ProbeError(f"{path}: task must be one of {TASKS}, got {probe.task!r}")
    if probe.feature_std.shape != (D,) or probe.weights.shape != (K, D) or probe.bias.shape != (K,):
        raise ProbeError(
            f"{path}: inconsistent shapes: mean {probe.feature_mean.shape}, std {probe.feature_std.shape}, "
            f"weights {probe.weights.shape}, bias {probe.bias.shape}"
        )
    if np.any(probe.feature_std <= 0) or not all(
        np.all(np.isfinite(a)) for a in (probe.feature_mean, probe.feature_std, probe.weights, probe.bias)
    ):
        raise ProbeError(f"{path}: probe values must be finite and feature_std > 0")
    if probe.task == "regression" and K != 1:
        raise ProbeError(f"{path}: a regression probe has one weight row, got {K}")
    if probe.task == "classification":
        expected = 2 if K == 1 else K
        if probe.classes is None or len(probe.classes) != expected:
            raise ProbeError(f"{path}: a classification probe with {K} weight rows needs {expected} class names")
