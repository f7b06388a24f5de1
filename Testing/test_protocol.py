"""Protocol utilities: seeded volume subsets and the protocol summary."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from DRoPE.gradients import DWIWarning, GradientTable, GradientTableError
from DRoPE.protocol import describe_protocol, pick_volumes


def _table(bvals, bvecs=None) -> GradientTable:
    bvals = np.asarray(bvals, dtype=float)
    rng = np.random.default_rng(0)
    if bvecs is None:
        bvecs = rng.normal(size=(len(bvals), 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DWIWarning)
        return GradientTable.create(bvals, bvecs)


@pytest.fixture(scope="module")
def multishell() -> GradientTable:
    return _table([0, 1000, 1000, 5, 2000, 2000, 2000, 0, 1000, 3000])


def test_pick_is_reproducible_sorted_and_distinct(multishell):
    first = pick_volumes(multishell, 6, seed=3)
    assert np.array_equal(first, pick_volumes(multishell, 6, seed=3))
    assert len(first) == 6 and len(np.unique(first)) == 6
    assert np.all(np.diff(first) > 0) and first.min() >= 0 and first.max() < len(multishell)
    assert np.issubdtype(first.dtype, np.integer)
    draws = {tuple(pick_volumes(multishell, 6, seed=s)) for s in range(20)}
    assert len(draws) > 5  # different seeds give different subsets


def test_pick_b0_rules(multishell):
    b0 = set(np.flatnonzero(multishell.b0s_mask))
    assert b0 == {0, 3, 7}
    for seed in range(30):
        with_b0 = pick_volumes(multishell, 2, seed=seed)
        assert b0 & set(with_b0)
        without = pick_volumes(multishell, 7, seed=seed, include_b0=False)
        assert not b0 & set(without)
    assert set(pick_volumes(multishell, 1, seed=0)) <= b0
    assert len(pick_volumes(multishell, len(multishell), seed=0)) == len(multishell)


def test_pick_covers_all_volumes_uniformly(multishell):
    """Without b0s every DW volume is equally likely: 7 of 7 chosen 3 at a time -> each 3/7 of the draws."""
    counts = np.zeros(len(multishell))
    for seed in range(2000):
        counts[pick_volumes(multishell, 3, seed=seed, include_b0=False)] += 1
    dw = ~multishell.b0s_mask
    assert np.all(counts[~dw] == 0)
    np.testing.assert_allclose(counts[dw] / 2000, 3 / 7, atol=0.04)


@pytest.mark.parametrize("k, include_b0", [(11, True), (0, True), (8, False), (-1, False)])
def test_pick_rejects_impossible_k(multishell, k, include_b0):
    with pytest.raises(GradientTableError, match=f"cannot pick {k} volumes"):
        pick_volumes(multishell, k, seed=0, include_b0=include_b0)


@pytest.mark.filterwarnings("ignore::DRoPE.gradients.DWIWarning")
def test_pick_needs_a_b0_when_asked():
    table = GradientTable.create([1000.0] * 7, np.eye(3).repeat(3, axis=0)[:7], require_b0=False)
    with pytest.raises(GradientTableError, match="no b0"):
        pick_volumes(table, 2, seed=0)
    assert len(pick_volumes(table, 2, seed=0, include_b0=False)) == 2


def test_describe_multishell(multishell):
    summary = describe_protocol(multishell)
    assert summary == {
        "n_volumes": 10,
        "n_b0": 3,
        "max_b": 3000.0,
        "n_directions": 7,
        "shells": [
            {"b": 1000.0, "count": 3, "directions": 3},
            {"b": 2000.0, "count": 3, "directions": 3},
            {"b": 3000.0, "count": 1, "directions": 1},
        ],
    }
    json.dumps(summary)  # JSON-safe


def test_describe_counts_antipodes_once():
    x, y = [1.0, 0, 0], [0, 1.0, 0]
    table = _table([0, 1000, 1000, 1000, 1000], [[0, 0, 0], x, [-1.0, 0, 0], y, y])
    assert describe_protocol(table)["shells"] == [{"b": 1000.0, "count": 4, "directions": 2}]


def test_describe_real_mappertrac(crops):
    """README: 6 b0 + 64 x b=1000 with two antipodal pairs -> 62 distinct axes."""
    folder = crops / "mappertrac_sub-011591"
    table = _table(np.loadtxt(folder / "dwi.bval"), np.loadtxt(folder / "dwi.bvec").T)
    summary = describe_protocol(table)
    assert summary["n_b0"] == 6 and summary["n_volumes"] == 70 and summary["max_b"] == pytest.approx(1000, abs=10)
    assert summary["shells"] == [{"b": 1000.0, "count": 64, "directions": 62}]
