"""Shared fixtures: the in-repository real-data crops (Testing/Data), the bundled sample and the shared data.

Tests that need ../shared/data (whole scans, the corpus) are marked ``corpus`` and skip without it, unless
DROPE_REQUIRE_SHARED=1 (set by .ci/run), which turns that skip into a failure.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "Resources" / "Sample"
CROPS_DIR = REPO_ROOT / "Testing" / "Data"


def _shared_data_dir() -> Path:
    override = os.environ.get("DROPE_SHARED_DATA")
    return Path(override) if override else REPO_ROOT.parent / "shared" / "data"


SHARED_DATA = _shared_data_dir()
REAL_BRAINS = [
    "mappertrac_sub-011591",
    "siemens_xa30_b2500",
    "philips_achieva_32dir",
    "canon_oblique_all20d",
    "canon_ortho_same_session",
]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only shared data folder (../shared/data beside the repository, or $DROPE_SHARED_DATA)."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("DROPE_REQUIRE_SHARED") == "1":
            pytest.fail(f"shared data not found at {SHARED_DATA} (DROPE_REQUIRE_SHARED=1); set DROPE_SHARED_DATA")
        pytest.skip("needs ../shared/data (set DROPE_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def crops() -> Path:
    """Testing/Data: small real crops with the folder names of the shared data (see make_test_data.py there)."""
    return CROPS_DIR


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The small DWI bundled in Resources/Sample (Canon oblique, BSD-2-Clause)."""
    return SAMPLE_DIR


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """A folder with an untrained tiny model (seed 0, training slab 4): fast engine runs on the CPU."""
    from DRoPE.model import DRoPEMAE, model_config, save_model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny")
    save_model(DRoPEMAE(model_config("tiny")), folder, extra={"slab": 4})
    return folder


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test (restored after): tiny models run many small ops, which stall on a
    shared, busy 2-core CPU with several threads. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def centre_box(shape, half, offset=(0, 0, 0)) -> tuple[slice, slice, slice]:
    """Slices of the box of half-size ``half`` (3 ints) around the centre of ``shape``, shifted by ``offset``."""
    centre = [n // 2 + o for n, o in zip(shape[:3], offset)]
    return tuple(slice(c - h, c + h) for c, h in zip(centre, half))


def crop_dwi(source: Path, target: Path, box) -> Path:
    """Write the voxels ``box`` (3 slices, all volumes) of the DWI ``source`` to ``target`` (.nii.gz) with its
    .bval/.bvec; the affine's origin moves so the crop keeps its world position. ``source`` is only read."""
    img = nib.load(source)
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ np.array([b.start for b in box]) + img.affine[:3, 3]
    target.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[box], affine, img.header), target)
    stem = str(target)[: -len(".nii.gz")]
    source_stem = str(source)[: -len(".nii.gz")]
    shutil.copy(source_stem + ".bval", stem + ".bval")
    shutil.copy(source_stem + ".bvec", stem + ".bvec")
    return target
