"""Synthetic DWI phantoms: re-synthesise any protocol from the tensor fit of a real brain.

S(b, g) = S0 * exp(-b g^T D g) per voxel (b in s/mm^2, D in mm^2/s), optionally with Rician noise. The b-vectors of
the new protocol are read in the voxel frame of the fit (for a DWI: the canonical voxel frame).
"""

from __future__ import annotations

import numpy as np

from .dti import DTIFit, DTIModel
from .dwi import DWI
from .gradients import DWIError, GradientTable


DISPERSE_ITERATIONS = 200  # enough for the minimum angle between 30-64 directions to settle


class PhantomError(DWIError):
    """Invalid phantom settings."""


def synthesize(fit: DTIFit, gtab: GradientTable, snr: float | None = None, seed=None) -> np.ndarray:
    """Noise-free or Rician-noisy signal of ``fit`` for the protocol ``gtab``. -> (X, Y, Z, N) float32.

    snr: None = no noise. Otherwise Gaussian noise with sigma = median(S0 over the fit mask) / snr is added to
    the real and the imaginary channel of every voxel of the grid (as in a scanner, the noise level is one number
    for the image), and the magnitude is returned: voxels outside the mask hold pure Rayleigh background noise.
    seed: int or numpy Generator; the same seed gives the same noise.
    """
    fitted = fit.mask
    spatial = fit.s0.shape
    out = np.zeros(spatial + (len(gtab),), dtype=np.float32)
    tensors = fit.tensor[fitted].astype(np.float64)  # (M, 3, 3)
    g = gtab.bvecs
    decay = np.einsum("ni,mij,nj->mn", g, tensors, g) * gtab.bvals  # (M, N): b g^T D g
    out[fitted] = fit.s0[fitted, None] * np.exp(-decay)
    if snr is None:
        return out
    if not snr > 0:
        raise PhantomError(f"snr must be > 0 (or None for no noise), got {snr}")
    sigma = float(np.median(fit.s0[fitted])) / snr if fitted.any() else 0.0
    return add_rician_noise(out, sigma, seed)


def add_rician_noise(signal: np.ndarray, sigma: float, seed=None) -> np.ndarray:
    """|signal + n_re + i n_im| with n ~ N(0, sigma^2) independent per element. Returns float32 of the same shape."""
    rng = np.random.default_rng(seed)
    real = signal + rng.normal(0.0, sigma, signal.shape)
    imag = rng.normal(0.0, sigma, signal.shape)
    return np.hypot(real, imag).astype(np.float32)


def phantom_from_dwi(
    dwi: DWI, gtab_new: GradientTable, snr: float | None = None, seed=None, *, mask: np.ndarray | None = None
) -> DWI:
    """A phantom with the geometry of ``dwi`` and the protocol ``gtab_new``.

    The tensors and S0 come from a WLS DTI fit of ``dwi`` inside ``mask`` ((X, Y, Z) bool on the canonical grid;
    None = ``preprocess.brain_mask(dwi)``). b-vectors of ``gtab_new`` are in the canonical voxel frame of ``dwi``.
    """
    if mask is None:
        from .preprocess import brain_mask

        mask = brain_mask(dwi)
    fit = DTIModel(dwi.gtab).fit(dwi.data, mask)
    data = synthesize(fit, gtab_new, snr=snr, seed=seed)
    source = f"phantom of {dwi.source}" if dwi.source else "phantom"
    return DWI(data, dwi.affine.copy(), gtab_new, dwi.grid, source)


def make_gtab(shells: dict | None = None, n_b0: int = 2, seed=0) -> GradientTable:
    """A protocol: ``n_b0`` b0 volumes, then each shell's directions (shells: {b in s/mm^2: count}).

    Default {1000: 30, 2000: 30}. Each shell's directions are spread evenly over the sphere by electrostatic
    repulsion of antipodal pairs (DIPY ``disperse_charges``) from a seeded random start, so shells differ.
    """
    from dipy.core.sphere import HemiSphere, disperse_charges

    shells = {1000: 30, 2000: 30} if shells is None else shells
    if n_b0 < 0 or any(b <= 0 or n < 1 for b, n in shells.items()):
        raise PhantomError(f"need n_b0 >= 0 and shells {{b > 0: count >= 1}}, got n_b0={n_b0}, shells={shells}")
    rng = np.random.default_rng(seed)
    bvals = [np.zeros(n_b0)]
    bvecs = [np.zeros((n_b0, 3))]
    for b, n in shells.items():
        start = rng.normal(size=(n, 3))
        start /= np.linalg.norm(start, axis=1, keepdims=True)
        bvals.append(np.full(n, float(b)))
        bvecs.append(start if n == 1 else disperse_charges(HemiSphere(xyz=start), DISPERSE_ITERATIONS)[0].vertices)
    return GradientTable.create(np.concatenate(bvals), np.concatenate(bvecs), source="make_gtab", require_b0=n_b0 > 0)
