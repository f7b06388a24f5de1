"""Paths of the files that ship with DRoPE (bundled weights and sample DWI), found relative to the package."""

from pathlib import Path

RESOURCES = Path(__file__).resolve().parents[1] / "Resources"
DEFAULT_WEIGHTS = RESOURCES / "model"
SAMPLE_DWI = RESOURCES / "Sample" / "dwi.nii.gz"
SAMPLE_NRRD = RESOURCES / "Sample" / "dwi.nrrd"
