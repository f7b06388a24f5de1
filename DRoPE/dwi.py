"""The in-memory DWI: canonical (RAS+) voxel order plus the mapping back to the file's own grid."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

from .gradients import GradientTable


@dataclass(frozen=True)
class InputGrid:
    """Geometry of the file as stored on disk.

    Attributes:
        shape: (X, Y, Z) spatial shape on disk.
        affine: (4, 4) on-disk voxel -> world RAS (mm).
        ornt: (3, 2) nibabel orientation taking the on-disk array to the canonical one
            (``nib.orientations.io_orientation(affine)``).
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    ornt: np.ndarray

    @classmethod
    def from_affine(cls, shape, affine) -> "InputGrid":
        affine = np.asarray(affine, dtype=np.float64)
        return cls(tuple(int(s) for s in shape[:3]), affine, nib.orientations.io_orientation(affine))

    @property
    def voxel_to_canonical(self) -> np.ndarray:
        """(3, 3) signed permutation P with canonical-voxel-frame vector = P @ on-disk-voxel-frame vector."""
        matrix = np.zeros((3, 3))
        for axis, (target, sign) in enumerate(self.ornt):
            matrix[int(target), axis] = sign
        return matrix

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """On-disk array (X, Y, Z, ...) -> canonical array (same data, RAS+ voxel order)."""
        return nib.orientations.apply_orientation(array, self.ornt)

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        """Canonical array (X', Y', Z', ...) -> array on the on-disk grid (inverse of ``to_canonical``)."""
        canonical = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
        back = nib.orientations.ornt_transform(canonical, self.ornt)
        return nib.orientations.apply_orientation(array, back)

    def canonical_affine(self) -> np.ndarray:
        """(4, 4) voxel -> RAS affine of the canonical array."""
        inv = nib.orientations.inv_ornt_aff(self.ornt, self.shape)
        return self.affine @ inv


@dataclass(frozen=True)
class DWI:
    """A diffusion-weighted image in DRoPE's internal convention.

    Attributes:
        data: (X, Y, Z, N) float32 signal, voxel order closest to RAS+ (canonical).
        affine: (4, 4) canonical voxel -> world RAS (mm).
        gtab: gradient table; b-vectors unit length in the canonical voxel frame.
        grid: the on-disk geometry, so outputs can be written back on the input's own grid.
        source: path of the file read (for messages).
        warnings: odd-but-legal findings made while reading (also emitted as DWIWarning).
        inputs: every file read to build it (image, b-values, b-vectors); writers never overwrite them.
    """

    data: np.ndarray
    affine: np.ndarray
    gtab: GradientTable
    grid: InputGrid
    source: str = ""
    warnings: tuple[str, ...] = field(default=(), compare=False)
    inputs: tuple[str, ...] = field(default=(), compare=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape[:3])

    @property
    def n_volumes(self) -> int:
        return self.data.shape[3]

    @property
    def voxel_size(self) -> np.ndarray:
        """(3,) voxel size in mm along the canonical axes."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @property
    def rotation(self) -> np.ndarray:
        """(3, 3) direction cosines of the canonical axes: world RAS vector = rotation @ voxel-frame vector."""
        return self.affine[:3, :3] / self.voxel_size

    def select(self, index) -> "DWI":
        """The same scan restricted to the volumes ``index`` ((K,) int indices or (N,) bool mask)."""
        return dataclasses.replace(self, data=np.ascontiguousarray(self.data[..., index]), gtab=self.gtab.select(index))

    def world_bvecs(self) -> np.ndarray:
        """(N, 3) b-vectors in world RAS coordinates."""
        return self.gtab.bvecs @ self.rotation.T

    def to_input_grid(self, array: np.ndarray) -> np.ndarray:
        """A map on the canonical grid (X, Y, Z, ...) -> the same map on the file's grid, for writing."""
        return self.grid.from_canonical(array)
