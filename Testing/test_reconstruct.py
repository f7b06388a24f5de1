"""The reconstruct engine and `python -m DRoPE reconstruct`: outputs on the input grid, errors, cancellation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import crop_dwi
from DRoPE.cli import main as cli_main
from DRoPE.io import load_dwi
from DRoPE.model import DRoPEMAE
from DRoPE.probes import LinearProbe, save_probe
from DRoPE.model import load_model
from DRoPE.preprocess import preprocess
from DRoPE.reconstruct import ReconstructSettings, dti_maps, run_reconstruction, scan_latent, select_volumes

REPO = Path(__file__).resolve().parents[1]
MAPS = ("fa", "md", "fa_recon", "md_recon", "fa_error", "md_error", "attention")


@pytest.fixture(scope="module")
def small_dwi(tmp_path_factory, sample_dir) -> Path:
    """A crop (48 x 48 x 12, all 13 volumes) of the bundled sample: exactly 6 x 6 x 3 patches."""
    box = (slice(16, 64), slice(16, 64), slice(14, 26))
    return crop_dwi(sample_dir / "dwi.nii.gz", tmp_path_factory.mktemp("small") / "dwi.nii.gz", box)


def test_cli_writes_every_output_on_the_input_grid(tiny_weights, small_dwi, tmp_path):
    out = tmp_path / "out"
    code = cli_main(["reconstruct", str(small_dwi), "--out", str(out), "--weights", str(tiny_weights),
                     "--progress", "none"])
    assert code == 0
    source = nib.load(small_dwi)
    for name in MAPS + ("reconstruction",):
        img = nib.load(out / f"{name}.nii.gz")
        assert img.shape[:3] == source.shape[:3], name
        np.testing.assert_allclose(img.affine, source.affine, atol=1e-5, err_msg=name)
    recon = nib.load(out / "reconstruction.nii.gz")
    assert recon.shape == source.shape
    np.testing.assert_array_equal(np.loadtxt(out / "reconstruction.bval"), np.loadtxt(small_dwi.with_name("dwi.bval")))
    latent = np.load(out / "latent.npy")
    assert latent.shape == (48,) and np.all(np.isfinite(latent))
    matrix = np.loadtxt(out / "diffusion_attention.csv", delimiter=",", skiprows=1, usecols=range(1, 13))
    assert matrix.shape == (12, 12)  # between the 12 weighted volumes: b0 is the reference, not a token
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-4)  # each query row is a softmax
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["outputs"]) == {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_nrrd_input_gives_the_same_latent_as_nifti(tiny_weights, sample_dir):
    settings = ReconstructSettings(mask_ratio=0.5, seed=3)
    a = run_reconstruction(load_dwi(sample_dir / "dwi.nii.gz"), tiny_weights, settings)
    b = run_reconstruction(load_dwi(sample_dir / "dwi.nrrd"), tiny_weights, settings)
    # the NRRD gradients are normalised while the .bvec has norm 0.9995: the inputs differ by rounding only
    np.testing.assert_allclose(a.latent, b.latent, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(a.visible, b.visible)


def test_latent_is_the_scan_latent_of_extract(tiny_weights, small_dwi):
    """The reconstruction's latent (taken from the attention-map pass) is what ``probe.py extract`` computes."""
    dwi = load_dwi(small_dwi)
    result = run_reconstruction(dwi, tiny_weights, ReconstructSettings(slab=4))
    model = load_model(tiny_weights)
    prep = preprocess(dwi, mask=result.mask, patch=model.config.patch_size)
    np.testing.assert_allclose(result.latent, scan_latent(model, prep, 4).numpy(), rtol=1e-5, atol=1e-6)


def test_bf16_autocast_runs_and_stays_close(tiny_weights, small_dwi):
    """Under a caller's bf16 autocast (as on CUDA) reconstruct runs and its outputs stay near float32's."""
    dwi = load_dwi(small_dwi)
    plain = run_reconstruction(dwi, tiny_weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = run_reconstruction(dwi, tiny_weights)
    brain = plain.mask
    assert np.abs(low.recon[brain] - plain.recon[brain]).max() < 0.05 * np.abs(plain.recon[brain]).max()
    assert np.linalg.norm(low.latent - plain.latent) < 0.05 * np.linalg.norm(plain.latent)
    np.testing.assert_allclose(low.attention, plain.attention, atol=0.05 * plain.attention.max())


def test_same_seed_same_result_and_mask_ratio_respected(tiny_weights, small_dwi):
    dwi = load_dwi(small_dwi)
    first = run_reconstruction(dwi, tiny_weights, ReconstructSettings(mask_ratio=0.75, seed=7))
    again = run_reconstruction(dwi, tiny_weights, ReconstructSettings(mask_ratio=0.75, seed=7))
    np.testing.assert_array_equal(first.recon, again.recon)
    np.testing.assert_array_equal(first.latent, again.latent)
    # 48 x 48 x 12 is exactly 6 x 6 x 3 patches: no padding, so a quarter of every weighted volume is visible
    b0 = dwi.gtab.b0s_mask
    np.testing.assert_allclose(first.visible[..., ~b0].mean(axis=(0, 1, 2)), 9 / 36)
    assert first.visible[..., b0].all()  # the b0 is never hidden: it is the normalisation reference
    other = run_reconstruction(dwi, tiny_weights, ReconstructSettings(mask_ratio=0.75, seed=8))
    assert not np.array_equal(first.visible, other.visible)


def test_hidden_map_on_the_input_grid_marks_exactly_the_hidden_patches(tiny_weights, small_dwi, tmp_path):
    out = tmp_path / "out"
    assert cli_main(["reconstruct", str(small_dwi), "--out", str(out), "--weights", str(tiny_weights),
                     "--progress", "none", "--seed", "4"]) == 0
    source = nib.load(small_dwi)
    hidden = nib.load(out / "hidden.nii.gz")
    assert hidden.shape == source.shape and hidden.get_data_dtype() == np.uint8
    np.testing.assert_allclose(hidden.affine, source.affine, atol=1e-5)
    marks = np.asarray(hidden.dataobj)
    bvals = np.loadtxt(small_dwi.with_name("dwi.bval"))
    assert not marks[..., bvals < 50].any()
    # the crop is exactly 6 x 6 x 3 patches of (8, 8, 4) in file order too (LAS flips x only, 48 = 6 x 8):
    # every patch is all hidden or all shown, and 81 of the 108 patches of each weighted volume are hidden
    blocks = marks[..., bvals >= 50].reshape(6, 8, 6, 8, 3, 4, -1)
    per_patch = blocks.mean(axis=(1, 3, 5))
    assert set(np.unique(per_patch)) == {0.0, 1.0}
    np.testing.assert_array_equal(per_patch.sum(axis=(0, 1, 2)), 81)
    # and it is the engine's own hidden set (the mask the errors were scored on)
    result = run_reconstruction(load_dwi(small_dwi), tiny_weights, ReconstructSettings(seed=4))
    canonical = np.asarray(nib.as_closest_canonical(hidden).dataobj) > 0
    np.testing.assert_array_equal(canonical, ~result.visible)


def test_b0_volumes_are_carried_over_and_not_given_to_the_model(tiny_weights, small_dwi, monkeypatch):
    seen = []
    original = DRoPEMAE.reconstruct

    def spy(self, x, bvals, bvecs, keep=None):
        seen.append(bvals.min().item())
        return original(self, x, bvals, bvecs, keep)

    monkeypatch.setattr(DRoPEMAE, "reconstruct", spy)
    dwi = load_dwi(small_dwi)
    result = run_reconstruction(dwi, tiny_weights, ReconstructSettings(seed=0))
    assert seen and min(seen) >= 50
    b0 = dwi.gtab.b0s_mask
    np.testing.assert_allclose(result.recon[..., b0], dwi.data[..., b0] * result.mask[..., None], rtol=1e-6)
    # the reconstruction is the completed DWI: the acquired signal wherever a patch was shown
    shown = result.visible & result.mask[..., None]
    np.testing.assert_array_equal(result.recon[shown], dwi.data[shown])
    hidden = ~result.visible & result.mask[..., None]
    assert not np.allclose(result.recon[hidden], dwi.data[hidden])


def test_volume_subset_holds_a_b0_and_is_seeded(small_dwi):
    dwi = load_dwi(small_dwi)
    subset, index = select_volumes(dwi, 5, seed=1)
    assert subset.n_volumes == 5 and subset.gtab.b0s_mask.any()
    np.testing.assert_array_equal(subset.data, dwi.data[..., index])
    np.testing.assert_array_equal(select_volumes(dwi, 5, seed=1)[1], index)


def test_error_maps_are_zero_when_the_reconstruction_is_the_input(small_dwi):
    dwi = load_dwi(small_dwi)
    mask = np.zeros(dwi.shape, bool)
    mask[10:38, 10:38, 2:10] = True
    maps = dti_maps(dwi, dwi.data.copy(), mask)
    assert maps["fa"][mask].max() > 0.3  # real anisotropy was fitted
    assert np.all(maps["fa_error"] == 0) and np.all(maps["md_error"] == 0)
    noisy = dwi.data * np.random.default_rng(0).uniform(0.8, 1.2, dwi.data.shape).astype(np.float32)
    assert dti_maps(dwi, noisy, mask)["fa_error"][mask].mean() > 0.01


def test_probe_prediction_is_the_linear_formula_on_the_latent(tiny_weights, small_dwi, tmp_path):
    rng = np.random.default_rng(0)
    probe = LinearProbe("regression", "age", rng.normal(size=48), rng.uniform(0.5, 2, 48), rng.normal(size=(1, 48)),
                        np.array([40.0]))
    save_probe(probe, tmp_path / "probe.json")
    out = tmp_path / "out"
    assert cli_main(["reconstruct", str(small_dwi), "--out", str(out), "--weights", str(tiny_weights),
                     "--probe", str(tmp_path / "probe.json"), "--progress", "none", "--volumes", "8"]) == 0
    latent = np.load(out / "latent.npy").astype(np.float64)
    expected = float(probe.weights[0] @ ((latent - probe.feature_mean) / probe.feature_std) + 40.0)
    assert json.loads((out / "prediction.json").read_text())["value"] == pytest.approx(expected, rel=1e-6)
    assert len(np.loadtxt(out / "reconstruction.bval")) == 8


def _run_cli(*args, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "DRoPE", "reconstruct", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def test_corrupt_input_gives_a_clear_error_and_exit_code_2(tiny_weights, small_dwi, tmp_path):
    bad = tmp_path / "dwi.nii.gz"
    bad.write_bytes(small_dwi.read_bytes()[:5000])
    for ext in ("bval", "bvec"):
        (tmp_path / f"dwi.{ext}").write_text(small_dwi.with_name(f"dwi.{ext}").read_text())
    proc = _run_cli(str(bad), "--out", str(tmp_path / "out"), "--weights", str(tiny_weights), "--progress", "json")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert str(bad) in stderr and "Traceback" not in stderr
    assert json.loads(stdout.strip().splitlines()[-1])["event"] == "error"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_sigterm_mid_run_leaves_no_partial_output(tiny_weights, sample_dir, tmp_path):
    out = tmp_path / "out"
    proc = _run_cli(str(sample_dir / "dwi.nii.gz"), "--out", str(out), "--weights", str(tiny_weights),
                    "--progress", "json")
    for line in proc.stdout:
        if "slab" in line:  # the model is running
            break
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "cancelled" in stdout
    leftovers = list(out.rglob("*")) if out.exists() else []
    assert leftovers == []
