"""GradientTable and cluster_shells: shell rounding, validation errors, warnings, derived properties."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

from DRoPE.gradients import (
    B0_THRESHOLD,
    DWIError,
    DWIWarning,
    GradientTable,
    GradientTableError,
    cluster_shells,
)


def unit_dirs(n, seed=0):
    """(n, 3) random unit vectors, none antipodal to another."""
    vecs = np.random.default_rng(seed).normal(size=(n, 3))
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def table_inputs(n_dw=12, b=1000.0, n_b0=2):
    bvals = np.r_[np.zeros(n_b0), np.full(n_dw, b)]
    bvecs = np.vstack([np.zeros((n_b0, 3)), unit_dirs(n_dw)])
    return bvals, bvecs


def create_quiet(bvals, bvecs, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DWIWarning)
        return GradientTable.create(bvals, bvecs, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# cluster_shells
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bvals", "expected"),
    [
        ([0, 1499.99998, 1500.00001, 0], [0, 1500, 1500, 0]),
        ([995, 1005, 0], [1000, 1000, 0]),
        ([3, 0.001, 5, 1000], [0, 0, 0, 1000]),
        ([0, 998, 1003, 1995, 2004, 2996, 3001], [0, 1000, 1000, 2000, 2000, 3000, 3000]),
        ([49.9, 50.0, 1000], [0, 50, 1000]),
        ([0, 40, 80], [0, 0, 80]),  # a b0 group never swallows a low diffusion weighting
    ],
)
def test_cluster_shells_rounds_each_shell(bvals, expected):
    np.testing.assert_array_equal(cluster_shells(np.array(bvals, dtype=float)), expected)


def test_cluster_shells_keeps_distinct_shells_apart():
    """Shells 100 s/mm^2 apart (more than the tolerance) stay separate."""
    np.testing.assert_array_equal(cluster_shells(np.array([700.0, 800.0, 900.0])), [700, 800, 900])


# --------------------------------------------------------------------------------------------------------------
# create: clean tables
# --------------------------------------------------------------------------------------------------------------


def test_create_normalises_and_zeroes_b0_rows():
    bvals = np.array([0.0, 3.0, 1000.0, 1000.0, 995.0, 1005.0, 1000.0, 1000.0])
    bvecs = np.vstack([[0, 0, 0], [0.3, 0.4, 0.5], unit_dirs(6) * 1.001])
    table = create_quiet(bvals, bvecs, source="x.bvec")
    np.testing.assert_array_equal(table.bvals[:2], [0, 0])
    np.testing.assert_array_equal(table.bvecs[:2], np.zeros((2, 3)))
    np.testing.assert_allclose(np.linalg.norm(table.bvecs[2:], axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(table.bvecs[2:], unit_dirs(6), atol=1e-12)
    np.testing.assert_array_equal(table.b0s_mask, [True, True] + [False] * 6)
    np.testing.assert_array_equal(table.shells, [1000])
    np.testing.assert_array_equal(table.bvals[2:], bvals[2:])  # as acquired, only shells are rounded
    assert len(table) == 8


def test_create_accepts_antipodal_pairs_and_counts_axes_once():
    dirs = unit_dirs(6)
    bvals = np.r_[0.0, np.full(8, 1000.0)]
    bvecs = np.vstack([[0, 0, 0], dirs, -dirs[0], -dirs[3]])
    table = create_quiet(bvals, bvecs)
    assert table.n_directions == 6
    np.testing.assert_allclose(table.bvecs[7], -table.bvecs[1])


def test_describe_summarises_protocol():
    bvals = np.r_[0, 0, np.full(6, 1000.0), np.full(6, 2000.0)]
    bvecs = np.vstack([np.zeros((2, 3)), unit_dirs(6), unit_dirs(6, seed=1)])
    assert GradientTable.create(bvals, bvecs).describe() == "2 b0 + 6 x b=1000 + 6 x b=2000 (12 directions)"


def test_table_is_immutable():
    table = create_quiet(*table_inputs())
    with pytest.raises(dataclasses.FrozenInstanceError):
        table.bvals = np.zeros(3)


def test_select_and_transformed():
    table = create_quiet(*table_inputs(n_dw=6))
    sub = table.select(np.array([0, 3, 4]))
    np.testing.assert_array_equal(sub.bvals, table.bvals[[0, 3, 4]])
    flip = np.diag([-1.0, 1.0, 1.0])
    moved = table.transformed(flip)
    np.testing.assert_allclose(moved.bvecs[:, 0], -table.bvecs[:, 0])
    np.testing.assert_allclose(moved.bvecs[:, 1:], table.bvecs[:, 1:])


# --------------------------------------------------------------------------------------------------------------
# create: every error
# --------------------------------------------------------------------------------------------------------------


def _broken(kind):
    bvals, bvecs = table_inputs()
    if kind == "vector shape":
        return bvals, bvecs[:, :2]
    if kind == "count":
        return bvals[:-1], bvecs
    if kind == "nan bval":
        bvals[4] = np.nan
    elif kind == "inf bvec":
        bvecs[5, 1] = np.inf
    elif kind == "negative":
        bvals[3] = -1000
    elif kind == "zero vector":
        bvecs[6] = 0.0
    elif kind == "no b0":
        bvals[:2] = 1000.0
        bvecs[:2] = unit_dirs(2, seed=3)
    return bvals, bvecs


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("vector shape", ["(N, 3)", "(14, 2)"]),
        ("count", ["14 b-vectors", "13 b-values"]),
        ("nan bval", ["NaN", "volumes 4"]),
        ("inf bvec", ["NaN/inf", "volumes 5"]),
        ("negative", ["negative", "volumes 3"]),
        ("zero vector", ["zero-norm", "volumes 6"]),
        ("no b0", ["no b0"]),
    ],
)
def test_create_rejects_bad_tables(kind, words):
    bvals, bvecs = _broken(kind)
    with pytest.raises(GradientTableError) as info:
        create_quiet(bvals, bvecs, source="sub01.bvec")
    message = str(info.value)
    assert message.startswith("sub01.bvec: ")
    for word in words:
        assert word in message
    assert isinstance(info.value, DWIError) and isinstance(info.value, ValueError)


def test_no_b0_allowed_when_not_required():
    bvals, bvecs = _broken("no b0")
    assert not create_quiet(bvals, bvecs, require_b0=False).b0s_mask.any()


# --------------------------------------------------------------------------------------------------------------
# create: warnings for odd but legal tables
# --------------------------------------------------------------------------------------------------------------


def _messages(bvals, bvecs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        GradientTable.create(bvals, bvecs, source="w.bvec")
    return [str(w.message) for w in caught if issubclass(w.category, DWIWarning)]


def test_warns_for_non_unit_vectors():
    bvals, bvecs = table_inputs()
    bvecs[5] *= 0.9
    assert any("not unit length" in m and "0.900" in m for m in _messages(bvals, bvecs))


def test_rounding_noise_does_not_warn_about_norms():
    bvals, bvecs = table_inputs()
    bvecs[2:] *= 1.0 + 1e-4
    assert not any("unit length" in m for m in _messages(bvals, bvecs))


def test_warns_for_single_shell_and_few_directions():
    messages = _messages(*table_inputs(n_dw=4))
    assert any("single-shell" in m and "b=1000" in m for m in messages)
    assert any("only 4 distinct directions" in m for m in messages)


def test_multi_shell_many_directions_no_protocol_warning():
    bvals = np.r_[0, np.full(6, 1000.0), np.full(6, 2000.0)]
    bvecs = np.vstack([np.zeros((1, 3)), unit_dirs(6), unit_dirs(6, seed=1)])
    assert _messages(bvals, bvecs) == []


def test_b0_threshold_value():
    assert B0_THRESHOLD == 50.0
