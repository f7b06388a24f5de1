"""CLS latents of whole scans, for probing (paper Section 4.3).

``scan_latent`` (from ``DRoPE.reconstruct``) is the scan-level latent: the encoder runs slab by slab (``slab`` slices,
nothing masked) and the scan's latent is the mean of the slab CLS vectors weighted by each slab's brain-voxel
count. ``extract_latents`` draws K random protocols per subject (``volumes`` diffusion-weighted volumes plus one
b0 for the normalisation, seeded by (seed, subject id, draw)) and returns (K, D) latents per subject.
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import full_suffix
from ..dwi import DWI
from ..gradients import DWIError
from ..io import load_dwi
from ..model import load_model, read_metadata
from ..preprocess import Preprocessed, brain_mask, preprocess
from ..protocol import pick_volumes
from ..reconstruct import ReconstructSettings, resolve_slab, scan_latent

log = logging.getLogger(__name__)

BIDS_SUBJECT = re.compile(r"(?<![A-Za-z0-9])sub-[A-Za-z0-9]+")
BIDS_SESSION = re.compile(r"(?<![A-Za-z0-9])ses-[A-Za-z0-9]+")


class ExtractError(DWIError):
    """Inputs that cannot give latents (too few volumes, duplicate subject ids, empty brain mask, ...)."""


def subject_ids(paths: Sequence[Path]) -> list[str]:
    """One id per DWI: the BIDS ``sub-XXX`` label in the path (``sub-XXX_ses-YY`` when sessions repeat it), else
    the file name without suffix, else (when file names repeat, e.g. every file is ``dwi.nii.gz``) the folder name.

    Raises ExtractError when ids still collide.
    """
    ids = []
    for path in map(Path, paths):
        text = path.as_posix()
        subjects = BIDS_SUBJECT.findall(text)
        ids.append(subjects[-1] if subjects else None)
    labels = list(ids)
    for i, path in enumerate(map(Path, paths)):  # sessions: sub-01_ses-1 when sub-01 repeats
        if labels[i] is not None and labels.count(labels[i]) > 1:
            sessions = BIDS_SESSION.findall(path.as_posix())
            if sessions:
                ids[i] = f"{ids[i]}_{sessions[-1]}"
    stems = [Path(p).name[: len(Path(p).name) - len(full_suffix(p))] for p in paths]
    for i, path in enumerate(map(Path, paths)):
        if ids[i] is None:
            ids[i] = stems[i] if stems.count(stems[i]) == 1 else path.parent.name
    duplicates = sorted({x for x in ids if ids.count(x) > 1})
    if duplicates:
        clash = [str(p) for p, x in zip(paths, ids) if x in duplicates]
        raise ExtractError(f"subject ids {duplicates} are not unique for {clash}; use distinct file or folder names")
    return ids


def draw_protocol(dwi: DWI, volumes: int | None, seed) -> np.ndarray:
    """(V,) sorted volume indices: ``volumes`` random diffusion-weighted volumes plus one random b0, or all (None)."""
    if volumes is None:
        return np.arange(dwi.n_volumes)
    rng = np.random.default_rng(seed)
    b0 = np.flatnonzero(dwi.gtab.b0s_mask)
    n_dw = int((~dwi.gtab.b0s_mask).sum())
    if volumes < 1 or volumes > n_dw:
        raise ExtractError(f"{dwi.source}: cannot draw {volumes} diffusion-weighted volumes, it has {n_dw}")
    first = rng.choice(b0)
    dw = pick_volumes(dwi.gtab, volumes, rng, include_b0=False)
    return np.sort(np.concatenate([[first], dw])).astype(np.int64)


@dataclass(frozen=True)
class Draw:
    """One protocol draw of one subject: volume indices into the file and the latent (D,)."""

    volumes: np.ndarray
    latent: np.ndarray


def prepare_subject(dwi: DWI, index: np.ndarray, patch, mask: np.ndarray | None = None) -> Preprocessed:
    """Preprocess the volumes ``index`` of ``dwi`` (mask: from the full scan's mean b0 when None)."""
    mask = brain_mask(dwi) if mask is None else mask
    return preprocess(dwi.select(index), mask=mask, patch=patch)


def draw_seed(seed: int, subject: str, draw: int) -> np.random.SeedSequence:
    """Seed of one protocol draw: independent of the order of the subjects."""
    return np.random.SeedSequence([int(seed), zlib.crc32(subject.encode()), int(draw)])


def extract_latents(
    paths: Sequence[Path],
    checkpoint,
    *,
    draws: int = 1,
    volumes: int | None = 12,
    seed: int = 0,
    device="cpu",
    slab: int | None = None,
    ids: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, np.ndarray], dict]:
    """Latents of every DWI: {subject id: (K, D) float32} and a JSON-safe record (volumes drawn, settings).

    volumes=None uses every volume (then one draw). The brain mask comes from the full scan's mean b0, so it is
    the same for every draw of a subject.
    """
    if draws < 1:
        raise ExtractError(f"draws must be >= 1, got {draws}")
    if volumes is None and draws > 1:
        raise ExtractError("with all volumes every draw is the same; use draws = 1")
    device = torch.device(device)
    model = load_model(checkpoint, device=device)
    meta = read_metadata(checkpoint)
    slab = resolve_slab(ReconstructSettings(slab=slab), meta, model.config.patch_size[2])
    ids = list(ids) if ids is not None else subject_ids(paths)
    latents, record = {}, {}
    for path, subject in zip(paths, ids):
        dwi = load_dwi(path)
        mask = brain_mask(dwi)
        rows, picked = [], []
        for k in range(draws):
            index = draw_protocol(dwi, volumes, draw_seed(seed, subject, k))
            prep = prepare_subject(dwi, index, model.config.patch_size, mask)
            rows.append(scan_latent(model, prep, slab, device).float().cpu().numpy())
            picked.append(index.tolist())
        latents[subject] = np.stack(rows)
        record[subject] = {"path": str(path), "volumes": picked}
        if progress:
            progress(f"{subject}: {draws} draw(s) of {len(picked[0])} volumes")
    info = {"checkpoint": str(checkpoint), "draws": draws, "volumes_per_draw": volumes, "seed": seed, "slab": slab,
            "latent_dim": model.config.embed_dim, "subjects": record}
    return latents, info
