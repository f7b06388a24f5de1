"""Image-quality metrics for reconstructions: PSNR, SSIM (n-D, Gaussian window) and the Frechet distance.

Conventions (used by ``DRoPETrain/evaluate.py``):

- Images are the b0-normalised signal S / mean(S_b0) (the model's own target, see ``DRoPE.preprocess.normalize``),
  so the b0 level is 1.0. PSNR uses ``peak = 1.0`` and SSIM ``data_range = 1.0`` by default.
- PSNR = 10 log10(peak^2 / MSE) in dB, the standard definition. The authors' public code reports half of this
  value (it takes 10 log10 of peak / sqrt(MSE)); ``psnr(...) / 2`` gives that convention.
- SSIM follows Wang et al. (2004) with a Gaussian window (sigma 1.5 voxels, truncated at 3.5 sigma, an 11-tap
  window), K1 = 0.01, K2 = 0.03 and population (not sample) covariances, i.e. the settings of
  ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.
  It works in any number of dimensions (3-D for volumes); ``ssim_map`` returns the per-voxel index so that it can
  be averaged over any region (masked patches, brain).
- Frechet distance between Gaussians N(mu1, S1), N(mu2, S2):
  ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) (Dowson & Landau 1982; the FID formula of Heusel et al. 2017).
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import linalg, ndimage

log = logging.getLogger(__name__)

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # 2 * int(3.5 * 1.5 + 0.5) + 1 = 11 taps, as in Wang et al. and scikit-image
SSIM_K1 = 0.01
SSIM_K2 = 0.03


class MetricError(ValueError):
    """Inputs a metric cannot use (shape mismatch, empty region, non-finite values)."""


def _region(shape, mask) -> np.ndarray:
    if mask is None:
        return np.ones(shape, dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != tuple(shape):
        raise MetricError(f"region mask shape {mask.shape} does not match the image shape {tuple(shape)}")
    return mask


def _pair(reference, test) -> tuple[np.ndarray, np.ndarray]:
    reference = np.asarray(reference, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    if reference.shape != test.shape:
        raise MetricError(f"images differ in shape: {reference.shape} vs {test.shape}")
    return reference, test


def mse(reference, test, mask=None) -> float:
    """Mean squared error over the True voxels of ``mask`` (all voxels when None)."""
    reference, test = _pair(reference, test)
    region = _region(reference.shape, mask)
    if not region.any():
        raise MetricError("the region for the MSE is empty")
    return float(np.mean((reference[region] - test[region]) ** 2))


def psnr(reference, test, mask=None, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB: 10 log10(peak^2 / MSE) over ``mask`` (inf when the images agree there)."""
    if peak <= 0:
        raise MetricError(f"peak must be > 0, got {peak}")
    error = mse(reference, test, mask)
    return float("inf") if error == 0 else float(10.0 * np.log10(peak**2 / error))


def ssim_map(
    reference,
    test,
    data_range: float = 1.0,
    sigma: float = SSIM_SIGMA,
    k1: float = SSIM_K1,
    k2: float = SSIM_K2,
) -> np.ndarray:
    """Per-voxel SSIM index of two n-D images (same shape) with a Gaussian window of ``sigma`` voxels.

    Local means, variances and the covariance are Gaussian-weighted (scipy ``gaussian_filter``, mode 'reflect',
    truncate 3.5); C1 = (k1 L)^2, C2 = (k2 L)^2 with L = ``data_range``. Returns an array of the input's shape.
    """
    reference, test = _pair(reference, test)
    if data_range <= 0:
        raise MetricError(f"data_range must be > 0, got {data_range}")

    def smooth(a):
        return ndimage.gaussian_filter(a, sigma=sigma, truncate=SSIM_TRUNCATE, mode="reflect")

    ux, uy = smooth(reference), smooth(test)
    vx = smooth(reference * reference) - ux * ux
    vy = smooth(test * test) - uy * uy
    vxy = smooth(reference * test) - ux * uy
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))


def ssim(reference, test, mask=None, data_range: float = 1.0, sigma: float = SSIM_SIGMA, crop_border: bool = False) -> float:
    """Mean SSIM index over ``mask`` (all voxels when None).

    crop_border=True (and no mask) averages only the voxels at least one window radius from every edge, which is
    exactly what ``skimage.metrics.structural_similarity`` reports.
    """
    index = ssim_map(reference, test, data_range=data_range, sigma=sigma)
    region = _region(index.shape, mask)
    if crop_border:
        if mask is not None:
            raise MetricError("crop_border is for whole images; pass either a mask or crop_border=True")
        radius = int(SSIM_TRUNCATE * sigma + 0.5)
        region = np.zeros(index.shape, dtype=bool)
        region[tuple(slice(radius, n - radius) for n in index.shape)] = True
    if not region.any():
        raise MetricError("the region for the SSIM is empty")
    return float(index[region].mean())


# ---------------------------------------------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------------------------------------------


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """features (N, F) -> mean (F,) and covariance (F, F) (unbiased, N - 1 in the denominator; N >= 2)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise MetricError(f"need at least 2 feature vectors as (N, F) to estimate a covariance, got {features.shape}")
    if not np.all(np.isfinite(features)):
        raise MetricError("features contain NaN/inf")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) for means (F,) and covariances (F, F).

    ``scipy.linalg.sqrtm`` gives the product's square root. When it is not finite (near-singular covariances,
    e.g. fewer samples than features) ``eps`` is added to both diagonals first; tiny imaginary parts from round-off
    are dropped, larger ones raise MetricError.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise MetricError(
            f"inconsistent shapes: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(covmean)):
        log.warning("Frechet distance: singular product of covariances; adding %g to the diagonals", eps)
        offset = np.eye(mu1.size) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3 * max(1.0, np.abs(covmean).max())):
            raise MetricError(f"sqrtm(S1 S2) has a large imaginary part ({np.abs(covmean.imag).max():.3g})")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance_features(features1, features2) -> float:
    """Frechet distance between two sets of feature vectors (N1, F) and (N2, F), each summarised as a Gaussian.

    When N1 + N2 - 1 < F the covariances are rank-deficient; both sets are then first expressed in an orthonormal
    basis of the span of the centred samples and the mean difference (dimension <= N1 + N2 - 1). Every term of the
    formula is unchanged by that rotation (the ranges of S1, S2 and mu1 - mu2 lie in the span), but ``sqrtm`` runs on
    a much smaller matrix.
    """
    a, b = np.asarray(features1, dtype=np.float64), np.asarray(features2, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise MetricError(f"feature sets must be (N1, F) and (N2, F), got {a.shape} and {b.shape}")
    if len(a) + len(b) - 1 < a.shape[1]:
        span = np.vstack([a - a.mean(0), b - b.mean(0), a.mean(0) - b.mean(0)])
        _, singular, vt = np.linalg.svd(span, full_matrices=False)
        basis = vt[singular > singular.max() * 1e-12].T  # (F, r) orthonormal columns
        a, b = a @ basis, b @ basis
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))
