"""Protocol drift of latents (DRoPE.probing.drift, ``probe.py drift``): distances and ratios against hand-computed
values, the protocol draws, and the command end to end on the real crops with a tiny model."""

from __future__ import annotations

import csv
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from DRoPE.gradients import DWIWarning
from DRoPE.io import load_dwi
from DRoPE.probing import drift
from DRoPE.probing.extract import ExtractError, extract_latents

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "DRoPETrain"))
import probe  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_distances_and_ratios_match_hand_computed_values():
    # scan a: full (0, 0), draws (1, 0), (-1, 0) -> within 2, to full 1; b: its session partner at (0, 3);
    # c, d: other sessions at (4, 0) and (0, -4), each with draws +-(0, 0.5)
    latents = {
        "a": np.array([[0, 0], [1, 0], [-1, 0]], float),
        "b": np.array([[0, 3], [0, 3], [0, 3]], float),
        "c": np.array([[4, 0], [4, 0.5], [4, -0.5]], float),
        "d": np.array([[0, -4], [0.5, -4], [-0.5, -4]], float),
    }
    sessions = {"a": "s1", "b": "s1", "c": "s2", "d": "s3"}
    rows = {r["scan"]: r for r in drift.drift_rows(latents, sessions)}
    a = rows["a"]
    assert a["within"] == pytest.approx(2.0) and a["draws_to_full"] == pytest.approx(1.0)
    assert a["session_other_scans"] == pytest.approx(3.0)
    assert a["between_brains"] == pytest.approx(4.0)  # to c and d, not to its session partner b
    assert a["ratio_within"] == pytest.approx(0.5) and a["ratio_session"] == pytest.approx(0.75)
    assert rows["b"]["within"] == 0.0 and rows["b"]["between_brains"] == pytest.approx((5.0 + 7.0) / 2)
    assert np.isnan(rows["c"]["session_other_scans"]) and rows["c"]["within"] == pytest.approx(1.0)
    assert rows["c"]["between_brains"] == pytest.approx((4 + 5 + np.hypot(4, 4)) / 3)
    overall = rows["overall"]
    within = np.mean([2.0, 0.0, 1.0, 1.0])
    between = np.mean([r["between_brains"] for k, r in rows.items() if k != "overall"])
    assert overall["ratio_within"] == pytest.approx(within / between)
    assert overall["ratio_session"] == pytest.approx(np.mean([3.0, 3.0]) / between)


def test_identical_scans_in_two_sessions_give_no_ratio_instead_of_a_crash():
    """The same scan loaded twice and listed as two sessions: between-brain distance 0, ratios NaN."""
    same = np.array([[1, 2], [1, 2.5], [1, 1.5]], float)
    rows = drift.drift_rows({"a": same, "b": same.copy()}, {"a": "s1", "b": "s2"})
    assert [r["between_brains"] for r in rows] == [0.0, 0.0, 0.0]
    assert all(np.isnan(r["ratio_within"]) and np.isnan(r["ratio_session"]) for r in rows)


@pytest.fixture(scope="module")
def canon(crops):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DWIWarning)
        return load_dwi(crops / "canon_oblique_all20d" / "dwi.nii.gz")


def test_draws_keep_every_b0_and_a_seeded_subset_of_allowed_size(canon):
    weighted = int((~canon.gtab.b0s_mask).sum())
    sizes = set()
    for seed in range(40):
        index = drift.drift_draw(canon, 6, seed)
        assert set(np.flatnonzero(canon.gtab.b0s_mask)) <= set(index.tolist())
        n = int((~canon.gtab.b0s_mask[index]).sum())
        assert 6 <= n <= weighted - 1
        sizes.add(n)
        np.testing.assert_array_equal(index, drift.drift_draw(canon, 6, seed))
    assert len(sizes) > 3  # the size varies too
    with pytest.raises(ExtractError, match="lower the minimum"):
        drift.drift_draw(canon, weighted, 0)


def test_session_is_the_listed_one_else_the_corpus_source_else_the_scan():
    assert drift.session_of("x/corpus/dcm_qa_uih/AP_9/dwi.nii.gz", "AP_9") == "dcm_qa_uih"
    assert drift.session_of("x/canon_ortho/dwi.nii.gz", "canon_ortho", {"canon_ortho": "dcm_qa_canon"}) == "dcm_qa_canon"
    assert drift.session_of("x/alone/dwi.nii.gz", "alone") == "alone"


def test_full_protocol_latent_is_the_extract_latent(canon, crops, tiny_weights):
    from DRoPE.model import load_model

    model = load_model(tiny_weights).eval()
    scan = drift.make_draws("canon", canon, 2, 6, 0)
    rows = drift.encoder_latents(model, 4)(scan)
    reference, _ = extract_latents([crops / "canon_oblique_all20d" / "dwi.nii.gz"], tiny_weights, volumes=None)
    assert rows.shape == (3, 48)
    np.testing.assert_allclose(rows[0], next(iter(reference.values()))[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(rows[1], rows[0])  # a draw is another protocol


def test_command_writes_csv_png_and_json_per_scan_and_overall(crops, tiny_weights, tmp_path):
    names = ["canon_oblique_all20d", "canon_ortho_same_session", "siemens_xa30_b2500", "philips_achieva_32dir"]
    listing = tmp_path / "scans.txt"
    listing.write_text("".join(f"{crops / n / 'dwi.nii.gz'}\n" for n in names))
    sessions = tmp_path / "sessions.csv"
    sessions.write_text("subject_id,session\ncanon_oblique_all20d,canon\ncanon_ortho_same_session,canon\n")
    out = tmp_path / "drift" / "drift.csv"
    code = probe.main(["drift", "--checkpoint", str(tiny_weights), "--data", str(listing), "--draws", "2",
                       "--out", str(out), "--sessions", str(sessions), "--no-untrained", "--device", "cpu"])
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["scan"] for r in rows if r["representation"] == "DRoPE"] == names + ["overall"]
    assert {r["representation"] for r in rows} == {"DRoPE", "signal histogram"}
    by_scan = {r["scan"]: r for r in rows if r["representation"] == "DRoPE"}
    assert float(by_scan["canon_oblique_all20d"]["session_other_scans"]) > 0  # its twin
    assert by_scan["siemens_xa30_b2500"]["session_other_scans"] in ("", "nan")
    assert all(np.isfinite(float(r["ratio_within"])) for r in rows)
    assert out.with_suffix(".png").stat().st_size > 10_000 and out.with_suffix(".json").is_file()


@pytest.mark.parametrize("case, words", [("draws", "--draws"), ("one session", "two sessions"), ("out", ".csv")])
def test_bad_drift_arguments_stop_with_one_line_and_exit_2(crops, tiny_weights, tmp_path, capsys, case, words):
    listing = tmp_path / "scans.txt"
    listing.write_text(f"{crops / 'canon_oblique_all20d' / 'dwi.nii.gz'}\n{crops / 'siemens_xa30_b2500' / 'dwi.nii.gz'}\n")
    args = ["drift", "--checkpoint", str(tiny_weights), "--data", str(listing), "--out", str(tmp_path / "d.csv")]
    if case == "draws":
        args += ["--draws", "1"]
    elif case == "one session":
        sessions = tmp_path / "s.csv"
        sessions.write_text("subject_id,session\ncanon_oblique_all20d,x\nsiemens_xa30_b2500,x\n")
        args += ["--sessions", str(sessions)]
    else:
        args[-1] = str(tmp_path / "d.txt")
    assert probe.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err
    assert not (tmp_path / "d.csv").exists()
