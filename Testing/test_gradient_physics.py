"""Gradient handling is physically right on real brains: DTI principal directions land in the right world axes.

The corpus callosum (mid-sagittal, above the ventricles) runs left-right, so world-space V1 there has a large
|x| component. The same world V1 must come out whatever the file layout: NIfTI, both NRRD layouts, a round
trip through the writers, and the same scan stored with permuted/flipped axes. The scans are the in-repository
crops of Testing/Data, each centred on the corpus-callosum body (see make_test_data.py there). DTI is fitted with
DIPY directly (TensorModel, WLS) on small ROIs only, to keep the run short.
"""

from __future__ import annotations

import warnings

import nibabel as nib
import nrrd
import numpy as np
import pytest
from conftest import REAL_BRAINS
from dipy.core.gradients import gradient_table
from dipy.reconst.dti import TensorModel

from DRoPE.gradients import DWIWarning
from DRoPE.io import load_dwi, save_nifti, save_nrrd

CC_MIN_ABS_X = 0.8
CC_HALF_MM = np.array([4.0, 20.0, 8.0])  # corpus-callosum ROI: world box around the crop centre (x, y, z)
SAME_V1_COS = 0.9999  # identical voxels and gradient tables must give the same V1

# (permutation of the spatial axes, new axes to flip) for crafted on-disk layouts; comments give the det sign
# of the crafted affine, det > 0 exercising the FSL x flip.
LAYOUTS = [
    ((1, 0, 2), ()),  # det > 0
    ((0, 1, 2), (1,)),  # det > 0
    ((2, 0, 1), (0, 2)),  # det < 0
]


@pytest.fixture(autouse=True)
def _quiet_dwi_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DWIWarning)
        yield


@pytest.fixture(scope="module")
def brains(crops):
    """name -> (DWI, canonical brain mask (X, Y, Z) bool), loaded once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DWIWarning)
                dwi = load_dwi(crops / name / "dwi.nii.gz")
            mask_img = nib.as_closest_canonical(nib.load(crops / name / "brain_mask.nii.gz"))
            np.testing.assert_allclose(mask_img.affine, dwi.affine, atol=1e-4)
            cache[name] = (dwi, np.asarray(mask_img.dataobj) > 0)
        return cache[name]

    return get


def world_coords(affine, ijk):
    """ijk: (M, 3) voxel indices -> (M, 3) world RAS mm."""
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def cc_roi(mask, affine):
    """Corpus-callosum ROI: mask voxels within CC_HALF_MM (world x, y, z) of the centre of the crop, which is the
    corpus-callosum body on the mid-sagittal plane. mask: (X, Y, Z) bool."""
    ijk = np.argwhere(mask)
    centre = world_coords(affine, (np.array(mask.shape) - 1) / 2)
    keep = np.all(np.abs(world_coords(affine, ijk) - centre) <= CC_HALF_MM, axis=1)
    roi = np.zeros_like(mask)
    roi[tuple(ijk[keep].T)] = True
    return roi


def fit_world_v1(dwi, roi):
    """DIPY WLS tensor in the ROI voxels -> FA (M,) and world-space V1 (M, 3) = rotation @ v1."""
    gtab = gradient_table(dwi.gtab.bvals, bvecs=dwi.gtab.bvecs)
    fit = TensorModel(gtab).fit(dwi.data[roi])
    return fit.fa, fit.evecs[..., 0] @ dwi.rotation.T


def cc_abs_x(dwi, roi):
    fa, v1 = fit_world_v1(dwi, roi)
    high = fa > 0.4
    assert high.sum() >= 20, f"only {high.sum()} voxels with FA > 0.4 in the CC ROI"
    return float(np.median(np.abs(v1[high, 0])))


def v1_agreement(fa_a, v1_a, v1_b):
    """Smallest |cos| between two V1 fields over voxels with FA > 0.2 (V1 is an axis: sign ignored)."""
    cos = np.abs(np.sum(v1_a * v1_b, axis=1))
    return float(cos[fa_a > 0.2].min())


@pytest.mark.parametrize("name", REAL_BRAINS)
def test_corpus_callosum_points_left_right(brains, name):
    dwi, mask = brains(name)
    roi = cc_roi(mask, dwi.affine)
    assert cc_abs_x(dwi, roi) > CC_MIN_ABS_X


def test_cc_check_rejects_swapped_axes(brains):
    """Negative control: the same check fails when the b-vector x and y components are swapped."""
    dwi, mask = brains("mappertrac_sub-011591")
    swapped = dwi.gtab.transformed(np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]]))
    wrong = type(dwi)(dwi.data, dwi.affine, swapped, dwi.grid, dwi.source)
    assert cc_abs_x(wrong, cc_roi(mask, dwi.affine)) < 0.5


# --------------------------------------------------------------------------------------------------------------
# NRRD input (both layouts) and round trips give the same world V1 as the NIfTI
# --------------------------------------------------------------------------------------------------------------


def test_slicer_nrrd_same_world_v1(brains, crops):
    nifti, mask = brains("canon_oblique_all20d")
    roi = cc_roi(mask, nifti.affine)
    dwi = load_dwi(crops / "nrrd_slicer_dwi" / "canon_oblique_dwi.nrrd")
    np.testing.assert_array_equal(dwi.data, nifti.data)
    fa, v1_nifti = fit_world_v1(nifti, roi)
    _, v1_nrrd = fit_world_v1(dwi, roi)
    assert v1_agreement(fa, v1_nifti, v1_nrrd) > SAME_V1_COS
    assert cc_abs_x(dwi, roi) > CC_MIN_ABS_X


def test_dwiconvert_slab_nrrd_same_world_v1(brains, crops):
    """LPS, list axis last, identity measurement frame, the first on-disk slices of the NIfTI crop."""
    nifti, mask = brains("canon_oblique_all20d")
    slab = load_dwi(crops / "nrrd_slicer_dwi" / "canon_oblique_dwi_slab_dwiconvert_style.nrrd")
    n_slices = slab.grid.shape[2]
    on_disk = nifti.to_input_grid(nifti.data)[:, :, :n_slices]
    np.testing.assert_array_equal(slab.to_input_grid(slab.data), on_disk)
    slab_mask = slab.grid.to_canonical(nifti.to_input_grid(mask)[:, :, :n_slices])
    in_slab = np.zeros(nifti.grid.shape, bool)
    in_slab[:, :, :n_slices] = True
    nifti_roi = nifti.grid.to_canonical(in_slab) & mask
    fa, v1_nifti = fit_world_v1(nifti, nifti_roi)
    _, v1_slab = fit_world_v1(slab, slab_mask)
    # both ROIs list the same voxels: check by world position before comparing directions
    np.testing.assert_allclose(
        world_coords(nifti.affine, np.argwhere(nifti_roi)), world_coords(slab.affine, np.argwhere(slab_mask)), atol=1e-3
    )
    assert v1_agreement(fa, v1_nifti, v1_slab) > SAME_V1_COS


def test_nrrd_check_rejects_ignored_measurement_frame(brains, crops, tmp_path):
    """Negative control: the Slicer NRRD with its measurement frame replaced by identity gives other V1s."""
    nifti, mask = brains("canon_oblique_all20d")
    data, header = nrrd.read(str(crops / "nrrd_slicer_dwi" / "canon_oblique_dwi.nrrd"), index_order="F")
    header["measurement frame"] = np.eye(3)
    nrrd.write(str(tmp_path / "no_frame.nrrd"), data, header, index_order="F")
    wrong = load_dwi(tmp_path / "no_frame.nrrd")
    roi = cc_roi(mask, nifti.affine)
    fa, v1_nifti = fit_world_v1(nifti, roi)
    _, v1_wrong = fit_world_v1(wrong, roi)
    assert v1_agreement(fa, v1_nifti, v1_wrong) < 0.5


@pytest.mark.parametrize("name", ["canon_oblique_all20d", "siemens_xa30_b2500"])
def test_round_trip_keeps_world_v1(brains, name, tmp_path):
    """NIfTI -> save_nrrd -> load -> save_nifti -> load gives the same world V1 as the original."""
    dwi, mask = brains(name)
    save_nrrd(dwi, tmp_path / "a.nrrd")
    save_nifti(load_dwi(tmp_path / "a.nrrd"), tmp_path / "b.nii.gz")
    back = load_dwi(tmp_path / "b.nii.gz")
    roi = cc_roi(mask, dwi.affine)
    fa, v1 = fit_world_v1(dwi, roi)
    _, v1_back = fit_world_v1(back, roi)
    assert v1_agreement(fa, v1, v1_back) > SAME_V1_COS
    assert cc_abs_x(back, roi) > CC_MIN_ABS_X


# --------------------------------------------------------------------------------------------------------------
# The same scan stored with permuted / flipped axes (crafted NIfTI + FSL bvecs)
# --------------------------------------------------------------------------------------------------------------


def reorder_on_disk(array, affine, perm, flips):
    """Store the array with its spatial axes permuted then flipped, with the affine that keeps world positions.

    New array B: before flipping B[j] = A[i] with i[perm[a]] = j[a]; a flipped new axis a reads n_a - 1 - j[a].
    Returns (B, new affine = affine @ T) where i = T @ j (homogeneous voxel indices).
    """
    new = np.transpose(array, (*perm, *range(3, array.ndim)))
    new = np.flip(new, axis=flips) if flips else new
    index_map = np.zeros((4, 4))
    index_map[3, 3] = 1.0
    for axis, source in enumerate(perm):
        flipped = axis in flips
        index_map[source, axis] = -1.0 if flipped else 1.0
        index_map[source, 3] = new.shape[axis] - 1 if flipped else 0.0
    return np.ascontiguousarray(new), affine @ index_map


def fsl_bvecs_for(affine, world):
    """World RAS unit vectors (N, 3) -> FSL bvec table (3, N) for an image with this affine (independent of DRoPE)."""
    rotation = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    voxel = np.linalg.solve(rotation, world.T)
    if np.linalg.det(affine[:3, :3]) > 0:
        voxel[0] *= -1
    return voxel


def write_fsl(folder, name, array, affine, bvals, bvec_table):
    image = folder / f"{name}.nii"
    nib.save(nib.Nifti1Image(array, affine), image)
    np.savetxt(folder / f"{name}.bval", bvals[None], fmt="%.10g")
    np.savetxt(folder / f"{name}.bvec", bvec_table, fmt="%.12g")
    return image


def original_world_bvecs(crops, name):
    """World RAS unit b-vectors straight from the FSL files (the source affine has det < 0: no flip)."""
    img = nib.load(crops / name / "dwi.nii.gz")
    assert np.linalg.det(img.affine[:3, :3]) < 0
    rotation = img.affine[:3, :3] / np.linalg.norm(img.affine[:3, :3], axis=0)
    bvecs = np.loadtxt(crops / name / "dwi.bvec").T
    norms = np.linalg.norm(bvecs, axis=1, keepdims=True)
    unit = np.divide(bvecs, norms, out=np.zeros_like(bvecs), where=norms > 0)
    return img, unit @ rotation.T


@pytest.mark.parametrize(("perm", "flips"), LAYOUTS)
def test_permuted_flipped_layout_same_world_v1(brains, crops, tmp_path, perm, flips):
    name = "canon_oblique_all20d"
    dwi, mask = brains(name)
    img, world = original_world_bvecs(crops, name)
    array, affine = reorder_on_disk(np.asarray(img.dataobj), img.affine, perm, flips)
    bvals = np.loadtxt(crops / name / "dwi.bval")
    crafted = load_dwi(write_fsl(tmp_path, "crafted", array, affine, bvals, fsl_bvecs_for(affine, world)))
    np.testing.assert_array_equal(crafted.data, dwi.data)
    np.testing.assert_allclose(crafted.affine, dwi.affine, atol=1e-4)
    roi = cc_roi(mask, dwi.affine)
    fa, v1 = fit_world_v1(dwi, roi)
    _, v1_crafted = fit_world_v1(crafted, roi)
    assert v1_agreement(fa, v1, v1_crafted) > SAME_V1_COS
    assert cc_abs_x(crafted, roi) > CC_MIN_ABS_X


def test_layout_check_rejects_missing_fsl_flip(brains, crops, tmp_path):
    """Negative control: a det > 0 layout whose bvecs lack the FSL x flip gives other V1s."""
    name = "canon_oblique_all20d"
    dwi, mask = brains(name)
    img, world = original_world_bvecs(crops, name)
    array, affine = reorder_on_disk(np.asarray(img.dataobj), img.affine, (1, 0, 2), ())
    assert np.linalg.det(affine[:3, :3]) > 0
    table = fsl_bvecs_for(affine, world)
    table[0] *= -1  # undo the flip: vectors now in the plain voxel frame
    bvals = np.loadtxt(crops / name / "dwi.bval")
    wrong = load_dwi(write_fsl(tmp_path, "noflip", array, affine, bvals, table))
    roi = cc_roi(mask, dwi.affine)
    fa, v1 = fit_world_v1(dwi, roi)
    _, v1_wrong = fit_world_v1(wrong, roi)
    assert v1_agreement(fa, v1, v1_wrong) < 0.5


# --------------------------------------------------------------------------------------------------------------
# Tilted Canon scan vs its non-tilted twin (same session, same head position)
# --------------------------------------------------------------------------------------------------------------


def oblique_vs_ortho_cos(oblique, oblique_mask, ortho, ortho_mask):
    """Median |cos| of world V1 over ortho mask voxels whose nearest oblique voxel is in the oblique mask,
    with FA > 0.3 in both."""
    ijk = np.argwhere(ortho_mask)
    to_oblique = np.linalg.inv(oblique.affine)
    near = np.rint(world_coords(to_oblique, world_coords(ortho.affine, ijk))).astype(int)
    inside = np.all((near >= 0) & (near < np.array(oblique.shape)), axis=1)
    ijk, near = ijk[inside], near[inside]
    both = oblique_mask[tuple(near.T)]
    ijk, near = ijk[both], near[both]
    ortho_roi = np.zeros_like(ortho_mask)
    ortho_roi[tuple(ijk.T)] = True
    fa_ortho, v1_ortho = fit_world_v1(ortho, ortho_roi)  # rows in np.argwhere order, same as ijk
    fa_obl, v1_obl = fit_world_tensor_at(oblique, near)
    good = (fa_ortho > 0.3) & (fa_obl > 0.3)
    assert good.sum() > 5000  # crops: 6027 voxels
    return float(np.median(np.abs(np.sum(v1_ortho[good] * v1_obl[good], axis=1))))


def fit_world_tensor_at(dwi, ijk):
    """DIPY WLS tensor at voxel indices ijk (M, 3) -> FA (M,), world V1 (M, 3)."""
    gtab = gradient_table(dwi.gtab.bvals, bvecs=dwi.gtab.bvecs)
    fit = TensorModel(gtab).fit(dwi.data[tuple(ijk.T)])
    return fit.fa, fit.evecs[..., 0] @ dwi.rotation.T


def test_oblique_and_ortho_twins_agree_in_world_space(brains):
    oblique, oblique_mask = brains("canon_oblique_all20d")
    ortho, ortho_mask = brains("canon_ortho_same_session")
    assert oblique_vs_ortho_cos(oblique, oblique_mask, ortho, ortho_mask) >= 0.9  # crops 0.966 (whole scans 0.954)
    # Negative control: the FSL b-vectors taken as world vectors must fail (crops 0.651, whole scans 0.636).
    # Canonical v = P @ bvec, so world = bvec needs v' with rotation @ v' = P^T v.
    as_world = oblique.gtab.transformed(oblique.rotation.T @ oblique.grid.voxel_to_canonical.T)
    wrong = type(oblique)(oblique.data, oblique.affine, as_world, oblique.grid, oblique.source)
    assert oblique_vs_ortho_cos(wrong, oblique_mask, ortho, ortho_mask) < 0.75
