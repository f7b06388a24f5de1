"""Preprocessing: brain mask, b0 normalisation, resampling, crop/pad to whole patches and the way back."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from DRoPE.dwi import DWI, InputGrid
from DRoPE.gradients import DWIWarning, GradientTable
from DRoPE.io import load_dwi
from DRoPE.preprocess import (
    NORM_RANGE,
    GridMapping,
    PreprocessError,
    brain_mask,
    median_filter,
    normalize,
    preprocess,
    resample,
)


@pytest.fixture(scope="module")
def sample(sample_dir):
    """The bundled oblique Canon DWI and its median_otsu mask, both canonical."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DWIWarning)
        dwi = load_dwi(sample_dir / "dwi.nii.gz")
    mask = np.asarray(nib.load(sample_dir / "brain_mask.nii.gz").dataobj) > 0
    return dwi, dwi.grid.to_canonical(mask)


def _voxel_to_world(affine, index):
    return index @ affine[:3, :3].T + affine[:3, 3]


def _all_indices(shape):
    return np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)


def _cut(dwi: DWI, stop, start=(0, 0, 0)) -> DWI:
    """The sub-volume dwi[start:stop] as its own DWI (affine moved to the new first voxel)."""
    window = tuple(slice(a, b) for a, b in zip(start, stop))
    shift = np.eye(4)
    shift[:3, 3] = start
    affine = dwi.affine @ shift
    data = np.ascontiguousarray(dwi.data[window])
    return DWI(data, affine, dwi.gtab, InputGrid.from_affine(data.shape, affine))


# --- mask and normalisation ---------------------------------------------------------------------------------------


def test_brain_mask_matches_the_shared_mask(sample):
    """The shared masks were made with the same DIPY median_otsu settings (README); expect near-identical masks."""
    dwi, reference = sample
    mask = brain_mask(dwi)
    assert mask.dtype == bool and mask.shape == dwi.shape
    dice = 2 * np.sum(mask & reference) / (mask.sum() + reference.sum())
    assert dice > 0.99, dice


def test_brain_mask_is_dipy_median_otsu(sample):
    """The slab-parallel filters give exactly DIPY's median_otsu mask (the reference implementation)."""
    from dipy.segment.mask import median_otsu

    from DRoPE.dti import mean_b0

    dwi, _ = sample
    _, reference = median_otsu(mean_b0(dwi.data, dwi.gtab), median_radius=4, numpass=4)
    np.testing.assert_array_equal(brain_mask(dwi), reference)


@pytest.mark.parametrize("workers", [1, 2, 3, 7, 40])
@pytest.mark.parametrize("size", [1, 3, 9])
def test_median_filter_in_slabs_equals_one_call(workers, size):
    """Slabs (fewer planes than the window, more workers than planes, uneven splits) change nothing."""
    volume = np.random.default_rng(workers + size).random((23, 11, 6)).astype(np.float32)
    result = median_filter(volume, size, workers)
    assert result.dtype == volume.dtype
    np.testing.assert_array_equal(result, ndimage.median_filter(volume, size))


@pytest.mark.filterwarnings("ignore::DRoPE.gradients.DWIWarning")
def test_normalize_divides_by_mean_b0_clips_and_zeroes():
    gtab = GradientTable.create([0, 1000, 0, 1000], [[0, 0, 0], [1, 0, 0], [0, 0, 0], [0, 1, 0]])
    data = np.zeros((4, 1, 1, 4), dtype=np.float32)
    data[0, 0, 0] = [100, 50, 120, 200]  # mean b0 110: 50/110 kept, 200/110 = 1.82 clipped to 1.5
    data[1, 0, 0] = [10, -5, 10, 3]  # negative signal clipped to 0
    data[2, 0, 0] = [0, 7, 0, 7]  # mean b0 0: no reference -> 0
    data[3, 0, 0] = [100, 50, 100, 50]  # outside the mask -> 0
    mask = np.array([True, True, True, False]).reshape(4, 1, 1)
    out = normalize(data, gtab, mask)
    assert out.dtype == np.float32 and out.shape == data.shape
    np.testing.assert_allclose(out[0, 0, 0], [100 / 110, 50 / 110, 120 / 110, 1.5], rtol=1e-6)
    np.testing.assert_allclose(out[1, 0, 0], [1.0, 0.0, 1.0, 0.3], rtol=1e-6)
    assert np.all(out[2:] == 0)
    assert NORM_RANGE == (0.0, 1.5)


# --- crop / pad -----------------------------------------------------------------------------------------------------


def test_padding_is_centred_and_exactly_invertible():
    rng = np.random.default_rng(0)
    affine = np.array([[0, -2.0, 0, 10], [1.5, 0, 0, -4], [0, 0, 3, 7], [0, 0, 0, 1]])
    mapping = GridMapping.build((13, 10, 7), affine, patch=(8, 8, 4))
    assert mapping.shape == (16, 16, 8) and mapping.start == (-1, -3, 0)
    x = rng.normal(size=(13, 10, 7, 2)).astype(np.float32)
    model = mapping.forward(x)
    assert model.shape == (16, 16, 8, 2)
    np.testing.assert_array_equal(model[1:14, 3:13, 0:7], x)
    assert model.sum() == pytest.approx(x.sum(), rel=1e-5)  # the rest is zero padding
    np.testing.assert_array_equal(mapping.inverse(model), x)
    # model voxel i sits on the same world point as input voxel i + start
    index = _all_indices(mapping.shape)
    np.testing.assert_allclose(
        _voxel_to_world(mapping.affine, index), _voxel_to_world(affine, index + np.array(mapping.start)), atol=1e-9
    )


def test_crop_centres_on_the_brain_and_keeps_it():
    rng = np.random.default_rng(1)
    shape = (40, 30, 20)
    mask = np.zeros(shape, dtype=bool)
    mask[5:21, 8:28, 3:9] = True  # brain bounding box: x 5..20, y 8..27, z 3..8
    mapping = GridMapping.build(shape, np.eye(4), mask=mask, max_shape=(24, 26, 14), patch=(8, 8, 4))
    assert mapping.shape == (24, 24, 12)  # largest whole patches within max_shape
    start = np.array(mapping.start)
    assert start[0] == 1  # centred on the brain: (5 + 21 - 24) / 2
    assert start[1] == 6  # centred: (8 + 28 - 24) / 2, inside the FOV (<= 30 - 24)
    assert start[2] == 0  # centred would be 0: (3 + 9 - 12) / 2
    x = rng.normal(size=shape)
    back = mapping.inverse(mapping.forward(x))
    kept = np.zeros(shape, dtype=bool)
    kept[tuple(slice(s, s + n) for s, n in zip(start, mapping.shape))] = True
    np.testing.assert_array_equal(back[kept], x[kept])
    assert np.all(back[~kept] == 0)


def test_crop_never_cuts_the_brain():
    shape = (40, 30, 20)
    mask = np.zeros(shape, dtype=bool)
    mask[5:21, 8:28, 3:9] = True
    mapping = GridMapping.build(shape, np.eye(4), mask=mask, max_shape=(24, 24, 8), patch=(8, 8, 4))
    window = tuple(slice(s, s + n) for s, n in zip(mapping.start, mapping.shape))
    assert mapping.forward(mask).sum() == mask.sum() == mask[window].sum()
    assert mapping.start[2] == 2  # z: bbox 3..8 (6 voxels) centred in 8 -> starts at 2
    edge = np.zeros(shape, dtype=bool)
    edge[30:40, 10:20, 5:10] = True  # brain at the FOV edge: the centred window (start 23) would leave the FOV
    assert GridMapping.build(shape, np.eye(4), mask=edge, max_shape=(24, 24, 8), patch=(8, 8, 4)).start[0] == 16
    with pytest.raises(PreprocessError, match="brain spans 20 voxels along axis 1.*at most 16"):
        GridMapping.build(shape, np.eye(4), mask=mask, max_shape=(24, 20, 8), patch=(8, 8, 4))


def test_mapping_rejects_arrays_on_other_grids():
    mapping = GridMapping.build((13, 10, 7), np.eye(4))
    with pytest.raises(PreprocessError, match="not on the input grid"):
        mapping.forward(np.zeros((10, 10, 7)))
    with pytest.raises(PreprocessError, match="not on the model grid"):
        mapping.inverse(np.zeros((13, 10, 7)))


# --- resampling -----------------------------------------------------------------------------------------------------


def test_resample_onto_the_same_grid_is_identity(sample):
    dwi, _ = sample
    x = dwi.data[..., :3]
    same = resample(x, dwi.affine, dwi.shape, dwi.affine)
    np.testing.assert_allclose(same, x, rtol=1e-5, atol=1e-3)
    mapping = GridMapping.build(dwi.shape, dwi.affine, spacing=dwi.voxel_size)
    assert not mapping.resamples and mapping.shape == dwi.shape
    np.testing.assert_allclose(mapping.affine, dwi.affine, atol=1e-9)


def test_resampled_grid_has_the_right_world_mapping(sample):
    """Linear interpolation reproduces a linear function of world position exactly, wherever the target voxel
    lies inside the source grid, so the values check the new affine; scipy (trilinear in voxel space) agrees."""
    dwi, _ = sample
    shape = (30, 28, 20)  # oblique affine from the sample
    affine = dwi.affine
    world = _voxel_to_world(affine, _all_indices(shape)).reshape(shape + (3,))
    linear = world @ np.array([0.5, -1.0, 2.0]) + 100.0
    mapping = GridMapping.build(shape, affine, spacing=(2.0, 2.5, 1.75), patch=(8, 8, 4))
    assert mapping.resamples
    np.testing.assert_allclose(np.linalg.norm(mapping.affine[:3, :3], axis=0), [2.0, 2.5, 1.75])
    rotation = affine[:3, :3] / dwi.voxel_size
    np.testing.assert_allclose(mapping.affine[:3, :3] / [2.0, 2.5, 1.75], rotation, atol=1e-9)
    assert all(n % p == 0 for n, p in zip(mapping.shape, (8, 8, 4)))

    rng = np.random.default_rng(2)
    rough = rng.normal(size=shape).astype(np.float32)
    out = mapping.forward(np.stack([linear, rough], axis=-1).astype(np.float32))
    model_index = _all_indices(mapping.shape)
    source_index = _voxel_to_world(np.linalg.inv(affine), _voxel_to_world(mapping.affine, model_index))
    inside = np.all((source_index >= 0) & (source_index <= np.array(shape) - 1), axis=1)
    assert inside.sum() > 0.5 * np.prod(shape)
    expected = _voxel_to_world(mapping.affine, model_index) @ np.array([0.5, -1.0, 2.0]) + 100.0
    np.testing.assert_allclose(out[..., 0].reshape(-1)[inside], expected[inside], atol=2e-3)
    naive = ndimage.map_coordinates(rough, source_index[inside].T, order=1)
    np.testing.assert_allclose(out[..., 1].reshape(-1)[inside], naive, atol=1e-4)
    np.testing.assert_allclose(mapping.forward(rough), out[..., 1], atol=1e-6)  # scalar path == vector path


def test_resampled_grid_is_centred_and_covers_the_fov(sample):
    dwi, _ = sample
    mapping = GridMapping.build(dwi.shape, dwi.affine, spacing=2.0)
    assert mapping.resampled_shape == (120, 120, 60)  # 80 x 3 mm / 2 mm, 40 x 3 / 2
    centre_in = _voxel_to_world(dwi.affine, (np.array(dwi.shape) - 1) / 2)
    centre_out = _voxel_to_world(mapping.resampled_affine, (np.array(mapping.resampled_shape) - 1) / 2)
    np.testing.assert_allclose(centre_out, centre_in, atol=1e-9)


# --- the whole chain ------------------------------------------------------------------------------------------------


def test_preprocess_without_resampling_is_exact(sample):
    dwi, mask = sample
    cut = _cut(dwi, (77, 78, 38), (0, 3, 0))  # pads to 80 x 80 x 40
    cut_mask = mask[:77, 3:78, :38]
    p = preprocess(cut, mask=cut_mask)
    assert p.signal.shape == (13, 80, 80, 40) and p.signal.dtype == np.float32
    assert p.mask.shape == (80, 80, 40) and p.mapping.start == (-1, -2, -1)
    assert p.gtab is cut.gtab
    b0 = cut.data[..., cut.gtab.b0s_mask].mean(axis=-1)
    ratio = np.clip(cut.data / np.maximum(b0, 1e-9)[..., None], 0, 1.5)
    expected = np.where((cut_mask & (b0 > 0))[..., None], ratio, 0)
    back = p.to_input(p.signal)
    assert back.shape == (77, 75, 38, 13)
    np.testing.assert_allclose(back, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(p.to_input(p.mask), cut_mask & (b0 > 0))
    np.testing.assert_allclose(p.to_input(p.mean_b0), b0, rtol=1e-6)
    assert np.all(p.signal[:, ~p.mask] == 0) and p.signal.max() <= 1.5
    first_voxel = _voxel_to_world(cut.affine, np.array([-1, -2, -1]))
    np.testing.assert_allclose(_voxel_to_world(p.affine, np.zeros(3)), first_voxel)


def test_preprocess_with_resampling_round_trips(sample):
    dwi, mask = sample
    p = preprocess(dwi, spacing=2.0, mask=mask)
    assert p.signal.shape == (13, 120, 120, 60)
    np.testing.assert_allclose(np.linalg.norm(p.affine[:3, :3], axis=0), 2.0)
    # the brain sits at the same world position on both grids
    com_in = _voxel_to_world(dwi.affine, np.argwhere(mask).mean(axis=0))
    com_model = _voxel_to_world(p.affine, np.argwhere(p.mask).mean(axis=0))
    np.testing.assert_allclose(com_model, com_in, atol=1.0)
    assert p.mask.sum() * 8 == pytest.approx(mask.sum() * 27, rel=0.03)  # same brain volume in mm^3
    back = p.to_input(p.mean_b0)
    assert back.shape == dwi.shape
    b0 = dwi.data[..., 0]
    inner = ndimage.binary_erosion(mask, iterations=2)
    relative = np.abs(back[inner] - b0[inner]) / b0[inner].mean()
    assert np.median(relative) < 0.05


def test_to_input_axis_order_and_errors(sample):
    dwi, mask = sample
    p = preprocess(_cut(dwi, (70, 70, 36)), mask=mask[:70, :70, :36])
    two = np.stack([p.mean_b0, 2 * p.mean_b0])  # (2, X, Y, Z): spatial axes last
    back = p.to_input(two)
    assert back.shape == (70, 70, 36, 2)  # spatial axes first, like DWI.data
    np.testing.assert_array_equal(back[..., 1], 2 * back[..., 0])
    with pytest.raises(PreprocessError, match="not on the model grid"):
        p.to_input(np.zeros((2, 70, 70, 36)))
    with pytest.raises(PreprocessError, match="mask shape"):
        preprocess(dwi, mask=mask[:10])
