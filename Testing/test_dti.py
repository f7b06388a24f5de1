"""DTI: closed-form FA/MD, recovery of known tensors, and real data against the scanner's and DIPY's numbers."""

from __future__ import annotations

import json
import warnings

import nibabel as nib
import numpy as np
import pytest

from DRoPE import dti
from DRoPE.dti import DTIError, DTIModel, fractional_anisotropy, mean_diffusivity
from DRoPE.gradients import DWIWarning, GradientTable
from DRoPE.io import load_dwi

# --- free functions against closed form ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "evals, fa",
    [
        ((1.0, 0.0, 0.0), 1.0),  # a line
        ((1e-3, 1e-3, 1e-3), 0.0),  # isotropic
        ((0.0, 0.0, 0.0), 0.0),  # no diffusion: defined as 0
        ((1.7e-3, 0.3e-3, 0.3e-3), np.sqrt(1.96 / 3.07)),  # worked by hand: 0.5 * 3.92 / 3.07
        ((1.0, 1.0, 0.0), 0.5**0.5),  # a disc
    ],
)
def test_fa_closed_form(evals, fa):
    assert fractional_anisotropy(np.array(evals)) == pytest.approx(fa, abs=1e-12)


def test_fa_matches_variance_formula_and_md_is_trace_over_three():
    rng = np.random.default_rng(0)
    evals = rng.uniform(0, 3e-3, size=(50, 3))
    mean = evals.mean(axis=1, keepdims=True)
    expected = np.sqrt(1.5 * ((evals - mean) ** 2).sum(axis=1) / (evals**2).sum(axis=1))
    np.testing.assert_allclose(fractional_anisotropy(evals), expected, rtol=1e-12)
    np.testing.assert_allclose(fractional_anisotropy(evals.T, axis=0), expected, rtol=1e-12)
    np.testing.assert_allclose(mean_diffusivity(evals), evals.sum(axis=1) / 3, rtol=1e-12)


# --- fitting known tensors ----------------------------------------------------------------------------------------


def _directions(n: int) -> np.ndarray:
    """n unit vectors on a golden-angle spiral (independent of the library's protocol code)."""
    k = np.arange(n) + 0.5
    z = 1 - k / n  # upper hemisphere
    phi = k * np.pi * (3 - np.sqrt(5))
    r = np.sqrt(1 - z**2)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def _random_rotations(n: int, rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(n, 3, 3)))
    return q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]


@pytest.fixture(scope="module")
def known_tensors():
    """A (4, 3, 2) grid of tensors with known eigenvalues / eigenvectors and noise-free signals."""
    rng = np.random.default_rng(1)
    shape = (4, 3, 2)
    n = int(np.prod(shape))
    evals = np.sort(rng.uniform(0.1e-3, 2.0e-3, size=(n, 3)), axis=1)[:, ::-1]
    evals[0] = [1.7e-3, 0.3e-3, 0.3e-3]
    evals[1] = [0.8e-3, 0.8e-3, 0.8e-3]
    rotations = _random_rotations(n, rng)
    tensors = np.einsum("nij,nj,nkj->nik", rotations, evals, rotations)
    bvals = np.r_[0, 0, np.full(30, 1000.0), np.full(30, 2000.0)]
    bvecs = np.vstack([np.zeros((2, 3)), _directions(30), _directions(30)[::-1]])
    s0 = rng.uniform(200, 1000, size=n)
    signal = s0[:, None] * np.exp(-bvals * np.einsum("vi,nij,vj->nv", bvecs, tensors, bvecs))
    gtab = GradientTable.create(bvals, bvecs)
    return dict(
        gtab=gtab,
        data=signal.reshape(shape + (-1,)),
        evals=evals.reshape(shape + (3,)),
        v1=rotations[:, :, 0].reshape(shape + (3,)),
        s0=s0.reshape(shape),
    )


@pytest.mark.parametrize("method", ["WLS", "OLS", "NLLS"])
def test_fit_recovers_known_tensors(known_tensors, method):
    fit = DTIModel(known_tensors["gtab"], fit_method=method).fit(known_tensors["data"])
    evals = known_tensors["evals"]
    assert fit.mask.all()
    np.testing.assert_allclose(fit.evals, evals, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(fit.fa, fractional_anisotropy(evals), atol=1e-4)
    np.testing.assert_allclose(fit.md, evals.mean(axis=-1), rtol=1e-4)
    np.testing.assert_allclose(fit.s0, known_tensors["s0"], rtol=1e-4)
    anisotropic = fractional_anisotropy(evals) > 0.05  # V1 is undefined for an isotropic tensor
    cos = np.abs(np.sum(fit.v1 * known_tensors["v1"], axis=-1))
    assert np.all(cos[anisotropic] > 0.9999)
    assert fit.md.flat[0] == pytest.approx(2.3e-3 / 3, rel=1e-4)


def test_tensor_property_rebuilds_the_tensor(known_tensors):
    fit = DTIModel(known_tensors["gtab"]).fit(known_tensors["data"])
    tensor = fit.tensor
    np.testing.assert_allclose(np.trace(tensor, axis1=-2, axis2=-1) / 3, fit.md, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.eigvalsh(tensor)[..., ::-1], fit.evals, rtol=1e-4, atol=1e-10)


def test_mask_and_nonpositive_b0_are_left_out(known_tensors):
    data = known_tensors["data"].copy()
    data[0, 0, 0, known_tensors["gtab"].b0s_mask] = 0.0  # no reference signal
    mask = np.ones(data.shape[:3], dtype=bool)
    mask[1, 1, 1] = False
    fit = DTIModel(known_tensors["gtab"]).fit(data, mask)
    assert not fit.mask[0, 0, 0] and not fit.mask[1, 1, 1]
    assert fit.mask.sum() == mask.size - 2
    assert fit.fa[0, 0, 0] == 0 and fit.md[1, 1, 1] == 0 and fit.s0[0, 0, 0] == 0
    np.testing.assert_allclose(fit.md[fit.mask], known_tensors["evals"].mean(axis=-1)[fit.mask], rtol=1e-4)


def test_rejects_bad_method_and_shapes(known_tensors):
    with pytest.raises(DTIError, match="fit_method 'LM'.*WLS, OLS, NLLS"):
        DTIModel(known_tensors["gtab"], fit_method="LM")
    model = DTIModel(known_tensors["gtab"])
    with pytest.raises(DTIError, match=r"must be \(X, Y, Z, 62\)"):
        model.fit(known_tensors["data"][..., :10])
    with pytest.raises(DTIError, match="mask shape"):
        model.fit(known_tensors["data"], np.ones((4, 3), dtype=bool))


# --- real data ----------------------------------------------------------------------------------------------------


def _load(crops, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DWIWarning)
        dwi = load_dwi(crops / name / "dwi.nii.gz")
    mask = np.asarray(nib.load(crops / name / "brain_mask.nii.gz").dataobj) > 0
    return dwi, dwi.grid.to_canonical(mask)


@pytest.fixture(scope="module")
def siemens(crops):
    dwi, mask = _load(crops, "siemens_xa30_b2500")
    return dwi, mask, DTIModel(dwi.gtab).fit(dwi.data, mask, progress=False)


def test_siemens_agrees_with_scanner_maps(crops, siemens):
    dwi, mask, fit = siemens
    folder = crops / "siemens_xa30_b2500"
    scanner_fa = dwi.grid.to_canonical(np.asarray(nib.load(folder / "scanner_FA.nii.gz").dataobj)) / 1000.0
    scanner_adc = dwi.grid.to_canonical(np.asarray(nib.load(folder / "scanner_ADC.nii.gz").dataobj)) * 1e-6
    keep = mask & (scanner_adc > 0)
    assert 27000 < keep.sum() < mask.sum()  # the crop: 27602 of 27699 mask voxels
    assert np.all(fit.mask[keep] | (fit.s0[keep] == 0))
    keep &= fit.mask
    r_fa = np.corrcoef(fit.fa[keep], scanner_fa[keep])[0, 1]
    r_md = np.corrcoef(fit.md[keep], scanner_adc[keep])[0, 1]
    assert r_fa >= 0.95 and r_md >= 0.95, (r_fa, r_md)
    # MD is in mm^2/s like the scanner ADC: the median ratio is 1 (README: 1.000)
    assert np.median(fit.md[keep] / scanner_adc[keep]) == pytest.approx(1.0, abs=0.01)


def test_zero_b0_voxels_are_excluded(siemens):
    """shared/data README: mask voxels with b0 = 0 (6 in the scan, 2 in the crop) give DIPY MD up to 4.5 mm^2/s;
    they must not be fitted."""
    dwi, mask, fit = siemens
    zero_b0 = mask & (dwi.data[..., dwi.gtab.b0s_mask].mean(axis=-1) <= 0)
    assert zero_b0.sum() > 0
    assert not fit.mask[zero_b0].any()
    assert fit.md[mask].max() < 4e-3


def _assert_matches_reference(root, name):
    """DRoPE's DTI medians in root/name's brain mask equal the plain-DIPY numbers of root/reference_values.json."""
    reference = json.loads((root / "reference_values.json").read_text())[name]
    dwi, mask = _load(root, name)
    assert mask.sum() == reference["mask_voxels"]
    fit = DTIModel(dwi.gtab).fit(dwi.data, mask, progress=False)
    assert np.median(fit.fa[fit.mask]) == pytest.approx(reference["median_FA"], abs=0.005)
    assert np.median(fit.md[fit.mask]) == pytest.approx(reference["median_MD"], rel=0.01)


@pytest.mark.parametrize("name", ["siemens_xa30_b2500", "canon_oblique_all20d", "philips_achieva_32dir"])
def test_median_fa_md_match_reference(crops, name):
    _assert_matches_reference(crops, name)


@pytest.mark.corpus
@pytest.mark.parametrize("name", ["siemens_xa30_b2500", "canon_oblique_all20d"])
def test_whole_scan_median_fa_md_match_reference(shared_data, name):
    _assert_matches_reference(shared_data, name)


def test_chunked_fit_equals_one_dipy_call(siemens, monkeypatch):
    """The chunked fit (small chunks here, on every core) is the plain DIPY TensorModel fit of the same voxels."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    dwi, mask, _ = siemens
    region = (slice(5, 35), slice(5, 45), slice(4, 9))
    data, sub_mask = dwi.data[region], mask[region]
    monkeypatch.setattr(dti, "VOXELS_PER_CHUNK", 500)
    fit = DTIModel(dwi.gtab).fit(data, sub_mask, progress=False)
    plain_model = TensorModel(gradient_table(dwi.gtab.bvals, bvecs=dwi.gtab.bvecs))
    plain = plain_model.fit(data.astype(np.float64), mask=fit.mask)
    assert fit.mask.sum() > 2000
    np.testing.assert_allclose(fit.fa, plain.fa, atol=1e-5)
    np.testing.assert_allclose(fit.md, plain.md, rtol=1e-5, atol=1e-10)
