"""Training data: discovery, holdout, the preprocessing cache, slab sampling, sharding, collation, augmentation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from DRoPE.training import data as tdata
from DRoPE.training.config import DataConfig


def _touch(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def train_cache(tmp_path_factory) -> Path:
    """Preprocessing cache shared by the training tests of this session (brain masking is the slow part)."""
    path = tmp_path_factory.getbasetemp() / "drope-train-cache"
    path.mkdir(exist_ok=True)
    return path


# --- discovery ---------------------------------------------------------------------------------------------------


@pytest.mark.corpus
def test_find_dwis_in_shared_data_ignores_masks_and_maps(shared_data):
    found = tdata.find_dwis(shared_data)
    expected = sorted(
        [p.resolve() for p in shared_data.glob("*/dwi.nii.gz")]
        + [p.resolve() for p in shared_data.glob("corpus/*/*/dwi.nii.gz")]
        + [p.resolve() for p in (shared_data / "nrrd_slicer_dwi").glob("*.nrrd")]
    )
    assert found == expected
    names = {p.name for p in found}
    assert not names & {"brain_mask.nii.gz", "T1w.nii.gz", "scanner_FA.nii.gz", "scanner_ADC.nii.gz"}


def test_find_dwis_bids_recursive(tmp_path):
    dwi = _touch(tmp_path / "sub-01" / "ses-1" / "dwi" / "sub-01_ses-1_dwi.nii.gz")
    _touch(dwi.with_name("sub-01_ses-1_dwi.bval"))
    _touch(dwi.with_name("sub-01_ses-1_dwi.bvec"))
    _touch(tmp_path / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    _touch(tmp_path / "sub-01" / "ses-1" / "dwi" / "brain_mask.nii.gz")
    nrrd = _touch(tmp_path / "sub-02" / "dwi" / "sub-02_dwi.nhdr")
    assert tdata.find_dwis(tmp_path) == sorted([dwi.resolve(), nrrd.resolve()])
    names = tdata.subject_names(tdata.find_dwis(tmp_path), tmp_path)
    assert names == ["sub-01/ses-1/dwi/sub-01_ses-1_dwi", "sub-02/dwi/sub-02_dwi"]


def test_find_dwis_list_file_relative_to_list(tmp_path, sample_dir):
    listing = tmp_path / "lists" / "train.txt"
    listing.parent.mkdir()
    rel = Path("..") / "elsewhere" / "a.nii.gz"
    listing.write_text(f"# training subjects\n\n{sample_dir / 'dwi.nii.gz'}\n{rel}\n")
    found = tdata.find_dwis(listing)
    assert found == [(sample_dir / "dwi.nii.gz").resolve(), (tmp_path / "elsewhere" / "a.nii.gz").resolve()]


def test_find_dwis_empty_folder_and_missing(tmp_path):
    _touch(tmp_path / "brain_mask.nii.gz")
    with pytest.raises(tdata.DataError, match="no DWI found"):
        tdata.find_dwis(tmp_path)
    with pytest.raises(tdata.DataError, match="no such folder"):
        tdata.find_dwis(tmp_path / "nope")
    empty_list = _touch(tmp_path / "list.txt", "# nothing\n")
    with pytest.raises(tdata.DataError, match="empty"):
        tdata.find_dwis(empty_list)


def test_holdout_by_name_and_path(tmp_path):
    paths = []
    for sub in ("sub-01", "sub-02", "sub-03"):
        p = _touch(tmp_path / "data" / sub / "dwi" / f"{sub}_dwi.nii.gz")
        _touch(p.with_name(f"{sub}_dwi.bval"))
        paths.append(p.resolve())
    holdout = _touch(tmp_path / "holdout.txt", "sub-02\n# comment\ndata/sub-03/dwi/sub-03_dwi.nii.gz\nsub-99\n")
    kept, held = tdata.read_holdout(holdout, paths, tmp_path / "data")
    assert kept == [paths[0]]
    assert held == ["sub-02/dwi/sub-02_dwi", "sub-03/dwi/sub-03_dwi"]


# --- sampling ----------------------------------------------------------------------------------------------------


def _coded_signal(N=6, X=40, Y=24, Z=20) -> np.ndarray:
    """signal[v, x, y, z] = v + 10 * (x + 100 * (y + 100 * z)) + 1 (unique, non-zero, exact in float64)."""
    v, x, y, z = np.meshgrid(np.arange(N), np.arange(X), np.arange(Y), np.arange(Z), indexing="ij")
    return (v + 10 * (x + 100 * (y + 100 * z)) + 1).astype(np.float64)


def _decode(value: float) -> tuple[int, int, int, int]:
    value = int(round(value)) - 1
    v, rest = value % 10, value // 10
    return v, rest % 100, (rest // 100) % 100, rest // 10000


def test_slab_brain_fraction_matches_brute_force():
    rng = np.random.default_rng(1)
    mask = rng.random((10, 12, 9)) < 0.3
    frac = tdata.slab_brain_fraction(mask, 4, None)
    expected = [mask[:, :, z : z + 4].mean() for z in range(9 - 4 + 1)]
    np.testing.assert_allclose(frac, expected)
    small = tdata.slab_brain_fraction(mask, 4, (5, 6))  # relative to the crop area, capped at 1
    np.testing.assert_allclose(small, np.minimum(np.array(expected) * (10 * 12) / (5 * 6), 1.0))


def test_draw_sample_is_a_contiguous_brain_slab_of_distinct_volumes():
    signal = _coded_signal()
    mask = np.zeros(signal.shape[1:], dtype=bool)
    mask[10:30, 5:20, 12:18] = True  # brain only in slices 12..17
    config = DataConfig(slab=4, volumes=4, crop=(16, 16), min_brain_fraction=0.1)
    seen_z = set()
    for seed in range(30):
        x, brain, volumes = tdata.draw_sample(signal, mask, config, np.random.default_rng(seed))
        assert x.shape == (4, 16, 16, 4) and x.dtype == np.float32
        assert len(set(volumes.tolist())) == 4
        v0, x0, y0, z0 = _decode(x[0, 0, 0, 0])
        np.testing.assert_array_equal(brain, mask[x0 : x0 + 16, y0 : y0 + 16, z0 : z0 + 4])
        for i, v in enumerate(volumes):
            expected = signal[v, x0 : x0 + 16, y0 : y0 + 16, z0 : z0 + 4]
            np.testing.assert_array_equal(x[i], expected.astype(np.float32))
        assert v0 == volumes[0]
        # the slab has >= 10% brain in the crop area, and the crop contains brain
        assert mask[:, :, z0 : z0 + 4].sum() / (16 * 16 * 4) >= 0.1
        assert mask[x0 : x0 + 16, y0 : y0 + 16, z0 : z0 + 4].any()
        seen_z.add(z0)
    assert seen_z <= set(range(9, 18)) and len(seen_z) > 3  # varied, and only slabs overlapping the brain


def test_draw_sample_all_volumes_if_fewer_and_zero_padding():
    signal = _coded_signal(N=3, X=12, Y=8, Z=2)
    mask = np.ones(signal.shape[1:], dtype=bool)
    config = DataConfig(slab=4, volumes=15, crop=(16, 16))
    x, brain, volumes = tdata.draw_sample(signal, mask, config, np.random.default_rng(0))
    assert x.shape == (3, 16, 16, 4)
    assert sorted(volumes.tolist()) == [0, 1, 2]
    assert brain.shape == (16, 16, 4) and brain.sum() == 12 * 8 * 2  # the padding is not brain
    # every voxel of every volume is there exactly once; the rest is zero padding
    for i, v in enumerate(volumes):
        values = x[i][x[i] != 0]
        assert len(values) == 12 * 8 * 2
        np.testing.assert_array_equal(np.sort(values), np.sort(signal[v].ravel()).astype(np.float32))


def test_draw_sample_without_crop_keeps_field_of_view():
    signal = _coded_signal(N=2, X=16, Y=8, Z=12)
    mask = np.ones(signal.shape[1:], dtype=bool)
    x, _, _ = tdata.draw_sample(signal, mask, DataConfig(slab=4, volumes=2, crop=None), np.random.default_rng(3))
    assert x.shape == (2, 16, 8, 4)


def test_draw_sample_draws_only_the_candidate_volumes():
    signal = _coded_signal(N=6, X=16, Y=8, Z=4)
    mask = np.ones(signal.shape[1:], dtype=bool)
    for seed in range(10):
        _, _, volumes = tdata.draw_sample(signal, mask, DataConfig(slab=4, volumes=3, crop=None),
                                          np.random.default_rng(seed), candidates=np.array([1, 3, 4, 5]))
        assert len(volumes) == 3 and set(volumes.tolist()) <= {1, 3, 4, 5}


def _write_subject(folder: Path, name: str, signal: np.ndarray, mask: np.ndarray, bvals, bvecs) -> tdata.CachedSubject:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{name}.signal.npy", signal.astype(np.float16))
    np.save(folder / f"{name}.mask.npy", mask.astype(np.uint8))
    return tdata.CachedSubject(name, name, folder / f"{name}.signal.npy", folder / f"{name}.mask.npy",
                               np.asarray(bvals, float), np.asarray(bvecs, float), signal.shape)


@pytest.fixture()
def toy_subjects(tmp_path):
    rng = np.random.default_rng(0)
    subjects = []
    for k, shape in enumerate([(9, 24, 24, 12), (5, 16, 24, 8)]):
        # volume v holds values in [v + 0.25, v + 0.75): a drawn block tells which volume it came from
        signal = (rng.uniform(0.25, 0.75, shape) + np.arange(shape[0])[:, None, None, None]).astype(np.float32)
        mask = np.ones(shape[1:], dtype=bool)
        bvecs = rng.normal(size=(shape[0], 3))
        bvecs /= np.linalg.norm(bvecs, axis=1, keepdims=True)
        bvecs[0] = 0
        bvals = np.r_[0, np.full(shape[0] - 1, 1000.0 * (k + 1))]
        subjects.append(_write_subject(tmp_path, f"s{k}", signal, mask, bvals, bvecs))
    return subjects


def test_dataset_is_seeded_by_epoch_and_subject(toy_subjects):
    config = DataConfig(slab=4, volumes=7, crop=(16, 16), samples_per_subject=3)
    a = tdata.SlabDataset(toy_subjects, config, seed=5)
    b = tdata.SlabDataset(toy_subjects, config, seed=5)
    assert len(a) == 6
    for item in [(0, 0), (0, 4), (3, 5)]:
        sa, sb = a[item], b[item]
        assert torch.equal(sa["x"], sb["x"]) and torch.equal(sa["bvals"], sb["bvals"])
    assert not torch.equal(a[(0, 0)]["x"], a[(1, 0)]["x"])  # another epoch, another draw
    assert not torch.equal(a[(0, 0)]["x"], a[(0, 1)]["x"])  # another sample of the same subject
    assert a[(0, 4)]["subject"] == 1 and a[(0, 4)]["x"].shape[0] == 4  # subject 1: 4 weighted volumes + a b0
    sample = a[(2, 1)]
    vols = sample["bvals"].numpy()
    assert set(vols.tolist()) == {1000.0}  # b0 is the normalisation reference, never a token or a target
    assert sample["brain"].shape == sample["x"].shape[1:] and sample["brain"].dtype == torch.bool
    subject = toy_subjects[0]
    signal = np.load(subject.signal_path)
    # the bvals/bvecs travel with their volumes: find each drawn volume in the subject's signal
    for i in range(sample["x"].shape[0]):
        block = sample["x"][i].numpy()
        (volume,) = np.unique(np.floor(block[block != 0]))
        np.testing.assert_allclose(sample["bvecs"][i].numpy(), subject.bvecs[int(volume)], atol=1e-6)


def test_loader_batches_do_not_depend_on_workers(toy_subjects):
    config = DataConfig(slab=4, volumes=7, crop=(16, 16), samples_per_subject=3)
    dataset = tdata.SlabDataset(toy_subjects, config, seed=1)

    def batches(workers):
        sampler = tdata.ShardedSampler(len(dataset), seed=1)
        sampler.set_epoch(2)
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, sampler=sampler, num_workers=workers,
                                             collate_fn=tdata.collate_samples)
        return list(loader)

    zero, two = batches(0), batches(2)
    assert len(zero) == 3
    for a, b in zip(zero, two):
        for key in ("x", "brain", "bvals", "bvecs", "subject"):
            assert torch.equal(a[key], b[key])


def test_sharded_sampler_splits_each_epoch():
    parts = []
    for rank in range(3):
        sampler = tdata.ShardedSampler(10, seed=4, rank=rank, world_size=3)
        sampler.set_epoch(1)
        parts.append(sampler.indices())
        assert len(parts[-1]) == len(sampler) == 4
    everything = sum(parts, [])
    assert set(everything) == set(range(10))  # all covered; 2 repeated to even the shards
    single = tdata.ShardedSampler(10, seed=4)
    single.set_epoch(1)
    again = tdata.ShardedSampler(10, seed=4)
    again.set_epoch(2)
    assert sorted(single.indices()) == list(range(10)) and single.indices() != again.indices()
    assert [item[0] for item in single] == [1] * 10  # items carry the epoch


def test_collate_keeps_smallest_volume_count_and_pads():
    samples = [
        {"x": torch.ones(5, 16, 8, 4), "brain": torch.ones(16, 8, 4, dtype=torch.bool), "bvals": torch.arange(5.0),
         "bvecs": torch.ones(5, 3), "subject": 0},
        {"x": torch.full((3, 8, 16, 4), 2.0), "brain": torch.ones(8, 16, 4, dtype=torch.bool),
         "bvals": torch.arange(3.0), "bvecs": torch.ones(3, 3), "subject": 1},
    ]
    batch = tdata.collate_samples(samples)
    assert batch["x"].shape == (2, 3, 16, 16, 4)
    assert batch["brain"].shape == (2, 16, 16, 4) and batch["brain"].sum() == 2 * 16 * 8 * 4  # padding is no brain
    assert batch["bvals"].tolist() == [[0, 1, 2], [0, 1, 2]]
    assert batch["x"][0, :, :, 8:].abs().sum() == 0 and batch["x"][1, :, 8:].abs().sum() == 0
    assert batch["x"][0].sum() == 3 * 16 * 8 * 4
    assert batch["subject"].tolist() == [0, 1]


# --- the cache on a real DWI ----------------------------------------------------------------------------------


def test_cache_is_float16_memmap_with_table_and_is_reused(sample_dir, train_cache, monkeypatch):
    from DRoPE.io import load_dwi

    source = sample_dir / "dwi.nii.gz"
    config = DataConfig()
    done, failed = tdata.prepare_cache([source], train_cache, config, (8, 8, 4), names=["sample"])
    assert failed == {}
    entry = done[0]
    signal = np.load(entry.signal_path, mmap_mode="r")
    assert isinstance(signal, np.memmap) and signal.dtype == np.float16
    dwi = load_dwi(source)
    assert signal.shape[0] == dwi.n_volumes and all(s % p == 0 for s, p in zip(signal.shape[1:], (8, 8, 4)))
    assert 0.0 <= float(signal.min()) and float(signal.max()) <= 1.5
    meta = json.loads(entry.signal_path.with_name(entry.signal_path.name.replace(".signal.npy", ".json")).read_text())
    np.testing.assert_allclose(meta["bvals"], dwi.gtab.bvals)
    np.testing.assert_allclose(meta["bvecs"], dwi.gtab.bvecs)
    # b0 volumes are ~1 inside the brain after normalisation
    mask = np.load(entry.mask_path).astype(bool)
    b0 = np.asarray(signal[np.flatnonzero(dwi.gtab.b0s_mask)[0]], dtype=np.float32)
    assert abs(float(np.median(b0[mask])) - 1.0) < 0.05

    # a second call is a cache hit: preprocessing is not run again
    import DRoPE.preprocess

    def boom(*args, **kwargs):
        raise AssertionError("preprocess called on a cache hit")

    monkeypatch.setattr(DRoPE.preprocess, "preprocess", boom)
    again, _ = tdata.prepare_cache([source], train_cache, config, (8, 8, 4), names=["sample"])
    assert again[0].signal_path == entry.signal_path
    # other preprocessing settings or other file contents -> another key
    settings = tdata.preprocessing_settings(config, (8, 8, 4))
    key = tdata.cache_key(source, settings)
    assert key == entry.signal_path.name.split(".")[0]
    assert tdata.cache_key(source, tdata.preprocessing_settings(DataConfig(spacing=2.0), (8, 8, 4))) != key


def test_cache_key_follows_file_content(tmp_path, sample_dir):
    for name in ("dwi.nii.gz", "dwi.bval", "dwi.bvec"):
        shutil.copy(sample_dir / name, tmp_path / name)
    settings = {"spacing": None}
    key = tdata.cache_key(tmp_path / "dwi.nii.gz", settings)
    assert key == tdata.cache_key(sample_dir / "dwi.nii.gz", settings)  # content, not location
    bval = (tmp_path / "dwi.bval").read_text().replace("1500", "1000", 1)
    (tmp_path / "dwi.bval").write_text(bval)
    assert tdata.cache_key(tmp_path / "dwi.nii.gz", settings) != key


def test_unreadable_dwi_is_reported_not_raised(tmp_path, train_cache):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file")
    (tmp_path / "bad.bval").write_text("0 1000\n")
    (tmp_path / "bad.bvec").write_text("0 1\n0 0\n0 0\n")
    done, failed = tdata.prepare_cache([bad, tmp_path / "missing.nii.gz"], train_cache, DataConfig(), (8, 8, 4))
    assert done == {} and set(failed) == {0, 1}
    assert "bad.nii.gz" in failed[0] and "missing.nii.gz" in failed[1]
    message = tdata.bad_files_message(failed, 2)
    assert message.startswith("2 of 2 DWIs could not be read") and "bad.nii.gz" in message


# --- protocol augmentation -----------------------------------------------------------------------------------


def test_protocol_augment_resynthesises_an_isotropic_tensor():
    rng = np.random.default_rng(0)
    N = 13
    bvecs = rng.normal(size=(N, 3))
    bvecs /= np.linalg.norm(bvecs, axis=1, keepdims=True)
    bvecs[0] = 0
    bvals = np.r_[0.0, np.full(N - 1, 1500.0)]
    D = 0.7e-3  # mm^2/s, isotropic
    x = np.broadcast_to(np.exp(-bvals * D)[:, None, None, None], (N, 8, 8, 4)).astype(np.float32).copy()
    augment = tdata.ProtocolAugment(volumes=9, snr=None)
    out, new_bvals, new_bvecs = augment(x, bvals, bvecs, np.random.default_rng(3))
    assert out.shape == (9, 8, 8, 4)
    assert set(new_bvals) <= {1000.0, 2000.0, 3000.0}  # weighted volumes only: b0 is the reference
    np.testing.assert_allclose(np.linalg.norm(new_bvecs, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(out[:, 3, 3, 2], np.exp(-new_bvals * D), rtol=1e-3)


def test_listed_dwis_with_one_file_name_get_their_folders_as_names(tmp_path):
    paths = [_touch(tmp_path / "data" / series / "dwi.nii.gz").resolve() for series in ("a/s1", "a/s2", "b/s1")]
    listing = tmp_path / "lists" / "train.txt"
    listing.parent.mkdir()
    listing.write_text("\n".join(map(str, paths)) + "\n")
    assert tdata.subject_names(paths, listing) == ["a/s1/dwi", "a/s2/dwi", "b/s1/dwi"]
