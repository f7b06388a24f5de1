"""Angular synthesis (DRoPE.synthesis, DRoPEMAE.synthesize, `python -m DRoPE synthesize`): the decoder queries at
new (b, g) equal a reconstruction with those volumes hidden everywhere; on a real crop the bundled model reproduces
an acquired volume asked for at its own (b, g) and beats the shell mean on a left-out one; the written DWI lies on
the input grid with the requested table."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from DRoPE.cli import main as cli_main
from DRoPE.gradients import DWIWarning
from DRoPE.io import load_dwi
from DRoPE.model import DRoPEMAE, load_model, model_config
from DRoPE.preprocess import brain_mask, normalize, preprocess
from DRoPE.resources import DEFAULT_WEIGHTS
from DRoPE.synthesis import nearest_angle, synthesize_normalised

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny(head: str) -> DRoPEMAE:
    torch.manual_seed(0)
    model = DRoPEMAE(model_config("tiny", head=head)).eval()
    with torch.no_grad():  # move the copy head away from its shell-mean start so the queries matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _inputs(V: int, K: int):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, V, 16, 8, 4, generator=g)
    bvecs = torch.nn.functional.normalize(torch.randn(1, V + K, 3, generator=g), dim=-1)
    bvals = torch.tensor([[1000.0] * (V + K)])
    return x, bvals, bvecs


@pytest.mark.parametrize("head", ["copy", "conv"])
def test_synthesize_is_reconstruct_with_the_requested_volumes_hidden_in_every_patch(head):
    model = _tiny(head)
    V, K = 5, 3
    x, bvals, bvecs = _inputs(V, K)
    with torch.no_grad():
        synth = model.synthesize(x, bvals[:, :V], bvecs[:, :V], bvals[:, V:], bvecs[:, V:], chunk=K)
        padded = torch.cat((x, torch.zeros(1, K, *x.shape[2:])), 1)
        keep = torch.ones(1, V + K, model.num_patches(x.shape[2:]), dtype=torch.bool)
        keep[:, V:] = False
        twin = model.reconstruct(padded, bvals, bvecs, keep)[:, V:]
    assert synth.shape == (1, K, *x.shape[2:])
    torch.testing.assert_close(synth, twin, rtol=1e-5, atol=1e-6)


def test_with_chunk_1_a_request_does_not_depend_on_the_others():
    model = _tiny("copy")
    V, K = 5, 3
    x, bvals, bvecs = _inputs(V, K)
    with torch.no_grad():
        together = model.synthesize(x, bvals[:, :V], bvecs[:, :V], bvals[:, V:], bvecs[:, V:], chunk=1)
        alone = model.synthesize(x, bvals[:, :V], bvecs[:, :V], bvals[:, V + 1 : V + 2], bvecs[:, V + 1 : V + 2])
        mixed = model.synthesize(x, bvals[:, :V], bvecs[:, :V], bvals[:, V:], bvecs[:, V:], chunk=K)
    torch.testing.assert_close(together[:, 1:2], alone)
    assert not torch.allclose(mixed[:, 1:2], alone)  # decoded together, requests attend to each other


# --- the bundled model on a real crop -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def canon(crops):
    """The Canon oblique crop (1 b0 + 12 x b1500), its model-grid preprocessing and the bundled model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DWIWarning)
        dwi = load_dwi(crops / "canon_oblique_all20d" / "dwi.nii.gz")
    model = load_model(DEFAULT_WEIGHTS).eval()
    return dwi, brain_mask(dwi), model


def _brain_mse(a, b, brain):
    return float(((a - b) ** 2)[brain].mean())


def test_an_acquired_volume_asked_for_at_its_own_b_and_g_is_reproduced(canon):
    dwi, mask, model = canon
    prep = preprocess(dwi, mask=mask, patch=model.config.patch_size)
    weighted = np.flatnonzero(~dwi.gtab.b0s_mask)
    pred = synthesize_normalised(model, prep, dwi.gtab.bvals[weighted], dwi.gtab.bvecs[weighted], slab=4)
    truth = prep.signal[weighted]
    brain = np.broadcast_to(prep.mask, truth.shape)
    others = np.stack([np.delete(truth, i, 0).mean(0) for i in range(len(weighted))])  # shell mean of the rest
    model_error, baseline_error = _brain_mse(pred, truth, brain), _brain_mse(others, truth, brain)
    assert model_error < 0.5 * baseline_error, (model_error, baseline_error)  # measured: 0.3 x
    # and the prediction follows the asked-for volume, not any other one of the shell
    errors = np.array([[_brain_mse(pred[i], truth[j], prep.mask) for j in range(len(weighted))]
                       for i in range(len(weighted))])
    assert (errors.argmin(1) == np.arange(len(weighted))).all()


def test_a_left_out_volume_is_predicted_better_than_by_the_shell_mean(canon):
    dwi, mask, model = canon
    weighted = np.flatnonzero(~dwi.gtab.b0s_mask)
    model_errors, baseline_errors = [], []
    for v in weighted[::3]:
        rest = np.setdiff1d(np.arange(dwi.n_volumes), [v])
        prep = preprocess(dwi.select(rest), mask=mask, patch=model.config.patch_size)
        pred = synthesize_normalised(model, prep, dwi.gtab.bvals[[v]], dwi.gtab.bvecs[[v]], slab=4)[0]
        truth = preprocess(dwi.select([0, v]), mask=mask, patch=model.config.patch_size).signal[1]
        shell_mean = prep.signal[~prep.gtab.b0s_mask].mean(0)
        model_errors.append(_brain_mse(pred, truth, prep.mask))
        baseline_errors.append(_brain_mse(shell_mean, truth, prep.mask))
    assert np.mean(model_errors) < 0.8 * np.mean(baseline_errors), (model_errors, baseline_errors)  # measured 0.55 x


def test_nearest_angle_is_zero_for_acquired_directions_and_nan_for_new_shells(canon):
    dwi = canon[0]
    request = dwi.gtab.select(np.arange(dwi.n_volumes))
    angles = nearest_angle(request, dwi.gtab)
    assert np.isnan(angles[dwi.gtab.b0s_mask]).all()
    np.testing.assert_allclose(angles[~dwi.gtab.b0s_mask], 0.0, atol=1e-3)


# --- the command ------------------------------------------------------------------------------------------------


def _write_table(folder: Path, bvals, bvecs) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    bval, bvec = folder / "new.bval", folder / "new.bvec"
    bval.write_text(" ".join(str(b) for b in bvals) + "\n")
    bvec.write_text("\n".join(" ".join(str(c) for c in row) for row in np.asarray(bvecs, dtype=float).T) + "\n")
    return bval, bvec


def test_cli_with_the_inputs_own_table_writes_its_volumes_on_its_grid(canon, crops, tmp_path):
    source = crops / "canon_oblique_all20d" / "dwi.nii.gz"
    out = tmp_path / "out"
    code = cli_main(["synthesize", str(source), "--bvals", str(source.with_name("dwi.bval")),
                     "--bvecs", str(source.with_name("dwi.bvec")), "--out", str(out), "--device", "cpu"])
    assert code == 0
    image, written = nib.load(source), nib.load(out / "synthesized.nii.gz")
    assert written.shape == image.shape
    np.testing.assert_allclose(written.affine, image.affine, atol=1e-5)
    np.testing.assert_array_equal(np.loadtxt(out / "synthesized.bval"), np.loadtxt(source.with_name("dwi.bval")))
    np.testing.assert_allclose(np.loadtxt(out / "synthesized.bvec"), np.loadtxt(source.with_name("dwi.bvec")), atol=2e-3)
    # on the file's own grid, each synthesised volume is close to the acquired one
    dwi, mask = canon[0], canon[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DWIWarning)
        synth = load_dwi(out / "synthesized.nii.gz")
    b0 = dwi.data[..., 0]
    inside = mask & (b0 > 0)
    weighted = np.flatnonzero(~dwi.gtab.b0s_mask)
    truth = normalize(dwi.data, dwi.gtab, mask)[..., weighted]
    pred = normalize(synth.data, synth.gtab, mask)[..., weighted]
    others = np.stack([np.delete(truth, i, -1).mean(-1) for i in range(len(weighted))], -1)
    brain = np.broadcast_to(inside[..., None], truth.shape)
    assert _brain_mse(pred, truth, brain) < 0.5 * _brain_mse(others, truth, brain)
    np.testing.assert_allclose(synth.data[..., 0][inside], b0[inside], rtol=1e-4)  # the b0 row: the mean b0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["new_shells"] == [] and not summary["b0_prepended"]


def test_request_is_read_in_the_fsl_frame_of_the_image(crops, tmp_path):
    """The same scan stored x-flipped (det > 0: FSL negates x) with the same .bvec files gives the same volumes."""
    source = crops / "canon_oblique_all20d" / "dwi.nii.gz"
    image = nib.load(source)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = image.shape[0] - 1
    flipped = tmp_path / "flipped" / "dwi.nii.gz"
    flipped.parent.mkdir()
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[::-1].copy(), image.affine @ flip), flipped)
    assert np.linalg.det((image.affine @ flip)[:3, :3]) > 0
    for suffix in (".bval", ".bvec"):  # an x flip of the storage leaves an FSL table unchanged
        flipped.with_name("dwi" + suffix).write_text(source.with_name("dwi" + suffix).read_text())
    bval, bvec = _write_table(tmp_path / "req", [1500, 1500], [[0.6, 0.0, 0.8], [0.48, 0.8, 0.36]])
    outputs = []
    for dwi in (source, flipped):
        out = tmp_path / dwi.parent.name / "out"
        assert cli_main(["synthesize", str(dwi), "--bvals", str(bval), "--bvecs", str(bvec), "--out", str(out),
                         "--device", "cpu"]) == 0
        outputs.append(np.asarray(nib.load(out / "synthesized.nii.gz").dataobj))
    np.testing.assert_allclose(outputs[1][::-1], outputs[0], rtol=1e-4, atol=1e-3 * outputs[0].max())


def test_cli_prepends_a_b0_and_flags_a_new_shell(crops, tmp_path, capsys):
    source = crops / "canon_oblique_all20d" / "dwi.nii.gz"
    bval, bvec = _write_table(tmp_path / "req", [1500, 3000], [[0.6, 0.0, 0.8], [0.0, 1.0, 0.0]])
    out = tmp_path / "out"
    assert cli_main(["synthesize", str(source), "--bvals", str(bval), "--bvecs", str(bvec), "--out", str(out),
                     "--device", "cpu", "--progress", "json"]) == 0
    captured = capsys.readouterr()
    assert "b=3000 was not acquired" in captured.err
    events = [json.loads(line) for line in captured.out.splitlines()]  # the Slicer module's protocol
    fractions = [e["fraction"] for e in events[:-1]]
    assert {e["event"] for e in events[:-1]} == {"progress"} and fractions == sorted(fractions) and len(fractions) > 3
    assert events[-1] == {"event": "done", "out": str(out)}
    assert np.loadtxt(out / "synthesized.bval").tolist() == [0, 1500, 3000]
    assert nib.load(out / "synthesized.nii.gz").shape == nib.load(source).shape[:3] + (3,)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["b0_prepended"] and summary["new_shells"] == [3000.0]


@pytest.mark.parametrize(
    "case, words",
    [
        ("count", "has 1 b-vectors but"),
        ("missing", "--bvals"),
        ("chunk", "--chunk"),
        ("b0 only", "no diffusion-weighted volume"),
        ("overwrite", "refusing to overwrite"),
    ],
)
def test_bad_requests_stop_with_one_line_and_exit_2(crops, tmp_path, capsys, case, words):
    source = crops / "canon_oblique_all20d" / "dwi.nii.gz"
    bval, bvec = _write_table(tmp_path / "req", [1500, 1500], [[0, 0, 1], [0, 1, 0]])
    extra = []
    if case == "count":
        bvec.write_text("0\n0\n1\n")
    elif case == "missing":
        bval = tmp_path / "absent.bval"
    elif case == "chunk":
        extra = ["--chunk", "0"]
    elif case == "b0 only":
        bval, bvec = _write_table(tmp_path / "b0", [0], [[0, 0, 0]])
    out = tmp_path / "out"
    if case == "overwrite":  # the request lies where the output would go
        out = bval.parent
        bval, bvec = bval.rename(out / "synthesized.bval"), bvec.rename(out / "synthesized.bvec")
    code = cli_main(["synthesize", str(source), "--bvals", str(bval), "--bvecs", str(bvec), "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and words in err, err
    assert not (out / "synthesized.nii.gz").exists()
    if case == "overwrite":
        assert bval.read_text().split() == ["1500", "1500"]
