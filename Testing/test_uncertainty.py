"""Reconstruction uncertainty over mask draws (``reconstruct --draws K``) and the gradient check inside reconstruct."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import crop_dwi
from DRoPE.cli import main as cli_main
from DRoPE.io import load_dwi
from DRoPE.model import DRoPEMAE
from DRoPE.reconstruct import DrawSpread, ReconstructSettings, draw_seed, run_reconstruction

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SPREAD = ("reconstruction_mean", "reconstruction_std", "fa_mean", "fa_std")


@pytest.fixture(scope="module")
def small_dwi(tmp_path_factory, sample_dir):
    """A 48 x 48 x 12 crop (all 13 volumes) of the bundled sample."""
    box = (slice(16, 64), slice(16, 64), slice(14, 26))
    return crop_dwi(sample_dir / "dwi.nii.gz", tmp_path_factory.mktemp("small") / "dwi.nii.gz", box)


# --- the running statistics -----------------------------------------------------------------------------------------


def test_draw_spread_matches_numpy_over_the_selected_draws():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(6, 5, 4))
    where = rng.random((6, 5, 4)) < 0.6
    spread = DrawSpread((5, 4))
    for v, w in zip(values, where):
        spread.add(v, w)
    masked = np.ma.masked_array(values, ~where)
    count = where.sum(axis=0)
    np.testing.assert_array_equal(spread.count, count)
    np.testing.assert_allclose(spread.std, np.where(count > 1, masked.std(axis=0).filled(0), 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(spread.mean(-7.0), np.where(count > 0, masked.mean(axis=0).filled(0), -7.0), rtol=1e-5)


def test_one_draw_has_zero_spread():
    spread = DrawSpread((3, 3))
    spread.add(np.arange(9.0).reshape(3, 3), np.ones((3, 3), dtype=bool))
    assert not spread.std.any()
    np.testing.assert_array_equal(spread.mean(0), np.arange(9.0).reshape(3, 3))


# --- whole runs -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_draws(tiny_weights, small_dwi):
    dwi = load_dwi(small_dwi)
    many = run_reconstruction(dwi, tiny_weights, ReconstructSettings(seed=5, draws=3))
    singles = [run_reconstruction(dwi, tiny_weights, ReconstructSettings(seed=draw_seed(5, d))) for d in range(3)]
    return dwi, many, singles


def test_one_draw_writes_no_spread(tiny_weights, small_dwi):
    result = run_reconstruction(load_dwi(small_dwi), tiny_weights, ReconstructSettings(seed=5))
    assert not set(SPREAD) & set(result.maps)


def test_draw_zero_is_the_plain_run(three_draws):
    _, many, singles = three_draws
    np.testing.assert_array_equal(many.recon, singles[0].recon)
    np.testing.assert_array_equal(many.visible, singles[0].visible)
    assert not np.array_equal(singles[0].visible, singles[1].visible)  # the draws differ


def test_spread_is_over_the_draws_that_hid_each_voxel(three_draws):
    """Recomputed from three plain runs with the draws' seeds: the completed DWI holds the prediction where hidden."""
    dwi, many, singles = three_draws
    recon = np.stack([s.recon for s in singles])
    hidden = np.stack([~s.visible for s in singles]) & many.mask[None, ..., None]
    masked = np.ma.masked_array(recon, ~hidden)
    count = hidden.sum(axis=0)
    expected_std = np.where(count > 1, masked.std(axis=0).filled(0), 0)
    scale = float(dwi.data.max())
    np.testing.assert_allclose(many.maps["reconstruction_std"], expected_std, atol=1e-4 * scale)
    expected_mean = np.where(count > 0, masked.mean(axis=0).filled(0), dwi.data * many.mask[..., None])
    np.testing.assert_allclose(many.maps["reconstruction_mean"], expected_mean, atol=1e-4 * scale)
    assert (many.maps["reconstruction_std"] > 0).any()
    assert not many.maps["reconstruction_std"][..., dwi.gtab.b0s_mask].any()  # b0: never hidden
    assert not many.maps["reconstruction_std"][~many.mask].any()
    fa = np.stack([s.maps["fa_recon"] for s in singles])
    np.testing.assert_allclose(many.maps["fa_std"], fa.std(axis=0), atol=1e-4)
    np.testing.assert_allclose(many.maps["fa_mean"], fa.mean(axis=0), atol=1e-4)
    assert (many.maps["fa_std"] > 0).any()


def test_a_prediction_that_ignores_the_mask_has_zero_spread(tiny_weights, small_dwi, monkeypatch):
    monkeypatch.setattr(DRoPEMAE, "reconstruct", lambda self, x, bvals, bvecs, keep=None: torch.full_like(x, 0.4))
    result = run_reconstruction(load_dwi(small_dwi), tiny_weights, ReconstructSettings(seed=2, draws=3))
    assert not result.maps["reconstruction_std"].any()


def test_cli_draws_writes_the_spread_maps_on_the_input_grid(tiny_weights, small_dwi, tmp_path):
    out = tmp_path / "out"
    code = cli_main(["reconstruct", str(small_dwi), "--out", str(out), "--weights", str(tiny_weights), "--draws", "2",
                     "--progress", "none"])
    assert code == 0
    source = nib.load(small_dwi)
    for name in SPREAD:
        img = nib.load(out / f"{name}.nii.gz")
        assert img.shape == (source.shape if name.startswith("reconstruction") else source.shape[:3]), name
        np.testing.assert_allclose(img.affine, source.affine, atol=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["draws"] == 2 and {f"{n}.nii.gz" for n in SPREAD} <= set(summary["outputs"])
    assert summary["gradient_check"]["given_is_best"] is True


def test_cli_rejects_zero_draws_before_reading(tiny_weights, small_dwi, tmp_path, capsys):
    code = cli_main(["reconstruct", str(small_dwi), "--out", str(tmp_path / "o"), "--weights", str(tiny_weights),
                     "--draws", "0", "--progress", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--draws" in err[0]
    assert not (tmp_path / "o").exists()


def test_reconstruct_warns_about_a_wrong_table_and_keeps_it(tiny_weights, small_dwi, tmp_path):
    folder = tmp_path / "flipped"
    folder.mkdir()
    for suffix in (".nii.gz", ".bval"):
        shutil.copy(small_dwi.with_name(f"dwi{suffix}"), folder / f"dwi{suffix}")
    bvecs = np.loadtxt(small_dwi.with_name("dwi.bvec"), ndmin=2)
    np.savetxt(folder / "dwi.bvec", bvecs * np.array([[1.0], [-1.0], [1.0]]), fmt="%.6f")  # y flipped
    out = tmp_path / "out"
    assert cli_main(["reconstruct", str(folder / "dwi.nii.gz"), "--out", str(out), "--weights", str(tiny_weights),
                     "--progress", "none"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gradient_check"]["best"]["flip"] == [False, True, False]
    assert any("gradient check: the b-vectors look wrong" in w for w in summary["warnings"])
    np.testing.assert_allclose(np.loadtxt(out / "reconstruction.bvec"), np.loadtxt(folder / "dwi.bvec"), atol=1e-3)
