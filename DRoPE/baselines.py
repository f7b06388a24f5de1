"""Simple reconstruction baselines that a trained model must beat."""

from __future__ import annotations

import numpy as np


def shell_mean_baseline(signal: np.ndarray, visible: np.ndarray, shells: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Fill every hidden voxel with the mean of the visible volumes of the same shell at that voxel.

    signal: (X, Y, Z, V) b0-normalised signal; visible: (X, Y, Z, V) bool, True = shown to the model;
    shells: (V,) shell b-value of each volume (0 for b0); mask: (X, Y, Z) bool brain mask.
    Where no other volume of the shell is visible at a voxel, the mean visible signal of that shell over the brain
    is used (1.0 for b0 when no b0 is visible anywhere). Visible voxels keep their own value.
    Returns (X, Y, Z, V) float32.
    """
    out = np.array(signal, dtype=np.float32, copy=True)
    brain = mask[..., None] & visible
    for shell in np.unique(shells):
        vols = np.flatnonzero(shells == shell)
        seen = visible[..., vols]
        total = (signal[..., vols] * seen).sum(-1)
        count = seen.sum(-1)
        shell_seen = brain[..., vols]
        fallback = float(signal[..., vols][shell_seen].mean()) if shell_seen.any() else (1.0 if shell == 0 else 0.0)
        for v in vols:
            own = visible[..., v]
            others = count - own
            mean = np.where(others > 0, (total - signal[..., v] * own) / np.maximum(others, 1), fallback)
            out[..., v] = np.where(own, signal[..., v], mean)
    return out * mask[..., None]
