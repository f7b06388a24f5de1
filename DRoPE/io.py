"""Reading and writing diffusion-weighted images with correct gradient tables.

One entry point, ``load_dwi``, reads

- NIfTI 4-D (``.nii``/``.nii.gz``) with FSL ``.bval``/``.bvec`` files,
- Slicer DWI NRRD (``.nrrd``/``.nhdr`` with ``modality:=DWMRI``), and plain 4-D NRRD with ``.bval``/``.bvec``,

and returns a ``DWI`` in DRoPE's internal convention: data (X, Y, Z, N) float32 in the closest canonical
(RAS+) voxel order, b-values in s/mm^2, unit b-vectors in that canonical voxel frame (world RAS = rotation @ bvec).

Gradient conventions handled here:

- FSL: b-vectors are in the image (voxel) frame of the file, except that when det(affine) > 0 the x component is
  negated. So the voxel-frame vector is v = bvec (det < 0) or (-bx, by, bz) (det > 0).
- NRRD (NA-MIC): world gradient (in the NRRD ``space``) = M @ g, where each parenthesised vector of
  ``measurement frame`` is a COLUMN of M, and b_i = ``DWMRI_b-value`` * |g_i|^2.

Writers (``save_nifti``, ``save_nrrd``, ``save_scalar_nifti``) write atomically, on the file's own on-disk grid, and
refuse to overwrite the files a DWI was read from.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
import zlib
from collections.abc import Iterable
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np

from .atomic import atomic_path, full_suffix
from .dwi import DWI, InputGrid
from .gradients import (
    B0_THRESHOLD,
    UNIT_NORM_ATOL,
    DWIError,
    DWIWarning,
    GradientTable,
    GradientTableError,
    volume_list,
)

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
BVAL_SUFFIXES = (".bval", ".bvals")
BVEC_SUFFIXES = (".bvec", ".bvecs")
ANISOTROPY_RATIO = 1.1  # largest / smallest voxel size above this triggers a warning
GZIP_LEVEL = 1  # fast compression for written NRRDs (nibabel's .nii.gz default is also 1)

_READ_ERRORS = (OSError, EOFError, zlib.error, ValueError, KeyError, IndexError, TypeError, StopIteration)
_SPACE_TO_RAS = {  # NRRD space -> diagonal that maps its coordinates to RAS
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "ras": (1.0, 1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0, 1.0),
    "lps": (-1.0, -1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "las": (-1.0, 1.0, 1.0),
}
_SPATIAL_KINDS = {"domain", "space"}


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


def load_dwi(path, bval=None, bvec=None) -> DWI:
    """Read a DWI (NIfTI + bval/bvec, Slicer DWI NRRD, or 4-D NRRD + bval/bvec) into the internal convention.

    Args:
        path: the image file (.nii, .nii.gz, .nrrd, .nhdr).
        bval, bvec: FSL b-value / b-vector files. Default: found beside the image by name
            (``x.nii.gz`` -> ``x.bval`` / ``x.bvec``, also ``.bvals`` / ``.bvecs``). Required for NIfTI and for
            NRRD files without ``modality:=DWMRI``; when given for a DWMRI NRRD they replace its header gradients.
            The ``.bvec`` may be 3 x N (FSL) or N x 3; a 3 x 3 table is read the way that gives unit vectors
            on the weighted volumes and zeros on the b0s (FSL 3 x N when both do).

    Returns a ``DWI`` whose data are (X, Y, Z, N) float32 in canonical RAS+ voxel order (scl_slope/scl_inter
    applied), b-values in s/mm^2 (b < 50 becomes b0 with a zero b-vector) and unit b-vectors in the canonical
    voxel frame.

    Raises DWIError / GradientTableError naming the file and the problem: missing or unreadable files, an image
    that is not 4-D, counts that disagree, NaN/inf in the image or the table, zero b-vectors on b > 0, no b0,
    two volumes with identical voxel data (so a noise-free simulation with repeated b0s or antipodal pairs is
    refused). Odd-but-legal findings are emitted as DWIWarning and kept in
    ``dwi.warnings``.
    """
    path = Path(path)
    if not path.is_file():
        raise DWIError(f"{path}: {'is a folder, not a DWI file' if path.is_dir() else 'file not found'}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dwi = _load(path, bval, bvec)
    found = tuple(str(w.message) for w in caught if issubclass(w.category, DWIWarning))
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=2)
    logger.info("read %s: %s, %s", path, "x".join(map(str, dwi.data.shape)), dwi.gtab.describe())
    return dataclasses.replace(dwi, warnings=found)


def _load(path: Path, bval, bvec) -> DWI:
    suffix = full_suffix(path).lower()
    if suffix in NIFTI_SUFFIXES:
        data, affine = _read_nifti(path)
        header_table = None
    elif suffix in NRRD_SUFFIXES:
        data, affine, header_table = _read_nrrd(path)
    else:
        raise DWIError(f"{path}: unsupported file type '{suffix}'; use .nii, .nii.gz, .nrrd or .nhdr")
    n_volumes = data.shape[3]
    if header_table is not None and bval is None and bvec is None:
        bvals, bvecs_disk = header_table
        source, inputs = str(path), (str(path),)
    else:
        bval_path, bvec_path = _table_paths(path, bval, bvec)
        bvals, bvecs_disk = _read_fsl_table(path, bval_path, bvec_path, n_volumes, affine)
        source = f"{bval_path}, {bvec_path}"
        inputs = (str(path), str(bval_path), str(bvec_path))
    _check_volumes(path, data)
    return _canonical_dwi(path, data, affine, bvals, bvecs_disk, source, inputs)


def _canonical_dwi(path, data, affine, bvals, bvecs_disk, source, inputs) -> DWI:
    """Reorient on-disk data (X, Y, Z, N) and on-disk voxel-frame b-vectors (N, 3) to the canonical frame."""
    _check_affine(path, affine)
    grid = InputGrid.from_affine(data.shape, affine)
    bvecs = bvecs_disk @ grid.voxel_to_canonical.T
    gtab = GradientTable.create(bvals, bvecs, source=source)
    _warn_voxels(path, affine)
    canonical = np.array(grid.to_canonical(data), dtype=np.float32, order="K")  # positive strides, no transpose
    return DWI(canonical, grid.canonical_affine(), gtab, grid, str(path), (), inputs)


def _check_affine(path: Path, affine: np.ndarray) -> None:
    """DWIError unless the voxel -> world matrix is finite and invertible (a zero sform/qform is neither)."""
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    if not np.all(np.isfinite(linear)) or abs(np.linalg.det(linear)) < 1e-12:
        raise DWIError(
            f"{path}: the voxel-to-world matrix of the header is singular or not finite ({linear.tolist()}); the "
            "image has no usable orientation: fix the header's sform/qform (or NRRD space directions)"
        )


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """NIfTI -> on-disk data (X, Y, Z, N) float32 with scl_slope/scl_inter applied, and the voxel -> RAS affine."""
    try:
        img = nib.load(path)
        data = img.get_fdata(dtype=np.float32)
    except (*_READ_ERRORS, nib.filebasedimages.ImageFileError) as exc:
        raise DWIError(f"{path}: cannot read the NIfTI image (truncated or corrupt file?): {exc}") from exc
    _check_4d(path, data.shape)
    if img.header["sform_code"] == 0 and img.header["qform_code"] == 0:
        warnings.warn(
            f"{path}: sform_code and qform_code are both 0, so the header holds no orientation; the voxel sizes "
            "alone give the voxel-to-world matrix (no rotation, x flipped): check left and right",
            DWIWarning,
        )
    return data, np.asarray(img.affine, dtype=np.float64)


def _check_4d(path: Path, shape: tuple[int, ...]) -> None:
    if len(shape) != 4:
        raise DWIError(
            f"{path}: the image is {len(shape)}-D with shape {shape}; a DWI needs 4-D data (X, Y, Z, volumes)"
        )


def _read_nrrd(path: Path):
    """NRRD -> on-disk data (X, Y, Z, N) float32, voxel -> RAS affine, and (bvals, disk-voxel-frame bvecs) or None.

    The table is None for a plain (non-DWMRI) NRRD.
    """
    try:
        array, header = nrrd.read(str(path), index_order="F")
    except (*_READ_ERRORS, nrrd.NRRDError) as exc:
        raise DWIError(f"{path}: cannot read the NRRD file (garbage header or truncated data?): {exc}") from exc
    _check_4d(path, array.shape)
    list_axis = _nrrd_list_axis(path, header)
    spatial = [axis for axis in range(4) if axis != list_axis]
    data = np.moveaxis(array, list_axis, -1).astype(np.float32)
    to_ras = _nrrd_space(path, header)
    affine = _nrrd_affine(path, header, spatial, to_ras)
    if str(header.get("modality", "")).strip() != "DWMRI":
        return data, affine, None
    bvals, world = _nrrd_gradients(path, header, data.shape[3], to_ras)
    return data, affine, (bvals, _world_to_voxel(world, affine))


def _nrrd_list_axis(path: Path, header: dict) -> int:
    """Index of the one non-spatial (gradient) axis: by ``kinds``, else by its 'none' space direction."""
    kinds = header.get("kinds")
    if kinds is not None:
        axes = [axis for axis, kind in enumerate(kinds) if str(kind).lower() not in _SPATIAL_KINDS]
    else:
        directions = np.asarray(header.get("space directions", np.zeros((4, 3))), dtype=np.float64)
        axes = [axis for axis in range(4) if not np.all(np.isfinite(directions[axis]))]
    if len(axes) != 1:
        raise DWIError(
            f"{path}: expected exactly one non-spatial (gradient) axis, found {len(axes)} (kinds: {kinds})"
        )
    return axes[0]


def _nrrd_space(path: Path, header: dict) -> np.ndarray:
    """(3, 3) diagonal taking coordinates of the NRRD ``space`` to RAS."""
    space = str(header.get("space", "")).lower()
    if space not in _SPACE_TO_RAS:
        raise DWIError(
            f"{path}: NRRD space '{header.get('space')}' is not supported; "
            "use right-anterior-superior (RAS), left-posterior-superior (LPS) or left-anterior-superior (LAS)"
        )
    return np.diag(_SPACE_TO_RAS[space])


def _nrrd_affine(path: Path, header: dict, spatial: list[int], to_ras: np.ndarray) -> np.ndarray:
    """(4, 4) voxel -> RAS affine from ``space directions`` (one row per axis) and ``space origin``."""
    if "space directions" not in header:
        raise DWIError(f"{path}: the NRRD header has no 'space directions'; the voxel geometry is unknown")
    directions = np.asarray(header["space directions"], dtype=np.float64)[spatial]
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = to_ras @ directions.T
    affine[:3, 3] = to_ras @ origin
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DWIError(f"{path}: invalid 'space directions' / 'space origin' in the NRRD header")
    return affine


def _nrrd_gradients(path: Path, header: dict, n_volumes: int, to_ras: np.ndarray):
    """DWMRI keys -> b-values (N,) = b_ref |g|^2 and world RAS gradient directions (N, 3) = to_ras @ M @ g."""
    try:
        b_ref = float(header["DWMRI_b-value"])
    except (KeyError, ValueError) as exc:
        raise DWIError(f"{path}: missing or invalid 'DWMRI_b-value' in a DWMRI NRRD header") from exc
    gradients = _nrrd_gradient_list(path, header)
    if len(gradients) != n_volumes:
        raise GradientTableError(
            f"{path}: {len(gradients)} DWMRI gradients (with DWMRI_NEX repeats) but {n_volumes} volumes"
        )
    if "measurement frame" not in header:
        warnings.warn(
            f"{path}: no 'measurement frame' in the DWMRI header; the gradients are taken as given in the NRRD space "
            f"({header.get('space')}), with an identity frame",
            DWIWarning,
        )
    frame = np.asarray(header.get("measurement frame", np.eye(3)), dtype=np.float64)
    if frame.shape != (3, 3):
        raise DWIError(f"{path}: 'measurement frame' must be 3 vectors of 3, got shape {frame.shape}")
    g = np.asarray(gradients)
    # pynrrd returns each parenthesised vector as a row; those vectors are the columns of M.
    world = g @ (to_ras @ frame.T).T
    return b_ref * np.sum(g**2, axis=1), world


def _nrrd_gradient_list(path: Path, header: dict) -> list[np.ndarray]:
    """DWMRI_gradient_0000, 0001, ... in order, each repeated DWMRI_NEX_NNNN times (default 1)."""
    gradients = []
    index = 0
    while (key := f"DWMRI_gradient_{index:04d}") in header:
        try:
            g = np.array([float(x) for x in str(header[key]).split()], dtype=np.float64)
            repeats = int(header.get(f"DWMRI_NEX_{index:04d}", 1))
        except ValueError as exc:
            raise GradientTableError(f"{path}: {key} / DWMRI_NEX_{index:04d} is not numeric") from exc
        if g.shape != (3,):
            raise GradientTableError(f"{path}: {key} must have 3 numbers, got '{header[key]}'")
        if not np.all(np.isfinite(g)):
            raise GradientTableError(f"{path}: {key} has a NaN/inf component: '{header[key]}'")
        gradients.extend([g] * repeats)
        index += 1
    return gradients


def _world_to_voxel(world: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World RAS vectors (N, 3) -> unit vectors (N, 3) in the voxel frame of ``affine`` (zero rows stay zero)."""
    rotation = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    voxel = world @ np.linalg.inv(rotation).T
    norms = np.linalg.norm(voxel, axis=1, keepdims=True)
    return np.divide(voxel, norms, out=np.zeros_like(voxel), where=norms > 0)


def _table_paths(image: Path, bval, bvec) -> tuple[Path, Path]:
    return _sidecar(image, bval, BVAL_SUFFIXES, "b-value"), _sidecar(image, bvec, BVEC_SUFFIXES, "b-vector")


def _sidecar(image: Path, given, suffixes: tuple[str, ...], what: str) -> Path:
    """The explicit file if given (it must exist), else the first ``<image stem><suffix>`` beside the image."""
    if given is not None:
        given = Path(given)
        if not given.is_file():
            raise DWIError(f"{given}: {what} file for {image.name} not found")
        return given
    candidates = [_stem_path(image).with_name(_stem_path(image).name + suffix) for suffix in suffixes]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(c.name for c in candidates)
    raise DWIError(f"{image}: no {what} file found beside it (looked for {looked}); pass it explicitly")


def _stem_path(path: Path) -> Path:
    """'dir/x.nii.gz' -> 'dir/x'."""
    return path.with_name(path.name[: len(path.name) - len(full_suffix(path))])


def sidecar_paths(image_path) -> tuple[Path, Path]:
    """The FSL table files written beside an image: 'x.nii.gz' -> ('x.bval', 'x.bvec')."""
    stem = _stem_path(Path(image_path))
    return stem.with_name(stem.name + ".bval"), stem.with_name(stem.name + ".bvec")


def _read_fsl_table(image: Path, bval_path: Path, bvec_path: Path, n_volumes: int, affine: np.ndarray):
    """FSL bval/bvec -> b-values (N,) and b-vectors (N, 3) in the on-disk voxel frame (det > 0 x flip undone)."""
    bvals = _read_bvals(bval_path)
    bvecs = _read_bvecs(bvec_path, bvals)
    if len(bvals) != n_volumes:
        raise GradientTableError(f"{bval_path} has {len(bvals)} b-values but {image} has {n_volumes} volumes")
    if len(bvecs) != n_volumes:
        raise GradientTableError(
            f"{bvec_path} has {len(bvecs)} b-vectors but {image} has {n_volumes} volumes"
            f" and {bval_path.name} has {len(bvals)} b-values"
        )
    if np.linalg.det(affine[:3, :3]) > 0:
        bvecs = bvecs * np.array([-1.0, 1.0, 1.0])
    return bvals, bvecs


def _read_numbers(path: Path, what: str) -> np.ndarray:
    """A whitespace-separated numeric table as a 2-D float64 array."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # numpy warns on empty input; reported below
            table = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise GradientTableError(f"{path}: cannot read the {what} file (not a numeric table?): {exc}") from exc
    if table.size == 0:
        raise GradientTableError(f"{path}: the {what} file is empty")
    return table


def _read_bvals(path: Path) -> np.ndarray:
    """FSL .bval: one row (or one column) of N b-values in s/mm^2."""
    table = _read_numbers(path, "b-value")
    if min(table.shape) != 1:
        raise GradientTableError(f"{path}: b-values must be one row, got a {table.shape[0]} x {table.shape[1]} table")
    return table.reshape(-1)


def _read_bvecs(path: Path, bvals: np.ndarray) -> np.ndarray:
    """FSL .bvec: 3 x N (FSL) or N x 3 (transposed, detected by shape) -> (N, 3).

    A 3 x 3 table (three volumes) fits both readings: the one whose rows are unit vectors on the weighted volumes
    and zero on the b0s wins (FSL 3 x N when both fit); a table that fits neither is an error.
    """
    table = _read_numbers(path, "b-vector")
    if table.shape == (3, 3) and len(bvals) == 3:
        fits = [_fits_table(candidate, bvals) for candidate in (table.T, table)]
        if not any(fits):
            raise GradientTableError(
                f"{path}: a 3 x 3 table that is neither 3 x N nor N x 3 b-vectors for the b-values "
                f"{bvals.tolist()} (want unit vectors on weighted volumes, zeros on b0s)"
            )
        if fits[0]:
            return table.T
    elif table.shape[0] == 3:
        return table.T
    if table.shape[1] == 3:
        warnings.warn(f"{path}: b-vectors stored as N x 3 (one vector per row); read as transposed", DWIWarning)
        return table
    raise GradientTableError(
        f"{path}: b-vectors must be 3 x N (FSL) or N x 3, got a {table.shape[0]} x {table.shape[1]} table"
    )


def _fits_table(bvecs: np.ndarray, bvals: np.ndarray) -> bool:
    """(N, 3) rows are unit (within UNIT_NORM_ATOL) on weighted volumes and zero on b0s."""
    norms = np.linalg.norm(bvecs, axis=1)
    weighted = bvals >= B0_THRESHOLD
    unit = np.all(np.abs(norms[weighted] - 1.0) <= UNIT_NORM_ATOL)
    return bool(unit and np.all(norms[~weighted] < UNIT_NORM_ATOL))


def _check_volumes(path: Path, data: np.ndarray) -> None:
    """Raise DWIError for NaN/inf voxels, constant volumes or two volumes with identical voxel data. data: (X, Y, Z, N)."""
    finite = np.isfinite(data).all(axis=(0, 1, 2))
    if not finite.all():
        bad = ", ".join(str(i) for i in np.flatnonzero(~finite))
        raise DWIError(f"{path}: NaN/inf voxel values in volumes {bad}")
    flat = data.reshape(-1, data.shape[3])
    constant = flat.min(axis=0) == flat.max(axis=0)
    if constant.any():
        value = float(flat[0, np.flatnonzero(constant)[0]])
        what = "all zero" if constant.all() and value == 0 else f"constant (every voxel {value:g})"
        raise DWIError(f"{path}: volumes {volume_list(constant)} are {what}: no image in them")
    sums = data.sum(axis=(0, 1, 2), dtype=np.float64)  # identical volumes have identical sums; compare only those
    for first in range(data.shape[3]):
        for index in np.flatnonzero(sums[first + 1 :] == sums[first]) + first + 1:
            if np.array_equal(data[..., first], data[..., index]):
                raise DWIError(
                    f"{path}: volumes {first} and {index} have identical voxel data (a duplicated volume); "
                    "remove the copy and its bval/bvec entries"
                )


def _warn_voxels(path: Path, affine: np.ndarray) -> None:
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    if sizes.max() / sizes.min() > ANISOTROPY_RATIO:
        warnings.warn(
            f"{path}: anisotropic voxels {' x '.join(f'{s:.3g}' for s in sizes)} mm "
            f"(ratio {sizes.max() / sizes.min():.2f})",
            DWIWarning,
        )


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def input_files(dwi: DWI) -> tuple[Path, ...]:
    """Files the DWI was read from (image and its b-value / b-vector files); writers refuse to overwrite them."""
    files = [Path(p) for p in dwi.inputs]
    if dwi.source:
        source = Path(dwi.source)
        stem = _stem_path(source)
        files.append(source)
        files.extend(stem.with_name(stem.name + s) for s in BVAL_SUFFIXES + BVEC_SUFFIXES)
    return tuple(files)


def refuse_inputs(targets: Iterable[Path], protected: Iterable[Path], owner: str) -> None:
    """Raise DWIError if one of ``targets`` is (or links to) one of ``protected``, the input files of ``owner``."""
    protected = [Path(p) for p in protected]
    for target in targets:
        for keep in protected:
            same = target.resolve() == keep.resolve() or (
                target.exists() and keep.exists() and os.path.samefile(target, keep)
            )
            if same:
                raise DWIError(f"{target}: refusing to overwrite an input file of {owner}; choose another output path")


def _check_suffix(path: Path, allowed: tuple[str, ...]) -> None:
    if full_suffix(path).lower() not in allowed:
        raise DWIError(f"{path}: output must end with {' or '.join(allowed)}")


def _disk_bvecs(dwi: DWI) -> np.ndarray:
    """(N, 3) b-vectors in the on-disk voxel frame (inverse of the signed permutation)."""
    return dwi.gtab.bvecs @ dwi.grid.voxel_to_canonical


def _storage_array(data: np.ndarray) -> np.ndarray:
    """int16 when every value is a whole number in int16 range (exact, half the size), else float32."""
    info = np.iinfo(np.int16)
    if data.size and data.min() >= info.min and data.max() <= info.max and np.all(np.mod(data, 1) == 0):
        return data.astype(np.int16)
    return np.asarray(data, dtype=np.float32)


def _fmt(value: float) -> str:
    """Shortest decimal text that reads back as exactly the same float64 (no '-0')."""
    return np.format_float_positional(np.float64(value) + 0.0, unique=True, trim="-")


def _nifti_image(array: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(array, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm")
    return img


def _write_nifti(img: nib.Nifti1Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def _write_text(text: str, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_nifti(dwi: DWI, path) -> tuple[Path, Path, Path]:
    """Write ``path`` (.nii/.nii.gz) plus ``.bval`` and ``.bvec`` beside it, on the DWI's on-disk grid.

    The b-vectors follow the FSL convention (image frame, x negated when det(affine) > 0). Voxels are stored as
    int16 when they are all whole numbers in its range (exact), else float32. Each file is written atomically.
    Returns the three paths. Raises DWIError if any of them is an input file of ``dwi``.
    """
    path = Path(path)
    _check_suffix(path, NIFTI_SUFFIXES)
    bval_path, bvec_path = sidecar_paths(path)
    refuse_inputs((path, bval_path, bvec_path), input_files(dwi), dwi.source)
    bvecs = _disk_bvecs(dwi)
    if np.linalg.det(dwi.grid.affine[:3, :3]) > 0:
        bvecs = bvecs * np.array([-1.0, 1.0, 1.0])
    data = _storage_array(dwi.to_input_grid(dwi.data))
    _write_text(" ".join(_fmt(b) for b in dwi.gtab.bvals) + "\n", bval_path)
    _write_text("".join(" ".join(_fmt(x) for x in row) + "\n" for row in bvecs.T), bvec_path)
    _write_nifti(_nifti_image(data, dwi.grid.affine), path)
    logger.info("wrote %s (+ %s, %s)", path, bval_path.name, bvec_path.name)
    return path, bval_path, bvec_path


def save_nrrd(dwi: DWI, path) -> Path:
    """Write a Slicer DWI NRRD (.nrrd, attached gzip data) on the DWI's on-disk grid, in the Slicer writer layout.

    Space RAS, gradient (list) axis first, ``measurement frame`` = the direction cosines of the on-disk grid,
    gradients in the on-disk voxel frame scaled by sqrt(b / b_ref) with ``DWMRI_b-value`` b_ref = max b, so that
    b = b_ref |g|^2. Voxels are stored as in ``save_nifti`` (int16 when exact, else float32). Written atomically;
    raises DWIError if ``path`` is an input file of ``dwi``.
    """
    path = Path(path)
    _check_suffix(path, (".nrrd",))
    refuse_inputs((path,), input_files(dwi), dwi.source)
    affine = dwi.grid.affine
    rotation = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    b_ref = float(dwi.gtab.bvals.max())
    scale = np.sqrt(dwi.gtab.bvals / b_ref) if b_ref > 0 else np.zeros(len(dwi.gtab))
    gradients = _disk_bvecs(dwi) * scale[:, None]
    header = {
        "dimension": 4,
        "space": "right-anterior-superior",
        "space directions": np.vstack([np.full(3, np.nan), affine[:3, :3].T]),
        "kinds": ["list", "domain", "domain", "domain"],
        "endian": "little",
        "encoding": "gzip",
        "space origin": affine[:3, 3],
        "measurement frame": rotation.T,  # pynrrd writes rows; each written vector is a column of M
        "modality": "DWMRI",
        "DWMRI_b-value": _fmt(b_ref),
    }
    for index, g in enumerate(gradients):
        header[f"DWMRI_gradient_{index:04d}"] = " ".join(_fmt(x) for x in g)
    data = np.moveaxis(_storage_array(dwi.to_input_grid(dwi.data)), 3, 0)
    with atomic_path(path) as tmp:
        nrrd.write(str(tmp), data, header, index_order="F", compression_level=GZIP_LEVEL)
    logger.info("wrote %s", path)
    return path


def save_scalar_nifti(array, affine, path, *, protect: Iterable = ()) -> Path:
    """Write a map (X, Y, Z) or (X, Y, Z, K) with its voxel -> RAS affine as NIfTI, atomically.

    Use it for maps on the input's grid: ``save_scalar_nifti(dwi.to_input_grid(fa), dwi.grid.affine, out,
    protect=input_files(dwi))``. Booleans are written as uint8, float64 as float32. Raises DWIError if ``path``
    is one of ``protect``.
    """
    path = Path(path)
    _check_suffix(path, NIFTI_SUFFIXES)
    refuse_inputs((path,), protect, "the input data")
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif array.dtype == np.float64:
        array = array.astype(np.float32)
    _write_nifti(_nifti_image(array, np.asarray(affine, dtype=np.float64)), path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------------------


def describe(dwi: DWI) -> str:
    """Multi-line summary for the ``info`` command: file, shape, voxel size, on-disk orientation, shells, warnings."""
    sizes = np.linalg.norm(dwi.grid.affine[:3, :3], axis=0)
    gtab = dwi.gtab
    shells = [f"b=0: {int(gtab.b0s_mask.sum())}"]
    shells += [f"b={shell:g}: {int(np.sum(gtab.shell_bvals == shell))}" for shell in gtab.shells]
    lines = [
        f"file: {dwi.source}",
        f"shape on disk: {' x '.join(map(str, dwi.grid.shape))}, {dwi.n_volumes} volumes",
        f"voxel size on disk: {' x '.join(f'{s:.4g}' for s in sizes)} mm",
        f"orientation on disk: {''.join(nib.aff2axcodes(dwi.grid.affine))} (held in memory as RAS)",
        f"protocol: {gtab.describe()}",
        f"shells (volumes): {', '.join(shells)}",
        f"b0 volumes: {int(gtab.b0s_mask.sum())} (b < {B0_THRESHOLD:g} s/mm^2)",
    ]
    lines.append("warnings:" + ("" if dwi.warnings else " none"))
    lines += [f"  - {w}" for w in dwi.warnings]
    return "\n".join(lines)
