"""The shell-mean baseline against hand-computed values."""

import numpy as np

from DRoPE.baselines import ANGULAR_KAPPA, BASELINES, baseline_predictions, dti_baseline, shell_mean_baseline


def test_hidden_voxels_take_the_mean_of_visible_volumes_of_their_shell():
    # one voxel row, 4 volumes: b0, two b=1000 volumes and one b=2000
    signal = np.array([[[[1.0, 0.4, 0.6, 0.2], [1.0, 0.5, 0.3, 0.1]]]], dtype=np.float32)  # (1, 1, 2, 4)
    visible = np.array([[[[True, True, False, False], [True, False, False, True]]]])
    shells = np.array([0, 1000, 1000, 2000])
    mask = np.ones((1, 1, 2), bool)
    out = shell_mean_baseline(signal, visible, shells, mask)
    # voxel 0: vol 2 (hidden) <- vol 1 (visible, same shell) = 0.4; vol 3 (b=2000, no other) <- brain mean of
    # visible b=2000 = 0.1 (voxel 1)
    np.testing.assert_allclose(out[0, 0, 0], [1.0, 0.4, 0.4, 0.1])
    # voxel 1: vols 1 and 2 hidden, no visible b=1000 there -> brain mean of visible b=1000 = 0.4
    np.testing.assert_allclose(out[0, 0, 1], [1.0, 0.4, 0.4, 0.1])


def test_outside_the_mask_is_zero_and_visible_voxels_are_kept():
    rng = np.random.default_rng(0)
    signal = rng.uniform(size=(3, 3, 2, 5)).astype(np.float32)
    visible = rng.uniform(size=signal.shape) > 0.5
    mask = np.zeros((3, 3, 2), bool)
    mask[1:, 1:] = True
    out = shell_mean_baseline(signal, visible, np.array([0, 1000, 1000, 1000, 2000]), mask)
    assert np.all(out[~mask] == 0)
    np.testing.assert_array_equal(out[mask][visible[mask]], signal[mask][visible[mask]])


def test_angular_weights_favour_the_closest_direction():
    # one voxel, b=1000: vols 1 and 2 visible with directions at 0 and 90 degrees to the hidden vol 3
    signal = np.array([[[[1.0, 0.3, 0.7, 0.0]]]], dtype=np.float32)
    visible = np.array([[[[True, True, True, False]]]])
    bvecs = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [-1, 0, 0]], dtype=float)  # vol 3 is antipodal to vol 1
    shells = np.array([0, 1000, 1000, 1000])
    out = shell_mean_baseline(signal, visible, shells, np.ones((1, 1, 1), bool), bvecs)
    w_near, w_far = np.exp(ANGULAR_KAPPA * 1.0), np.exp(0.0)
    np.testing.assert_allclose(out[0, 0, 0, 3], (w_near * 0.3 + w_far * 0.7) / (w_near + w_far), rtol=1e-6)


def tensor_signal(bvals, bvecs, D, s0=1.0):
    return s0 * np.exp(-bvals * np.einsum("vi,ij,vj->v", bvecs, D, bvecs))


def test_dti_baseline_recovers_the_hidden_volumes_of_an_exact_tensor_signal():
    rng = np.random.default_rng(0)
    V = 16
    bvecs = rng.normal(size=(V, 3))
    bvecs /= np.linalg.norm(bvecs, axis=1, keepdims=True)
    bvecs[0] = 0
    bvals = np.r_[0.0, np.full(V - 1, 1000.0)]
    D = np.diag([1.7e-3, 0.3e-3, 0.2e-3])
    signal = np.broadcast_to(tensor_signal(bvals, bvecs, D), (2, 2, 1, V)).astype(np.float32).copy()
    visible = np.zeros(signal.shape, bool)
    visible[..., :8] = True  # b0 + 7 weighted volumes: enough for a tensor
    visible[1, 1, 0, 3:] = False  # this voxel sees only b0 + 2: it falls back
    fallback = np.full(signal.shape, -1.0, np.float32)
    out = dti_baseline(signal, visible, bvals, bvecs, np.ones((2, 2, 1), bool), fallback)
    np.testing.assert_allclose(out[0, 0, 0], signal[0, 0, 0], rtol=1e-4)
    assert np.all(out[1, 1, 0, 3:] == -1.0)
    np.testing.assert_array_equal(out[1, 1, 0, :3], signal[1, 1, 0, :3])  # visible voxels keep their value


def test_every_baseline_is_computed_on_the_same_visible_voxels():
    from DRoPE.gradients import GradientTable

    rng = np.random.default_rng(1)
    bvecs = rng.normal(size=(9, 3))
    bvecs /= np.linalg.norm(bvecs, axis=1, keepdims=True)
    bvecs[0] = 0
    gtab = GradientTable(np.r_[0.0, np.full(8, 1000.0)], bvecs)
    signal = rng.uniform(0.2, 1.0, (4, 4, 2, 9)).astype(np.float32)
    visible = rng.uniform(size=signal.shape) > 0.5
    visible[..., 0] = True
    mask = np.ones((4, 4, 2), bool)
    predictions = baseline_predictions(signal, visible, gtab, mask)
    assert list(predictions) == list(BASELINES)
    for prediction in predictions.values():
        np.testing.assert_array_equal(prediction[visible], signal[visible])
