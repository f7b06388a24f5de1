"""Validated, immutable gradient tables.

Convention (used everywhere in DRoPE): b-values in s/mm^2; b-vectors are unit length and expressed in the
*voxel frame of the canonical (RAS+) data array*, i.e. world RAS gradient = R @ bvec with R the affine's
direction cosines (affine[:3, :3] / voxel sizes). b0 volumes (b < ``B0_THRESHOLD``) carry a zero b-vector.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

B0_THRESHOLD = 50.0  # s/mm^2: b below this is b0
SHELL_TOLERANCE = 50.0  # s/mm^2: b within this of a shell belongs to that shell
UNIT_NORM_ATOL = 1e-2  # b-vectors further than this from unit norm trigger a warning before normalising
MAX_BVALUE = 1e5  # s/mm^2: far above any human (even ex-vivo) protocol; larger b-values are taken as a unit error


class DWIError(ValueError):
    """Invalid diffusion data; the message names the file and the problem."""


class GradientTableError(DWIError):
    """Invalid b-values / b-vectors."""


class DWIWarning(UserWarning):
    """Odd but legal diffusion data (non-unit b-vectors, single shell, few directions, ...)."""


def _where(source: str | None) -> str:
    return f"{source}: " if source else ""


def cluster_shells(bvals: np.ndarray, tolerance: float = SHELL_TOLERANCE) -> np.ndarray:
    """Round each b-value to its shell. bvals: (N,) -> (N,) shell values.

    b-values below ``B0_THRESHOLD`` become exactly 0. The others, sorted, are grouped while consecutive gaps
    are <= ``tolerance``; a group's shell value is its median rounded to 10 s/mm^2. Groups never span the b0
    threshold, so a diffusion-weighted volume never gets shell 0.
    """
    bvals = np.asarray(bvals, dtype=np.float64)
    shells = np.zeros_like(bvals)
    order = [idx for idx in np.argsort(bvals, kind="stable") if bvals[idx] >= B0_THRESHOLD]
    groups: list[list[int]] = []
    for idx in order:
        if groups and bvals[idx] - bvals[groups[-1][-1]] <= tolerance:
            groups[-1].append(idx)
        else:
            groups.append([idx])
    for group in groups:
        shells[group] = np.round(float(np.median(bvals[group])), -1)
    return shells


@dataclass(frozen=True, eq=False)
class GradientTable:
    """A validated diffusion gradient table.

    Attributes:
        bvals: (N,) b-values in s/mm^2 as acquired (b0 volumes set to exactly 0).
        bvecs: (N, 3) unit b-vectors in the canonical voxel frame; zero rows for b0 volumes.
        source: file the table came from, used in messages.

    Build it with ``GradientTable.create`` (validates, normalises, warns); the dataclass fields are not
    re-validated when constructed directly.
    """

    bvals: np.ndarray
    bvecs: np.ndarray
    source: str | None = field(default=None, compare=False)

    @classmethod
    def create(cls, bvals, bvecs, *, source: str | None = None, require_b0: bool = True) -> "GradientTable":
        """Validate raw b-values (N,) and b-vectors (N, 3) and return a clean table.

        Raises GradientTableError for: shape mismatch, NaN/inf, negative b, zero-norm vector with b > 0,
        no b0 (when ``require_b0``). Warns (DWIWarning) for non-unit vectors, one shell, fewer than 6 directions.
        """
        where = _where(source)
        bvals = np.asarray(bvals, dtype=np.float64).reshape(-1)
        bvecs = np.asarray(bvecs, dtype=np.float64)
        if bvecs.ndim != 2 or bvecs.shape[1] != 3:
            raise GradientTableError(f"{where}b-vectors must be (N, 3), got shape {bvecs.shape}")
        if len(bvals) != len(bvecs):
            raise GradientTableError(
                f"{where}{len(bvecs)} b-vectors but {len(bvals)} b-values; each volume needs one of each"
            )
        if not np.all(np.isfinite(bvals)):
            raise GradientTableError(f"{where}b-values contain NaN/inf at volumes {volume_list(~np.isfinite(bvals))}")
        if not np.all(np.isfinite(bvecs)):
            bad = ~np.all(np.isfinite(bvecs), axis=1)
            raise GradientTableError(f"{where}b-vectors contain NaN/inf at volumes {volume_list(bad)}")
        if np.any(bvals < 0):
            raise GradientTableError(f"{where}negative b-values at volumes {volume_list(bvals < 0)}")
        _check_bvalue_scale(bvals, where)
        is_b0 = bvals < B0_THRESHOLD
        norms = np.linalg.norm(bvecs, axis=1)
        zero = (~is_b0) & (norms < 1e-6)
        if np.any(zero):
            raise GradientTableError(
                f"{where}zero-norm b-vectors on diffusion-weighted volumes {volume_list(zero)} (b > {B0_THRESHOLD:g})"
            )
        if require_b0 and not np.any(is_b0):
            raise GradientTableError(
                f"{where}no b0 volume (b < {B0_THRESHOLD:g} s/mm^2); the signal cannot be normalised"
            )
        off_unit = (~is_b0) & (np.abs(norms - 1.0) > UNIT_NORM_ATOL)
        if np.any(off_unit):
            warnings.warn(
                f"{where}{int(off_unit.sum())} b-vectors are not unit length (norms "
                f"{norms[off_unit].min():.3f}..{norms[off_unit].max():.3f}); normalised, b-values kept",
                DWIWarning,
                stacklevel=2,
            )
        unit = np.zeros_like(bvecs)
        unit[~is_b0] = bvecs[~is_b0] / norms[~is_b0, None]
        clean_bvals = np.where(is_b0, 0.0, bvals)
        table = cls(clean_bvals, unit, source)
        table._warn_protocol()
        return table

    def _warn_protocol(self) -> None:
        where = _where(self.source)
        if len(self.shells) == 1:
            warnings.warn(f"{where}single-shell acquisition (b={self.shells[0]:g})", DWIWarning, stacklevel=3)
        if 0 < self.n_directions < 6:
            warnings.warn(
                f"{where}only {self.n_directions} distinct directions; a tensor needs at least 6",
                DWIWarning,
                stacklevel=3,
            )

    def __len__(self) -> int:
        return len(self.bvals)

    @cached_property
    def b0s_mask(self) -> np.ndarray:
        """(N,) bool, True = b0 volume."""
        return self.bvals < B0_THRESHOLD

    @cached_property
    def shell_bvals(self) -> np.ndarray:
        """(N,) b-values rounded to their shell (0 for b0)."""
        return cluster_shells(self.bvals)

    @cached_property
    def shells(self) -> np.ndarray:
        """Sorted distinct non-zero shell b-values."""
        values = np.unique(self.shell_bvals)
        return values[values > 0]

    @cached_property
    def n_directions(self) -> int:
        """Number of distinct axes among diffusion-weighted volumes (antipodes count once, |cos| > 0.999)."""
        vecs = self.bvecs[~self.b0s_mask]
        distinct: list[np.ndarray] = []
        for v in vecs:
            if not any(abs(float(v @ d)) > 0.999 for d in distinct):
                distinct.append(v)
        return len(distinct)

    def select(self, index) -> "GradientTable":
        """Table of a subset of volumes (index: int array or bool mask), not re-validated."""
        return GradientTable(self.bvals[index], self.bvecs[index], self.source)

    def transformed(self, matrix: np.ndarray) -> "GradientTable":
        """Apply a 3x3 orthogonal (rotation/flip/permutation) matrix to every b-vector: new = M @ old."""
        return GradientTable(self.bvals.copy(), self.bvecs @ np.asarray(matrix, dtype=np.float64).T, self.source)

    def describe(self) -> str:
        """One-line protocol summary, e.g. '6 b0 + 64 x b=1000 (62 directions)'."""
        parts = [f"{int(self.b0s_mask.sum())} b0"]
        for shell in self.shells:
            parts.append(f"{int(np.sum(self.shell_bvals == shell))} x b={shell:g}")
        return " + ".join(parts) + f" ({self.n_directions} directions)"


def _check_bvalue_scale(bvals: np.ndarray, where: str) -> None:
    """GradientTableError for b-values that cannot be s/mm^2: no diffusion weighting at all, or b > MAX_BVALUE."""
    largest = float(bvals.max())
    if largest < B0_THRESHOLD:
        unit = (" (these look like ms/um^2: multiply by 1000 for s/mm^2)" if largest > 0 else "")
        raise GradientTableError(
            f"{where}no diffusion-weighted volume: the largest b-value is {largest:g}, below the b0 threshold "
            f"{B0_THRESHOLD:g} s/mm^2{unit}"
        )
    if largest > MAX_BVALUE:
        raise GradientTableError(
            f"{where}b-values up to {largest:g} are far above any diffusion protocol in s/mm^2 "
            f"(these look like s/m^2: divide by 1e6 for s/mm^2)"
        )


def volume_list(mask: np.ndarray, limit: int = 8) -> str:
    """'3, 7, 9' for the True entries of a (N,) bool mask, shortened after ``limit`` with the count."""
    idx = np.flatnonzero(mask)
    text = ", ".join(str(i) for i in idx[:limit])
    return text + (f", ... ({len(idx)} in all)" if len(idx) > limit else "")
