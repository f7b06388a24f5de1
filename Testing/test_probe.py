"""Probe metrics (vs scipy / scikit-learn), probes, splits, cross-validation checks and latent extraction pieces."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn import metrics as skm

from DRoPE.probes import load_probe, save_probe
from DRoPE.probing import crossval, probes, splits
from DRoPE.probing import metrics as pm
from DRoPE.probing.extract import ExtractError, draw_protocol, subject_ids

# --- metrics ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_regression_metrics_match_scipy_and_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.standard_normal(40)
    p = y + rng.standard_normal(40)
    assert pm.pearson_r(y, p) == pytest.approx(pearsonr(y, p)[0], rel=1e-10)
    assert pm.mse(y, p) == pytest.approx(skm.mean_squared_error(y, p))
    assert pm.mae(y, p) == pytest.approx(skm.mean_absolute_error(y, p))
    assert pm.pearson_r(y, np.ones(40)) is None


@pytest.mark.parametrize("seed", range(4))
def test_binary_classification_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(50) < 0.3).astype(int)
    score = np.round(rng.random(50) * 0.6 + 0.4 * y, 1)  # rounded: many ties
    proba = np.stack([1 - score, score], axis=1)
    out = pm.classification_metrics(y, proba)
    assert out["auroc"] == pytest.approx(skm.roc_auc_score(y, score))
    assert out["auprc"] == pytest.approx(skm.average_precision_score(y, score))
    pred = proba.argmax(1)
    assert out["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert out["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert pm.auroc(np.zeros(5, int), np.stack([np.ones(5), np.zeros(5)], 1)) is None


def test_multiclass_metrics_match_sklearn():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 3, 60)
    logits = rng.standard_normal((60, 3)) + np.eye(3)[y]
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    out = pm.classification_metrics(y, proba)
    assert out["auroc"] == pytest.approx(skm.roc_auc_score(y, proba, multi_class="ovr", average="macro"))
    onehot = np.eye(3)[y]
    assert out["auprc"] == pytest.approx(skm.average_precision_score(onehot, proba, average="macro"))
    assert out["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, proba.argmax(1)))


# --- probes ----------------------------------------------------------------------------------------------------


def planted(n=120, d=48, seed=0, noise=0.2):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)) * rng.uniform(0.5, 3.0, d) + rng.uniform(-2, 2, d)
    w = rng.standard_normal(d)
    y = X @ w / np.sqrt(d) + noise * rng.standard_normal(n) + 3.0
    return X, y


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_probes_recover_a_planted_linear_signal(kind):
    X, y = planted()
    train, val, test = slice(0, 70), slice(70, 90), slice(90, 120)
    model = probes.fit_probe(kind, X[train], y[train], "regression", X_val=X[val], y_val=y[val], seed=0)
    r = pm.pearson_r(y[test], model.predict(X[test]))
    assert r > 0.9


def test_linear_regression_is_least_squares_for_tiny_alpha():
    X, y = planted(n=80, d=10, noise=0.0)
    model = probes.fit_linear(X, y, "regression", alpha=1e-9)
    design = np.c_[X, np.ones(len(X))]
    coef = np.linalg.lstsq(design, y, rcond=None)[0]
    assert np.allclose(model.predict(X), design @ coef, atol=1e-6)


def test_logistic_probe_and_export_round_trip(tmp_path):
    X, score = planted(n=150, d=20, seed=1)
    y = (score > np.median(score)).astype(int)
    model = probes.fit_linear(X[:100], y[:100], "classification", n_classes=2, X_val=X[100:120], y_val=y[100:120])
    proba = model.predict(X[120:])
    assert pm.accuracy(y[120:], proba.argmax(1)) > 0.8
    path = save_probe(model.to_linear_probe("group", ["low", "high"]), tmp_path / "probe.json")
    loaded = load_probe(path)
    for row, p in zip(X[120:125], proba[:5]):
        out = loaded.predict(row)
        assert out["probabilities"]["high"] == pytest.approx(p[1], rel=1e-9)
    reg = probes.fit_linear(X[:100], score[:100], "regression")
    exported = load_probe(save_probe(reg.to_linear_probe("score"), tmp_path / "reg.json"))
    assert exported.predict(X[101])["value"] == pytest.approx(reg.predict(X[101:102])[0])


def test_mlp_is_deterministic_and_leaves_global_rng_alone():
    import torch

    X, y = planted(n=60, d=12)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = probes.fit_mlp(X[:40], y[:40], "regression", X_val=X[40:50], y_val=y[40:50], seed=5)
    after = torch.rand(1)
    b = probes.fit_mlp(X[:40], y[:40], "regression", X_val=X[40:50], y_val=y[40:50], seed=5)
    assert np.array_equal(a.predict(X[50:]), b.predict(X[50:]))
    assert torch.equal(before, after)


def test_single_class_training_set_is_refused():
    X = np.random.default_rng(0).standard_normal((10, 4))
    with pytest.raises(probes.ProbeFitError, match="single class"):
        probes.fit_linear(X, np.zeros(10, int), "classification", n_classes=2)


def test_balanced_class_weights():
    w = probes.class_weights(np.array([0, 0, 0, 1]), 2, "balanced")
    assert np.allclose(w, skm_weights := [4 / (2 * 3), 4 / (2 * 1)])
    from sklearn.utils.class_weight import compute_class_weight

    assert np.allclose(skm_weights, compute_class_weight("balanced", classes=np.array([0, 1]), y=[0, 0, 0, 1]))


# --- splits ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratios", [(0.3, 0.35, 0.35), (0.6, 0.2, 0.2)])
def test_splits_disjoint_covering_and_stratified(ratios):
    ids = [f"sub-{i:03d}" for i in range(100)]
    labels = ["MCI" if i % 10 < 3 else "CN" for i in range(100)]
    result = splits.make_splits(ids, labels, "classification", ratios=ratios, n_folds=5, seed=0)
    assert len(result["folds"]) == 5
    tested = []
    for fold in result["folds"]:
        parts = [set(fold[p]) for p in ("train", "val", "test")]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert set().union(*parts) == set(ids)
        for part, ratio in zip(("train", "val", "test"), ratios):
            assert len(fold[part]) == pytest.approx(100 * ratio, abs=2)
            share = np.mean([labels[ids.index(s)] == "MCI" for s in fold[part]])
            assert share == pytest.approx(0.3, abs=0.05)
        tested += fold["test"]
    if ratios[2] == 0.2:  # test sets partition the subjects: standard 5-fold
        assert sorted(tested) == sorted(ids)
    again = splits.make_splits(ids, labels, "classification", ratios=ratios, seed=0)
    other = splits.make_splits(ids, labels, "classification", ratios=ratios, seed=1)
    assert again["folds"] == result["folds"] and other["folds"] != result["folds"]


def test_regression_splits_are_stratified_by_quantile(tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(90)]
    age = rng.uniform(20, 90, 90)
    result = splits.make_splits(ids, age, "regression", ratios=(0.6, 0.2, 0.2), seed=3)
    for fold in result["folds"]:
        test_age = age[[ids.index(s) for s in fold["test"]]]
        assert test_age.min() < np.quantile(age, 0.2) and test_age.max() > np.quantile(age, 0.8)
    path = splits.save_splits(result, tmp_path / "splits.json")
    assert splits.load_splits(path) == result["folds"]


def test_load_splits_rejects_overlap(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"folds": [{"train": ["a", "b"], "val": [], "test": ["b"]}]}')
    with pytest.raises(splits.SplitError, match="both train and test"):
        splits.load_splits(path)


# --- cross-validation inputs -----------------------------------------------------------------------------------


def test_build_data_errors_and_draw_averaging():
    features = {"a": np.ones((3, 4)), "b": np.zeros((1, 4)), "c": np.full((1, 4), 2.0)}
    labels = {"a": "1.5", "b": "nan", "c": "2"}
    with pytest.raises(crossval.ProbeDataError, match="missing/NaN labels.*'b'"):
        crossval.build_data(features, labels, ["a", "b"], "regression")
    with pytest.raises(crossval.ProbeDataError, match="no features for subjects \\['x'\\]"):
        crossval.build_data(features, labels, ["a", "x"], "regression")
    with pytest.raises(crossval.ProbeDataError, match="no label for subjects \\['d'\\]"):
        crossval.build_data({**features, "d": np.ones((1, 4))}, labels, ["a", "d"], "regression")
    data = crossval.build_data(features, labels, ["a", "c"], "regression")
    assert np.array_equal(data.X, [[1, 1, 1, 1], [2, 2, 2, 2]]) and np.array_equal(data.y, [1.5, 2.0])
    cls = crossval.build_data(features, {"a": "10", "c": "9", "b": "9"}, ["a", "b", "c"], "classification")
    assert cls.classes == ["9", "10"] and cls.y.tolist() == [1, 0, 0]  # numeric class order
    with pytest.raises(crossval.ProbeDataError, match="single class"):
        crossval.check_folds([{"train": ["a", "b"], "val": [], "test": ["b", "c"]}], cls, "classification")


def test_load_features_rejects_mixed_dimensions(tmp_path):
    path = tmp_path / "f.npz"
    np.savez(path, a=np.ones(4), b=np.ones((2, 5)))
    with pytest.raises(crossval.ProbeDataError, match="different feature dimensions"):
        crossval.load_features(path)


def test_cross_validate_recovers_signal():
    X, y = planted(n=100, d=16, noise=0.1)
    ids = [f"s{i}" for i in range(100)]
    feats = {s: x[None] for s, x in zip(ids, X)}
    labels = {s: str(v) for s, v in zip(ids, y)}
    folds = splits.make_splits(ids, y, "regression", ratios=(0.6, 0.2, 0.2), seed=0)["folds"]
    data = crossval.build_data(feats, labels, crossval.split_ids(folds), "regression")
    out = crossval.cross_validate(data, folds, "regression", "linear")
    assert len(out["folds"]) == 5 and out["mean"]["pearson_r"] > 0.95
    assert len(out["predictions"]) == 100  # each subject tested once with 60/20/20


# --- extraction pieces -------------------------------------------------------------------------------------------


def test_subject_ids_rules(tmp_path):
    bids = [tmp_path / "sub-01" / "dwi" / "sub-01_dwi.nii.gz", tmp_path / "x" / "sub-02_run-1_dwi.nii.gz"]
    assert subject_ids(bids) == ["sub-01", "sub-02"]
    sessions = [tmp_path / "sub-01" / "ses-1" / "dwi.nii.gz", tmp_path / "sub-01" / "ses-2" / "dwi.nii.gz"]
    assert subject_ids(sessions) == ["sub-01_ses-1", "sub-01_ses-2"]
    plain = [tmp_path / "canon" / "dwi.nii.gz", tmp_path / "philips" / "dwi.nii.gz", tmp_path / "a" / "scan7.nrrd"]
    assert subject_ids(plain) == ["canon", "philips", "scan7"]
    with pytest.raises(ExtractError, match="not unique"):
        subject_ids([tmp_path / "a" / "dwi.nii.gz", tmp_path / "b" / "a" / "dwi.nii.gz"])


def test_draw_protocol_has_one_b0_and_k_dw(crops):
    from DRoPE.io import load_dwi

    dwi = load_dwi(crops / "canon_oblique_all20d" / "dwi.nii.gz")
    index = draw_protocol(dwi, 5, np.random.SeedSequence([0, 1]))
    assert len(index) == 6 and dwi.gtab.b0s_mask[index].sum() == 1
    assert np.array_equal(index, draw_protocol(dwi, 5, np.random.SeedSequence([0, 1])))
    assert not np.array_equal(index, draw_protocol(dwi, 5, np.random.SeedSequence([0, 2])))
    assert np.array_equal(draw_protocol(dwi, None, 0), np.arange(13))
    with pytest.raises(ExtractError, match="cannot draw 20"):
        draw_protocol(dwi, 20, 0)
