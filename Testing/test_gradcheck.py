"""The gradient-table check (DRoPE/gradcheck.py, ``python -m DRoPE check-gradients``): the coherence score in closed
form, the no-refit shortcut, crafted sign / axis errors on real crops (both FSL x conventions), the command's JSON."""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from DRoPE.cli import main
from DRoPE.dti import DTIModel
from DRoPE.gradcheck import (
    TableCandidate,
    candidate_tables,
    check_gradients,
    coherence_scores,
    same_tensor,
)
from DRoPE.gradients import DWIWarning
from DRoPE.io import load_dwi

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "DRoPETrain"))
import gradcheck_validate  # noqa: E402  (DRoPETrain/gradcheck_validate.py)

CRAFTED = gradcheck_validate.CRAFTED


def _load(path, bvec=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DWIWarning)
        return load_dwi(path, bvec=bvec)


def _copy_scan(source: Path, target: Path, bvec_rows=None) -> Path:
    """Copy dwi.nii.gz + .bval (+ the .bvec, or the given (3, N) rows) into ``target``; returns the image path."""
    target.mkdir(parents=True, exist_ok=True)
    for suffix in (".nii.gz", ".bval", ".bvec"):
        shutil.copy(source / f"dwi{suffix}", target / f"dwi{suffix}")
    if bvec_rows is not None:
        np.savetxt(target / "dwi.bvec", bvec_rows, fmt="%.6f")
    return target / "dwi.nii.gz"


def _given_rows(folder: Path) -> np.ndarray:
    return np.loadtxt(folder / "dwi.bvec", ndmin=2)


# --- candidates ---------------------------------------------------------------------------------------------------


def test_candidate_matrix_follows_the_documented_formula():
    given = np.random.default_rng(0).normal(size=(3, 7))  # rows x, y, z of a .bvec
    for candidate in candidate_tables():
        sign = np.where(candidate.flip, -1.0, 1.0)
        expected = np.stack([sign[a] * given[candidate.permutation[a]] for a in range(3)])
        np.testing.assert_array_equal(candidate.matrix @ given, expected)


def test_24_candidates_cover_the_48_signed_permutations_once_up_to_sign():
    candidates = candidate_tables()
    assert len(candidates) == 24 and candidates[0].is_identity
    for i, a in enumerate(candidates):  # pairwise distinct tensors
        assert not any(same_tensor(a.matrix, b.matrix) for b in candidates[i + 1:])
    all_48 = [TableCandidate(c.permutation, tuple(not f for f in c.flip)) for c in candidates] + list(candidates)
    assert len({(c.permutation, c.flip) for c in all_48}) == 48


def test_describe_names_the_simplest_fix():
    assert TableCandidate((0, 1, 2), (False, True, False)).describe() == "flip y (same as flipping x and z)"
    assert TableCandidate((2, 1, 0), (False, False, False)).describe() == "swap x and z"
    assert TableCandidate((1, 0, 2), (True, False, False)).describe() == "(x, y, z) -> (-y, x, z)"


# --- the coherence score in closed form -----------------------------------------------------------------------------


def _two_domain_field(rows_a=3, shape=(10, 10, 3)):
    """V1 = e_x for y < rows_a, e_y for y >= rows_a (FA 1 everywhere, 1 mm voxels)."""
    v1 = np.zeros(shape + (3,))
    v1[:, :rows_a, :, 0] = 1.0
    v1[:, rows_a:, :, 1] = 1.0
    return v1, np.ones(shape), np.ones(shape, dtype=bool)


@pytest.mark.parametrize("radius", [1, 2])
def test_coherence_score_of_a_two_domain_field_in_closed_form(radius):
    # 10 x 10 x 3 voxels; domain A (V1 = x) is rows y = 0..2, domain B (V1 = y) rows 3..9. Pairs (voxel, neighbour one
    # step along +-V1 inside the grid), |cos| 1 within a domain and 0 across.
    # Given table: A steps along x: 3 rows x 3 slices x 18 pairs, all 1 (162). B steps along y: 30 columns x 13 pairs,
    # of which the step from y = 3 down into A is 0 (390 pairs, 360 ones).
    # Swap x, y: A steps along y: 30 columns x 5 pairs, the step from y = 2 up into B is 0 (150, 120 ones);
    # B steps along x: 7 rows x 3 slices x 18 pairs, all 1 (378).
    v1, fa, fitted = _two_domain_field()
    identity, swap, flip = (c.matrix for c in (TableCandidate((0, 1, 2), (False,) * 3),
                                               TableCandidate((1, 0, 2), (False,) * 3),
                                               TableCandidate((0, 1, 2), (False, False, True))))
    scores = coherence_scores(v1, fa, fitted, np.ones(3), [identity, swap, flip], radius=radius)
    np.testing.assert_allclose(scores, [522 / 552, 498 / 528, 522 / 552], rtol=1e-12)


def test_coherence_score_weights_pairs_by_the_fa_of_both_voxels():
    v1, fa, fitted = _two_domain_field()
    fa[:, 3:] = 0.5  # domain B: B-B pairs weigh 0.25, B-A pairs 0.5
    score = coherence_scores(v1, fa, fitted, np.ones(3), [np.eye(3)], radius=1)[0]
    assert score == pytest.approx((162 + 0.25 * 360) / (162 + 0.25 * 360 + 0.5 * 30), rel=1e-12)


def test_coherence_score_steps_in_mm_not_in_voxels():
    # One scored voxel (FA 1, V1 = (3, 1, 0)/sqrt(10)) at the centre of a 5 x 5 x 1 grid; the others have FA 0.2 (not
    # scored, but neighbours) and V1 = z, except the two at +-(1, 1, 0), whose V1 equals the centre's. With 3 x 1 x 1 mm
    # voxels the offset (1, 1, 0) is (3, 1, 0) mm, parallel to V1: score 1. With 1 mm voxels (1, 0, 0) is the closest
    # (18 deg vs 27 deg): score 0.
    v1 = np.zeros((5, 5, 1, 3))
    v1[..., 2] = 1.0
    v = np.array([3.0, 1.0, 0.0]) / np.sqrt(10)
    v1[2, 2, 0] = v1[3, 3, 0] = v1[1, 1, 0] = v
    fa = np.full((5, 5, 1), 0.2)
    fa[2, 2, 0] = 1.0
    fitted = np.ones((5, 5, 1), dtype=bool)
    assert coherence_scores(v1, fa, fitted, np.array([3.0, 1.0, 1.0]), [np.eye(3)], radius=1)[0] == pytest.approx(1.0)
    assert coherence_scores(v1, fa, fitted, np.ones(3), [np.eye(3)], radius=1)[0] == pytest.approx(0.0)


# --- real data ------------------------------------------------------------------------------------------------------


def test_refit_with_a_signed_permutation_gives_M_D_Mt(crops):
    """The shortcut the check relies on: b-vectors changed by an orthogonal M -> fitted tensor M D M^T (no refit)."""
    dwi = _load(crops / "canon_oblique_all20d" / "dwi.nii.gz")
    data = dwi.data[14:26, 18:30, 6:10]
    matrix = TableCandidate((2, 0, 1), (False, True, False)).matrix
    before = DTIModel(dwi.gtab).fit(data, progress=False).tensor
    after = DTIModel(dwi.gtab.transformed(matrix)).fit(data, progress=False).tensor
    np.testing.assert_allclose(after, matrix @ before @ matrix.T, atol=1e-3 * np.abs(before).max())


@pytest.mark.parametrize("scan", ["canon_oblique_all20d", "canon_ortho_same_session", "siemens_xa30_b2500",
                                  "philips_achieva_32dir", "mappertrac_sub-011591"])
def test_given_table_wins_on_real_crops(crops, scan):
    result = check_gradients(_load(crops / scan / "dwi.nii.gz"))
    assert result.given_is_best and result.margin == 0.0 and result.lead > 0


def test_nrrd_input_is_checked_in_the_frame_of_its_fsl_equivalent(crops):
    nifti = check_gradients(_load(crops / "canon_oblique_all20d" / "dwi.nii.gz"))
    nrrd = check_gradients(_load(crops / "nrrd_slicer_dwi" / "canon_oblique_dwi.nrrd"))
    assert [c.describe() for c in nrrd.candidates] == [c.describe() for c in nifti.candidates]
    np.testing.assert_allclose(nrrd.scores, nifti.scores, atol=1e-3)


@pytest.mark.parametrize("error", list(CRAFTED))
def test_crafted_error_is_named_and_undone(crops, tmp_path, error):
    folder = crops / "canon_oblique_all20d"
    wrong = CRAFTED[error].matrix
    path = _copy_scan(folder, tmp_path, wrong @ _given_rows(folder))
    result = check_gradients(_load(path))
    assert not result.given_is_best and result.margin > 0.01
    assert same_tensor(result.best.matrix, wrong.T)  # flips and swaps are their own inverse


def _ras_copy(folder: Path, target: Path) -> Path:
    """The LAS crop stored in RAS order (det > 0). The FSL .bvec is the same file: FSL negates x for det > 0, which
    undoes the x reversal of the voxel axis."""
    img = nib.load(folder / "dwi.nii.gz")
    data = np.asarray(img.dataobj)[::-1]
    affine = img.affine @ np.array([[-1, 0, 0, data.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    path = _copy_scan(folder, target)
    nib.save(nib.Nifti1Image(data, affine), path)
    assert np.linalg.det(affine[:3, :3]) > 0
    return path


@pytest.mark.parametrize("error", ["swap x,y", "swap x,z"])
def test_crafted_swap_is_named_in_the_fsl_frame_when_det_is_positive(crops, tmp_path, error):
    folder = crops / "canon_oblique_all20d"
    path = _ras_copy(folder, tmp_path)
    assert check_gradients(_load(path)).given_is_best
    wrong = CRAFTED[error].matrix
    np.savetxt(tmp_path / "dwi.bvec", wrong @ _given_rows(folder), fmt="%.6f")
    best = check_gradients(_load(path)).best
    assert same_tensor(best.matrix, wrong.T), best.describe()


# --- command line ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("error", ["flip y", "swap x,z"])
def test_check_gradients_json_gives_the_table_that_restores_the_original(crops, tmp_path, capsys, error):
    folder = crops / "canon_oblique_all20d"
    given = _given_rows(folder)
    path = _copy_scan(folder, tmp_path, CRAFTED[error].matrix @ given)
    assert main(["check-gradients", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["given_is_best"] is False and report["margin"] > 0
    assert set(report["best"]) >= {"permutation", "flip"} and isinstance(report["margin"], float)
    crafted = np.loadtxt(tmp_path / "dwi.bvec", ndmin=2)
    perm, flip = report["best"]["permutation"], report["best"]["flip"]
    fixed = np.stack([(-1 if flip[a] else 1) * crafted[perm[a]] for a in range(3)])  # the formula scripts use
    assert np.allclose(fixed, given, atol=1e-5) or np.allclose(fixed, -given, atol=1e-5)


def test_progress_json_ends_with_the_verdict_and_its_world_matrix(crops, tmp_path, capsys):
    """The Slicer module's protocol: progress lines, then one done event whose world_matrix turns the crafted
    table's world RAS directions back into the acquired ones (up to the global sign)."""
    folder = crops / "canon_oblique_all20d"
    path = _copy_scan(folder, tmp_path, CRAFTED["flip y"].matrix @ _given_rows(folder))
    assert main(["check-gradients", str(path), "--progress", "json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events] == ["progress", "done"]
    result = events[-1]["result"]
    assert result["given_is_best"] is False and "message" in result
    fixed = _load(path).world_bvecs() @ np.array(result["world_matrix"]).T
    truth = _load(folder / "dwi.nii.gz").world_bvecs()
    assert np.allclose(fixed, truth, atol=1e-5) or np.allclose(fixed, -truth, atol=1e-5)


def test_progress_json_reports_bad_input_as_one_error_event(crops, tmp_path, capsys):
    assert main(["check-gradients", str(tmp_path / "none.nii.gz"), "--progress", "json"]) == 2
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events] == ["progress", "error"] and "none.nii.gz" in events[-1]["message"]


def test_info_warns_about_a_wrong_table_and_changes_nothing(crops, tmp_path, capsys):
    folder = crops / "canon_oblique_all20d"
    assert main(["info", str(folder / "dwi.nii.gz")]) == 0
    assert "gradient check: the given b-vector table is the most coherent" in capsys.readouterr().out
    path = _copy_scan(folder, tmp_path, CRAFTED["flip x"].matrix @ _given_rows(folder))
    before = (tmp_path / "dwi.bvec").read_bytes()
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "warning: gradient check: the b-vectors look wrong: 'flip x (same as flipping y and z)'" in out
    assert (tmp_path / "dwi.bvec").read_bytes() == before


def test_check_gradients_needs_six_directions(crops, tmp_path, capsys):
    img = nib.load(crops / "canon_oblique_all20d" / "dwi.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., :5], img.affine), tmp_path / "dwi.nii.gz")
    bvals = np.loadtxt(crops / "canon_oblique_all20d" / "dwi.bval")[:5]
    np.savetxt(tmp_path / "dwi.bval", bvals[None], fmt="%g")
    np.savetxt(tmp_path / "dwi.bvec", _given_rows(crops / "canon_oblique_all20d")[:, :5], fmt="%.6f")
    assert main(["check-gradients", str(tmp_path / "dwi.nii.gz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "6 directions" in err[0] and "dwi.nii.gz" in err[0]


def test_check_gradients_missing_mask_is_one_line(crops, tmp_path, capsys):
    code = main(["check-gradients", str(crops / "canon_oblique_all20d" / "dwi.nii.gz"), "--mask", str(tmp_path / "m.nii.gz")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--mask" in err[0]


# --- whole scans ----------------------------------------------------------------------------------------------------

CORPUS_SUBSET = [  # one per vendor / software, different geometries
    "corpus/dcm_qa_canon/37000_SAG_DTI_PA-ortho",
    "corpus/dcm_qa_dti/3_dti_nopf_x2_roll",
    "corpus/dcm_qa_philips/601_dti_ax",
    "corpus/dcm_qa_uih/dti_tra_dir16_PA_6_134431",
    "corpus/dcm_qa_toshiba/8006_DTI_AX_30d",
    "corpus/dcm_qa_canon/10000_DTI_AP-ortho",
]


@pytest.mark.corpus
def test_whole_scans_given_table_wins_and_crafted_errors_are_fixed(shared_data):
    rows = [gradcheck_validate.validate_scan(shared_data / scan / "dwi.nii.gz") for scan in CORPUS_SUBSET]
    assert all(row["given_ok"] for row in rows), [(r["scan"].parent.name, r["best"]) for r in rows if not r["given_ok"]]
    crafted = [ok for row in rows for ok in row["crafted"].values()]
    assert np.mean(crafted) >= 0.95, [(r["scan"].parent.name, r["crafted"]) for r in rows]
