"""Reconstruct / predict: the engine behind ``python -m DRoPE reconstruct`` and the Slicer module.

Pipeline: pick volumes -> preprocess (mask, b0 normalisation, whole patches) -> for each slab of ``slab``
slices: mask a fraction of the patches of every diffusion-weighted volume (seeded), reconstruct all patches, read
the encoder's attention and CLS latent on the unmasked slab -> back on the input grid -> DTI of the original and of
the reconstruction -> outputs.

b0 volumes are the normalisation reference (the model input is signal / mean b0), not model tokens: they are never
hidden and the reconstruction carries them over from the input.

Slabs: the model is pretrained on slabs of a few slices (4 by default, the depth of one patch), so inference runs
slab by slab, exactly as in training; this also bounds memory for any brain size and number of volumes. The
latent of the scan is the mean of the slabs' CLS vectors, weighted by their brain-voxel count.

The reconstruction is the completed DWI in the units of the input: the model's prediction (multiplied back by the
input's mean b0) where a patch was hidden from the encoder, the acquired signal where it was shown (and in the b0
volumes), so FA / MD of the reconstruction measure what the model adds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .dti import DTIModel, mean_b0
from .dwi import DWI
from .gradcheck import check_summary
from .atomic import atomic_folder
from .io import input_files, refuse_inputs, save_nifti, save_scalar_nifti
from .model import fixed_ratio_spatial_mask, load_model, patch_map_to_voxels
from .model.checkpoint import read_metadata
from .overview import MD_DISPLAY_MAX, grey_style, panel_figure, save_figure
from .preprocess import NORM_RANGE, Preprocessed, brain_mask, normalize, preprocess
from .probes import load_probe
from .protocol import describe_protocol, pick_volumes
from .resources import DEFAULT_WEIGHTS

log = logging.getLogger(__name__)

MIN_DTI_DIRECTIONS = 6
Progress = Callable[[float, str], None]


class ReconstructError(ValueError):
    """Settings that cannot work with this input or model; the message says which and why."""


@dataclass(frozen=True)
class ReconstructSettings:
    """What to run.

    Attributes:
        mask_ratio: fraction of the patches of every volume hidden from the encoder, in [0, 1).
        volumes: number of volumes given to the model (a seeded random subset holding a b0); None = all.
        seed: seeds the volume subset and the patch mask.
        slab: slices per inference slab (a multiple of the patch depth); None = the training slab of the
            checkpoint (``extra.slab`` in model.json), else one patch depth.
        draws: independent patch-mask draws (draw 0 uses ``seed``, the others ``draw_seed(seed, k)``); above 1 the
            spread of the reconstruction and of its FA over the draws is added (see ``draw_maps``).
    """

    mask_ratio: float = 0.75
    volumes: int | None = None
    seed: int = 0
    slab: int | None = None
    draws: int = 1


@dataclass
class Reconstruction:
    """Results on the canonical input grid (X, Y, Z), for the V selected volumes.

    Attributes:
        dwi: the input restricted to the selected volumes.
        volume_index: (V,) indices of the selected volumes in the input file.
        recon: (X, Y, Z, V) completed signal (input units): the model's prediction where hidden, else the input.
        visible: (X, Y, Z, V) bool, False where the patch was hidden from the encoder (b0 volumes: all True).
        mask: (X, Y, Z) bool brain mask.
        attention: (X, Y, Z) CLS -> patch attention of the last encoder block, averaged over volumes and heads.
        diffusion_attention: (W, W) attention between the W diffusion-weighted volumes (``weighted``), averaged over
            patches, heads and slabs.
        latent: (D,) CLS latent of the scan.
        maps: DTI maps {"fa", "md", "fa_recon", "md_recon", "fa_error", "md_error", "v1"}, empty when DTI is
            impossible (fewer than 6 directions); MD in mm^2/s. With ``settings.draws`` > 1 also the spread over the
            draws (``draw_maps``): "reconstruction_mean", "reconstruction_std" (X, Y, Z, V), "fa_mean", "fa_std".
        summary: JSON-safe description of the run and its metrics.
    """

    dwi: DWI
    volume_index: np.ndarray
    recon: np.ndarray
    visible: np.ndarray
    mask: np.ndarray
    attention: np.ndarray
    diffusion_attention: np.ndarray
    latent: np.ndarray
    maps: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    @property
    def weighted(self) -> np.ndarray:
        """(W,) indices of the diffusion-weighted volumes (the model's tokens) among the V selected ones."""
        return np.flatnonzero(~self.dwi.gtab.b0s_mask)


def resolve_slab(settings: ReconstructSettings, meta: dict, patch_depth: int) -> int:
    """Slab depth: the setting, else the checkpoint's training slab, else one patch depth."""
    slab = settings.slab or meta.get("extra", {}).get("slab") or patch_depth
    if slab % patch_depth:
        raise ReconstructError(f"slab {slab} must be a multiple of the patch depth {patch_depth}")
    return int(slab)


def select_volumes(dwi: DWI, volumes: int | None, seed: int) -> tuple[DWI, np.ndarray]:
    """The DWI restricted to ``volumes`` random volumes (holding a b0), or all of them (with a logged warning when
    more are asked for than it has)."""
    if volumes is not None and volumes > dwi.n_volumes:
        n = dwi.n_volumes
        log.warning("%d volumes asked for, but %s has %d: using all %d", volumes, dwi.source, n, n)
    if volumes is None or volumes >= dwi.n_volumes:
        return dwi, np.arange(dwi.n_volumes)
    index = pick_volumes(dwi.gtab, volumes, seed, include_b0=True)
    return dwi.select(index), index


def run_reconstruction(
    dwi: DWI,
    weights=DEFAULT_WEIGHTS,
    settings: ReconstructSettings = ReconstructSettings(),
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> Reconstruction:
    """Reconstruct ``dwi`` with the checkpoint ``weights`` (folder or file) on ``device``.

    progress(fraction, message) is called as the work advances. On CUDA out-of-memory the run is redone on the
    CPU with a warning (recorded in the summary).
    """
    report = progress or (lambda fraction, message: None)
    if not 0.0 <= settings.mask_ratio < 1.0:
        raise ReconstructError(f"mask ratio must be in [0, 1), got {settings.mask_ratio}")
    if settings.draws < 1:
        raise ReconstructError(f"draws must be >= 1, got {settings.draws}")
    started = time.perf_counter()
    report(0.02, "loading model")
    meta = read_metadata(weights)
    device = torch.device(device)
    model = load_model(weights, device=device)
    slab = resolve_slab(settings, meta, model.config.patch_size[2])
    subset, index = select_volumes(dwi, settings.volumes, settings.seed)
    report(0.08, "preprocessing")
    mask = brain_mask(subset)
    if not mask.any():
        raise ReconstructError(f"{dwi.source}: the brain mask is empty (no voxel stands out from the background)")
    prep = preprocess(subset, mask=mask, patch=model.config.patch_size)

    def run(device):
        first = _run_slabs(model.to(device), prep, slab, settings, device, _draw_progress(report, 0, settings.draws))
        spread = draw_maps(model, prep, subset, mask, slab, settings, device, report, first[:2])
        return first, spread

    try:
        outputs, spread = run(device)
    except torch.OutOfMemoryError:
        if device.type != "cuda":
            raise
        log.warning("CUDA out of memory; running on the CPU instead")
        torch.cuda.empty_cache()
        device = torch.device("cpu")
        outputs, spread = run(device)
    pred, visible, attention, diffusion, latent = outputs
    report(0.8, "back on the input grid")
    recon, shown = completed_dwi(prep, subset, mask, pred, visible)
    result = Reconstruction(
        dwi=subset,
        volume_index=index,
        recon=recon.astype(np.float32),
        visible=shown,
        mask=mask,
        attention=prep.to_input(attention),
        diffusion_attention=diffusion,
        latent=latent,
    )
    report(0.85, "DTI of original and reconstruction")
    result.maps = dti_maps(subset, recon, mask) | spread
    report(0.9, "gradient-table check")
    check, warning = check_summary(dwi, mask)
    result.summary = _summary(result, prep, weights, meta, settings, slab, device, time.perf_counter() - started)
    result.summary["gradient_check"] = check
    if warning:
        log.warning("%s", warning)
        result.summary["warnings"].append(warning)
    report(0.95, "done")
    return result


def weighted_volumes(prep: Preprocessed) -> np.ndarray:
    """(W,) indices of the diffusion-weighted volumes, the model's tokens; raises ReconstructError if there is none."""
    weighted = np.flatnonzero(~prep.gtab.b0s_mask)
    if len(weighted) == 0:
        raise ReconstructError(f"{prep.gtab.describe()}: no diffusion-weighted volume to give the model")
    return weighted


def slab_tensors(prep: Preprocessed, slab: int, device, z0: int) -> tuple[torch.Tensor, int]:
    """x (1, W, X, Y, z1 - z0): the diffusion-weighted volumes of the slab of ``prep.signal`` starting at slice z0,
    and the slab's brain-voxel count."""
    z1 = min(prep.signal.shape[3], z0 + slab)
    x = torch.as_tensor(prep.signal[weighted_volumes(prep), :, :, z0:z1], device=device)[None]
    return x, int(prep.mask[:, :, z0:z1].sum())


def protocol_tensors(prep: Preprocessed, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's protocol inputs for one scan: bvals (1, W) and bvecs (1, W, 3) of the diffusion-weighted
    volumes, float32 on ``device``."""
    weighted = weighted_volumes(prep)
    bvals = torch.as_tensor(prep.gtab.bvals[weighted], dtype=torch.float32, device=device)[None]
    bvecs = torch.as_tensor(prep.gtab.bvecs[weighted], dtype=torch.float32, device=device)[None]
    return bvals, bvecs


def scan_latent(model, prep: Preprocessed, slab: int, device="cpu", *, grad: bool = False) -> torch.Tensor:
    """(D,) latent of a scan: the mean of the slabs' CLS vectors (nothing masked), weighted by brain voxels.

    grad=True keeps the autograd graph (fine-tuning); otherwise runs under ``torch.no_grad``.
    """
    bvals, bvecs = protocol_tensors(prep, device)
    total, weight = None, 0
    with torch.set_grad_enabled(grad):
        for z0 in range(0, prep.signal.shape[3], slab):
            x, brain = slab_tensors(prep, slab, device, z0)
            if brain:
                cls = model.encode(x, bvals, bvecs)[0] * brain
                total = cls if total is None else total + cls
                weight += brain
    if total is None:
        raise ReconstructError("the brain mask is empty: no slab holds brain voxels")
    return total / weight


@torch.no_grad()
def _run_slabs(model, prep, slab: int, settings: ReconstructSettings, device, report: Progress, *, extras=True):
    """Run the model slab by slab on the model grid, with the patch mask seeded by ``settings.seed``.

    Returns pred (V, X, Y, Z) normalised signal (b0 volumes: the input), visible (V, X, Y, Z) bool (b0: True),
    attention (X, Y, Z), diffusion (W, W) between the weighted volumes, latent (D,); the last three are None
    with ``extras=False`` (the extra mask draws need only the prediction).
    """
    _, X, Y, Z = prep.signal.shape
    weighted = weighted_volumes(prep)
    W = len(weighted)
    patch = model.config.patch_size
    bvals, bvecs = protocol_tensors(prep, device)
    generator = torch.Generator().manual_seed(settings.seed)
    pred = np.array(prep.signal, dtype=np.float32)  # b0 volumes stay as they are
    visible = np.ones(prep.signal.shape, dtype=bool)
    attention = np.zeros((X, Y, Z), dtype=np.float32)
    diffusion = np.zeros((W, W), dtype=np.float64)
    latent = None  # brain-weighted sum of the slabs' CLS vectors: scan_latent, from the attention-map pass
    weight_total = 0
    starts = range(0, Z, slab)
    for n, z0 in enumerate(starts):
        x, brain = slab_tensors(prep, slab, device, z0)
        grid = tuple(x.shape[2:])
        z1 = z0 + grid[2]
        P = math.prod(s // p for s, p in zip(grid, patch))
        keep = None
        if settings.mask_ratio > 0:
            keep = fixed_ratio_spatial_mask(1, W, P, settings.mask_ratio, generator=generator).to(device)
            visible[weighted, :, :, z0:z1] = patch_map_to_voxels(keep, grid, patch)[0].cpu().numpy()
        if brain:
            pred[weighted, :, :, z0:z1] = model.reconstruct(x, bvals, bvecs, keep)[0].float().cpu().numpy()
            weight_total += brain
        if brain and extras:
            maps = model.attention_maps(x, bvals, bvecs)
            attention[..., z0:z1] = patch_map_to_voxels(maps["spatial"], grid, patch)[0].mean(0).float().cpu().numpy()
            diffusion += brain * maps["diffusion"][0].double().cpu().numpy()
            cls = maps["cls"][0] * brain
            latent = cls if latent is None else latent + cls
        report(0.1 + 0.6 * (n + 1) / len(starts), f"slab {n + 1}/{len(starts)}")
    if weight_total == 0:
        raise ReconstructError("the brain mask is empty: nothing to reconstruct")
    if not extras:
        return pred, visible, None, None, None
    return pred, visible, attention, diffusion / weight_total, (latent / weight_total).float().cpu().numpy()


def completed_dwi(prep: Preprocessed, dwi: DWI, mask: np.ndarray, pred: np.ndarray, visible: np.ndarray):
    """The completed DWI of one mask draw on the input grid: the prediction (times the mean b0) where hidden, the
    acquired signal where shown, 0 outside the brain ``mask`` (X, Y, Z) bool. pred, visible: (V, X, Y, Z) on the model
    grid (from ``_run_slabs``). Returns recon (X, Y, Z, V) float32 and shown (X, Y, Z, V) bool."""
    shown = prep.to_input(visible.astype(np.uint8)).astype(bool)
    b0 = mean_b0(dwi.data, dwi.gtab)
    recon = np.where(shown, dwi.data, prep.to_input(pred) * b0[..., None]) * mask[..., None]
    return recon.astype(np.float32), shown


def draw_seed(seed: int, draw: int) -> int:
    """Seed of mask draw ``draw``: ``seed`` itself for draw 0 (so one draw is the plain run), else an independent
    stream of numpy's SeedSequence([seed, draw])."""
    return seed if draw == 0 else int(np.random.SeedSequence([seed, draw]).generate_state(1)[0])


def _draw_progress(report: Progress, draw: int, draws: int) -> Progress:
    """Map the 0.1..0.7 progress of one draw's slab loop onto its share of that range."""
    if draws == 1:
        return report
    return lambda fraction, message: report(0.1 + (fraction - 0.1 + 0.6 * draw) / draws,
                                            f"draw {draw + 1}/{draws}: {message}")


class DrawSpread:
    """Running mean and (population) standard deviation over draws, per element, counting only where selected.

    shape: the arrays' shape. ``add(values, where)``: values of that shape; where: bool of that shape, True = this
    draw counts there. ``std`` is 0 where fewer than 2 draws counted; ``mean`` is ``fill`` where none did.
    """

    def __init__(self, shape):
        self.count = np.zeros(shape, dtype=np.int32)
        self._mean = np.zeros(shape, dtype=np.float64)
        self._m2 = np.zeros(shape, dtype=np.float64)

    def add(self, values: np.ndarray, where: np.ndarray) -> None:
        where = np.asarray(where, dtype=bool)
        self.count += where
        delta = np.where(where, values - self._mean, 0.0)
        self._mean += delta / np.maximum(self.count, 1)
        self._m2 += delta * np.where(where, values - self._mean, 0.0)

    def mean(self, fill) -> np.ndarray:
        return np.where(self.count > 0, self._mean, fill).astype(np.float32)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(np.where(self.count > 1, self._m2 / np.maximum(self.count, 1), 0.0)).astype(np.float32)


def draw_maps(model, prep, dwi: DWI, mask: np.ndarray, slab: int, settings: ReconstructSettings, device,
              report: Progress, first) -> dict:
    """Spread of the reconstruction over ``settings.draws`` independent mask draws; {} for one draw.

    mask: (X, Y, Z) bool brain mask on the input grid; first: (pred, visible) of draw 0 from ``_run_slabs``. Returns, on the canonical input grid:
    "reconstruction_mean" / "reconstruction_std" (X, Y, Z, V), input units: mean and standard deviation of the model's
    prediction of each voxel over the draws in which it was hidden (the acquired signal and 0 where it was hidden in
    no draw; std 0 where in fewer than 2, and always for b0 volumes and outside the brain), so no acquired value
    enters the spread; "fa_mean" / "fa_std" (X, Y, Z): mean and standard deviation over all draws of FA of each
    draw's completed DWI (the ``fa_recon`` map of that draw), left out when DTI is impossible.
    """
    if settings.draws == 1:
        return {}
    hidden = DrawSpread(first[0].shape)
    fa = DrawSpread(mask.shape)
    dti = dwi.gtab.n_directions >= MIN_DTI_DIRECTIONS and dwi.gtab.b0s_mask.any()
    for draw in range(settings.draws):
        if draw == 0:
            pred, visible = first
        else:
            drawn = dataclasses.replace(settings, seed=draw_seed(settings.seed, draw))
            pred, visible = _run_slabs(model, prep, slab, drawn, device, _draw_progress(report, draw, settings.draws),
                                       extras=False)[:2]
        hidden.add(pred, ~visible)
        if dti:
            recon, _ = completed_dwi(prep, dwi, mask, pred, visible)
            fa.add(DTIModel(dwi.gtab).fit(recon, mask, progress=False).fa, True)
    b0 = mean_b0(dwi.data, dwi.gtab)[..., None] * mask[..., None]
    maps = {
        "reconstruction_mean": np.where(prep.to_input(hidden.count) > 0, prep.to_input(hidden.mean(0)) * b0,
                                        dwi.data * mask[..., None]).astype(np.float32),
        "reconstruction_std": (prep.to_input(hidden.std) * b0).astype(np.float32),
    }
    if dti:
        maps |= {"fa_mean": fa.mean(0), "fa_std": fa.std}
    return maps


def dti_maps(dwi: DWI, recon: np.ndarray, mask: np.ndarray) -> dict:
    """FA / MD of the original and the reconstruction and their absolute errors, on the canonical grid.

    Returns {} when the protocol cannot support a tensor (no b0 or fewer than 6 directions).
    """
    if dwi.gtab.n_directions < MIN_DTI_DIRECTIONS or not dwi.gtab.b0s_mask.any():
        log.warning("DTI maps skipped: %s has fewer than %d directions", dwi.gtab.describe(), MIN_DTI_DIRECTIONS)
        return {}
    model = DTIModel(dwi.gtab)
    original = model.fit(dwi.data, mask, progress=False)
    rebuilt = model.fit(recon, mask, progress=False)
    both = original.mask & rebuilt.mask
    return {
        "fa": original.fa,
        "md": original.md,
        "fa_recon": rebuilt.fa,
        "md_recon": rebuilt.md,
        "fa_error": np.abs(rebuilt.fa - original.fa) * both,
        "md_error": np.abs(rebuilt.md - original.md) * both,
        "v1": (original.v1 @ dwi.rotation.T) * original.mask[..., None],
    }


def normalised_pair(dwi: DWI, recon: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reconstruction and original as the model sees them: divided by the original's mean b0 and clipped to
    ``NORM_RANGE``, 0 outside the mask. recon: (X, Y, Z, V) like ``dwi.data`` -> two (X, Y, Z, V) float32 arrays."""
    target = normalize(dwi.data, dwi.gtab, mask)
    b0 = mean_b0(dwi.data, dwi.gtab)
    valid = (mask & (b0 > 0))[..., None]
    prediction = np.clip(recon / np.where(b0 > 0, b0, 1.0)[..., None], *NORM_RANGE) * valid
    return prediction.astype(np.float32), target


def _summary(result: Reconstruction, prep, weights, meta, settings, slab, device, seconds) -> dict:
    """JSON-safe record of the run: inputs, the settings used (and those requested where they differ), model,
    timing and error metrics."""
    dwi = result.dwi
    used = dataclasses.asdict(settings) | {"slab": slab, "volumes": len(result.volume_index)}
    prediction, target = normalised_pair(dwi, result.recon, result.mask)
    err = prediction - target
    inside = np.broadcast_to(result.mask[..., None], result.visible.shape)
    metrics = {
        "mae_normalised_masked": _mean(np.abs(err), inside & ~result.visible),
        "mse_normalised_masked": _mean(err**2, inside & ~result.visible),
    }
    if result.maps:
        metrics["fa_mae"] = _mean(result.maps["fa_error"], result.mask)
        metrics["md_mae_mm2_per_s"] = _mean(result.maps["md_error"], result.mask)
    return {
        "drope_version": __version__,
        "input": dwi.source,
        "protocol": describe_protocol(dwi.gtab),
        "volume_index": result.volume_index.tolist(),
        "settings": used,
        "requested": {k: v for k, v in dataclasses.asdict(settings).items() if v is not None and v != used[k]},
        "weights": str(weights),
        "model": meta.get("config", {}),
        "device": str(device),
        "seconds": round(seconds, 2),
        "peak_memory_gib": _peak_memory_gib(device),
        "latent_dim": int(result.latent.size),
        "latent_norm": float(np.linalg.norm(result.latent)),
        "metrics": metrics,
        "warnings": list(dwi.warnings),
        "model_grid": list(prep.signal.shape[1:]),
    }


def _peak_memory_gib(device) -> dict:
    """Peak memory of this process so far, GiB: resident set ("cpu", where the OS reports it) and, on CUDA,
    the most the caching allocator handed out ("cuda")."""
    peak = {}
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        peak["cpu"] = round(rss * (1 if sys.platform == "darwin" else 1024) / 2**30, 3)
    except ImportError:  # Windows
        pass
    if torch.device(device).type == "cuda":
        peak["cuda"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return peak


def _mean(values: np.ndarray, where: np.ndarray) -> float | None:
    return float(values[where].mean()) if where.any() else None


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------

OUTPUT_FILES = (
    "reconstruction.nii.gz",
    "attention.nii.gz",
    "hidden.nii.gz",
    "diffusion_attention.csv",
    "diffusion_attention.png",
    "latent.npy",
    "summary.json",
    "overview.png",
)
MAP_FILES = ("fa", "md", "fa_recon", "md_recon", "fa_error", "md_error", "reconstruction_mean", "reconstruction_std",
             "fa_mean", "fa_std")


def output_paths(out_dir) -> list[Path]:
    """Every file ``write_outputs`` may write into ``out_dir`` (which of them depends on the run)."""
    names = [*OUTPUT_FILES, *(f"{name}.nii.gz" for name in MAP_FILES), "reconstruction.bval", "reconstruction.bvec",
             "prediction.json"]
    return [Path(out_dir) / name for name in names]


def write_outputs(result: Reconstruction, out_dir, probe_path=None) -> list[Path]:
    """Write every output into ``out_dir`` on the input's own grid; returns the written paths.

    The files are written into a staging folder beside ``out_dir`` and appear together (``atomic_folder``): all at
    once when ``out_dir`` is new or empty; when it already holds files they are moved in one by one, summary.json
    last, replacing files of the same name and keeping the others. An error or a signal (SIGKILL included) leaves
    no half-written output, and the next run removes what a killed one left. Raises DWIError if an output would
    overwrite an input file, ReconstructError if the outputs cannot be written (full or read-only disk).
    """
    out_dir = Path(out_dir)
    refuse_inputs(output_paths(out_dir), input_files(result.dwi), result.dwi.source)
    try:
        with atomic_folder(out_dir, last="summary.json") as stage:
            names = [path.name for path in _write_staged(result, stage, probe_path)]
    except OSError as error:
        raise ReconstructError(f"{out_dir}: cannot write the outputs ({error.strerror or error})") from None
    return [out_dir / name for name in names]


def _write_staged(result: Reconstruction, stage: Path, probe_path) -> list[Path]:

    dwi = result.dwi
    recon_dwi = dataclasses.replace(dwi, data=result.recon, source="", inputs=())
    written = list(save_nifti(recon_dwi, stage / "reconstruction.nii.gz"))
    for name in MAP_FILES:
        if name in result.maps:
            written.append(save_scalar_nifti(dwi.to_input_grid(result.maps[name]), dwi.grid.affine, stage / f"{name}.nii.gz"))
    written.append(save_scalar_nifti(dwi.to_input_grid(result.attention), dwi.grid.affine, stage / "attention.nii.gz"))
    written.append(save_scalar_nifti(dwi.to_input_grid(~result.visible), dwi.grid.affine, stage / "hidden.nii.gz"))
    written += _write_diffusion_attention(result, stage)
    np.save(stage / "latent.npy", result.latent)
    written.append(stage / "latent.npy")
    if probe_path is not None:
        prediction = load_probe(probe_path).predict(result.latent)
        result.summary["prediction"] = prediction
        (stage / "prediction.json").write_text(json.dumps(prediction, indent=2))
        written.append(stage / "prediction.json")
    written.append(save_figure(reconstruction_figure(result), stage / "overview.png"))
    result.summary["outputs"] = [p.name for p in written] + ["summary.json"]
    (stage / "summary.json").write_text(json.dumps(result.summary, indent=2))
    written.append(stage / "summary.json")
    return written


def _write_diffusion_attention(result: Reconstruction, stage: Path) -> list[Path]:
    """The (V, V) matrix as CSV (rows = query volume, columns = key volume, with b-values) and a PNG heat map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gtab = result.dwi.gtab
    labels = [f"v{result.volume_index[i]}_b{gtab.shell_bvals[i]:g}" for i in result.weighted]
    csv = stage / "diffusion_attention.csv"
    rows = ["query\\key," + ",".join(labels)]
    rows += [label + "," + ",".join(f"{w:.6g}" for w in row) for label, row in zip(labels, result.diffusion_attention)]
    csv.write_text("\n".join(rows) + "\n")
    png = stage / "diffusion_attention.png"
    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.imshow(result.diffusion_attention, cmap="viridis")
    ax.set_xlabel("key volume")
    ax.set_ylabel("query volume")
    ax.set_title("Diffusion attention (last encoder block)")
    if len(labels) <= 30:
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return [csv, png]


def reconstruction_figure(result: Reconstruction):
    """Overview rows: one diffusion-weighted volume as input to the encoder (visible patches), original,
    reconstruction and absolute error; the attention map; FA of original and reconstruction and the FA/MD errors."""
    dwi = result.dwi
    k = int(np.flatnonzero(~dwi.gtab.b0s_mask)[0]) if (~dwi.gtab.b0s_mask).any() else 0
    b = dwi.gtab.shell_bvals[k]
    original, recon = dwi.data[..., k] * result.mask, result.recon[..., k]
    style = grey_style(original)
    error_style = dict(cmap="hot", vmin=0, vmax=style["vmax"] / 2)
    rows = [
        (f"encoder input, vol {result.volume_index[k]} (b={b:g})", original * result.visible[..., k], style),
        ("original", original, style),
        ("reconstruction", recon, style),
        ("|reconstruction - original|", np.abs(recon - original), error_style),
        ("CLS attention (mean over volumes)", result.attention * result.mask, dict(cmap="inferno")),
    ]
    if result.maps:
        md_max = MD_DISPLAY_MAX * 1e-3
        rows += [
            ("FA, original", result.maps["fa"], dict(cmap="gray", vmin=0, vmax=1)),
            ("FA, reconstruction", result.maps["fa_recon"], dict(cmap="gray", vmin=0, vmax=1)),
            ("|FA error|", result.maps["fa_error"], dict(cmap="hot", vmin=0, vmax=0.3)),
            ("|MD error| (mm$^2$/s)", result.maps["md_error"], dict(cmap="hot", vmin=0, vmax=md_max / 3)),
        ]
    ratio = result.summary.get("settings", {}).get("mask_ratio", 0)
    title = f"{Path(dwi.source).name}: DRoPE reconstruction, {ratio:.0%} of patches masked"
    return panel_figure(rows, dwi.voxel_size, mask=result.mask, title=title)
