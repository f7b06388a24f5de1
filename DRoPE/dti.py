"""Diffusion tensor imaging (DTI) in the Model -> Fit style of DIPY, wrapping ``dipy.reconst.dti.TensorModel``.

Units: b-values in s/mm^2, so eigenvalues and mean diffusivity (MD) are in mm^2/s (typical brain MD is about
0.7e-3 mm^2/s). FA is dimensionless in [0, 1]. Eigenvectors are in the voxel frame of the data they were fitted on
(for a ``DWI`` that is the canonical voxel frame; world RAS = ``dwi.rotation @ v``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from tqdm.auto import tqdm

from .gradients import B0_THRESHOLD, DWIError, GradientTable
from .parallel import thread_map

log = logging.getLogger(__name__)

FIT_METHODS = ("WLS", "OLS", "NLLS")
VOXELS_PER_CHUNK = 10_000  # mask voxels fitted per DIPY call (bounds memory; one progress-bar step; one thread)
PROGRESS_DELAY_S = 2.0  # the progress bar only appears for fits that run longer than this


class DTIError(DWIError):
    """Invalid input to a tensor fit."""


def fractional_anisotropy(evals: np.ndarray, axis: int = -1) -> np.ndarray:
    """FA from eigenvalues. evals: (..., 3) -> (...) in [0, 1].

    FA = sqrt(1/2) * sqrt((l1-l2)^2 + (l2-l3)^2 + (l3-l1)^2) / sqrt(l1^2 + l2^2 + l3^2); 0 where all l are 0.
    """
    evals = np.moveaxis(np.asarray(evals, dtype=np.float64), axis, -1)
    l1, l2, l3 = evals[..., 0], evals[..., 1], evals[..., 2]
    numerator = (l1 - l2) ** 2 + (l2 - l3) ** 2 + (l3 - l1) ** 2
    denominator = (evals**2).sum(axis=-1)
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, np.sqrt(0.5 * numerator / safe), 0.0)


def mean_diffusivity(evals: np.ndarray, axis: int = -1) -> np.ndarray:
    """MD = (l1 + l2 + l3) / 3. evals: (..., 3) -> (...), same units as evals (mm^2/s)."""
    return np.asarray(evals, dtype=np.float64).mean(axis=axis)


def tensor_from_eig(evals: np.ndarray, evecs: np.ndarray) -> np.ndarray:
    """Diffusion tensors D = V diag(l) V^T. evals: (..., 3); evecs: (..., 3, 3), column j = eigenvector j.

    Returns (..., 3, 3).
    """
    return np.einsum("...ij,...j,...kj->...ik", evecs, evals, evecs)


def mean_b0(data: np.ndarray, gtab: GradientTable) -> np.ndarray:
    """Mean of the b0 volumes. data: (X, Y, Z, N) -> (X, Y, Z) float32."""
    return data[..., gtab.b0s_mask].mean(axis=-1, dtype=np.float64).astype(np.float32)


@dataclass(frozen=True)
class DTIFit:
    """A tensor fit on a grid (X, Y, Z); voxels outside ``mask`` hold zeros.

    Attributes:
        evals: (X, Y, Z, 3) eigenvalues in mm^2/s, sorted descending.
        evecs: (X, Y, Z, 3, 3) eigenvectors, column j (``evecs[..., :, j]``) belongs to ``evals[..., j]``.
        s0: (X, Y, Z) signal at b = 0 predicted by the fit (same units as the data).
        mask: (X, Y, Z) bool, True = voxel was fitted.
    """

    evals: np.ndarray
    evecs: np.ndarray
    s0: np.ndarray
    mask: np.ndarray

    @cached_property
    def fa(self) -> np.ndarray:
        """(X, Y, Z) fractional anisotropy in [0, 1]."""
        return fractional_anisotropy(self.evals)

    @cached_property
    def md(self) -> np.ndarray:
        """(X, Y, Z) mean diffusivity in mm^2/s."""
        return mean_diffusivity(self.evals)

    @property
    def v1(self) -> np.ndarray:
        """(X, Y, Z, 3) principal eigenvector (unit length inside the mask; sign arbitrary)."""
        return self.evecs[..., :, 0]

    @property
    def tensor(self) -> np.ndarray:
        """(X, Y, Z, 3, 3) diffusion tensor in mm^2/s."""
        return tensor_from_eig(self.evals, self.evecs)


class DTIModel:
    """Diffusion tensor model.

    Args:
        gtab: gradient table of the data to fit (b in s/mm^2; b < 50 is b0, as in DIPY).
        fit_method: "WLS" (default, weighted least squares), "OLS" or "NLLS".

    Example:
        fit = DTIModel(dwi.gtab).fit(dwi.data, mask)
        fa, md = fit.fa, fit.md
    """

    def __init__(self, gtab: GradientTable, fit_method: str = "WLS"):
        if fit_method not in FIT_METHODS:
            raise DTIError(f"unknown DTI fit_method {fit_method!r}; choose one of {', '.join(FIT_METHODS)}")
        from dipy.core.gradients import gradient_table
        from dipy.reconst.dti import TensorModel

        self.gtab = gtab
        self.fit_method = fit_method
        dipy_gtab = gradient_table(gtab.bvals, bvecs=gtab.bvecs, b0_threshold=B0_THRESHOLD)
        self._model = TensorModel(dipy_gtab, fit_method=fit_method, return_S0_hat=True)

    def fit(self, data: np.ndarray, mask: np.ndarray | None = None, *, progress: bool = True) -> DTIFit:
        """Fit every voxel of ``mask`` whose mean b0 is > 0.

        data: (X, Y, Z, N) signal; mask: (X, Y, Z) bool, True = fit this voxel (None = all voxels).
        Voxels with mean b0 <= 0 are left out of the fit (their log-signal is undefined and DIPY returns
        absurd MD there); they get zeros, like voxels outside the mask, and ``DTIFit.mask`` is False there.
        A tqdm progress bar appears when the fit runs for more than a few seconds (``progress=False`` hides it).
        Chunks of voxels are fitted on every usable core (numpy's linear algebra releases the GIL).
        """
        data = np.asarray(data)
        if data.ndim != 4 or data.shape[-1] != len(self.gtab):
            raise DTIError(
                f"{self._where()}data must be (X, Y, Z, {len(self.gtab)}) to match the gradient table, got {data.shape}"
            )
        fit_mask = self._fit_mask(data, mask)
        index = np.flatnonzero(fit_mask)
        spatial = data.shape[:3]
        evals = np.zeros(spatial + (3,), dtype=np.float32)
        evecs = np.zeros(spatial + (3, 3), dtype=np.float32)
        s0 = np.zeros(spatial, dtype=np.float32)
        flat = data.reshape(-1, data.shape[-1])
        chunks = [index[start : start + VOXELS_PER_CHUNK] for start in range(0, len(index), VOXELS_PER_CHUNK)]
        fits = thread_map(lambda chunk: self._model.fit(flat[chunk].astype(np.float64)), chunks)
        show = progress and len(chunks) > 1
        bar = tqdm(fits, total=len(chunks), desc="DTI fit", unit="chunk", delay=PROGRESS_DELAY_S, disable=not show)
        for chunk, voxel_fit in zip(chunks, bar):
            coords = np.unravel_index(chunk, spatial)
            evals[coords] = voxel_fit.evals
            evecs[coords] = voxel_fit.evecs
            s0[coords] = voxel_fit.S0_hat
        log.debug("DTI %s fit of %d voxels", self.fit_method, len(index))
        return DTIFit(evals, evecs, s0, fit_mask)

    def _fit_mask(self, data: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        if mask is None:
            mask = np.ones(data.shape[:3], dtype=bool)
        mask = np.asarray(mask)
        if mask.shape != data.shape[:3]:
            raise DTIError(f"{self._where()}mask shape {mask.shape} does not match the data grid {data.shape[:3]}")
        b0 = mean_b0(data, self.gtab)
        finite = np.all(np.isfinite(data), axis=-1)
        fit_mask = mask.astype(bool) & (b0 > 0) & finite
        dropped = int((mask.astype(bool) & ~fit_mask).sum())
        if dropped:
            log.info("%sDTI: %d mask voxels with mean b0 <= 0 or non-finite signal not fitted", self._where(), dropped)
        return fit_mask

    def _where(self) -> str:
        return f"{self.gtab.source}: " if self.gtab.source else ""
