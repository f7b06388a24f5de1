"""Model preprocessing: brain mask, b0 normalisation, resampling and crop/pad to whole patches, with the inverse.

All arrays here are on canonical (RAS+) voxel grids with spatial axes first, (X, Y, Z, ...), like ``DWI.data``,
except ``Preprocessed.signal`` which puts the volume axis first, (N, X, Y, Z), as the model reads it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .dti import mean_b0
from .dwi import DWI
from .gradients import DWIError, GradientTable
from .parallel import thread_map, usable_cores

log = logging.getLogger(__name__)

PATCH = (8, 8, 4)
# Normalised signal S / mean(S_b0) is kept in [0, 1.5]. Diffusion weighting only attenuates, so the true value
# is in [0, 1]; b0 volumes scatter around 1 with noise (1.5 keeps 2.5 noise SD at b0 SNR 5), while values far
# above 1 come from voxels whose mean b0 is close to 0 (edges, signal dropout) and would dominate a squared loss.
NORM_RANGE = (0.0, 1.5)


class PreprocessError(DWIError):
    """The data cannot be brought onto the model grid (bad mask, brain larger than the allowed grid, ...)."""


# --- brain mask and normalisation -------------------------------------------------------------------------------


def brain_mask(dwi: DWI, median_radius: int = 4, numpass: int = 4) -> np.ndarray:
    """DIPY's ``median_otsu`` mask of the mean b0 (same settings as the shared data masks; no dilation, hole
    filling or crop): ``numpass`` median filters of width 2 r + 1, then voxels above the Otsu threshold.
    The filters run in slabs on every core, so this is several times faster than ``median_otsu``, with the
    same result. -> (X, Y, Z) bool, True = brain."""
    from dipy.segment.mask import otsu  # the threshold median_otsu uses (scikit-image's when installed)

    filtered = mean_b0(dwi.data, dwi.gtab)
    for _ in range(numpass):
        filtered = median_filter(filtered, 2 * median_radius + 1)
    return np.asarray(filtered > otsu(filtered), dtype=bool)


def median_filter(volume: np.ndarray, size: int, workers: int | None = None) -> np.ndarray:
    """``scipy.ndimage.median_filter(volume, size)`` (cube window, mirrored edges), computed in slabs along the
    first axis on ``workers`` threads (default: the usable cores; scipy releases the GIL). Each slab reads
    size // 2 extra planes on either side, so the result is identical to the single call."""
    n, half = volume.shape[0], size // 2
    edges = np.linspace(0, n, min(workers or usable_cores(), n) + 1).round().astype(int)

    def slab(k: int) -> np.ndarray:
        lo, hi = edges[k], edges[k + 1]
        start, stop = max(lo - half, 0), min(hi + half, n)
        return ndimage.median_filter(volume[start:stop], size)[lo - start : hi - start]

    return np.concatenate(list(thread_map(slab, range(len(edges) - 1))))


def normalize(
    data: np.ndarray, gtab: GradientTable, mask: np.ndarray, clip: tuple[float, float] = NORM_RANGE
) -> np.ndarray:
    """Signal divided by the voxel's mean b0. data: (X, Y, Z, N); mask: (X, Y, Z) bool, True = brain.

    Returns (X, Y, Z, N) float32 clipped to ``clip`` (see ``NORM_RANGE``), 0 outside the mask and where the
    mean b0 is <= 0 (no reference signal).
    """
    b0 = mean_b0(data, gtab)
    valid = np.asarray(mask, dtype=bool) & (b0 > 0)
    out = np.zeros(data.shape, dtype=np.float32)
    ratio = data[valid] / b0[valid][:, None]
    clipped = int(np.count_nonzero((ratio < clip[0]) | (ratio > clip[1])))
    if clipped:
        log.debug("normalize: %d of %d values clipped to [%g, %g]", clipped, ratio.size, *clip)
    out[valid] = np.clip(ratio, *clip)
    return out


# --- grids --------------------------------------------------------------------------------------------------------


def _voxel_sizes(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def resampled_grid(shape, affine: np.ndarray, spacing) -> tuple[tuple[int, int, int], np.ndarray]:
    """Grid with voxel size ``spacing`` (mm, scalar or (3,)) covering the same field of view.

    The direction cosines are kept and the new grid is centred on the old one; the size per axis is
    round(old extent / spacing). Returns (shape, (4, 4) voxel -> RAS affine).
    """
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    if not np.all(spacing > 0):
        raise PreprocessError(f"target spacing must be > 0 mm, got {spacing.tolist()}")
    old = np.asarray(shape[:3], dtype=np.float64)
    new = np.maximum(1, np.round(old * _voxel_sizes(affine) / spacing)).astype(int)
    linear = affine[:3, :3] / _voxel_sizes(affine) * spacing
    centre = affine[:3, :3] @ ((old - 1) / 2) + affine[:3, 3]
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = centre - linear @ ((new - 1) / 2)
    return tuple(int(n) for n in new), out


def resample(array: np.ndarray, affine: np.ndarray, shape, target_affine: np.ndarray) -> np.ndarray:
    """Linear (SimpleITK) resampling of (X, Y, Z, ...) from one voxel grid to another, in world coordinates.

    Points outside the source grid get 0. Boolean arrays are interpolated as 0/1 and thresholded at 0.5.
    Returns (*shape, ...) float32 (bool for bool input).
    """
    import SimpleITK as sitk

    array = np.asarray(array)
    extra = array.shape[3:]
    values = array.reshape(array.shape[:3] + (-1,)).astype(np.float32)
    vector = values.shape[3] > 1
    source = _sitk_image(values if vector else values[..., 0], affine, vector)
    spacing, origin, direction = _sitk_geometry(target_affine)
    out = sitk.Resample(
        source, [int(s) for s in shape], sitk.Transform(), sitk.sitkLinear, origin, spacing, direction, 0.0
    )
    result = np.asarray(sitk.GetArrayFromImage(out)).transpose(2, 1, 0, *(() if not vector else (3,)))
    result = result.reshape(tuple(shape) + extra)
    return result > 0.5 if array.dtype == bool else result


def _sitk_geometry(affine: np.ndarray) -> tuple[list[float], list[float], list[float]]:
    """RAS voxel -> world affine -> SimpleITK (LPS) spacing, origin, row-major direction."""
    lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)[:3]
    spacing = _voxel_sizes(affine)
    return spacing.tolist(), lps[:, 3].tolist(), (lps[:, :3] / spacing).ravel().tolist()


def _sitk_image(values: np.ndarray, affine: np.ndarray, vector: bool):
    """(X, Y, Z) or (X, Y, Z, C) array -> SimpleITK image with the world geometry of ``affine``."""
    import SimpleITK as sitk

    order = (2, 1, 0, 3) if vector else (2, 1, 0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(values.transpose(order)), isVector=vector)
    spacing, origin, direction = _sitk_geometry(affine)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def _window(size: int, patch: int, lo: int, hi: int, limit: int | None, axis: int) -> tuple[int, int]:
    """(start, length) of the model window on one axis; model voxel i = grid voxel start + i.

    Pads (centred, start <= 0) to the next multiple of ``patch``. Only when that exceeds ``limit`` it crops to
    the largest multiple of ``patch`` <= limit, centred on the brain [lo, hi) and never cutting it.
    """
    padded = -(-size // patch) * patch
    if limit is None or padded <= limit:
        return -((padded - size) // 2), padded
    length = (limit // patch) * patch
    if hi - lo > length:
        raise PreprocessError(
            f"the brain spans {hi - lo} voxels along axis {axis} but the model grid allows at most {length} "
            f"(max_shape {limit}, patch {patch}); raise max_shape or use a coarser spacing"
        )
    start = int(round((lo + hi - length) / 2))
    start = min(max(start, 0, hi - length), size - length, lo)
    return start, length


def _bounding_box(mask: np.ndarray) -> list[tuple[int, int]]:
    """Per axis [lo, hi) of the True voxels; the whole axis when the mask is empty."""
    if not mask.any():
        return [(0, n) for n in mask.shape]
    boxes = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        boxes.append((int(hit[0]), int(hit[-1]) + 1))
    return boxes


@dataclass(frozen=True)
class GridMapping:
    """Canonical input grid <-> model grid: optional resampling, then crop/pad to whole patches.

    Attributes:
        input_shape, input_affine: the canonical input grid (X, Y, Z) and its voxel -> RAS affine.
        resampled_shape, resampled_affine: the grid after resampling (equal to the input without resampling).
        start: (3,) model voxel i lies on resampled voxel start + i (negative = zero padding before the data).
        shape: (X', Y', Z') model grid, whole multiples of the patch.

    ``forward`` and ``inverse`` take arrays with the spatial axes first, (X, Y, Z, ...). Without resampling,
    ``inverse(forward(a)) == a`` exactly wherever the window kept the data (everywhere when it only pads).
    """

    input_shape: tuple[int, int, int]
    input_affine: np.ndarray
    resampled_shape: tuple[int, int, int]
    resampled_affine: np.ndarray
    start: tuple[int, int, int]
    shape: tuple[int, int, int]

    @classmethod
    def build(cls, shape, affine, *, spacing=None, patch=PATCH, mask=None, max_shape=None) -> "GridMapping":
        """Plan the mapping for a canonical grid ``shape`` / ``affine``.

        spacing: model voxel size in mm (scalar or (3,)); None keeps the input grid (no interpolation).
        patch: (3,) patch size; the model grid is a whole number of patches per axis.
        mask: (X, Y, Z) bool on the input grid, True = brain; only used to centre a crop.
        max_shape: (3,) largest model grid; None = no limit (pad only).
        """
        shape = tuple(int(s) for s in shape[:3])
        affine = np.asarray(affine, dtype=np.float64)
        if spacing is None:
            grid_shape, grid_affine = shape, affine
        else:
            grid_shape, grid_affine = resampled_grid(shape, affine, spacing)
        boxes = _bounding_box(cls._mask_on(mask, shape, affine, grid_shape, grid_affine))
        limits = (None,) * 3 if max_shape is None else tuple(max_shape)
        windows = [
            _window(grid_shape[a], int(patch[a]), *boxes[a], limits[a], a) for a in range(3)
        ]
        return cls(shape, affine, grid_shape, grid_affine, tuple(w[0] for w in windows), tuple(w[1] for w in windows))

    @staticmethod
    def _mask_on(mask, shape, affine, grid_shape, grid_affine) -> np.ndarray:
        if mask is None:
            return np.ones(grid_shape, dtype=bool)
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != shape:
            raise PreprocessError(f"mask shape {mask.shape} does not match the image grid {shape}")
        if grid_shape == shape and np.allclose(grid_affine, affine):
            return mask
        return resample(mask, affine, grid_shape, grid_affine)

    @property
    def affine(self) -> np.ndarray:
        """(4, 4) voxel -> RAS affine of the model grid."""
        shift = np.eye(4)
        shift[:3, 3] = self.start
        return self.resampled_affine @ shift

    @property
    def resamples(self) -> bool:
        """True when the model grid has another voxel size than the input (forward/inverse interpolate)."""
        return self.resampled_shape != self.input_shape or not np.allclose(self.resampled_affine, self.input_affine)

    def forward(self, array: np.ndarray) -> np.ndarray:
        """(X, Y, Z, ...) on the input grid -> (X', Y', Z', ...) on the model grid (zeros where padded)."""
        self._check(array, self.input_shape, "input")
        if self.resamples:
            array = resample(array, self.input_affine, self.resampled_shape, self.resampled_affine)
        return _shift(array, self.start, self.shape)

    def inverse(self, array: np.ndarray) -> np.ndarray:
        """(X', Y', Z', ...) on the model grid -> (X, Y, Z, ...) on the input grid (zeros where the crop cut)."""
        self._check(array, self.shape, "model")
        back = _shift(array, tuple(-s for s in self.start), self.resampled_shape)
        if self.resamples:
            back = resample(back, self.resampled_affine, self.input_shape, self.input_affine)
        return back

    @staticmethod
    def _check(array: np.ndarray, shape: tuple[int, int, int], name: str) -> None:
        if tuple(array.shape[:3]) != tuple(shape):
            raise PreprocessError(f"array of shape {array.shape} is not on the {name} grid {shape}")


def _shift(array: np.ndarray, start, shape) -> np.ndarray:
    """out[i] = array[start + i] where that index exists, else 0. array: (X, Y, Z, ...) -> (*shape, ...)."""
    out = np.zeros(tuple(shape) + array.shape[3:], dtype=array.dtype)
    src, dst = [], []
    for s, n_in, n_out in zip(start, array.shape[:3], shape):
        lo, hi = max(0, -s), min(n_out, n_in - s)
        dst.append(slice(lo, max(lo, hi)))
        src.append(slice(lo + s, max(lo, hi) + s))
    out[tuple(dst)] = array[tuple(src)]
    return out


# --- the whole chain ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocessed:
    """A DWI on the model grid.

    Attributes:
        signal: (N, X, Y, Z) float32 normalised signal (``normalize``), N = volumes in ``gtab`` order.
        mask: (X, Y, Z) bool, True = brain voxel with mean b0 > 0 (signal is 0 elsewhere).
        mean_b0: (X, Y, Z) float32 mean b0 on the model grid (multiply a normalised prediction by it to get signal).
        affine: (4, 4) voxel -> RAS affine of the model grid.
        mapping: model grid <-> canonical input grid.
        gtab: the gradient table (b-vectors in the canonical voxel frame, unchanged by resampling).
    """

    signal: np.ndarray
    mask: np.ndarray
    mean_b0: np.ndarray
    affine: np.ndarray
    mapping: GridMapping
    gtab: GradientTable

    def to_input(self, array: np.ndarray) -> np.ndarray:
        """Model-grid array with the spatial axes LAST, (..., X, Y, Z) like ``signal`` (or a map (X, Y, Z)),
        -> the canonical input grid with the spatial axes FIRST, (X_in, Y_in, Z_in, ...) like ``DWI.data``.

        So ``to_input(p.signal)`` is (X_in, Y_in, Z_in, N); pass the result to ``dwi.to_input_grid`` to write it.
        """
        array = np.asarray(array)
        if array.ndim < 3:
            raise PreprocessError(f"to_input needs an array (..., X, Y, Z), got shape {array.shape}")
        spatial_first = np.moveaxis(array, (-3, -2, -1), (0, 1, 2))
        return self.mapping.inverse(spatial_first)


def preprocess(dwi: DWI, spacing=None, patch=PATCH, mask=None, *, max_shape=None) -> Preprocessed:
    """The model preprocessing chain: mask -> resample -> crop/pad -> normalise.

    Args:
        dwi: the input DWI.
        spacing: model voxel size in mm (scalar or (3,)); None keeps the input voxels (exact inverse).
        patch: (3,) patch size; the model grid has whole patches per axis (zero padding, centred).
        mask: (X, Y, Z) bool brain mask on the canonical input grid; None = ``brain_mask(dwi)``.
        max_shape: (3,) largest model grid; when the padded grid exceeds it, crop centred on the brain
            (raises PreprocessError rather than cut brain voxels).
    """
    if mask is None:
        mask = brain_mask(dwi)
    mask = np.asarray(mask)
    if mask.shape != dwi.shape:
        raise PreprocessError(f"{dwi.source or 'DWI'}: mask shape {mask.shape} does not match the image {dwi.shape}")
    mask = mask.astype(bool)
    mapping = GridMapping.build(dwi.shape, dwi.affine, spacing=spacing, patch=patch, mask=mask, max_shape=max_shape)
    data = mapping.forward(dwi.data)
    model_mask = mapping.forward(mask)
    b0 = mean_b0(data, dwi.gtab)
    signal = normalize(data, dwi.gtab, model_mask)
    return Preprocessed(
        signal=np.ascontiguousarray(np.moveaxis(signal, -1, 0)),
        mask=model_mask & (b0 > 0),
        mean_b0=b0,
        affine=mapping.affine,
        mapping=mapping,
        gtab=dwi.gtab,
    )
