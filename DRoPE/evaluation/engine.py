"""Per-subject evaluation of a reconstruction (paper Tables 1 and 2).

For one DWI and one checkpoint, ``evaluate_reconstruction`` runs the lead's engine (``DRoPE.reconstruct``: seeded
volume subset, seeded patch mask, slab-wise inference, DTI of original and reconstruction) and measures:

- signal metrics per shell (and over all diffusion-weighted volumes, shell "dw"), on the b0-normalised signal
  (reference = ``DRoPE.preprocess.normalize`` of the original, i.e. S / mean b0 clipped to [0, 1.5] as the model
  was trained; reconstruction = the model's normalised prediction), inside the brain mask:
  PSNR (dB, peak 1.0 = the b0 level), SSIM (3-D, per volume, data_range 1.0, averaged over volumes), MSE.
  Each is computed on the voxels of *masked* patches (``*_masked``; the headline, as for MAE reconstructions) and on
  all brain voxels (``*_whole``).
- DTI errors: mean absolute FA and MD error over the brain, in white matter (FA > 0.2 in the original), and per
  tract (atlas regions intersected with that white matter; ``DRoPE.evaluation.atlas``).
- slice samples for the Frechet distance (pooled over subjects later, per shell).
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from dataclasses import dataclass, field, replace

import numpy as np

from ..baselines import baseline_predictions
from ..dti import mean_b0
from ..preprocess import normalize
from ..reconstruct import Reconstruction, ReconstructSettings, dti_maps, run_reconstruction
from . import metrics

log = logging.getLogger(__name__)

WM_FA_THRESHOLD = 0.2
MIN_REGION_VOXELS = 10
MIN_SLICE_FRACTION = 0.2  # FID slices: brain area >= this fraction of the largest axial brain slice
MD_SCALE = 1e3  # MD errors are reported in 1e-3 mm^2/s
DW_SHELL = "dw"


@dataclass
class SubjectResult:
    """Evaluation of one subject with one model.

    Attributes:
        subject, model: names.
        shells: rows {subject, model, shell, n_volumes, psnr_masked, psnr_whole, ssim_masked, ssim_whole,
            mse_masked, mse_whole, psnr_masked_half}; shell is a b-value string or "dw" (all DW volumes).
        dti: {fa_mae_brain, fa_mae_wm, md_mae_brain, md_mae_wm (1e-3 mm^2/s), n_brain, n_wm} or {} without DTI.
        tracts: rows {subject, model, tract, n_voxels, fa_mae, md_mae}.
        reconstruction: the engine's result (maps, recon, visible, mask) for figures and NIfTI outputs.
        normalised: (original, reconstruction) (X, Y, Z, V) b0-normalised signal.
        mask_digest: hash of the patch mask and volume subset (equal digests = same masks across models).
    """

    subject: str
    model: str
    shells: list[dict]
    dti: dict
    tracts: list[dict]
    reconstruction: Reconstruction
    normalised: tuple[np.ndarray, np.ndarray]
    mask_digest: str
    notes: list[str] = field(default_factory=list)


def normalised_pair(result: Reconstruction) -> tuple[np.ndarray, np.ndarray]:
    """(original, reconstruction) (X, Y, Z, V) in units of the mean b0, zero outside the brain."""
    dwi = result.dwi
    original = normalize(dwi.data, dwi.gtab, result.mask)
    b0 = mean_b0(dwi.data, dwi.gtab)
    valid = result.mask & (b0 > 0)
    recon = np.zeros_like(original)
    recon[valid] = result.recon[valid] / b0[valid][:, None]
    return original, recon


def shell_labels(result: Reconstruction) -> np.ndarray:
    """(V,) shell b-value of each selected volume (0 for b0)."""
    return result.dwi.gtab.shell_bvals


def signal_metrics(original: np.ndarray, recon: np.ndarray, brain: np.ndarray, visible: np.ndarray, shells: np.ndarray,
                   *, subject: str = "", model: str = "") -> list[dict]:
    """Rows of PSNR / SSIM / MSE per shell and over all DW volumes.

    original, recon: (X, Y, Z, V) normalised signal; brain: (X, Y, Z) bool; visible: (X, Y, Z, V) bool, True = patch
    shown to the encoder; shells: (V,) shell b-values. Masked-patch metrics are None when nothing was masked.
    """
    V = original.shape[-1]
    ssim_volume = {"masked": np.full(V, np.nan), "whole": np.full(V, np.nan)}  # per-volume regional SSIM
    for v in range(V):
        index = metrics.ssim_map(original[..., v], recon[..., v])
        for region_name, region in (("masked", brain & ~visible[..., v]), ("whole", brain)):
            if region.any():
                ssim_volume[region_name][v] = index[region].mean()
    groups = [(f"{b:g}", shells == b) for b in np.unique(shells)]
    if np.any(shells > 0):
        groups.append((DW_SHELL, shells > 0))
    rows = []
    for name, chosen in groups:
        row = {"subject": subject, "model": model, "shell": name, "n_volumes": int(chosen.sum())}
        idx = np.flatnonzero(chosen)
        whole = np.broadcast_to(brain[..., None], original.shape)[..., idx]
        masked = whole & ~visible[..., idx]
        ref, test = original[..., idx], recon[..., idx]
        for region_name, region in (("masked", masked), ("whole", whole)):
            if region.any():
                row[f"mse_{region_name}"] = metrics.mse(ref, test, region)
                row[f"psnr_{region_name}"] = metrics.psnr(ref, test, region, peak=1.0)
                row[f"ssim_{region_name}"] = float(np.nanmean(ssim_volume[region_name][idx]))
            else:
                row[f"mse_{region_name}"] = row[f"psnr_{region_name}"] = row[f"ssim_{region_name}"] = None
        row["psnr_masked_half"] = None if row["psnr_masked"] is None else row["psnr_masked"] / 2
        rows.append(row)
    return rows


def dti_region_errors(maps: dict, brain: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray]:
    """Mean absolute FA / MD errors over the brain and over white matter (FA > 0.2 in the original).

    Returns (errors, valid (X, Y, Z) bool, wm (X, Y, Z) bool); valid = brain voxels where both fits exist.
    """
    if not maps:
        return {}, np.zeros_like(brain), np.zeros_like(brain)
    valid = brain & (maps["md"] != 0) & (maps["md_recon"] != 0)
    wm = valid & (maps["fa"] > WM_FA_THRESHOLD)

    def mean(values, where):
        return float(values[where].mean()) if where.any() else None

    errors = {
        "fa_mae_brain": mean(maps["fa_error"], valid),
        "fa_mae_wm": mean(maps["fa_error"], wm),
        "md_mae_brain": mean(maps["md_error"] * MD_SCALE, valid),
        "md_mae_wm": mean(maps["md_error"] * MD_SCALE, wm),
        "n_brain": int(valid.sum()),
        "n_wm": int(wm.sum()),
    }
    return errors, valid, wm


def tract_errors(maps: dict, labels: np.ndarray, names, wm: np.ndarray, *, subject: str = "", model: str = "") -> list[dict]:
    """Rows {tract, n_voxels, fa_mae, md_mae} for each region label k (names[k-1]) intersected with ``wm``."""
    rows = []
    for k, name in enumerate(names, start=1):
        region = (labels == k) & wm
        n = int(region.sum())
        if n < MIN_REGION_VOXELS:
            continue
        rows.append({
            "subject": subject, "model": model, "tract": name, "n_voxels": n,
            "fa_mae": float(maps["fa_error"][region].mean()),
            "md_mae": float(maps["md_error"][region].mean() * MD_SCALE),
        })
    return rows


def mask_digest(result: Reconstruction) -> str:
    """Short hash of the volume subset and the visible-patch map (equal = same masking)."""
    h = hashlib.sha1()
    h.update(np.asarray(result.volume_index, dtype=np.int64).tobytes())
    h.update(np.packbits(result.visible).tobytes())
    return h.hexdigest()[:12]


def fid_slice_index(brain: np.ndarray, shells: np.ndarray, max_slices: int, seed: int, subject: str) -> dict[str, np.ndarray]:
    """Per diffusion-weighted shell, (S, 2) rows (volume, z) of the axial slices used for the Frechet distance.

    Candidates are the slices whose brain area is >= 20 % of the largest one, in every volume of the shell; at most
    ``max_slices`` are drawn, seeded by (seed, subject), identically for every model. (The "dw" Frechet distance
    pools the slices of all shells; b0 volumes are left out.)
    """
    area = brain.sum(axis=(0, 1))
    zs = np.flatnonzero(area >= MIN_SLICE_FRACTION * max(area.max(), 1))
    rng = np.random.default_rng([seed, zlib.crc32(subject.encode())])
    out = {}
    for b in np.unique(shells[shells > 0]):
        pairs = np.array([(v, z) for v in np.flatnonzero(shells == b) for z in zs], dtype=np.int64).reshape(-1, 2)
        if len(pairs) > max_slices:
            pairs = pairs[np.sort(rng.choice(len(pairs), size=max_slices, replace=False))]
        out[f"{b:g}"] = pairs
    return out


def take_slices(volume: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """volume (X, Y, Z, V), pairs (S, 2) of (volume, z) -> (S, Y, X) axial slices, anterior up."""
    return np.stack([volume[:, :, z, v].T[::-1] for v, z in pairs]) if len(pairs) else np.zeros((0,) + volume.shape[1::-1])


def evaluate_reconstruction(dwi, weights, settings: ReconstructSettings, *, subject: str, model: str,
                            device="cpu", tracts=None) -> SubjectResult:
    """Reconstruct ``dwi`` with ``weights`` and measure it (see the module docstring).

    tracts: None (no per-tract errors) or a callable (fa, affine, mask) -> SubjectTracts, e.g. a cached
    ``atlas.subject_tracts`` so that the registration runs once per subject, not once per model.
    """
    return measure(run_reconstruction(dwi, weights, settings, device), subject=subject, model=model, tracts=tracts)


def evaluate_baselines(result: Reconstruction, *, subject: str, tracts=None) -> list[SubjectResult]:
    """The baselines of ``DRoPE.baselines`` on the hidden patches of a model's ``result``, measured alike.

    Each baseline fills the hidden voxels of the b0-normalised input; its reconstruction (in input units) goes
    through the same DTI fit and metrics as a model's.
    """
    original, _ = normalised_pair(result)
    dwi = result.dwi
    b0 = mean_b0(dwi.data, dwi.gtab)[..., None]
    predictions = baseline_predictions(original, result.visible, dwi.gtab, result.mask)
    out = []
    for name, prediction in predictions.items():
        recon = (prediction * b0).astype(np.float32)
        filled = replace(result, recon=recon, maps=dti_maps(dwi, recon, result.mask))
        out.append(measure(filled, subject=subject, model=name, tracts=tracts))
    return out


def measure(result: Reconstruction, *, subject: str, model: str, tracts=None) -> SubjectResult:
    """Signal metrics, DTI errors and (with ``tracts``) per-tract errors of one reconstruction."""
    original, recon = normalised_pair(result)
    shells = shell_labels(result)
    rows = signal_metrics(original, recon, result.mask, result.visible, shells, subject=subject, model=model)
    dti, valid, wm = dti_region_errors(result.maps, result.mask)
    notes = []
    tract_rows = []
    if result.maps and tracts is not None:
        regions = tracts(result.maps["fa"], result.dwi.affine, result.mask)
        tract_rows = tract_errors(result.maps, regions.labels, regions.names, wm, subject=subject, model=model)
        dti["registration_fa_r"] = regions.fa_correlation
    elif not result.maps:
        notes.append("no DTI: fewer than 6 directions or no b0 in the selected volumes")
    return SubjectResult(subject, model, rows, dti, tract_rows, result, (original, recon), mask_digest(result), notes)
