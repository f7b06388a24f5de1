"""Synthetic phantoms: closed-form signals, Rician noise statistics, refits of re-synthesised real brains."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest

from DRoPE.dti import DTIFit, DTIModel
from DRoPE.dwi import DWI, InputGrid
from DRoPE.gradients import DWIWarning, GradientTable
from DRoPE.io import load_dwi
from DRoPE.phantom import PhantomError, make_gtab, phantom_from_dwi, synthesize


def _uniform_fit(shape, evals, s0=1000.0, evecs=None) -> DTIFit:
    """Every voxel the same tensor; the last x-slice is outside the mask (S0 = 0)."""
    mask = np.ones(shape, dtype=bool)
    mask[-1] = False
    evals_grid = np.where(mask[..., None], np.asarray(evals, dtype=float), 0.0)
    evecs = np.eye(3) if evecs is None else evecs
    evecs_grid = np.broadcast_to(evecs, shape + (3, 3)).copy()
    return DTIFit(evals_grid, evecs_grid, np.where(mask, s0, 0.0), mask)


@pytest.fixture(scope="module")
def protocol() -> GradientTable:
    return make_gtab({1000: 30, 2000: 30}, n_b0=2, seed=0)


def test_make_gtab_spreads_directions(protocol):
    assert len(protocol) == 62
    assert np.sum(protocol.b0s_mask) == 2 and np.all(protocol.bvecs[:2] == 0)
    np.testing.assert_array_equal(protocol.shells, [1000, 2000])
    np.testing.assert_allclose(np.linalg.norm(protocol.bvecs[2:], axis=1), 1.0, atol=1e-12)
    for b in (1000, 2000):
        v = protocol.bvecs[protocol.bvals == b]
        cos = np.abs(v @ v.T)
        np.fill_diagonal(cos, 0)
        # 30 evenly spread axes are about 23 deg apart; random ones would come within a few degrees
        assert np.degrees(np.arccos(cos.max())) > 18
    assert not np.allclose(protocol.bvecs[2:32], protocol.bvecs[32:])  # shells get their own directions
    again, other = make_gtab({1000: 30, 2000: 30}, n_b0=2, seed=0), make_gtab({1000: 30, 2000: 30}, n_b0=2, seed=1)
    np.testing.assert_array_equal(again.bvecs, protocol.bvecs)
    np.testing.assert_array_equal(again.bvals, protocol.bvals)
    assert not np.allclose(other.bvecs, protocol.bvecs)


def test_make_gtab_rejects_nonsense():
    with pytest.raises(PhantomError, match="shells"):
        make_gtab({1000: 0})
    with pytest.raises(PhantomError, match="n_b0"):
        make_gtab({1000: 10}, n_b0=-1)


def test_noise_free_signal_is_closed_form(protocol):
    evals = (1.7e-3, 0.3e-3, 0.2e-3)
    rotation = np.array([[0, 0, 1.0], [1.0, 0, 0], [0, 1.0, 0]])  # columns: V1 along y, V2 along z, V3 along x
    fit = _uniform_fit((3, 2, 2), evals, s0=800.0, evecs=rotation)
    signal = synthesize(fit, protocol)
    assert signal.shape == (3, 2, 2, 62) and signal.dtype == np.float32
    g = protocol.bvecs
    adc = 1.7e-3 * g[:, 1] ** 2 + 0.3e-3 * g[:, 2] ** 2 + 0.2e-3 * g[:, 0] ** 2
    np.testing.assert_allclose(signal[0, 0, 0], 800.0 * np.exp(-protocol.bvals * adc), rtol=1e-5)
    assert np.all(signal[-1] == 0)  # outside the mask
    # multi-shell: log attenuation doubles from b=1000 to b=2000 along the same direction
    iso = synthesize(_uniform_fit((2, 1, 1), (0.9e-3,) * 3), protocol)[0, 0, 0]
    log_att = np.log(iso / 1000.0)
    np.testing.assert_allclose(log_att[protocol.bvals == 2000], 2 * log_att[protocol.bvals == 1000][:30], rtol=1e-5)


def test_rician_noise_has_the_closed_form_statistics(protocol):
    snr = 20.0
    fit = _uniform_fit((41, 30, 30), (0.8e-3,) * 3)  # 36000 brain voxels with S0 = 1000, 900 background voxels
    noisy = synthesize(fit, protocol, snr=snr, seed=7)
    sigma = 1000.0 / snr
    b0 = noisy[:-1, ..., 0]
    # high SNR: Rician ~ Gaussian with sd sigma, mean sqrt(S^2 + sigma^2)
    assert b0.std() == pytest.approx(sigma, rel=0.02)
    assert b0.mean() == pytest.approx(np.sqrt(1000.0**2 + sigma**2), abs=3 * sigma / np.sqrt(b0.size))
    # background (S = 0) is Rayleigh: mean sigma sqrt(pi/2), sd sigma sqrt(2 - pi/2)
    background = noisy[-1].ravel()
    assert background.min() >= 0
    assert background.mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.03)
    assert background.std() == pytest.approx(sigma * np.sqrt(2 - np.pi / 2), rel=0.05)


def test_noise_is_seeded(protocol):
    fit = _uniform_fit((4, 4, 4), (1e-3, 0.5e-3, 0.5e-3))
    a = synthesize(fit, protocol, snr=10, seed=3)
    np.testing.assert_array_equal(a, synthesize(fit, protocol, snr=10, seed=3))
    assert not np.array_equal(a, synthesize(fit, protocol, snr=10, seed=4))
    with pytest.raises(PhantomError, match="snr must be > 0"):
        synthesize(fit, protocol, snr=0)


@pytest.fixture(scope="module")
def sample_slab(sample_dir):
    """A slab of the bundled oblique DWI (canonical) with its shared mask."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DWIWarning)
        dwi = load_dwi(sample_dir / "dwi.nii.gz")
    mask = dwi.grid.to_canonical(np.asarray(nib.load(sample_dir / "brain_mask.nii.gz").dataobj) > 0)
    slab = (slice(None), slice(None), slice(15, 23))
    data = np.ascontiguousarray(dwi.data[slab])
    shift = np.eye(4)
    shift[2, 3] = 15
    affine = dwi.affine @ shift
    return DWI(data, affine, dwi.gtab, InputGrid.from_affine(data.shape, affine), "slab"), mask[slab]


def test_refit_of_a_noise_free_phantom_gives_the_same_maps(sample_slab, protocol):
    dwi, mask = sample_slab
    phantom = phantom_from_dwi(dwi, protocol, mask=mask)
    assert phantom.data.shape == dwi.shape + (62,)
    assert phantom.gtab is protocol and phantom.grid is dwi.grid
    np.testing.assert_array_equal(phantom.affine, dwi.affine)
    original = DTIModel(dwi.gtab).fit(dwi.data, mask, progress=False)
    refit = DTIModel(protocol).fit(phantom.data, original.mask, progress=False)
    assert original.mask.sum() > 10000
    np.testing.assert_array_equal(refit.mask, original.mask)
    # a few edge voxels have absurd diffusivities (> 0.02 mm^2/s) whose b=2000 signal underflows float32
    physical = original.mask & (original.evals[..., 0] < 1e-2)
    assert physical.sum() > 0.99 * original.mask.sum()
    np.testing.assert_allclose(refit.fa[physical], original.fa[physical], atol=2e-3)
    np.testing.assert_allclose(refit.md[physical], original.md[physical], rtol=2e-3, atol=1e-8)
    np.testing.assert_allclose(refit.s0[physical], original.s0[physical], rtol=2e-3, atol=1e-3)


def test_noisy_phantom_refit_is_close_on_average(sample_slab, protocol):
    dwi, mask = sample_slab
    original = DTIModel(dwi.gtab).fit(dwi.data, mask, progress=False)
    noisy = synthesize(original, protocol, snr=30, seed=0)
    refit = DTIModel(protocol).fit(noisy, original.mask, progress=False)
    keep = original.mask & refit.mask
    assert np.median(refit.md[keep] / original.md[keep]) == pytest.approx(1.0, abs=0.03)
    assert np.corrcoef(refit.fa[keep], original.fa[keep])[0, 1] > 0.9
