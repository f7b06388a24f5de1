"""DWI reading and writing: formats, conventions, real-data pitfalls, validation errors, writers, atomicity."""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest

from DRoPE.atomic import atomic_path, full_suffix
from DRoPE.gradients import DWIError, DWIWarning, GradientTableError
from DRoPE.io import (
    describe,
    input_files,
    load_dwi,
    save_nifti,
    save_nrrd,
    save_scalar_nifti,
    sidecar_paths,
)

CANON = "canon_oblique_all20d"
SIEMENS = "siemens_xa30_b2500"
NRRD_DIR = "nrrd_slicer_dwi"
RAS_TO = {"right-anterior-superior": (1, 1, 1), "left-posterior-superior": (-1, -1, 1), "LAS": (-1, 1, 1)}


def quiet_load(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DWIWarning)
        return load_dwi(*args, **kwargs)


def direction_cosines(affine):
    return affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)


def rotation_matrix(axis, degrees):
    """Rodrigues rotation about a unit axis (3,) by an angle in degrees."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.radians(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def fsl_world(bvec_file, affine):
    """World RAS unit b-vectors (N, 3) from an FSL bvec file, computed here from the FSL definition."""
    bvecs = np.loadtxt(bvec_file).T
    if np.linalg.det(affine[:3, :3]) > 0:
        bvecs[:, 0] *= -1
    norms = np.linalg.norm(bvecs, axis=1, keepdims=True)
    unit = np.divide(bvecs, norms, out=np.zeros_like(bvecs), where=norms > 0)
    return unit @ direction_cosines(affine).T


def hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------------------------------------------
# Synthetic DWIs written to tmp_path
# --------------------------------------------------------------------------------------------------------------

SYN_SHAPE = (6, 5, 4)


def syn_table(n_dw=7, b=1000.0, seed=0):
    """1 b0 + n_dw unit directions: bvals (N,), bvecs (N, 3)."""
    dirs = np.random.default_rng(seed).normal(size=(n_dw, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return np.r_[0.0, np.full(n_dw, b)], np.vstack([np.zeros(3), dirs])


def syn_data(n_volumes, seed=1):
    return np.random.default_rng(seed).integers(100, 1000, size=(*SYN_SHAPE, n_volumes)).astype(np.int16)


def write_syn(folder, name="dwi", affine=None, data=None, bvals=None, bvecs=None, suffix=".nii.gz"):
    """Write a small NIfTI + FSL bval/bvec (bvecs given as (N, 3), written 3 x N). Returns the image path."""
    if bvals is None:
        bvals, bvecs = syn_table()
    data = syn_data(len(bvals)) if data is None else data
    affine = np.diag([-2.0, 2.0, 2.0, 1.0]) if affine is None else affine
    image = folder / f"{name}{suffix}"
    nib.save(nib.Nifti1Image(data, affine), image)
    np.savetxt(folder / f"{name}.bval", np.atleast_2d(bvals), fmt="%.10g")
    np.savetxt(folder / f"{name}.bvec", np.asarray(bvecs).T, fmt="%.12g")
    return image


def oblique_affine():
    affine = np.eye(4)
    affine[:3, :3] = rotation_matrix([1, 2, 3], 25) @ np.diag([-2.0, 2.5, 3.0])
    affine[:3, 3] = [40.0, -30.0, 12.0]
    return affine


# --------------------------------------------------------------------------------------------------------------
# atomic_path
# --------------------------------------------------------------------------------------------------------------


def test_atomic_path_keeps_suffix_and_replaces(tmp_path):
    target = tmp_path / "map.v2.nii.gz"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".nii.gz") and tmp != target
        tmp.write_text("new")
        assert target.read_text() == "old"
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["map.v2.nii.gz"]


def test_atomic_path_error_leaves_target_and_no_temp(tmp_path):
    target = tmp_path / "x.nrrd"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.nrrd"]


def test_atomic_path_nothing_written(tmp_path):
    with pytest.raises(FileNotFoundError), atomic_path(tmp_path / "y.bval"):
        pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "suffix"), [("a.nii.gz", ".nii.gz"), ("a.b.nrrd", ".nrrd"), ("dwi.bval", ".bval"), ("x", "")]
)
def test_full_suffix(name, suffix):
    assert full_suffix(name) == suffix


# --------------------------------------------------------------------------------------------------------------
# Real data: NIfTI conventions and reorientation
# --------------------------------------------------------------------------------------------------------------


def test_nifti_canonical_matches_nibabel_and_fsl_world_bvecs(crops):
    folder = crops / CANON
    dwi = quiet_load(folder / "dwi.nii.gz")
    canonical = nib.as_closest_canonical(nib.load(folder / "dwi.nii.gz"))
    np.testing.assert_array_equal(dwi.data, np.asarray(canonical.dataobj, dtype=np.float32))
    np.testing.assert_allclose(dwi.affine, canonical.affine, atol=1e-6)
    assert dwi.data.dtype == np.float32 and all(s > 0 for s in dwi.data.strides)
    np.testing.assert_allclose(dwi.world_bvecs(), fsl_world(folder / "dwi.bvec", canonical.affine), atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(dwi.gtab.bvecs[1:], axis=1), 1.0, atol=1e-12)
    assert dwi.source == str(folder / "dwi.nii.gz")
    assert set(dwi.inputs) == {str(folder / f"dwi.{s}") for s in ("nii.gz", "bval", "bvec")}


def test_slicer_nrrd_equals_nifti(crops):
    nifti = quiet_load(crops / CANON / "dwi.nii.gz")
    dwi = quiet_load(crops / NRRD_DIR / "canon_oblique_dwi.nrrd")
    np.testing.assert_array_equal(dwi.data, nifti.data)
    np.testing.assert_allclose(dwi.affine, nifti.affine, atol=1e-6)
    np.testing.assert_allclose(dwi.world_bvecs(), nifti.world_bvecs(), atol=1e-6)
    np.testing.assert_allclose(dwi.gtab.bvals, nifti.gtab.bvals, atol=1e-3)
    np.testing.assert_array_equal(dwi.gtab.shell_bvals, nifti.gtab.shell_bvals)
    assert dwi.inputs == (str(crops / NRRD_DIR / "canon_oblique_dwi.nrrd"),)


def test_dwiconvert_slab_equals_nifti_slices(crops):
    """LPS space, list axis last, identity frame: the first on-disk slices of the NIfTI crop, same origin."""
    nifti = quiet_load(crops / CANON / "dwi.nii.gz")
    slab = quiet_load(crops / NRRD_DIR / "canon_oblique_dwi_slab_dwiconvert_style.nrrd")
    n_slices = slab.grid.shape[2]
    np.testing.assert_array_equal(slab.to_input_grid(slab.data), nifti.to_input_grid(nifti.data)[:, :, :n_slices])
    np.testing.assert_allclose(slab.grid.affine, nifti.grid.affine, atol=1e-4)
    np.testing.assert_allclose(slab.world_bvecs(), nifti.world_bvecs(), atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Real-data pitfalls
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b0_value", [0.001, 5.0])
def test_b0_with_direction_and_small_b_becomes_clean_b0(crops, tmp_path, b0_value):
    folder = crops / SIEMENS
    bvals = np.loadtxt(folder / "dwi.bval")
    bvecs = np.loadtxt(folder / "dwi.bvec")
    bvals[0], bvecs[:, 0] = b0_value, [0.6, 0.8, 0.0]
    np.savetxt(tmp_path / "b.bval", bvals[None], fmt="%.6g")
    np.savetxt(tmp_path / "b.bvec", bvecs, fmt="%.8g")
    dwi = quiet_load(folder / "dwi.nii.gz", bval=tmp_path / "b.bval", bvec=tmp_path / "b.bvec")
    clean = quiet_load(folder / "dwi.nii.gz")
    assert dwi.gtab.bvals[0] == 0.0 and dwi.gtab.b0s_mask[0]
    np.testing.assert_array_equal(dwi.gtab.bvecs[0], np.zeros(3))
    np.testing.assert_allclose(dwi.gtab.bvecs[1:], clean.gtab.bvecs[1:], atol=1e-12)


def test_rounding_noise_in_table(crops, tmp_path):
    folder = crops / SIEMENS
    bvals = np.loadtxt(folder / "dwi.bval")
    bvecs = np.loadtxt(folder / "dwi.bvec")
    rng = np.random.default_rng(3)
    bvals[1:] += rng.uniform(-0.3, 0.3, size=len(bvals) - 1)
    bvecs[:, 1:] *= 1.0 + rng.uniform(-1e-4, 1e-4, size=len(bvals) - 1)
    np.savetxt(tmp_path / "n.bval", bvals[None], fmt="%.8f")
    np.savetxt(tmp_path / "n.bvec", bvecs, fmt="%.8f")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dwi = load_dwi(folder / "dwi.nii.gz", bval=tmp_path / "n.bval", bvec=tmp_path / "n.bvec")
    assert not any("unit length" in str(w.message) for w in caught)
    np.testing.assert_array_equal(dwi.gtab.shells, [2500])
    np.testing.assert_allclose(dwi.world_bvecs(), fsl_world(folder / "dwi.bvec", dwi.grid.affine), atol=1e-7)


@pytest.fixture(scope="module")
def philips(crops):
    return quiet_load(crops / "philips_achieva_32dir" / "dwi.nii.gz")


def test_scaled_integer_nifti_applies_slope(crops, philips):
    img = nib.load(crops / "philips_achieva_32dir" / "dwi.nii.gz")
    assert img.dataobj.slope == pytest.approx(704.172, rel=1e-6) and img.dataobj.inter == 0
    on_disk = philips.to_input_grid(philips.data)
    np.testing.assert_allclose(on_disk[..., :3], img.dataobj[..., :3], rtol=1e-6)
    raw = np.asarray(img.dataobj.get_unscaled()[..., 0], dtype=np.float64)
    assert on_disk[..., 0].max() / raw.max() == pytest.approx(704.172, rel=1e-5)
    assert any("anisotropic voxels" in w for w in philips.warnings)


@pytest.fixture(scope="module")
def mappertrac(crops):
    return quiet_load(crops / "mappertrac_sub-011591" / "dwi.nii.gz")


def test_interleaved_b0s_are_found_and_bright(crops, mappertrac):
    b0s = np.flatnonzero(mappertrac.gtab.b0s_mask)
    np.testing.assert_array_equal(b0s, [0, 1, 15, 29, 43, 57])
    mask = nib.as_closest_canonical(nib.load(crops / "mappertrac_sub-011591" / "brain_mask.nii.gz"))
    means = mappertrac.data[np.asarray(mask.dataobj) > 0].mean(axis=0)
    assert means[b0s].min() > 1.5 * np.delete(means, b0s).max()  # b0 signal is not diffusion-attenuated


def test_exact_antipodal_pairs_load(mappertrac):
    bvecs = mappertrac.gtab.bvecs
    np.testing.assert_allclose(bvecs[5], -bvecs[4], atol=1e-6)
    np.testing.assert_allclose(bvecs[13], -bvecs[12], atol=1e-6)
    assert mappertrac.gtab.n_directions == 62


# --------------------------------------------------------------------------------------------------------------
# Synthetic conventions: FSL det > 0 flip, transposed bvecs, NRRD layouts
# --------------------------------------------------------------------------------------------------------------


def test_fsl_det_positive_negates_x(tmp_path):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])  # RAS, det > 0
    bvals, bvecs = syn_table()
    dwi = quiet_load(write_syn(tmp_path, affine=affine, bvals=bvals, bvecs=bvecs))
    np.testing.assert_allclose(dwi.world_bvecs(), bvecs * [-1, 1, 1], atol=1e-12)


def test_transposed_bvec_detected_by_shape(tmp_path):
    image = write_syn(tmp_path, affine=oblique_affine())
    reference = quiet_load(image)
    np.savetxt(tmp_path / "dwi.bvec", np.loadtxt(tmp_path / "dwi.bvec").T, fmt="%.12g")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        transposed = load_dwi(image)
    assert any("N x 3" in str(w.message) and w.category is DWIWarning for w in caught)
    np.testing.assert_allclose(transposed.gtab.bvecs, reference.gtab.bvecs, atol=1e-12)
    assert any("N x 3" in w for w in transposed.warnings)


def test_three_volume_bvec_read_as_fsl_columns(tmp_path):
    """N == 3 is ambiguous; the table is read as FSL 3 x N (each column one vector)."""
    columns = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])  # volume 1 = x, volume 2 = y
    image = write_syn(tmp_path, bvals=np.array([0.0, 1000.0, 1000.0]), bvecs=columns.T)
    dwi = quiet_load(image)
    np.testing.assert_allclose(dwi.world_bvecs(), [[0, 0, 0], [-1, 0, 0], [0, 1, 0]], atol=1e-12)


def test_bvals_bvecs_suffix_variants_and_explicit_names(tmp_path):
    image = write_syn(tmp_path)
    reference = quiet_load(image)
    (tmp_path / "dwi.bval").rename(tmp_path / "dwi.bvals")
    (tmp_path / "dwi.bvec").rename(tmp_path / "grad.txt")
    dwi = quiet_load(image, bvec=tmp_path / "grad.txt")
    np.testing.assert_array_equal(dwi.gtab.bvecs, reference.gtab.bvecs)
    assert str(tmp_path / "grad.txt") in dwi.inputs and str(tmp_path / "dwi.bvals") in dwi.inputs


def write_nrrd_dwi(path, data, affine, world, bvals, space, list_first, frame, nex=None):
    """Write a DWMRI NRRD from RAS affine + world RAS gradient directions, built from the NRRD definitions."""
    to_space = np.diag(RAS_TO[space]).astype(float)
    b_ref = bvals.max()
    g = np.linalg.solve(frame, to_space @ world.T).T * np.sqrt(bvals / b_ref)[:, None]
    directions = (to_space @ affine[:3, :3]).T
    none = np.full((1, 3), np.nan)
    header = {
        "space": space,
        "space directions": np.vstack([none, directions]) if list_first else np.vstack([directions, none]),
        "kinds": ["list", "domain", "domain", "domain"] if list_first else ["space", "space", "space", "list"],
        "space origin": to_space @ affine[:3, 3],
        "measurement frame": frame.T,
        "modality": "DWMRI",
        "DWMRI_b-value": f"{b_ref:g}",
        "encoding": "raw",
    }
    rows = range(len(g)) if nex is None else nex[0]
    for out, index in enumerate(rows):
        header[f"DWMRI_gradient_{out:04d}"] = " ".join(f"{x:.17g}" for x in g[index])
    if nex is not None:
        header.update(nex[1])
    nrrd.write(str(path), np.moveaxis(data, 3, 0) if list_first else data, header, index_order="F")
    return path


@pytest.mark.parametrize("space", list(RAS_TO))
@pytest.mark.parametrize("list_first", [True, False])
@pytest.mark.parametrize("rotated_frame", [False, True])
def test_nrrd_layouts(tmp_path, space, list_first, rotated_frame):
    affine = oblique_affine()
    bvals, world = syn_table()
    bvals[4:] = 2000.0  # two shells: |g| encodes b
    frame = rotation_matrix([3, -1, 2], 40) if rotated_frame else np.eye(3)
    data = syn_data(len(bvals))
    path = write_nrrd_dwi(tmp_path / "d.nrrd", data, affine, world, bvals, space, list_first, frame)
    dwi = quiet_load(path)
    np.testing.assert_allclose(dwi.grid.affine, affine, atol=1e-9)
    np.testing.assert_array_equal(dwi.to_input_grid(dwi.data), data)
    np.testing.assert_allclose(dwi.world_bvecs(), world, atol=1e-9)
    np.testing.assert_allclose(dwi.gtab.bvals, bvals, atol=1e-9)


def test_nrrd_nex_repeats_gradients(tmp_path):
    bvals, world = syn_table(n_dw=6)
    bvals, world = np.r_[0.0, bvals], np.vstack([np.zeros(3), world])  # two b0 volumes
    nex = ([0] + list(range(2, 8)), {"DWMRI_NEX_0000": "2"})
    data = syn_data(len(bvals))
    path = write_nrrd_dwi(tmp_path / "n.nrrd", data, oblique_affine(), world, bvals, "LAS", True, np.eye(3), nex)
    dwi = quiet_load(path)
    np.testing.assert_array_equal(np.flatnonzero(dwi.gtab.b0s_mask), [0, 1])
    np.testing.assert_allclose(dwi.world_bvecs(), world, atol=1e-9)


def test_plain_nrrd_with_fsl_files(tmp_path):
    affine = oblique_affine()
    bvals, bvecs = syn_table()
    nifti = quiet_load(write_syn(tmp_path, affine=affine, bvals=bvals, bvecs=bvecs))
    header = {
        "space": "left-posterior-superior",
        "space directions": np.vstack([(np.diag([-1.0, -1, 1]) @ affine[:3, :3]).T, np.full((1, 3), np.nan)]),
        "kinds": ["space", "space", "space", "list"],
        "space origin": np.diag([-1.0, -1, 1]) @ affine[:3, 3],
    }
    nrrd.write(str(tmp_path / "plain.nrrd"), np.asarray(nib.load(tmp_path / "dwi.nii.gz").dataobj), header)
    shutil.copy(tmp_path / "dwi.bval", tmp_path / "plain.bval")
    shutil.copy(tmp_path / "dwi.bvec", tmp_path / "plain.bvec")
    dwi = quiet_load(tmp_path / "plain.nrrd")
    np.testing.assert_array_equal(dwi.data, nifti.data)
    np.testing.assert_allclose(dwi.affine, nifti.affine, atol=1e-9)
    np.testing.assert_allclose(dwi.world_bvecs(), nifti.world_bvecs(), atol=1e-12)


# --------------------------------------------------------------------------------------------------------------
# Warnings
# --------------------------------------------------------------------------------------------------------------


def test_warnings_emitted_and_kept(tmp_path):
    bvals, bvecs = syn_table(n_dw=4)
    bvecs[2] *= 0.9
    image = write_syn(tmp_path, affine=np.diag([-2.0, 2.0, 3.0, 1.0]), bvals=bvals, bvecs=bvecs)
    with pytest.warns(DWIWarning) as caught:
        dwi = load_dwi(image)
    emitted = [str(w.message) for w in caught if issubclass(w.category, DWIWarning)]
    for words in ("not unit length", "single-shell", "only 4 distinct directions", "anisotropic voxels"):
        assert any(words in w for w in dwi.warnings), words
        assert any(words in w for w in emitted), words


# --------------------------------------------------------------------------------------------------------------
# Validation errors: every one names the file and the problem and leaves the inputs untouched
# --------------------------------------------------------------------------------------------------------------


def _rewrite_bval(folder, change):
    values = np.loadtxt(folder / "dwi.bval")
    (folder / "dwi.bval").write_text(change(values))


def _rewrite_bvec(folder, change):
    table = np.loadtxt(folder / "dwi.bvec")
    (folder / "dwi.bvec").write_text(change(table))


def _table_text(table):
    return "\n".join(" ".join(f"{x:.10g}" for x in row) for row in np.atleast_2d(table)) + "\n"


def _set(values, index, value):
    values = values.copy()
    values[index] = value
    return values


def _image_with(folder, change):
    img = nib.load(folder / "dwi.nii.gz")
    data = change(np.asarray(img.dataobj).astype(np.float32))
    nib.save(nib.Nifti1Image(data, img.affine), folder / "dwi.nii.gz")


def _truncate(path, keep):
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


def _nrrd_header(folder, **changes):
    bvals, world = syn_table()
    path = write_nrrd_dwi(folder / "x.nrrd", syn_data(8), oblique_affine(), world, bvals, "LAS", True, np.eye(3))
    data, header = nrrd.read(str(path), index_order="F")
    for key, value in changes.items():
        if value is None:
            header.pop(key.replace("__", "-"))
        else:
            header[key.replace("__", "-")] = value
    path.unlink()
    nrrd.write(str(path), data, header, index_order="F")
    return path


def _duplicate(data):
    data[..., 5] = data[..., 2]
    return data


def _nan_voxel(data):
    data[1, 2, 3, 2] = np.nan
    return data


# name -> (make the bad files in the folder of a synthetic dwi.nii.gz and return what to load: nothing for
# dwi.nii.gz, a path, or (path, load kwargs); the error; words the message must hold)
ERROR_CASES = {
    "bval count": (
        lambda f: _rewrite_bval(f, lambda v: _table_text(v[:-1])),
        GradientTableError,
        ["dwi.bval", "7 b-values", "8 volumes"],
    ),
    "bvec count": (
        lambda f: _rewrite_bvec(f, lambda t: _table_text(np.c_[t, t[:, 1]])),
        GradientTableError,
        ["dwi.bvec", "9 b-vectors", "8 volumes"],
    ),
    "nan bval": (lambda f: _rewrite_bval(f, lambda v: _table_text(_set(v, 3, np.nan))), GradientTableError, ["NaN"]),
    "inf bvec": (
        lambda f: _rewrite_bvec(f, lambda t: _table_text(_set(t, (1, 4), np.inf))),
        GradientTableError,
        ["dwi.bvec", "NaN/inf", "volumes 4"],
    ),
    "negative b": (
        lambda f: _rewrite_bval(f, lambda v: _table_text(_set(v, 2, -1000))),
        GradientTableError,
        ["dwi.bval", "negative", "volumes 2"],
    ),
    "zero bvec": (
        lambda f: _rewrite_bvec(f, lambda t: _table_text(_set(t, (slice(None), 4), 0.0))),
        GradientTableError,
        ["dwi.bvec", "zero-norm", "volumes 4"],
    ),
    "no b0": (
        lambda f: (
            _rewrite_bval(f, lambda v: _table_text(_set(v, 0, 1000))),
            _rewrite_bvec(f, lambda t: _table_text(_set(t, (slice(None), 0), 0.6))),
        ),
        GradientTableError,
        ["dwi.bval", "no b0"],
    ),
    "bvec shape": (
        lambda f: _rewrite_bvec(f, lambda t: _table_text(np.r_[t, t[:1]])),
        GradientTableError,
        ["dwi.bvec", "3 x N", "4 x 8"],
    ),
    "bval two rows": (
        lambda f: _rewrite_bval(f, lambda v: _table_text(np.r_[[v], [v]])),
        GradientTableError,
        ["dwi.bval", "one row"],
    ),
    "bval not numeric": (
        lambda f: (f / "dwi.bval").write_text("0 1000 abc\n"),
        GradientTableError,
        ["dwi.bval", "numeric"],
    ),
    "bvec empty": (lambda f: (f / "dwi.bvec").write_text(""), GradientTableError, ["dwi.bvec", "empty"]),
    "nan voxels": (lambda f: _image_with(f, _nan_voxel), DWIError, ["dwi.nii.gz", "NaN/inf voxel", "volumes 2"]),
    "duplicate volume": (
        lambda f: _image_with(f, _duplicate),
        DWIError,
        ["dwi.nii.gz", "volumes 2 and 5", "identical"],
    ),
    "3-D image": (lambda f: _image_with(f, lambda d: d[..., 0]), DWIError, ["dwi.nii.gz", "3-D", "4-D"]),
    "missing bval": (lambda f: (f / "dwi.bval").unlink(), DWIError, ["dwi.nii.gz", "no b-value file", "dwi.bval"]),
    "missing bvec": (lambda f: (f / "dwi.bvec").unlink(), DWIError, ["dwi.nii.gz", "no b-vector file", "dwi.bvec"]),
    "explicit bval missing": (
        lambda f: ((f / "dwi.nii.gz"), {"bval": f / "nope.bval"}),
        DWIError,
        ["nope.bval", "not found"],
    ),
    "truncated gzip": (lambda f: _truncate(f / "dwi.nii.gz", 0.6), DWIError, ["dwi.nii.gz", "truncated or corrupt"]),
    "garbage gzip": (
        lambda f: (f / "dwi.nii.gz").write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4),
        DWIError,
        ["dwi.nii.gz", "cannot read"],
    ),
    "garbage nrrd header": (
        lambda f: _write(f / "x.nrrd", b"NRRD0005\ntype: float\nsizes: a b c\n\n\x00\x01"),
        DWIError,
        ["x.nrrd", "cannot read the NRRD"],
    ),
    "not an nrrd": (lambda f: _write(f / "x.nrrd", b"hello\n\n"), DWIError, ["x.nrrd", "cannot read"]),
    "nrrd gradient count": (
        lambda f: _nrrd_header(f, DWMRI_gradient_0007=None),
        GradientTableError,
        ["x.nrrd", "7 DWMRI gradients", "8 volumes"],
    ),
    "nrrd bad gradient": (
        lambda f: _nrrd_header(f, DWMRI_gradient_0003="1 0"),
        GradientTableError,
        ["x.nrrd", "DWMRI_gradient_0003", "3 numbers"],
    ),
    "nrrd no b-value": (
        lambda f: _nrrd_header(f, DWMRI_b__value=None),
        DWIError,
        ["x.nrrd", "DWMRI_b-value"],
    ),
    "nrrd space": (lambda f: _nrrd_header(f, space="scanner-xyz"), DWIError, ["x.nrrd", "not supported"]),
    "nrrd two list axes": (
        lambda f: _nrrd_header(f, kinds=["list", "list", "domain", "domain"]),
        DWIError,
        ["x.nrrd", "one non-spatial"],
    ),
    "unsupported suffix": (lambda f: _write(f / "x.mha", b"x"), DWIError, ["x.mha", "unsupported"]),
    "image missing": (lambda f: f / "gone.nii.gz", DWIError, ["gone.nii.gz", "file not found"]),
}


def _write(path, raw):
    path.write_bytes(raw)
    return path


def _target(folder, made):
    """What an error case loads: its returned path (and load kwargs), else the synthetic dwi.nii.gz."""
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[1], dict):
        return made
    if isinstance(made, Path):
        return made, {}
    return folder / "dwi.nii.gz", {}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_validation_errors(tmp_path, case):
    make, error, words = ERROR_CASES[case]
    write_syn(tmp_path)
    target, kwargs = _target(tmp_path, make(tmp_path))
    before = hashes(tmp_path)
    with pytest.raises(error) as info:
        quiet_load(target, **kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert hashes(tmp_path) == before


def test_truncated_real_nifti(crops, tmp_path):
    for name in ("dwi.bval", "dwi.bvec"):
        shutil.copy(crops / CANON / name, tmp_path / name)
    whole = (crops / CANON / "dwi.nii.gz").read_bytes()
    (tmp_path / "dwi.nii.gz").write_bytes(whole[: len(whole) // 2])
    before = hashes(tmp_path)
    with pytest.raises(DWIError, match="dwi.nii.gz: cannot read the NIfTI image"):
        load_dwi(tmp_path / "dwi.nii.gz")
    assert hashes(tmp_path) == before


# --------------------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def canon(crops):
    return quiet_load(crops / CANON / "dwi.nii.gz")


def test_round_trip_nifti_nrrd_nifti(crops, canon, tmp_path):
    save_nrrd(canon, tmp_path / "a.nrrd")
    via_nrrd = quiet_load(tmp_path / "a.nrrd")
    written = save_nifti(via_nrrd, tmp_path / "b.nii.gz")
    assert written == (tmp_path / "b.nii.gz", tmp_path / "b.bval", tmp_path / "b.bvec")
    back = quiet_load(tmp_path / "b.nii.gz")
    for dwi in (via_nrrd, back):
        np.testing.assert_array_equal(dwi.data, canon.data)
        np.testing.assert_allclose(dwi.affine, canon.affine, atol=1e-6)
        np.testing.assert_allclose(dwi.gtab.bvals, canon.gtab.bvals, rtol=1e-12)
        np.testing.assert_allclose(dwi.gtab.bvecs, canon.gtab.bvecs, atol=1e-12)
    # on disk: the original grid and FSL frame (det < 0: bvec = voxel-frame unit vector)
    original = nib.load(crops / CANON / "dwi.nii.gz")
    out = nib.load(tmp_path / "b.nii.gz")
    np.testing.assert_allclose(out.affine, original.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.dataobj), np.asarray(original.dataobj))
    source_bvecs = np.loadtxt(crops / CANON / "dwi.bvec")
    norms = np.linalg.norm(source_bvecs, axis=0)
    unit = np.divide(source_bvecs, norms, out=np.zeros_like(source_bvecs), where=norms > 0)
    np.testing.assert_allclose(np.loadtxt(tmp_path / "b.bvec"), unit, atol=1e-12)
    np.testing.assert_allclose(np.loadtxt(tmp_path / "b.bval"), np.loadtxt(crops / CANON / "dwi.bval"))


def test_saved_nrrd_header_follows_slicer_layout(crops, canon, tmp_path):
    save_nrrd(canon, tmp_path / "s.nrrd")
    data, header = nrrd.read(str(tmp_path / "s.nrrd"), index_order="F")
    assert header["space"] == "right-anterior-superior" and header["modality"] == "DWMRI"
    assert list(header["kinds"]) == ["list", "domain", "domain", "domain"] and data.shape[0] == 13
    frame = np.asarray(header["measurement frame"]).T
    g = np.array([[float(x) for x in header[f"DWMRI_gradient_{i:04d}"].split()] for i in range(13)])
    b_ref = float(header["DWMRI_b-value"])
    world = g @ frame.T
    norms = np.linalg.norm(world, axis=1, keepdims=True)
    unit = np.divide(world, norms, out=np.zeros_like(world), where=norms > 0)
    img = nib.load(crops / CANON / "dwi.nii.gz")
    np.testing.assert_allclose(unit, fsl_world(crops / CANON / "dwi.bvec", img.affine), atol=1e-9)
    np.testing.assert_allclose(b_ref * np.sum(g**2, axis=1), np.loadtxt(crops / CANON / "dwi.bval"), rtol=1e-12)
    directions = np.asarray(header["space directions"])[1:]
    np.testing.assert_allclose(directions.T, img.affine[:3, :3], atol=1e-5)


def test_multishell_nrrd_scales_gradients(tmp_path):
    bvals, bvecs = syn_table(n_dw=9)
    bvals[4:7], bvals[7:] = 2000.0, 3000.0
    dwi = quiet_load(write_syn(tmp_path, affine=oblique_affine(), bvals=bvals, bvecs=bvecs))
    save_nrrd(dwi, tmp_path / "m.nrrd")
    _, header = nrrd.read(str(tmp_path / "m.nrrd"))
    assert float(header["DWMRI_b-value"]) == 3000.0
    g = np.array([[float(x) for x in header[f"DWMRI_gradient_{i:04d}"].split()] for i in range(len(bvals))])
    np.testing.assert_allclose(np.linalg.norm(g, axis=1), np.sqrt(bvals / 3000.0), atol=1e-12)
    back = quiet_load(tmp_path / "m.nrrd")
    np.testing.assert_allclose(back.gtab.bvals, bvals, rtol=1e-12)
    np.testing.assert_allclose(back.world_bvecs(), dwi.world_bvecs(), atol=1e-12)


def test_save_nifti_det_positive_writes_fsl_flip(tmp_path):
    affine = oblique_affine() @ np.diag([-1.0, 1.0, 1.0, 1.0])
    assert np.linalg.det(affine[:3, :3]) > 0
    bvals, bvecs = syn_table()
    dwi = quiet_load(write_syn(tmp_path, affine=affine, bvals=bvals, bvecs=bvecs))
    np.testing.assert_allclose(dwi.world_bvecs(), fsl_world(tmp_path / "dwi.bvec", affine), atol=1e-12)
    (tmp_path / "out").mkdir()
    save_nifti(dwi, tmp_path / "out" / "o.nii")
    np.testing.assert_allclose(np.loadtxt(tmp_path / "out" / "o.bvec"), bvecs.T, atol=1e-12)
    np.testing.assert_allclose(nib.load(tmp_path / "out" / "o.nii").affine, affine, atol=1e-6)


def test_float_data_written_as_float32(tmp_path):
    data = syn_data(8).astype(np.float32) + 0.25
    dwi = quiet_load(write_syn(tmp_path, data=data))
    save_nifti(dwi, tmp_path / "f.nii.gz")
    assert nib.load(tmp_path / "f.nii.gz").get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "f.nii.gz").dataobj), data)


@pytest.mark.parametrize("output", ["dwi.nii.gz", "dwi.nii"])  # dwi.nii would overwrite dwi.bval / dwi.bvec
def test_writers_refuse_to_overwrite_inputs(tmp_path, output):
    dwi = quiet_load(write_syn(tmp_path))
    before = hashes(tmp_path)
    with pytest.raises(DWIError, match="refusing to overwrite an input file"):
        save_nifti(dwi, tmp_path / output)
    assert hashes(tmp_path) == before


def test_nrrd_writer_refuses_its_source(tmp_path):
    save_nrrd(quiet_load(write_syn(tmp_path)), tmp_path / "x.nrrd")
    dwi = quiet_load(tmp_path / "x.nrrd")
    before = hashes(tmp_path)
    with pytest.raises(DWIError, match="x.nrrd: refusing to overwrite an input file"):
        save_nrrd(dwi, tmp_path / "x.nrrd")
    assert hashes(tmp_path) == before


def test_writer_refuses_explicit_table_inputs(tmp_path):
    """Image in.nii.gz with tables out.bval/out.bvec: writing out.nii.gz would overwrite them."""
    image = write_syn(tmp_path, name="in")
    (tmp_path / "in.bval").rename(tmp_path / "out.bval")
    (tmp_path / "in.bvec").rename(tmp_path / "out.bvec")
    dwi = quiet_load(image, bval=tmp_path / "out.bval", bvec=tmp_path / "out.bvec")
    before = hashes(tmp_path)
    with pytest.raises(DWIError, match="out.bval: refusing"):
        save_nifti(dwi, tmp_path / "out.nii.gz")
    assert hashes(tmp_path) == before
    assert {str(p) for p in input_files(dwi)} >= {str(tmp_path / n) for n in ("in.nii.gz", "out.bval", "out.bvec")}


def test_writer_failure_is_atomic(tmp_path, monkeypatch):
    dwi = quiet_load(write_syn(tmp_path))
    save_nifti(dwi, tmp_path / "o.nii.gz")
    before = hashes(tmp_path)

    def broken_save(img, filename):
        filename.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_nifti(dwi, tmp_path / "o.nii.gz")
    assert hashes(tmp_path) == before


def test_save_scalar_nifti(tmp_path, canon):
    fa = np.random.default_rng(0).random(canon.shape)
    on_disk = canon.to_input_grid(fa)
    out = save_scalar_nifti(on_disk, canon.grid.affine, tmp_path / "fa.nii.gz")
    img = nib.load(out)
    assert img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.get_fdata(), on_disk, rtol=1e-6)
    np.testing.assert_allclose(nib.as_closest_canonical(img).get_fdata(), fa, rtol=1e-6)
    mask = save_scalar_nifti(on_disk > 0.5, canon.grid.affine, tmp_path / "m.nii")
    assert nib.load(mask).get_data_dtype() == np.uint8
    assert sidecar_paths(tmp_path / "fa.nii.gz") == (tmp_path / "fa.bval", tmp_path / "fa.bvec")


def test_save_scalar_nifti_refuses_inputs(tmp_path):
    """Only tmp_path files are ever passed to a writer: a broken refusal must not be able to hit shared data."""
    dwi = quiet_load(write_syn(tmp_path))
    before = hashes(tmp_path)
    with pytest.raises(DWIError, match="dwi.nii.gz: refusing to overwrite"):
        save_scalar_nifti(np.zeros(SYN_SHAPE), dwi.grid.affine, tmp_path / "dwi.nii.gz", protect=input_files(dwi))
    assert hashes(tmp_path) == before


def test_describe(canon):
    text = describe(canon)
    for words in (
        canon.source,
        "41 x 49 x 17, 13 volumes",
        "3 x 3 x 3 mm",
        "orientation on disk: LAS",
        "b=0: 1",
        "b=1500: 12",
        "12 directions",
        "single-shell",
    ):
        assert words in text, words
    assert len(text.splitlines()) >= 8
