"""``python -m DRoPE info|dti`` on the bundled sample, run as a user would (subprocess), plus error handling."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from DRoPE.cli import build_parser, main
from DRoPE.gradients import DWIWarning
from DRoPE.io import load_dwi


REPO_ROOT = Path(__file__).resolve().parents[1]
MAPS = ("fa", "md", "mask", "v1")


def _run(*args, cwd=REPO_ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "DRoPE", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def nifti_run(sample_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dti_nii")
    result = _run("dti", sample_dir / "dwi.nii.gz", "--out", out)
    return result, out


@pytest.fixture(scope="module")
def nrrd_run(sample_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dti_nrrd")
    result = _run("dti", sample_dir / "dwi.nrrd", "--out", out, "--mask", sample_dir / "brain_mask.nii.gz", "--quiet")
    return result, out


def _maps(out):
    return {name: nib.load(out / f"{name}.nii.gz") for name in MAPS}


@pytest.mark.parametrize("name", ["dwi.nii.gz", "dwi.nrrd"])
def test_info_describes_the_sample(sample_dir, name):
    result = _run("info", sample_dir / name)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for expected in ("80 x 80 x 40, 13 volumes", "3 x 3 x 3 mm", "LAS", "b=1500: 12", "b0 volumes: 1", "single-shell"):
        assert expected in text, (expected, text)


def test_dti_writes_every_map_on_the_input_grid(sample_dir, nifti_run):
    result, out = nifti_run
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{m}.nii.gz" for m in MAPS] + ["overview.png"])
    source = nib.load(sample_dir / "dwi.nii.gz")
    for name, image in _maps(out).items():
        assert image.shape[:3] == source.shape[:3], name
        np.testing.assert_allclose(image.affine, source.affine, atol=1e-5, err_msg=name)
    assert _maps(out)["v1"].shape == source.shape[:3] + (3,)
    assert (out / "overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dti_maps_have_the_expected_values(sample_dir, nifti_run):
    """Mask close to the shared one; FA/MD medians near the README numbers for this set (canon_oblique_all20d)."""
    _, out = nifti_run
    maps = {name: np.asarray(image.dataobj) for name, image in _maps(out).items()}
    mask = maps["mask"] > 0
    shared = np.asarray(nib.load(sample_dir / "brain_mask.nii.gz").dataobj) > 0
    assert 2 * np.sum(mask & shared) / (mask.sum() + shared.sum()) > 0.99
    assert np.median(maps["fa"][mask]) == pytest.approx(0.2338, abs=0.01)
    assert np.median(maps["md"][mask]) == pytest.approx(0.7486e-3, rel=0.02)  # MD in mm^2/s
    assert np.all(maps["fa"][~mask] == 0) and maps["fa"].max() <= 1
    np.testing.assert_allclose(np.linalg.norm(maps["v1"][mask], axis=-1), 1.0, atol=1e-4)


def test_v1_is_in_world_coordinates(sample_dir, nifti_run):
    """Independent route: DIPY on the on-disk array with the FSL bvecs (det < 0: image frame as given), then
    rotate V1 to world with the on-disk direction cosines. This oblique set is 27-36 degrees off the scanner axes."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    _, out = nifti_run
    image = nib.load(sample_dir / "dwi.nii.gz")
    assert np.linalg.det(image.affine[:3, :3]) < 0
    data = image.get_fdata(dtype=np.float32)
    bvecs = np.loadtxt(sample_dir / "dwi.bvec").T
    norms = np.linalg.norm(bvecs, axis=1, keepdims=True)
    gtab = gradient_table(np.loadtxt(sample_dir / "dwi.bval"), bvecs=bvecs / np.maximum(norms, 1e-12))
    written = np.asarray(nib.load(out / "v1.nii.gz").dataobj)
    fa = np.asarray(nib.load(out / "fa.nii.gz").dataobj)
    keep = fa > 0.3
    fit = TensorModel(gtab).fit(data, mask=keep)
    rotation = image.affine[:3, :3] / np.linalg.norm(image.affine[:3, :3], axis=0)
    world = fit.evecs[..., :, 0] @ rotation.T
    cos = np.abs(np.sum(world[keep] * written[keep], axis=-1))
    assert keep.sum() > 5000
    assert np.median(cos) > 0.9999 and np.mean(cos > 0.99) > 0.99


def test_dti_on_nrrd_matches_nifti(sample_dir, nifti_run, nrrd_run):
    result, out = nrrd_run
    assert result.returncode == 0, result.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DWIWarning)
        grid = load_dwi(sample_dir / "dwi.nrrd").grid
    maps = _maps(out)
    for name, image in maps.items():
        assert image.shape[:3] == grid.shape, name
        np.testing.assert_allclose(image.affine, grid.affine, atol=1e-4, err_msg=name)
    shared = np.asarray(nib.load(sample_dir / "brain_mask.nii.gz").dataobj) > 0
    mask = np.asarray(maps["mask"].dataobj) > 0
    assert mask.sum() > 0.99 * shared.sum() and not np.any(mask & ~shared)
    both = mask & (np.asarray(nib.load(nifti_run[1] / "mask.nii.gz").dataobj) > 0)
    fa_nrrd = np.asarray(maps["fa"].dataobj)[both]
    fa_nii = np.asarray(nib.load(nifti_run[1] / "fa.nii.gz").dataobj)[both]
    np.testing.assert_allclose(fa_nrrd, fa_nii, atol=1e-4)  # README: FA from NRRD == FA from NIfTI


def _copy_sample(sample_dir, folder):
    folder.mkdir()
    for name in ("dwi.nii.gz", "dwi.bval", "dwi.bvec", "brain_mask.nii.gz"):
        shutil.copy(sample_dir / name, folder / name)
    return folder


def test_corrupt_input_is_a_clean_error(sample_dir, tmp_path):
    folder = _copy_sample(sample_dir, tmp_path / "in")
    bad = folder / "dwi.nii.gz"
    bad.write_bytes(bad.read_bytes()[:5000])  # truncated gzip stream
    for command in (["info", bad], ["dti", bad, "--out", tmp_path / "out"]):
        result = _run(*command)
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        assert str(bad) in result.stderr and "error:" in result.stderr
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite_inputs(sample_dir, tmp_path):
    folder = _copy_sample(sample_dir, tmp_path / "in")
    mask = folder / "mask.nii.gz"
    shutil.copy(folder / "brain_mask.nii.gz", mask)
    before = mask.read_bytes()
    code = main(["dti", str(folder / "dwi.nii.gz"), "--out", str(folder), "--mask", str(mask), "--quiet"])
    assert code == 2
    assert mask.read_bytes() == before
    assert not (folder / "fa.nii.gz").exists()


def test_mask_on_another_grid_is_rejected(sample_dir, tmp_path, capsys):
    wrong = tmp_path / "small_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.uint8), np.eye(4)), wrong)
    code = main(["dti", str(sample_dir / "dwi.nii.gz"), "--out", str(tmp_path / "o"), "--mask", str(wrong), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(wrong) in err and "does not match the DWI grid" in err


def test_missing_gradient_file_is_a_clean_error(sample_dir, tmp_path, capsys):
    shutil.copy(sample_dir / "dwi.nii.gz", tmp_path / "dwi.nii.gz")
    assert main(["info", str(tmp_path / "dwi.nii.gz")]) == 2
    assert "b-value file" in capsys.readouterr().err


def test_parser_lists_the_subcommands():
    parser = build_parser()
    assert parser.parse_args(["info", "x.nii.gz"]).handler.__name__ == "_cmd_info"
    args = parser.parse_args(["dti", "x.nii.gz", "--out", "d", "--mask", "m.nii.gz"])
    assert args.handler.__name__ == "_cmd_dti" and str(args.mask) == "m.nii.gz"
    with pytest.raises(SystemExit):
        parser.parse_args(["dti", "x.nii.gz"])  # --out is required
