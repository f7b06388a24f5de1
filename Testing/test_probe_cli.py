"""End-to-end DRoPETrain/probe.py: extract (deterministic), fit (linear + saved probe, MLP with made splits),
invariance, finetune (tiny, 2 epochs, LoRA) and the bad-input exits."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from DRoPE.probes import load_probe

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DRoPETrain"))

import probe  # noqa: E402  (DRoPETrain/probe.py)
from conftest import centre_box, crop_dwi  # noqa: E402

SOURCES = ("canon_oblique_all20d", "canon_ortho_same_session", "siemens_xa30_b2500")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def study(tmp_path_factory, crops):
    """Six small real DWIs (3 scans x 2 crops), a tiny checkpoint, labels and the features of two extractions."""
    from DRoPE.model import DRoPEMAE, model_config, save_model

    root = tmp_path_factory.mktemp("probe")
    ids = []
    for k, name in enumerate(SOURCES):
        for j, offset in enumerate((-4, 4)):
            sid = f"sub-{2 * k + j + 1:02d}"
            source = crops / name / "dwi.nii.gz"
            box = centre_box(nib.load(source).shape, (16, 16, 4), offset=(offset, 0, 0))
            crop_dwi(source, root / "data" / sid / "dwi" / f"{sid}_dwi.nii.gz", box)
            ids.append(sid)
    torch.manual_seed(0)
    checkpoint = save_model(DRoPEMAE(model_config("tiny")), root / "model", extra={"slab": 4})
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subject_id", "age", "group", "empty"])
        for i, sid in enumerate(ids):
            writer.writerow([sid, 20 + 7 * i, "MCI" if i % 2 else "CN", "nan" if i == 0 else 1])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for seed in (0, 1):
            code = probe.main(["extract", "--checkpoint", str(checkpoint), "--data", str(root / "data"),
                               "--out", str(root / f"features{seed}.npz"), "--draws", "2", "--volumes", "6",
                               "--seed", str(seed), "--device", "cpu"])
            assert code == 0
    finally:
        torch.set_num_threads(before)
    return root, checkpoint, ids


def test_extract_outputs_and_determinism(study, tmp_path):
    root, checkpoint, ids = study
    first = np.load(root / "features0.npz")
    assert sorted(first.files) == ids
    assert all(first[s].shape == (2, 48) for s in ids)  # (K draws, D)
    assert not np.allclose(first["sub-01"][0], first["sub-01"][1])  # two different protocols
    record = json.loads((root / "features0.json").read_text())
    drawn = record["subjects"]["sub-01"]["volumes"]
    assert len(drawn) == 2 and all(len(v) == 7 for v in drawn)  # 6 DW + one b0
    # same seed -> same latents, for a single subject run too (seeds do not depend on the subject list)
    assert probe.main(["extract", "--checkpoint", str(checkpoint), "--data", str(root / "data" / "sub-03"),
                       "--out", str(tmp_path / "again.npz"), "--draws", "2", "--volumes", "6", "--device", "cpu"]) == 0
    again = np.load(tmp_path / "again.npz")
    assert again.files == ["sub-03"] and np.array_equal(again["sub-03"], first["sub-03"])
    other = np.load(root / "features1.npz")
    assert not np.allclose(other["sub-03"], first["sub-03"])


def test_scan_latent_equals_the_reconstruct_engine_latent(study):
    from DRoPE.io import load_dwi
    from DRoPE.model import load_model
    from DRoPE.preprocess import brain_mask, preprocess
    from DRoPE.probing.extract import scan_latent
    from DRoPE.reconstruct import ReconstructSettings, run_reconstruction

    root, checkpoint, _ = study
    dwi = load_dwi(root / "data" / "sub-05" / "dwi" / "sub-05_dwi.nii.gz")
    engine = run_reconstruction(dwi, checkpoint, ReconstructSettings(mask_ratio=0.0))
    model = load_model(checkpoint)
    prep = preprocess(dwi, mask=brain_mask(dwi), patch=model.config.patch_size)
    latent = scan_latent(model, prep, 4).numpy()
    assert np.allclose(latent, engine.latent, atol=1e-5)


def test_fit_linear_regression_with_splits_and_saved_probe(study, tmp_path):
    root, _, ids = study
    folds = [{"train": [s for s in ids if s not in (ids[i], ids[(i + 1) % 6])], "val": [ids[(i + 1) % 6]], "test": [ids[i]]}
             for i in range(3)]
    (tmp_path / "splits.json").write_text(json.dumps({"folds": folds}))
    out = tmp_path / "age.json"
    code = probe.main(["fit", "--features", str(root / "features0.npz"), "--labels", str(root / "labels.csv"),
                       "--target", "age", "--task", "regression", "--probe", "linear", "--splits", str(tmp_path / "splits.json"),
                       "--out", str(out), "--save-probe", str(tmp_path / "age_probe.json"), "--alpha", "1.0"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["task"] == "regression" and result["probe"] == "linear"
    assert len(result["folds"]) == 3 and set(result["folds"][0]) == {"pearson_r", "mse", "mae"}
    assert result["mean"]["mae"] == pytest.approx(np.mean([f["mae"] for f in result["folds"]]))
    for suffix in ("_predictions.csv", "_folds.png", "_embedding.png"):
        assert Path(f"{tmp_path / 'age'}{suffix}").is_file()
    saved = load_probe(tmp_path / "age_probe.json")
    latent = np.load(root / "features0.npz")["sub-02"].mean(0)
    assert saved.task == "regression" and saved.target == "age" and np.isfinite(saved.predict(latent)["value"])


def test_fit_mlp_classification_makes_stratified_splits(study, tmp_path):
    root, _, ids = study
    out = tmp_path / "res" / "group.json"
    code = probe.main(["fit", "--features", str(root / "features0.npz"), "--labels", str(root / "labels.csv"),
                       "--target", "group", "--task", "classification", "--probe", "mlp", "--out", str(out),
                       "--class-weight", "balanced", "--seed", "3", "--split-ratio", "60/20/20"])
    assert code == 0
    result = json.loads(out.read_text())
    assert len(result["folds"]) == 5
    assert set(result["mean"]) == {"accuracy", "balanced_accuracy", "auroc", "auprc"}
    assert all(0 <= v <= 1 for f in result["folds"] for v in f.values() if v is not None)
    made = json.loads((tmp_path / "res" / "splits.json").read_text())["folds"]
    for fold in made:
        assert sorted(fold["train"] + fold["val"] + fold["test"]) == ids
        groups = {p: {"MCI" if ids.index(s) % 2 else "CN" for s in fold[p]} for p in ("train", "test")}
        assert groups["train"] == groups["test"] == {"CN", "MCI"}


def test_invariance(study, tmp_path):
    root, _, ids = study
    folds = [{"train": ids[:4], "val": [], "test": ids[4:]}, {"train": ids[2:], "val": [], "test": ids[:2]}]
    (tmp_path / "s.json").write_text(json.dumps({"folds": folds}))
    out = tmp_path / "inv.json"
    code = probe.main(["invariance", "--train-features", str(root / "features0.npz"), "--test-features",
                       str(root / "features1.npz"), "--labels", str(root / "labels.csv"), "--target", "group",
                       "--task", "classification", "--splits", str(tmp_path / "s.json"), "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert len(result["protocol_1"]["folds"]) == len(result["protocol_2"]["folds"]) == 2
    assert set(result["protocol_2"]["mean"]) == {"accuracy", "balanced_accuracy", "auroc", "auprc"}


def test_bad_inputs_exit_2(study, tmp_path, capsys):
    root, _, ids = study
    base = ["fit", "--features", str(root / "features0.npz"), "--labels", str(root / "labels.csv"),
            "--probe", "linear", "--out", str(tmp_path / "r.json")]

    def run(extra, folds=None):
        if folds is not None:
            (tmp_path / "bad.json").write_text(json.dumps({"folds": folds}))
            extra = extra + ["--splits", str(tmp_path / "bad.json")]
        code = probe.main(base + extra)
        return code, capsys.readouterr().err

    code, err = run(["--target", "age", "--task", "regression"], [{"train": ids[:4] + ["sub-99"], "val": [], "test": ids[4:]}])
    assert code == 2 and "no features for subjects ['sub-99']" in err
    code, err = run(["--target", "empty", "--task", "regression"], [{"train": ids[:4], "val": [], "test": ids[4:]}])
    assert code == 2 and "missing/NaN labels" in err and "sub-01" in err
    code, err = run(["--target", "group", "--task", "classification"], [{"train": ids[1:2] + ids[3:], "val": [], "test": ["sub-01", "sub-03"]}])
    assert code == 2 and "single class" in err
    code, err = run(["--target", "nope", "--task", "regression"])
    assert code == 2 and "no column 'nope'" in err
    np.savez(tmp_path / "wide.npz", **{s: np.ones(64) for s in ids})
    code = probe.main(["invariance", "--train-features", str(root / "features0.npz"), "--test-features",
                       str(tmp_path / "wide.npz"), "--labels", str(root / "labels.csv"), "--target", "age",
                       "--task", "regression", "--out", str(tmp_path / "i.json"), "--split-ratio", "60/20/20"])
    assert code == 2 and "latent dimension 64 differs" in capsys.readouterr().err
    code, err = run(["--target", "age", "--task", "regression", "--probe", "mlp", "--save-probe", str(tmp_path / "p.json")])
    assert code == 2 and "--save-probe" in err


def test_finetune_tiny_with_lora(study, tmp_path):
    root, checkpoint, ids = study
    folds = [{"train": ids[:4], "val": [ids[4]], "test": [ids[5]]}]
    (tmp_path / "s.json").write_text(json.dumps({"folds": folds}))
    out = tmp_path / "ft"
    code = probe.main(["finetune", "--checkpoint", str(checkpoint), "--data", str(root / "data"), "--labels",
                       str(root / "labels.csv"), "--target", "age", "--task", "regression", "--splits", str(tmp_path / "s.json"),
                       "--out", str(out), "--epochs", "2", "--batch-size", "2", "--volumes", "6", "--lora", "--device", "cpu"])
    assert code == 0
    result = json.loads((out / "result.json").read_text())
    assert result["probe"] == "finetune+lora" and len(result["folds"]) == 1 and "mae" in result["folds"][0]
    with (out / "log.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 2


def test_finetune_freezes_all_but_last_block_and_adapters(study):
    from DRoPE.model import load_model
    from DRoPE.probing.finetune import FinetuneConfig, FinetuneNet

    _, checkpoint, _ = study
    plain = FinetuneNet(load_model(checkpoint), 1, FinetuneConfig())
    trainable = {n for n, p in plain.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("encoder.blocks.1.", "encoder.norm.", "head.")) for n in trainable)
    assert not any(n.startswith("encoder.blocks.0.") for n in trainable)
    lora = FinetuneNet(load_model(checkpoint), 1, FinetuneConfig(lora=True, lora_rank=4, lora_alpha=4))
    names = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert any("blocks.0." in n and "lora_A" in n for n in names)  # adapters in the frozen blocks too
    assert not any(n.startswith("encoder.blocks.0.") and "lora_" not in n for n in names)
    assert not any(n.startswith("encoder.decoder") for n in names)
