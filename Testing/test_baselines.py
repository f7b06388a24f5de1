"""The shell-mean baseline against hand-computed values."""

import numpy as np

from DRoPE.baselines import shell_mean_baseline


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
