"""Per-subject evaluation (DRoPE.evaluation.engine) and the end-to-end DRoPETrain/evaluate.py run."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from DRoPE.baselines import BASELINES
from DRoPE.evaluation import engine, metrics

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DRoPETrain"))

import evaluate  # noqa: E402  (DRoPETrain/evaluate.py)
from conftest import centre_box, crop_dwi  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_study(tmp_path_factory, crops):
    """Two cropped real subjects (b=1500 and b=2500) and two tiny checkpoints."""
    from DRoPE.model import DRoPEMAE, model_config, save_model

    root = tmp_path_factory.mktemp("eval")
    for sid, name in (("sub-01", "canon_oblique_all20d"), ("sub-02", "siemens_xa30_b2500")):
        source = crops / name / "dwi.nii.gz"
        box = centre_box(nib.load(source).shape, (16, 16, 4))
        crop_dwi(source, root / "data" / sid / "dwi" / f"{sid}_dwi.nii.gz", box)
    checkpoints = []
    for k, drope in enumerate((True, False)):
        torch.manual_seed(k)
        checkpoints.append(save_model(DRoPEMAE(model_config("tiny", drope=drope)), root / f"model{k}", extra={"slab": 4}))
    return root, checkpoints


# --- engine pieces on synthetic data --------------------------------------------------------------------------------


def test_signal_metrics_closed_form():
    rng = np.random.default_rng(0)
    shape = (8, 8, 4, 3)
    original = rng.random(shape) * 0.5
    brain = np.zeros(shape[:3], bool)
    brain[1:7, 1:7] = True
    visible = np.ones(shape, bool)
    visible[:4] = False  # the first half of x masked in every volume
    recon = original.copy()
    recon[:4] += 0.1  # error 0.1 exactly on the masked voxels
    recon *= brain[..., None]
    original = original * brain[..., None]
    shells = np.array([0.0, 1000.0, 1000.0])
    rows = {r["shell"]: r for r in engine.signal_metrics(original, recon, brain, visible, shells)}
    assert set(rows) == {"0", "1000", "dw"}
    assert rows["1000"]["n_volumes"] == 2 and rows["dw"]["n_volumes"] == 2
    assert rows["1000"]["psnr_masked"] == pytest.approx(20.0)  # MSE 0.01 on masked voxels
    n_masked, n_brain = (brain[:4]).sum(), brain.sum()
    assert rows["1000"]["mse_whole"] == pytest.approx(0.01 * n_masked / n_brain)
    assert rows["1000"]["psnr_masked_half"] == pytest.approx(10.0)
    expected_ssim = np.mean([metrics.ssim_map(original[..., v], recon[..., v])[brain & ~visible[..., v]].mean() for v in (1, 2)])
    assert rows["1000"]["ssim_masked"] == pytest.approx(expected_ssim)
    none = engine.signal_metrics(original, original, brain, np.ones(shape, bool), shells)
    assert none[0]["psnr_masked"] is None and none[0]["psnr_whole"] == float("inf")


def test_dti_region_and_tract_errors():
    fa = np.array([0.1, 0.3, 0.5, 0.6, 0.0]).reshape(5, 1, 1)
    maps = {
        "fa": fa, "md": np.full(fa.shape, 1e-3), "md_recon": np.full(fa.shape, 1e-3),
        "fa_error": np.array([0.2, 0.1, 0.3, 0.5, 0.0]).reshape(fa.shape),
        "md_error": np.array([1, 2, 3, 4, 0]).reshape(fa.shape) * 1e-4,
    }
    maps["md"][4] = 0  # a voxel without a fit is left out
    brain = np.ones(fa.shape, bool)
    errors, valid, wm = engine.dti_region_errors(maps, brain)
    assert valid.sum() == 4 and wm.sum() == 3  # FA > 0.2
    assert errors["fa_mae_brain"] == pytest.approx(np.mean([0.2, 0.1, 0.3, 0.5]))
    assert errors["fa_mae_wm"] == pytest.approx(np.mean([0.1, 0.3, 0.5]))
    assert errors["md_mae_wm"] == pytest.approx(np.mean([0.2, 0.3, 0.4]))  # in 1e-3 mm^2/s
    labels = np.array([1, 1, 2, 2, 2]).reshape(fa.shape)
    big = {k: np.repeat(v, 10, axis=1) for k, v in maps.items()}  # 10 voxels per row to pass the size floor
    rows = engine.tract_errors(big, np.repeat(labels, 10, axis=1), ("A", "B"), np.repeat(wm, 10, axis=1))
    assert [r["tract"] for r in rows] == ["A", "B"]
    assert rows[0]["fa_mae"] == pytest.approx(0.1) and rows[1]["fa_mae"] == pytest.approx(0.4)


def test_fid_slices_are_seeded_and_capped():
    brain = np.zeros((10, 10, 6), bool)
    brain[2:8, 2:8, 1:5] = True
    shells = np.array([0.0, 1000.0, 1000.0, 2000.0])
    a = engine.fid_slice_index(brain, shells, 5, seed=3, subject="sub-01")
    b = engine.fid_slice_index(brain, shells, 5, seed=3, subject="sub-01")
    c = engine.fid_slice_index(brain, shells, 5, seed=4, subject="sub-01")
    assert a.keys() == {"1000", "2000"}  # diffusion-weighted shells only
    assert all(np.array_equal(a[k], b[k]) for k in a) and not np.array_equal(a["1000"], c["1000"])
    assert len(a["1000"]) == 5 and set(a["1000"][:, 0]) <= {1, 2} and set(a["1000"][:, 1]) <= {1, 2, 3, 4}
    assert len(a["2000"]) == 4  # fewer candidates than the cap: all of them
    volume = np.arange(10 * 10 * 6 * 4, dtype=float).reshape(10, 10, 6, 4)
    slices = engine.take_slices(volume, a["2000"])
    assert slices.shape == (4, 10, 10) and np.array_equal(slices[0], volume[:, :, a["2000"][0, 1], 3].T[::-1])


def test_model_names():
    assert evaluate.model_names(["runs/a", "runs/b/", "x/a"], None) == ["a", "b", "a-2"]
    with pytest.raises(evaluate.EvaluationError, match="2 names for 3"):
        evaluate.model_names(["a", "b", "c"], ["x", "y"])


# --- end to end -----------------------------------------------------------------------------------------------------


def test_evaluate_end_to_end_compare(small_study, tmp_path, capsys):
    root, (model0, model1) = small_study
    out = tmp_path / "eval"
    code = evaluate.main([
        "--checkpoint", str(model0), "--compare", str(model1), "--names", "drope", "mae", "--data", str(root / "data"),
        "--out", str(out), "--fid-slices", "3", "--volumes", "8", "--device", "cpu", "--seed", "1", "--quiet",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "# Comparison" in printed and "FID (EfficientNet-Lite0)" in printed
    for name in ("signal_metrics.csv", "dti_metrics.csv", "tract_metrics.csv", "results.json", "report.md",
                 "shell_metrics.png", "comparison.md", "comparison.csv"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["same_masks"] is True
    assert set(results["fid"]) == {"drope", "mae", *BASELINES} and results["fid"]["drope"]["dw"] > 0
    # the baselines are measured on the same hidden patches, through the same metrics
    assert {r["model"] for r in results["dti"]} == {"drope", "mae", *BASELINES}
    assert (out / "subjects" / "sub-01" / "shell_mean" / "fa_error.nii.gz").is_file()
    with open(out / "signal_metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    shells = {(r["subject"], r["model"], r["shell"]) for r in rows}
    assert ("sub-01", "drope", "1500") in shells and ("sub-02", "mae", "2500") in shells and ("sub-01", "mae", "dw") in shells
    # the reported PSNR agrees with an independent computation from the written error-free pieces
    for subject in ("sub-01", "sub-02"):
        for model in ("drope", "mae"):
            folder = out / "subjects" / subject / model
            for name in ("fa_error.nii.gz", "md_error.nii.gz", "montage.png", "dti_errors.png"):
                assert (folder / name).is_file()
            fa_error = nib.load(folder / "fa_error.nii.gz")
            source = nib.load(root / "data" / subject / "dwi" / f"{subject}_dwi.nii.gz")
            assert fa_error.shape == source.shape[:3] and np.allclose(fa_error.affine, source.affine)
            assert 0 <= fa_error.get_fdata().max() <= 1
    dti = {(r["subject"], r["model"]): r for r in results["dti"]}
    assert all(0 <= dti[k]["fa_mae_wm"] <= 1 for k in dti)
    report = (out / "report.md").read_text()
    assert "Table 1" in report and "Table 2" in report and "masked patches" in report
    if results["atlas"] is not None:
        assert (out / "tract_metrics.csv").read_text().count("\n") >= 1


def test_evaluate_psnr_matches_independent_recomputation(small_study, tmp_path):
    """Re-run the engine and recompute the masked-patch PSNR of one shell by hand."""
    from DRoPE.io import load_dwi
    from DRoPE.reconstruct import ReconstructSettings

    root, (model0, _) = small_study
    dwi = load_dwi(root / "data" / "sub-01" / "dwi" / "sub-01_dwi.nii.gz")
    res = engine.evaluate_reconstruction(dwi, model0, ReconstructSettings(mask_ratio=0.75, seed=2), subject="s", model="m")
    result = res.reconstruction
    b0 = result.dwi.data[..., result.dwi.gtab.b0s_mask].mean(-1)
    ok = result.mask & (b0 > 0)
    original = np.where(ok[..., None], result.dwi.data / np.where(b0 > 0, b0, 1)[..., None], 0).clip(0, 1.5)
    recon = np.where(ok[..., None], result.recon / np.where(b0 > 0, b0, 1)[..., None], 0)
    dw = result.dwi.gtab.bvals > 0
    region = (result.mask[..., None] & ~result.visible)[..., dw]
    mse = np.mean((original[..., dw][region] - recon[..., dw][region]) ** 2)
    row = next(r for r in res.shells if r["shell"] == "dw")
    assert row["psnr_masked"] == pytest.approx(10 * np.log10(1 / mse), rel=1e-5)
    assert region.sum() / (result.mask.sum() * dw.sum()) == pytest.approx(0.75, abs=0.05)  # masked share of the brain


def test_evaluate_bad_input_exits_2(tmp_path, capsys, small_study):
    root, (model0, _) = small_study
    assert evaluate.main(["--checkpoint", str(model0), "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err
    code = evaluate.main(["--checkpoint", str(model0), "--data", str(root / "data"), "--out", str(tmp_path / "o"),
                          "--mask-ratio", "1.5"])
    assert code == 2 and "mask-ratio" in capsys.readouterr().err
