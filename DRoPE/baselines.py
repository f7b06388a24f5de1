"""Simple reconstruction baselines that a trained model must beat.

Every baseline fills the hidden voxels of a b0-normalised DWI from the visible ones at the same voxel.
Arrays: signal (X, Y, Z, V) b0-normalised; visible (X, Y, Z, V) bool, True = shown to the model; mask (X, Y, Z)
bool brain mask. Each returns (X, Y, Z, V) float32: visible voxels keep their own value, 0 outside the mask.
"""

from __future__ import annotations

import numpy as np

from .preprocess import NORM_RANGE

MIN_DTI_VISIBLE = 7  # a tensor and S0 have 7 unknowns
ANGULAR_KAPPA = 4.0  # angular weights exp(kappa |g_i . g_j|); chosen among |cos|^k, 1 + cos^2, exp(k|cos|) on training scans
LOG_FLOOR = 1e-3  # normalised signal floor before the log in the tensor fit


def shell_mean_baseline(
    signal: np.ndarray, visible: np.ndarray, shells: np.ndarray, mask: np.ndarray, bvecs: np.ndarray | None = None
) -> np.ndarray:
    """Fill every hidden voxel with the mean of the visible volumes of the same shell at that voxel.

    shells: (V,) shell b-value of each volume (0 for b0). With ``bvecs`` (V, 3) unit, the mean is weighted by the
    angular closeness of the directions, w_ij = exp(``ANGULAR_KAPPA`` |g_i . g_j|) (antipodally symmetric), the
    "angular-weighted" baseline; without, every volume counts alike.
    Where no other volume of the shell is visible at a voxel (or all weights are 0), the mean visible signal of
    that shell over the brain is used (1.0 for b0 when no b0 is visible anywhere).
    """
    out = np.array(signal, dtype=np.float32, copy=True)
    brain = mask[..., None] & visible
    for shell in np.unique(shells):
        vols = np.flatnonzero(shells == shell)
        weights = _pair_weights(bvecs, vols)  # (n, n), zero diagonal
        seen = visible[..., vols].astype(np.float32)
        total = (signal[..., vols] * seen) @ weights.T
        count = seen @ weights.T
        shell_seen = brain[..., vols]
        fallback = float(signal[..., vols][shell_seen].mean()) if shell_seen.any() else (1.0 if shell == 0 else 0.0)
        mean = np.where(count > 0, total / np.maximum(count, 1e-12), fallback)
        out[..., vols] = np.where(visible[..., vols], signal[..., vols], mean)
    return out * mask[..., None]


def _pair_weights(bvecs: np.ndarray | None, vols: np.ndarray) -> np.ndarray:
    """(n, n) float32 weights between the volumes ``vols``: 1, or exp(kappa |g_i . g_j|) with bvecs; 0 on the
    diagonal."""
    if bvecs is None:
        weights = np.ones((len(vols), len(vols)), dtype=np.float32)
    else:
        g = np.asarray(bvecs, dtype=np.float64)[vols]
        weights = np.exp(ANGULAR_KAPPA * np.abs(g @ g.T)).astype(np.float32)
    np.fill_diagonal(weights, 0.0)
    return weights


def dti_baseline(
    signal: np.ndarray,
    visible: np.ndarray,
    bvals: np.ndarray,
    bvecs: np.ndarray,
    mask: np.ndarray,
    fallback: np.ndarray,
    min_visible: int = MIN_DTI_VISIBLE,
) -> np.ndarray:
    """Predict hidden voxels from a diffusion tensor fitted to the visible volumes of that voxel.

    bvals (V,) s/mm^2, bvecs (V, 3) unit (0 for b0). Where at least ``min_visible`` volumes are visible at a voxel
    (b0s included), a log-linear weighted least-squares tensor fit (weights = squared OLS-predicted signal) of the
    visible volumes predicts the hidden ones, clipped to the model's ``NORM_RANGE``; elsewhere ``fallback``
    (X, Y, Z, V), e.g. the shell mean, is used. Voxels that share one visible pattern (the voxels of a patch) are
    fitted together.
    """
    out = np.where(visible, signal, fallback).astype(np.float32)
    design = _tensor_design(np.asarray(bvals, dtype=np.float64), np.asarray(bvecs, dtype=np.float64))  # (V, 7)
    voxels = np.flatnonzero(mask.reshape(-1) & (visible.reshape(-1, visible.shape[-1]).sum(-1) >= min_visible))
    flat_signal = signal.reshape(-1, signal.shape[-1])
    flat_visible = visible.reshape(-1, visible.shape[-1])
    flat_out = out.reshape(-1, out.shape[-1])
    patterns, group = np.unique(flat_visible[voxels], axis=0, return_inverse=True)
    for g, seen in enumerate(patterns):
        members = voxels[group.reshape(-1) == g]
        y = np.log(np.maximum(flat_signal[members][:, seen], LOG_FLOOR)).T  # (n_seen, n_vox)
        coef = _wls(design[seen], y)  # (7, n_vox)
        predicted = np.exp(design[~seen] @ coef).T  # (n_vox, n_hidden)
        flat_out[np.ix_(members, np.flatnonzero(~seen))] = np.clip(predicted, *NORM_RANGE)
    return out.reshape(signal.shape) * mask[..., None]


def _tensor_design(bvals: np.ndarray, bvecs: np.ndarray) -> np.ndarray:
    """(V, 7) log-linear design: log S = log S0 - b g^T D g, unknowns (log S0, Dxx, Dyy, Dzz, Dxy, Dxz, Dyz)."""
    gx, gy, gz = bvecs.T
    b = bvals
    return np.stack(
        [np.ones_like(b), -b * gx**2, -b * gy**2, -b * gz**2, -2 * b * gx * gy, -2 * b * gx * gz, -2 * b * gy * gz],
        axis=1,
    )


def _wls(design: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Weighted least squares of log-signals y (n, k) on design (n, 7), weights exp(2 * OLS fit). Returns (7, k)."""
    ols = np.linalg.pinv(design) @ y
    w = np.exp(design @ ols).T  # (k, n), sqrt of the weights
    weighted = w[:, :, None] * design[None]  # (k, n, 7)
    return np.einsum("kpn,kn->pk", np.linalg.pinv(weighted), w * y.T)


BASELINES = ("shell mean", "angular shell mean", "DTI of visible")


def baseline_predictions(signal: np.ndarray, visible: np.ndarray, gtab, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Every baseline of this module on one DWI: {name in ``BASELINES``: (X, Y, Z, V) prediction}.

    gtab: the DWI's ``GradientTable``; the DTI baseline falls back to the angular shell mean.
    """
    plain = shell_mean_baseline(signal, visible, gtab.shell_bvals, mask)
    angular = shell_mean_baseline(signal, visible, gtab.shell_bvals, mask, gtab.bvecs)
    tensor = dti_baseline(signal, visible, gtab.bvals, gtab.bvecs, mask, angular)
    return dict(zip(BASELINES, (plain, angular, tensor)))
