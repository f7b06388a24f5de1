"""Bad command-line input gives one line on stderr naming the flag or the file, exit code 2 and no traceback.

Every command is called in-process (``main(argv)``); the values are checked before anything is computed, so the
cases need no checkpoint and no model.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from DRoPE import cli
from DRoPE.gradients import DWIWarning
from DRoPE.io import load_dwi
from DRoPE.reconstruct import select_volumes
from DRoPE.training import data as tdata

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DRoPETrain"))

import evaluate  # noqa: E402  (DRoPETrain/evaluate.py)
import probe  # noqa: E402  (DRoPETrain/probe.py)
import train  # noqa: E402  (DRoPETrain/train.py)

COMMANDS = {"drope": cli.main, "train": train.main, "evaluate": evaluate.main, "probe": probe.main}


@pytest.fixture
def paths(tmp_path, crops, monkeypatch):
    """name -> path: a real DWI, an existing file, an empty folder, a read-only folder, a missing path, ..."""
    dwi = tmp_path / "in" / "dwi.nii.gz"
    dwi.parent.mkdir()
    for name in ("dwi.nii.gz", "dwi.bval", "dwi.bvec"):
        shutil.copy(crops / "canon_oblique_all20d" / name, dwi.parent / name)
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: let the permission check see what an ordinary user would
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: access(p, mode) and Path(p) != read_only)
    named = {
        "DWI": dwi, "FILE": tmp_path / "notes.txt", "EMPTY": tmp_path / "empty", "RO": read_only / "out",
        "MISSING": tmp_path / "missing", "NPZDIR": tmp_path / "folder.npz", "NOBVAL": tmp_path / "lone.nii.gz",
        "CSV": tmp_path / "labels.csv", "NPZ": tmp_path / "features.npz", "OUT": tmp_path / "out",
    }
    named["FILE"].write_text("not a DWI")
    named["EMPTY"].mkdir()
    named["NPZDIR"].mkdir()
    shutil.copy(dwi, named["NOBVAL"])
    named["CSV"].write_text("subject_id,age\nsub-01,20\nsub-02,30\nsub-03,40\nsub-04,50\n")
    np.savez(named["NPZ"], **{sid: np.ones(4) * k for k, sid in enumerate(["sub-01", "sub-02", "sub-07", "sub-08"])})
    yield named
    read_only.chmod(0o755)


FIT = ["fit", "--features", "NPZ", "--labels", "CSV", "--target", "age", "--task", "regression", "--probe", "linear"]
FINETUNE = ["finetune", "--checkpoint", "MISSING", "--data", "DWI", "--labels", "CSV", "--target", "age",
            "--task", "regression", "--out", "OUT"]
TRAIN = ["--data", "DWI", "--config", "tiny"]
EVALUATE = ["--checkpoint", "MISSING", "--data", "DWI"]
EXTRACT = ["extract", "--checkpoint", "MISSING", "--data", "DWI"]
RECONSTRUCT = ["reconstruct", "DWI", "--weights", "MISSING", "--progress", "none"]

# (command, argv with path names from the ``paths`` fixture, words the one-line message must hold)
CASES = [
    ("drope", ["info", "MISSING"], ["MISSING", "file not found"]),
    ("drope", ["info", "EMPTY"], ["EMPTY", "is a folder"]),
    ("drope", ["info", "CSV"], ["CSV", "unsupported file type"]),
    ("drope", ["dti", "EMPTY", "--out", "OUT"], ["EMPTY", "is a folder, not a DWI file"]),
    ("drope", ["reconstruct", "EMPTY", "--out", "OUT", "--progress", "none"], ["EMPTY", "is a folder, not a DWI file"]),
    ("drope", [*RECONSTRUCT, "--out", "OUT"], ["--weights", "MISSING", "not found"]),
    ("drope", ["dti", "DWI", "--out", "FILE"], ["--out", "FILE", "not a folder"]),
    ("drope", ["dti", "DWI", "--out", "RO"], ["--out", "RO", "cannot write"]),
    ("drope", ["dti", "DWI", "--out", "OUT", "--mask", "MISSING"], ["--mask", "MISSING", "not found"]),
    ("drope", ["dti", "DWI", "--out", "OUT", "--bval", "MISSING"], ["MISSING", "b-value file"]),
    ("drope", [*RECONSTRUCT, "--out", "FILE"], ["--out", "FILE", "not a folder"]),
    ("drope", [*RECONSTRUCT, "--out", "RO"], ["--out", "RO", "cannot write"]),
    ("drope", [*RECONSTRUCT, "--out", "OUT", "--volumes", "0"], ["--volumes", ">= 1"]),
    ("drope", [*RECONSTRUCT, "--out", "OUT", "--mask-ratio", "1.5"], ["--mask-ratio", "[0, 1)"]),
    ("drope", [*RECONSTRUCT, "--out", "OUT", "--seed", "-1"], ["--seed", ">= 0"]),
    ("drope", [*RECONSTRUCT, "--out", "OUT", "--slab", "0"], ["--slab", ">= 1"]),
    ("drope", [*RECONSTRUCT, "--out", "OUT", "--probe", "MISSING"], ["MISSING", "probe file"]),
    ("drope", [*RECONSTRUCT, "--out", "OUT", "--probe", "FILE"], ["FILE", "probe file"]),
    ("drope", ["reconstruct", "DWI", "--weights", "MISSING", "--out", "OUT"], ["MISSING", "checkpoint"]),  # with a bar
    ("train", [*TRAIN, "--out", "OUT", "--data", "MISSING"], ["MISSING", "no such folder"]),
    ("train", [*TRAIN, "--out", "OUT", "--data", "EMPTY"], ["EMPTY", "no DWI found"]),
    ("train", [*TRAIN, "--out", "OUT", "--data", "NOBVAL"], ["NOBVAL", "lone.bval"]),
    ("train", [*TRAIN, "--out", "FILE"], ["--out", "FILE", "not a folder"]),
    ("train", [*TRAIN, "--out", "RO"], ["--out", "RO", "cannot write"]),
    ("train", [*TRAIN, "--out", "OUT", "--cache", "FILE"], ["--cache", "FILE"]),
    ("train", [*TRAIN, "--out", "OUT", "--epochs", "0"], ["--epochs", ">= 1"]),
    ("train", [*TRAIN, "--out", "OUT", "--workers", "-1"], ["--workers", ">= 0"]),
    ("train", [*TRAIN, "--out", "OUT", "--threads", "0"], ["--threads", ">= 1"]),
    ("train", [*TRAIN, "--out", "OUT", "--seed", "-1"], ["--seed", ">= 0"]),
    ("train", [*TRAIN, "--out", "OUT", "--config", "MISSING"], ["MISSING", "neither a training preset"]),
    ("train", [*TRAIN, "--out", "OUT", "--holdout", "MISSING"], ["--holdout", "MISSING", "not found"]),
    ("evaluate", [*EVALUATE, "--out", "FILE"], ["--out", "FILE", "not a folder"]),
    ("evaluate", [*EVALUATE, "--out", "RO"], ["--out", "RO", "cannot write"]),
    ("evaluate", [*EVALUATE, "--out", "OUT", "--volumes", "0"], ["--volumes", ">= 1"]),
    ("evaluate", [*EVALUATE, "--out", "OUT", "--slab", "0"], ["--slab", ">= 1"]),
    ("evaluate", [*EVALUATE, "--out", "OUT", "--seed", "-2"], ["--seed", ">= 0"]),
    ("evaluate", [*EVALUATE, "--out", "OUT", "--fid-slices", "-1"], ["--fid-slices", ">= 0"]),
    ("evaluate", [*EVALUATE, "--out", "OUT", "--data", "EMPTY"], ["EMPTY", "no DWI found"]),
    ("evaluate", [*EVALUATE, "--out", "OUT", "--names", "a", "b"], ["--names", "2 names for 1"]),
    ("probe", [*EXTRACT, "--out", "FILE"], ["FILE", ".npz"]),
    ("probe", [*EXTRACT, "--out", "NPZDIR"], ["--out", "NPZDIR", "is a folder"]),
    ("probe", [*EXTRACT, "--out", "RO/f.npz"], ["--out", "RO", "cannot write"]),
    ("probe", [*EXTRACT, "--out", "OUT.npz", "--draws", "0"], ["--draws", ">= 1"]),
    ("probe", [*EXTRACT, "--out", "OUT.npz", "--volumes", "0"], ["--volumes", ">= 1"]),
    ("probe", [*EXTRACT, "--out", "OUT.npz", "--slab", "0"], ["--slab", ">= 1"]),
    ("probe", [*EXTRACT, "--out", "OUT.npz", "--data", "EMPTY"], ["EMPTY", "no DWI found"]),
    ("probe", [*EXTRACT, "--out", "OUT.npz"], ["--checkpoint", "MISSING", "not found"]),
    ("probe", [*FIT, "--out", "NPZDIR"], ["--out", "NPZDIR", "is a folder"]),
    ("probe", [*FIT, "--out", "RO/r.json"], ["--out", "RO", "cannot write"]),
    ("probe", [*FIT, "--out", "OUT.json", "--seed", "-1"], ["--seed", ">= 0"]),
    ("probe", [*FIT, "--out", "OUT.json", "--save-probe", "EMPTY"], ["--save-probe", "EMPTY", "is a folder"]),
    ("probe", [*FIT, "--out", "OUT.json", "--features", "MISSING"], ["MISSING", "features file"]),
    ("probe", [*FIT, "--out", "OUT.json", "--features", "FILE"], ["FILE", "not a features .npz"]),
    ("probe", [*FIT, "--out", "OUT.json", "--labels", "MISSING"], ["MISSING", "labels CSV"]),
    ("probe", [*FIT, "--out", "OUT.json", "--target", "height"], ["CSV", "no column 'height'"]),
    ("probe", [*FINETUNE, "--epochs", "0"], ["--epochs", ">= 1"]),
    ("probe", [*FINETUNE, "--batch-size", "0"], ["--batch-size", ">= 1"]),
    ("probe", [*FINETUNE, "--lr", "-0.001"], ["--lr", ">= 0"]),
    ("probe", [*FINETUNE, "--lora-rank", "0"], ["--lora-rank", ">= 1"]),
    ("probe", [*FINETUNE, "--out", "FILE"], ["--out", "FILE", "not a folder"]),
    ("probe", FINETUNE, ["--checkpoint", "MISSING", "not found"]),
]


def _resolve(words, paths):
    """Replace the path names of ``paths`` (also as the head of NAME/rest) by the paths."""
    def one(word):
        head, _, rest = word.partition("/")
        if head in paths:
            return str(paths[head] / rest) if rest else str(paths[head])
        return word.replace("OUT.", f"{paths['OUT']}.")
    return [one(w) for w in words]


@pytest.mark.parametrize(("command", "argv", "words"), CASES, ids=[f"{c}-{'-'.join(a[:1] + a[-2:])}" for c, a, _ in CASES])
def test_bad_value_is_one_line_and_exit_2(paths, capsys, command, argv, words):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DWIWarning)
        code = COMMANDS[command](_resolve(argv, paths))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error") and "Traceback" not in err, err
    for word in _resolve(words, paths):
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert not paths["OUT"].exists(), "a run that stopped on bad input left an output folder"


def test_reconstruct_refuses_an_existing_file_as_out(paths, capsys):
    """The values are checked before the DWI is read: an --out that is a file stops the run at once."""
    before = paths["FILE"].read_text()
    assert cli.main(["reconstruct", str(paths["DWI"]), "--out", str(paths["FILE"]), "--progress", "none"]) == 2
    assert f"--out {paths['FILE']}: exists and is not a folder" in capsys.readouterr().err
    assert paths["FILE"].read_text() == before and not paths["OUT"].exists()


def test_find_dwis_takes_one_dwi_file(paths, crops):
    """train.py, evaluate.py and probe.py all take --data as one DWI file, a folder or a list (find_dwis)."""
    assert tdata.find_dwis(paths["DWI"]) == [paths["DWI"].resolve()]
    nrrd = crops / "nrrd_slicer_dwi" / "canon_oblique_dwi.nrrd"
    assert tdata.find_dwis(nrrd) == [nrrd.resolve()]
    with pytest.raises(tdata.DataError, match="no lone.bval beside this NIfTI"):
        tdata.find_dwis(paths["NOBVAL"])


def test_fit_names_the_ids_missing_from_each_file(paths, capsys):
    argv = _resolve([*FIT, "--out", "OUT.json"], paths)
    assert probe.main(argv) == 2
    err = capsys.readouterr().err
    assert "only 2 subject(s) have both features and a label" in err
    assert f"['sub-07', 'sub-08'] in {paths['NPZ']} have no label" in err
    assert f"['sub-03', 'sub-04'] in {paths['CSV']} have no features" in err


def test_more_volumes_than_the_dwi_has_warns_once(crops, caplog):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DWIWarning)
        dwi = load_dwi(crops / "canon_oblique_all20d" / "dwi.nii.gz")
    with caplog.at_level(logging.WARNING, logger="DRoPE.reconstruct"):
        subset, index = select_volumes(dwi, 100000, seed=0)
    assert subset is dwi and np.array_equal(index, np.arange(13))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "100000 volumes asked for" in messages[0] and "using all 13" in messages[0]
    caplog.clear()
    select_volumes(dwi, 13, seed=0)
    assert not caplog.records


# --- wrong units and ambiguous tables: errors, not silently wrong results ----------------------------------------


def _dwi_with_table(folder: Path, crops: Path, bvals, bvec_text: str, volumes=None) -> Path:
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    source = nib.load(crops / "canon_oblique_all20d" / "dwi.nii.gz")
    data = np.asarray(source.dataobj)
    if volumes is not None:
        data = data[..., volumes]
    nib.save(nib.Nifti1Image(data, source.affine, source.header), folder / "dwi.nii.gz")
    (folder / "dwi.bval").write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
    (folder / "dwi.bvec").write_text(bvec_text)
    return folder / "dwi.nii.gz"


@pytest.mark.parametrize("scale, unit", [(1e-3, "ms/um^2"), (1e6, "s/m^2")])
def test_b_values_in_another_unit_stop_with_the_likely_unit(tmp_path, crops, capsys, scale, unit):
    bvals = np.loadtxt(crops / "canon_oblique_all20d" / "dwi.bval") * scale
    bvecs = (crops / "canon_oblique_all20d" / "dwi.bvec").read_text()
    dwi = _dwi_with_table(tmp_path / "in", crops, bvals, bvecs)
    assert cli.main(["dti", str(dwi), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dwi.bval" in err and unit in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_3_by_3_table_is_read_the_way_that_fits_the_b_values(tmp_path, crops):
    g = np.array([[0.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.6, 0.8]])  # one vector per row: b0, then two
    rows = "\n".join(" ".join(f"{v:g}" for v in row) for row in g) + "\n"
    dwi = _dwi_with_table(tmp_path / "in", crops, [0, 1500, 1500], rows, volumes=[0, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DWIWarning)
        loaded = load_dwi(dwi)
    raw = np.array([[0.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.6, 0.8]])
    # read as N x 3 (the 3 x N reading has a non-zero b0 column): directions are these rows, up to the frame
    assert np.allclose(np.abs(loaded.gtab.bvecs @ loaded.gtab.bvecs.T), np.abs(raw @ raw.T), atol=1e-6)


def test_a_3_by_3_table_that_fits_neither_reading_is_an_error(tmp_path, crops):
    dwi = _dwi_with_table(tmp_path / "in", crops, [0, 1500, 1500], "1 2 3\n4 5 6\n7 8 9\n", volumes=[0, 1, 2])
    with pytest.raises(Exception, match="neither 3 x N nor N x 3"):
        load_dwi(dwi)


@pytest.mark.parametrize("fill, words", [(0.0, "all zero"), (7.0, "constant (every voxel 7)")])
def test_a_blank_image_says_what_is_wrong(tmp_path, crops, fill, words):
    import nibabel as nib

    dwi = _dwi_with_table(tmp_path / "in", crops, np.loadtxt(crops / "canon_oblique_all20d" / "dwi.bval"),
                          (crops / "canon_oblique_all20d" / "dwi.bvec").read_text())
    img = nib.load(dwi)
    nib.save(nib.Nifti1Image(np.full(img.shape, fill, np.float32), img.affine), dwi)
    with pytest.raises(Exception, match=re.escape(words)) as error:
        load_dwi(dwi)
    assert str(dwi) in str(error.value) and "duplicated" not in str(error.value)


@pytest.mark.parametrize("damage, words", [
    ("truncate", "unreadable weights"),
    ("json-list", "not an object"),
])
def test_a_damaged_checkpoint_is_one_line_and_exit_2(paths, tmp_path, capsys, damage, words):
    weights = tmp_path / "weights"
    shutil.copytree(REPO / "Resources" / "model", weights)
    if damage == "truncate":
        (weights / "model.safetensors").write_bytes((weights / "model.safetensors").read_bytes()[:4000])
    else:
        (weights / "model.json").write_text("[1, 2, 3]\n")
    code = cli.main(["reconstruct", str(paths["DWI"]), "--weights", str(weights), "--out", str(paths["OUT"]),
                     "--progress", "none"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and words in err and str(weights) in err


def test_an_empty_nrrd_is_a_clear_error(tmp_path):
    empty = tmp_path / "dwi.nrrd"
    empty.write_bytes(b"")
    with pytest.raises(Exception) as error:
        load_dwi(empty)
    assert str(empty) in str(error.value) and type(error.value).__name__ != "StopIteration"


def test_a_zero_affine_is_one_line_and_exit_2(tmp_path, crops, capsys):
    import nibabel as nib

    folder = tmp_path / "in"
    folder.mkdir()
    source = nib.load(crops / "canon_oblique_all20d" / "dwi.nii.gz")
    image = nib.Nifti1Image(np.asarray(source.dataobj), source.affine, source.header)
    image.header.set_qform(None, code=0)
    for row in ("srow_x", "srow_y", "srow_z"):
        image.header[row] = 0
    image.header["sform_code"] = 1
    image.update_header = lambda: None  # keep the zero sform as written
    image.to_filename(folder / "dwi.nii.gz")
    for name in ("dwi.bval", "dwi.bvec"):
        shutil.copy(crops / "canon_oblique_all20d" / name, folder / name)
    assert cli.main(["info", str(folder / "dwi.nii.gz")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "singular" in err and str(folder / "dwi.nii.gz") in err


# --- checks before any computation; messages that name the file and the problem ------------------------------------


def test_reconstruct_refuses_to_overwrite_an_input_before_computing(paths, capsys, monkeypatch):
    from DRoPE import reconstruct

    clash = paths["DWI"].parent.parent / "clash"
    clash.mkdir()
    for name in ("dwi.nii.gz", "dwi.bval", "dwi.bvec"):  # an input named like an output, inside --out
        shutil.copy(paths["DWI"].with_name(name), clash / name.replace("dwi", "reconstruction"))
    before = {p.name: p.read_bytes() for p in clash.iterdir()}
    monkeypatch.setattr(reconstruct, "run_reconstruction", lambda *a, **k: pytest.fail("ran before the check"))
    assert cli.main(["reconstruct", str(clash / "reconstruction.nii.gz"), "--out", str(clash), "--progress", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refusing to overwrite an input file" in err and str(clash) in err
    assert {p.name: p.read_bytes() for p in clash.iterdir()} == before


def test_an_empty_brain_mask_names_the_file(paths, capsys, monkeypatch):
    from DRoPE import reconstruct

    monkeypatch.setattr(reconstruct, "brain_mask", lambda dwi: np.zeros(dwi.data.shape[:3], dtype=bool))
    assert cli.main(["reconstruct", str(paths["DWI"]), "--out", str(paths["OUT"]), "--progress", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(paths["DWI"]) in err and "brain mask is empty" in err


def test_summary_records_the_values_used_and_those_requested(paths, tmp_path, monkeypatch):
    from DRoPE import reconstruct
    from DRoPE.model import DRoPEMAE, model_config, save_model
    from DRoPE.reconstruct import ReconstructSettings, run_reconstruction

    monkeypatch.setattr(reconstruct, "dti_maps", lambda *args: {})  # not needed here, and slow
    weights = save_model(DRoPEMAE(model_config("tiny")), tmp_path / "tiny", extra={"slab": 4})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DWIWarning)
        dwi = load_dwi(paths["DWI"])
    summary = run_reconstruction(dwi, weights, ReconstructSettings(volumes=1000, mask_ratio=0.5)).summary
    assert summary["settings"]["volumes"] == 13 and summary["requested"] == {"volumes": 1000}
    assert summary["settings"]["slab"] == 4 and summary["settings"]["mask_ratio"] == 0.5


def _nrrd_with(crops: Path, target: Path, change) -> Path:
    import nrrd

    data, header = nrrd.read(str(crops / "nrrd_slicer_dwi" / "canon_oblique_dwi.nrrd"))
    change(header)
    nrrd.write(str(target), data, header)
    return target


def test_a_nan_nrrd_gradient_is_named(tmp_path, crops):
    dwi = _nrrd_with(crops, tmp_path / "dwi.nrrd", lambda h: h.update({"DWMRI_gradient_0003": "nan 0 1"}))
    with pytest.raises(Exception, match="DWMRI_gradient_0003 has a NaN") as error:
        load_dwi(dwi)
    assert str(dwi) in str(error.value) and "b-value" not in str(error.value)


def test_a_header_without_orientation_is_a_warning_that_info_shows(tmp_path, crops, capsys):
    import nibabel as nib

    nrrd_path = _nrrd_with(crops, tmp_path / "dwi.nrrd", lambda h: h.pop("measurement frame"))
    source = nib.load(crops / "canon_oblique_all20d" / "dwi.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj), None), tmp_path / "dwi.nii.gz")  # sform, qform codes 0
    for name in ("dwi.bval", "dwi.bvec"):
        shutil.copy(crops / "canon_oblique_all20d" / name, tmp_path / name)
    for path, words in ((nrrd_path, "no 'measurement frame'"), (tmp_path / "dwi.nii.gz", "qform_code are both 0")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DWIWarning)
            assert any(words in w for w in load_dwi(path).warnings), path
        assert cli.main(["info", str(path)]) == 0
        assert words in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DWIWarning)
        found = load_dwi(crops / "canon_oblique_all20d" / "dwi.nii.gz").warnings
    assert not [w for w in found if "qform_code" in w or "measurement frame" in w]


def test_nan_labels_are_left_out_with_a_warning_naming_them(caplog):
    features = {f"sub-0{k}": np.ones((1, 4)) for k in range(1, 7)}
    labels = {"sub-01": "20", "sub-02": "nan", "sub-03": "30", "sub-04": "", "sub-05": "40", "sub-06": "50"}
    with caplog.at_level(logging.WARNING, logger="drope.probe"):
        ids = probe._labelled_ids(features, labels, "features.npz", "labels.csv")
    assert ids == ["sub-01", "sub-03", "sub-05", "sub-06"]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "labels.csv" in messages[0] and "2 ids ['sub-02', 'sub-04']" in messages[0]
